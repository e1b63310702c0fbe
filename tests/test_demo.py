"""The GSM8K demo federation written by write_demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedqc.data.demo import load_gsm8k, parse_rates, write_demo
from fedqc.errors import FedqcError

RATES = [0.15, 0.35, 1.0]
N = 10


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def originals() -> dict[str, dict]:
    return {x["id"]: x for x in load_gsm8k()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo3")
    manifest = write_demo(
        out,
        num_clients=3,
        samples_per_client=N,
        num_anchors=4,
        num_eval=5,
        contamination=",".join(map(str, RATES)),
        seed=3,
    )
    return out, manifest


def test_files_exist(demo):
    out, _ = demo
    names = ["eval.jsonl", "anchors.jsonl", "manifest.json"]
    names += [f"{d}/client-{c}.jsonl" for d in ("clients", "truth") for c in range(3)]
    for name in names:
        assert (out / name).is_file(), name
    assert len(_rows(out / "eval.jsonl")) == 5
    assert len(_rows(out / "anchors.jsonl")) == 4


def test_splits_are_disjoint(demo):
    out, _ = demo
    names = ["eval.jsonl", "anchors.jsonl"] + [f"clients/client-{c}.jsonl" for c in range(3)]
    sets = [{r["id"] for r in _rows(out / name)} for name in names]
    assert [len(s) for s in sets] == [5, 4, N, N, N]
    assert len(set().union(*sets)) == sum(len(s) for s in sets)


def test_eval_and_anchors_are_clean(demo, originals):
    out, _ = demo
    for name in ("eval.jsonl", "anchors.jsonl"):
        for row in _rows(out / name):
            assert row == originals[row["id"]]


def test_corrupted_counts_and_flags_match_the_changed_answers(demo, originals):
    out, manifest = demo
    kinds = set()
    for c, rate in enumerate(RATES):
        pool = _rows(out / "clients" / f"client-{c}.jsonl")
        flags = _rows(out / "truth" / f"client-{c}.jsonl")
        assert [f["id"] for f in flags] == [r["id"] for r in pool]
        assert sum(f["corrupted"] for f in flags) == round(rate * N)
        assert manifest["clients"][c]["corrupted"] == round(rate * N)
        for row, flag in zip(pool, flags, strict=True):
            original = originals[row["id"]]
            assert row["question"] == original["question"]
            assert (row["answer"] != original["answer"]) is flag["corrupted"], row["id"]
            assert (flag["corruption"] is None) is (not flag["corrupted"])
            kinds.add(flag["corruption"])
    assert kinds == {None, "cut", "deletion", "exchange"}


def test_same_seed_same_files_other_seed_differs(tmp_path):
    def files(out: Path, seed: int) -> dict[str, bytes]:
        write_demo(
            out,
            num_clients=2,
            samples_per_client=6,
            num_anchors=2,
            num_eval=2,
            contamination="0.5",
            seed=seed,
        )
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}

    a, b, c = files(tmp_path / "a", 5), files(tmp_path / "b", 5), files(tmp_path / "c", 6)
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_asking_for_too_many_samples(tmp_path):
    with pytest.raises(FedqcError, match="GSM8K's test set has"):
        write_demo(tmp_path, num_clients=2, samples_per_client=10_000, contamination="0.1")


def test_parse_rates():
    assert parse_rates("0.3", 3) == [0.3, 0.3, 0.3]
    assert parse_rates("0, 0.5,1", 3) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("text", ["0.1,0.2", "a,b,c", "1.5", "-0.1", "", "0.1,0.2,0.3,0.4"])
def test_parse_rates_errors(text):
    with pytest.raises(FedqcError, match="data.contamination"):
        parse_rates(text, 3)
