"""What crosses the wire, in one place: message names and the keys each message may carry.

Server → client: the quality settings (scorer, τ, rule, lengths), the training settings and the
global adapter; for the checkpoint scorers also the warm-up checkpoints and the anchor info
(``CHECKPOINT_RECORD``, ``ANCHOR_INFO_RECORD``); for the ``mixture`` rule the bin edges.
Client → server: counts (``REPLY_COUNTS``), one histogram of scores over the server's fixed bins
(``HISTOGRAM_KEY``, ``mixture`` only), adapter arrays and aggregate metrics; never text, token ids
or per-sample scores. A failed client sends only an error code and one of ``ERROR_REASONS``.
Under ``quality.secure-sum`` the counts and histogram travel as one masked vector (``MASKED_KEY``),
around which three messages of a secure sum (``SECURE_MESSAGES``) carry public keys and encrypted
or unmasking Shamir shares.
The privacy guard and the privacy test check every client message against these lists.
"""

from __future__ import annotations

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
# Keys of the query.score ConfigRecord. "fingerprint" and "checkpoint-lrs" (η_1..η_K) come with
# the checkpoint scorers, "edges" (NUM_BINS + 1 floats, oriented scale) with the mixture rule,
# "calibration" with an ensemble, "prefix" (the demonstrations' token ids: the server's first
# quality.shots anchors) with a forward scorer and quality.shots > 0. query.select carries "tau"
# only.
QUERY_CONFIG = (
    "scorer",
    "rule",
    "model",
    "tau",
    "drop-fraction",
    "max-length",
    "batch-tokens",
    "calibration",
    "fingerprint",
    "checkpoint-lrs",
    "edges",
    "prefix",
)

# Counts over one client's samples: with quality.dp-epsilon > 0 each gets Laplace(1/ε) noise.
COUNTS = ("total", "kept", "rejected-below-threshold", "rejected-non-finite", "truncated")
# Keys of the MetricRecord a client returns from the quality query round: the counts, the
# partition id its operator gave it, and the scoring time (left out under DP: it tracks data size).
REPLY_COUNTS = (*COUNTS, "partition-id", "score-seconds")
# The mixture rule's histogram reply (query.score with edges): the histogram (HISTOGRAM_BINS
# non-negative integers; Laplace(1/ε) noise per bin under DP) and the counts that do not depend on
# τ. Its query.select reply then holds REPLY_COUNTS.
HISTOGRAM_KEY = "histogram"
HISTOGRAM_BINS = NUM_BINS
HISTOGRAM_REPLY = (
    HISTOGRAM_KEY,
    "total",
    "rejected-non-finite",
    "truncated",
    "partition-id",
    "score-seconds",
)
# quality.secure-sum (fedqc.federation.secure_sum): a session of three messages of its own around
# each data message (query.score, and query.select for rule mixture), whose records are one
# ConfigRecord SECURE_RECORD both ways. query.keys: the reply holds "pk1", "pk2" (PEM public keys).
# query.shares: the server sends "slot", "pk1", "pk2" (every slot's keys); the reply holds
# "ciphertexts" (one encrypted pair of Shamir shares per other slot, b"" at the client's own). The
# data message carries "ciphertexts" (those addressed to the client); its reply's stats hold only
# MASKED_KEY (the vector below, masked mod 2^MASK_BITS) and "partition-id". query.unmask: the
# server sends "active" and "dead" slots; the reply holds "shares" (of the active slots' seeds,
# then of the dead slots' secret keys).
SECURE_KEYS = "query.keys"
SECURE_SHARES = "query.shares"
SECURE_UNMASK = "query.unmask"
SECURE_MESSAGES = (SECURE_KEYS, SECURE_SHARES, SECURE_UNMASK)
SECURE_RECORD = "secure-sum"
MASKED_KEY = "masked"
MASK_BITS = 32
# The vectors summed: the counts (query.score with τ, query.select), or the mixture rule's
# histogram followed by the counts that do not depend on τ (its query.score).
COUNTS_VECTOR = COUNTS
HISTOGRAM_VECTOR_COUNTS = ("total", "rejected-non-finite", "truncated")
HISTOGRAM_VECTOR_LENGTH = HISTOGRAM_BINS + len(HISTOGRAM_VECTOR_COUNTS)
MASKED_REPLY = (MASKED_KEY, "partition-id")
# Keys of the MetricRecord a client returns from a train or evaluate round. ``num-examples`` is
# the kept count reported in the query round (noisy under DP), ``train-seconds`` is left out
# under DP. In a warm-up round ``num-examples`` is the client's total (noisy under DP).
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")
EVALUATE_METRICS = ("num-examples", "eval-loss")

# Keys of the training ConfigRecord (server → client), besides Flower's own ``server-round``.
# ``round-offset`` is the number of rounds finished before this (resumed) strategy run: a client's
# absolute round, which seeds its batches and sets its learning rate, is server-round + offset.
# In warm-up rounds ``total-rounds`` is quality.warmup-rounds. Flower's FedProx adds
# ``proximal-mu`` (train.strategy=fedprox:MU), the weight of the proximal term in local training.
# ``curriculum`` is quality.curriculum: each client picks its stage's samples itself
# (fedqc.quality.curriculum); the reply's keys stay the same.
TRAIN_CONFIG = (
    "local-steps",
    "batch-size",
    "lr",
    "lr-schedule",
    "weight-decay",
    "seed",
    "max-length",
    "round-offset",
    "total-rounds",
    "proximal-mu",
    "curriculum",
)

# The only reasons an error reply from a node may carry: the guard (fedqc.federation.privacy)
# replaces any other reason, so no exception text (which can quote data) leaves the node.
REASON_INPUT = "FedqcError on the node (details in the node's log)"  # its data or settings
REASON_GUARD = "PrivacyViolation on the node (details in the node's log)"  # a reply stopped
REASON_EDGES = "bin edges refused by the node (details in the node's log)"  # mixture's edges
REASON_FAILED = "Exception on the node (details in the node's log)"  # anything else
ERROR_REASONS = (REASON_INPUT, REASON_GUARD, REASON_EDGES, REASON_FAILED)

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
