"""The server's checkpoint after every round, and reading it back to resume.

Every check of a resume is here, in :func:`resume_point`: where a resumed run continues, for the
server and for `fedqc run --resume`.

``RUN_DIR/checkpoint/`` holds ``state.json`` (round, τ, selection, per-round history, the
participation log, the strategy settings and the config), ``adapter-round-<r>.npz`` (the global
adapter, bit for bit) and, for a strategy with a server optimiser (FedAdam, FedYogi, FedAdagrad,
FedAvgM), ``optimizer-round-<r>.npz`` (its moments, bit for bit). The arrays are written first and
``state.json`` last, each by an atomic rename, so a crash at any moment leaves the previous
complete checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.files import sha256_of
from fedqc.scoring.scorers import is_checkpoint_scorer
from fedqc.scoring.warmup import WARMUP_FILE

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
# Keys a resumed run may change: how long it runs and how it waits for nodes, nothing that
# changes what a round computes.
RESUMABLE_CHANGES = ("train.rounds", "federation.", "output.")


def save_checkpoint(
    run_dir: Path,
    state: dict,
    arrays: ArrayRecord,
    optimizer: dict[str, np.ndarray] | None = None,
) -> None:
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {"adapter": {k: a.numpy() for k, a in arrays.items()}}
    if optimizer:
        files["optimizer"] = optimizer
    names = {}
    for kind, tensors in files.items():
        name = f"{kind}-round-{state['round']}.npz"
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **tensors)
        os.replace(tmp, folder / name)
        names |= {kind: name, f"{kind}-sha256": sha256_of(folder / name)}
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({**state, **names}, indent=2) + "\n")
    os.replace(tmp, folder / STATE_FILE)
    for old in [*folder.glob("adapter-round-*.npz"), *folder.glob("optimizer-round-*.npz")]:
        if old.name not in names.values():
            old.unlink()


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file()


def load_checkpoint(run_dir: Path) -> tuple[dict, ArrayRecord]:
    """(state, global adapter) of the last completed round; a clear error when there is none."""
    folder = run_dir / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        raise FedqcError(
            f"{run_dir}: no checkpoint to resume ({CHECKPOINT_DIR}/{STATE_FILE} is missing; "
            "a run saves one after each finished round)"
        )
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        adapter = folder / state["adapter"]
        ok = adapter.is_file() and sha256_of(adapter) == state["adapter-sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FedqcError(f"{folder}: the checkpoint is damaged (state.json or its adapter)")
    with np.load(adapter) as npz:
        tensors = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    return state, ArrayRecord(tensors)


def load_optimizer(run_dir: Path, state: dict) -> dict[str, np.ndarray]:
    """The server optimiser's state saved with ``state`` (empty if the strategy has none)."""
    if "optimizer" not in state:
        return {}
    path = run_dir / CHECKPOINT_DIR / state["optimizer"]
    if not path.is_file() or sha256_of(path) != state.get("optimizer-sha256"):
        raise FedqcError(f"{path}: the checkpoint's optimizer state is missing or damaged")
    with np.load(path) as npz:
        return {k: npz[k].copy() for k in npz.files}


def check_resumable(saved: dict, current: dict) -> None:
    """Stop unless ``current`` (flat config) computes the same rounds as the checkpoint's."""
    changed = [
        k
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        k = changed[0]
        raise FedqcError(
            f"cannot resume: the checkpoint was made with {k}={saved.get(k)!r}, this run has "
            f"{current.get(k)!r}; a resumed run may change only train.rounds, federation.* "
            "and output.*"
        )


def resumes_from_warmup(run_dir: Path, cfg: Config) -> bool:
    """True for a checkpoint-scorer run stopped before phase 2's first checkpoint, with warm-up
    rounds on disk: a resume reuses them and runs the rest again."""
    return (
        is_checkpoint_scorer(cfg.quality.scorer)
        and not has_checkpoint(Path(run_dir))
        and (Path(run_dir) / WARMUP_FILE).is_file()
    )


def resume_point(
    run_dir: Path, cfg: Config, refuse_finished: bool = False
) -> tuple[dict, ArrayRecord] | None:
    """Where a resumed run continues: None when it stopped before phase 2's first checkpoint with
    warm-up rounds on disk (it reuses them and runs the rest again); else its last checkpoint
    (state, global adapter), once ``cfg`` is shown to compute the same rounds and the checkpoint
    not to lie beyond train.rounds. ``refuse_finished`` (`fedqc run --resume`): stop when the
    run finished all its rounds."""
    if resumes_from_warmup(run_dir, cfg):
        return None
    state, arrays = load_checkpoint(run_dir)
    check_resumable(state["config"], cfg.to_flat())
    rounds = cfg.train.rounds
    if refuse_finished and state["round"] >= rounds and (run_dir / "adapter").is_dir():
        raise FedqcError(
            f"{run_dir}: finished all {rounds} rounds; nothing to resume "
            "(--set train.rounds=N runs it longer)"
        )
    if state["round"] > rounds:
        raise FedqcError(
            f"{run_dir}: the checkpoint is at round {state['round']}, beyond train.rounds = "
            f"{rounds}"
        )
    return state, arrays
