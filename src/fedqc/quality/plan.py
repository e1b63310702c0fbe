"""The anchor plan: what the server makes of its trusted anchors before any client scores.

:func:`plan_from_anchors` is the one place that turns the anchors into

- the scorer, an ensemble calibrated on the anchors (:class:`fedqc.scoring.ensemble.Calibration`);
- the few-shot prefix: the first ``shots`` anchors' token ids, shown before every client sample;
- the anchors' own scores (each anchor with the demonstrations, itself replaced by the next one);
- τ on the oriented scale (None for ``drop-fraction``, and for ``mixture``, whose τ is fitted to
  the clients' histograms over the plan's bin edges) and the guarantee in words.

`fedqc run`'s server and :class:`fedqc.filter.QualityFilter` (which `fedqc threshold`, `score
--plan` and `filter --plan` call) use it; threshold.json is its record (:func:`plan_record`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedqc.data.encoding import Encoded, encode_all
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import LoadedModel
from fedqc.quality.mixture import histogram_edges
from fedqc.quality.rules import Rule, global_threshold, guarantee
from fedqc.scoring.ensemble import Calibration, is_ensemble
from fedqc.scoring.scorers import (
    CheckpointScorer,
    Scorer,
    Scores,
    is_checkpoint_scorer,
    score_samples,
)
from fedqc.scoring.shots import anchor_prefixes, demonstrations, log_demonstrations

log = logging.getLogger(__name__)


def check_scoring_model(
    scorers: Sequence[str], curriculum: str, scoring: str, trained: str
) -> None:
    """A separate scoring model (quality.model) scores with its base weights only: it cannot run
    the checkpoint scorers (their checkpoints are the trained model's warm-up adapters), nor a
    curriculum that re-scores with the global adapter."""
    if scoring == trained:
        return
    for name in scorers:
        if is_checkpoint_scorer(name):
            raise FedqcError(
                f"scorer '{name}' scores at the trained model's warm-up checkpoints, so it cannot "
                f"score with quality.model = '{scoring}'; leave quality.model empty, or use a "
                "forward scorer (e.g. ppl, ifd, cond-prob)"
            )
    if curriculum.startswith("stages:") and not curriculum.endswith(":once"):
        raise FedqcError(
            f"quality.curriculum={curriculum} re-scores with the global adapter of '{trained}', "
            f"which quality.model = '{scoring}' cannot load; use {curriculum}:once"
        )


@dataclass(frozen=True)
class AnchorPlan:
    scorer: Scorer | CheckpointScorer  # an ensemble: calibrated on the anchors
    rule: Rule
    shots: int
    prefix: tuple[int, ...]  # the demonstrations' token ids, in front of every client sample
    anchor_scores: Scores | None  # None where the rule needs no anchors
    tau: float | None  # oriented; None: drop-fraction, or mixture before the clients' histograms
    guarantee: str
    edges: list[float] | None = None  # mixture: the histogram bins' edges

    @property
    def anchor_oriented(self) -> np.ndarray | None:
        return None if self.anchor_scores is None else self.anchor_scores.oriented

    @property
    def calibration(self) -> list[float] | None:
        return getattr(self.scorer, "calibration", None)

    def record(self) -> dict:
        """threshold.json's fields of the plan."""
        a = self.anchor_scores
        return plan_record(
            self.scorer,
            self.rule,
            self.shots,
            self.prefix,
            self.tau,
            self.guarantee,
            None if a is None else a.raw.tolist(),
            None if a is None else a.truncated,
        ) | ({"edges": self.edges} if self.edges is not None else {})


def plan_record(
    scorer: Scorer | CheckpointScorer,
    rule: Rule,
    shots: int,
    prefix: Sequence[int],
    tau: float | None,
    guarantee: str,
    anchor_raw: Sequence[float | None] | None,
    anchors_truncated: int | None,
) -> dict:
    """The plan's fields of threshold.json: τ oriented, and in the scorer's units (derived)."""
    return {
        "scorer": scorer.name,
        "direction": "higher is better" if scorer.direction > 0 else "lower is better",
        "rule": str(rule),
        "shots": shots,
        "guarantee": guarantee,
        "tau": tau,
        "tau_raw": None if tau is None else scorer.raw(tau),
        "anchor_scores": None if anchor_raw is None else [_finite(x) for x in anchor_raw],
        "anchors_truncated": anchors_truncated,
        "calibration": getattr(scorer, "calibration", None),
        "prefix": list(prefix),
    }


def plan_shots(scorer: str, shots: int, has_anchors: bool) -> int:
    """How many anchors a scorer shows in context: none for a checkpoint scorer, and none without
    an anchor set (said in the log)."""
    if is_checkpoint_scorer(scorer) or not shots:
        return 0
    if not has_anchors:
        log.info("no anchor set (data.anchors): forward scores are zero-shot, not %d-shot", shots)
        return 0
    return shots


def encode_anchors(
    loaded: LoadedModel, anchors: Sequence[Sample], shots: int, max_length: int
) -> list[Encoded]:
    """The anchors encoded for scoring and as demonstrations (logging the demonstrations cut at
    ``max_length``)."""
    encoded = encode_all(loaded.tokenizer, list(anchors), max_length)
    log_demonstrations(encoded, shots, max_length)
    return encoded


def few_shot_prefix(
    loaded: LoadedModel, anchors: Sequence[Sample], shots: int, max_length: int
) -> tuple[int, ...]:
    """The first ``shots`` anchors' token ids, shown before every client sample."""
    if not shots:
        return ()
    return demonstrations(encode_anchors(loaded, anchors, shots, max_length), shots)


def plan_from_anchors(
    loaded: LoadedModel,
    anchors: Sequence[Sample] | None,
    scorer: Scorer | CheckpointScorer,
    rule: Rule,
    *,
    shots: int,
    max_length: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    anchor_scores: Scores | None = None,
) -> AnchorPlan:
    """The plan of ``anchors`` (None: a run without anchors, for a rule that needs none).

    A forward scorer scores the anchors here when the rule needs them, ``shots``-shot;
    ``anchor_scores``: the anchors' scores a checkpoint scorer computed at its warm-up checkpoints.
    """
    prefix: tuple[int, ...] = ()
    forward = not is_checkpoint_scorer(scorer.name)
    if forward and (rule.needs_anchors or shots):
        if anchors is None:
            raise FedqcError(f"rule '{rule}' needs an anchor set: set data.anchors=FILE")
        encoded = encode_anchors(loaded, anchors, shots, max_length)
        prefix = demonstrations(encoded, shots) if shots else ()
        if rule.needs_anchors:
            anchor_scores = score_samples(
                loaded,
                list(anchors),
                scorer,
                max_length,
                batch_tokens,
                on_batch=on_batch,
                prefixes=anchor_prefixes(encoded, shots),
            )
    if anchor_scores is not None and anchor_scores.truncated:
        log.warning(
            "%d of %d anchors are longer than model.max-length = %d: scored truncated",
            anchor_scores.truncated,
            len(anchor_scores.raw),
            max_length,
        )
    return plan_from_scores(scorer, rule, anchor_scores, shots, prefix)


def plan_from_scores(
    scorer: Scorer | CheckpointScorer,
    rule: Rule,
    anchor_scores: Scores | None,
    shots: int = 0,
    prefix: tuple[int, ...] = (),
) -> AnchorPlan:
    """The plan from the anchors' scores: an ensemble calibrated on them, τ and its guarantee."""
    if anchor_scores is not None and is_ensemble(scorer.name):
        a = anchor_scores
        calibration = Calibration(scorer.name).fit(a.cond_loss, a.bare_loss, a.end_loss)
        scorer = calibration.scorer()
        raw = calibration.transform(a.cond_loss, a.bare_loss, a.end_loss)
        anchor_scores = dataclasses.replace(a, raw=raw, oriented=scorer.orient(raw))
    oriented = None if anchor_scores is None else anchor_scores.oriented
    tau, edges = None, None
    if rule.needs_histograms:
        edges = histogram_edges(oriented).tolist()
    else:
        tau = global_threshold(rule, scorer, oriented)
    if tau is not None:
        log.info("phase 1: τ = %.5g (%s, raw %s = %.5g)", tau, rule, scorer.name, scorer.raw(tau))
    return AnchorPlan(
        scorer, rule, shots, tuple(prefix), anchor_scores, tau, guarantee(rule, oriented), edges
    )


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
