"""A client-side guard: every reply is checked against the protocol before it leaves the node.

A reply may hold only the records the protocol names: ``stats`` and ``metrics`` as MetricRecords of
scalar numbers under known keys, and ``arrays`` as the LoRA adapter. The one list allowed is
``stats.histogram`` (the ``mixture`` rule): exactly ``HISTOGRAM_BINS`` non-negative integers.
Strings, other lists, unknown keys or unknown records (where text, token ids or per-sample scores
could hide) stop the reply.

A failure on the node (an exception in the ClientApp, or a reply the guard stops) leaves it as an
error reply with a generic reason: Flower would otherwise send the exception's text, which can
quote data. The details go to the node's own log.

Optional differential privacy for counts: :func:`noisy_count` adds Laplace(1/ε) noise,
:func:`noisy_histogram` the same per bin.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord
from flwr.common.constant import ErrorCode

from fedqc.federation.protocol import (
    EVALUATE_METRICS,
    HISTOGRAM_BINS,
    HISTOGRAM_KEY,
    HISTOGRAM_REPLY,
    REPLY_COUNTS,
    TRAIN_METRICS,
)

log = logging.getLogger(__name__)

ALLOWED_METRICS = {
    "stats": set(REPLY_COUNTS) | set(HISTOGRAM_REPLY),
    "metrics": set(TRAIN_METRICS + EVALUATE_METRICS),
}


class PrivacyViolation(RuntimeError):
    """A reply would carry more than counts, aggregate metrics and adapter arrays."""


def check_reply(content, adapter_keys: set[str] | None = None) -> None:
    """Raise PrivacyViolation unless ``content`` (a RecordDict) is within the protocol."""
    for name, record in content.items():
        if name == "arrays":
            if not isinstance(record, ArrayRecord):
                raise PrivacyViolation(f"'arrays' must be an ArrayRecord, got {type(record)}")
            bad = [k for k in record if "lora_" not in k]
            if bad or (adapter_keys is not None and set(record) != adapter_keys):
                raise PrivacyViolation(f"'arrays' holds non-adapter entries: {bad[:3]}")
        elif name in ALLOWED_METRICS:
            if not isinstance(record, MetricRecord):
                raise PrivacyViolation(f"'{name}' must be a MetricRecord, got {type(record)}")
            for key, value in record.items():
                if key not in ALLOWED_METRICS[name]:
                    raise PrivacyViolation(f"'{name}' holds an unknown key '{key}'")
                if name == "stats" and key == HISTOGRAM_KEY:
                    check_histogram(value)
                elif isinstance(value, list | bool) or not isinstance(value, int | float):
                    raise PrivacyViolation(f"'{name}.{key}' must be one number")
        else:
            raise PrivacyViolation(f"reply holds an unknown record '{name}'")


def check_histogram(value) -> None:
    """A histogram over the server's bins: HISTOGRAM_BINS non-negative integers, nothing else."""
    if not isinstance(value, list) or len(value) != HISTOGRAM_BINS:
        raise PrivacyViolation(f"'stats.{HISTOGRAM_KEY}' must be a list of {HISTOGRAM_BINS} counts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise PrivacyViolation(f"'stats.{HISTOGRAM_KEY}' must hold non-negative integers only")


def outgoing_guard(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower mod: let a reply leave the node only if it passes :func:`check_reply`.

    Any failure becomes an error reply whose reason names only the exception type. A site that
    sets ``--node-config audit-log=FILE`` gets a line in FILE for every message it sends.
    """
    kind = msg.metadata.message_type
    try:
        reply = call_next(msg, context)
        if not reply.has_error():
            check_reply(reply.content)
    except Exception as exc:  # the node reports that it failed, never what the failure says
        log.exception("%s failed on this node; the server is told only the exception type", kind)
        reply = Message(error_for(exc), reply_to=msg)
    if "audit-log" in context.node_config:
        write_audit(str(context.node_config["audit-log"]), msg, reply)
    return reply


def error_for(exc: BaseException) -> Error:
    """The error a node sends for a failure: a code and the exception type, no message text."""
    return Error(
        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        reason=f"{type(exc).__name__} on the node (details in the node's log)",
    )


def noisy_count(value: int, epsilon: float, rng: np.random.Generator) -> int:
    """``value`` + Laplace(1/ε) noise, rounded and clipped at 0 (ε-DP for a count of sensitivity 1).

    ε = 0 means no noise. Rounding and clipping are post-processing: they cost no privacy.
    """
    if epsilon <= 0:
        return int(value)
    return max(0, int(round(value + rng.laplace(0.0, 1.0 / epsilon))))


def noisy_histogram(counts, epsilon: float, rng: np.random.Generator) -> list[int]:
    """Laplace(1/ε) noise on every bin, rounded and clipped at 0.

    One sample adds 1 to exactly one bin (L1 sensitivity 1), so the whole histogram is ε-DP.
    """
    return [noisy_count(int(c), epsilon, rng) for c in counts]


class AuditLog:
    """Flower mod: append a description of every message this node sends to a JSON-lines file.

    Each line names the message type and, per record, its kind and entries: metric keys with their
    values, array keys with their shapes and dtypes (not their contents).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        write_audit(self.path, msg, reply)
        return reply


def write_audit(path: str, msg: Message, reply: Message) -> None:
    """Append one line describing ``reply`` (sent in answer to ``msg``) to ``path``."""
    entry: dict = {
        "message_type": msg.metadata.message_type,
        "error": reply.has_error(),
        "reason": reply.error.reason if reply.has_error() else None,
        "records": {},
    }
    if not reply.has_error():
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                body = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}
            else:
                body = {k: v if isinstance(v, int | float) else repr(v) for k, v in record.items()}
            entry["records"][name] = {"kind": type(record).__name__, "entries": body}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
