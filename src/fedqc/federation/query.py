"""Phase 1 with the clients: the quality query round, and the mixture rule's second message.

One ``query.score`` message per node carries τ (or a drop fraction), the scorer settings, the
initial adapter and, for the checkpoint scorers, the warm-up checkpoints and the anchor info. Each
node scores its samples, selects, and replies counts.

Rule ``mixture``: the message carries the bin edges instead of τ. Each node replies a histogram of
its scores over those bins (counts only; noisy under DP) and keeps the scores. The server sums the
histograms, fits the two-component mixture with the anchors as known-clean points
(:func:`fedqc.quality.mixture.fit_mixture`), and a ``query.select`` message carries τ to the nodes
that answered: they apply it to their kept scores and reply counts. The fit comes back in
:class:`Phase1` for the server to record (threshold.json); nothing here reads or writes files.

``quality.secure-sum``: each reply vector (the counts, or the histogram with the counts that do not
depend on τ) is summed by a secure sum (:mod:`fedqc.federation.secure_sum`), so from phase 1 the
server gets the sums only; the mixture fit needs no more than the summed histogram. Every sum of a
run adds exactly the same clients (the mixture rule's second sum those of the first, a resumed run
those of the run it resumes), or the run stops before unmasking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.federation.protocol import (
    COUNTS,
    COUNTS_VECTOR,
    HISTOGRAM_BINS,
    HISTOGRAM_VECTOR_LENGTH,
    QUERY_SCORE,
    QUERY_SELECT,
    CountsReply,
    HistogramReply,
    QueryConfig,
    SelectConfig,
)
from fedqc.federation.secure_sum import run_session
from fedqc.federation.strategy import ParticipationGrid
from fedqc.quality.mixture import fit_mixture

log = logging.getLogger(__name__)
# The mixture fit: (the summed histogram, the clients in it) -> (τ, what threshold.json records)
Fit = Callable[[np.ndarray, int], tuple[float, dict]]


@dataclass
class Phase1:
    """What phase 1 told the server.

    ``clients``: each answering node's reply stats with its node id, or None under
    ``quality.secure-sum``, where the server gets only ``sums``: each count summed over the
    nodes that answered. ``nodes`` maps those nodes to their partition ids. ``mixture``: rule
    mixture's fit, as threshold.json records it (None for the other rules).
    """

    tau: float | None
    clients: list[dict] | None
    sums: dict[str, int]
    nodes: dict[int, int]
    dropped: list[dict] = field(default_factory=list)
    mixture: dict | None = None


@dataclass(frozen=True)
class _Exchange:
    """Phase 1's exchange with the clients: who is asked, the query.score content each gets,
    and the mixture fit (rule mixture)."""

    grid: ParticipationGrid
    nodes: list[int]
    cfg: Config
    query: QueryConfig
    content: Callable[[int], RecordDict]
    fit: Fit
    require: set[int] | None = None


def query_round(
    grid: ParticipationGrid,
    nodes: list[int],
    cfg: Config,
    query: QueryConfig,
    records: dict[str, ArrayRecord],
    scorer,
    anchor_oriented: np.ndarray | None,
    require: set[int] | None = None,
) -> Phase1:
    """Phase 1 with the clients: τ, and the counts per client, or only their sums.

    ``require`` (a resumed secure-sum run): the partition ids every secure sum must add, exactly.
    """
    need = cfg.federation.min_nodes
    grid.min_answers = {QUERY_SCORE: need, QUERY_SELECT: need}
    if query.edges is not None and anchor_oriented is None:
        raise FedqcError("rule 'mixture' needs anchor scores: set data.anchors=FILE")

    def content(_node: int) -> RecordDict:
        return RecordDict({query.RECORD: query.to_record(), **records})

    def fit(histogram: np.ndarray, used: int) -> tuple[float, dict]:
        edges = np.asarray(query.edges, dtype=np.float64)
        return fit_threshold(edges, histogram, used, scorer, anchor_oriented)

    run = _secure_query_round if cfg.quality.secure_sum else _plain_query_round
    return run(_Exchange(grid, nodes, cfg, query, content, fit, require))


def _select_content(tau: float) -> Callable[[int], RecordDict]:
    def content(_node: int) -> RecordDict:
        select = SelectConfig(tau)
        return RecordDict({select.RECORD: select.to_record()})

    return content


def _plain_query_round(x: _Exchange) -> Phase1:
    """Phase 1 in the clear: each client's counts (rule mixture: after its histogram)."""
    grid, nodes, cfg, query, content, fit = x.grid, x.nodes, x.cfg, x.query, x.content, x.fit
    timeout = cfg.federation.timeout
    msgs = [Message(content(n), dst_node_id=n, message_type=QUERY_SCORE) for n in nodes]
    answered = [r for r in grid.send_and_receive(msgs, timeout=timeout) if not r.has_error()]
    dropped, tau, mixture = list(grid.exchanges[-1]["dropped"]), query.tau, None
    if query.edges is not None:
        total, used = np.zeros(HISTOGRAM_BINS, dtype=np.int64), 0
        for reply in answered:
            counts = _histogram(reply)
            if counts is None:
                log.warning(
                    "node %s sent a malformed histogram: left out", reply.metadata.src_node_id
                )
                continue
            total, used = total + counts, used + 1
        tau, mixture = fit(total, used)
        select = _select_content(tau)
        msgs = [
            Message(select(n), dst_node_id=n, message_type=QUERY_SELECT)
            for n in (r.metadata.src_node_id for r in answered)
        ]
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        dropped += grid.exchanges[-1]["dropped"]
        answered = [r for r in replies if not r.has_error()]
    clients = [
        {
            "node": r.metadata.src_node_id,
            **CountsReply.from_record(r.content[CountsReply.RECORD]).to_dict(),
        }
        for r in answered
    ]
    return Phase1(
        tau,
        clients,
        {k: sum(int(c[k]) for c in clients) for k in COUNTS},
        {c["node"]: int(c.get(CountsReply.key("partition_id"), -1)) for c in clients},
        dropped,
        mixture,
    )


def _histogram(reply: Message) -> np.ndarray | None:
    """A histogram reply's counts, or None when malformed."""
    try:
        hist = HistogramReply.from_record(reply.content[HistogramReply.RECORD])
    except (KeyError, TypeError, ValueError):
        return None
    counts = np.asarray(hist.histogram, dtype=np.int64)
    return None if counts.shape != (HISTOGRAM_BINS,) or (counts < 0).any() else counts


def _secure_query_round(x: _Exchange) -> Phase1:
    """Phase 1 under quality.secure-sum: one secure sum of the counts, or for rule mixture one of
    the histogram with its τ-free counts, then one of the counts under the fitted τ."""
    grid, nodes, cfg, query, content, fit = x.grid, x.nodes, x.cfg, x.query, x.content, x.fit
    need, timeout = cfg.federation.min_nodes, cfg.federation.timeout
    if query.edges is None:
        total, answered, dropped = run_session(
            grid, nodes, QUERY_SCORE, content, len(COUNTS_VECTOR), timeout, need, x.require
        )
        sums = dict(zip(COUNTS_VECTOR, (int(v) for v in total), strict=True))
        return Phase1(query.tau, None, sums, answered, dropped)
    total, answered, dropped = run_session(
        grid, nodes, QUERY_SCORE, content, HISTOGRAM_VECTOR_LENGTH, timeout, need, x.require
    )
    # Under DP the summed noise is signed (unbiased): a bin's sum may be below 0; the fit takes
    # the sum clipped at 0 (post-processing).
    tau, mixture = fit(np.maximum(total[:HISTOGRAM_BINS], 0).astype(np.int64), len(answered))
    total, answered, more = run_session(
        grid,
        sorted(answered),
        QUERY_SELECT,
        _select_content(tau),
        len(COUNTS_VECTOR),
        timeout,
        need,
        set(answered.values()),  # the second sum adds exactly the clients of the first
    )
    sums = dict(zip(COUNTS_VECTOR, (int(v) for v in total), strict=True))
    return Phase1(tau, None, sums, answered, dropped + more, mixture)


def fit_threshold(
    edges: np.ndarray, total: np.ndarray, used: int, scorer, anchor_oriented: np.ndarray
) -> tuple[float, dict]:
    """Fit the mixture to the clients' summed histogram (``used`` clients): (τ, oriented; the
    fields threshold.json records of it)."""
    fit = fit_mixture(edges, total, anchor_oriented)
    log.info(
        "phase 1: mixture fit over %d scores: τ = %.5g (raw %s = %.5g), clean share %.2f",
        int(total.sum()),
        fit.tau,
        scorer.name,
        scorer.raw(fit.tau),
        fit.clean_weight,
    )
    record = {
        "tau": fit.tau,
        "tau_raw": scorer.raw(fit.tau),
        "mixture": asdict(fit),
        "histogram": total.tolist(),
        "clients_in_histogram": used,
    }
    return fit.tau, record
