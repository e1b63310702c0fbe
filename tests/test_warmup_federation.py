"""Checkpoint scorers through the real ServerApp/ClientApp (in-process grid, tiny model):
federated warm-up rounds, the checkpoints and anchor info in the query round, the fingerprint
check on the client, the mixture rule's two messages, and resuming a clues run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from local_grid import LocalGrid, QuietStages

from fedqc.config import Config
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.checkpoint import load_checkpoint
from fedqc.federation.client_app import build_client_app, handle_score
from fedqc.federation.privacy import AuditLog
from fedqc.federation.protocol import (
    ANCHOR_INFO_RECORD,
    HISTOGRAM_BINS,
    QUERY_SCORE,
    TRAIN_WARMUP,
)
from fedqc.federation.server_app import run_server
from fedqc.models.loading import load
from fedqc.pipeline import prepare_resume
from fedqc.scoring.checkpointed import score_with_checkpoints
from fedqc.scoring.warmup import WARMUP_FILE, anchor_side, load_warmup, settings_for


def _config(tiny_model_dir, demo_dir, run_dir, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "data.num-clients": 2,
            "quality.warmup-rounds": 2,
            "quality.rule": "anchor-mean",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "train.lr-schedule": "cosine",
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
            **extra,
        }
    )


TWO_WARMUP_ROUNDS_THEN_ONE = [("warmup", 1), ("warmup", 2), (None, 0), (None, 1)]


def _phases(rows: list[dict]) -> list[tuple[str | None, int]]:
    """(phase, round) of each metrics row: "warmup" for warm-up rounds, None for phase 2."""
    return [(r.get("phase"), r["round"]) for r in rows]


class Capture:
    """A client mod that keeps every message a node receives, with the node's context."""

    def __init__(self) -> None:
        self.seen: list[tuple[Message, object]] = []

    def __call__(self, msg, context, call_next):
        self.seen.append((msg, context))
        return call_next(msg, context)


@pytest.fixture(scope="module")
def tracin_run(tmp_path_factory, tiny_model_dir, demo_dir):
    """tracin with the mixture rule: warm-up, histograms, τ, selection, one training round."""
    root = tmp_path_factory.mktemp("tracin")
    cfg = _config(
        tiny_model_dir,
        demo_dir,
        root / "run",
        **{"quality.scorer": "tracin", "quality.rule": "mixture"},
    )
    capture, audit = Capture(), root / "audit.jsonl"
    grid = LocalGrid(build_client_app(cfg, [AuditLog(str(audit)), capture]), 2)
    run_server(grid, cfg, QuietStages())
    return cfg, grid, root / "run", capture, audit


def test_warm_up_rounds_are_federated_recorded_and_labelled(tracin_run):
    cfg, grid, run_dir, _, _ = tracin_run
    kinds = [(p, kind, r) for p, kind, r in grid.delivered]
    for pid in (0, 1):
        assert [r for p, k, r in kinds if p == pid and k == TRAIN_WARMUP] == [1, 2]
    assert [k for _, k, _ in kinds].index("query.score") > [k for _, k, _ in kinds].index(
        TRAIN_WARMUP
    )
    warm = json.loads((run_dir / WARMUP_FILE).read_text())
    lrs = [c["lr"] for c in warm["checkpoints"]]
    assert lrs == pytest.approx([0.01, 0.001])  # the cosine round_lr over the 2 warm-up rounds
    for c in warm["checkpoints"]:
        assert (run_dir / c["adapter"] / "adapter_model.safetensors").is_file()
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert _phases(rows) == TWO_WARMUP_ROUNDS_THEN_ONE
    assert all(r["eval_loss"] > 0 and len(r["train_answered"]) == 2 for r in rows[:2])
    checkpoints = load_warmup(run_dir)
    assert not torch.equal(*(c.adapter[next(iter(c.adapter))] for c in checkpoints))
    moments = run_dir / "clients" / "client-0" / "warmup"
    assert sorted(p.name for p in moments.iterdir()) == [
        "moments-round-1.npz",
        "moments-round-2.npz",
    ]


def test_anchors_and_clients_are_scored_at_the_same_checkpoints(tracin_run, demo_dir):
    cfg, _, run_dir, capture, _ = tracin_run
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["scorer"] == "tracin" and threshold["warmup_rounds"] == 2
    # what the server recorded is what a fresh process recomputes from the saved checkpoints
    loaded = load(cfg.model)
    checkpoints = load_warmup(run_dir)
    anchors = load_samples(demo_dir / "anchors.jsonl")
    info, anchor_scores = anchor_side(cfg, loaded, anchors, checkpoints, with_scores=True)
    assert info.fingerprint == threshold["fingerprint"]
    np.testing.assert_allclose(anchor_scores.raw, threshold["anchor_scores"], rtol=1e-5)
    # every client got those checkpoints and that fingerprint in its query message
    queries = [m for m, _ in capture.seen if m.metadata.message_type == QUERY_SCORE]
    assert len(queries) == 2
    for msg in queries:
        assert msg.content["config"]["fingerprint"] == threshold["fingerprint"]
        for k, ckpt in enumerate(checkpoints, 1):
            sent = msg.content[f"checkpoint-{k}"].to_torch_state_dict()
            assert all(torch.equal(sent[n], t) for n, t in ckpt.adapter.items())
    # and client 0's local scores are the scores at those checkpoints
    samples = load_samples(demo_dir / "clients" / "client-0.jsonl")
    want = score_with_checkpoints(loaded, samples, checkpoints, info, settings_for(cfg, loaded))
    local = [json.loads(x) for x in (run_dir / "clients" / "client-0" / "scores.jsonl").open()]
    np.testing.assert_allclose([r["score"] for r in local], want.raw, rtol=1e-5, atol=1e-9)
    assert [r["keep"] for r in local] == list(want.oriented >= threshold["tau"])


def _resend(msg: Message, **changes) -> Message:
    records = {name: record for name, record in msg.content.items()}
    records |= changes
    return Message(
        RecordDict(records), dst_node_id=msg.metadata.dst_node_id, message_type=QUERY_SCORE
    )


def test_a_client_given_other_checkpoints_or_settings_refuses_to_score(tracin_run):
    cfg, _, _, capture, _ = tracin_run
    msg, context = next((m, c) for m, c in capture.seen if m.metadata.message_type == QUERY_SCORE)
    tampered = msg.content["checkpoint-1"].to_torch_state_dict()
    name = next(iter(tampered))
    tampered[name] = tampered[name] + 1e-4
    config = dict(msg.content["config"])
    for changed in (
        {"checkpoint-1": ArrayRecord(tampered)},
        {"config": ConfigRecord(config | {"checkpoint-lrs": [0.01, 0.002]})},
        {"config": ConfigRecord(config | {"max-length": 48})},
    ):
        with pytest.raises(FedqcError, match="scoring fingerprint mismatch"):
            handle_score(_resend(msg, **changed), context, cfg)
    with pytest.raises(FedqcError, match="scoring fingerprint mismatch"):
        handle_score(_resend(msg, config=ConfigRecord(config | {"scorer": "clues"})), context, cfg)
    assert ANCHOR_INFO_RECORD in msg.content


def test_mixture_fits_tau_from_histograms_and_a_second_message_applies_it(tracin_run):
    cfg, grid, run_dir, _, audit = tracin_run
    kinds = [k for _, k, _ in grid.delivered]
    assert kinds.count("query.score") == 2 and kinds.count("query.select") == 2
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert len(threshold["edges"]) == HISTOGRAM_BINS + 1
    assert sum(threshold["histogram"]) == 24 and threshold["clients_in_histogram"] == 2
    assert threshold["mixture"]["tau"] == threshold["tau"]
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["tau"] == threshold["tau"] and selection["rule"] == "mixture"
    assert sum(c["total"] for c in selection["clients"]) == 24
    for pid in (0, 1):
        local = [
            json.loads(x) for x in (run_dir / "clients" / f"client-{pid}" / "scores.jsonl").open()
        ]
        kept = sum(r["keep"] for r in local)
        assert kept == selection["clients"][pid]["kept"]
        assert all(r["keep"] == (r["score"] >= threshold["tau"]) for r in local)


def test_icl_run_completes_and_selects(tmp_path, tiny_model_dir, demo_dir):
    extra = {"quality.scorer": "icl", "quality.rule": "anchor-mean", "quality.warmup-rounds": 1}
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    capture = Capture()
    run_server(LocalGrid(build_client_app(cfg, [capture]), 2), cfg, QuietStages())
    threshold = json.loads((tmp_path / "run" / "threshold.json").read_text())
    assert threshold["scorer"] == "icl" and len(threshold["checkpoint_lrs"]) == 1
    assert np.isfinite(threshold["anchor_scores"]).all()
    assert threshold["tau"] == pytest.approx(np.mean(threshold["anchor_scores"]))
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [c["total"] for c in selection["clients"]] == [12, 12]
    for pid in (0, 1):
        local = [
            json.loads(x)
            for x in (tmp_path / "run" / "clients" / f"client-{pid}" / "scores.jsonl").open()
        ]
        assert all(r["keep"] == (r["score"] >= threshold["tau"]) for r in local)
        assert sum(r["keep"] for r in local) == selection["clients"][pid]["kept"]
    query = next(m for m, _ in capture.seen if m.metadata.message_type == QUERY_SCORE)
    demos = [k for k in query.content[ANCHOR_INFO_RECORD] if k.startswith("demo.")]
    assert len(demos) == 4  # icl: the anchors' tokens are the prompt, so they travel


def test_a_clues_run_resumes_with_the_moments_saved_on_the_nodes(
    tmp_path, tiny_model_dir, demo_dir
):
    extra = {
        "quality.scorer": "clues",
        "quality.rule": "drop-fraction:0.25",
        "train.rounds": 2,
        "federation.min-nodes": 2,
    }
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    grid = LocalGrid(build_client_app(cfg), 2, dies={1: ("train", 2)})
    with pytest.raises(FedqcError, match="round 2: only 1 of 2 nodes answered"):
        run_server(grid, cfg, QuietStages())
    first = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert load_checkpoint(tmp_path / "run")[0]["round"] == 1

    again = LocalGrid(build_client_app(cfg), 2)  # restarted nodes: empty context.state
    run_server(again, cfg.replace(**{"output.resume": True}), QuietStages())
    assert {k for _, k, _ in again.delivered} == {"query.score", "train"}  # no new warm-up
    second = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [(c["total"], c["kept"]) for c in second["clients"]] == [
        (c["total"], c["kept"]) for c in first["clients"]
    ]
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert _phases(rows) == [*TWO_WARMUP_ROUNDS_THEN_ONE, (None, 2)]
    # the server's side of clues: the anchors preconditioned by its own warm-up Adam steps
    loaded = load(cfg.model)
    anchors = load_samples(demo_dir / "anchors.jsonl")
    checkpoints = load_warmup(tmp_path / "run")
    _, scores = anchor_side(cfg, loaded, anchors, checkpoints, with_scores=True)
    assert np.isfinite(scores.raw).all() and len(scores.raw) == 4


def test_cli_score_and_threshold_use_a_runs_warm_up(tracin_run, demo_dir, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from fedqc.cli import app

    _, _, run_dir, _, _ = tracin_run
    anchors, data = demo_dir / "anchors.jsonl", demo_dir / "clients" / "client-0.jsonl"
    common = ["--model", str(tiny_model_dir), "--max-length", "64"]
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    missing = invoke("threshold", anchors, "--scorer", "tracin", *common)
    assert isinstance(missing.exception, FedqcError) and "--warmup RUN_DIR" in str(
        missing.exception
    )
    args = ("threshold", anchors, "--scorer", "tracin", "--rule", "anchor-mean")
    result = invoke(*args, "--warmup", run_dir, *common)
    assert result.exit_code == 0, result.output
    threshold = json.loads((run_dir / "threshold.json").read_text())
    tau = float(result.stdout.strip().splitlines()[-1])
    assert tau == pytest.approx(np.mean(threshold["anchor_scores"]), rel=1e-5)

    out = tmp_path / "scores.jsonl"
    args = ("score", data, "--scorer", "tracin", "--warmup", run_dir, "--out", out, *common)
    assert "--anchors" in str(invoke(*args).exception)
    result = invoke(*args, "--anchors", anchors)
    assert result.exit_code == 0, result.output
    got = [json.loads(x)["score"] for x in out.open()]
    local = [json.loads(x) for x in (run_dir / "clients" / "client-0" / "scores.jsonl").open()]
    np.testing.assert_allclose(got, [r["score"] for r in local], rtol=1e-5)
    clues = ("score", data, "--scorer", "clues", "--warmup", run_dir, "--anchors", anchors)
    assert "--moments NODE_DIR" in str(invoke(*clues, "--out", tmp_path / "c.jsonl").exception)


def test_a_run_stopped_in_its_warm_up_resumes_from_the_last_warm_up_round(
    tracin_run, tmp_path, tiny_model_dir, demo_dir
):
    extra = {"quality.scorer": "tracin", "quality.rule": "mixture", "federation.min-nodes": 2}
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    run_dir = tmp_path / "run"
    grid = LocalGrid(build_client_app(cfg), 2, dies={1: (TRAIN_WARMUP, 2)})
    with pytest.raises(FedqcError, match="round 2: only 1 of 2 nodes answered"):
        run_server(grid, cfg, QuietStages())
    saved = json.loads((run_dir / WARMUP_FILE).read_text())
    assert [c["round"] for c in saved["checkpoints"]] == [1] and saved["planned"] == 2
    with pytest.raises(FedqcError, match="stopped after 1 of 2 rounds"):
        load_warmup(run_dir)  # fedqc score --warmup refuses a warm-up that did not finish

    (run_dir / "config.toml").write_text(cfg.to_toml())
    resumed = prepare_resume(run_dir)  # fedqc run --resume: no phase-2 checkpoint is needed
    again = LocalGrid(build_client_app(resumed), 2)  # restarted nodes
    run_server(again, resumed, QuietStages())
    warmup_messages = [(pid, r) for pid, kind, r in again.delivered if kind == TRAIN_WARMUP]
    assert warmup_messages == [(0, 1), (1, 1)]  # one round left: both nodes, once
    # the resumed warm-up ends where the uninterrupted one did, bit for bit
    expected, got = load_warmup(tracin_run[2]), load_warmup(run_dir)
    assert [c.lr for c in got] == [c.lr for c in expected]
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert _phases(rows) == TWO_WARMUP_ROUNDS_THEN_ONE


def test_a_run_stopped_before_its_first_training_checkpoint_keeps_its_warm_up(
    tmp_path, tiny_model_dir, demo_dir
):
    extra = {"quality.scorer": "tracin-cos", "federation.min-nodes": 2}
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    grid = LocalGrid(build_client_app(cfg), 2, dies={0: ("train", 1)})
    with pytest.raises(FedqcError, match="round 1: only 1 of 2 nodes answered"):
        run_server(grid, cfg, QuietStages())
    (tmp_path / "run" / "config.toml").write_text(cfg.to_toml())
    again = LocalGrid(build_client_app(cfg), 2)
    run_server(again, prepare_resume(tmp_path / "run"), QuietStages())
    assert {k for _, k, _ in again.delivered} == {"query.score", "train"}  # no new warm-up
    assert load_checkpoint(tmp_path / "run")[0]["round"] == 1
