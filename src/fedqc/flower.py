"""Quality control as a drop-in for an existing Flower app (Message API).

Server, in the ServerApp's ``main(grid, context)``, before training::

    plan, counts = fedqc.flower.quality_round(grid, anchors, QualityFilter(...), min_nodes=N)

Client, in the ClientApp::

    @app.query("quality")
    def quality(msg, context):
        return fedqc.flower.answer_quality_query(msg, context, load_data(context))

    @app.train()
    def train(msg, context):
        trainset = fedqc.flower.kept(context, load_data(context))  # the kept rows only

One ``query.quality`` message per node carries τ, the scorer settings and the demonstrations'
token ids (fedqc's :class:`QueryConfig`, as `fedqc run`'s ``query.score``). Each node scores its
own dataset with the plan (:meth:`fedqc.filter.QualityPlan.apply`), keeps its decisions in
``context.state`` and replies its counts only (:class:`CountsReply`), which fedqc's privacy guard
checks before they leave; a failure leaves as a fixed reason, never the exception's text.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedqc.errors import FedqcError
from fedqc.federation.privacy import NodeFacts, check_reply, error_for
from fedqc.federation.protocol import QUERY_SCORE, CountsReply, QueryConfig
from fedqc.filter import Data, Model, QualityFilter, QualityPlan, ToSample, subset
from fedqc.quality.rules import parse_rule
from fedqc.scoring.ensemble import is_ensemble
from fedqc.scoring.scorers import get_scorer, is_checkpoint_scorer

log = logging.getLogger(__name__)
QUERY_QUALITY = "query.quality"  # answered by a ClientApp's @app.query("quality")
STATE_KEY = "fedqc-quality"  # a node's keep decisions, in its context.state


def query_config(plan: QualityPlan) -> QueryConfig:
    """The query a plan sends: what every node scores and selects with."""
    if is_checkpoint_scorer(plan.scorer.name):
        raise FedqcError(
            f"scorer '{plan.scorer.name}' scores at a run's warm-up checkpoints: the Flower "
            "drop-in takes forward scorers (ppl, ifd, cond-prob, ensembles, ...)"
        )
    drop = plan.rule.kind == "drop-fraction"
    return QueryConfig(
        scorer=plan.scorer.name,
        rule=str(plan.rule),
        model=plan.model or "",
        max_length=plan.max_length or QualityFilter.max_length,
        batch_tokens=plan.batch_tokens,
        tau=plan.tau,
        drop_fraction=plan.rule.value if drop else None,
        calibration=plan.calibration if is_ensemble(plan.scorer.name) else None,
        prefix=list(plan.prefix) or None,
    )


def plan_of(query: QueryConfig) -> QualityPlan:
    """The plan a node applies: the server's, as the query carries it (no anchor scores)."""
    if is_checkpoint_scorer(query.scorer):
        raise FedqcError(f"scorer '{query.scorer}' needs fedqc run's warm-up checkpoints")
    return QualityPlan(
        get_scorer(query.scorer, query.calibration),
        parse_rule(query.rule),
        query.tau,
        guarantee="",
        shots=0,  # the node gets the demonstrations' token ids, not their number
        prefix=tuple(query.prefix or ()),
        model=query.model or None,
        max_length=query.max_length,
        batch_tokens=query.batch_tokens,
    )


def quality_round(
    grid,
    anchors: Data | None,
    quality: QualityFilter | QualityPlan,
    *,
    model: Model = None,
    to_sample: ToSample | None = None,
    min_nodes: int = 1,
    timeout: float = 3600.0,
    join_timeout: float = 120.0,
) -> tuple[QualityPlan, dict[int, CountsReply]]:
    """The quality round over ``grid``: fit the plan on ``anchors`` (or take a fitted one), send
    it to every node, and return it with each answering node's counts (by node id).

    Waits until ``min_nodes`` nodes have joined, and stops with a FedqcError when fewer answer.
    """
    plan = quality if isinstance(quality, QualityPlan) else quality.fit(anchors, model, to_sample)
    query = query_config(plan)
    nodes = _wait_for_nodes(grid, min_nodes, join_timeout)
    messages = [
        Message(
            RecordDict({query.RECORD: query.to_record()}),
            dst_node_id=node,
            message_type=QUERY_QUALITY,
        )
        for node in nodes
    ]
    counts: dict[int, CountsReply] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("quality query: node %s failed (%s)", node, reply.error.reason)
            continue
        try:
            counts[node] = CountsReply.from_record(reply.content[CountsReply.RECORD])
        except (KeyError, TypeError, ValueError):
            log.warning("quality query: node %s sent malformed counts: left out", node)
    if len(counts) < min_nodes:
        raise FedqcError(
            f"{len(counts)} of {len(nodes)} nodes answered the quality query, fewer than "
            f"min_nodes = {min_nodes} (the nodes' logs say why)"
        )
    kept, total = sum(c.kept for c in counts.values()), sum(c.total for c in counts.values())
    log.info("quality round: %d nodes kept %d of %d samples", len(counts), kept, total)
    return plan, counts


def answer_quality_query(
    msg: Message,
    context: Context,
    dataset: Data,
    *,
    model: Model = None,
    to_sample: ToSample | None = None,
) -> Message:
    """A node's answer: score ``dataset`` with the server's plan, keep the decisions in
    ``context.state`` (:func:`kept` reads them), and reply the counts only.

    ``model``: the scoring model, when this node names it otherwise (e.g. its own folder of the
    same model); default: the name the query carries.
    """
    try:
        plan = plan_of(QueryConfig.from_record(msg.content[QueryConfig.RECORD]))
        selection = plan.apply(dataset, model, to_sample)
        context.state[STATE_KEY] = ConfigRecord({"keep": selection.keep.astype(bool).tobytes()})
        pid = int(context.node_config.get("partition-id", -1))
        counts = CountsReply(**selection.counts(), partition_id=pid)
        content = RecordDict({counts.RECORD: counts.to_record()})
        # the privacy guard, as on fedqc's own nodes: the counts of a score query, no more than
        # this node's samples, its own partition id, and nothing per sample
        facts = NodeFacts(samples=selection.total, partition_id=pid)
        check_reply(QUERY_SCORE, msg.content, content, facts)
        return Message(content, reply_to=msg)
    except Exception as exc:  # the server learns that this node failed, never what it read
        log.exception("quality query failed on this node; the server gets only a fixed reason")
        return Message(error_for(exc), reply_to=msg)


def kept(context: Context, dataset):
    """The rows of ``dataset`` this node kept in the quality round (the dataset it scored)."""
    if STATE_KEY not in context.state:
        raise FedqcError(
            "this node answered no quality query: call fedqc.flower.quality_round in the "
            "ServerApp before training"
        )
    keep = np.frombuffer(context.state[STATE_KEY]["keep"], dtype=bool)
    return subset(dataset, keep)


def _wait_for_nodes(grid, min_nodes: int, join_timeout: float) -> list[int]:
    """The connected nodes, once at least ``min_nodes`` have joined (at start Flower may report
    none)."""
    deadline = time.monotonic() + join_timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise FedqcError(
                f"only {len(nodes)} nodes joined in {join_timeout:.0f} s, fewer than "
                f"min_nodes = {min_nodes}"
            )
        time.sleep(0.5)
    return nodes
