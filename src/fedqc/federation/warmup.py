"""The federated warm-up of the checkpoint scorers (tracin, tracin-cos, clues, datainf, icl,
nuggets): its rounds and messages. What is not Flower (the checkpoints on disk, the anchor side,
seeds) is in :mod:`fedqc.scoring.warmup`.

Server side:

- :func:`run_warmup`: W = ``quality.warmup-rounds`` FedAvg rounds of LoRA on every client's
  unfiltered data (message ``train.warmup``, built by the same strategy code as phase 2, weighted
  by the clients' sample counts). The global adapter after round k is the checkpoint θ_k and
  η_k = round_lr(train.lr, train.lr-schedule, k, W), saved after every round. A run stopped before
  phase 2's first checkpoint resumes from its last finished warm-up round
  (:func:`fedqc.scoring.warmup.finished_warmup`,
  :func:`fedqc.federation.checkpoint.resumes_from_warmup`): those rounds are not trained again.
- :func:`query_payload`: the records the query message adds: the checkpoints and the anchor info
  (its config adds their η_k and the fingerprint of (checkpoints, settings)).

Client side:

- :func:`save_moments`: the Adam moments of its warm-up round k, by LoRA weight name, kept in
  ``context.state`` and in the node's output folder (``warmup/moments-round-k.npz``, for a
  resumed run and for ``fedqc score --moments``).
- :func:`client_scores`: rebuild the checkpoints from the message (with its own moments for
  clues) and score with ``score_with_checkpoints``, which recomputes the fingerprint and refuses
  to score on any mismatch: anchors and clients use the same checkpoints and settings, in code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from fedqc.config import Config
from fedqc.data.encoding import Encoded
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.federation.protocol import (
    ANCHOR_INFO_RECORD,
    CHECKPOINT_RECORD,
    TRAIN_WARMUP,
    QueryConfig,
)
from fedqc.federation.strategy import ParticipationGrid, build_strategy, round_row, run_rounds
from fedqc.models.loading import LoadedModel
from fedqc.scoring.checkpointed import AnchorInfo, score_with_checkpoints
from fedqc.scoring.gradient import Checkpoint, ScoringSettings
from fedqc.scoring.scorers import Scores
from fedqc.scoring.warmup import (
    read_moments,
    save_round,
    unflatten_moments,
    write_moments,
    write_warmup,
)
from fedqc.train.local import evaluate, round_lr

MOMENTS_KEY = "fedqc-moments-{k}"  # context.state record of a client's moments of round k


# ---------------------------------------------------------------------------------------------
# Server


def run_warmup(
    cfg: Config,
    grid: ParticipationGrid,
    loaded: LoadedModel,
    run_dir: Path,
    nodes: list[int],
    eval_set: list[Encoded],
    on_done: Callable[[], None],
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

    def on_round(k: int, arrays: ArrayRecord, initial: bool) -> MetricRecord | None:
        if initial:
            return None
        adapter = arrays.to_torch_state_dict()
        lr = round_lr(t.lr, t.lr_schedule, k, w)
        checkpoints.append(Checkpoint(adapter, lr))
        save_round(run_dir, loaded, k, adapter)
        metrics = {}
        if eval_set:
            pad = loaded.tokenizer.pad_token_id
            metrics = evaluate(loaded.model, eval_set, pad, cfg.quality.batch_tokens)
        row = {"phase": "warmup", "round": k, "lr": lr, **metrics}
        rows.append(row | round_row(strategy, grid, k, (TRAIN_WARMUP,)))
        write_warmup(run_dir, checkpoints, rows, w)
        on_done()
        return MetricRecord(metrics) if metrics else None

    start = checkpoints[-1].adapter if checkpoints else loaded.initial_adapter
    run_rounds(cfg, grid, strategy, ArrayRecord(dict(start)), (offset, w), on_round)
    grid.round = 0
    loaded.reset_adapter()
    return checkpoints, rows


def query_payload(checkpoints: list[Checkpoint], info: AnchorInfo) -> dict[str, ArrayRecord]:
    """The records the query message adds for a checkpoint scorer (its config adds
    ``info.fingerprint`` and the checkpoints' η_k)."""
    records = {
        CHECKPOINT_RECORD.format(k=k): ArrayRecord(dict(c.adapter))
        for k, c in enumerate(checkpoints, 1)
    }
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in info.to_arrays().items()}
    records[ANCHOR_INFO_RECORD] = ArrayRecord(tensors)
    return records


# ---------------------------------------------------------------------------------------------
# Client


def save_moments(
    context: Context, out_dir: Path, k: int, moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Keep a client's Adam moments of warm-up round k (they never leave the node)."""
    flat = {f"{p}.{name}": t for name, mv in moments.items() for p, t in zip("mv", mv, strict=True)}
    context.state[MOMENTS_KEY.format(k=k)] = ArrayRecord(flat)
    write_moments(out_dir, k, flat)


def load_moments(
    context: Context | None, out_dir: Path, k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """A client's moments of warm-up round k: from context.state, else its output folder."""
    key = MOMENTS_KEY.format(k=k)
    if context is not None and key in context.state:
        flat = {n: a.numpy() for n, a in context.state[key].items()}
    else:
        flat = read_moments(out_dir, k)
    return None if flat is None else unflatten_moments(flat)


def client_scores(
    content: RecordDict,
    qc: QueryConfig,
    context: Context,
    loaded: LoadedModel,
    samples: list[Sample],
    out_dir: Path,
) -> Scores:
    """Score this node's samples at the server's checkpoints, after the fingerprint check."""
    name = qc.scorer
    checkpoints = []
    for k, lr in enumerate(qc.checkpoint_lrs or [], 1):
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
    info = AnchorInfo.from_arrays(name, str(qc.fingerprint), arrays)
    settings = ScoringSettings.for_model(loaded.tokenizer, name, qc.max_length)
    return score_with_checkpoints(
        loaded, samples, checkpoints, info, settings, batch_tokens=qc.batch_tokens
    )
