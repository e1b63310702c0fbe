"""Determinism and resume, through Flower's simulation runtime (Ray) on CPU.

Four runs of the same small demo federation with the same seed:
- A and B, in this process, one after the other: same demo data, scores, decisions, adapter;
- I, `fedqc run` in its own process group, killed (SIGKILL, with its Ray workers) as soon as
  round 1 is checkpointed; then R, `fedqc run --resume` on I's directory, which must end with the
  very adapter A ended with, the cosine learning-rate schedule continuing where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedqc.federation.simulation import run_simulation
from fedqc.pipeline import open_run, summarize

FEDQC = Path(sys.executable).with_name("fedqc")
ROUNDS = 3


def _settings(tiny_model_dir: Path) -> list[str]:
    return [
        f"model.name={tiny_model_dir}",
        "model.max-length=64",
        "data.num-clients=2",
        "data.samples-per-client=10",
        "data.num-anchors=4",
        "data.num-eval=4",
        "data.contamination=0.3,0.5",
        "quality.scorer=ppl",
        "quality.rule=anchor-quantile:0.3",
        f"train.rounds={ROUNDS}",
        "train.local-steps=2",
        "train.batch-size=2",
        "train.lr=0.01",
        "train.lr-schedule=cosine",
        "train.seed=3",
    ]


def _fedqc(*args, new_session: bool = False) -> subprocess.Popen:
    command = (
        [str(FEDQC)]
        if FEDQC.exists()
        else [sys.executable, "-c", "from fedqc.cli import main; main()"]
    )
    return subprocess.Popen(
        [*command, *map(str, args)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=new_session,
    )


def _in_process(run_dir: Path, settings: list[str]) -> Path:
    """What `fedqc run` does, in this process."""
    cfg, run_dir = open_run(None, settings, str(run_dir))
    run_simulation(cfg, cfg.data.num_clients)
    summarize(cfg)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("resume")
    settings = _settings(tiny_model_dir)
    sets = [a for s in settings for a in ("--set", s)]
    interrupted = root / "interrupted"
    proc = _fedqc("run", *sets, "--out", interrupted, new_session=True)
    killed: dict = {}

    def kill_after_first_checkpoint() -> None:
        state = interrupted / "checkpoint" / "state.json"
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if state.is_file():
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI, Ray and its workers at once
                killed["round"] = json.loads(state.read_text())["round"]
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    a = _in_process(root / "a", settings)  # meanwhile, the uninterrupted run
    watcher.join()
    _, stderr = proc.communicate(timeout=60)
    assert killed, f"the run ended before its first checkpoint: {stderr[-2000:]}"
    resumed = _fedqc("run", "--resume", interrupted)
    b = _in_process(root / "b", settings)  # meanwhile, the second uninterrupted run
    out, err = resumed.communicate(timeout=900)
    return {
        "a": a,
        "b": b,
        "r": interrupted,
        "killed_at": killed["round"],
        "resume": (resumed.returncode, out, err),
    }


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _same_adapter(x: Path, y: Path) -> None:
    ax, ay = _adapter(x), _adapter(y)
    assert ax.keys() == ay.keys()
    for key in ax:
        assert ax[key].tobytes() == ay[key].tobytes(), key


def _selection(run_dir: Path) -> list[dict]:
    clients = json.loads((run_dir / "selection.json").read_text())["clients"]
    return [{k: v for k, v in c.items() if k not in ("node", "score-seconds")} for c in clients]


def _learning_rates(run_dir: Path) -> dict[tuple[int, int], float]:
    """(client, round) → learning rate, from each client's own journal (the latest entry wins)."""
    rates = {}
    for client in (0, 1):
        journal = run_dir / "clients" / f"client-{client}" / "train.jsonl"
        for entry in map(json.loads, journal.read_text().splitlines()):
            if entry["event"] == "done":
                rates[(client, entry["round"])] = entry["lr"]
    return rates


def test_same_seed_gives_the_same_data_scores_decisions_and_adapter(runs):
    a, b = runs["a"], runs["b"]
    data = sorted(p.relative_to(a) for p in (a / "data").rglob("*") if p.is_file())
    assert len(data) >= 6
    for name in data:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for client in (0, 1):
        scores = Path("clients") / f"client-{client}" / "scores.jsonl"
        assert (a / scores).read_text() == (b / scores).read_text()
    assert json.loads((a / "threshold.json").read_text()) == json.loads(
        (b / "threshold.json").read_text()
    )
    assert _selection(a) == _selection(b)
    assert 0 < sum(c["kept"] for c in _selection(a)) < 20
    _same_adapter(a, b)
    eval_a = [r["eval_loss"] for r in json.loads((a / "metrics.json").read_text())]
    eval_b = [r["eval_loss"] for r in json.loads((b / "metrics.json").read_text())]
    assert eval_a == eval_b and len(eval_a) == ROUNDS + 1


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(runs):
    a, r = runs["a"], runs["r"]
    code, out, err = runs["resume"]
    assert code == 0, err[-3000:]
    assert 1 <= runs["killed_at"] < ROUNDS
    assert "Traceback" not in out + err
    _same_adapter(a, r)
    assert _selection(a) == _selection(r)
    rows_a = json.loads((a / "metrics.json").read_text())
    rows_r = json.loads((r / "metrics.json").read_text())
    assert [x["round"] for x in rows_r] == list(range(ROUNDS + 1))
    for x, y in zip(rows_a, rows_r, strict=True):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-6)
        assert x.get("train_train_loss") == y.get("train_train_loss")
    # the cosine schedule, by absolute round, across the interruption
    rates = _learning_rates(r)
    assert rates == _learning_rates(a)
    assert [rates[(0, n)] for n in range(1, ROUNDS + 1)] == pytest.approx([0.01, 0.0055, 0.001])
