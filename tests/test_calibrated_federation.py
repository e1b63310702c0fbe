"""An anchor-calibrated ensemble and the conformal rule through the real ServerApp/ClientApp."""

from __future__ import annotations

import json

import numpy as np
from local_grid import LocalGrid, QuietStages

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_samples
from fedqc.federation.client_app import build_client_app
from fedqc.federation.server_app import run_server
from fedqc.models.loading import load
from fedqc.scoring.scorers import get_scorer, score_samples


def test_ensemble_is_calibrated_on_the_server_and_used_unchanged_by_clients(
    tmp_path, tiny_model_dir, demo_dir
):
    run_dir = tmp_path / "run"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "ensemble:ppl+ifd",
            "quality.rule": "anchor-conformal:0.2",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(run_dir),
        }
    )
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())

    threshold = json.loads((run_dir / "threshold.json").read_text())
    calibration = threshold["calibration"]
    assert len(calibration) == 4 and all(np.isfinite(calibration))
    # 4 anchors, α = 0.2: τ is the ⌊0.2·5⌋ = 1st smallest calibrated anchor score
    assert threshold["tau"] == min(threshold["anchor_scores"])

    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=64))
    scorer = get_scorer("ensemble:ppl+ifd", calibration)
    anchors = score_samples(loaded, load_samples(demo_dir / "anchors.jsonl"), scorer, 64)
    np.testing.assert_allclose(anchors.raw, threshold["anchor_scores"], rtol=1e-6)
    samples = load_samples(demo_dir / "clients" / "client-0.jsonl")
    expected = score_samples(loaded, samples, scorer, 64)
    local = [json.loads(x) for x in (run_dir / "clients" / "client-0" / "scores.jsonl").open()]
    np.testing.assert_allclose([r["score"] for r in local], expected.raw, rtol=1e-6)
    assert [r["keep"] for r in local] == list(expected.oriented >= threshold["tau"])
