"""train.strategy and train.aggregation: Flower's strategies with fedqc's behaviour around them,
adapter merging, FedProx's proximal term, and a stateful strategy's exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from local_grid import LocalGrid, QuietStages
from safetensors.numpy import load_file

from fedqc.config import Config, ModelConfig
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation import server_app
from fedqc.federation.checkpoint import load_checkpoint
from fedqc.federation.client_app import build_client_app
from fedqc.federation.server_app import run_server
from fedqc.federation.strategy import (
    STRATEGIES,
    ParticipationGrid,
    build_strategy,
    optimizer_state,
    restore_optimizer_state,
)
from fedqc.models.loading import get_adapter_state, load, set_adapter_state
from fedqc.train.local import train_steps
from fedqc.train.merge import merge_adapters, parse_aggregation

FLOWER_CLASS = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
ALL = [
    "fedavg",
    "fedprox:0.1",
    "fedavgm:0.9",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg:0.2",
    "krum:1",
]


def _strategy(value: str, clients: dict[int, int], grid, aggregation: str = "mean", **extra):
    flat = {"train.strategy": value, "train.aggregation": aggregation, **extra}
    return build_strategy(Config.from_flat(flat), clients, grid, 0)


def _reply(node: int, w: list[float], kept: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.array(w, dtype=np.float32))})})
    content["metrics"] = MetricRecord({"num-examples": kept, "train-loss": 0.0})
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


@pytest.fixture
def grid():
    return ParticipationGrid(LocalGrid(ClientApp(), 5))


@pytest.mark.parametrize("value", ALL)
def test_every_strategy_asks_only_the_nodes_that_kept_samples_in_partition_order(value, grid):
    nodes = grid.get_node_ids()  # not in partition order
    clients = {grid.partition[n]: n for n in nodes}
    eligible = {clients[p]: p for p in (3, 0, 4)}  # partitions 1 and 2 kept nothing
    strategy = _strategy(value, eligible, grid)
    start = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.dst_node_id for m in messages] == [clients[0], clients[3], clients[4]]
    assert {m.metadata.message_type for m in messages} == {"train"}
    mu = [m.content["config"].get("proximal-mu") for m in messages]
    assert mu == ([0.1] * 3 if value.startswith("fedprox") else [None] * 3)


def test_the_flower_class_and_its_settings_come_from_the_value(grid):
    adam = _strategy("fedadam:0.01", {1: 0}, grid)
    assert isinstance(adam, FedAdam) and adam.eta == 0.01
    assert _strategy("fedadam", {1: 0}, grid).eta == 1e-3
    assert isinstance(_strategy("fedprox:0.5", {1: 0}, grid), FedProx)
    assert _strategy("fedavgm:0.9", {1: 0}, grid).server_momentum == 0.9
    assert _strategy("fedtrimmedavg:0.25", {1: 0}, grid).beta == 0.25
    krum = _strategy("krum:2", {1: 0}, grid)
    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 2
    assert set(STRATEGIES) == {v.split(":")[0] for v in ALL}
    dp = _strategy("fedadam", {1: 0, 2: 1}, grid, **{"train.dp-mode": "server"})
    assert isinstance(dp.strategy, FedAdam) and dp.strategy.equal_weights


def test_replies_are_aggregated_in_partition_order_whatever_their_arrival(grid):
    strategy = _strategy("fedavg", {7: 1, 5: 0, 9: 2}, grid)
    replies = [_reply(9, [3.0], 1), _reply(5, [1.0], 1), _reply(7, [2.0], 2)]
    seen = []
    strategy.train_metrics_aggr_fn = lambda contents, key: (
        seen.append([float(c["arrays"]["w"].numpy()[0]) for c in contents]) or MetricRecord({})
    )
    strategy.aggregate_train(1, replies)
    assert seen == [[1.0, 2.0, 3.0]]


def test_the_robust_aggregators_resist_one_wild_client(grid):
    honest = [[1.0, -1.0], [1.1, -0.9], [0.9, -1.1], [1.05, -1.0]]

    def replies() -> list[Message]:
        wild = _reply(4, [1e3, 1e3], 10)
        return [_reply(n, w, 10) for n, w in enumerate(honest)] + [wild]

    clients = {n: n for n in range(5)}
    mean, _ = _strategy("fedavg", clients, grid).aggregate_train(1, replies())
    assert mean["w"].numpy()[0] > 100
    for value in ("fedmedian", "fedtrimmedavg:0.2", "krum:1"):
        arrays, _ = _strategy(value, clients, grid).aggregate_train(1, replies())
        assert np.abs(arrays["w"].numpy() - [1.0, -1.0]).max() <= 0.11, value
    assert isinstance(_strategy("fedmedian", clients, grid), FedMedian)


def test_merging_with_a_robust_strategy_is_refused_in_one_line(grid):
    with pytest.raises(FedqcError, match="train.aggregation=merge:ties:0.5 merges adapters"):
        _strategy("krum:1", {1: 0}, grid, "merge:ties:0.5")


def _states(seed: int = 0, n: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(4, 6, generator=g), "b": torch.randn(6, 4, generator=g)}
    clients = []
    for _ in range(n):
        clients.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return base, clients


def test_task_arithmetic_with_sample_share_weights_is_fedavgs_mean():
    base, clients = _states()
    weights = [10, 30, 60]
    merged = merge_adapters(base, clients, weights, "task-arithmetic")
    for key in base:
        mean = sum(w * c[key] for w, c in zip(weights, clients, strict=True)) / 100
        torch.testing.assert_close(merged[key], mean, rtol=1e-5, atol=1e-6)


def test_ties_keeps_the_largest_entries_that_agree_in_sign():
    base = {"w": torch.zeros(4)}
    clients = [
        {"w": torch.tensor([1.0, -2.0, 0.01, 3.0])},
        {"w": torch.tensor([3.0, 2.5, 0.02, -1.0])},
    ]
    merged = merge_adapters(base, clients, [1, 1], "ties", density=0.5)["w"]
    # each keeps its 2 largest entries; entry 0: only client 1's 3.0 survives; entry 1: -2 vs
    # +2.5, the elected sign is +; entry 3: 3.0 vs pruned; entry 2: pruned in both
    assert merged.tolist() == [3.0, 2.5, 0.0, 3.0]
    # with density 1 and agreeing signs, ties is the plain mean
    agree = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    assert merge_adapters({"w": torch.zeros(2)}, agree, [5, 5], "ties")["w"].tolist() == [2, 3]


def test_dare_ties_is_seeded_and_leaves_the_global_rng_alone():
    base, clients = _states()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    one = merge_adapters(base, clients, [1, 1, 1], "dare-ties", 0.5, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the global RNG did not move
    two = merge_adapters(base, clients, [1, 1, 1], "dare-ties", 0.5, seed=7)
    other = merge_adapters(base, clients, [1, 1, 1], "dare-ties", 0.5, seed=8)
    assert all(torch.equal(one[k], two[k]) for k in base)
    assert not all(torch.equal(one[k], other[k]) for k in base)


def test_parse_aggregation():
    assert parse_aggregation("mean") is None
    assert parse_aggregation("merge:ties:0.3") == ("ties", 0.3)
    assert parse_aggregation("merge:dare-ties:1") == ("dare-ties", 1.0)
    assert parse_aggregation("merge:task-arithmetic") == ("task-arithmetic", 1.0)


@pytest.mark.parametrize("value", ["fedadam", "fedyogi", "fedadagrad", "fedavgm:0.9"])
def test_the_server_optimiser_state_survives_a_restart(value, grid):
    """Two rounds in one strategy give what one round, a restart with the saved state, and one
    more round give, bit for bit (the checkpoint's part of an exact resume)."""
    clients = {n: grid.partition[n] for n in grid.get_node_ids()[:3]}
    rng = np.random.default_rng(0)
    rounds = [[rng.normal(size=4).tolist() for _ in clients] for _ in range(2)]

    def step(strategy, r, arrays, server_round):
        list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        replies = [
            _reply(n, w, 5 + i) for i, (n, w) in enumerate(zip(clients, rounds[r], strict=True))
        ]
        return strategy.aggregate_train(server_round, replies)[0]

    start = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    straight = _strategy(value, clients, grid)
    after_two = step(straight, 1, step(straight, 0, start, 1), 2)

    first = _strategy(value, clients, grid)
    after_one = step(first, 0, start, 1)
    saved = optimizer_state(first)
    names = {"momentum/0000"} if value.startswith("fedavgm") else {"m_t/w", "v_t/w"}
    assert saved.keys() == names  # the checkpoint's names, the arrays the strategy holds
    for name, array in saved.items():
        kind, _, key = name.partition("/")
        held = first.momentum_vector[int(key)] if kind == "momentum" else getattr(first, kind)[key]
        assert array.tobytes() == np.asarray(held).tobytes() and array.any()
    resumed = build_strategy(Config.from_flat({"train.strategy": value}), clients, grid, 1)
    restore_optimizer_state(resumed, saved)
    again = step(resumed, 1, after_one, 1)  # the resumed strategy's round 1 is the run's round 2
    assert again["w"].numpy().tobytes() == after_two["w"].numpy().tobytes()


def _config(tiny_model_dir, demo_dir, run_dir, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "anchor-quantile:0.2",
            "train.rounds": 3,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
            **extra,
        }
    )


def test_fedadam_with_dare_ties_resumes_to_the_same_adapter_bit_for_bit(
    tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    """FedAdam's moments and DARE's random drops, across a stop after round 1 and a resume."""
    built = []

    def spy(*args, **kwargs):
        built.append(build_strategy(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(server_app, "build_strategy", spy)
    extra = {
        "train.strategy": "fedadam:0.01",
        "train.aggregation": "merge:dare-ties:0.5",
        "federation.min-nodes": 2,
    }
    straight = _config(tiny_model_dir, demo_dir, tmp_path / "straight", **extra)
    run_server(LocalGrid(build_client_app(straight), 2), straight, QuietStages())

    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "stopped", **extra)
    dying = LocalGrid(build_client_app(cfg), 2, dies={1: ("train", 2)})
    with pytest.raises(FedqcError, match="round 2: only 1 of 2 nodes answered"):
        run_server(dying, cfg, QuietStages())
    state, _ = load_checkpoint(tmp_path / "stopped")
    assert state["round"] == 1 and state["optimizer"] == "optimizer-round-1.npz"
    with np.load(tmp_path / "stopped" / "checkpoint" / state["optimizer"]) as npz:
        saved = {k: npz[k] for k in npz.files}
    resumed = cfg.replace(**{"output.resume": True})
    run_server(LocalGrid(build_client_app(resumed), 2), resumed, QuietStages())

    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    state, last = load_checkpoint(tmp_path / "straight")
    assert state["round"] == 3  # the checkpoint holds the final round's adapter
    # FedAdam's step is computed in float64 (Flower's bias-corrected η is a numpy float64): the
    # checkpoint keeps it so; the saved adapter is it in the model's float32
    last = {k.replace(".default.", "."): v.numpy().astype(np.float32) for k, v in last.items()}
    assert last.keys() == a.keys() and all(last[k].tobytes() == a[k].tobytes() for k in a)
    # the options reached every run's phase 2: FedAdam's η, DARE-TIES merging, and the resumed
    # one counted its rounds from 1 (round_offset) with the moments of the stopped run's round 1
    assert len(built) == 3
    for strategy in built:
        assert isinstance(strategy, FedAdam) and strategy.eta == 0.01
        assert strategy.merge == ("dare-ties", 0.5)
    assert [s.round_offset for s in built] == [0, 0, 1]
    stopped = built[1]  # its moments after round 1 are what the checkpoint holds
    assert saved.keys() == {f"{m}/{k}" for m in ("m_t", "v_t") for k in stopped.m_t}
    for name, array in saved.items():
        kind, _, key = name.partition("/")
        assert array.tobytes() == np.asarray(getattr(stopped, kind)[key]).tobytes(), name


def test_fedprox_keeps_the_local_weights_near_the_global_ones(tiny_model_dir, demo_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=64))
    encoded = encode_all(
        loaded.tokenizer, load_samples(demo_dir / "clients" / "client-0.jsonl"), 64
    )
    start = {k: v.clone() for k, v in get_adapter_state(loaded.model).items()}

    def drift(mu: float) -> float:
        set_adapter_state(loaded.model, start)
        train_steps(loaded.model, encoded, loaded.tokenizer.pad_token_id, 6, 2, 0.05, seed=1,
                    proximal_mu=mu)  # fmt: skip
        now = get_adapter_state(loaded.model)
        return sum(float(((now[k] - start[k]) ** 2).sum()) for k in start)

    free, held = drift(0.0), drift(1e4)
    assert free > 0 and held < 0.5 * free


@pytest.mark.parametrize(
    ("strategy", "aggregation"),
    [(value, "mean") for value in ALL]
    + [("fedavg", a) for a in ("merge:task-arithmetic", "merge:ties:0.5", "merge:dare-ties:0.5")],
)
def test_every_strategy_and_aggregation_runs_a_whole_federation(
    strategy, aggregation, tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    """Each option end to end (phase 1, a training round, evaluation, the saved adapter), with
    the Flower class that the name stands for (listed here, not read from fedqc's table)."""
    built = []

    def spy(*args, **kwargs):
        built.append(build_strategy(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(server_app, "build_strategy", spy)
    cfg = _config(
        tiny_model_dir,
        demo_dir,
        tmp_path / "run",
        **{
            "train.strategy": strategy,
            "train.aggregation": aggregation,
            "train.rounds": 1,
            "train.local-steps": 1,
            "federation.min-nodes": 2,
        },
    )
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
    (phase_2,) = built
    flower = next(c for c in type(phase_2).__mro__ if c.__module__.startswith("flwr."))
    assert flower is FLOWER_CLASS[strategy.split(":")[0]]
    assert phase_2.merge == parse_aggregation(aggregation)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    initial = get_adapter_state(load(ModelConfig(name=str(tiny_model_dir), max_length=64)).model)
    assert adapter.keys() == {k for k in initial}
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert all(not initial[k].any() for k in adapter if "lora_B" in k)  # LoRA's B starts at 0
    assert any(np.abs(adapter[k]).max() > 0 for k in adapter if "lora_B" in k)  # and was trained


# Each strategy's server update, recomputed here from the published formulas on known inputs:
# two rounds of five clients' replies (two arrays each, unequal sample counts), starting from a
# non-zero global adapter. The strategy comes from fedqc's own construction path (build_strategy),
# so a name wired to the wrong Flower class, or a setting that does not reach it, fails.
X0 = {"a": np.array([[0.5, -1.0], [2.0, 0.0]]), "b": np.array([0.25, -0.75, 1.5])}
WEIGHTS = [10, 30, 20, 5, 35]
ROUNDS = [
    [
        {"a": X0["a"] + d, "b": X0["b"] + e}
        for d, e in zip(
            np.random.default_rng(seed).normal(0.0, 0.5, size=(5, 2, 2)),
            np.random.default_rng(seed + 100).normal(0.0, 0.5, size=(5, 3)),
            strict=True,
        )
    ]
    for seed in (26, 2)  # 26: Krum picks another client with f = 0 than with f = 1
]


def _replies_of(
    updates: list[dict[str, np.ndarray]], weights: list[int], nodes: list[int]
) -> list[Message]:
    """Partition p's reply comes from node ``nodes[p]``."""
    replies = []
    for node, update, kept in zip(nodes, updates, weights, strict=True):
        arrays = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in update.items()})
        content = RecordDict({"arrays": arrays})
        content["metrics"] = MetricRecord({"num-examples": kept, "train-loss": 0.0})
        reply = Message(
            content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train")
        )
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    return replies[::-1]  # arrival order is not partition order


def _run_two_rounds(value: str, grid, round_offset: int = 0) -> list[dict[str, np.ndarray]]:
    """The global adapter after each of two rounds of fedqc's strategy ``value``."""
    nodes = [grid.node_of[p] for p in range(5)]
    clients = {node: p for p, node in enumerate(nodes)}
    strategy = build_strategy(
        Config.from_flat({"train.strategy": value}), clients, grid, round_offset
    )
    arrays = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in X0.items()})
    out = []
    for server_round, updates in enumerate(ROUNDS, start=1):
        list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        arrays, _ = strategy.aggregate_train(server_round, _replies_of(updates, WEIGHTS, nodes))
        out.append({k: arrays[k].numpy().astype(np.float64) for k in X0})
    return out


def _stack(updates: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([u[key].astype(np.float32).astype(np.float64) for u in updates])


def _weighted_mean(updates, weights) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: np.tensordot(w, _stack(updates, k), axes=1) for k in X0}


def _krum(updates, f: int) -> dict[str, np.ndarray]:
    """Blanchard et al. 2017: the update whose n − f − 2 nearest others are nearest (squared L2)."""
    flat = np.stack([np.concatenate([_stack([u], k).ravel() for k in X0]) for u in updates])
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    m = len(updates) - f - 2
    scores = [np.sort(np.delete(d[i], i))[:m].sum() for i in range(len(updates))]
    best = updates[int(np.argmin(scores))]
    return {k: _stack([best], k)[0] for k in X0}


def _trimmed_mean(updates, beta: float) -> dict[str, np.ndarray]:
    cut = int(beta * len(updates))
    return {k: np.sort(_stack(updates, k), axis=0)[cut : len(updates) - cut].mean(0) for k in X0}


def _fedopt(kind: str, eta: float, offset: int) -> list[dict[str, np.ndarray]]:
    """Reddi et al. 2021 (Adaptive Federated Optimization), Algorithm 2, with Flower's defaults
    β1 = 0.9, β2 = 0.99, τ = 1e-3 (FedAdagrad: β1 = 0) and Flower's Adam bias correction, which
    counts round r as step r + 1; r is the run's absolute round (round_offset + the round)."""
    beta1, beta2, tau = (0.0 if kind == "adagrad" else 0.9), 0.99, 1e-3
    x = dict(X0)
    m = {k: np.zeros_like(v) for k, v in X0.items()}
    v = {k: np.zeros_like(v) for k, v in X0.items()}
    out = []
    for r, updates in enumerate(ROUNDS, start=1 + offset):
        delta = {k: _weighted_mean(updates, WEIGHTS)[k] - x[k] for k in X0}
        m = {k: beta1 * m[k] + (1 - beta1) * delta[k] for k in X0}
        if kind == "adam":
            v = {k: beta2 * v[k] + (1 - beta2) * delta[k] ** 2 for k in X0}
            step = eta * np.sqrt(1 - beta2 ** (r + 1)) / (1 - beta1 ** (r + 1))
        elif kind == "yogi":
            v = {k: v[k] - (1 - beta2) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2) for k in X0}
            step = eta
        else:
            v = {k: v[k] + delta[k] ** 2 for k in X0}
            step = eta
        x = {k: x[k] + step * m[k] / (np.sqrt(v[k]) + tau) for k in X0}
        out.append(x)
    return out


def _fedavgm(momentum: float) -> list[dict[str, np.ndarray]]:
    """Hsu et al. 2019: server SGD with momentum β on the pseudo-gradient x − mean, lr 1."""
    x, buf, out = dict(X0), None, []
    for updates in ROUNDS:
        grad = {k: x[k] - _weighted_mean(updates, WEIGHTS)[k] for k in X0}
        buf = grad if buf is None else {k: momentum * buf[k] + grad[k] for k in X0}
        x = {k: x[k] - buf[k] for k in X0}
        out.append(x)
    return out


def _each_round(rule) -> list[dict[str, np.ndarray]]:
    return [rule(updates) for updates in ROUNDS]


EXPECTED = {
    "fedavg": lambda: _each_round(lambda u: _weighted_mean(u, WEIGHTS)),
    "fedprox:0.1": lambda: _each_round(lambda u: _weighted_mean(u, WEIGHTS)),
    "fedavgm:0.9": lambda: _fedavgm(0.9),
    "fedavgm:0.5": lambda: _fedavgm(0.5),
    "fedadam": lambda: _fedopt("adam", 1e-3, 0),  # fedqc's default η is 1e-3, not Flower's 0.1
    "fedadam:0.05": lambda: _fedopt("adam", 0.05, 0),
    "fedyogi": lambda: _fedopt("yogi", 1e-3, 0),
    "fedyogi:0.05": lambda: _fedopt("yogi", 0.05, 0),
    "fedadagrad": lambda: _fedopt("adagrad", 1e-3, 0),
    "fedadagrad:0.05": lambda: _fedopt("adagrad", 0.05, 0),
    "fedmedian": lambda: _each_round(lambda u: {k: np.median(_stack(u, k), axis=0) for k in X0}),
    "fedtrimmedavg:0.2": lambda: _each_round(lambda u: _trimmed_mean(u, 0.2)),
    "fedtrimmedavg:0.1": lambda: _each_round(lambda u: _trimmed_mean(u, 0.1)),  # no cut: unweighted
    "krum:1": lambda: _each_round(lambda u: _krum(u, 1)),
    "krum:0": lambda: _each_round(lambda u: _krum(u, 0)),
}


def _assert_update(got: dict, want: dict, start: dict, label: str) -> None:
    """The server's step (new − old), to 1e-3 of its size: float32's rounding of the adapter."""
    for k in X0:
        step, expected = got[k] - start[k], want[k] - start[k]
        np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-6, err_msg=f"{label} {k}")


@pytest.mark.parametrize("value", list(EXPECTED))
def test_each_strategys_two_updates_are_its_published_formula(value, grid):
    assert set(STRATEGIES) == {v.split(":")[0] for v in EXPECTED}  # every strategy is here
    got, want = _run_two_rounds(value, grid), EXPECTED[value]()
    _assert_update(got[0], want[0], X0, f"{value} round 1")
    _assert_update(got[1], want[1], want[0], f"{value} round 2")


def test_fedadams_bias_correction_counts_the_runs_absolute_rounds(grid):
    """A resumed run (round_offset 3) corrects FedAdam's step for rounds 4 and 5, not 1 and 2."""
    got, want = _run_two_rounds("fedadam:0.05", grid, round_offset=3), _fedopt("adam", 0.05, 3)
    _assert_update(got[0], want[0], X0, "round 4")
    assert not np.allclose(want[0]["a"], _fedopt("adam", 0.05, 0)[0]["a"], rtol=1e-4, atol=0)


def test_different_strategies_give_different_adapters_on_the_same_replies(grid):
    """The inputs tell every strategy apart (so the formula test above could not pass by two
    names sharing one class), except FedProx, whose server step is FedAvg's by design."""
    results = {v: _run_two_rounds(v, grid) for v in EXPECTED}
    names = list(results)
    for i, one in enumerate(names):
        for two in names[i + 1 :]:
            same = all(
                np.allclose(a[k], b[k], rtol=1e-5)
                for a, b in zip(results[one], results[two], strict=True)
                for k in X0
            )
            assert same == ({one, two} == {"fedavg", "fedprox:0.1"}), (one, two)
