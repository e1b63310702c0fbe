"""Few-shot scoring: the first K anchors, shown in context before every sample a forward scorer
scores (``quality.shots`` = K).

With K whole anchors (prompt, response, end of sequence) in front, the model knows the task's answer
format before it reads a sample. On the demo's GSM8K pool (SmolLM2-135M) the clean responses'
end-of-sequence NLL falls from a median of 5.45 nats zero-shot to 0.02 with 2 shots, so end-loss
tells a cut answer from a whole one almost perfectly (AUC 0.987 → 1.000).

The demonstrations are the server's anchors, never a client's data: clients get their token ids
with the query. An anchor among the demonstrations is scored with the next anchor in its place, so
no sample ever sees itself in context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fedqc.data.encoding import Encoded
from fedqc.errors import FedqcError

log = logging.getLogger(__name__)


def require_anchors(count: int, shots: int, leave_one_out: bool) -> None:
    """Refuse an anchor set too small for ``shots`` demonstrations (one more when the anchors are
    scored themselves, each with the next anchor in its own place)."""
    need = shots + leave_one_out
    if count < need:
        raise FedqcError(
            f"quality.shots = {shots} needs at least {need} anchors, but the anchor set has "
            f"{count}; lower quality.shots or add anchors"
        )


def demonstrations(
    anchors: Sequence[Encoded], shots: int, skip: int | None = None
) -> tuple[int, ...]:
    """The token ids of the first ``shots`` anchors, in order, leaving out anchor ``skip``."""
    require_anchors(len(anchors), shots, skip is not None)
    chosen = [a for j, a in enumerate(anchors) if j != skip][:shots]
    return tuple(t for a in chosen for t in a.input_ids)


def anchor_prefixes(anchors: Sequence[Encoded], shots: int) -> list[tuple[int, ...]]:
    """Each anchor's prefix: the demonstrations, with the anchor itself replaced by the next one."""
    if shots == 0:
        return [()] * len(anchors)
    return [demonstrations(anchors, shots, j if j < shots else None) for j in range(len(anchors))]


def warn_if_cut(anchors: Sequence[Encoded], shots: int, max_length: int) -> None:
    """Log the demonstrations (the first ``shots`` anchors, and the next one in their place) that
    were cut at the maximum length: they are shown without their end."""
    cut = [j for j, a in enumerate(anchors[: shots + 1] if shots else []) if a.truncated]
    if cut:
        log.warning(
            "demonstration anchors %s are longer than model.max-length = %d: shown cut, without "
            "their end; raise model.max-length or put whole anchors first",
            cut,
            max_length,
        )
