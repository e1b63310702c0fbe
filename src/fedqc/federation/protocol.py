"""What crosses the wire, in one place: message names, and one dataclass per message.

Each message (:class:`QueryConfig`, :class:`SelectConfig`, :class:`TrainConfig`,
:class:`CountsReply`, :class:`HistogramReply`, :class:`MaskedReply`, :class:`TrainMetrics`,
:class:`EvaluateMetrics` and the secure sum's records) becomes a Flower record with ``to_record``
and is read back with ``from_record``; the server builds and the client parses every message with
them, and no other module spells a wire key.

Server → client: the quality settings (scorer, τ, rule, lengths), the training settings and the
global adapter; for the checkpoint scorers also the warm-up checkpoints and the anchor info
(``CHECKPOINT_RECORD``, ``ANCHOR_INFO_RECORD``); for the ``mixture`` rule the bin edges, then τ.
Client → server: counts (``REPLY_COUNTS``), one histogram of scores over the server's fixed bins
(``HISTOGRAM_KEY``, ``mixture`` only), adapter arrays and aggregate metrics; never text, token ids
or per-sample scores. A failed client sends only an error code and one of ``ERROR_REASONS``.
Under ``quality.secure-sum`` the counts and histogram travel as one masked vector (``MASKED_KEY``),
around which three messages of a secure sum (``SECURE_MESSAGES``) carry public keys and encrypted
or unmasking Shamir shares.
The privacy guard and the privacy tests check every client message against the reply classes'
fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import ClassVar, Self

from flwr.app import ConfigRecord, MetricRecord

from fedqc.quality.mixture import NUM_BINS

# Phase 1: every client scores its samples. With a τ in the config it selects at once and replies
# counts; with bin edges (rule ``mixture``) it keeps its scores in context.state and replies a
# histogram, and the server's second message, QUERY_SELECT, carries the fitted τ.
QUERY_SCORE = "query.score"
QUERY_SELECT = "query.select"
# Before phase 1, for the checkpoint scorers: FedAvg rounds of LoRA on the unfiltered data,
# answered by the same handler as ``train`` (same TRAIN_CONFIG, same reply keys).
TRAIN_WARMUP = "train.warmup"

# Records of a query.score message besides "config" and "arrays" (the initial adapter), for the
# checkpoint scorers: "checkpoint-<k>" (k = 1..K) holds the global adapter θ_k after warm-up round
# k; "anchor-info" holds AnchorInfo.to_arrays(): the K mean anchor gradients ("dir.<k>.<name>",
# tracin, tracin-cos, clues, datainf) or the anchors' token ids ("demo.<j>", icl and nuggets).
CHECKPOINT_RECORD = "checkpoint-{k}"
ANCHOR_INFO_RECORD = "anchor-info"
# Record names. A request holds its settings in CONFIG_RECORD and the adapter in ARRAYS_RECORD
# (Flower's strategies use the same two names); a query reply holds STATS_RECORD, a train or
# evaluate reply METRICS_RECORD (and a train reply ARRAYS_RECORD).
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
STATS_RECORD = "stats"
METRICS_RECORD = "metrics"
# quality.secure-sum (fedqc.federation.secure_sum): a session of three messages of its own around
# each data message (query.score, and query.select for rule mixture), whose records are one
# ConfigRecord SECURE_RECORD both ways (KeysReply, SharesRequest, SharesReply, MaskRequest,
# UnmaskRequest, UnmaskReply below). The data reply's stats then hold only a MaskedReply: the
# vector below, masked mod 2^MASK_BITS, and the partition id.
SECURE_KEYS = "query.keys"
SECURE_SHARES = "query.shares"
SECURE_UNMASK = "query.unmask"
SECURE_MESSAGES = (SECURE_KEYS, SECURE_SHARES, SECURE_UNMASK)
SECURE_RECORD = "secure-sum"
MASK_BITS = 32
HISTOGRAM_BINS = NUM_BINS


# ---------------------------------------------------------------------------------------------
# The messages. Each is a frozen dataclass whose field ``x_y`` travels under the key "x-y" of one
# record (``RECORD``, a ConfigRecord or a MetricRecord: ``KIND``). ``to_record`` and
# ``from_record`` are the only places where a message becomes a record and back, and
# ``_to_value`` / ``_from_value`` the only place where None is handled: Flower's records cannot
# hold None, so a field marked ``NAN`` travels as NaN and every other None field is left out;
# read back, NaN and a missing key are None (or the field's default).

NAN = {"none": "nan"}  # field metadata: None travels as NaN (the key is always there)


def wire_key(name: str) -> str:
    """The record key of a field: ``drop_fraction`` travels as "drop-fraction"."""
    return name.replace("_", "-")


_PARSERS: dict[str, Callable] = {
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "list[int]": lambda v: [int(x) for x in v],
    "list[float]": lambda v: [float(x) for x in v],
    "list[bytes]": lambda v: [bytes(x) for x in v],
}


def _to_value(f: Field, value):
    """What a field's value sends: None as NaN for a NAN field, else None (left out)."""
    if value is None and f.metadata.get("none") == "nan":
        return math.nan
    return value


def _from_value(f: Field, value):
    """A record's value as the field's type (its annotation names it); NaN is None for a NAN
    field."""
    value = _PARSERS[str(f.type).removesuffix(" | None")](value)
    if f.metadata.get("none") == "nan" and isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass(frozen=True)
class Wire:
    """A message's record; subclasses name it (``RECORD``) and its kind (``KIND``)."""

    RECORD: ClassVar[str] = CONFIG_RECORD
    KIND: ClassVar[type] = ConfigRecord

    @classmethod
    def record_keys(cls) -> tuple[str, ...]:
        """Every key this message may carry, in field order."""
        return tuple(wire_key(f.name) for f in fields(cls))

    @classmethod
    def key(cls, name: str) -> str:
        """The record key of field ``name`` (a name the message does not have is an error)."""
        if name not in {f.name for f in fields(cls)}:
            raise AttributeError(f"{cls.__name__} has no field '{name}'")
        return wire_key(name)

    def to_record(self) -> ConfigRecord | MetricRecord:
        values = {wire_key(f.name): _to_value(f, getattr(self, f.name)) for f in fields(self)}
        return self.KIND({k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict:
        """The record as a plain dict (what the server writes down, e.g. selection.json)."""
        return dict(self.to_record())

    @classmethod
    def from_record(cls, record: Mapping) -> Self:
        """The message in ``record``; keys it does not name (Flower's own) are ignored."""
        values = {}
        for f in fields(cls):
            key = wire_key(f.name)
            if key in record:
                values[f.name] = _from_value(f, record[key])
            elif f.default is MISSING:
                raise ValueError(f"{cls.__name__}: the record has no '{key}'")
        return cls(**values)


@dataclass(frozen=True)
class StatsWire(Wire):
    """A query reply: the MetricRecord STATS_RECORD."""

    RECORD: ClassVar[str] = STATS_RECORD
    KIND: ClassVar[type] = MetricRecord


@dataclass(frozen=True)
class MetricsWire(Wire):
    """A train or evaluate reply's MetricRecord METRICS_RECORD."""

    RECORD: ClassVar[str] = METRICS_RECORD
    KIND: ClassVar[type] = MetricRecord


@dataclass(frozen=True)
class SecureWire(Wire):
    """A secure-sum step's ConfigRecord SECURE_RECORD (both ways)."""

    RECORD: ClassVar[str] = SECURE_RECORD


# Server → client


@dataclass(frozen=True)
class QueryConfig(Wire):
    """query.score's settings. τ on the oriented scale (None: the rule is drop-fraction, or
    mixture, whose τ comes in query.select), the drop fraction (None unless drop-fraction).
    ``calibration`` comes with an ensemble, ``prefix`` (the demonstrations' token ids: the
    server's first quality.shots anchors) with a forward scorer and quality.shots > 0,
    ``fingerprint`` and ``checkpoint_lrs`` (η_1..η_K) with the checkpoint scorers, ``edges``
    (HISTOGRAM_BINS + 1 floats, oriented scale) with the mixture rule."""

    scorer: str
    rule: str
    model: str
    max_length: int
    batch_tokens: int
    tau: float | None = field(default=None, metadata=NAN)
    drop_fraction: float | None = field(default=None, metadata=NAN)
    calibration: list[float] | None = None
    fingerprint: str | None = None
    checkpoint_lrs: list[float] | None = None
    edges: list[float] | None = None
    prefix: list[int] | None = None


@dataclass(frozen=True)
class SelectConfig(Wire):
    """query.select (rule mixture): the τ the server fitted to the summed histograms."""

    tau: float


@dataclass(frozen=True)
class TrainConfig(Wire):
    """A training round's settings (train, and train.warmup for the checkpoint scorers).

    ``round_offset`` is the number of rounds finished before this (resumed) strategy run: a
    client's absolute round, which seeds its batches and sets its learning rate, is
    server_round + round_offset. In warm-up rounds ``total_rounds`` is quality.warmup-rounds.
    ``curriculum`` is quality.curriculum (phase 2 only): each client picks its stage's samples
    itself (fedqc.quality.curriculum). ``server_round`` is set by the strategy for each round,
    ``proximal_mu`` by Flower's FedProx (train.strategy=fedprox:MU): the weight of the proximal
    term in local training.
    """

    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    max_length: int
    lr_schedule: str = "constant"
    round_offset: int = 0
    total_rounds: int = 1
    curriculum: str | None = None
    server_round: int | None = None
    proximal_mu: float | None = None


# Client → server. Counts over one client's samples: with quality.dp-epsilon > 0 each gets
# Laplace(1/ε) noise; the scoring and training times are left out under DP (they track data size).


@dataclass(frozen=True)
class CountsReply(StatsWire):
    """A client's counts after selection (query.score with τ, or query.select)."""

    total: int
    kept: int
    rejected_below_threshold: int
    rejected_non_finite: int
    truncated: int
    partition_id: int
    score_seconds: float | None = None


@dataclass(frozen=True)
class HistogramReply(StatsWire):
    """Rule mixture's query.score reply: HISTOGRAM_BINS non-negative counts of the client's
    scores over the server's bins (Laplace(1/ε) noise per bin under DP), and the counts that do
    not depend on τ. Its query.select reply is then a CountsReply."""

    histogram: list[int]
    total: int
    rejected_non_finite: int
    truncated: int
    partition_id: int
    score_seconds: float | None = None


@dataclass(frozen=True)
class MaskedReply(StatsWire):
    """A data reply under quality.secure-sum: the counts (COUNTS_VECTOR), or the histogram and
    HISTOGRAM_VECTOR_COUNTS, as one vector masked mod 2^MASK_BITS, and the partition id."""

    masked: list[int]
    partition_id: int


@dataclass(frozen=True)
class TrainMetrics(MetricsWire):
    """A train or train.warmup reply's metrics. ``num_examples`` is the kept count reported in
    the query round (noisy under DP); in a warm-up round the client's total (noisy under DP)."""

    num_examples: int
    train_loss: float
    train_seconds: float | None = None


@dataclass(frozen=True)
class EvaluateMetrics(MetricsWire):
    """An evaluate reply's metrics: the kept count and the loss on the kept samples."""

    num_examples: int
    eval_loss: float


# The secure sum's own records (SECURE_RECORD, both ways).


@dataclass(frozen=True)
class KeysRequest(SecureWire):
    """query.keys: an empty record (each client makes its key pairs)."""


@dataclass(frozen=True)
class KeysReply(SecureWire):
    """query.keys' reply: the two PEM public keys (pk1 for masks, pk2 for the shares)."""

    pk1: bytes
    pk2: bytes


@dataclass(frozen=True)
class SharesRequest(SecureWire):
    """query.shares: the client's slot and every slot's public keys."""

    slot: int
    pk1: list[bytes]
    pk2: list[bytes]


@dataclass(frozen=True)
class SharesReply(SecureWire):
    """query.shares' reply: one encrypted pair of Shamir shares per other slot, b"" at its own."""

    ciphertexts: list[bytes]


@dataclass(frozen=True)
class MaskRequest(SecureWire):
    """What a data message adds under a secure sum: the ciphertexts addressed to the client."""

    ciphertexts: list[bytes]


@dataclass(frozen=True)
class UnmaskRequest(SecureWire):
    """query.unmask: the slots that sent a masked vector (active) and those that did not."""

    active: list[int]
    dead: list[int]


@dataclass(frozen=True)
class UnmaskReply(SecureWire):
    """query.unmask's reply: shares of the active slots' seeds, then of the dead slots' keys."""

    shares: list[bytes]


# What a reply may hold: the MetricRecords of these messages, and per secure-sum step its reply.
METRIC_REPLIES = (CountsReply, HistogramReply, MaskedReply, TrainMetrics, EvaluateMetrics)
SECURE_REPLIES = {SECURE_KEYS: KeysReply, SECURE_SHARES: SharesReply, SECURE_UNMASK: UnmaskReply}

# The key tuples, from the messages (the privacy guard and the privacy tests check against them).
QUERY_CONFIG = QueryConfig.record_keys()
TRAIN_CONFIG = TrainConfig.record_keys()
REPLY_COUNTS = CountsReply.record_keys()
HISTOGRAM_REPLY = HistogramReply.record_keys()
MASKED_REPLY = MaskedReply.record_keys()
TRAIN_METRICS = TrainMetrics.record_keys()
EVALUATE_METRICS = EvaluateMetrics.record_keys()
HISTOGRAM_KEY = HistogramReply.key("histogram")
MASKED_KEY = MaskedReply.key("masked")
# The counts of one client's samples (the sums the server keeps), and the vectors a secure sum
# adds up: the counts (query.score with τ, query.select), or the mixture rule's histogram followed
# by the counts that do not depend on τ (its query.score).
COUNTS = REPLY_COUNTS[:5]
COUNTS_VECTOR = COUNTS
HISTOGRAM_VECTOR_COUNTS = HISTOGRAM_REPLY[1:4]
HISTOGRAM_VECTOR_LENGTH = HISTOGRAM_BINS + len(HISTOGRAM_VECTOR_COUNTS)

# The only reasons an error reply from a node may carry: the guard (fedqc.federation.privacy)
# replaces any other reason, so no exception text (which can quote data) leaves the node.
REASON_INPUT = "FedqcError on the node (details in the node's log)"  # its data or settings
REASON_GUARD = "PrivacyViolation on the node (details in the node's log)"  # a reply stopped
REASON_EDGES = "bin edges refused by the node (details in the node's log)"  # mixture's edges
REASON_FAILED = "Exception on the node (details in the node's log)"  # anything else
# A request that does not meet the node's own requirements (its node config), refused before the
# node reads its data (fedqc.federation.privacy.NodeRequirements).
REASON_NEEDS_SECURE_SUM = "refused: this node answers phase 1 only under a secure sum"
REASON_EPSILON = "refused: the run's epsilon exceeds this node's max-epsilon or its ledger's total"
REASON_MIN_CLIENTS = "refused: a sum over fewer clients than this node's min-clients"
REASON_NO_EVALUATE = "refused: this node does not answer evaluate requests"
REQUIREMENT_REASONS = (
    REASON_NEEDS_SECURE_SUM,
    REASON_EPSILON,
    REASON_MIN_CLIENTS,
    REASON_NO_EVALUATE,
)
ERROR_REASONS = (REASON_INPUT, REASON_GUARD, REASON_EDGES, REASON_FAILED, *REQUIREMENT_REASONS)

# The mixture rule's bin edges, as a client accepts them: HISTOGRAM_BINS + 1 finite, strictly
# increasing numbers, and no bin narrower than this share of the edges' span (the server's own
# edges are evenly spaced: every bin is 1 / HISTOGRAM_BINS of the span).
MIN_BIN_SHARE = 1 / (2 * HISTOGRAM_BINS)

# Noisy releases per client under quality.dp-epsilon = ε, each Laplace(1/ε) per count: the counts
# of one release are over disjoint sets of samples (one sample changes at most one of them, by 1),
# so each release is ε-DP, and the run costs ε per release (basic composition). A count sent again
# repeats its released value: ``num-examples`` (the total in train.warmup, the kept count in train
# and evaluate) and, for the mixture rule, query.select's total, non-finite and truncated counts.
DP_RELEASES = (
    (QUERY_SCORE, ("total",)),
    (QUERY_SCORE, ("kept", "rejected-below-threshold", "rejected-non-finite")),
    (QUERY_SCORE, ("truncated",)),
)
DP_RELEASES_MIXTURE = (
    (QUERY_SCORE, ("total",)),
    (QUERY_SCORE, (HISTOGRAM_KEY, "rejected-non-finite")),
    (QUERY_SCORE, ("truncated",)),
    (QUERY_SELECT, ("kept", "rejected-below-threshold")),
)
