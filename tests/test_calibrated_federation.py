"""An anchor-calibrated ensemble and the conformal rule through the real ServerApp/ClientApp."""

from __future__ import annotations

import json

import numpy as np
import pytest
from local_grid import LocalGrid, QuietStages

from fedqc.config import Config, ModelConfig
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.federation.client_app import build_client_app
from fedqc.federation.server_app import run_server
from fedqc.models.loading import load
from fedqc.scoring.scorers import get_scorer, score_samples
from fedqc.scoring.shots import anchor_prefixes, demonstrations


@pytest.mark.parametrize("name", ["ensemble:ppl+ifd", "ensemble-min:cond-prob+ifd+end-loss"])
def test_ensemble_is_calibrated_on_the_server_and_used_unchanged_by_clients(
    tmp_path, tiny_model_dir, demo_dir, name
):
    run_dir = tmp_path / "run"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 512,  # no anchor is cut: each has an end-loss
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": name,
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
    assert len(calibration) == 2 * len(name.split("+")) and all(np.isfinite(calibration))
    # 4 anchors, α = 0.2: τ is the ⌊0.2·5⌋ = 1st smallest calibrated anchor score
    assert threshold["tau"] == min(threshold["anchor_scores"])
    assert "exchangeable with the 4 anchors" in threshold["guarantee"]  # the rule's promise

    # scored 2-shot (the default): the first 2 anchors in context, each anchor not with itself
    assert threshold["shots"] == 2
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=512))
    scorer = get_scorer(name, calibration)
    anchor_samples = load_samples(demo_dir / "anchors.jsonl")
    encoded = encode_all(loaded.tokenizer, anchor_samples, 512)
    prefixes = anchor_prefixes(encoded, 2)
    anchors = score_samples(loaded, anchor_samples, scorer, 512, prefixes=prefixes)
    np.testing.assert_allclose(anchors.raw, threshold["anchor_scores"], rtol=1e-6)
    samples = load_samples(demo_dir / "clients" / "client-0.jsonl")
    demos = [demonstrations(encoded, 2)] * len(samples)
    expected = score_samples(loaded, samples, scorer, 512, prefixes=demos)
    zero_shot = score_samples(loaded, samples, scorer, 512)
    assert not np.allclose(zero_shot.raw, expected.raw)
    local = [json.loads(x) for x in (run_dir / "clients" / "client-0" / "scores.jsonl").open()]
    np.testing.assert_allclose([r["score"] for r in local], expected.raw, rtol=1e-6)
    assert [r["keep"] for r in local] == list(expected.oriented >= threshold["tau"])


def test_mixture_rule_runs_in_two_messages_and_the_server_sees_only_histograms(
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
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "mixture",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(run_dir),
        }
    )
    replies = []

    def capture(msg, context, call_next):
        reply = call_next(msg, context)
        replies.append((msg.metadata.message_type, reply))
        return reply

    grid = LocalGrid(build_client_app(cfg, [capture]), 2)
    run_server(grid, cfg, QuietStages())

    assert [k for _, k, _ in grid.delivered][:4] == ["query.score"] * 2 + ["query.select"] * 2
    threshold = json.loads((run_dir / "threshold.json").read_text())
    kinds = ("query.score", "query.select")
    hist = {kind: [dict(r.content["stats"]) for k, r in replies if k == kind] for kind in kinds}
    summed = np.sum([h["histogram"] for h in hist["query.score"]], axis=0)
    assert summed.tolist() == threshold["histogram"] and summed.sum() == 24
    assert all(set(h) >= {"total", "partition-id"} and "kept" not in h for h in hist["query.score"])
    assert all("histogram" not in h and "kept" in h for h in hist["query.select"])
    # τ is the mixture's, in perplexity units; clients applied it to the scores they kept
    assert threshold["tau"] == threshold["mixture"]["tau"]
    assert threshold["tau_raw"] == -threshold["tau"]
    local = [json.loads(x) for x in (run_dir / "clients" / "client-0" / "scores.jsonl").open()]
    assert [r["keep"] for r in local] == [r["score"] <= threshold["tau_raw"] for r in local]
