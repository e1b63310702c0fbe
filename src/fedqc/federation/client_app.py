"""The ClientApp: score local data, keep what passes τ, train LoRA on the kept samples.

Everything per-sample (text, token ids, scores, decisions) stays on the node: it is written to the
node's own output folder and kept in ``context.state``; replies carry counts, the mixture rule's
histogram over fixed bins, and adapter arrays. A node with no kept samples sits out training (the
server does not sample it); under ``quality.secure-sum``, where the server knows only the summed
counts, it is asked and replies a zero-weight update. The secure sum's keys and shares stay in
``context.state`` too (:mod:`fedqc.federation.secure_sum`). For the checkpoint scorers the node
first trains in the warm-up rounds on all its samples and keeps its Adam moments
(``fedqc.federation.warmup``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedqc.config import Config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample, load_samples
from fedqc.data.sources import client_source
from fedqc.federation.privacy import (
    SECURE_STATE_KEY,
    AdapterSpec,
    OutgoingGuard,
    Requirements,
    adapter_spec,
    check_edges,
    noisy_count,
    noisy_histogram,
    note_samples,
)
from fedqc.federation.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    COUNTS_VECTOR,
    HISTOGRAM_VECTOR_COUNTS,
    SECURE_KEYS,
    SECURE_RECORD,
    SECURE_SHARES,
    TRAIN_WARMUP,
    CountsReply,
    EvaluateMetrics,
    HistogramReply,
    KeysReply,
    MaskedReply,
    MaskRequest,
    QueryConfig,
    SelectConfig,
    SharesReply,
    SharesRequest,
    TrainConfig,
    TrainMetrics,
    UnmaskReply,
    UnmaskRequest,
    wire_key,
)
from fedqc.federation.secure_sum import (
    SecureSumError,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
)
from fedqc.federation.warmup import client_scores, save_moments
from fedqc.models.loading import LoadedModel, get_adapter_state, load, set_adapter_state
from fedqc.quality.curriculum import is_stage_start, parse_curriculum, pick, stage_of
from fedqc.quality.mixture import histogram
from fedqc.quality.selection import select
from fedqc.scoring.gradient import moments_from_optimizer
from fedqc.scoring.scorers import get_scorer, is_checkpoint_scorer, score_samples
from fedqc.scoring.warmup import warmup_seed
from fedqc.train.local import evaluate, round_lr, train_steps_with_optimizer

log = logging.getLogger(__name__)
STATE_KEY = "fedqc-selection"  # the keep decisions (phase 2 trains on them)
SCORES_KEY = "fedqc-scores"  # this node's scores from query.score (query.select applies τ)
RELEASED_KEY = "fedqc-released"  # counts already sent, as sent (noisy under DP)


def build_client_app(cfg: Config | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp using ``cfg``, or (when None) the run config that Flower passes.

    Every request first meets this node's requirements (its node config: ``Requirements``),
    and every reply passes the privacy guard, which checks it against the request and this
    node's own adapter, sample count and partition id; extra ``mods`` run outside it (they see
    what leaves).
    """

    def config_of(context: Context) -> Config:
        return cfg if cfg is not None else Config.from_flat(dict(context.run_config), "run config")

    def own_adapter(context: Context) -> AdapterSpec:
        return adapter_spec(load(config_of(context).model).initial_adapter)

    def out_dir(context: Context) -> Path:
        return node_paths(context, config_of(context))[1]

    # The guard wraps the node's requirements, so a refusal leaves with its fixed reason.
    app = ClientApp(
        mods=[*(mods or []), OutgoingGuard(own_adapter), Requirements(config_of, out_dir)]
    )

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        content = handle_score(msg, context, config_of(context))
        return Message(masked_reply(msg, context, content), reply_to=msg)

    @app.query("select")
    def select_(msg: Message, context: Context) -> Message:
        content = handle_select(msg, context, config_of(context))
        return Message(masked_reply(msg, context, content), reply_to=msg)

    # quality.secure-sum: a session's own messages around each data message.
    @app.query("keys")
    def keys(msg: Message, context: Context) -> Message:
        return Message(handle_secure(msg, context), reply_to=msg)

    @app.query("shares")
    def shares(msg: Message, context: Context) -> Message:
        return Message(handle_secure(msg, context), reply_to=msg)

    @app.query("unmask")
    def unmask(msg: Message, context: Context) -> Message:
        return Message(handle_secure(msg, context), reply_to=msg)

    @app.train(mods=[dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        return Message(handle_train(msg, context, config_of(context)), reply_to=msg)

    @app.train("warmup", mods=[dp_clipping_mod])
    def warmup(msg: Message, context: Context) -> Message:
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
    if KEY_CLIPPING_NORM in msg.content.get(CONFIG_RECORD, {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def node_paths(context: Context, cfg: Config) -> tuple[Path, Path, int]:
    """(data file, local output folder, partition id) of this node.

    Deployment: ``--node-config "data-path=... output-dir=..."``. Simulation: the partition id picks
    ``client-<id>.jsonl`` (or .json, .csv, .parquet, a folder) in ``data.clients-dir``.
    """
    node = context.node_config
    pid = int(node.get("partition-id", -1))
    if "data-path" in node:
        data = Path(str(node["data-path"]))
        out = Path(str(node.get("output-dir", data.parent / f"{data.stem}.fedqc")))
        return data, out, pid
    if pid < 0 or not cfg.data.clients_dir:
        raise ValueError("this node has no data: set --node-config data-path=FILE")
    data = client_source(Path(cfg.data.clients_dir), pid)
    if data is None:
        raise ValueError(f"{cfg.data.clients_dir}: holds no data for client {pid}")
    return data, Path(cfg.output.run_dir) / "clients" / f"client-{pid}", pid


def _model(cfg: Config, arrays: ArrayRecord) -> LoadedModel:
    """The trained model with the server's adapter."""
    torch.set_num_threads(max(1, cfg.federation.client_cpus))
    loaded = load(cfg.model)
    set_adapter_state(loaded.model, arrays.to_torch_state_dict())
    return loaded


def _scoring_model(cfg: Config, arrays: ArrayRecord) -> LoadedModel:
    """The model that scores: the trained one with the server's adapter, or a separate scoring
    model (quality.model) with its base weights, the adapter belonging to the trained model."""
    if not cfg.separate_scorer:
        return _model(cfg, arrays)
    torch.set_num_threads(max(1, cfg.federation.client_cpus))
    return load(cfg.scoring_model())


def handle_score(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Phase 1 on a client: score every local sample with the server's settings and model.

    With τ (or a drop fraction) in the config it selects at once and replies counts. With bin edges
    (rule ``mixture``) it keeps its scores in ``context.state`` and replies their histogram over the
    server's bins; :func:`handle_select` then applies the τ the server fitted.
    """
    raw, edges_key = msg.content[CONFIG_RECORD], QueryConfig.key("edges")
    edges = check_edges(raw[edges_key]) if edges_key in raw else None  # before reading any data
    qc = QueryConfig.from_record(raw)
    if qc.model != cfg.scoring_model().name:
        raise ValueError(
            f"server scores with model {qc.model}, this node with {cfg.scoring_model().name}"
        )
    cfg = cfg.replace(**{"model.max-length": qc.max_length})
    data_path, out_dir, pid = node_paths(context, cfg)
    samples = load_samples(data_path)
    note_samples(context, len(samples), cfg.quality.dp_epsilon)
    loaded = _scoring_model(cfg, msg.content[ARRAYS_RECORD])
    name, batch_tokens = qc.scorer, qc.batch_tokens
    start = time.perf_counter()
    calibration = qc.calibration or []
    demonstrations = qc.prefix or []  # shots > 0
    if is_checkpoint_scorer(name):
        scores = client_scores(msg.content, qc, context, loaded, samples, out_dir)
    else:
        scores = _forward_scores(
            loaded, samples, name, calibration, demonstrations, cfg.model.max_length, batch_tokens
        )
    context.state[SCORES_KEY] = ConfigRecord(
        {
            # the scorer's settings, for quality.curriculum's re-scoring at each stage
            "calibration": calibration,
            "prefix": demonstrations,
            "batch-tokens": batch_tokens,
            "max-length": cfg.model.max_length,
            "oriented": np.asarray(scores.oriented, dtype=np.float64).tobytes(),
            "raw": np.asarray(scores.raw, dtype=np.float64).tobytes(),
            "truncated": int(scores.truncated),
            "scorer": name,
            "data": str(data_path),
            "out": str(out_dir),
            "partition-id": pid,
            "seconds": time.perf_counter() - start,
            **loaded.placement.describe(),
        }
    )
    signed = MaskRequest.RECORD in msg.content  # under a secure sum, the noise stays signed
    if edges is not None:
        return _histogram_reply(context, cfg, edges, signed)
    return _select(context, cfg, qc.tau, qc.drop_fraction, signed, samples)


def _forward_scores(
    loaded: LoadedModel,
    samples: list[Sample],
    name: str,
    calibration: list[float],
    demonstrations: list[int],
    max_length: int,
    batch_tokens: int,
):
    """Scores of a forward scorer, with the server's calibration and demonstrations."""
    return score_samples(
        loaded,
        samples,
        get_scorer(name, calibration or None),
        max_length,
        batch_tokens,
        prefixes=[demonstrations] * len(samples),
    )


def handle_select(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """The mixture rule's second message: apply the fitted τ to the scores kept from query.score."""
    tau = SelectConfig.from_record(msg.content[CONFIG_RECORD]).tau
    return _select(context, cfg, tau, None, MaskRequest.RECORD in msg.content)


def _cached_scores(context: Context) -> tuple[ConfigRecord, np.ndarray, np.ndarray]:
    if SCORES_KEY not in context.state:
        raise RuntimeError("query.select before query.score: this node has no scores")
    cache = context.state[SCORES_KEY]
    oriented = np.frombuffer(cache["oriented"], dtype=np.float64)
    return cache, oriented, np.frombuffer(cache["raw"], dtype=np.float64)


def _score_seconds(cache: ConfigRecord, epsilon: float) -> float | None:
    """The scoring time, left out under DP (it tracks data size)."""
    return None if epsilon > 0 else float(cache["seconds"])


def _histogram_reply(
    context: Context, cfg: Config, edges: np.ndarray, signed: bool = False
) -> RecordDict:
    """Counts of this node's scores per bin (Laplace noise per bin under DP: signed under a
    secure sum, which masks them, else clipped at 0), and its totals."""
    cache, oriented, _ = _cached_scores(context)
    epsilon = cfg.quality.dp_epsilon
    counts = histogram(oriented, edges)
    if epsilon > 0:
        hist = noisy_histogram(counts, epsilon, np.random.default_rng(), signed=signed)
    else:
        hist = [int(c) for c in counts]
    released = _release(
        context,
        epsilon,
        signed,
        {
            "total": len(oriented),
            "rejected_non_finite": int((~np.isfinite(oriented)).sum()),
            "truncated": int(cache["truncated"]),
        },
    )
    reply = HistogramReply(
        hist,
        **released,
        partition_id=int(cache["partition-id"]),
        score_seconds=_score_seconds(cache, epsilon),
    )
    return RecordDict({reply.RECORD: reply.to_record()})


def _select(
    context: Context,
    cfg: Config,
    tau: float | None,
    drop: float | None,
    signed: bool = False,
    samples: list[Sample] | None = None,
) -> RecordDict:
    """Keep the cached scores that pass τ (or all but the lowest ``drop`` fraction); counts."""
    cache, oriented, raw = _cached_scores(context)
    samples = samples if samples is not None else load_samples(str(cache["data"]))
    selection = select(oriented, tau=tau, drop_fraction=drop if tau is None else None)
    out_dir = Path(str(cache["out"]))
    true_counts = {
        "total": len(samples),
        "kept": selection.kept,
        "rejected_below_threshold": selection.rejected_below_threshold,
        "rejected_non_finite": selection.rejected_non_finite,
        "truncated": int(cache["truncated"]),
    }
    placement = {k: str(cache[k]) for k in ("device", "dtype", "train_dtype")}
    local_counts = {wire_key(k): v for k, v in true_counts.items()}
    _write_local(
        out_dir, samples, raw, selection.keep, str(cache["scorer"]), tau, local_counts, placement
    )
    epsilon = cfg.quality.dp_epsilon
    counts = _release(context, epsilon, signed, true_counts)
    # Training reports the same (possibly noisy) kept count: repeating a released value is free.
    context.state[STATE_KEY] = ConfigRecord(
        {
            "keep": np.packbits(selection.keep).tobytes(),
            "n": len(samples),
            "data": str(cache["data"]),
            "out": str(out_dir),
            "reported-kept": max(0, counts["kept"]),  # FedAvg's weight: clipped at 0
        }
    )
    reply = CountsReply(
        **counts,
        partition_id=int(cache["partition-id"]),
        score_seconds=_score_seconds(cache, epsilon),
    )
    return RecordDict({reply.RECORD: reply.to_record()})


def _release(
    context: Context, epsilon: float, signed: bool, counts: dict[str, int]
) -> dict[str, int]:
    """The counts as the server gets them: with ε > 0 each with its own Laplace(1/ε) noise, from
    the OS's entropy, drawn once per run; a count sent again (the total in the warm-up and the
    query rounds, the mixture rule's two replies) repeats the released value, which is free.

    The noisy values are kept signed. ``signed`` (a secure sum, whose ring carries them) returns
    them so: the sum over clients is then unbiased. Otherwise each is clipped to [0, the released
    total] (post-processing: no privacy cost), so the guard's kept ≤ total holds under DP too.
    ``counts`` are named by the reply's fields; the released values are kept under their keys."""
    if epsilon <= 0:
        return {k: int(v) for k, v in counts.items()}
    released = context.state.get(RELEASED_KEY, ConfigRecord())
    rng = np.random.default_rng()
    for name, value in counts.items():
        if wire_key(name) not in released:
            released[wire_key(name)] = noisy_count(int(value), epsilon, rng, signed=True)
    context.state[RELEASED_KEY] = released
    values = {k: int(released[wire_key(k)]) for k in counts}
    if signed:
        return values
    total = max(0, int(released["total"])) if "total" in released else None
    return {
        k: max(0, v) if total is None or k == "total" else min(max(0, v), total)
        for k, v in values.items()
    }


def _kept_mask(context: Context) -> np.ndarray:
    if STATE_KEY not in context.state:
        raise RuntimeError("train/evaluate before the quality query round: nothing selected yet")
    state = context.state[STATE_KEY]
    return np.unpackbits(np.frombuffer(state["keep"], dtype=np.uint8))[: int(state["n"])] > 0


def _kept_samples(context: Context) -> list[Sample]:
    keep = _kept_mask(context)
    samples = load_samples(str(context.state[STATE_KEY]["data"]))
    return [s for s, k in zip(samples, keep, strict=True) if k]


def _reported_kept(context: Context) -> int:
    return int(context.state[STATE_KEY]["reported-kept"])


def handle_train(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Phase 2 on a client: local LoRA steps on the kept samples; reply adapter + counts.

    A warm-up round (``train.warmup``, checkpoint scorers) trains on all local samples instead,
    weights by the total, and keeps this node's Adam moments of the round (for ``clues``).
    Batches and LoRA dropout are seeded, and the learning rate set, by the absolute round, so a
    resumed run continues exactly where it stopped.
    """
    tc = TrainConfig.from_record(msg.content[CONFIG_RECORD])
    warmup = msg.metadata.message_type == TRAIN_WARMUP
    absolute_round = int(tc.server_round or 0) + tc.round_offset
    pid = int(context.node_config.get("partition-id", 0))
    seed = tc.seed * 1_000_003 + absolute_round * 1_009 + pid
    if warmup:
        data_path, out_dir, _ = node_paths(context, cfg)
        samples = load_samples(data_path)
        note_samples(context, len(samples), cfg.quality.dp_epsilon)
        weight = _release(context, cfg.quality.dp_epsilon, False, {"total": len(samples)})["total"]
        seed = warmup_seed(tc.seed, absolute_round, pid)
    else:
        samples = _kept_samples(context)
        out_dir, weight = Path(str(context.state[STATE_KEY]["out"])), _reported_kept(context)
    loaded = _model(cfg, msg.content[ARRAYS_RECORD])
    curriculum = None if warmup else parse_curriculum(tc.curriculum or "off")
    if curriculum is not None:  # this round's stage of the kept samples
        samples = _stage_samples(
            context, loaded, samples, out_dir, absolute_round, tc.total_rounds, *curriculum
        )
    journal = out_dir / "train.jsonl"
    phase = {"phase": "warmup"} if warmup else {}
    _journal(journal, {"round": absolute_round, **phase, "event": "start", "kept": len(samples)})
    loss, start = 0.0, time.perf_counter()
    lr = round_lr(tc.lr, tc.lr_schedule, absolute_round, tc.total_rounds)
    if samples:
        tok = loaded.tokenizer
        loss, optimizer = train_steps_with_optimizer(
            loaded.model,
            encode_all(tok, samples, tc.max_length),
            tok.pad_token_id,
            tc.local_steps,
            tc.batch_size,
            lr,
            tc.weight_decay,
            seed,
            cfg.train.gradient_checkpointing,
            loaded.placement,
            tc.proximal_mu or 0.0,  # FedProx (train.strategy=fedprox:MU)
        )
        if warmup:
            save_moments(
                context, out_dir, absolute_round, moments_from_optimizer(loaded.model, optimizer)
            )
    seconds = time.perf_counter() - start
    done = {"round": absolute_round, **phase, "event": "done", "lr": lr, "train-loss": loss}
    _journal(journal, done)
    seconds = None if cfg.quality.dp_epsilon > 0 else seconds  # under DP it tracks data size
    metrics = TrainMetrics(weight, loss, seconds)
    arrays = ArrayRecord(get_adapter_state(loaded.model))
    return RecordDict({ARRAYS_RECORD: arrays, metrics.RECORD: metrics.to_record()})


def _stage_samples(
    context: Context,
    loaded: LoadedModel,
    kept: list[Sample],
    out_dir: Path,
    absolute_round: int,
    rounds: int,
    stages: int,
    once: bool,
) -> list[Sample]:
    """quality.curriculum: the kept samples of this round's stage (fedqc.quality.curriculum).

    At a stage's first round the client ranks its remaining kept samples (re-scored by the global
    adapter ``loaded`` holds, or by the quality round's scores under ``once``) and writes its pick
    to its own ``curriculum.json``; the stage's other rounds, and a resumed run, read it back.
    Nothing about the pick leaves the node: the reply holds the adapter and the kept count, as
    without a curriculum.
    """
    path = out_dir / "curriculum.json"
    stage = stage_of(absolute_round, rounds, stages)
    picks = json.loads(path.read_text()) if path.is_file() else {}
    if is_stage_start(absolute_round, rounds, stages) or str(stage) not in picks:
        picks = {k: v for k, v in picks.items() if int(k) < stage}  # a stale later pick goes
        trained = {i for v in picks.values() for i in v}
        remaining = [i for i in range(len(kept)) if i not in trained]
        cache, oriented, _ = _cached_scores(context)
        if once:
            keep = _kept_mask(context)
            scores = oriented[keep]
        elif remaining:
            scores = np.full(len(kept), np.nan)
            rescored = _forward_scores(
                loaded,
                [kept[i] for i in remaining],
                str(cache["scorer"]),
                [float(x) for x in cache["calibration"]],
                [int(t) for t in cache["prefix"]],
                int(cache["max-length"]),
                int(cache["batch-tokens"]),
            )
            scores[remaining] = rescored.oriented
        else:
            scores = np.array([])
        picks[str(stage)] = pick(scores, remaining, stage, stages)
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(picks) + "\n")
    return [kept[i] for i in picks[str(stage)]]


def _journal(path: Path, entry: dict) -> None:
    """The node's own record of what it did (stays on the node)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": time.time(), **entry}) + "\n")


def handle_evaluate(msg: Message, context: Context, cfg: Config) -> RecordDict:
    """Loss of the global adapter on this client's kept samples (local validation)."""
    kept = _kept_samples(context)
    loaded = _model(cfg, msg.content[ARRAYS_RECORD])
    loss = 0.0
    if kept:
        tok = loaded.tokenizer
        encoded = encode_all(tok, kept, cfg.model.max_length)
        loss = evaluate(loaded.model, encoded, tok.pad_token_id)["eval_loss"]
    metrics = EvaluateMetrics(_reported_kept(context), loss)
    return RecordDict({metrics.RECORD: metrics.to_record()})


def handle_secure(msg: Message, context: Context) -> RecordDict:
    """quality.secure-sum: a session's keys, shares, or unmasking shares
    (:mod:`fedqc.federation.secure_sum`); the session's secrets stay in ``context.state``."""
    kind, asked = msg.metadata.message_type, msg.content[SECURE_RECORD]
    if kind == SECURE_KEYS:
        state, keys = client_keys()
        reply = KeysReply(**keys)
    else:
        state = _secure_state(context)
        if kind == SECURE_SHARES:
            shares = SharesRequest.from_record(asked)
            reply = SharesReply(client_shares(state, shares.slot, shares.pk1, shares.pk2))
        else:
            unmask = UnmaskRequest.from_record(asked)
            reply = UnmaskReply(client_unmask(state, unmask.active, unmask.dead))
    context.state[SECURE_STATE_KEY] = ConfigRecord(state)
    return RecordDict({reply.RECORD: reply.to_record()})


def masked_reply(msg: Message, context: Context, content: RecordDict) -> RecordDict:
    """The reply as sent: unchanged, or under a secure sum (the request carries the session's
    ciphertexts) its counts, or histogram and counts, as one masked vector with the partition id
    (the scoring time is not sent)."""
    if MaskRequest.RECORD not in msg.content:
        return content
    stats = content[CountsReply.RECORD]
    if HistogramReply.key("histogram") in stats:
        hist = HistogramReply.from_record(stats)
        vector = [*hist.histogram, *(stats[k] for k in HISTOGRAM_VECTOR_COUNTS)]
        pid = hist.partition_id
    else:
        vector = [stats[k] for k in COUNTS_VECTOR]
        pid = CountsReply.from_record(stats).partition_id
    state = _secure_state(context)
    asked = MaskRequest.from_record(msg.content[MaskRequest.RECORD])
    reply = MaskedReply(client_mask(state, asked.ciphertexts, vector), pid)
    context.state[SECURE_STATE_KEY] = ConfigRecord(state)
    return RecordDict({reply.RECORD: reply.to_record()})


def _secure_state(context: Context) -> dict:
    if SECURE_STATE_KEY not in context.state:
        raise SecureSumError("a secure-sum step before query.keys")
    return dict(context.state[SECURE_STATE_KEY])


def _write_local(
    out_dir: Path,
    samples: list[Sample],
    raw: np.ndarray,
    keep: np.ndarray,
    scorer: str,
    tau: float | None,
    counts: dict[str, int],
    placement: dict[str, str],
) -> None:
    """Per-sample scores and decisions, and the true counts, written on the node only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as fh:
        for s, score, k in zip(samples, raw, keep, strict=True):
            value = float(score) if np.isfinite(score) else None
            fh.write(json.dumps({"id": s.id, "score": value, "keep": bool(k)}) + "\n")
    summary = {
        "scorer": scorer,
        "tau": tau,
        **counts,
        "placement": placement,
    }
    (out_dir / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")


app = build_client_app()
