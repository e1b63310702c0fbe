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

from collections.abc import Sequence

from fedqc.data.encoding import Encoded
from fedqc.errors import FedqcError


def demonstrations(
    anchors: Sequence[Encoded], shots: int, skip: int | None = None
) -> tuple[int, ...]:
    """The token ids of the first ``shots`` anchors, in order, leaving out anchor ``skip``."""
    chosen = [a for j, a in enumerate(anchors) if j != skip][:shots]
    if len(chosen) < shots:
        need = shots + (skip is not None)
        raise FedqcError(
            f"quality.shots = {shots} needs at least {need} anchors, but the anchor set has "
            f"{len(anchors)}; lower quality.shots or add anchors"
        )
    return tuple(t for a in chosen for t in a.input_ids)


def anchor_prefixes(anchors: Sequence[Encoded], shots: int) -> list[tuple[int, ...]]:
    """Each anchor's prefix: the demonstrations, with the anchor itself replaced by the next one."""
    if shots == 0:
        return [()] * len(anchors)
    return [demonstrations(anchors, shots, j if j < shots else None) for j in range(len(anchors))]
