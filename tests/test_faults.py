"""Faults, in-process (no Ray): nodes that fail or die, a client with nothing kept, too few nodes,
a τ that drops everything, and resuming after a stop.

The federation has four clients, built from the demo so that a fixed τ keeps every sample of
clients 0 and 3 and none of client 1; client 2's data file is broken.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from local_grid import LocalGrid, QuietStages
from safetensors.numpy import load_file

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_records
from fedqc.errors import FedqcError
from fedqc.federation.checkpoint import load_checkpoint
from fedqc.federation.client_app import build_client_app
from fedqc.federation.privacy import AuditLog
from fedqc.federation.server_app import run_server
from fedqc.models.loading import load
from fedqc.pipeline import summarize, summary_notes
from fedqc.scoring.scorers import get_scorer, score_samples

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir, demo_dir) -> tuple[Path, float]:
    """(folder, τ in perplexity): clients 0 and 3 lie below τ, client 1 above, client 2 broken."""
    out = tmp_path_factory.mktemp("faults")
    records = [r for c in (0, 1) for r in load_records(demo_dir / "clients" / f"client-{c}.jsonl")]
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))
    ppl = score_samples(loaded, [s for s, _ in records], get_scorer("ppl"), MAX_LENGTH).raw
    order = np.argsort(ppl)  # best (lowest perplexity) first
    assert ppl[order[16]] - ppl[order[15]] > 1e-3 * ppl[order[15]], "no gap to put τ in"
    tau = float((ppl[order[15]] + ppl[order[16]]) / 2)
    (out / "clients").mkdir()
    for client, ranks in ((0, order[:8]), (3, order[8:16]), (1, order[16:])):
        rows = [json.dumps(records[i][1]) for i in ranks]
        (out / "clients" / f"client-{client}.jsonl").write_text("\n".join(rows) + "\n")
    (out / "clients" / "client-2.jsonl").write_text('{"question": "What is 2+2?", "answer": \n')
    return out, tau


@pytest.fixture(scope="module")
def base(federation, tiny_model_dir, demo_dir):
    """A config maker for this federation: 3 rounds, one local step, tiny model."""
    folder, tau = federation

    def make(run_dir: Path, **extra) -> Config:
        return Config.from_flat(
            {
                "model.name": str(tiny_model_dir),
                "model.max-length": MAX_LENGTH,
                "data.federation": "",
                "data.clients-dir": str(folder / "clients"),
                "data.eval": str(demo_dir / "eval.jsonl"),
                "data.num-clients": 4,
                "quality.scorer": "ppl",
                "quality.rule": f"fixed:{tau!r}",
                "train.rounds": 3,
                "train.local-steps": 1,
                "train.batch-size": 2,
                "federation.join-timeout": 5.0,
                "output.run-dir": str(run_dir),
                **extra,
            }
        )

    return make


@pytest.fixture(scope="module")
def faulty_run(base, tmp_path_factory):
    """Client 2 fails the quality round, client 3 dies in round 2, client 1 keeps nothing."""
    run_dir = tmp_path_factory.mktemp("faulty") / "run"
    cfg = base(run_dir)
    audit = run_dir.parent / "audit.jsonl"
    grid = LocalGrid(build_client_app(cfg, [AuditLog(str(audit))]), 4, dies={3: ("train", 2)})
    run_server(grid, cfg, QuietStages())
    return cfg, grid, run_dir, audit


def test_a_node_failing_the_quality_round_drops_out(faulty_run):
    cfg, grid, run_dir, audit = faulty_run
    selection = json.loads((run_dir / "selection.json").read_text())
    assert [c["partition-id"] for c in selection["clients"]] == [0, 1, 3]
    assert selection["dropped"] == [
        {"node": grid.node_of[2], "reason": "FedqcError on the node (details in the node's log)"}
    ]
    # the broken node's error reply carries no data, not even its file's name
    failed = [json.loads(line) for line in audit.read_text().splitlines()]
    failed = [e for e in failed if e["error"]]
    assert len(failed) == 1
    assert "client-2" not in json.dumps(failed) and "2+2" not in json.dumps(failed)
    assert not any(p == 2 for p, kind, _ in grid.delivered if kind != "query.score")


def test_a_client_with_nothing_kept_sits_out_and_is_reported(faulty_run):
    cfg, grid, run_dir, _ = faulty_run
    selection = {
        c["partition-id"]: c
        for c in json.loads((run_dir / "selection.json").read_text())["clients"]
    }
    assert selection[1]["kept"] == 0 and selection[1]["sat-out"]
    assert selection[0]["kept"] == 8 and selection[3]["kept"] == 8
    assert [kind for p, kind, _ in grid.delivered if p == 1] == ["query.score"]
    summary = summarize(cfg)
    row = next(c for c in summary["clients"] if c["client"] == 1)
    assert row["sat_out"] and row["kept"] == 0
    assert "client 1 kept no samples and sat out training" in summary_notes(summary)


def test_a_node_dying_in_a_round_does_not_stop_the_run(faulty_run):
    cfg, grid, run_dir, _ = faulty_run
    n0, n3 = grid.node_of[0], grid.node_of[3]
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert (rows[1]["train_sampled"], rows[1]["train_answered"]) == (sorted([n0, n3]),) * 2
    assert rows[2]["train_sampled"] == sorted([n0, n3])
    assert (rows[2]["train_answered"], rows[2]["train_dropped"]) == ([n0], [n3])
    assert (rows[3]["train_sampled"], rows[3]["train_dropped"]) == ([n0], [])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    dropouts = summarize(cfg)["dropouts"]
    assert [(d["phase"], d["round"], d["client"]) for d in dropouts] == [
        ("query.score", 0, -1),
        ("train", 2, 3),
    ]
    assert "Node Unavailable" in dropouts[1]["reason"]


def test_too_few_answers_stop_the_run_and_a_resume_finishes_it(base, tmp_path):
    run_dir = tmp_path / "run"
    cfg = base(run_dir, **{"federation.min-nodes": 2})
    grid = LocalGrid(build_client_app(cfg), 4, dies={3: ("train", 2)})
    with pytest.raises(FedqcError, match=r"round 2: only 1 of 2 nodes answered.*min-nodes"):
        run_server(grid, cfg, QuietStages())
    state, _ = load_checkpoint(run_dir)
    assert state["round"] == 1 and not (run_dir / "adapter").exists()

    # the node is back (restarted: new state); the run goes on from round 2
    again = LocalGrid(build_client_app(cfg), 4)
    run_server(again, cfg.replace(**{"output.resume": True}), QuietStages())
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(len(r["train_answered"]) == 2 for r in rows[1:])
    trained = sorted({r for p, kind, r in again.delivered if kind == "train"})
    assert trained == [1, 2]  # the strategy's rounds 1-2 are the run's rounds 2-3
    assert load_checkpoint(run_dir)[0]["round"] == 3


def test_a_new_run_does_not_overwrite_an_earlier_one(base, faulty_run):
    _, _, run_dir, _ = faulty_run
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(FedqcError, match="holds the outputs of an earlier run"):
        run_server(LocalGrid(build_client_app(base(run_dir)), 4), base(run_dir), QuietStages())
    assert (run_dir / "metrics.json").read_bytes() == before


def test_a_tau_that_drops_everything_stops_unless_allowed(base, tiny_model_dir, tmp_path):
    cfg = base(tmp_path / "a", **{"quality.rule": "fixed:1.0"})  # perplexity ≤ 1: impossible
    with pytest.raises(FedqcError, match="drops every sample in the federation.*--allow-empty"):
        run_server(LocalGrid(build_client_app(cfg), 4), cfg, QuietStages())

    cfg = base(tmp_path / "b", **{"quality.rule": "fixed:1.0", "quality.allow-empty": True})
    grid = LocalGrid(build_client_app(cfg), 4)
    run_server(grid, cfg, QuietStages())
    assert {kind for _, kind, _ in grid.delivered} == {"query.score"}
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0]
    initial = load(ModelConfig(name=str(tiny_model_dir))).initial_adapter
    final = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert len(final) == len(initial)
    for key, value in final.items():
        match = [k for k in initial if k.replace(".default", "") == key]
        assert match and np.array_equal(value, initial[match[0]].numpy()), key


def test_a_node_dying_in_the_quality_round_is_left_out(base, tmp_path):
    run_dir = tmp_path / "run"
    grid = LocalGrid(build_client_app(base(run_dir)), 4, dies={0: ("query.score", 0)})
    run_server(grid, base(run_dir), QuietStages())
    selection = json.loads((run_dir / "selection.json").read_text())
    assert [c["partition-id"] for c in selection["clients"]] == [1, 3]  # 2: broken file
    dropped = {d["node"]: d["reason"] for d in selection["dropped"]}
    assert set(dropped) == {grid.node_of[0], grid.node_of[2]}
    assert "Node Unavailable" in dropped[grid.node_of[0]]
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert all(r["train_answered"] == [grid.node_of[3]] for r in rows[1:])
