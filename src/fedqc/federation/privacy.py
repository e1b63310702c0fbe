"""A client-side guard: every reply is checked against the protocol before it leaves the node.

A reply may hold only the records the protocol names: ``stats`` and ``metrics`` as MetricRecords of
scalar numbers under known keys, and ``arrays`` as the LoRA adapter. Strings, lists, unknown keys
or unknown records (where text, token ids or per-sample scores could hide) stop the reply.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message, MetricRecord

from fedqc.federation.protocol import EVALUATE_METRICS, REPLY_COUNTS, TRAIN_METRICS

ALLOWED_METRICS = {"stats": set(REPLY_COUNTS), "metrics": set(TRAIN_METRICS + EVALUATE_METRICS)}


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
                if isinstance(value, list) or not isinstance(value, int | float):
                    raise PrivacyViolation(f"'{name}.{key}' must be one number")
        else:
            raise PrivacyViolation(f"reply holds an unknown record '{name}'")


def outgoing_guard(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower mod: let a reply leave the node only if it passes :func:`check_reply`."""
    reply = call_next(msg, context)
    if not reply.has_error():
        check_reply(reply.content)
    return reply


class AuditLog:
    """Flower mod: append a description of every message this node sends to a JSON-lines file.

    Each line names the message type and, per record, its kind and entries: metric keys with their
    values, array keys with their shapes and dtypes (not their contents).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg: Message, context: Context, call_next: Callable) -> Message:
        import json

        reply = call_next(msg, context)
        entry: dict = {
            "message_type": msg.metadata.message_type,
            "error": reply.has_error(),
            "records": {},
        }
        if not reply.has_error():
            for name, record in reply.content.items():
                if isinstance(record, ArrayRecord):
                    body = {
                        k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()
                    }
                else:
                    body = {
                        k: v if isinstance(v, int | float) else repr(v) for k, v in record.items()
                    }
                entry["records"][name] = {"kind": type(record).__name__, "entries": body}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply
