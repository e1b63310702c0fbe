"""Phase 1 with the clients: the quality query round, and the mixture rule's second message.

One ``query.score`` message per node carries τ (or a drop fraction), the scorer settings, the
initial adapter and, for the checkpoint scorers, the warm-up checkpoints and the anchor info. Each
node scores its samples, selects, and replies counts.

Rule ``mixture``: the message carries the bin edges instead of τ. Each node replies a histogram of
its scores over those bins (counts only; noisy under DP) and keeps the scores. The server sums the
histograms, fits the two-component mixture with the anchors as known-clean points
(:func:`fedqc.quality.mixture.fit_mixture`), writes τ to threshold.json, and a ``query.select``
message carries τ to the nodes that answered: they apply it to their kept scores and reply counts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.federation.protocol import HISTOGRAM_BINS, HISTOGRAM_KEY, QUERY_SCORE, QUERY_SELECT
from fedqc.federation.strategy import ParticipationGrid
from fedqc.quality.mixture import fit_mixture

log = logging.getLogger(__name__)


def query_round(
    grid: ParticipationGrid,
    nodes: list[int],
    cfg: Config,
    config: dict,
    records: dict[str, ArrayRecord],
    scorer,
    anchor_oriented: np.ndarray | None,
    run_dir: Path,
) -> tuple[float | None, list[Message], list[dict]]:
    """(τ, the answered replies with counts, the nodes that dropped out, with reasons)."""
    qc = ConfigRecord(config)
    msgs = [
        Message(RecordDict({"config": qc, **records}), dst_node_id=n, message_type=QUERY_SCORE)
        for n in nodes
    ]
    need = cfg.federation.min_nodes
    grid.min_answers = {QUERY_SCORE: need, QUERY_SELECT: need}
    replies = [r for r in grid.send_and_receive(msgs, timeout=cfg.federation.timeout)]
    answered = [r for r in replies if not r.has_error()]
    dropped = list(grid.exchanges[-1]["dropped"])
    tau = None if math.isnan(float(config["tau"])) else float(config["tau"])
    if "edges" not in config:
        return tau, answered, dropped
    if anchor_oriented is None:
        raise FedqcError("rule 'mixture' needs anchor scores: set data.anchors=FILE")
    edges = np.asarray(config["edges"], dtype=np.float64)
    tau = fit_threshold(edges, answered, scorer, anchor_oriented, run_dir)
    select = RecordDict({"config": ConfigRecord({"tau": tau})})
    msgs = [
        Message(select, dst_node_id=r.metadata.src_node_id, message_type=QUERY_SELECT)
        for r in answered
    ]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.timeout))
    dropped += grid.exchanges[-1]["dropped"]
    return tau, [r for r in replies if not r.has_error()], dropped


def fit_threshold(
    edges: np.ndarray, replies: list[Message], scorer, anchor_oriented: np.ndarray, run_dir: Path
) -> float:
    """Sum the clients' histograms, fit the mixture, record it in threshold.json; τ (oriented)."""
    total, used = np.zeros(HISTOGRAM_BINS, dtype=np.int64), 0
    for reply in replies:
        counts = np.asarray(reply.content["stats"][HISTOGRAM_KEY], dtype=np.int64)
        if counts.shape != (HISTOGRAM_BINS,) or (counts < 0).any():
            log.warning("node %s sent a malformed histogram: left out", reply.metadata.src_node_id)
            continue
        total, used = total + counts, used + 1
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
