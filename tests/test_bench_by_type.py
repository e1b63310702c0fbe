"""bench.by-type, FedDQC Table 8's counterpart: the arms train again on federations whose
corrupted samples all have one type; the clean samples and the oracle stay the same."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import tiny_effect_settings

from fedqc.bench.by_type import MIXTURE, retype
from fedqc.bench.config import load_bench_config
from fedqc.bench.experiment import make_federation
from fedqc.bench.pool import BenchData
from fedqc.data.partition import Partition
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError


def _data(types=("cut", "exchange")) -> BenchData:
    items = [Sample(f"i{k}", f"question {k}", f"answer {k}") for k in range(12)]
    variants = [{t: f"{t} answer {k}" for t in types} for k in range(12)]
    return BenchData([], [], items, variants)


def _main(data):
    types = ["cut", "exchange"]
    return make_federation(data, Partition("explicit", rates=(0.5,)), 2, 6, 0.5, types, 0, "main")


def test_retype_keeps_the_clean_samples_and_changes_only_the_corruption():
    data = _data()
    fed = _main(data)
    assert {m.corruption for c in fed.members for m in c} == {None, "cut", "exchange"}
    for kind in ("cut", "exchange"):
        typed = retype(fed, data, kind)
        entries = data.entries()
        for c, (old, new) in enumerate(zip(fed.members, typed.members, strict=True)):
            assert np.array_equal(typed.clean[c], fed.clean[c])
            for a, b, e in zip(old, new, typed.entries[c], strict=True):
                assert b.item == a.item
                assert b.corruption == (kind if a.corrupted else None)
                assert entries[e] == (b.item, b.corruption)
        assert typed.true_rate == fed.true_rate


def test_retype_without_the_type_is_one_line():
    data = _data()
    fed = _main(data)
    with pytest.raises(FedqcError, match="bench.variants"):
        retype(fed, data, "deletion")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["bench.types=cut,exchange", "bench.variants=1"], "bench.variants=2"),
        (
            ["bench.types=cut", "bench.variants=1", "bench.scorers=ppl,tracin"],
            "leave tracin out",
        ),
        (["bench.types=cut", "bench.variants=1", "bench.train=oracle"], "no arm besides"),
    ],
)
def test_by_type_config_errors_are_one_line(settings, message):
    cfg, bench = load_bench_config(None, ["bench.by-type=true", *settings])
    with pytest.raises(FedqcError, match=message):
        bench.check(cfg)


@pytest.fixture(scope="module")
def by_type_run(tmp_path_factory, tiny_model_dir):
    from fedqc.bench.run import run_bench

    run_dir = tmp_path_factory.mktemp("by-type")
    cfg, bench = load_bench_config(
        None,
        [
            *tiny_effect_settings(tiny_model_dir),
            "quality.shots=0",
            "bench.types=cut,exchange",
            "bench.variants=2",
            "bench.by-type=true",
            "bench.train=mixed,oracle",  # 2 + 2 Flower runs
        ],
    )
    result = run_bench(cfg, bench, run_dir, command="fedqc bench (by-type test)")
    return run_dir, result


def _client_files(folder):
    return {
        p.name: [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(folder.rglob("client-*.jsonl"))
    }


def test_by_type_trains_each_type_on_its_own_corruptions(by_type_run):
    run_dir, _ = by_type_run
    pool = {
        json.loads(line)["id"]: json.loads(line)
        for line in (run_dir / "data" / "pool.jsonl").read_text().splitlines()
    }
    flags = json.loads((run_dir / "data" / "federation.json").read_text())["clients"]
    corrupted_ids = {s["id"] for c in flags for s in c if s["corrupted"]}
    for kind in ("cut", "exchange"):
        folder = run_dir / "by-type" / kind
        assert not (folder / "oracle").exists()  # the oracle trains once, on the main federation
        mixed = _client_files(folder / "mixed")
        samples = [s for rows in mixed.values() for s in rows]
        assert len(samples) == 12
        for s in samples:
            expected = pool[s["id"]]["variants"][kind] if s["id"] in corrupted_ids else None
            assert s["response"] == (expected or pool[s["id"]]["response"])
        # mixed only (the oracle is the main one's): 2 questions
        assert len((folder / "generations.jsonl").read_text().splitlines()) == 2


def test_by_type_table_has_every_type_and_the_mixture(by_type_run):
    run_dir, _ = by_type_run
    with open(run_dir / "results.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["experiment"] == "by-type"]
    by = {(r["corruption"], r["arm"]): r for r in rows}
    assert set(by) == {
        (kind, arm) for kind in ("cut", "exchange", MIXTURE) for arm in ("mixed", "oracle")
    }
    # the oracle is the same run in every row; mixed keeps all 12 everywhere
    assert len({by[(k, "oracle")]["eval_loss_text"] for k in ("cut", "exchange", MIXTURE)}) == 1
    assert {by[(k, "mixed")]["kept"] for k in ("cut", "exchange", MIXTURE)} == {"12"}
    text = (run_dir / "results.md").read_text()
    assert "## Corruption types: the trained model (FedDQC Table 8)" in text
    assert "Corruption types: the trained model" in (run_dir / "report.html").read_text()
