"""The whole pipeline through Flower's simulation runtime: 2 clients, 2 rounds, tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedqc.config import Config, ModelConfig
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.federation.simulation import run_simulation
from fedqc.models.loading import load
from fedqc.pipeline import new_run_dir, prepare, summarize
from fedqc.train.local import evaluate


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
    # the eval losses are those of the untrained model (round 0) and of the saved adapter (the
    # last round), recomputed here on the held-out set
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=128))
    pad = loaded.tokenizer.pad_token_id
    held_out = encode_all(loaded.tokenizer, load_samples(cfg.data.eval), 128)
    assert metrics[0]["eval_loss"] == pytest.approx(
        evaluate(loaded.model, held_out, pad)["eval_loss"], rel=1e-5
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert any("lora_A" in n for n, _ in adapter.named_parameters())
    final = evaluate(adapter, held_out, pad)["eval_loss"]
    assert metrics[-1]["eval_loss"] == pytest.approx(final, rel=1e-5)
    assert abs(final - metrics[0]["eval_loss"]) > 1e-4 * final  # training moved it


def test_summary_joins_selection_with_flags(finished_run):
    cfg, run_dir = finished_run
    summary = summarize(cfg)
    assert [c["client"] for c in summary["clients"]] == [0, 1]
    assert sum(c["total"] for c in summary["clients"]) == 24
    local = (run_dir / "clients" / "client-0" / "scores.jsonl").read_text().splitlines()
    assert len(local) == 12


def _rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """The selection's figures from its confusion counts (clean = positive), written out here."""
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        "kept_fraction": (tp + fp) / (tp + fp + fn + tn),
    }


def test_summary_f1_is_the_clients_decisions_against_the_truth(finished_run, demo_dir):
    """Every client's keep decisions are recomputed from its scores and anchor-mean's τ, checked
    against the ground-truth flags by hand, and the summary's figures must equal them."""
    cfg, run_dir = finished_run
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["direction"] == "lower is better"  # ifd: keep score <= τ
    tau = float(np.mean(threshold["anchor_scores"]))  # anchor-mean, in ifd's own units
    assert threshold["tau_raw"] == pytest.approx(tau, rel=1e-12)
    summary = summarize(cfg)
    totals = np.zeros(4, dtype=int)
    for row in summary["clients"]:
        pid = row["client"]
        scores = [
            json.loads(x) for x in (run_dir / "clients" / f"client-{pid}" / "scores.jsonl").open()
        ]
        keep = {r["id"]: r["score"] is not None and r["score"] <= tau for r in scores}
        assert keep == {r["id"]: r["keep"] for r in scores}  # the client decided by τ
        truth = [json.loads(x) for x in (demo_dir / "truth" / f"client-{pid}.jsonl").open()]
        clean = {t["id"]: not t["corrupted"] for t in truth}
        counts = np.array(
            [
                sum(keep[i] and clean[i] for i in clean),
                sum(keep[i] and not clean[i] for i in clean),
                sum(not keep[i] and clean[i] for i in clean),
                sum(not keep[i] and not clean[i] for i in clean),
            ]
        )
        totals += counts
        assert row["kept"] == counts[0] + counts[1] and row["total"] == counts.sum()
        for key, value in _rates(*counts).items():
            assert row[key] == pytest.approx(value, abs=1e-12), (pid, key)
    tp, fp, fn, tn = totals
    assert tp > 0 and fp > 0 and fn + tn > 0  # not a degenerate draw: every figure is informative
    for key, value in _rates(*totals).items():
        assert summary["selection"][key] == pytest.approx(value, abs=1e-12), key
