"""Scores at the warm-up checkpoints: tracin, tracin-cos, clues, datainf, icl and nuggets.

The protocol, with no Flower in it (the federation calls these functions):

1. Warm-up: after each of W federated warm-up rounds, the global adapter and the round's learning
   rate form a :class:`Checkpoint` θ_k, η_k, kept by the server and by every client (clients also
   keep their own Adam moments of that round, for clues).
2. Query round, server: ``info = prepare_anchor_info(loaded, anchors, checkpoints, settings)``.
   For the gradient scorers it holds the K mean anchor gradients ḡ_k (LoRA-sized; the anchors stay
   on the server); for icl and nuggets the anchors' token ids (they must travel: they are the
   prompt). It carries ``fingerprint(checkpoints, settings)``.
3. Client: ``score_with_checkpoints(loaded, samples, checkpoints, info, settings)``: it recomputes
   the fingerprint from its own checkpoints and settings and refuses to score on any mismatch, so
   the anchors and every client are scored at identical checkpoints and settings, in code.
4. Server, for the threshold: the same call on the anchors with ``anchor_self=True``: each anchor
   is scored without itself, as a client's sample is. icl and nuggets leave it out of its own
   prefix or task set; tracin, tracin-cos and clues score it against the mean gradient of the
   *other* anchors, ḡ_k,−i = (n ḡ_k − g_k,i)/(n − 1); datainf does the same in its ⟨v, g⟩ term.
   With itself in ḡ, an anchor's score would carry its own ‖g‖²/n, most of its score on real
   models, and τ would sit above nearly every client sample.

Every model pass goes through the same engines (``gradient``, ``datainf``, ``icl``) on both sides;
the model is in eval mode and its adapter is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedqc.data.encoding import Encoded, encode_all, token_budget_batches
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import LoadedModel
from fedqc.scoring.datainf import DataInfStats, datainf_scores, datainf_statistics
from fedqc.scoring.gradient import (
    Checkpoint,
    LoraHooks,
    ScoringSettings,
    applied,
    check_fingerprint,
    fingerprint,
    mean_gradient,
    per_sample_stats,
)
from fedqc.scoring.icl import icl_losses, nuggets_scores
from fedqc.scoring.scorers import Scores, get_checkpoint_scorer


@dataclass
class AnchorInfo:
    """What the server sends to the clients in the query round."""

    scorer: str
    fingerprint: str
    directions: list[dict[str, torch.Tensor]] = field(default_factory=list)  # ḡ_k, by name
    demos: list[Encoded] = field(default_factory=list)  # icl / nuggets: the anchors' tokens

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays (for a Flower ArrayRecord); ``scorer`` and ``fingerprint`` go alongside."""
        out = {
            f"dir.{k}.{name}": t.detach().float().cpu().numpy()
            for k, d in enumerate(self.directions)
            for name, t in d.items()
        }
        for j, e in enumerate(self.demos):
            out[f"demo.{j}"] = np.array([e.n_prompt, int(e.truncated), *e.input_ids], np.int64)
        return out

    @classmethod
    def from_arrays(cls, scorer: str, fp: str, arrays: dict[str, np.ndarray]) -> AnchorInfo:
        directions: dict[int, dict[str, torch.Tensor]] = {}
        demos: dict[int, Encoded] = {}
        for key, value in arrays.items():
            kind, _, rest = key.partition(".")
            if kind == "dir":
                k, _, name = rest.partition(".")
                directions.setdefault(int(k), {})[name] = torch.as_tensor(np.array(value))
            elif kind == "demo":
                v = [int(x) for x in np.asarray(value)]
                demos[int(rest)] = Encoded(tuple(v[2:]), v[0], bool(v[1]))
        return cls(
            scorer,
            fp,
            [directions[k] for k in sorted(directions)],
            [demos[j] for j in sorted(demos)],
        )


def prepare_anchor_info(
    loaded: LoadedModel,
    anchors: list[Sample],
    checkpoints: Sequence[Checkpoint],
    settings: ScoringSettings,
    *,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> AnchorInfo:
    """Server side: the anchors' contribution (ḡ_k per checkpoint, or their tokens)."""
    scorer = get_checkpoint_scorer(settings.scorer)
    if not checkpoints:
        raise FedqcError(f"{scorer.name} needs at least one warm-up checkpoint")
    if not anchors:
        raise FedqcError(f"{scorer.name} needs anchor samples")
    tok = loaded.tokenizer
    enc = encode_all(tok, anchors, settings.max_length)
    info = AnchorInfo(scorer.name, fingerprint(checkpoints, settings))
    if scorer.needs in ("gradients", "datainf"):
        for ckpt in checkpoints:
            with applied(loaded.model, ckpt.adapter):
                info.directions.append(
                    mean_gradient(
                        loaded.model,
                        enc,
                        tok.pad_token_id,
                        batch_tokens=batch_tokens,
                        on_batch=on_batch,
                    )
                )
    else:
        info.demos = enc
    return info


def score_with_checkpoints(
    loaded: LoadedModel,
    samples: list[Sample],
    checkpoints: Sequence[Checkpoint],
    info: AnchorInfo,
    settings: ScoringSettings,
    *,
    batch_tokens: int = 4096,
    anchor_self: bool = False,
    datainf_stats: Sequence[DataInfStats] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Scores:
    """Score ``samples`` at the checkpoints, after checking the fingerprint (both sides call it).

    ``anchor_self``: the samples are the anchors, in ``info``'s order (server-side threshold);
    each is scored leaving itself out (module docstring, step 4; needs at least 2 anchors).
    ``datainf_stats``: per checkpoint, the training-set statistics (λ_l, S_l) to score against;
    by default they come from ``samples`` themselves (the client's own data, as in DataInf).
    Gradient scores average over the K checkpoints, weighted by η_k (datainf: plain mean);
    icl and nuggets use the last checkpoint. ``Scores.cond_loss`` is ℓ(r|q) at the last
    checkpoint where the passes yield it (tracin, tracin-cos, clues, icl), else NaN; ``bare_loss``
    is NaN.
    """
    scorer = get_checkpoint_scorer(settings.scorer)
    if info.scorer != scorer.name:
        raise FedqcError(f"anchor info is for scorer '{info.scorer}', not '{scorer.name}'")
    check_fingerprint(info.fingerprint, checkpoints, settings)
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id
    enc = encode_all(tok, samples, settings.max_length)
    truncated = sum(e.truncated for e in enc)
    if scorer.needs in ("prefix", "tasks"):
        exclude = list(range(len(enc))) if anchor_self else None
        if anchor_self and len(enc) != len(info.demos):
            raise FedqcError("anchor_self: the samples must be the anchors the info was built from")
        with applied(model, checkpoints[-1].adapter):
            cond_loss = np.full(len(enc), np.nan)
            if scorer.needs == "prefix":
                cond_loss, with_prefix = icl_losses(
                    model,
                    enc,
                    pad,
                    info.demos,
                    settings.icl_prefix_tokens,
                    exclude=exclude,
                    batch_tokens=batch_tokens,
                    on_batch=on_batch,
                )
                raw = cond_loss - with_prefix
            else:
                raw = nuggets_scores(
                    model,
                    enc,
                    pad,
                    info.demos,
                    exclude=exclude,
                    batch_tokens=batch_tokens,
                    on_batch=on_batch,
                )
        return _scores(scorer, raw, truncated, cond_loss)

    if anchor_self and len(enc) < 2:
        raise FedqcError("scoring the anchors, each against the others, needs at least 2 anchors")
    if len(info.directions) != len(checkpoints):
        raise FedqcError(
            f"anchor info has {len(info.directions)} directions for {len(checkpoints)} checkpoints"
        )
    if datainf_stats is not None and len(datainf_stats) != len(checkpoints):
        raise FedqcError("datainf_stats: give one per checkpoint")
    total, cond_loss = np.zeros(len(enc)), np.full(len(enc), np.nan)
    for k, (ckpt, g_bar) in enumerate(zip(checkpoints, info.directions, strict=True)):
        with applied(model, ckpt.adapter):
            term, cond_loss = _one_checkpoint(
                scorer.name,
                loaded,
                enc,
                ckpt,
                g_bar,
                settings,
                None if datainf_stats is None else datainf_stats[k],
                batch_tokens,
                on_batch,
                anchor_self,
            )
            total += term
    return _scores(scorer, total / len(checkpoints), truncated, cond_loss)


def _scores(scorer, raw: np.ndarray, truncated: int, cond_loss: np.ndarray) -> Scores:
    """``cond_loss``: ℓ(r|q) at the last checkpoint where the passes give it for free, else NaN."""
    return Scores(
        raw=raw,
        oriented=scorer.orient(raw),
        truncated=truncated,
        cond_loss=cond_loss,
        bare_loss=np.full_like(raw, np.nan),
    )


def _one_checkpoint(
    name: str,
    loaded: LoadedModel,
    enc: list[Encoded],
    ckpt: Checkpoint,
    g_bar: dict[str, torch.Tensor],
    settings: ScoringSettings,
    stats: DataInfStats | None,
    batch_tokens: int,
    on_batch: Callable[[int], None] | None,
    anchor_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One checkpoint's term of the average and ℓ(r|q) (NaN for datainf); adapter loaded.

    ``anchor_self``: ``enc`` are the anchors ``g_bar`` is the mean gradient of; each is scored
    against the mean of the others.
    """
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    if name == "datainf":
        if stats is None:
            stats = datainf_statistics(
                model,
                enc,
                pad,
                g_bar,
                damping=settings.datainf_damping,
                batch_tokens=batch_tokens,
                on_batch=on_batch,
            )
        term = datainf_scores(
            model,
            enc,
            pad,
            g_bar,
            stats,
            batch_tokens=batch_tokens,
            on_batch=on_batch,
            leave_self_out=anchor_self,
        )
        return term, np.full(len(enc), np.nan)
    if name == "clues" and ckpt.moments is None:
        raise FedqcError("clues needs the Adam moments of the warm-up steps in each checkpoint")
    directions = _leave_one_out(loaded, enc, g_bar, batch_tokens) if anchor_self else g_bar
    stats_ = per_sample_stats(
        model,
        enc,
        pad,
        directions=directions,
        moments=ckpt.moments if name == "clues" else None,
        betas=settings.adam_betas,
        eps=settings.adam_eps,
        batch_tokens=batch_tokens,
        on_batch=on_batch,
    )
    # each sample against its own direction: the shared ḡ, or (anchors) the others' mean
    dots = np.diagonal(stats_.dots).copy() if anchor_self else stats_.dots[:, 0]
    if name == "tracin-cos":
        rows = len(enc) if anchor_self else 1
        g_sq = sum((t.double().reshape(rows, -1) ** 2).sum(1) for t in directions.values())
        g_norm = np.sqrt(g_sq.numpy())
        denom = np.sqrt(stats_.sq_norm) * g_norm
        dots = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return ckpt.lr * dots, stats_.loss


def _leave_one_out(
    loaded: LoadedModel, enc: list[Encoded], g_bar: dict[str, torch.Tensor], batch_tokens: int
) -> dict[str, torch.Tensor]:
    """Per anchor i, the mean gradient of the other anchors, (n ḡ − g_i)/(n − 1): name → (n, …).

    ``g_bar`` is the mean gradient of ``enc``; the g_i come from one batched pass of the same hook
    engine (n LoRA-sized directions in memory: the anchors are few).
    """
    n, pad = len(enc), loaded.tokenizer.pad_token_id
    out = {k: torch.empty((n, *v.shape), dtype=torch.float32) for k, v in g_bar.items()}
    with LoraHooks(loaded.model) as hooks:
        for batch in token_budget_batches(enc, batch_tokens, pad):
            for _, block, g in hooks.backward(batch).blocks():
                out[block.name][batch.indices] = g
    for k, v in g_bar.items():
        out[k] = ((n * v.double() - out[k].double()) / (n - 1)).float()
    return out
