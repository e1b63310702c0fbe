"""Phase 2's strategy: FedAvg over the nodes that kept samples, tolerant of nodes that drop out.

- :class:`ParticipationGrid` wraps Flower's Grid and records, for every exchange, which nodes were
  asked and which answered (and why the others did not). A training round with fewer answers than
  the minimum stops the run; the last checkpoint stays, so it can be resumed.
- :class:`QualityFedAvg` is Flower's FedAvg with three changes: it samples only the connected nodes
  that kept samples in the quality round (the others sit out; under ``quality.secure-sum``, where
  the server does not know who kept nothing, every node that answered it, and a round in which
  only zero-weight replies come keeps the adapter), it aggregates replies in a fixed
  order (FedAvg's float sums are then the same on every run), and it can weight clients equally
  (needed by DP-FedAvg, whose noise assumes equal weights).
- :func:`build_strategy` wraps it in Flower's DP-FedAvg wrappers when ``train.dp-mode`` asks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedqc.config import Config
from fedqc.errors import FedqcError

log = logging.getLogger(__name__)
NO_REPLY = "no reply within federation.timeout"


class ParticipationGrid:
    """A Grid that records who was asked and who answered in every exchange.

    ``exchanges`` holds one entry per ``send_and_receive``: the round (set by the strategy), the
    message type, the node ids asked, those that answered, and the others with the reason.
    ``min_answers`` maps a message type to the fewest answers it needs; fewer raises FedqcError.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.round = 0
        self.exchanges: list[dict] = []
        self.min_answers: dict[str, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if not messages:
            return replies
        # A SuperLink-made error (node gone) comes from the SuperLink, not the node: map every
        # reply to its node through the id of the message it answers.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        asked = sorted(node_of.values())
        answered, reasons = [], {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                reasons[node] = reply.error.reason
            else:
                answered.append(node)
        kind = messages[0].metadata.message_type
        dropped = [
            {"node": n, "reason": reasons.get(n, NO_REPLY)} for n in asked if n not in answered
        ]
        self.exchanges.append(
            {
                "round": self.round,
                "phase": kind,
                "sampled": asked,
                "answered": sorted(answered),
                "dropped": dropped,
            }
        )
        for d in dropped:
            log.warning("%s, round %d: node %s dropped (%s)", kind, self.round, *d.values())
        need = self.min_answers.get(kind, 0)
        if len(answered) < need:
            raise FedqcError(
                f"{kind}, round {self.round}: only {len(answered)} of {len(asked)} nodes "
                f"answered, fewer than the {need} required (federation.min-nodes); the last "
                "checkpoint is kept: resume once enough nodes are back"
            )
        return replies

    def of_round(self, server_round: int, phase: str) -> dict | None:
        """The last exchange of one phase ('train' or 'evaluate') in one round."""
        found = [e for e in self.exchanges if e["round"] == server_round and e["phase"] == phase]
        return found[-1] if found else None


class QualityFedAvg(FedAvg):
    """FedAvg on the nodes that kept samples, in a fixed order; rounds counted from an offset.

    ``clients`` maps each eligible node id (kept > 0 in the quality round; every node that
    answered it under quality.secure-sum) to its partition id,
    which orders the aggregation. ``train_metrics`` holds the aggregated metrics per absolute
    round. FedAvg itself keeps no state between rounds beyond its settings, so the checkpoint's
    global adapter, round and participation log are the whole strategy state.
    """

    def __init__(
        self,
        clients: dict[int, int],
        grid: ParticipationGrid,
        round_offset: int = 0,
        fraction_evaluate: float = 0.0,
        equal_weights: bool = False,
        seed: int = 0,
        message_type: str = MessageType.TRAIN,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if fraction_evaluate else 0,
            min_available_nodes=1,
        )
        self.clients, self.recorder = dict(clients), grid
        self.round_offset, self.equal_weights, self.seed = round_offset, equal_weights, seed
        self.message_type = message_type  # "train", or "train.warmup" for the warm-up rounds
        self.train_metrics: dict[int, dict] = {}

    def _connected(self, grid: Grid) -> list[int]:
        connected = set(grid.get_node_ids())
        return sorted((n for n in self.clients if n in connected), key=self._order)

    def _order(self, node: int) -> tuple[int, int]:
        return (self.clients.get(node, 1 << 62), node)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.round = server_round + self.round_offset
        nodes = self._connected(grid)
        if not nodes:
            raise FedqcError(
                f"round {self.recorder.round}: none of the {len(self.clients)} nodes with kept "
                "samples is connected; resume once they are back"
            )
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, self.message_type)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._connected(grid)
        k = min(len(nodes), max(1, int(len(nodes) * self.fraction_evaluate)))
        rng = random.Random(self.seed * 7_919 + self.recorder.round)
        chosen = sorted(rng.sample(nodes, k), key=self._order)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda m: self._order(m.metadata.src_node_id))
        if self.equal_weights:
            for reply in ordered:
                if not reply.has_error():
                    for record in reply.content.metric_records.values():
                        record[self.weighted_by_key] = 1
        if self._all_weightless(ordered):
            # quality.secure-sum: the server does not know who kept nothing, so such nodes are
            # asked too; a round in which only they answered leaves the adapter as it was.
            log.warning(
                "round %d: every node that answered kept no samples: the adapter stays as it was",
                server_round + self.round_offset,
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, ordered)
        if metrics is not None:
            self.train_metrics[server_round + self.round_offset] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        if self._all_weightless(replies):  # as in aggregate_train: nothing to average
            return None
        return super().aggregate_evaluate(server_round, replies)

    def _all_weightless(self, replies: list[Message]) -> bool:
        """Every reply weighs 0 (FedAvg would divide by 0): only nodes that kept nothing."""
        if self.equal_weights:
            return False
        weights = [
            float(record.get(self.weighted_by_key, 0))
            for reply in replies
            if not reply.has_error()
            for record in reply.content.metric_records.values()
        ]
        return bool(weights) and not any(weights)


def build_strategy(
    cfg: Config,
    clients: dict[int, int],
    grid: ParticipationGrid,
    round_offset: int,
    message_type: str = MessageType.TRAIN,
) -> Strategy:
    """QualityFedAvg, wrapped in Flower's fixed-clipping DP-FedAvg when train.dp-mode asks.

    The warm-up rounds (``message_type`` "train.warmup") use it too, without client evaluation.
    """
    t = cfg.train
    base = QualityFedAvg(
        clients,
        grid,
        round_offset=round_offset,
        fraction_evaluate=cfg.federation.fraction_evaluate
        if message_type == MessageType.TRAIN
        else 0.0,
        equal_weights=t.dp_mode != "off",
        seed=t.seed,
        message_type=message_type,
    )
    if t.dp_mode == "off":
        return base
    wrapper = {
        "server": DifferentialPrivacyServerSideFixedClipping,
        "client": DifferentialPrivacyClientSideFixedClipping,
    }[t.dp_mode]
    return wrapper(base, t.dp_noise_multiplier, t.dp_clipping_norm, len(clients))
