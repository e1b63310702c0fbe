"""A client-side guard: every reply is checked against the message it answers before it leaves.

Per message type a reply holds exactly the records the protocol names (``REPLY_RECORDS``): a query
reply ``stats``, a train reply ``arrays`` and ``metrics``, an evaluate reply ``metrics``; each
MetricRecord exactly the keys of its reply class (every required one present), with values this
node can have sent (:func:`check_reply`): non-negative integer counts no larger than its own sample
count, kept and rejected counts ≤ total, finite losses and times, its own integer partition id.
``arrays`` is this node's own LoRA adapter: exactly its parameter names in their order, shapes and
dtypes, taken from the node's model (never from the message), as finite numbers. The one list
allowed is ``stats.histogram`` (the ``mixture`` rule): exactly ``HISTOGRAM_BINS`` non-negative
integers. Strings, other lists, unknown keys or unknown records (where text, token ids or
per-sample scores could hide) stop the reply.

A failure on the node (an exception in the ClientApp, or a reply the guard stops) leaves it as an
error reply whose reason is one of the protocol's fixed ``ERROR_REASONS``: Flower would otherwise
send the exception's text, which can quote data. An error reply with any other reason is replaced
the same way. The details go to the node's own log.

Under ``quality.secure-sum`` the data replies hold only the masked vector and the partition id
(:func:`check_masked`), and the secure sum's own replies exactly this node's own keys, ciphertexts
that decrypt to exactly its shares in Flower's layout, and the unmasking shares it holds
(:func:`check_secure_reply`).

The ``mixture`` rule's bin edges are checked on arrival (:func:`check_edges`): the server may not
ask for a histogram finer than ``MIN_BIN_SHARE`` of the edges' span per bin.

Optional differential privacy for counts: :func:`noisy_count` adds Laplace(1/ε) noise,
:func:`noisy_histogram` the same per bin; :func:`privacy_budget` adds up what a run spends.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
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
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

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
    METRICS_RECORD,
    MIN_BIN_SHARE,
    QUERY_SCORE,
    QUERY_SELECT,
    REASON_EDGES,
    REASON_EPSILON,
    REASON_FAILED,
    REASON_GUARD,
    REASON_INPUT,
    REASON_MIN_CLIENTS,
    REASON_NEEDS_SECURE_SUM,
    REASON_NO_EVALUATE,
    SECURE_KEYS,
    SECURE_MESSAGES,
    SECURE_RECORD,
    SECURE_REPLIES,
    SECURE_SHARES,
    SECURE_UNMASK,
    STATS_RECORD,
    TRAIN_WARMUP,
    CountsReply,
    EvaluateMetrics,
    HistogramReply,
    KeysReply,
    MaskedReply,
    MaskRequest,
    QueryConfig,
    SharesReply,
    SharesRequest,
    TrainMetrics,
    UnmaskReply,
    UnmaskRequest,
    wire_key,
)
from fedqc.federation.secure_sum import (
    CIPHERTEXT_BYTES,
    SEED_SHARE_BYTES,
    SK_SHARE_BYTES,
    SecureSumError,
    check_public_key,
    fernet_key,
)
from fedqc.scoring.scorers import is_checkpoint_scorer

log = logging.getLogger(__name__)

# The keys whose values are counts of this node's samples, the partition id, and the times.
COUNT_KEYS = frozenset((*COUNTS, TrainMetrics.key("num_examples")))
PARTITION_KEY = CountsReply.key("partition_id")
SECONDS_KEYS = frozenset((CountsReply.key("score_seconds"), TrainMetrics.key("train_seconds")))
# This node's adapter as the guard expects it: parameter name -> (shape, numpy dtype name).
AdapterSpec = Mapping[str, tuple[tuple[int, ...], str]]


class PrivacyViolation(RuntimeError):
    """A reply would carry more than counts, aggregate metrics and this node's adapter arrays."""


class EdgesRefused(ValueError):
    """The server's bin edges are malformed, or finer than a client accepts."""


def adapter_spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The names, shapes and dtypes of an adapter state (``LoadedModel.initial_adapter``)."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


@dataclass(frozen=True)
class NodeFacts:
    """What the guard checks a reply against, all from the node itself, never from the message.

    ``adapter``: this node's adapter (names in order, shapes, dtypes), for train replies;
    ``samples``: how many samples the node counted (the handler notes it, :func:`note_samples`),
    and ``epsilon`` the ε its counts were released under; ``partition_id`` from its node config;
    ``secure``: the secure-sum session's state (keys, slot, the shares it holds)."""

    adapter: AdapterSpec | None = None
    samples: int | None = None
    epsilon: float = 0.0
    partition_id: int = -1
    secure: Mapping | None = None


# Under DP a released count may exceed the true one by its Laplace(1/ε) noise: the guard allows
# DP_TAIL / ε more (P = e^-40 / 2 per count) and refuses anything beyond.
DP_TAIL = 40.0
SAMPLES_KEY = "fedqc-samples"  # context.state: {"samples": n, "epsilon": ε}, noted by the handlers
SECURE_STATE_KEY = "fedqc-secure-sum"  # context.state: this session's secrets and shares
# The records each data reply holds, by message type (a secure sum's data reply: check_masked).
REPLY_RECORDS = {
    QUERY_SCORE: {STATS_RECORD},
    QUERY_SELECT: {STATS_RECORD},
    MessageType.TRAIN: {ARRAYS_RECORD, METRICS_RECORD},
    TRAIN_WARMUP: {ARRAYS_RECORD, METRICS_RECORD},
    MessageType.EVALUATE: {METRICS_RECORD},
}


def note_samples(context: Context, samples: int, epsilon: float) -> None:
    """Record, for the guard, how many samples this node holds and the ε of its releases."""
    context.state[SAMPLES_KEY] = ConfigRecord({"samples": int(samples), "epsilon": float(epsilon)})


def check_reply(kind: str, request, content, facts: NodeFacts) -> None:
    """Raise PrivacyViolation unless ``content`` (a RecordDict) is exactly what the protocol says
    a reply to ``request`` (of type ``kind``) holds, with values this node can have sent.

    By message: its records (``REPLY_RECORDS``), each of its kind; the reply class's keys, every
    required one present; counts as non-negative integers no larger than this node's sample count
    (plus the DP tail), kept and every rejected or truncated count ≤ total, and without DP the
    exact identities (kept + rejected = total; histogram + non-finite = total; a warm-up's
    num-examples = total); finite losses and times; the node's own integer partition id; the
    adapter exactly, in its order. A secure sum's replies: :func:`check_secure_reply` and
    :func:`check_masked`.
    """
    if kind in SECURE_MESSAGES:
        check_secure_reply(kind, request, content, facts.secure)
        return
    if SECURE_RECORD in content:
        raise PrivacyViolation(f"a '{SECURE_RECORD}' record in a {kind} reply")
    length = masked_length(kind, request)
    if length is not None:
        check_masked(content, length, facts.partition_id)
        return
    if kind not in REPLY_RECORDS:
        raise PrivacyViolation(f"a reply to '{kind}', a message the protocol does not have")
    if set(content) != REPLY_RECORDS[kind]:
        raise PrivacyViolation(
            f"a {kind} reply must hold exactly the records {sorted(REPLY_RECORDS[kind])}, "
            f"not {sorted(content)}"
        )
    if ARRAYS_RECORD in content:
        if not isinstance(content[ARRAYS_RECORD], ArrayRecord):
            raise PrivacyViolation(
                f"'arrays' must be an ArrayRecord, got {type(content[ARRAYS_RECORD])}"
            )
        check_arrays(content[ARRAYS_RECORD], facts.adapter)
    name = next(n for n in content if n != ARRAYS_RECORD)
    record = content[name]
    if not isinstance(record, MetricRecord):
        raise PrivacyViolation(f"'{name}' must be a MetricRecord, got {type(record)}")
    if MASKED_KEY in record:
        raise PrivacyViolation(f"'{name}.{MASKED_KEY}' in a reply that is not a secure sum")
    reply = _reply_class(kind, request)
    _check_keys(name, record, reply)
    _check_values(kind, name, record, facts)


def _reply_class(kind: str, request) -> type:
    if kind == QUERY_SCORE:
        edges = QueryConfig.key("edges") in request.get(CONFIG_RECORD, {})
        return HistogramReply if edges else CountsReply
    return {
        QUERY_SELECT: CountsReply,
        MessageType.TRAIN: TrainMetrics,
        TRAIN_WARMUP: TrainMetrics,
        MessageType.EVALUATE: EvaluateMetrics,
    }[kind]


def _check_keys(name: str, record: Mapping, reply: type) -> None:
    """The reply class's keys: none other, and every one without a default."""
    allowed = set(reply.record_keys())
    required = {wire_key(f.name) for f in fields(reply) if f.default is MISSING}
    if unknown := sorted(set(record) - allowed):
        raise PrivacyViolation(f"'{name}' holds {len(unknown)} unknown key(s) ('{unknown[0]}')")
    if missing := sorted(required - set(record)):
        raise PrivacyViolation(f"'{name}' lacks {missing}")


def _check_values(kind: str, name: str, record: Mapping, facts: NodeFacts) -> None:
    """The values' types and ranges (see :func:`check_reply`)."""
    counts = {}
    for key, value in record.items():
        if key == HISTOGRAM_KEY:
            check_histogram(value)
            counts.update({f"{HISTOGRAM_KEY}[{i}]": v for i, v in enumerate(value)})
        elif key in COUNT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrivacyViolation(f"'{name}.{key}' must be a non-negative integer count")
            counts[key] = value
        elif key == PARTITION_KEY:
            if isinstance(value, bool) or not isinstance(value, int):
                raise PrivacyViolation(f"'{name}.{key}' must be an integer")
            if value != facts.partition_id:
                raise PrivacyViolation(f"'{name}.{key}' is not this node's partition id")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise PrivacyViolation(f"'{name}.{key}' must be one number")
        elif not math.isfinite(value) or (key in SECONDS_KEYS and value < 0):
            raise PrivacyViolation(f"'{name}.{key}' must be a finite number")
    if not counts:
        return
    if facts.samples is None:
        raise PrivacyViolation(f"counts in a {kind} reply from a node that counted no samples")
    dp = facts.epsilon > 0
    bound = facts.samples + (math.ceil(DP_TAIL / facts.epsilon) if dp else 0)
    if (big := max(counts.values())) > bound:
        raise PrivacyViolation(f"a count of {big} from a node with {facts.samples} samples")
    total = counts.get("total")
    if total is not None and any(v > total for k, v in counts.items() if k in COUNT_KEYS):
        raise PrivacyViolation(f"'{name}' holds a count larger than its total")
    if dp:
        return
    n = facts.samples
    split = ("kept", "rejected-below-threshold", "rejected-non-finite")
    if all(k in counts for k in split) and sum(counts[k] for k in split) != counts["total"]:
        raise PrivacyViolation(f"'{name}': kept + rejected is not the total")
    if HISTOGRAM_KEY in record and sum(record[HISTOGRAM_KEY]) + counts.get(
        "rejected-non-finite", 0
    ) != counts.get("total"):
        raise PrivacyViolation(f"'{name}': the histogram and the non-finite count miss the total")
    if total is not None and total != n:
        raise PrivacyViolation(f"'{name}.total' is not this node's sample count")
    if kind == TRAIN_WARMUP and counts.get("num-examples") != n:
        raise PrivacyViolation("a warm-up reply's num-examples is not this node's sample count")


def check_arrays(record: ArrayRecord, adapter: AdapterSpec | None) -> None:
    """Exactly the adapter's names in the adapter's order, each with its shape and dtype, as
    finite numbers."""
    if adapter is None:
        raise PrivacyViolation("'arrays' in a reply that may not carry the adapter")
    if set(record) != set(adapter):
        unknown, missing = sorted(set(record) - set(adapter)), sorted(set(adapter) - set(record))
        raise PrivacyViolation(
            f"'arrays' must hold exactly this node's adapter: {len(unknown)} unknown "
            f"({unknown[:1]}), {len(missing)} missing ({missing[:1]})"
        )
    if list(record) != list(adapter):
        raise PrivacyViolation("'arrays' holds this node's adapter in another order")
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


def check_masked(content, length: int, partition_id: int) -> None:
    """A secure sum's data reply: ``stats`` holds a masked vector of ``length`` integers in
    [0, 2^MASK_BITS) and this node's own integer partition id, and the reply nothing else (no
    plaintext count)."""
    name = MaskedReply.RECORD
    if set(content) != {name} or not isinstance(content[name], MetricRecord):
        raise PrivacyViolation(f"a secure sum's reply must hold the '{name}' MetricRecord only")
    stats = content[name]
    if set(stats) != set(MaskedReply.record_keys()):
        raise PrivacyViolation(
            f"a secure sum's '{name}' must hold exactly {list(MaskedReply.record_keys())}"
        )
    pid = stats[PARTITION_KEY]
    if isinstance(pid, bool) or not isinstance(pid, int) or pid != partition_id:
        raise PrivacyViolation(f"'{name}.{PARTITION_KEY}' must be this node's integer partition id")
    vector = stats[MASKED_KEY]
    if not isinstance(vector, list) or len(vector) != length:
        raise PrivacyViolation(f"'{name}.{MASKED_KEY}' must be a list of {length} integers")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << MASK_BITS for v in vector
    ):
        raise PrivacyViolation(f"'{name}.{MASKED_KEY}' must hold integers in [0, 2^{MASK_BITS})")


def masked_length(kind: str, request) -> int | None:
    """The length of the masked vector a request asks for; None when it asks for no secure sum."""
    if SECURE_RECORD not in request:
        return None
    mixture = QueryConfig.key("edges") in request.get(CONFIG_RECORD, {})
    return HISTOGRAM_VECTOR_LENGTH if kind == QUERY_SCORE and mixture else len(COUNTS)


def check_secure_reply(kind: str, request, content, state: Mapping | None) -> None:
    """A reply to a secure sum's own messages, checked by content against this node's session
    ``state`` (fedqc.federation.secure_sum): one ConfigRecord SECURE_RECORD with exactly the keys
    of its step; ``query.keys``: the two public keys this node made; ``query.shares``: per other
    slot a ciphertext of the exact size that this node can decrypt to exactly Flower's plaintext
    layout (its slot, that slot, a seed share and a key share of their exact sizes), b"" at its
    own; ``query.unmask``: exactly the shares this node holds of the slots asked for."""
    if set(content) != {SECURE_RECORD} or not isinstance(content[SECURE_RECORD], ConfigRecord):
        raise PrivacyViolation(f"a {kind} reply must hold the '{SECURE_RECORD}' ConfigRecord only")
    record, asked = content[SECURE_RECORD], request.get(SECURE_RECORD, {})
    expected = set(SECURE_REPLIES[kind].record_keys())
    if set(record) != expected:
        raise PrivacyViolation(f"a {kind} reply must hold exactly {sorted(expected)}")
    if state is None:
        raise PrivacyViolation(f"a {kind} reply from a node with no secure-sum session")
    if kind == SECURE_KEYS:
        try:
            for key in KeysReply.record_keys():
                check_public_key(record[key])
        except SecureSumError as exc:
            raise PrivacyViolation(f"{kind}: {exc}") from None
        if (record["pk1"], record["pk2"]) != (state.get("pk1"), state.get("pk2")):
            raise PrivacyViolation(f"{kind}: the public keys are not the ones this node made")
        return
    if kind == SECURE_SHARES:
        # what the client was asked (the handler read it already; no request: no slots)
        shares = SharesRequest.from_record(asked) if asked else SharesRequest(-1, [], [])
        own, tokens = shares.slot, record[SharesReply.key("ciphertexts")]
        sizes = [0 if j == own else CIPHERTEXT_BYTES for j in range(len(shares.pk1))]
        _check_bytes_list(kind, tokens, sizes)
        for j, token in enumerate(tokens):
            if j != own and not _is_share_ciphertext(state, own, j, token):
                raise PrivacyViolation(f"{kind}: ciphertext {j} is not this node's shares for {j}")
        return
    unmask = UnmaskRequest.from_record(asked) if asked else UnmaskRequest([], [])
    sizes = [SEED_SHARE_BYTES] * len(unmask.active) + [SK_SHARE_BYTES] * len(unmask.dead)
    sent = record[UnmaskReply.key("shares")]
    _check_bytes_list(kind, sent, sizes)
    held = [state["seed-shares"][s] for s in unmask.active]
    held += [state["sk-shares"][s] for s in unmask.dead]
    if list(sent) != held:
        raise PrivacyViolation(f"{kind}: the shares are not the ones this node holds")


def _check_bytes_list(kind: str, value, sizes: list[int]) -> None:
    if not isinstance(value, list) or len(value) != len(sizes):
        raise PrivacyViolation(f"{kind}: must be a list of {len(sizes)} byte strings")
    for v, size in zip(value, sizes, strict=True):
        if not isinstance(v, bytes) or len(v) != size:
            raise PrivacyViolation(f"{kind}: an entry is not {size} bytes")


def _is_share_ciphertext(state: Mapping, slot: int, j: int, token: bytes) -> bool:
    """``token`` decrypts, under this node's key for slot j, to exactly (slot, j, a seed share,
    a key share) in Flower's layout, each share of its fixed size."""
    try:
        plain = decrypt(fernet_key(state["sk2"], state["pk2s"][j]), token)
    except Exception:
        return False
    src, dst, seed_share, sk_share = share_keys_plaintext_separate(plain)
    return (
        (src, dst) == (slot, j)
        and len(seed_share) == SEED_SHARE_BYTES
        and len(sk_share) == SK_SHARE_BYTES
        and share_keys_plaintext_concat(src, dst, seed_share, sk_share) == plain
    )


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


class RequirementRefused(FedqcError):
    """A request that does not meet this node's requirements; ``reason`` is its fixed reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


LEDGER_FILE = "privacy-ledger.jsonl"  # in the node's output dir: one line per run start under DP
LEDGER_STATE_KEY = "fedqc-ledger"  # context.state: this run start is in the ledger already


@dataclass(frozen=True)
class NodeRequirements:
    """What a node requires of every request, from its own node config (``--node-config``):

    ``require-secure-sum`` (bool): phase 1 (query.score, query.select) only under a secure sum.
    ``max-epsilon`` (float): the most ε its counts may cost in one run start (the budget's
    ``epsilon_per_query_round``; a run without DP noise costs ∞ and is refused).
    ``max-epsilon-total`` (float): the most ε across all run starts on this node, by its ledger
    (``LEDGER_FILE`` in its output dir).
    ``min-clients`` (int): the fewest clients of any sum it joins: a secure sum's slots, the
    clients that sent it shares, and the active ones it unmasks; a phase-1 reply in the clear is
    a "sum" of one client and is refused when min-clients > 1.
    ``answer-evaluate`` (bool, default true): false refuses every evaluate request.
    """

    require_secure_sum: bool = False
    max_epsilon: float | None = None
    max_epsilon_total: float | None = None
    min_clients: int = 0
    answer_evaluate: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> NodeRequirements:
        def flag(key: str, default: bool) -> bool:
            value = node_config.get(key, default)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise FedqcError(f"node config {key}={value!r}: must be true or false")
            return value

        def number(key: str, kind: type, low: float):
            if key not in node_config:
                return None
            value = node_config[key]
            try:
                parsed = kind(value)
            except (TypeError, ValueError):
                parsed = None
            if isinstance(value, bool) or parsed is None or not parsed >= low:
                raise FedqcError(f"node config {key}={value!r}: must be a number >= {low}")
            return parsed

        return cls(
            require_secure_sum=flag("require-secure-sum", False),
            max_epsilon=number("max-epsilon", float, 0.0),
            max_epsilon_total=number("max-epsilon-total", float, 0.0),
            min_clients=number("min-clients", int, 0) or 0,
            answer_evaluate=flag("answer-evaluate", True),
        )


def run_epsilon(cfg) -> float:
    """What one run start's noisy counts cost a client (∞ without noise): the budget's
    ``epsilon_per_query_round`` for ``cfg`` (a fedqc Config)."""
    q = cfg.quality
    mixture = q.rule.split(":")[0] == "mixture"
    budget = privacy_budget(q.dp_epsilon, mixture, is_checkpoint_scorer(q.scorer))
    return math.inf if budget is None else float(budget["epsilon_per_query_round"])


def check_request(
    kind: str,
    request,
    need: NodeRequirements,
    epsilon: float,
    ledger: Callable[[], Path],
    recorded: bool = False,
) -> bool:
    """Raise RequirementRefused unless the request ``kind`` meets ``need``, before the handler
    reads any data. ``epsilon``: what this run start costs (:func:`run_epsilon`); ``ledger()``:
    this node's ledger file, read only when the request releases noisy counts and this run start
    is not ``recorded`` in it yet. True when the request releases noisy counts (the caller
    records the run start in the ledger once)."""
    if kind == MessageType.EVALUATE and not need.answer_evaluate:
        raise RequirementRefused(REASON_NO_EVALUATE, "answer-evaluate=false")
    secure = request.get(SECURE_RECORD)
    phase1 = kind in (QUERY_SCORE, QUERY_SELECT)
    if phase1 and secure is None:
        if need.require_secure_sum:
            raise RequirementRefused(REASON_NEEDS_SECURE_SUM, f"{kind} without a secure sum")
        if need.min_clients > 1:
            raise RequirementRefused(
                REASON_MIN_CLIENTS, f"{kind} in the clear: a sum of 1 < min-clients"
            )
    if need.min_clients and secure is not None:
        if kind == SECURE_SHARES:
            clients, what = len(SharesRequest.from_record(secure).pk1), "slots"
        elif kind == SECURE_UNMASK:
            clients, what = len(UnmaskRequest.from_record(secure).active), "active clients"
        elif phase1:  # this node and the slots that sent it shares
            tokens = MaskRequest.from_record(secure).ciphertexts
            clients, what = 1 + sum(1 for t in tokens if t), "clients that shared keys"
        else:
            clients, what = need.min_clients, ""
        if clients < need.min_clients:
            raise RequirementRefused(
                REASON_MIN_CLIENTS, f"{kind}: {clients} {what} < min-clients {need.min_clients}"
            )
    releases = kind in (QUERY_SCORE, TRAIN_WARMUP)
    if not releases:
        return False
    if need.max_epsilon is not None and epsilon > need.max_epsilon:
        raise RequirementRefused(
            REASON_EPSILON, f"this run costs ε = {epsilon:g} > max-epsilon {need.max_epsilon:g}"
        )
    if need.max_epsilon_total is not None and not recorded:
        spent = ledger_total(ledger())
        if spent + epsilon > need.max_epsilon_total:
            raise RequirementRefused(
                REASON_EPSILON,
                f"the ledger holds ε = {spent:g}; this run's {epsilon:g} would pass "
                f"max-epsilon-total {need.max_epsilon_total:g}",
            )
    return math.isfinite(epsilon)


def ledger_total(path: Path) -> float:
    """The ε this node's ledger records, summed (0 without a ledger)."""
    if not path.is_file():
        return 0.0
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(float(json.loads(line)["epsilon"]) for line in lines if line.strip())


def record_release(path: Path, run_id: int, epsilon: float) -> None:
    """Add one run start's ε to this node's ledger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.time(), "run-id": int(run_id), "epsilon": epsilon}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


class Requirements:
    """Flower mod (inside the guard): refuse, with a fixed reason, any request that does not
    meet this node's requirements (:class:`NodeRequirements`), before the handler reads data;
    record each run start's ε in the node's ledger when it first releases noisy counts.

    ``config_of(context)`` is the run's Config, ``out_dir_of(context)`` the node's output dir."""

    def __init__(
        self, config_of: Callable[[Context], object], out_dir_of: Callable[[Context], Path]
    ) -> None:
        self.config_of, self.out_dir_of = config_of, out_dir_of

    def __call__(self, msg: Message, context: Context, call_next: Callable) -> Message:
        need = NodeRequirements.from_node_config(context.node_config)
        epsilon = run_epsilon(self.config_of(context))
        kind = msg.metadata.message_type

        def ledger() -> Path:
            return self.out_dir_of(context) / LEDGER_FILE

        recorded = LEDGER_STATE_KEY in context.state
        if check_request(kind, msg.content, need, epsilon, ledger, recorded) and not recorded:
            record_release(ledger(), context.run_id, epsilon)
            context.state[LEDGER_STATE_KEY] = ConfigRecord({"epsilon": epsilon})
        return call_next(msg, context)


def reason_for(exc: BaseException) -> str:
    """The fixed reason an error reply carries for a failure (never the exception's text)."""
    if isinstance(exc, RequirementRefused) and exc.reason in ERROR_REASONS:
        return exc.reason
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


def node_facts(context: Context, adapter: AdapterSpec | None = None) -> NodeFacts:
    """What this node knows of itself (context.state, node config) for :func:`check_reply`."""
    noted = context.state.get(SAMPLES_KEY, {})
    secure = context.state.get(SECURE_STATE_KEY)
    return NodeFacts(
        adapter=adapter,
        samples=int(noted["samples"]) if "samples" in noted else None,
        epsilon=float(noted.get("epsilon", 0.0)),
        partition_id=int(context.node_config.get("partition-id", -1)),
        secure=dict(secure) if secure is not None else None,
    )


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
            else:
                check_reply(kind, msg.content, reply.content, self.facts(kind, context))
        except RequirementRefused as exc:  # one line: what the node refused, and why
            log.warning("%s: refused by this node's requirements: %s", kind, exc)
            reply = Message(error_for(exc), reply_to=msg)
        except PrivacyViolation as exc:  # one line: what was stopped (the node's own log)
            log.error("%s: reply stopped by the privacy guard: %s", kind, exc)
            reply = Message(error_for(exc), reply_to=msg)
        except Exception as exc:  # the node reports that it failed, never what the failure says
            log.exception("%s failed on this node; the server gets only a fixed reason", kind)
            reply = Message(error_for(exc), reply_to=msg)
        if "audit-log" in context.node_config:
            write_audit(str(context.node_config["audit-log"]), msg, reply)
        return reply

    def facts(self, kind: str, context: Context) -> NodeFacts:
        """This node's facts; its adapter only for a train reply (no other may carry it)."""
        trains = kind in (MessageType.TRAIN, TRAIN_WARMUP)
        return node_facts(context, self.adapter_of(context) if trains else None)


def check_error(error: Error) -> None:
    """An error reply leaves only with the code for a failed ClientApp and a fixed reason."""
    if error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION or error.reason not in ERROR_REASONS:
        raise PrivacyViolation(f"an error reply with code {error.code} and an unlisted reason")


def noisy_count(value: int, epsilon: float, rng: np.random.Generator, signed: bool = False) -> int:
    """``value`` + Laplace(1/ε) noise, rounded (ε-DP for a count of sensitivity 1), and clipped
    at 0 unless ``signed``.

    ε = 0 means no noise. Rounding and clipping are post-processing: they cost no privacy, but
    clipping biases a small count upwards (about +0.48 for a count of 0 at ε = 1), so under a
    secure sum, whose ring carries negative values, the noise stays signed and the sum unbiased.
    """
    if epsilon <= 0:
        return int(value)
    noisy = int(round(value + rng.laplace(0.0, 1.0 / epsilon)))
    return noisy if signed else max(0, noisy)


def noisy_histogram(
    counts, epsilon: float, rng: np.random.Generator, signed: bool = False
) -> list[int]:
    """Laplace(1/ε) noise on every bin, rounded, and clipped at 0 unless ``signed``.

    One sample adds 1 to exactly one bin (L1 sensitivity 1), so the whole histogram is ε-DP.
    """
    return [noisy_count(int(c), epsilon, rng, signed) for c in counts]


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


def server_learns(cfg) -> list[str]:
    """What the server learns about each client in a run with ``cfg`` (a fedqc Config), one line
    per exchange: what the run states in threshold.json (``server_learns``) and the summary.
    docs/privacy.md, "What the server learns, per setting", has the same rows with their tests."""
    q, dp = cfg.quality, cfg.quality.dp_epsilon > 0
    noisy = f" (Laplace(1/ε = {q.dp_epsilon:g}) noise)" if dp else ""
    mixture = q.rule.split(":")[0] == "mixture"
    hist = f", its {HISTOGRAM_BINS}-bin score histogram" if mixture else ""
    lines = []
    if q.secure_sum:
        lines.append(
            f"phase 1: only the sums over clients of the counts{hist and ' and histogram'}"
            f"{noisy}, and which nodes answered with their partition ids"
        )
    else:
        lines.append(
            "phase 1, per client: its counts (total, kept, rejected, non-finite, truncated)"
            f"{hist}{noisy}, partition id" + ("" if dp else " and scoring time")
        )
    per_round = "its kept count as num-examples" + (" (the noisy kept)" if dp else "")
    if q.secure_sum:
        per_round += " (not covered by the secure sum)"
    lines.append(
        f"phase 2, per client per round: its adapter after local training, {per_round}, "
        "its train loss" + ("" if dp else " and training time")
    )
    if is_checkpoint_scorer(q.scorer):
        lines.append(
            "warm-up, per client per round: its adapter trained on all its samples, its total "
            f"as num-examples{' (noisy)' if dp else ''}, its train loss"
        )
    if cfg.federation.fraction_evaluate > 0:
        lines.append("evaluate, per sampled client: its kept count and eval loss")
    if cfg.train.dp_mode != "off":
        lines.append(
            f"DP-FedAvg ({cfg.train.dp_mode} clipping): the server still sees each update "
            "without noise; the noise protects the released model"
        )
    return lines


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
