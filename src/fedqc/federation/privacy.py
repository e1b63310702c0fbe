"""A client-side guard: every reply is checked against the protocol before it leaves the node.

A reply may hold only the records the protocol names: ``stats`` and ``metrics`` as MetricRecords of
scalar numbers under known keys, and ``arrays`` as this node's own LoRA adapter: exactly its
parameter names, shapes and dtypes, taken from the node's model (never from the message), as
finite numbers. The one list allowed is ``stats.histogram`` (the ``mixture`` rule): exactly
``HISTOGRAM_BINS`` non-negative integers. Strings, other lists, unknown keys or unknown records
(where text, token ids or per-sample scores could hide) stop the reply.

A failure on the node (an exception in the ClientApp, or a reply the guard stops) leaves it as an
error reply whose reason is one of the protocol's fixed ``ERROR_REASONS``: Flower would otherwise
send the exception's text, which can quote data. An error reply with any other reason is replaced
the same way. The details go to the node's own log.

Under ``quality.secure-sum`` the data replies hold only the masked vector and the partition id
(:func:`check_masked`), and the secure sum's own replies (keys, encrypted shares, unmasking shares)
exactly the byte strings of the sizes Flower's primitives give (:func:`check_secure_reply`).

The ``mixture`` rule's bin edges are checked on arrival (:func:`check_edges`): the server may not
ask for a histogram finer than ``MIN_BIN_SHARE`` of the edges' span per bin.

Optional differential privacy for counts: :func:`noisy_count` adds Laplace(1/ε) noise,
:func:`noisy_histogram` the same per bin; :func:`privacy_budget` adds up what a run spends.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.common.constant import ErrorCode, SType

from fedqc.errors import FedqcError
from fedqc.federation.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    COUNTS,
    DP_RELEASES,
    DP_RELEASES_MIXTURE,
    ERROR_REASONS,
    HISTOGRAM_BINS,
    HISTOGRAM_KEY,
    HISTOGRAM_VECTOR_LENGTH,
    MASK_BITS,
    MASKED_KEY,
    METRIC_REPLIES,
    MIN_BIN_SHARE,
    QUERY_SCORE,
    REASON_EDGES,
    REASON_FAILED,
    REASON_GUARD,
    REASON_INPUT,
    SECURE_KEYS,
    SECURE_MESSAGES,
    SECURE_RECORD,
    SECURE_REPLIES,
    SECURE_SHARES,
    TRAIN_WARMUP,
    HistogramReply,
    KeysReply,
    MaskedReply,
    QueryConfig,
    SharesReply,
    SharesRequest,
    UnmaskReply,
    UnmaskRequest,
)
from fedqc.federation.secure_sum import (
    CIPHERTEXT_BYTES,
    SEED_SHARE_BYTES,
    SK_SHARE_BYTES,
    SecureSumError,
    check_public_key,
)

log = logging.getLogger(__name__)

# The MetricRecords a reply may hold, each with the keys of the messages that travel in it.
ALLOWED_METRICS: dict[str, set[str]] = {r.RECORD: set() for r in METRIC_REPLIES}
for _reply in METRIC_REPLIES:
    ALLOWED_METRICS[_reply.RECORD] |= set(_reply.record_keys())
# This node's adapter as the guard expects it: parameter name -> (shape, numpy dtype name).
AdapterSpec = Mapping[str, tuple[tuple[int, ...], str]]


class PrivacyViolation(RuntimeError):
    """A reply would carry more than counts, aggregate metrics and this node's adapter arrays."""


class EdgesRefused(ValueError):
    """The server's bin edges are malformed, or finer than a client accepts."""


def adapter_spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The names, shapes and dtypes of an adapter state (``LoadedModel.initial_adapter``)."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def check_reply(
    content, adapter: AdapterSpec | None = None, masked_length: int | None = None
) -> None:
    """Raise PrivacyViolation unless ``content`` (a RecordDict) is within the protocol.

    ``adapter`` is this node's own adapter; without it a reply may hold no arrays.
    ``masked_length``: the request asked for a secure sum (``quality.secure-sum``), so ``stats``
    must hold exactly a masked vector of this length and the partition id; without it a reply
    may hold no masked vector.
    """
    if masked_length is not None:
        check_masked(content, masked_length)
        return
    for name, record in content.items():
        if name == ARRAYS_RECORD:
            if not isinstance(record, ArrayRecord):
                raise PrivacyViolation(f"'arrays' must be an ArrayRecord, got {type(record)}")
            check_arrays(record, adapter)
        elif name in ALLOWED_METRICS:
            if not isinstance(record, MetricRecord):
                raise PrivacyViolation(f"'{name}' must be a MetricRecord, got {type(record)}")
            for key, value in record.items():
                if key not in ALLOWED_METRICS[name]:
                    raise PrivacyViolation(f"'{name}' holds an unknown key '{key}'")
                if key == MASKED_KEY:
                    raise PrivacyViolation(f"'{name}.{key}' in a reply that is not a secure sum")
                if name == HistogramReply.RECORD and key == HISTOGRAM_KEY:
                    check_histogram(value)
                elif isinstance(value, list | bool) or not isinstance(value, int | float):
                    raise PrivacyViolation(f"'{name}.{key}' must be one number")
        else:
            raise PrivacyViolation(f"reply holds an unknown record '{name}'")


def check_arrays(record: ArrayRecord, adapter: AdapterSpec | None) -> None:
    """Exactly the adapter's names, each with its shape and dtype, as finite numbers."""
    if adapter is None:
        raise PrivacyViolation("'arrays' in a reply that may not carry the adapter")
    if set(record) != set(adapter):
        unknown, missing = sorted(set(record) - set(adapter)), sorted(set(adapter) - set(record))
        raise PrivacyViolation(
            f"'arrays' must hold exactly this node's adapter: {len(unknown)} unknown "
            f"({unknown[:1]}), {len(missing)} missing ({missing[:1]})"
        )
    for key, array in record.items():
        shape, dtype = adapter[key]
        if array.stype != SType.NUMPY or array.dtype != dtype or tuple(array.shape) != shape:
            raise PrivacyViolation(
                f"'arrays.{key}' is {array.dtype} {tuple(array.shape)}, this node's adapter "
                f"has {dtype} {shape}"
            )
        try:
            values = array.numpy()
        except Exception:
            raise PrivacyViolation(f"'arrays.{key}' does not decode as an array") from None
        # The bytes must be exactly the array's own serialisation: nothing after it, no other
        # header, and values that are numbers (a NaN's spare bits could carry data).
        if Array.from_numpy_ndarray(values).data != array.data:
            raise PrivacyViolation(f"'arrays.{key}' holds bytes beyond its {dtype} {shape} values")
        if values.dtype != np.dtype(dtype) or values.shape != shape:
            raise PrivacyViolation(f"'arrays.{key}' decodes to {values.dtype} {values.shape}")
        if not np.isfinite(values).all():
            raise PrivacyViolation(f"'arrays.{key}' holds non-finite values")


def check_histogram(value) -> None:
    """A histogram over the server's bins: HISTOGRAM_BINS non-negative integers, nothing else."""
    if not isinstance(value, list) or len(value) != HISTOGRAM_BINS:
        raise PrivacyViolation(f"'stats.{HISTOGRAM_KEY}' must be a list of {HISTOGRAM_BINS} counts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise PrivacyViolation(f"'stats.{HISTOGRAM_KEY}' must hold non-negative integers only")


def check_masked(content, length: int) -> None:
    """A secure sum's data reply: ``stats`` holds a masked vector of ``length`` integers in
    [0, 2^MASK_BITS) and the partition id, and the reply nothing else (no plaintext count)."""
    name = MaskedReply.RECORD
    if set(content) != {name} or not isinstance(content[name], MetricRecord):
        raise PrivacyViolation(f"a secure sum's reply must hold the '{name}' MetricRecord only")
    stats = content[name]
    if set(stats) != set(MaskedReply.record_keys()):
        raise PrivacyViolation(
            f"a secure sum's '{name}' must hold exactly {list(MaskedReply.record_keys())}"
        )
    pid = stats[MaskedReply.key("partition_id")]
    if isinstance(pid, list | bool) or not isinstance(pid, int | float):
        raise PrivacyViolation("'stats.partition-id' must be one number")
    vector = stats[MASKED_KEY]
    if not isinstance(vector, list) or len(vector) != length:
        raise PrivacyViolation(f"'stats.{MASKED_KEY}' must be a list of {length} integers")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << MASK_BITS for v in vector
    ):
        raise PrivacyViolation(f"'stats.{MASKED_KEY}' must hold integers in [0, 2^{MASK_BITS})")


def masked_length(kind: str, request) -> int | None:
    """The length of the masked vector a request asks for; None when it asks for no secure sum."""
    if SECURE_RECORD not in request:
        return None
    mixture = QueryConfig.key("edges") in request.get(CONFIG_RECORD, {})
    return HISTOGRAM_VECTOR_LENGTH if kind == QUERY_SCORE and mixture else len(COUNTS)


def check_secure_reply(kind: str, request, content) -> None:
    """A reply to a secure sum's own messages: one ConfigRecord SECURE_RECORD with exactly the
    keys of its step, each of the exact size the primitives give (fedqc.federation.secure_sum)."""
    if set(content) != {SECURE_RECORD} or not isinstance(content[SECURE_RECORD], ConfigRecord):
        raise PrivacyViolation(f"a {kind} reply must hold the '{SECURE_RECORD}' ConfigRecord only")
    record, asked = content[SECURE_RECORD], request.get(SECURE_RECORD, {})
    expected = set(SECURE_REPLIES[kind].record_keys())
    if set(record) != expected:
        raise PrivacyViolation(f"a {kind} reply must hold exactly {sorted(expected)}")
    if kind == SECURE_KEYS:
        try:
            for key in KeysReply.record_keys():
                check_public_key(record[key])
        except SecureSumError as exc:
            raise PrivacyViolation(f"{kind}: {exc}") from None
        return
    if kind == SECURE_SHARES:
        # what the client was asked (the handler read it already; no request: no slots)
        shares = SharesRequest.from_record(asked) if asked else SharesRequest(-1, [], [])
        own, tokens = shares.slot, record[SharesReply.key("ciphertexts")]
        sizes = [0 if j == own else CIPHERTEXT_BYTES for j in range(len(shares.pk1))]
        _check_bytes_list(kind, tokens, sizes)
        for j, token in enumerate(tokens):
            if j != own and not _is_fernet_token(token):
                raise PrivacyViolation(f"{kind}: ciphertext {j} is not a Fernet token")
        return
    unmask = UnmaskRequest.from_record(asked) if asked else UnmaskRequest([], [])
    sizes = [SEED_SHARE_BYTES] * len(unmask.active) + [SK_SHARE_BYTES] * len(unmask.dead)
    _check_bytes_list(kind, record[UnmaskReply.key("shares")], sizes)


def _check_bytes_list(kind: str, value, sizes: list[int]) -> None:
    if not isinstance(value, list) or len(value) != len(sizes):
        raise PrivacyViolation(f"{kind}: must be a list of {len(sizes)} byte strings")
    for v, size in zip(value, sizes, strict=True):
        if not isinstance(v, bytes) or len(v) != size:
            raise PrivacyViolation(f"{kind}: an entry is not {size} bytes")


def _is_fernet_token(token: bytes) -> bool:
    """Base64url of version byte 0x80, timestamp, IV, AES-CBC blocks and HMAC (the format)."""
    try:
        raw = base64.urlsafe_b64decode(token)
    except ValueError:
        return False
    return base64.urlsafe_b64encode(raw) == token and raw[:1] == b"\x80"


def check_edges(edges) -> np.ndarray:
    """The mixture rule's bin edges as a client accepts them, or EdgesRefused.

    HISTOGRAM_BINS + 1 finite numbers, strictly increasing, and every bin at least MIN_BIN_SHARE
    of the span (edges[-1] - edges[0]): the server chooses where the bins lie, but cannot split
    one score range finely while the others stay coarse. The check reads only the edges, never
    this node's data, so a refusal says nothing about the data.
    """
    if not isinstance(edges, list) or not all(
        isinstance(e, int | float) and not isinstance(e, bool) for e in edges
    ):
        raise EdgesRefused("the bin edges must be a list of numbers")
    if len(edges) != HISTOGRAM_BINS + 1:
        raise EdgesRefused(f"the server sent {len(edges)} bin edges, not {HISTOGRAM_BINS + 1}")
    e = np.asarray(edges, dtype=np.float64)
    if not np.isfinite(e).all():
        raise EdgesRefused("the bin edges must be finite")
    widths = np.diff(e)
    if not (widths > 0).all():
        raise EdgesRefused("the bin edges must be strictly increasing")
    span = float(e[-1] - e[0])
    if not math.isfinite(span) or widths.min() < MIN_BIN_SHARE * span:
        raise EdgesRefused(
            f"a bin of width {widths.min():.3g} is narrower than {MIN_BIN_SHARE:.4g} of the "
            f"edges' span {span:.3g}: finer than this node accepts"
        )
    return e


def reason_for(exc: BaseException) -> str:
    """The fixed reason an error reply carries for a failure (never the exception's text)."""
    if isinstance(exc, EdgesRefused):
        return REASON_EDGES
    if isinstance(exc, PrivacyViolation):
        return REASON_GUARD
    if isinstance(exc, FedqcError):
        return REASON_INPUT
    return REASON_FAILED


def error_for(exc: BaseException) -> Error:
    """The error a node sends for a failure: a code and one of the fixed reasons."""
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason_for(exc))


class OutgoingGuard:
    """Flower mod: let a reply leave the node only if it passes :func:`check_reply`.

    ``adapter_of(context)`` gives this node's own adapter (its names, shapes and dtypes), from
    its model; it is asked only for a train reply that holds arrays (no other reply may). Any
    failure becomes an error reply with a fixed reason (:func:`reason_for`); an error reply with
    any other reason or code is replaced the same way. A site that sets ``--node-config
    audit-log=FILE`` gets a line in FILE for every message it sends.
    """

    def __init__(self, adapter_of: Callable[[Context], AdapterSpec]) -> None:
        self.adapter_of = adapter_of

    def __call__(self, msg: Message, context: Context, call_next: Callable) -> Message:
        kind = msg.metadata.message_type
        try:
            reply = call_next(msg, context)
            if reply.has_error():
                check_error(reply.error)
            elif kind in SECURE_MESSAGES:  # a secure sum's keys, shares or unmasking shares
                check_secure_reply(kind, msg.content, reply.content)
            else:  # only a train reply (train, train.warmup) may carry the adapter
                trains = kind.split(".")[0] == MessageType.TRAIN and ARRAYS_RECORD in reply.content
                adapter = self.adapter_of(context) if trains else None
                check_reply(reply.content, adapter, masked_length(kind, msg.content))
        except PrivacyViolation as exc:  # one line: what was stopped (the node's own log)
            log.error("%s: reply stopped by the privacy guard: %s", kind, exc)
            reply = Message(error_for(exc), reply_to=msg)
        except Exception as exc:  # the node reports that it failed, never what the failure says
            log.exception("%s failed on this node; the server gets only a fixed reason", kind)
            reply = Message(error_for(exc), reply_to=msg)
        if "audit-log" in context.node_config:
            write_audit(str(context.node_config["audit-log"]), msg, reply)
        return reply


def check_error(error: Error) -> None:
    """An error reply leaves only with the code for a failed ClientApp and a fixed reason."""
    if error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION or error.reason not in ERROR_REASONS:
        raise PrivacyViolation(f"an error reply with code {error.code} and an unlisted reason")


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


def privacy_budget(
    epsilon: float, mixture: bool, warmup: bool, query_rounds: int = 1
) -> dict | None:
    """What one client's noisy counts cost a run under basic composition (None when ε = 0).

    Every release (``DP_RELEASES``, or ``DP_RELEASES_MIXTURE`` for rule ``mixture``) is ε-DP; the
    total is their sum, once per query round: a resumed run's clients start afresh and draw new
    noise. With a checkpoint scorer the total is first sent in the warm-up rounds' num-examples
    and repeated in query.score.
    """
    if epsilon <= 0:
        return None
    releases = [
        {
            "message": TRAIN_WARMUP if warmup and counts == ("total",) else message,
            "counts": list(counts),
            "epsilon": epsilon,
        }
        for message, counts in (DP_RELEASES_MIXTURE if mixture else DP_RELEASES)
    ]
    per_round = epsilon * len(releases)
    return {
        "epsilon": epsilon,
        "composition": "basic: the sum of every release's epsilon",
        "releases": releases,
        "epsilon_per_query_round": per_round,
        "query_rounds": query_rounds,
        "epsilon_total": per_round * query_rounds,
        "covers": "the counts and the histogram only; not the adapters, the losses or timings",
    }


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
