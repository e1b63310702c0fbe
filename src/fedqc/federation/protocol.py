"""What crosses the wire, in one place: message names and the keys each message may carry.

Server → client: the quality settings (scorer, τ, rule, lengths) and the global adapter.
Client → server: counts (``REPLY_COUNTS``), adapter arrays and aggregate metrics; never text,
token ids or per-sample scores. The privacy test checks every client message against these lists.
"""

from __future__ import annotations

QUERY_SCORE = "query.score"

# Keys of the MetricRecord a client returns from the quality query round.
REPLY_COUNTS = (
    "total",
    "kept",
    "rejected-below-threshold",
    "rejected-non-finite",
    "truncated",
    "partition-id",
    "score-seconds",
)
# Keys of the MetricRecord a client returns from a train or evaluate round.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds")
EVALUATE_METRICS = ("num-examples", "eval-loss")
