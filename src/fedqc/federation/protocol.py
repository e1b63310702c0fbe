"""What crosses the wire, in one place: message names and the keys each message may carry.

Server → client: the quality settings (scorer, τ, rule, lengths), the training settings and the
global adapter.
Client → server: counts (``REPLY_COUNTS``), adapter arrays and aggregate metrics; never text,
token ids or per-sample scores. A failed client sends only an error code and a generic reason.
The privacy guard and the privacy test check every client message against these lists.
"""

from __future__ import annotations

QUERY_SCORE = "query.score"

# Counts over one client's samples: with quality.dp-epsilon > 0 each gets Laplace(1/ε) noise.
COUNTS = ("total", "kept", "rejected-below-threshold", "rejected-non-finite", "truncated")
# Keys of the MetricRecord a client returns from the quality query round: the counts, the
# partition id its operator gave it, and the scoring time (left out under DP: it tracks data size).
REPLY_COUNTS = (*COUNTS, "partition-id", "score-seconds")
# Keys of the MetricRecord a client returns from a train or evaluate round. ``num-examples`` is
# the kept count reported in the query round (noisy under DP), ``train-seconds`` is left out
# under DP.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")
EVALUATE_METRICS = ("num-examples", "eval-loss")

# Keys of the training ConfigRecord (server → client), besides Flower's own ``server-round``.
# ``round-offset`` is the number of rounds finished before this (resumed) strategy run: a client's
# absolute round, which seeds its batches and sets its learning rate, is server-round + offset.
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
)
