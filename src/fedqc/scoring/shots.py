"""Few-shot scoring: the first K whole anchors, shown in context before every sample a forward
scorer scores (``quality.shots`` = K).

With K whole anchors (prompt, response, end of sequence) in front, the model knows the task's answer
format before it reads a sample. On the demo's GSM8K pool (SmolLM2-135M) the clean responses'
end-of-sequence NLL falls from a median of 5.45 nats zero-shot to 0.02 with 2 shots, so end-loss
tells a cut answer from a whole one almost perfectly (AUC 0.987 → 1.000).

The demonstrations are the first K anchors that **fit whole**: an anchor fits when its whole
encoding (prompt, response and end of sequence) is at most ``model.max-length`` tokens, i.e. when
:func:`fedqc.data.encoding.encode` did not cut it. A cut anchor is passed over, never shown
without its end. When fewer than K fit, all those that fit are shown (none: zero-shot), and one
warning line says so. The prefix does not take room from the scored sample: each sample keeps its
own ``model.max-length`` budget, so a forward pass holds at most (K + 1) · ``model.max-length``
tokens, and the scorer refuses, in one line, a prefix and sample longer than the model's positions.

The demonstrations are the server's anchors, never a client's data: clients get their token ids
with the query. An anchor among the demonstrations is scored with the next anchor that fits whole
in its place (with one demonstration fewer when there is none), so no sample ever sees itself in
context. The server, the clients (through the
query's prefix), ``fedqc score`` and the bench all take them from :func:`demonstrations` and
:func:`anchor_prefixes`.
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


def demonstration_anchors(anchors: Sequence[Encoded], shots: int) -> list[int]:
    """Positions of the first ``shots`` + 1 anchors that fit whole (fewer when fewer fit): the
    demonstrations, then the one that takes the place of a demonstration scored itself."""
    return [j for j, a in enumerate(anchors) if not a.truncated][: shots + 1]


def demonstrations(
    anchors: Sequence[Encoded], shots: int, skip: int | None = None
) -> tuple[int, ...]:
    """The token ids of the first ``shots`` anchors that fit whole, in order, leaving out anchor
    ``skip``."""
    require_anchors(len(anchors), shots, skip is not None)
    chosen = [j for j in demonstration_anchors(anchors, shots) if j != skip][:shots]
    return tuple(t for j in chosen for t in anchors[j].input_ids)


def anchor_prefixes(anchors: Sequence[Encoded], shots: int) -> list[tuple[int, ...]]:
    """Each anchor's prefix: the demonstrations, with the anchor itself replaced by the next one
    that fits whole."""
    if shots == 0:
        return [()] * len(anchors)
    return [demonstrations(anchors, shots, j) for j in range(len(anchors))]


def log_demonstrations(anchors: Sequence[Encoded], shots: int, max_length: int) -> None:
    """Log which anchors are the demonstrations and which cut ones were passed over; warn, in one
    line, when fewer than ``shots`` fit whole."""
    if not shots:
        return
    chosen = demonstration_anchors(anchors, shots)[:shots]
    if len(chosen) < shots:
        log.warning(
            "only %d of the %d anchors fit whole in model.max-length = %d (prompt, response and "
            "end of sequence): %d demonstrations instead of quality.shots = %d; raise "
            "model.max-length or add shorter anchors",
            len(chosen),
            len(anchors),
            max_length,
            len(chosen),
            shots,
        )
    end = chosen[-1] if len(chosen) == shots else len(anchors)
    passed = [j for j in range(end) if anchors[j].truncated]
    log.info(
        "demonstrations: anchors %s%s",
        chosen,
        f"; anchors {passed}, longer than model.max-length = {max_length}, passed over"
        if passed
        else "",
    )
