"""Privacy: what a client sends holds no text, token ids or per-sample scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_samples
from fedqc.federation.privacy import AuditLog, PrivacyViolation, check_reply, noisy_histogram
from fedqc.federation.protocol import (
    EVALUATE_METRICS,
    HISTOGRAM_BINS,
    HISTOGRAM_REPLY,
    REPLY_COUNTS,
    TRAIN_METRICS,
)
from fedqc.federation.simulation import run_simulation
from fedqc.models.loading import load
from fedqc.pipeline import new_run_dir, prepare


def test_every_client_message_of_a_run_is_counts_and_adapter_only(
    tmp_path, tiny_model_dir, demo_dir
):
    audit = tmp_path / "audit.jsonl"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 96,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "quality.scorer": "ppl",
            "quality.rule": "anchor-quantile:0.2",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.fraction-evaluate": 1.0,
        }
    )
    cfg = prepare(cfg, new_run_dir(str(tmp_path / "run"), force=False))
    run_simulation(cfg, cfg.data.num_clients, client_mods=[AuditLog(str(audit))])

    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = sorted(e["message_type"] for e in entries)
    assert kinds == ["evaluate", "evaluate", "query.score", "query.score", "train", "train"]
    adapter = load(ModelConfig(name=str(tiny_model_dir))).initial_adapter
    texts = [s.prompt for s in load_samples(demo_dir / "clients" / "client-0.jsonl")]
    allowed = set(REPLY_COUNTS) | set(TRAIN_METRICS) | set(EVALUATE_METRICS)
    for entry in entries:
        assert not entry["error"], entry
        for name, record in entry["records"].items():
            if record["kind"] == "ArrayRecord":
                assert name == "arrays"
                shapes = {k: v["shape"] for k, v in record["entries"].items()}
                assert shapes == {k: list(v.shape) for k, v in adapter.items()}
            else:
                assert record["kind"] == "MetricRecord", record
                for key, value in record["entries"].items():
                    assert key in allowed
                    assert isinstance(value, int | float), (key, value)
        dumped = json.dumps(entry)
        assert not any(t[:30] in dumped for t in texts)


def _counts(**extra) -> RecordDict:
    return RecordDict({"stats": MetricRecord({"total": 10, "kept": 7, **extra})})


def test_guard_passes_counts_and_lora_arrays():
    check_reply(_counts())
    check_reply(RecordDict({"arrays": ArrayRecord({"m.lora_A.weight": torch.zeros(2, 3)})}))


@pytest.mark.parametrize(
    "content",
    [
        _counts(scores=[0.1, 0.2, 0.3]),  # per-sample scores as a list
        _counts(**{"sample-7-score": 0.3}),  # a per-sample score under its own key
        RecordDict({"stats": ConfigRecord({"total": 10, "text": "What is 2+3?"})}),
        RecordDict({"tokens": ConfigRecord({"ids": [1, 2, 3]})}),
    ],
)
def test_guard_stops_anything_else(content):
    with pytest.raises(PrivacyViolation):
        check_reply(content)


def test_guard_stops_non_adapter_arrays():
    with pytest.raises(PrivacyViolation):
        check_reply(RecordDict({"arrays": ArrayRecord({"input_ids": torch.arange(5)})}))


def _histogram(values) -> RecordDict:
    return RecordDict({"stats": MetricRecord({"histogram": values, "total": 10})})


def test_guard_passes_a_histogram_of_the_agreed_length():
    check_reply(_histogram([0] * (HISTOGRAM_BINS - 1) + [10]))


@pytest.mark.parametrize(
    "values",
    [
        [1] * (HISTOGRAM_BINS - 1),  # too short
        [1] * (HISTOGRAM_BINS + 1),  # too long
        [1] * (HISTOGRAM_BINS - 1) + [-1],  # negative
        [0.5] * HISTOGRAM_BINS,  # per-sample scores would be floats
        [],
    ],
    ids=["short", "long", "negative", "floats", "empty"],
)
def test_guard_stops_a_histogram_that_is_not_counts_over_the_bins(values):
    with pytest.raises(PrivacyViolation):
        check_reply(_histogram(values))


def test_guard_allows_a_histogram_only_in_the_stats_record():
    record = MetricRecord({"histogram": [0] * HISTOGRAM_BINS, "num-examples": 3})
    with pytest.raises(PrivacyViolation):
        check_reply(RecordDict({"metrics": record}))
    assert "histogram" in HISTOGRAM_REPLY and "histogram" not in REPLY_COUNTS


def test_noisy_histogram_adds_laplace_noise_per_bin():
    rng = np.random.default_rng(0)
    counts = [5] * HISTOGRAM_BINS
    assert noisy_histogram(counts, 0.0, rng) == counts
    draws = np.array([noisy_histogram(counts, 0.5, rng) for _ in range(500)])
    assert draws.shape == (500, HISTOGRAM_BINS) and draws.min() >= 0
    assert abs(draws.mean() - 5) < 0.2 and draws.std() > 1
    check_reply(_histogram(noisy_histogram(counts, 0.5, rng)))


def test_every_reply_of_a_warm_up_and_mixture_run_is_counts_histogram_or_adapter(
    tmp_path, tiny_model_dir, demo_dir
):
    """tracin + mixture, in-process: train.warmup, query.score (histogram), query.select, train."""
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    audit = tmp_path / "audit.jsonl"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "tracin-cos",
            "quality.rule": "mixture",
            "quality.warmup-rounds": 1,
            "quality.dp-epsilon": 1.0,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    run_server(LocalGrid(build_client_app(cfg, [AuditLog(str(audit))]), 2), cfg, QuietStages())
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [e["message_type"] for e in entries]
    assert set(kinds) == {"train.warmup", "query.score", "query.select", "train"}
    assert kinds.count("train.warmup") == kinds.count("query.score") == 2
    adapter = load(ModelConfig(name=str(tiny_model_dir))).initial_adapter
    texts = [s.prompt for s in load_samples(demo_dir / "clients" / "client-0.jsonl")]
    allowed = {
        "query.score": set(HISTOGRAM_REPLY),
        "query.select": set(REPLY_COUNTS),
        "train": set(TRAIN_METRICS),
        "train.warmup": set(TRAIN_METRICS),
    }
    for entry in entries:
        assert not entry["error"], entry
        for name, record in entry["records"].items():
            if record["kind"] == "ArrayRecord":
                assert name == "arrays" and entry["message_type"].startswith("train")
                shapes = {k: v["shape"] for k, v in record["entries"].items()}
                assert shapes == {k: list(v.shape) for k, v in adapter.items()}
                continue
            assert record["kind"] == "MetricRecord", record
            assert set(record["entries"]) <= allowed[entry["message_type"]], entry
            for key, value in record["entries"].items():
                if key == "histogram":  # the audit log writes lists as their repr
                    counts = json.loads(value)
                    assert len(counts) == HISTOGRAM_BINS
                    assert all(isinstance(c, int) and c >= 0 for c in counts)
                else:
                    assert isinstance(value, int | float), (key, value)
        assert "score-seconds" not in json.dumps(entry)  # under DP: no timings
        assert not any(t[:30] in json.dumps(entry) for t in texts)
