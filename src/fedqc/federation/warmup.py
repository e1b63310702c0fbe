"""Warm-up checkpoints for the checkpoint scorers: tracin, tracin-cos, clues, datainf, icl, nuggets.

Server side:

- :func:`run_warmup`: W = ``quality.warmup-rounds`` FedAvg rounds of LoRA on every client's
  unfiltered data (message ``train.warmup``, built by the same strategy code as phase 2, weighted
  by the clients' sample counts). The global adapter after round k is the checkpoint θ_k and
  η_k = round_lr(train.lr, train.lr-schedule, k, W). Each θ_k is saved to
  ``RUN_DIR/warmup/round-k`` (a PEFT folder, plus ``checkpoint.safetensors``: θ_k bit for bit under
  the names it was sent with) and ``RUN_DIR/warmup.json`` lists them (round, η_k, SHA-256) with the
  per-round metrics, rewritten after every round; :func:`load_warmup` reads a finished warm-up back
  (resume, ``fedqc score/threshold --warmup RUN_DIR``). A run stopped before phase 2's first
  checkpoint resumes from its last finished warm-up round (:func:`finished_warmup`,
  :func:`resumes_from_warmup`): those rounds are not trained again.
- :func:`anchor_side`: the anchor info (the K mean anchor gradients, or the anchors' tokens for icl
  and nuggets) and the anchors' own scores, at the same checkpoints and settings as the clients.
  For ``clues`` the server preconditions the anchors with Adam moments from its own warm-up steps
  on the anchors (same steps, batch size and η_k, from θ_{k-1}): the clients' moments never leave
  them.
- :func:`query_payload`: what the query message adds: the checkpoints, their η_k, the anchor info
  and the fingerprint of (checkpoints, settings).

Client side:

- :func:`save_moments`: the Adam moments of its warm-up round k, by LoRA weight name, kept in
  ``context.state`` and in the node's output folder (``warmup/moments-round-k.npz``, for a
  resumed run and for ``fedqc score --moments``).
- :func:`client_scores`: rebuild the checkpoints from the message (with its own moments for
  clues) and score with ``score_with_checkpoints``, which recomputes the fingerprint and refuses
  to score on any mismatch: anchors and clients use the same checkpoints and settings, in code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

from fedqc.config import Config
from fedqc.data.encoding import Encoded, encode_all
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.federation.checkpoint import has_checkpoint
from fedqc.federation.protocol import ANCHOR_INFO_RECORD, CHECKPOINT_RECORD, TRAIN_WARMUP
from fedqc.federation.strategy import ParticipationGrid, build_strategy
from fedqc.files import sha256_of
from fedqc.models.loading import LoadedModel, set_adapter_state
from fedqc.scoring.checkpointed import AnchorInfo, prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import Checkpoint, ScoringSettings, applied, moments_from_optimizer
from fedqc.scoring.scorers import Scores, batch_tokens_for, is_checkpoint_scorer
from fedqc.train.local import evaluate, round_lr, train_steps_with_optimizer

WARMUP_DIR = "warmup"
WARMUP_FILE = "warmup.json"
CHECKPOINT_FILE = "checkpoint.safetensors"  # in warmup/round-k, next to the PEFT adapter files
MOMENTS_KEY = "fedqc-moments-{k}"  # context.state record of a client's moments of round k
ANCHOR_PID = -1  # the server's "partition" in warm-up seeds (its Adam steps on the anchors)


def warmup_seed(seed: int, k: int, pid: int) -> int:
    """Batches and dropout of warm-up round k on one holder; apart from phase 2's seeds."""
    return seed * 1_000_003 + k * 1_009 + pid + 7_919_000


# ---------------------------------------------------------------------------------------------
# Server


def run_warmup(
    cfg: Config,
    grid: ParticipationGrid,
    loaded: LoadedModel,
    run_dir: Path,
    nodes: list[int],
    eval_set: list[Encoded],
    on_round: Callable[[], None],
    done: tuple[list[Checkpoint], list[dict]] = ([], []),
) -> tuple[list[Checkpoint], list[dict]]:
    """W FedAvg rounds on the unfiltered data: (checkpoints θ_k with η_k, metrics rows).

    ``done``: the rounds an interrupted run finished (:func:`finished_warmup`); the warm-up goes
    on from the last of them, with the same round numbers, seeds and η_k.
    """
    w, t = cfg.quality.warmup_rounds, cfg.train
    checkpoints, rows = list(done[0]), list(done[1])
    offset = len(checkpoints)
    if offset >= w:
        return checkpoints, rows
    clients = {n: -1 for n in nodes}  # partition ids come later (query round): order by node id
    strategy = build_strategy(cfg, clients, grid, offset, TRAIN_WARMUP)
    base = getattr(strategy, "strategy", strategy)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        k = server_round + offset
        adapter = arrays.to_torch_state_dict()
        lr = round_lr(t.lr, t.lr_schedule, k, w)
        checkpoints.append(Checkpoint(adapter, lr))
        folder = run_dir / WARMUP_DIR / f"round-{k}"
        set_adapter_state(loaded.model, adapter)
        loaded.model.save_pretrained(folder)  # a PEFT folder, for people and tools
        save_file(adapter, str(folder / CHECKPOINT_FILE))  # θ_k bit for bit, under its own names
        metrics = {}
        if eval_set:
            pad = loaded.tokenizer.pad_token_id
            metrics = evaluate(loaded.model, eval_set, pad, cfg.quality.batch_tokens)
        row: dict = {"phase": "warmup", "round": k, "lr": lr, **metrics}
        for key, value in base.train_metrics.get(k, {}).items():
            row[f"train_{key.replace('-', '_')}"] = value
        exchange = grid.of_round(k, TRAIN_WARMUP)
        if exchange is not None:
            row["train_sampled"] = exchange["sampled"]
            row["train_answered"] = exchange["answered"]
            row["train_dropped"] = [d["node"] for d in exchange["dropped"]]
        rows.append(row)
        _write_warmup(run_dir, checkpoints, rows, w)
        on_round()
        return MetricRecord(metrics) if metrics else None

    train_config = ConfigRecord(
        {
            "local-steps": t.local_steps,
            "batch-size": t.batch_size,
            "lr": t.lr,
            "lr-schedule": t.lr_schedule,
            "weight-decay": t.weight_decay,
            "seed": t.seed,
            "max-length": cfg.model.max_length,
            "round-offset": offset,
            "total-rounds": w,
        }
    )
    grid.min_answers = {TRAIN_WARMUP: min(cfg.federation.min_nodes, len(nodes))}
    start = checkpoints[-1].adapter if checkpoints else loaded.initial_adapter
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(dict(start)),
        num_rounds=w - offset,
        timeout=cfg.federation.timeout,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    grid.round = 0
    loaded.reset_adapter()
    return checkpoints, rows


def _write_warmup(run_dir: Path, checkpoints: list[Checkpoint], rows: list[dict], w: int) -> None:
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


def _read_warmup(run_dir: Path) -> tuple[dict, list[Checkpoint]]:
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
    data, checkpoints = _read_warmup(run_dir)
    planned = int(data.get("planned", len(checkpoints)))
    if len(checkpoints) < planned:
        raise FedqcError(
            f"{run_dir}: its warm-up stopped after {len(checkpoints)} of {planned} rounds; "
            f"finish the run first (fedqc run --resume {run_dir})"
        )
    return checkpoints


def resumes_from_warmup(run_dir: Path, cfg: Config) -> bool:
    """True for a checkpoint-scorer run stopped before phase 2's first checkpoint, with warm-up
    rounds on disk: a resume reuses them and runs the rest again."""
    return (
        is_checkpoint_scorer(cfg.quality.scorer)
        and not has_checkpoint(Path(run_dir))
        and (Path(run_dir) / WARMUP_FILE).is_file()
    )


def finished_warmup(run_dir: Path, cfg: Config) -> tuple[list[Checkpoint], list[dict]]:
    """(checkpoints, metrics rows) of the warm-up rounds a stopped run finished; none if none."""
    if not (Path(run_dir) / WARMUP_FILE).is_file():
        return [], []
    data, checkpoints = _read_warmup(run_dir)
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


def query_payload(
    checkpoints: list[Checkpoint], info: AnchorInfo
) -> tuple[dict, dict[str, ArrayRecord]]:
    """(config entries, records) the query message adds for a checkpoint scorer."""
    config = {"fingerprint": info.fingerprint, "checkpoint-lrs": [c.lr for c in checkpoints]}
    records = {
        CHECKPOINT_RECORD.format(k=k): ArrayRecord(dict(c.adapter))
        for k, c in enumerate(checkpoints, 1)
    }
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in info.to_arrays().items()}
    records[ANCHOR_INFO_RECORD] = ArrayRecord(tensors)
    return config, records


# ---------------------------------------------------------------------------------------------
# Client


def save_moments(
    context: Context, out_dir: Path, k: int, moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Keep a client's Adam moments of warm-up round k (they never leave the node)."""
    flat = {f"{p}.{name}": t for name, mv in moments.items() for p, t in zip("mv", mv, strict=True)}
    context.state[MOMENTS_KEY.format(k=k)] = ArrayRecord(flat)
    folder = out_dir / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"moments-round-{k}.npz", **{n: t.numpy() for n, t in flat.items()})


def load_moments(
    context: Context | None, out_dir: Path, k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """A client's moments of warm-up round k: from context.state, else its output folder."""
    key = MOMENTS_KEY.format(k=k)
    if context is not None and key in context.state:
        flat = {n: a.numpy() for n, a in context.state[key].items()}
    elif (out_dir / WARMUP_DIR / f"moments-round-{k}.npz").is_file():
        with np.load(out_dir / WARMUP_DIR / f"moments-round-{k}.npz") as npz:
            flat = {n: npz[n].copy() for n in npz.files}
    else:
        return None
    names = {n.partition(".")[2] for n in flat}
    return {
        n: (torch.from_numpy(np.array(flat[f"m.{n}"])), torch.from_numpy(np.array(flat[f"v.{n}"])))
        for n in names
    }


def client_scores(
    content: RecordDict,
    context: Context,
    loaded: LoadedModel,
    samples: list[Sample],
    out_dir: Path,
    batch_tokens: int,
) -> Scores:
    """Score this node's samples at the server's checkpoints, after the fingerprint check."""
    qc = content["config"]
    name = str(qc["scorer"])
    checkpoints = []
    for k, lr in enumerate((float(x) for x in qc["checkpoint-lrs"]), 1):
        moments = None
        if name == "clues":
            moments = load_moments(context, out_dir, k)
            if moments is None:
                raise FedqcError(
                    f"clues: this node has no Adam moments of warm-up round {k} (it did not "
                    "train in that round)"
                )
        adapter = content[CHECKPOINT_RECORD.format(k=k)].to_torch_state_dict()
        checkpoints.append(Checkpoint(adapter, lr, moments))
    arrays = {key: a.numpy() for key, a in content[ANCHOR_INFO_RECORD].items()}
    info = AnchorInfo.from_arrays(name, str(qc["fingerprint"]), arrays)
    settings = ScoringSettings.for_model(loaded.tokenizer, name, int(qc["max-length"]))
    return score_with_checkpoints(
        loaded, samples, checkpoints, info, settings, batch_tokens=batch_tokens
    )
