"""Differential privacy: Laplace noise on the counts a client reports (quality.dp-epsilon), and
DP-FedAvg through Flower's fixed-clipping wrappers (train.dp-*). In-process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.task_identity import TaskIdentity
from local_grid import LocalGrid, QuietStages
from safetensors.numpy import load_file

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_samples
from fedqc.federation.client_app import STATE_KEY, build_client_app
from fedqc.federation.privacy import (
    adapter_spec,
    check_reply,
    node_facts,
    noisy_count,
    note_samples,
    privacy_budget,
)
from fedqc.federation.protocol import COUNTS, HISTOGRAM_BINS, HISTOGRAM_KEY
from fedqc.federation.server_app import run_server
from fedqc.federation.strategy import ParticipationGrid, QualityFedAvg, build_strategy
from fedqc.models.loading import load


def _config(tiny_model_dir, demo_dir, run_dir: Path, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "anchor-quantile:0.2",
            "train.rounds": 1,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
            **extra,
        }
    )


def test_noisy_count_is_laplace_with_scale_one_over_epsilon_rounded_and_clipped():
    rng = np.random.default_rng(0)
    assert noisy_count(7, 0.0, rng) == 7  # ε = 0: off
    for epsilon in (0.5, 0.25, 2.0):
        draws = np.array([noisy_count(100, epsilon, rng) for _ in range(20_000)])
        assert draws.dtype.kind == "i"
        assert abs(draws.mean() - 100) < 0.1 / epsilon  # unbiased away from 0
        # E|round(Laplace(b))| = b for b = 1/ε, up to rounding (within 0.1); the variance 2b²,
        # plus about 1/12 from rounding
        assert abs(np.abs(draws - 100).mean() - 1 / epsilon) < 0.1
        assert np.var(draws) == pytest.approx(2 / epsilon**2 + 1 / 12, rel=0.1)
    small = np.array([noisy_count(0, 0.5, rng) for _ in range(2_000)])
    assert small.min() == 0 and (small > 0).any()  # clipped at 0, never negative
    signed = np.array([noisy_count(0, 0.5, rng, signed=True) for _ in range(20_000)])
    assert signed.min() < 0 and abs(signed.mean()) < 0.1  # what a secure sum carries: unbiased
    assert small.mean() > 0.5  # clipping biases a count of 0 upwards (about 0.6 at ε = 0.5)


def test_a_client_reports_noisy_counts_and_reuses_them(
    tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: rng(seed or 1234))
    replies = []
    own = adapter_spec(load(ModelConfig(name=str(tiny_model_dir))).initial_adapter)

    def capture(msg, context, call_next):
        reply = call_next(msg, context)
        kind = msg.metadata.message_type
        adapter = own if kind == "train" else None
        check_reply(kind, msg.content, reply.content, node_facts(context, adapter))
        replies.append((kind, reply))
        return reply

    extra = {"quality.dp-epsilon": 0.1, "quality.rule": "fixed:1e9"}  # keeps all 12 (seeded noise)
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    grid = LocalGrid(build_client_app(cfg, [capture]), 2)
    run_server(grid, cfg, QuietStages())
    local = tmp_path / "run" / "clients"
    exact = [json.loads((local / f"client-{i}" / "selection.json").read_text()) for i in (0, 1)]
    stats = {}
    for kind, reply in replies:
        if kind == "query.score":
            stats[int(reply.content["stats"]["partition-id"])] = dict(reply.content["stats"])
    assert sorted(stats) == [0, 1]
    for pid in (0, 1):
        counts = [stats[pid][k] for k in COUNTS]
        assert all(isinstance(c, int) and c >= 0 for c in counts)
        assert "score-seconds" not in stats[pid]  # timing tracks data size: not sent under DP
    # each count is its true value plus its own Laplace(1/ε = 10) draw from the (seeded) stream,
    # rounded, clipped at 0 and to the released total: exactly, so a wrong scale or a missing
    # draw fails
    noise = rng(1234).laplace(0.0, 1 / 0.1, len(COUNTS))
    for pid in (0, 1):
        signed = [round(exact[pid][k] + e) for k, e in zip(COUNTS, noise, strict=True)]
        total = max(0, signed[0])
        expected = [total] + [min(max(0, v), total) for v in signed[1:]]
        assert [stats[pid][k] for k in COUNTS] == expected
    train = [r for kind, r in replies if kind == "train"]
    assert train
    for reply in train:
        metrics = dict(reply.content["metrics"])
        assert "train-seconds" not in metrics
        assert metrics["num-examples"] in {stats[p]["kept"] for p in (0, 1)}


def _adapter_delta(run_dir: Path, initial: dict) -> float:
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    by_key = {k.replace(".default", ""): v.numpy() for k, v in initial.items()}
    return float(np.sqrt(sum(((final[k] - by_key[k]) ** 2).sum() for k in final)))


@pytest.fixture(scope="module")
def initial(tiny_model_dir):
    return load(ModelConfig(name=str(tiny_model_dir))).initial_adapter


def test_dp_fedavg_server_side_clips_and_adds_noise(tiny_model_dir, demo_dir, tmp_path, initial):
    deltas = {}
    for name, extra in {
        "off": {},
        "clip": {"train.dp-mode": "server", "train.dp-noise-multiplier": 0.0},
        "noise": {"train.dp-mode": "server", "train.dp-noise-multiplier": 1.0},
    }.items():
        cfg = _config(
            tiny_model_dir, demo_dir, tmp_path / name, **{"train.dp-clipping-norm": 1e-4, **extra}
        )
        run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
        deltas[name] = _adapter_delta(tmp_path / name, initial)
    assert deltas["off"] > 1e-2  # two AdamW steps at lr 0.01 move the adapter far
    assert deltas["clip"] <= 1e-4 * (1 + 1e-3)  # a mean of updates clipped to 1e-4 (float32)
    # Gaussian noise with std 1.0 × 1e-4 / 2 clients on every one of thousands of coordinates
    n = sum(v.numel() for v in initial.values())
    assert deltas["noise"] == pytest.approx(0.5e-4 * np.sqrt(n), rel=0.2)


def test_dp_fedavg_client_side_clips_before_sending(tiny_model_dir, demo_dir, tmp_path, initial):
    updates = []

    def measure(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            sent, back = msg.content["arrays"], reply.content["arrays"]
            updates.append(
                np.sqrt(sum(((back[k].numpy() - sent[k].numpy()) ** 2).sum() for k in sent))
            )
        return reply

    extra = {"train.dp-mode": "client", "train.dp-noise-multiplier": 0.0}
    cfg = _config(
        tiny_model_dir, demo_dir, tmp_path / "run", **{"train.dp-clipping-norm": 1e-4, **extra}
    )
    run_server(LocalGrid(build_client_app(cfg, [measure]), 2), cfg, QuietStages())
    assert len(updates) == 2 and all(u <= 1e-4 * (1 + 1e-3) for u in updates)
    assert _adapter_delta(tmp_path / "run", initial) <= 1e-4 * (1 + 1e-3)


def test_dp_mode_picks_flowers_wrapper():
    grid = ParticipationGrid(None)
    clients = {11: 0, 12: 1, 13: 2}
    for mode, kind in [
        ("off", QualityFedAvg),
        ("server", DifferentialPrivacyServerSideFixedClipping),
        ("client", DifferentialPrivacyClientSideFixedClipping),
    ]:
        cfg = Config.from_flat({"train.dp-mode": mode, "train.dp-clipping-norm": 0.5})
        strategy = build_strategy(cfg, clients, grid, 0)
        assert type(strategy) is kind
        if mode != "off":
            assert (strategy.clipping_norm, strategy.num_sampled_clients) == (0.5, 3)
            assert strategy.strategy.equal_weights  # DP noise assumes equal client weights


def _message(content: RecordDict, kind: str) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # the server's
    msg = Message(content, dst_node_id=5, message_type=kind)
    msg.metadata.__dict__["_message_id"] = kind
    return msg


def test_a_sampled_client_that_kept_nothing_sends_the_global_adapter_and_zero_losses(
    tiny_model_dir, demo_dir, tmp_path, initial
):
    """Under DP a client whose true kept count is 0 can report a positive noisy one and be
    sampled: it trains on nothing, and what it sends shows that (docs/privacy.md)."""
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **{"quality.dp-epsilon": 1.0})
    data = demo_dir / "clients" / "client-0.jsonl"
    n = len(load_samples(data))
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    context.state[STATE_KEY] = ConfigRecord(
        {
            "keep": np.packbits(np.zeros(n, dtype=bool)).tobytes(),
            "n": n,
            "data": str(data),
            "out": str(tmp_path / "client-0"),
            "reported-kept": 3,  # the noisy kept count it sent
        }
    )
    note_samples(context, n, 1.0)  # what its query.score noted for the guard
    rng = np.random.default_rng(0)
    sent = {
        k: v + torch.from_numpy(rng.normal(0, 0.01, v.shape)).float() for k, v in initial.items()
    }
    train = {"local-steps": 2, "batch-size": 2, "lr": 0.01, "lr-schedule": "constant"}
    train |= {"weight-decay": 0.0, "seed": 0, "max-length": 64, "round-offset": 0}
    train |= {"total-rounds": 1, "server-round": 1}
    app = build_client_app(cfg)
    content = RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord(train)})
    reply = app(_message(content, "train"), context)
    assert dict(reply.content["metrics"]) == {"num-examples": 3, "train-loss": 0.0}
    back = reply.content["arrays"]
    assert all(np.array_equal(back[k].numpy(), v.numpy()) for k, v in sent.items())  # no update
    content = RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({})})
    reply = app(_message(content, "evaluate"), context)
    assert dict(reply.content["metrics"]) == {"num-examples": 3, "eval-loss": 0.0}


def test_the_privacy_budget_adds_up_every_release():
    assert privacy_budget(0.0, mixture=False, warmup=False) is None
    plain = privacy_budget(0.5, mixture=False, warmup=False)
    assert [r["counts"] for r in plain["releases"]] == [
        ["total"],
        ["kept", "rejected-below-threshold", "rejected-non-finite"],
        ["truncated"],
    ]
    assert plain["epsilon_total"] == 1.5 and plain["query_rounds"] == 1
    mixture = privacy_budget(0.5, mixture=True, warmup=True, query_rounds=2)
    assert [(r["message"], r["counts"]) for r in mixture["releases"]] == [
        ("train.warmup", ["total"]),
        ("query.score", ["histogram", "rejected-non-finite"]),
        ("query.score", ["truncated"]),
        ("query.select", ["kept", "rejected-below-threshold"]),
    ]
    assert mixture["epsilon_per_query_round"] == 2.0 and mixture["epsilon_total"] == 4.0
    # every count a client can send is in exactly one release of its rule
    released = [k for r in mixture["releases"] for k in r["counts"]]
    assert sorted(released) == sorted({*COUNTS, HISTOGRAM_KEY})
    released = [k for r in plain["releases"] for k in r["counts"]]
    assert sorted(released) == sorted(COUNTS)


def test_a_resumed_run_adds_its_query_round_to_the_budget(tmp_path):
    from fedqc.federation.server_app import _record_budget
    from fedqc.quality.rules import parse_rule

    (tmp_path / "threshold.json").write_text(json.dumps({"tau": 1.0}))
    cfg = Config.from_flat({"quality.dp-epsilon": 0.25})
    earlier = [{"phase": "query.score"}, {"phase": "train"}, {"phase": "train"}]
    _record_budget(tmp_path, cfg, parse_rule("fixed:1"), False, ({"participation": earlier}, None))
    budget = json.loads((tmp_path / "threshold.json").read_text())["privacy_budget"]
    assert (budget["query_rounds"], budget["epsilon_total"]) == (2, 1.5)


def test_a_mixture_run_states_its_budget_and_draws_noise_only_for_it(
    tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    """Every Laplace draw a client makes is in the budget: count them."""
    from fedqc.federation import client_app, privacy
    from fedqc.pipeline import summarize

    draws = []

    real = privacy.noisy_count

    def counting(value, epsilon, rng, signed=False):
        draws.append(epsilon)
        return real(value, epsilon, rng, signed)

    monkeypatch.setattr(privacy, "noisy_count", counting)  # the histogram's bins
    monkeypatch.setattr(client_app, "noisy_count", counting)  # the counts
    extra = {"quality.dp-epsilon": 0.5, "quality.rule": "mixture", "quality.shots": 0}
    cfg = _config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
    threshold = json.loads((tmp_path / "run" / "threshold.json").read_text())
    budget = threshold["privacy_budget"]
    assert budget["epsilon_total"] == 4 * 0.5 and budget["query_rounds"] == 1
    per_client = sum(
        HISTOGRAM_BINS if k == HISTOGRAM_KEY else 1 for r in budget["releases"] for k in r["counts"]
    )
    assert per_client == 69 and len(draws) == 2 * per_client and set(draws) == {0.5}
    assert summarize(cfg)["privacy_budget"] == budget
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["privacy_budget"] == budget
