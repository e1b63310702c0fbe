"""Phase 2's strategy: FedAvg over the nodes that kept samples, tolerant of nodes that drop out.

- :class:`ParticipationGrid` wraps Flower's Grid and records, for every exchange, which nodes were
  asked and which answered (and why the others did not). A training round with fewer answers than
  the minimum stops the run; the last checkpoint stays, so it can be resumed.
- :func:`quality_strategy` puts fedqc's behaviour around any of Flower's FedAvg-family classes
  (``train.strategy``: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian,
  FedTrimmedAvg, Krum): it samples only the connected nodes that kept samples in the quality round
  (the others sit out; under ``quality.secure-sum``, where the server does not know who kept
  nothing, every node that answered it, and a round in which only zero-weight replies come keeps
  the adapter), it aggregates replies in a fixed order (float sums are then the same on every
  run), it can weight clients equally (needed by DP-FedAvg, whose noise assumes equal weights),
  and it can merge the adapters instead of averaging them (``train.aggregation``,
  :mod:`fedqc.train.merge`). :data:`QualityFedAvg` is FedAvg with it.
- :func:`optimizer_state` and :func:`restore_optimizer_state` carry the server optimiser's state
  (FedAdam's moments, FedAvgM's momentum) through the checkpoint.
- :func:`build_strategy` builds the configured one and wraps it in Flower's DP-FedAvg wrappers
  when ``train.dp-mode`` asks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from functools import cache

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedqc.config import Config
from fedqc.errors import FedqcError
from fedqc.federation.protocol import TRAIN_WARMUP, TrainConfig
from fedqc.train.merge import merge_adapters, parse_aggregation

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


class _Selection(FedAvg):
    """The lower half of a fedqc strategy, under Flower's strategy class: which nodes are asked
    (in a fixed order), and the mean (FedAvg's) or the merge of their adapters.

    Flower's subclasses of FedAvg (FedProx, FedAvgM, FedAdam, ...) do their own work around
    ``configure_train`` and ``aggregate_train`` and call FedAvg's: placed between them and FedAvg,
    this class replaces FedAvg's random sampling and, under ``train.aggregation = merge:...``, its
    mean. The robust ones (FedMedian, FedTrimmedAvg, Krum) aggregate without calling it.
    """

    clients: dict[int, int]
    recorder: ParticipationGrid
    round_offset: int
    seed: int
    message_type: str
    merge: tuple[str, float] | None

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
        self._global = arrays  # the task vectors of a merge are the clients' changes to it
        config[TrainConfig.key("server_round")] = server_round
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
        config[TrainConfig.key("server_round")] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted mean, or the merge of the adapters (``server_round`` is absolute)."""
        if self.merge is None:
            return super().aggregate_train(server_round, replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        method, density = self.merge
        states = [m.content[self.arrayrecord_key].to_torch_state_dict() for m in valid]
        weights = [
            float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])
            for m in valid
        ]
        merged = merge_adapters(
            self._global.to_torch_state_dict(),
            states,
            weights,
            method,
            density,
            seed=self.seed * 1_000_003 + server_round,
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord({k: Array(v.numpy()) for k, v in merged.items()}), metrics


class _Replies:
    """The upper half of a fedqc strategy, over Flower's strategy class: what every strategy does
    with the replies before Flower's class sees them.

    It orders them by partition id (float sums are then the same on every run), gives them equal
    weights when ``equal_weights`` (DP-FedAvg's noise assumes equal weights), skips a round in
    which every reply weighs 0 (under quality.secure-sum only nodes that kept nothing answered:
    the adapter stays), passes the absolute round down (FedAdam's bias correction counts rounds:
    a resumed run must count them from the start of the run) and records the metrics.
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
        merge: tuple[str, float] | None = None,
        **settings,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if fraction_evaluate else 0,
            min_available_nodes=1,
            **settings,
        )
        self.clients, self.recorder = dict(clients), grid
        self.round_offset, self.equal_weights, self.seed = round_offset, equal_weights, seed
        self.message_type = message_type  # "train", or "train.warmup" for the warm-up rounds
        self.merge = merge
        self.train_metrics: dict[int, dict] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.round_offset
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
                absolute,
            )
            return None, None
        arrays, metrics = super().aggregate_train(absolute, ordered)
        if metrics is not None:
            self.train_metrics[absolute] = dict(metrics)
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


@cache
def quality_strategy(flower_strategy: type[FedAvg]) -> type:
    """Flower's strategy class with fedqc's behaviour around it (see _Replies and _Selection)."""
    middle = () if flower_strategy is FedAvg else (flower_strategy,)
    name = f"Quality{flower_strategy.__name__}"
    return type(name, (_Replies, *middle, _Selection), {"__doc__": quality_strategy.__doc__})


QualityFedAvg = quality_strategy(FedAvg)
# train.strategy: Flower's class, and its settings from the value's parameter (None: no parameter).
# FedOpt's server learning rate eta (FedAdam, FedYogi, FedAdagrad) is OpenFedLLM's 1e-3 rather
# than Flower's 0.1, a step too large for LoRA weights of order 1e-2; "fedadam:ETA" sets it.
STRATEGIES: dict[str, tuple[type[FedAvg], Callable[[str | None], dict]]] = {
    "fedavg": (FedAvg, lambda p: {}),
    "fedprox": (FedProx, lambda p: {"proximal_mu": float(p)}),
    "fedavgm": (FedAvgM, lambda p: {"server_momentum": float(p)}),
    "fedadam": (FedAdam, lambda p: {"eta": float(p or 1e-3)}),
    "fedyogi": (FedYogi, lambda p: {"eta": float(p or 1e-3)}),
    "fedadagrad": (FedAdagrad, lambda p: {"eta": float(p or 1e-3)}),
    "fedmedian": (FedMedian, lambda p: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda p: {"beta": float(p)}),
    "krum": (Krum, lambda p: {"num_malicious_nodes": int(p)}),
}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")  # they aggregate their own way: no merge


def check_strategy(cfg: Config) -> None:
    """Stop on a train.aggregation that train.strategy cannot use (one line, before the run)."""
    name = cfg.train.strategy.partition(":")[0]
    if cfg.train.aggregation != "mean" and name in ROBUST:
        raise FedqcError(
            f"train.aggregation={cfg.train.aggregation} merges adapters, which "
            f"train.strategy={cfg.train.strategy} does not (it picks or trims them its own "
            "way); use train.aggregation=mean, or a strategy that averages"
        )


def optimizer_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The server optimiser's state (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum), for
    the checkpoint: names "m_t/<key>", "v_t/<key>", "momentum/<i>"; empty for the others."""
    base = getattr(strategy, "strategy", strategy)
    state = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(base, name, None) or {}).items():
            state[f"{name}/{key}"] = np.asarray(value)
    for i, value in enumerate(getattr(base, "momentum_vector", None) or []):
        state[f"momentum/{i:04d}"] = np.asarray(value)
    return state


def restore_optimizer_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put :func:`optimizer_state`'s arrays back into a new strategy of the same kind."""
    base = getattr(strategy, "strategy", strategy)
    for name in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
        if values:
            setattr(base, name, values)
    momentum = [state[k] for k in sorted(state) if k.startswith("momentum/")]
    if momentum:
        base.momentum_vector = momentum


def build_strategy(
    cfg: Config,
    clients: dict[int, int],
    grid: ParticipationGrid,
    round_offset: int,
    message_type: str = MessageType.TRAIN,
) -> Strategy:
    """train.strategy's Flower class with fedqc's behaviour (:func:`quality_strategy`) and
    train.aggregation, wrapped in Flower's fixed-clipping DP-FedAvg when train.dp-mode asks.

    The warm-up rounds (``message_type`` "train.warmup") use FedAvg's mean, without client
    evaluation: they only make the checkpoints the scorers score with.
    """
    t = cfg.train
    name, _, parameter = t.strategy.partition(":")
    merge = parse_aggregation(t.aggregation)
    if message_type == TRAIN_WARMUP:  # the warm-up rounds only make checkpoints to score with
        name, parameter, merge = "fedavg", "", None
    check_strategy(cfg)
    flower_strategy, settings = STRATEGIES[name]
    base = quality_strategy(flower_strategy)(
        clients,
        grid,
        round_offset=round_offset,
        fraction_evaluate=cfg.federation.fraction_evaluate
        if message_type == MessageType.TRAIN
        else 0.0,
        equal_weights=t.dp_mode != "off",
        seed=t.seed,
        message_type=message_type,
        merge=merge,
        **settings(parameter or None),
    )
    if t.dp_mode == "off":
        return base
    wrapper = {
        "server": DifferentialPrivacyServerSideFixedClipping,
        "client": DifferentialPrivacyClientSideFixedClipping,
    }[t.dp_mode]
    return wrapper(base, t.dp_noise_multiplier, t.dp_clipping_norm, len(clients))


def train_config(
    cfg: Config, offset: int, total_rounds: int, curriculum: str | None = None
) -> ConfigRecord:
    """What every training round (warm-up and phase 2) tells the clients: the local steps and
    the schedule's place (``offset`` rounds done of ``total_rounds``); phase 2 adds the
    curriculum (``quality.curriculum``)."""
    t = cfg.train
    return TrainConfig(
        local_steps=t.local_steps,
        batch_size=t.batch_size,
        lr=t.lr,
        lr_schedule=t.lr_schedule,
        weight_decay=t.weight_decay,
        seed=t.seed,
        max_length=cfg.model.max_length,
        round_offset=offset,
        total_rounds=total_rounds,
        curriculum=curriculum,
    ).to_record()


def run_rounds(
    cfg: Config,
    grid: ParticipationGrid,
    strategy: Strategy,
    start: ArrayRecord,
    rounds: tuple[int, int],
    on_round: Callable[[int, ArrayRecord, bool], MetricRecord | None],
    curriculum: str | None = None,
) -> None:
    """The round loop of the warm-up and of phase 2: rounds ``done + 1 .. total`` (``rounds`` is
    (done, total)) of ``strategy`` from the adapter ``start``, each needing the answers of
    federation.min-nodes of its clients (fewer if it has fewer). ``on_round(r, arrays, initial)``
    records the global adapter after absolute round r (and once before the first round, with
    ``initial`` True) and returns the server-side metrics of it."""
    done, total = rounds
    base = getattr(strategy, "strategy", strategy)
    need = min(cfg.federation.min_nodes, max(1, len(base.clients)))
    grid.min_answers = {base.message_type: need}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return on_round(server_round + done, arrays, server_round == 0)

    strategy.start(
        grid=grid,
        initial_arrays=start,
        num_rounds=total - done,
        timeout=cfg.federation.timeout,
        train_config=train_config(cfg, done, total, curriculum),
        evaluate_fn=evaluate_fn,
    )


def round_row(strategy, grid: ParticipationGrid, r: int, phases: tuple[str, ...]) -> dict:
    """metrics.json's fields of round ``r``: the clients' aggregated training metrics, and who
    was sampled, answered and dropped in each of ``phases`` (message types)."""
    base = getattr(strategy, "strategy", strategy)
    row = {f"train_{k.replace('-', '_')}": v for k, v in base.train_metrics.get(r, {}).items()}
    for phase in phases:
        exchange = grid.of_round(r, phase) if r else None
        if exchange is not None:
            prefix = "evaluate" if phase == "evaluate" else "train"
            row[f"{prefix}_sampled"] = exchange["sampled"]
            row[f"{prefix}_answered"] = exchange["answered"]
            row[f"{prefix}_dropped"] = [d["node"] for d in exchange["dropped"]]
    return row
