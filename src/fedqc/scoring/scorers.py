"""Every scorer by name, and forward scoring of samples.

The forward-only scorers' formulas are in :mod:`fedqc.scoring.formulas`, their anchor-calibrated
ensembles in :mod:`fedqc.scoring.ensemble`. The scorers computed at warm-up checkpoints (gradient,
influence and in-context scores, ``fedqc.scoring.checkpointed``) declare their directions here, in
``CHECKPOINT_SCORERS``. Thresholds and filters use the *oriented* score (direction × raw score),
where higher always means better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.likelihood import response_losses, response_nll
from fedqc.models.loading import LoadedModel
from fedqc.scoring.ensemble import components, ensemble_scorer
from fedqc.scoring.formulas import (
    ENSEMBLE_PREFIXES,
    HIGHER_IS_BETTER,
    SCORERS,
    Directed,
    Scorer,
    by_name,
)


@dataclass(frozen=True)
class CheckpointScorer(Directed):
    """A scorer computed at the warm-up checkpoints (``fedqc.scoring.checkpointed``)."""

    needs: str  # "gradients" (anchor directions), "datainf", "prefix" (icl) or "tasks" (nuggets)
    description: str


CHECKPOINT_SCORERS: dict[str, CheckpointScorer] = by_name(
    [
        CheckpointScorer(
            "tracin",
            HIGHER_IS_BETTER,
            "gradients",
            "TracIn: (1/K) Σ_k η_k ⟨g_k(z), ḡ_k⟩, ḡ_k the mean anchor gradient at checkpoint k",
        ),
        CheckpointScorer(
            "tracin-cos",
            HIGHER_IS_BETTER,
            "gradients",
            "TracIn with cosines: (1/K) Σ_k η_k cos(g_k(z), ḡ_k) (length-robust, as in LESS)",
        ),
        CheckpointScorer(
            "clues",
            HIGHER_IS_BETTER,
            "gradients",
            "CLUES/LESS: (1/K) Σ_k η_k ⟨Γ_k(z), ḡ_k⟩, Γ = m̃/√(ṽ+ε) with the local Adam moments",
        ),
        CheckpointScorer(
            "datainf",
            HIGHER_IS_BETTER,
            "datainf",
            "DataInf closed form per LoRA block, v = mean anchor gradient; minus the influence",
        ),
        CheckpointScorer(
            "icl",
            HIGHER_IS_BETTER,
            "prefix",
            "in-context probe ℓ(r|q) − ℓ(r|anchors, q), the anchors as a cached prompt prefix",
        ),
        CheckpointScorer(
            "nuggets",
            HIGHER_IS_BETTER,
            "tasks",
            "NUGGETS: share of anchor tasks whose answer loss drops with z as one-shot demo (slow)",
        ),
    ]
)


def get_checkpoint_scorer(name: str) -> CheckpointScorer:
    if name not in CHECKPOINT_SCORERS:
        raise FedqcError(
            f"unknown checkpoint scorer '{name}'; choose one of: {', '.join(CHECKPOINT_SCORERS)}"
        )
    return CHECKPOINT_SCORERS[name]


def is_checkpoint_scorer(name: str) -> bool:
    return name in CHECKPOINT_SCORERS


def any_scorer(name: str) -> Scorer | CheckpointScorer:
    """A forward-only scorer, an ensemble (unit calibration) or a checkpoint scorer, by name."""
    if name in CHECKPOINT_SCORERS:
        return CHECKPOINT_SCORERS[name]
    if name in SCORERS or name.startswith(ENSEMBLE_PREFIXES):
        return get_scorer(name)
    raise FedqcError(
        f"unknown scorer '{name}'; choose one of: {', '.join([*SCORERS, *CHECKPOINT_SCORERS])}, "
        "or ensemble:a+b"
    )


def batch_tokens_for(scorer: str, batch_tokens: int, backward_batch_tokens: int) -> int:
    """The batch budget a scorer runs with: the backward budget for the gradient scorers."""
    checkpoint = CHECKPOINT_SCORERS.get(scorer)
    if checkpoint is not None and checkpoint.needs in ("gradients", "datainf"):
        return backward_batch_tokens
    return batch_tokens


def get_scorer(name: str, calibration: list[float] | None = None) -> Scorer:
    """A scorer by name; an ensemble (``ensemble:a+b``, ``ensemble-min:a+b``) takes its anchor
    calibration (unit scales if None)."""
    if name.startswith(ENSEMBLE_PREFIXES):
        return ensemble_scorer(name, calibration or [0.0, 1.0] * len(components(name)))
    if name not in SCORERS:
        raise FedqcError(f"unknown scorer '{name}'; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name]


@dataclass
class Scores:
    raw: np.ndarray
    oriented: np.ndarray
    truncated: int  # samples cut to the maximum length (scored on what was kept)
    cond_loss: np.ndarray  # ℓ(r|q) per sample
    bare_loss: np.ndarray  # ℓ(r) per sample (NaN when the scorer does not need it)
    end_loss: np.ndarray | None = None  # ℓ_end per sample (NaN where truncated)


def score_samples(
    loaded: LoadedModel,
    samples: list[Sample],
    scorer: Scorer,
    max_length: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> Scores:
    """Score samples on the model's current adapter. ``on_batch`` gets the rows done per batch;
    ``prefixes``: per sample, the demonstrations' token ids shown in front of it
    (:mod:`fedqc.scoring.shots`)."""
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    cond = encode_all(tok, samples, max_length)
    sums, counts, end_loss = response_losses(
        loaded.model, cond, pad, batch_tokens, on_batch, prefixes
    )
    cond_loss = sums / np.maximum(counts, 1)
    bare_loss = np.full_like(cond_loss, np.nan)
    if scorer.needs_bare:
        bare = encode_all(tok, samples, max_length, bare=True)
        bsums, bcounts = response_nll(loaded.model, bare, pad, batch_tokens, on_batch, prefixes)
        bare_loss = bsums / np.maximum(bcounts, 1)
    with np.errstate(all="ignore"):
        raw = scorer.formula(cond_loss, bare_loss, end_loss).astype(np.float64)
    truncated = sum(e.truncated for e in cond)
    return Scores(raw, scorer.orient(raw), truncated, cond_loss, bare_loss, end_loss)
