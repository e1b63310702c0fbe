"""The ClientApp: score local data, keep what passes τ, train LoRA on the kept samples.

Everything per-sample (text, token ids, scores, decisions) stays on the node: it is written to the
node's own output folder and kept in ``context.state``; replies carry counts and adapter arrays.
A node with no kept samples sits out training (the server does not sample it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedqc.config import Config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample, load_samples
from fedqc.federation.privacy import noisy_count, outgoing_guard
from fedqc.models.loading import LoadedModel, get_adapter_state, load, set_adapter_state
from fedqc.quality.selection import select
from fedqc.scoring.scorers import get_scorer, score_samples
from fedqc.train.local import evaluate, train_steps

log = logging.getLogger(__name__)
STATE_KEY = "fedqc-selection"


def build_client_app(cfg: Config | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp using ``cfg``, or (when None) the run config that Flower passes.

    Every reply passes the privacy guard; extra ``mods`` run outside it (they see what leaves).
    """
    app = ClientApp(mods=[*(mods or []), outgoing_guard])

    def config_of(context: Context) -> Config:
        return cfg if cfg is not None else Config.from_flat(dict(context.run_config), "run config")

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        return Message(handle_score(msg, context, config_of(context)), reply_to=msg)

    @app.train(mods=[dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        return Message(handle_train(msg, context, config_of(context)), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return Message(handle_evaluate(msg, context, config_of(context)), reply_to=msg)

    return app


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """DP-FedAvg with client-side clipping: Flower's ``fixedclipping_mod`` when the server asks.

    The server's ``DifferentialPrivacyClientSideFixedClipping`` puts the clipping norm in the
    training config; without it (no DP, or server-side clipping) the reply passes unchanged.
    """
    if KEY_CLIPPING_NORM in msg.content.get("config", {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def round_lr(lr: float, schedule: str, absolute_round: int, total_rounds: int) -> float:
    """The learning rate of one round: constant, or cosine from lr down to lr/10 over the run.

    It depends on the absolute round (counted from the start of the run, across resumes).
    """
    if schedule == "cosine" and total_rounds > 1:
        low, progress = lr / 10, (absolute_round - 1) / (total_rounds - 1)
        return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr


def node_paths(context: Context, cfg: Config) -> tuple[Path, Path, int]:
    """(data file, local output folder, partition id) of this node.

    Deployment: ``--node-config "data-path=... output-dir=..."``. Simulation: the partition id picks
    ``client-<id>.jsonl`` in ``data.clients-dir``.
    """
    node = context.node_config
    pid = int(node.get("partition-id", -1))
    if "data-path" in node:
        data = Path(str(node["data-path"]))
        out = Path(str(node.get("output-dir", data.parent / f"{data.stem}.fedqc")))
        return data, out, pid
    if pid < 0 or not cfg.data.clients_dir:
        raise ValueError("this node has no data: set --node-config data-path=FILE")
    data = Path(cfg.data.clients_dir) / f"client-{pid}.jsonl"
    return data, Path(cfg.output.run_dir) / "clients" / f"client-{pid}", pid


def _model(cfg: Config, arrays: ArrayRecord) -> LoadedModel:
    torch.set_num_threads(max(1, cfg.federation.client_cpus))
    loaded = load(cfg.model)
    set_adapter_state(loaded.model, arrays.to_torch_state_dict())
    return loaded


def handle_score(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Phase 1 on a client: score every local sample with the server's settings and model."""
    qc = msg.content["config"]
    if str(qc["model"]) != cfg.model.name:
        raise ValueError(f"server scores with model {qc['model']}, this node has {cfg.model.name}")
    cfg = cfg.replace(**{"model.max-length": int(qc["max-length"])})
    data_path, out_dir, pid = node_paths(context, cfg)
    samples = load_samples(data_path)
    loaded = _model(cfg, msg.content["arrays"])
    calibration = [float(x) for x in qc["calibration"]] if "calibration" in qc else None
    scorer = get_scorer(str(qc["scorer"]), calibration)
    start = time.perf_counter()
    scores = score_samples(loaded, samples, scorer, cfg.model.max_length, int(qc["batch-tokens"]))
    seconds = time.perf_counter() - start
    tau, drop = float(qc["tau"]), float(qc["drop-fraction"])
    selection = select(
        scores.oriented,
        tau=None if math.isnan(tau) else tau,
        drop_fraction=drop if math.isnan(tau) else None,
    )
    _write_local(out_dir, samples, scores.raw, selection.keep, str(qc["scorer"]), tau)
    counts = {
        "total": len(samples),
        "kept": selection.kept,
        "rejected-below-threshold": selection.rejected_below_threshold,
        "rejected-non-finite": selection.rejected_non_finite,
        "truncated": scores.truncated,
    }
    epsilon = cfg.quality.dp_epsilon
    if epsilon > 0:  # every count with its own Laplace(1/ε) noise, from the OS's entropy
        rng = np.random.default_rng()
        counts = {k: noisy_count(v, epsilon, rng) for k, v in counts.items()}
    # Training reports the same (possibly noisy) kept count: repeating a released value is free.
    context.state[STATE_KEY] = ConfigRecord(
        {
            "keep": np.packbits(selection.keep).tobytes(),
            "n": len(samples),
            "data": str(data_path),
            "out": str(out_dir),
            "reported-kept": counts["kept"],
        }
    )
    extra = {"partition-id": pid} | ({} if epsilon > 0 else {"score-seconds": seconds})
    return RecordDict({"stats": MetricRecord(counts | extra)})


def _kept_samples(context: Context) -> list[Sample]:
    if STATE_KEY not in context.state:
        raise RuntimeError("train/evaluate before the quality query round: nothing selected yet")
    state = context.state[STATE_KEY]
    samples = load_samples(str(state["data"]))
    keep = np.unpackbits(np.frombuffer(state["keep"], dtype=np.uint8))[: int(state["n"])]
    return [s for s, k in zip(samples, keep, strict=True) if k]


def _reported_kept(context: Context) -> int:
    return int(context.state[STATE_KEY]["reported-kept"])


def handle_train(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Phase 2 on a client: local LoRA steps on the kept samples; reply adapter + counts.

    Batches and LoRA dropout are seeded, and the learning rate set, by the absolute round, so a
    resumed run continues exactly where it stopped.
    """
    tc = msg.content["config"]
    kept = _kept_samples(context)
    absolute_round = int(tc["server-round"]) + int(tc.get("round-offset", 0))
    journal = Path(str(context.state[STATE_KEY]["out"])) / "train.jsonl"
    _journal(journal, {"round": absolute_round, "event": "start", "kept": len(kept)})
    loaded = _model(cfg, msg.content["arrays"])
    loss, start = 0.0, time.perf_counter()
    lr = round_lr(
        float(tc["lr"]),
        str(tc.get("lr-schedule", "constant")),
        absolute_round,
        int(tc.get("total-rounds", 1)),
    )
    if kept:
        tok = loaded.tokenizer
        pid = int(context.node_config.get("partition-id", 0))
        seed = int(tc["seed"]) * 1_000_003 + absolute_round * 1_009 + pid
        loss = train_steps(
            loaded.model,
            encode_all(tok, kept, int(tc["max-length"])),
            tok.pad_token_id,
            int(tc["local-steps"]),
            int(tc["batch-size"]),
            lr,
            float(tc["weight-decay"]),
            seed,
        )
    seconds = time.perf_counter() - start
    _journal(journal, {"round": absolute_round, "event": "done", "lr": lr, "train-loss": loss})
    metrics = {"num-examples": _reported_kept(context), "train-loss": loss}
    if cfg.quality.dp_epsilon <= 0:
        metrics["train-seconds"] = seconds
    arrays = ArrayRecord(get_adapter_state(loaded.model))
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


def _journal(path: Path, entry: dict) -> None:
    """The node's own record of what it did (stays on the node)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": time.time(), **entry}) + "\n")


def handle_evaluate(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Loss of the global adapter on this client's kept samples (local validation)."""
    kept = _kept_samples(context)
    loaded = _model(cfg, msg.content["arrays"])
    loss = 0.0
    if kept:
        tok = loaded.tokenizer
        encoded = encode_all(tok, kept, cfg.model.max_length)
        loss = evaluate(loaded.model, encoded, tok.pad_token_id)["eval_loss"]
    metrics = {"num-examples": _reported_kept(context), "eval-loss": loss}
    return RecordDict({"metrics": MetricRecord(metrics)})


def _write_local(
    out_dir: Path, samples: list[Sample], raw: np.ndarray, keep: np.ndarray, scorer: str, tau: float
) -> None:
    """Per-sample scores and decisions, written on the node only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as fh:
        for s, score, k in zip(samples, raw, keep, strict=True):
            value = float(score) if np.isfinite(score) else None
            fh.write(json.dumps({"id": s.id, "score": value, "keep": bool(k)}) + "\n")
    summary = {
        "scorer": scorer,
        "tau": None if math.isnan(tau) else tau,
        "total": len(samples),
        "kept": int(keep.sum()),
    }
    (out_dir / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")


app = build_client_app()
