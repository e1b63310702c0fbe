"""quality.curriculum (FedDQC's easy→hard stages): the schedule, the clients' own picks, that
nothing new leaves a client, and an exact resume across a stage boundary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from local_grid import LocalGrid, QuietStages
from safetensors.numpy import load_file

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.federation.client_app import build_client_app
from fedqc.federation.privacy import AuditLog
from fedqc.federation.protocol import REPLY_COUNTS, TRAIN_METRICS
from fedqc.federation.server_app import run_server
from fedqc.quality.curriculum import (
    check_curriculum,
    is_stage_start,
    parse_curriculum,
    pick,
    stage_of,
)


def test_rounds_are_split_evenly_across_stages():
    assert [stage_of(r, 6, 3) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert [stage_of(r, 5, 3) for r in range(1, 6)] == [0, 0, 1, 1, 2]
    assert [stage_of(r, 3, 3) for r in range(1, 4)] == [0, 1, 2]
    assert [is_stage_start(r, 6, 3) for r in range(1, 7)] == [1, 0, 1, 0, 1, 0]
    assert parse_curriculum("off") is None
    assert parse_curriculum("stages:3") == (3, False)
    assert parse_curriculum("stages:3:once") == (3, True)


def test_each_stage_takes_the_best_share_of_what_is_left():
    scores = np.array([0.1, 0.9, np.nan, 0.5, 0.7, 0.3, 0.9])
    first = pick(scores, list(range(7)), 0, 3)
    assert first == [1, 6]  # floor(7 / 3) = 2 best; the tie at 0.9 by index
    rest = [i for i in range(7) if i not in first]
    second = pick(scores, rest, 1, 3)
    assert second == [3, 4]  # floor(5 / 2) = 2 best of what is left
    last = pick(scores, [0, 2, 5], 2, 3)
    assert last == [0, 2, 5]  # the last stage takes the rest, non-finite included


def test_a_curriculum_the_run_cannot_follow_is_refused_in_one_line():
    with pytest.raises(FedqcError, match=r"needs train.rounds ≥ 3"):
        check_curriculum("stages:3", 2, False)
    with pytest.raises(FedqcError, match="use stages:3:once"):
        check_curriculum("stages:3", 3, True)
    check_curriculum("stages:3:once", 3, True)
    for bad in ("stages:0", "stages", "stages:2:twice", "on"):
        with pytest.raises(FedqcError, match="'quality.curriculum' must be one of"):
            Config.from_flat({"quality.curriculum": bad})


def _config(tiny_model_dir, demo_dir, run_dir: Path, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "drop-fraction:0.0",
            "quality.curriculum": "stages:3",
            "train.rounds": 3,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
            **extra,
        }
    )


@pytest.mark.parametrize("curriculum", ["stages:3", "stages:3:once"])
def test_clients_train_best_first_in_stages_and_send_nothing_new(
    curriculum, tiny_model_dir, demo_dir, tmp_path
):
    run_dir, audit = tmp_path / "run", tmp_path / "audit.jsonl"
    cfg = _config(tiny_model_dir, demo_dir, run_dir, **{"quality.curriculum": curriculum})
    run_server(LocalGrid(build_client_app(cfg, [AuditLog(str(audit))]), 2), cfg, QuietStages())
    selection = json.loads((run_dir / "selection.json").read_text())
    kept = {c["partition-id"]: c["kept"] for c in selection["clients"]}
    for pid in (0, 1):
        folder = run_dir / "clients" / f"client-{pid}"
        picks = json.loads((folder / "curriculum.json").read_text())
        stages = [picks[str(s)] for s in range(3)]
        flat = [i for s in stages for i in s]
        assert sorted(flat) == list(range(kept[pid]))  # every kept sample once
        n = kept[pid]
        assert [len(s) for s in stages] == [
            n // 3,
            (n - n // 3) // 2,
            n - n // 3 - (n - n // 3) // 2,
        ]
        # the first stage is the best third by the quality round's scores (the re-scoring at
        # round 1 uses the initial adapter, and the same scorer settings)
        rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
        kept_scores = [-r["score"] for r in rows if r["keep"]]  # ppl: lower is better
        best = sorted(range(n), key=lambda i: (-kept_scores[i], i))[: n // 3]
        assert stages[0] == sorted(best)
        journal = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
        trained = [e["kept"] for e in journal if e["event"] == "start"]
        assert trained == [len(s) for s in stages]
    allowed = set(REPLY_COUNTS) | set(TRAIN_METRICS)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted({e["message_type"] for e in entries}) == ["query.score", "train"]
    for entry in entries:
        for name, record in entry["records"].items():
            assert (
                record["kind"] == "ArrayRecord"
                and name == "arrays"
                or (record["kind"] == "MetricRecord" and set(record["entries"]) <= allowed)
            ), entry
            if entry["message_type"] == "train" and record["kind"] == "MetricRecord":
                # the weight is the kept count reported in the quality round, not the stage's size
                assert record["entries"]["num-examples"] in kept.values()


def test_a_curriculum_run_resumes_across_a_stage_boundary_to_the_same_adapter(
    tiny_model_dir, demo_dir, tmp_path
):
    extra = {"federation.min-nodes": 2}
    straight = _config(tiny_model_dir, demo_dir, tmp_path / "straight", **extra)
    run_server(LocalGrid(build_client_app(straight), 2), straight, QuietStages())
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "stopped", **extra)
    dying = LocalGrid(build_client_app(cfg), 2, dies={1: ("train", 2)})
    with pytest.raises(FedqcError, match="round 2: only 1 of 2 nodes answered"):
        run_server(dying, cfg, QuietStages())
    resumed = cfg.replace(**{"output.resume": True})
    run_server(LocalGrid(build_client_app(resumed), 2), resumed, QuietStages())
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_a_checkpoint_scorer_run_follows_the_upfront_ranking(tiny_model_dir, demo_dir, tmp_path):
    """stages:K:once with tracin: the ranking comes from the scores at the warm-up checkpoints."""
    run_dir = tmp_path / "run"
    cfg = _config(
        tiny_model_dir,
        demo_dir,
        run_dir,
        **{
            "quality.scorer": "tracin",
            "quality.warmup-rounds": 1,
            "quality.curriculum": "stages:2:once",
            "train.rounds": 2,
            "train.local-steps": 1,
        },
    )
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
    folder = run_dir / "clients" / "client-0"
    picks = json.loads((folder / "curriculum.json").read_text())
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    scores = [r["score"] for r in rows if r["keep"]]  # tracin: higher is better
    n = len(scores)
    assert sorted(picks["0"] + picks["1"]) == list(range(n))
    assert picks["0"] == sorted(sorted(range(n), key=lambda i: (-scores[i], i))[: n // 2])
