"""Privacy: what a client sends holds no text, token ids or per-sample scores."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_samples
from fedqc.federation.privacy import AuditLog, PrivacyViolation, check_reply
from fedqc.federation.protocol import EVALUATE_METRICS, REPLY_COUNTS, TRAIN_METRICS
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
