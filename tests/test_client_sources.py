"""Heterogeneity federations (`bench.client-sources`): each client from its own source, corrupted
within it, anchors from GSM8K; and the named sources of fedqc.data.catalog. No model, no network:
the downloaded wheels are stood in for by small local ones."""

from __future__ import annotations

import gzip
import json
import zipfile

import pytest

from fedqc.bench.config import BenchConfig, load_bench_config
from fedqc.bench.experiment import fitting_size, make_federation
from fedqc.bench.pool import split_data
from fedqc.config import Config
from fedqc.data import catalog
from fedqc.data.partition import Partition
from fedqc.errors import FedqcError
from fedqc.wheels import Wheel, cached_wheel

TYPES = ["cut", "deletion", "exchange", "substitute", "noise"]


def _source(path, prefix: str, n: int):
    rows = [
        {"id": f"{prefix}-{k}", "prompt": f"{prefix} question {k}?", "response": _words(prefix, k)}
        for k in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _words(prefix: str, k: int) -> str:
    return " ".join(f"{prefix}{k}w{j}" for j in range(12))


@pytest.fixture
def hetero(tmp_path):
    """Three clients: two share source a (30 samples), one has source b (12)."""
    a = _source(tmp_path / "a.jsonl", "a", 30)
    b = _source(tmp_path / "b.jsonl", "b", 12)
    cfg = Config.from_flat(
        {"data.num-clients": 3, "data.samples-per-client": 10, "data.contamination": "0.3"}
    )
    bench = BenchConfig(client_sources=f"{a},{b},{a}", anchor_sweep="5")
    return cfg, bench


def test_each_client_draws_from_its_own_source_and_anchors_from_gsm8k(hetero):
    cfg, bench = hetero
    bench.check(cfg)
    data = split_data(cfg, bench)
    assert split_data(cfg, bench) == data  # seeded
    assert all(s.id.startswith("gsm8k-") for s in data.eval + data.anchors)
    owner = [{data.items[i].id[0] for i in g} for g in data.groups]
    assert owner == [{"a"}, {"b"}, {"a"}]
    assert not set(data.groups[0]) & set(data.groups[2])  # a's items shared out, disjoint
    clean = {s.response: s.id[0] for s in data.items}
    for item, variants in zip(data.items, data.variants, strict=True):
        if "exchange" in variants:  # an exchanged answer comes from the item's own source
            assert clean[variants["exchange"]] == item.id[0]
    for group in data.groups:  # every type in turn within each client's items
        assert sorted(t for i in group for t in data.variants[i]) == sorted(TYPES * 2)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_federations_keep_clients_in_their_sources_at_every_rate(hetero, rate):
    cfg, bench = hetero
    data = split_data(cfg, bench)
    n = fitting_size(data, TYPES, rate, 3)
    assert n == 10  # every type twice in each client's 10 items: a fully corrupted client fits
    for partition in (Partition("iid"), Partition("niid-1", beta=0.3)):
        fed = make_federation(data, partition, 3, n, rate, TYPES, 0, f"r{rate}")
        for group, members in zip(data.groups, fed.members, strict=True):
            assert {m.item for m in members} <= set(group)
        assert fed.true_rate == pytest.approx(rate)


@pytest.mark.parametrize(
    "sources, message",
    [
        ("{a}", "1 source\\(s\\) for 3 clients \\(data.num-clients\\); name one per client"),
        ("{a},{a},nope", "'nope' is neither a named source"),
        ("{a},{b},{b}", "'.*b.jsonl' has 12 samples; 2 client\\(s\\) × data.samples-per-client 10"),
        ("{a},{dup},{a}", "id 'a-0' is in both"),
    ],
)
def test_bad_client_sources_are_one_line(tmp_path, sources, message):
    a = _source(tmp_path / "a.jsonl", "a", 30)
    b = _source(tmp_path / "b.jsonl", "b", 12)
    dup = _source(tmp_path / "dup.jsonl", "a", 12)
    text = sources.format(a=a, b=b, dup=dup)
    with pytest.raises(FedqcError, match=message):
        cfg, bench = load_bench_config(
            None,
            [
                "data.num-clients=3",
                "data.samples-per-client=10",
                "data.contamination=0.3",
                "bench.anchor-sweep=5",
                f"bench.client-sources={text}",
            ],
        )
        bench.check(cfg)
        split_data(cfg, bench)


def test_gpqa_is_the_pinned_diamond_set_with_explanations():
    samples = catalog.load_source("gpqa")
    assert len(samples) == 198 and len({s.id for s in samples}) == 198
    assert all("\n\nAnswer: " in s.response and s.prompt for s in samples)


def _wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path


def test_humaneval_and_mgsm_symbolic_read_their_wheels(tmp_path, monkeypatch):
    task = {
        "task_id": "HumanEval/7",
        "prompt": "def f(x):\n",
        "canonical_solution": "    return x\n",
    }
    humaneval = _wheel(
        tmp_path / "h.whl",
        {catalog.HUMANEVAL.member: gzip.compress((json.dumps(task) + "\n").encode())},
    )
    template = 'id_orig = 12\nquestion = "Wie viele?"\nanswer = """\nZwei.\n#### 2\n"""\n'
    folder = catalog.MGSM_SYMBOLIC.member
    mgsm = _wheel(
        tmp_path / "m.whl",
        {f"{folder}deu/symbolic/0003.toml": template, f"{folder}rus/symbolic/0003.toml": template},
    )
    wheels = {catalog.HUMANEVAL.requirement: humaneval, catalog.MGSM_SYMBOLIC.requirement: mgsm}
    monkeypatch.setattr(catalog, "cached_wheel", lambda wheel, *_: wheels[wheel.requirement])

    (code,) = catalog.load_source("humaneval")
    assert code.id == "humaneval-7"
    assert code.prompt == catalog.HUMANEVAL_INSTRUCTION + "def f(x):\n"
    assert code.response == "    return x\n"
    (german,) = catalog.load_source("mgsm-symbolic:deu")
    assert (german.id, german.prompt, german.response) == (
        "mgsm-symbolic-deu-0003",
        "Wie viele?",
        "Zwei.\n#### 2",
    )
    assert catalog.gsm8k_overlap("mgsm-symbolic:deu") == {"gsm8k-12"}
    with pytest.raises(FedqcError, match="no such language; the wheel has deu, rus"):
        catalog.load_source("mgsm-symbolic:xyz")
    with pytest.raises(FedqcError, match="ISO 639-3 code"):
        catalog.load_source("mgsm-symbolic:German")


def test_a_cached_wheel_is_checked_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDQC_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "some_data-1.0-py3-none-any.whl").write_bytes(b"not the pinned one")
    with pytest.raises(FedqcError, match="does not match the pinned"):
        cached_wheel(Wheel("some-data==1.0", "0" * 64, "some_data/file"))
