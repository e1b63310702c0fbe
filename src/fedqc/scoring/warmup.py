"""The warm-up checkpoints on disk and the anchor side of the checkpoint scorers (no Flower).

A run's warm-up (:mod:`fedqc.federation.warmup` runs its rounds) saves each global adapter θ_k to
``RUN_DIR/warmup/round-k`` (a PEFT folder, plus ``checkpoint.safetensors``: θ_k bit for bit under
the names it was sent with) and lists them in ``RUN_DIR/warmup.json`` (round, η_k, SHA-256) with
the per-round metrics, rewritten after every round (:func:`save_round`, :func:`write_warmup`).
:func:`load_warmup` reads a finished warm-up back (resume, ``fedqc score/threshold --warmup``),
:func:`finished_warmup` the rounds a stopped run finished.

:func:`anchor_side`: the anchor info (the K mean anchor gradients, or the anchors' tokens for icl
and nuggets) and the anchors' own scores, at the same checkpoints and settings as the clients. For
``clues`` the server preconditions the anchors with Adam moments from its own warm-up steps on the
anchors (same steps, batch size and η_k, from θ_{k-1}): the clients' moments never leave them.
A client's own moments of round k live in its output folder (:func:`read_moments`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedqc.config import Config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.files import sha256_of
from fedqc.models.loading import LoadedModel, set_adapter_state
from fedqc.scoring.checkpointed import AnchorInfo, prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import Checkpoint, ScoringSettings, applied, moments_from_optimizer
from fedqc.scoring.scorers import Scores, batch_tokens_for
from fedqc.train.local import train_steps_with_optimizer

WARMUP_DIR = "warmup"
WARMUP_FILE = "warmup.json"
CHECKPOINT_FILE = "checkpoint.safetensors"  # in warmup/round-k, next to the PEFT adapter files
ANCHOR_PID = -1  # the server's "partition" in warm-up seeds (its Adam steps on the anchors)


def warmup_seed(seed: int, k: int, pid: int) -> int:
    """Batches and dropout of warm-up round k on one holder; apart from phase 2's seeds."""
    return seed * 1_000_003 + k * 1_009 + pid + 7_919_000


def save_round(run_dir: Path, loaded: LoadedModel, k: int, adapter: dict) -> None:
    """θ_k into ``RUN_DIR/warmup/round-k``: a PEFT folder, and the tensors bit for bit."""
    folder = run_dir / WARMUP_DIR / f"round-{k}"
    set_adapter_state(loaded.model, adapter)
    loaded.model.save_pretrained(folder)  # a PEFT folder, for people and tools
    save_file(adapter, str(folder / CHECKPOINT_FILE))  # θ_k bit for bit, under its own names


def write_warmup(run_dir: Path, checkpoints: list[Checkpoint], rows: list[dict], w: int) -> None:
    """warmup.json after each round, by an atomic rename: a crash leaves the last finished round."""
    entries = []
    for k, ckpt in enumerate(checkpoints, 1):
        folder = f"{WARMUP_DIR}/round-{k}"
        sha = sha256_of(run_dir / folder / CHECKPOINT_FILE)
        entries.append({"round": k, "lr": ckpt.lr, "adapter": folder, "sha256": sha})
    data = {"rounds": len(checkpoints), "planned": w, "checkpoints": entries, "metrics": rows}
    tmp = run_dir / f".{WARMUP_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, run_dir / WARMUP_FILE)


def read_warmup(run_dir: Path) -> tuple[dict, list[Checkpoint]]:
    """(warmup.json, its checkpoints θ_k with η_k), checked against their recorded SHA-256."""
    path = Path(run_dir) / WARMUP_FILE
    try:
        data = json.loads(path.read_text())
        entries = data["checkpoints"]
        files = [Path(run_dir) / e["adapter"] / CHECKPOINT_FILE for e in entries]
        lrs = [float(e["lr"]) for e in entries]
        ok = bool(entries) and all(
            f.is_file() and sha256_of(f) == e["sha256"] for f, e in zip(files, entries, strict=True)
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FedqcError(f"{path}: the warm-up checkpoints are damaged or changed since the run")
    return data, [Checkpoint(load_file(str(f)), lr) for f, lr in zip(files, lrs, strict=True)]


def load_warmup(run_dir: Path) -> list[Checkpoint]:
    """The checkpoints of a run's finished warm-up (θ_k and η_k), checked against their SHA-256."""
    if not (Path(run_dir) / WARMUP_FILE).is_file():
        raise FedqcError(
            f"{run_dir}: holds no warm-up checkpoints ({WARMUP_FILE} is missing); give the run "
            "directory of a fedqc run with a checkpoint scorer (tracin, clues, ...)"
        )
    data, checkpoints = read_warmup(run_dir)
    planned = int(data.get("planned", len(checkpoints)))
    if len(checkpoints) < planned:
        raise FedqcError(
            f"{run_dir}: its warm-up stopped after {len(checkpoints)} of {planned} rounds; "
            f"finish the run first (fedqc run --resume {run_dir})"
        )
    return checkpoints


def finished_warmup(run_dir: Path, cfg: Config) -> tuple[list[Checkpoint], list[dict]]:
    """(checkpoints, metrics rows) of the warm-up rounds a stopped run finished; none if none."""
    if not (Path(run_dir) / WARMUP_FILE).is_file():
        return [], []
    data, checkpoints = read_warmup(run_dir)
    w = cfg.quality.warmup_rounds
    if int(data.get("planned", w)) != w or len(checkpoints) > w:
        raise FedqcError(
            f"{run_dir / WARMUP_FILE}: made for {data.get('planned')} warm-up rounds, this run "
            f"has quality.warmup-rounds = {w}"
        )
    return checkpoints, list(data["metrics"])


def settings_for(cfg: Config, loaded: LoadedModel) -> ScoringSettings:
    return ScoringSettings.for_model(loaded.tokenizer, cfg.quality.scorer, cfg.model.max_length)


def anchor_moments(
    cfg: Config, loaded: LoadedModel, anchors: list[Sample], checkpoints: list[Checkpoint]
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The server's Adam moments for clues: warm-up round k's local steps on the anchors."""
    t, tok = cfg.train, loaded.tokenizer
    enc = encode_all(tok, anchors, cfg.model.max_length)
    starts = [loaded.initial_adapter, *(c.adapter for c in checkpoints[:-1])]
    out = []
    for k, (start, ckpt) in enumerate(zip(starts, checkpoints, strict=True), 1):
        with applied(loaded.model, start):
            _, optimizer = train_steps_with_optimizer(
                loaded.model,
                enc,
                tok.pad_token_id,
                t.local_steps,
                t.batch_size,
                ckpt.lr,
                t.weight_decay,
                warmup_seed(t.seed, k, ANCHOR_PID),
                t.gradient_checkpointing,
                loaded.placement,
            )
            out.append(moments_from_optimizer(loaded.model, optimizer))
    return out


def anchor_side(
    cfg: Config,
    loaded: LoadedModel,
    anchors: list[Sample],
    checkpoints: list[Checkpoint],
    *,
    with_scores: bool,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[AnchorInfo, Scores | None]:
    """(anchor info for the query message, the anchors' own scores for τ when asked)."""
    q = cfg.quality
    settings = settings_for(cfg, loaded)
    bt = batch_tokens_for(q.scorer, q.batch_tokens, q.backward_batch_tokens)
    info = prepare_anchor_info(
        loaded, anchors, checkpoints, settings, batch_tokens=bt, on_batch=on_batch
    )
    if not with_scores:
        return info, None
    scored = checkpoints
    if settings.scorer == "clues":
        moments = anchor_moments(cfg, loaded, anchors, checkpoints)
        scored = [
            dataclasses.replace(c, moments=m) for c, m in zip(checkpoints, moments, strict=True)
        ]
    scores = score_with_checkpoints(
        loaded,
        anchors,
        scored,
        info,
        settings,
        batch_tokens=bt,
        anchor_self=True,
        on_batch=on_batch,
    )
    return info, scores


def write_moments(out_dir: Path, k: int, flat: dict[str, torch.Tensor]) -> None:
    """Keep a client's Adam moments of warm-up round k in its output folder."""
    folder = out_dir / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"moments-round-{k}.npz", **{n: t.numpy() for n, t in flat.items()})


def read_moments(out_dir: Path, k: int) -> dict[str, np.ndarray] | None:
    """A client's Adam moments of warm-up round k from its output folder, flat (``m.NAME``,
    ``v.NAME``); None if it has none."""
    path = out_dir / WARMUP_DIR / f"moments-round-{k}.npz"
    if not path.is_file():
        return None
    with np.load(path) as npz:
        return {n: npz[n].copy() for n in npz.files}


def unflatten_moments(flat: dict[str, np.ndarray]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{LoRA weight name: (m, v)} from the flat ``m.NAME`` / ``v.NAME`` arrays."""
    names = {n.partition(".")[2] for n in flat}
    return {
        n: (torch.from_numpy(np.array(flat[f"m.{n}"])), torch.from_numpy(np.array(flat[f"v.{n}"])))
        for n in names
    }
