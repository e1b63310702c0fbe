"""FedDQC's quality-aware hierarchical training (``quality.curriculum = stages:K[:once]``).

The kept samples are trained in K stages, from high to low quality (FedDQC, Algorithm 1, with its
off-by-one fixed: stage k of K takes 1 / (K − k + 1) of what is left, so the last takes the rest).

- Rounds: the run's rounds are split as evenly as integers allow: absolute round r (1..R) belongs
  to stage floor((r − 1) · K / R) (0-based). A run needs at least K rounds.
- ``stages:K``: at the first round of each stage the client re-scores its remaining kept samples
  (those no earlier stage trained on) with the current global adapter, the run's scorer and its
  settings, and takes the best share of them. FedDQC re-applies its threshold too; fedqc does not:
  τ was set on the initial model's scale, which training moves.
- ``stages:K:once``: the ranking comes from the quality round's scores (FedDQC's released code).

The client picks its stage subset itself, by rank: no score, no subset and no new count leaves it
(the training reply keeps the kept count it reported as its weight, about K times its stage's size
for every client alike).
"""

from __future__ import annotations

import numpy as np

from fedqc.errors import FedqcError


def parse_curriculum(value: str) -> tuple[int, bool] | None:
    """None for ``off``; else (K, once) of ``stages:K[:once]`` as config.py checked it."""
    if value == "off":
        return None
    _, k, *once = value.split(":")
    return int(k), bool(once)


def stage_of(absolute_round: int, rounds: int, stages: int) -> int:
    """The 0-based stage of an absolute round (1..rounds)."""
    return (absolute_round - 1) * stages // rounds


def is_stage_start(absolute_round: int, rounds: int, stages: int) -> bool:
    """True for the first round of its stage (where the client re-scores and picks)."""
    s = stage_of(absolute_round, rounds, stages)
    return absolute_round == 1 or stage_of(absolute_round - 1, rounds, stages) != s


def pick(scores: np.ndarray, remaining: list[int], stage: int, stages: int) -> list[int]:
    """The best floor(|remaining| / (stages − stage)) of ``remaining`` (indices into ``scores``,
    oriented: higher is better; non-finite last, ties by index); the last stage takes all."""
    left = stages - stage
    if left <= 1:
        return sorted(remaining)
    values = np.array([scores[i] for i in remaining], dtype=np.float64)
    values[~np.isfinite(values)] = -np.inf
    order = np.lexsort((np.array(remaining), -values))  # descending score, then index
    return sorted(remaining[i] for i in order[: len(remaining) // left])


def check_curriculum(value: str, rounds: int, checkpoint_scorer: bool) -> None:
    """Stop on a curriculum the run cannot follow (one line, before the run)."""
    parsed = parse_curriculum(value)
    if parsed is None:
        return
    stages, once = parsed
    if rounds < stages:
        raise FedqcError(
            f"quality.curriculum={value} needs train.rounds ≥ {stages} (one round per stage at "
            f"least), got {rounds}"
        )
    if checkpoint_scorer and not once:
        raise FedqcError(
            f"quality.curriculum={value} re-scores with the global adapter, which a checkpoint "
            f"scorer does not (it scores at its warm-up checkpoints); use stages:{stages}:once"
        )
