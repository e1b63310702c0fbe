"""Checkpoint scorers in `fedqc bench`: the score source against direct calls of the scoring core,
what it refuses to reuse (n/a), and a tiny end-to-end bench with a real federated warm-up."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fedqc.bench.checkpoints import CheckpointScores, Warmup, load_checkpoints, round_lrs
from fedqc.bench.config import load_bench_config
from fedqc.bench.experiment import NA, NotMeasured, make_federation
from fedqc.bench.pool import BenchData
from fedqc.bench.run import run_bench
from fedqc.config import ModelConfig
from fedqc.data.partition import Partition
from fedqc.data.samples import Sample
from fedqc.models.loading import get_adapter_state, load
from fedqc.scoring.checkpointed import prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import Checkpoint, ScoringSettings

WORDS = [
    "the",
    "farmer",
    "sells",
    "eggs",
    "at",
    "the",
    "market",
    "for",
    "two",
    "dollars",
    "each",
    "and",
    "keeps",
    "the",
    "rest",
]


def _text(k: int, n: int) -> str:
    return " ".join(WORDS[(k + j) % len(WORDS)] for j in range(n))


def _data() -> BenchData:
    items = [
        Sample(f"i{k}", f"How many eggs in basket {k}?", _text(k, 6 + k % 5) + f"\n#### {k}")
        for k in range(12)
    ]
    variants = [{"cut": s.response[: len(s.response) // 3]} for s in items]
    anchors = [Sample(f"a{k}", f"Question {k}?", _text(k + 3, 7) + f"\n#### {k}") for k in range(5)]
    return BenchData([], anchors, items, variants)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=64))
    torch.manual_seed(1)
    base = get_adapter_state(loaded.model)
    checkpoints = [
        Checkpoint({k: v + 0.02 * torch.randn_like(v) for k, v in base.items()}, lr)
        for lr in (1e-3, 5e-4)
    ]
    warmup = Warmup(2, checkpoints, [], {}, 0.0)
    data = _data()
    fed = make_federation(
        data, Partition("explicit", rates=(0.25, 0.5)), 2, 4, math.nan, ["cut"], 0, "main"
    )
    return loaded, warmup, data, fed


def _source(setup, name, rescore=False):
    loaded, warmup, data, fed = setup
    source = CheckpointScores(name, loaded, warmup, data, 64, 4096, np.arange(3), rescore)
    source.prepare(fed)
    return source


def _direct(setup, name, samples, anchors, anchor_self=False):
    loaded, warmup, data, _ = setup
    settings = ScoringSettings.for_model(loaded.tokenizer, name, 64)
    chosen = [data.anchors[i] for i in anchors]
    info = prepare_anchor_info(loaded, chosen, warmup.checkpoints, settings)
    return score_with_checkpoints(
        loaded, samples, warmup.checkpoints, info, settings, anchor_self=anchor_self
    ).oriented


def _client_samples(data, fed):
    return [[data.sample(m) for m in members] for members in fed.members]


@pytest.mark.parametrize("name", ["tracin", "tracin-cos", "icl"])
def test_per_sample_scores_are_the_core_s_scores(setup, name):
    _, _, data, fed = setup
    source = _source(setup, name)
    clients = source.client_scores(fed, np.arange(3))
    # icl is a difference of two token-mean losses of ~5 nats: float32 rounds it by ~1e-6 nats
    # whatever the batch, which is more than rtol 1e-5 of a difference near 0.02 (seen on an
    # AVX2 CPU: 1.3e-6), so icl gets an absolute tolerance of 2e-6 nats beside the relative one.
    atol = 2e-6 if name == "icl" else 0.0
    for samples, got in zip(_client_samples(data, fed), clients, strict=True):
        want = _direct(setup, name, samples, [0, 1, 2])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    anchors = _direct(setup, name, data.anchors[:3], [0, 1, 2], anchor_self=True)
    np.testing.assert_allclose(source.anchor_scores(np.arange(3)), anchors, rtol=1e-5, atol=atol)
    # the whole pool is scored once, for the sweeps
    assert np.isfinite(source.pool_raw(np.arange(3))).all()
    other = make_federation(data, Partition("iid"), 2, 4, 0.5, ["cut"], 1, "contamination-0.5")
    source.client_scores(other, np.arange(3))  # looked up, no re-scoring needed
    assert "warm-up" in source.note(other, np.arange(3)) and not source.note(fed, np.arange(3))


def test_another_anchor_draw_is_n_a_unless_re_scored(setup):
    _, _, data, fed = setup
    draw = np.array([1, 2, 4])
    with pytest.raises(NotMeasured, match="rescore-checkpoints"):
        _source(setup, "tracin").anchor_scores(draw)
    source = _source(setup, "tracin", rescore=True)
    expected = _direct(setup, "tracin", [data.anchors[i] for i in draw], draw, anchor_self=True)
    np.testing.assert_allclose(source.anchor_scores(draw), expected, rtol=1e-5)
    samples = _client_samples(data, fed)
    got = source.client_scores(fed, draw)
    np.testing.assert_allclose(got[0], _direct(setup, "tracin", samples[0], draw), rtol=1e-5)


def test_datainf_is_scored_client_by_client(setup):
    _, _, data, fed = setup
    source = _source(setup, "datainf")
    scores = source.client_scores(fed, np.arange(3))
    for samples, got in zip(_client_samples(data, fed), scores, strict=True):
        # each client's statistics come from its own samples
        np.testing.assert_allclose(got, _direct(setup, "datainf", samples, [0, 1, 2]), rtol=1e-5)
    other = make_federation(data, Partition("iid"), 2, 4, 0.5, ["cut"], 1, "types-cut")
    with pytest.raises(NotMeasured, match="own samples"):
        source.client_scores(other, np.arange(3))
    raw = source.pool_raw(np.arange(3))
    assert np.isfinite(raw[np.concatenate(fed.entries)]).all()
    assert np.isnan(np.delete(raw, np.concatenate(fed.entries))).all()


# --- end to end: a real warm-up through Flower -------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_bench(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("bench-checkpoints")
    cfg, bench = load_bench_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.max-length=96",
            "data.num-clients=2",
            "data.samples-per-client=8",
            "data.num-anchors=3",
            "data.num-eval=2",
            "data.contamination=0.25,0.5",
            "train.rounds=1",
            "train.local-steps=1",
            "train.batch-size=2",
            "bench.scorers=ppl,ensemble:ppl+ifd,tracin,tracin-cos,datainf,icl",
            "bench.rules=anchor-mean,mixture",
            "bench.types=cut,exchange",
            "bench.warmup-rounds=1",
            "bench.anchor-sweep=2,5",
            "bench.anchor-repeats=1",
            "bench.em-questions=0",
            "bench.train=mixed",
        ],
    )
    result = run_bench(cfg, bench, run_dir, command="fedqc bench (checkpoints)")
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return run_dir, result, rows


CHECKPOINTED = ("tracin", "tracin-cos", "datainf", "icl")


def test_checkpoint_scorers_get_rows_like_forward_scorers(checkpoint_bench):
    _, result, rows = checkpoint_bench
    main = {r["arm"]: r for r in rows if r["experiment"] == "main" and r["client"] == "all"}
    for scorer in (*CHECKPOINTED, "ppl", "ensemble:ppl+ifd"):
        for rule in ("anchor-mean", "mixture", "drop-fraction", "global-proportion"):
            row = main[f"{scorer}/{rule}"]
            assert row["f1"] != "" and 0 <= float(row["f1"]) <= 1, row
            assert row["auc"] != "" and row.get("status", "") == ""
    printed = {r["arm"] for r in result["main"]}
    assert {"tracin/mixture", "icl/anchor-mean", "datainf/anchor-mean"} <= printed


def test_sweeps_mark_what_they_cannot_reuse(checkpoint_bench):
    _, _, rows = checkpoint_bench
    anchors = [r for r in rows if r["experiment"] == "anchors"]
    for scorer in CHECKPOINTED:
        mine = [r for r in anchors if r["scorer"] == scorer]
        assert mine and all(r["status"] == NA for r in mine)
        assert all("rescore-checkpoints" in r["note"] for r in mine)
    assert all(r["status"] == "" for r in anchors if r["scorer"] in ("ppl", "ensemble:ppl+ifd"))
    for experiment in ("contamination", "types"):
        here = [r for r in rows if r["experiment"] == experiment]
        tracin = [r for r in here if r["scorer"] == "tracin"]
        assert tracin and all(r["status"] == "" and r["f1"] != "" for r in tracin)
        assert all("warm-up" in r["note"] for r in tracin)
        datainf = [r for r in here if r["scorer"] == "datainf"]
        assert datainf and all(r["status"] == NA and "own samples" in r["note"] for r in datainf)


def test_warm_up_checkpoints_and_timing(checkpoint_bench, tiny_model_dir):
    run_dir, result, rows = checkpoint_bench
    timing = json.loads((run_dir / "timing.json").read_text())
    assert timing["warm-up"] > 0
    for scorer in CHECKPOINTED:
        assert timing[f"scoring {scorer}"] > 0
    # the warm-up (1 round = train.rounds) is the mixed arm's training, not run twice
    train = {r["arm"]: r for r in result["train"]}
    assert "warm-up" in train["mixed"]["note"]
    assert not (run_dir / "train" / "mixed").exists()
    # the pool's tracin scores are those of the core at the warm-up's saved round adapter
    cfg, _ = load_bench_config(run_dir / "bench.toml")
    checkpoints, _ = load_checkpoints(run_dir / "warmup" / "run", round_lrs(cfg, 1))
    assert [c.lr for c in checkpoints] == [cfg.train.lr]
    loaded = load(cfg.model)
    anchors = [Sample(**json.loads(x)) for x in (run_dir / "data" / "anchors.jsonl").open()]
    pool = {json.loads(x)["id"]: json.loads(x) for x in (run_dir / "data" / "pool.jsonl").open()}
    with open(run_dir / "scores.csv", newline="") as fh:
        scored = list(csv.DictReader(fh))[:4]
    samples = [
        Sample(
            r["id"],
            pool[r["id"]]["prompt"],
            pool[r["id"]]["variants"][r["corruption"]]
            if r["corruption"]
            else pool[r["id"]]["response"],
        )
        for r in scored
    ]
    settings = ScoringSettings.for_model(loaded.tokenizer, "tracin", cfg.model.max_length)
    info = prepare_anchor_info(loaded, anchors[:3], checkpoints, settings)
    direct = score_with_checkpoints(loaded, samples, checkpoints, info, settings).raw
    np.testing.assert_allclose([float(r["tracin"]) for r in scored], direct, rtol=1e-5)


def test_report_shows_checkpoint_scorers_and_what_is_n_a(checkpoint_bench):
    run_dir, _, _ = checkpoint_bench
    text = (run_dir / "results.md").read_text()
    page = (run_dir / "report.html").read_text()
    for doc in (text, page):
        assert "Checkpoint scorers: the warm-up" in doc
        assert "Not measured, or measured with a caveat" in doc
        assert "tracin-cos/mixture" in doc and "datainf/anchor-mean" in doc
        assert "rescore-checkpoints" in doc
    assert "θ_1" in text
    assert (run_dir / "plots" / "hist-tracin.png").is_file()
    assert (run_dir / "plots" / "hist-ensemble-ppl+ifd.png").is_file()
