"""The whole pipeline through Flower's simulation runtime: 2 clients, 2 rounds, tiny model."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedqc.config import Config
from fedqc.federation.simulation import run_simulation
from fedqc.pipeline import new_run_dir, prepare, summarize


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, demo_dir):
    run_dir = new_run_dir(str(tmp_path_factory.mktemp("run") / "r"), force=False)
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 128,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "quality.scorer": "ifd",
            "quality.rule": "anchor-mean",
            "train.rounds": 2,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "federation.fraction-evaluate": 1.0,
        }
    )
    cfg = prepare(cfg, run_dir)
    run_simulation(cfg, cfg.data.num_clients)
    return cfg, run_dir


def test_simulation_writes_every_output(finished_run, tiny_model_dir):
    cfg, run_dir = finished_run
    for name in ("config.toml", "threshold.json", "selection.json", "metrics.json", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["scorer"] == "ifd" and len(threshold["anchor_scores"]) == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["eval_loss"] > 0 for m in metrics)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert any("lora_A" in n for n, _ in adapter.named_parameters())


def test_summary_joins_selection_with_flags(finished_run):
    cfg, run_dir = finished_run
    summary = summarize(cfg)
    assert [c["client"] for c in summary["clients"]] == [0, 1]
    assert sum(c["total"] for c in summary["clients"]) == 24
    assert 0.0 <= summary["selection"]["f1"] <= 1.0
    local = (run_dir / "clients" / "client-0" / "scores.jsonl").read_text().splitlines()
    assert len(local) == 12
