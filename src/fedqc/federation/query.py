"""Phase 1 with the clients: the quality query round, and the mixture rule's second message.

One ``query.score`` message per node carries τ (or a drop fraction), the scorer settings, the
initial adapter and, for the checkpoint scorers, the warm-up checkpoints and the anchor info. Each
node scores its samples, selects, and replies counts.

Rule ``mixture``: the message carries the bin edges instead of τ. Each node replies a histogram of
its scores over those bins (counts only; noisy under DP) and keeps the scores. The server sums the
histograms, fits the two-component mixture with the anchors as known-clean points
(:func:`fedqc.quality.mixture.fit_mixture`), writes τ to threshold.json, and a ``query.select``
message carries τ to the nodes that answered: they apply it to their kept scores and reply counts.

``quality.secure-sum``: each reply vector (the counts, or the histogram with the counts that do not
depend on τ) is summed by a secure sum (:mod:`fedqc.federation.secure_sum`), so the server gets
the sums only; the mixture fit needs no more than the summed histogram.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.federation.protocol import (
    COUNTS,
    COUNTS_VECTOR,
    HISTOGRAM_BINS,
    HISTOGRAM_KEY,
    HISTOGRAM_VECTOR_LENGTH,
    QUERY_SCORE,
    QUERY_SELECT,
)
from fedqc.federation.secure_sum import run_session
from fedqc.federation.strategy import ParticipationGrid
from fedqc.quality.mixture import fit_mixture

log = logging.getLogger(__name__)


@dataclass
class Phase1:
    """What phase 1 told the server.

    ``clients``: each answering node's reply stats with its node id, or None under
    ``quality.secure-sum``, where the server gets only ``sums``: each count summed over the
    nodes that answered. ``nodes`` maps those nodes to their partition ids.
    """

    tau: float | None
    clients: list[dict] | None
    sums: dict[str, int]
    nodes: dict[int, int]
    dropped: list[dict] = field(default_factory=list)


def query_round(
    grid: ParticipationGrid,
    nodes: list[int],
    cfg: Config,
    config: dict,
    records: dict[str, ArrayRecord],
    scorer,
    anchor_oriented: np.ndarray | None,
    run_dir: Path,
) -> Phase1:
    """Phase 1 with the clients: τ, and the counts per client, or only their sums."""
    need = cfg.federation.min_nodes
    grid.min_answers = {QUERY_SCORE: need, QUERY_SELECT: need}
    tau = None if math.isnan(float(config["tau"])) else float(config["tau"])
    mixture = "edges" in config
    if mixture and anchor_oriented is None:
        raise FedqcError("rule 'mixture' needs anchor scores: set data.anchors=FILE")
    if cfg.quality.secure_sum:
        return _secure_query_round(
            grid, nodes, cfg, config, records, scorer, anchor_oriented, run_dir
        )
    qc = ConfigRecord(config)
    msgs = [
        Message(RecordDict({"config": qc, **records}), dst_node_id=n, message_type=QUERY_SCORE)
        for n in nodes
    ]
    replies = [r for r in grid.send_and_receive(msgs, timeout=cfg.federation.timeout)]
    answered = [r for r in replies if not r.has_error()]
    dropped = list(grid.exchanges[-1]["dropped"])
    if mixture:
        edges = np.asarray(config["edges"], dtype=np.float64)
        total, used = np.zeros(HISTOGRAM_BINS, dtype=np.int64), 0
        for reply in answered:
            counts = np.asarray(reply.content["stats"][HISTOGRAM_KEY], dtype=np.int64)
            if counts.shape != (HISTOGRAM_BINS,) or (counts < 0).any():
                node = reply.metadata.src_node_id
                log.warning("node %s sent a malformed histogram: left out", node)
                continue
            total, used = total + counts, used + 1
        tau = fit_threshold(edges, total, used, scorer, anchor_oriented, run_dir)
        select = RecordDict({"config": ConfigRecord({"tau": tau})})
        msgs = [
            Message(select, dst_node_id=r.metadata.src_node_id, message_type=QUERY_SELECT)
            for r in answered
        ]
        replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.timeout))
        dropped += grid.exchanges[-1]["dropped"]
        answered = [r for r in replies if not r.has_error()]
    clients = [{"node": r.metadata.src_node_id, **dict(r.content["stats"])} for r in answered]
    return Phase1(
        tau,
        clients,
        {k: sum(int(c[k]) for c in clients) for k in COUNTS},
        {c["node"]: int(c.get("partition-id", -1)) for c in clients},
        dropped,
    )


def _secure_query_round(
    grid: ParticipationGrid,
    nodes: list[int],
    cfg: Config,
    config: dict,
    records: dict[str, ArrayRecord],
    scorer,
    anchor_oriented: np.ndarray | None,
    run_dir: Path,
) -> Phase1:
    """Phase 1 under quality.secure-sum: one secure sum of the counts, or for rule mixture one of
    the histogram with its τ-free counts, then one of the counts under the fitted τ."""
    need, timeout = cfg.federation.min_nodes, cfg.federation.timeout
    tau = None if math.isnan(float(config["tau"])) else float(config["tau"])
    qc = ConfigRecord(config)

    def score(_node: int) -> RecordDict:
        return RecordDict({"config": qc, **records})

    if "edges" not in config:
        total, answered, dropped = run_session(
            grid, nodes, QUERY_SCORE, score, len(COUNTS_VECTOR), timeout, need
        )
        sums = dict(zip(COUNTS_VECTOR, (int(v) for v in total), strict=True))
        return Phase1(tau, None, sums, answered, dropped)
    total, answered, dropped = run_session(
        grid, nodes, QUERY_SCORE, score, HISTOGRAM_VECTOR_LENGTH, timeout, need
    )
    edges = np.asarray(config["edges"], dtype=np.float64)
    histogram = total[:HISTOGRAM_BINS].astype(np.int64)
    tau = fit_threshold(edges, histogram, len(answered), scorer, anchor_oriented, run_dir)

    def select(_node: int) -> RecordDict:
        return RecordDict({"config": ConfigRecord({"tau": tau})})

    total, answered, more = run_session(
        grid, sorted(answered), QUERY_SELECT, select, len(COUNTS_VECTOR), timeout, need
    )
    sums = dict(zip(COUNTS_VECTOR, (int(v) for v in total), strict=True))
    return Phase1(tau, None, sums, answered, dropped + more)


def fit_threshold(
    edges: np.ndarray,
    total: np.ndarray,
    used: int,
    scorer,
    anchor_oriented: np.ndarray,
    run_dir: Path,
) -> float:
    """Fit the mixture to the clients' summed histogram (``used`` clients), record it in
    threshold.json; τ (oriented)."""
    fit = fit_mixture(edges, total, anchor_oriented)
    path = run_dir / "threshold.json"
    threshold = json.loads(path.read_text())
    threshold |= {
        "tau": fit.tau,
        "tau_raw": scorer.raw(fit.tau),
        "mixture": asdict(fit),
        "histogram": total.tolist(),
        "clients_in_histogram": used,
    }
    path.write_text(json.dumps(threshold, indent=2) + "\n")
    log.info(
        "phase 1: mixture fit over %d scores: τ = %.5g (raw %s = %.5g), clean share %.2f",
        int(total.sum()),
        fit.tau,
        scorer.name,
        scorer.raw(fit.tau),
        fit.clean_weight,
    )
    return fit.tau
