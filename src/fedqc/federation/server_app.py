"""The ServerApp: τ from the anchors, a query round for selection, then FedAvg on kept data.

Checkpoint scorers (tracin, tracin-cos, clues, datainf, icl, nuggets) first run
``quality.warmup-rounds`` federated warm-up rounds on the unfiltered data
(:mod:`fedqc.federation.warmup`); the rule ``mixture`` adds a second query message
(:mod:`fedqc.federation.query`). Phase 2 always starts from the initial adapter.

Fault tolerance: nodes that fail or vanish drop out of a round and the run goes on while at least
``federation.min-nodes`` answer; who dropped when goes to ``metrics.json`` and
``participation.json``. After every round a checkpoint is saved; ``output.resume`` continues from
it (``fedqc run --resume RUN_DIR``).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedqc.config import Config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.checkpoint import (
    CHECKPOINT_DIR,
    load_optimizer,
    resume_point,
    save_checkpoint,
)
from fedqc.federation.privacy import privacy_budget, server_learns
from fedqc.federation.protocol import ARRAYS_RECORD, QUERY_SCORE, QueryConfig
from fedqc.federation.query import query_round
from fedqc.federation.strategy import (
    ParticipationGrid,
    build_strategy,
    optimizer_state,
    restore_optimizer_state,
    round_row,
    run_rounds,
)
from fedqc.federation.warmup import query_payload, run_warmup
from fedqc.models.loading import load, set_adapter_state
from fedqc.quality.plan import few_shot_prefix, plan_from_anchors, plan_shots, write_json
from fedqc.quality.rules import Rule, parse_rule
from fedqc.scoring.ensemble import is_ensemble
from fedqc.scoring.scorers import any_scorer, batch_tokens_for, is_checkpoint_scorer
from fedqc.scoring.warmup import (
    WARMUP_DIR,
    WARMUP_FILE,
    anchor_side,
    finished_warmup,
    load_warmup,
)
from fedqc.train.local import evaluate

log = logging.getLogger(__name__)
# What a run writes into its run directory (a new run refuses to write over them).
OUTPUTS = (
    "threshold.json",
    "selection.json",
    "metrics.json",
    "adapter",
    CHECKPOINT_DIR,
    WARMUP_FILE,
    WARMUP_DIR,
)


class Stages(Protocol):
    """Where the server reports its progress (the CLI draws it as progress bars)."""

    def stage(self, description: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _LogStages:
    def stage(self, description: str, total: int | None = None) -> None:
        log.info("%s", description)

    def advance(self, n: int = 1) -> None:
        pass


def build_server_app(cfg: Config | None = None, stages: Stages | None = None) -> ServerApp:
    """A ServerApp using ``cfg``, or (when None) the run config that Flower passes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(
            grid,
            cfg or Config.from_flat(dict(context.run_config), "run config"),
            stages or _LogStages(),
        )

    return app


def run_server(grid: Grid, cfg: Config, stages: Stages) -> None:
    """The run: phase 0 (checkpoint scorers) federated warm-up, phase 1 quality (τ from the
    anchors, the clients score and select), phase 2 federated LoRA on the kept samples."""
    run_dir = _run_dir(cfg)
    resumed = resume_point(run_dir, cfg) if cfg.output.resume else None
    grid = ParticipationGrid(grid)
    nodes = _connect(grid, cfg, stages)
    loaded = load(cfg.model)
    scorer, rule = any_scorer(cfg.quality.scorer), parse_rule(cfg.quality.rule)
    eval_set = _eval_set(cfg, loaded)
    history: list[dict] = list(resumed[0]["history"]) if resumed else []
    checkpoints = None
    if warmup := _phase0_warmup(cfg, grid, loaded, run_dir, nodes, eval_set, stages, resumed):
        checkpoints, rows = warmup
        history.extend(rows)
    tau, selection = _phase1_quality(
        cfg, grid, loaded, run_dir, nodes, stages, scorer, rule, checkpoints, resumed
    )
    initial = ArrayRecord(loaded.initial_adapter)
    _phase2_training(
        cfg, grid, loaded, run_dir, stages, tau, selection, initial, resumed, eval_set, history
    )


def _connect(grid: ParticipationGrid, cfg: Config, stages: Stages) -> list[int]:
    """The nodes of the run, once they have joined."""
    stages.stage("waiting for nodes")
    nodes = wait_for_nodes(
        grid, cfg.data.num_clients, cfg.federation.min_nodes, cfg.federation.join_timeout
    )
    if cfg.quality.secure_sum and len(nodes) < 2:
        raise FedqcError(
            f"quality.secure-sum needs at least 2 nodes: {len(nodes)} connected (a sum over one "
            "client is its own counts)"
        )
    return nodes


def _phase0_warmup(
    cfg: Config,
    grid: ParticipationGrid,
    loaded,
    run_dir: Path,
    nodes: list[int],
    eval_set: list,
    stages: Stages,
    resumed: tuple[dict, ArrayRecord] | None,
) -> tuple[list, list[dict]] | None:
    """Checkpoint scorers: federated warm-up rounds on the unfiltered data give θ_k, η_k:
    (checkpoints, metrics rows of the rounds run now); None for the other scorers. A run resumed
    in phase 2 reads its checkpoints back."""
    if not is_checkpoint_scorer(cfg.quality.scorer):
        return None
    if resumed is not None:
        return load_warmup(run_dir), []
    w = cfg.quality.warmup_rounds
    done = finished_warmup(run_dir, cfg) if cfg.output.resume else ([], [])
    if done[0]:
        log.info("resuming the warm-up after round %d of %d", len(done[0]), w)
    stages.stage(f"warm-up: {w} federated LoRA rounds on the unfiltered data", w - len(done[0]))
    return run_warmup(cfg, grid, loaded, run_dir, nodes, eval_set, stages.advance, done)


def _phase1_quality(
    cfg: Config,
    grid: ParticipationGrid,
    loaded,
    run_dir: Path,
    nodes: list[int],
    stages: Stages,
    scorer,
    rule: Rule,
    checkpoints: list | None,
    resumed: tuple[dict, ArrayRecord] | None,
) -> tuple[float | None, dict]:
    """The anchor plan sets τ (a resumed run reuses the saved τ); the query round carries it
    (or the mixture's bin edges), the scorer settings and the initial adapter (checkpoint
    scorers: also the checkpoints, anchor info) to the clients, which score and select
    locally. (τ, selection.json)."""
    scoring = load(cfg.scoring_model()) if cfg.separate_scorer else loaded  # quality.model
    plan = _plan(cfg, scoring, scorer, rule, stages, checkpoints, resumed)
    # The trained model's adapter; a separate scoring model scores with its base weights.
    initial = ArrayRecord(loaded.initial_adapter)
    stages.stage(f"phase 1: {len(nodes)} clients score and select locally")
    if plan.threshold is not None:
        write_json(run_dir / "threshold.json", plan.threshold)
    _record_budget(run_dir, cfg, rule, checkpoints is not None, resumed)  # before they answer
    _update_threshold(run_dir, {"server_learns": server_learns(cfg)})
    phase1 = query_round(
        grid,
        nodes,
        cfg,
        plan.query,
        {ARRAYS_RECORD: initial, **plan.records},
        plan.scorer,
        plan.anchor_oriented,
        _resumed_clients(cfg, resumed),
    )
    if phase1.mixture is not None:  # rule mixture: the record of the τ query.select carried
        _update_threshold(run_dir, phase1.mixture)
    tau, selection = phase1.tau, _selection(phase1, rule)
    write_json(run_dir / "selection.json", selection)
    if resumed is not None and cfg.quality.dp_epsilon <= 0:
        _check_same_selection(resumed[0]["selection"], selection)
    sums = phase1.sums
    log.info("phase 1: kept %d of %d samples", sums["kept"], sums["total"])
    if phase1.clients is None:
        log.info(
            "phase 1: secure sum over %d clients: the server has only the sums of phase 1; "
            "phase 2 replies still carry each client's kept count and adapter",
            len(phase1.nodes),
        )
    for s in selection["clients"] or []:
        if s["sat-out"]:
            log.warning("client %s kept no samples: it sits out training", s["partition-id"])
    if sums["kept"] <= 0 and not cfg.quality.allow_empty:  # a noisy secure sum may be < 0
        where = (
            "the rule" if tau is None else f"τ = {plan.scorer.raw(tau):.6g} ({plan.scorer.name})"
        )
        raise FedqcError(
            f"{where} drops every sample in the federation; use a looser quality.rule "
            "(e.g. anchor-quantile:0.1), or allow it with --allow-empty (quality.allow-empty)"
        )
    return tau, selection


def _resumed_clients(cfg: Config, resumed: tuple[dict, ArrayRecord] | None) -> set[int] | None:
    """A resumed secure-sum run: the partition ids its secure sums added, which this start's
    sums must add exactly (else the difference of the two would be one client's counts)."""
    if resumed is None or not cfg.quality.secure_sum:
        return None
    saved = resumed[0]["selection"]
    if isinstance(saved, list):  # a checkpoint written before selection.json held the nodes
        return {int(s.get("partition-id", -1)) for s in saved}
    return {int(n["partition-id"]) for n in saved.get("nodes", [])}


def _run_dir(cfg: Config) -> Path:
    """The run directory; a new run does not write over another run's outputs unless forced."""
    o = cfg.output
    if o.resume and not o.run_dir:
        raise FedqcError("output.resume needs output.run-dir: the run directory to continue")
    run_dir = Path(o.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    earlier = [name for name in OUTPUTS if (run_dir / name).exists()]
    if earlier and not o.resume:
        if not o.force:
            raise FedqcError(
                f"{run_dir}: holds the outputs of an earlier run ({', '.join(earlier)}); resume "
                "it (fedqc run --resume, output.resume=true), or overwrite it (--force, "
                "output.force=true)"
            )
        for name in (CHECKPOINT_DIR, "rounds", "adapter", WARMUP_DIR):  # no stale rounds
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / WARMUP_FILE).unlink(missing_ok=True)  # nor a stale warm-up to resume from
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _eval_set(cfg: Config, loaded) -> list:
    if not cfg.data.eval:
        return []
    eval_set = encode_all(loaded.tokenizer, load_samples(cfg.data.eval), cfg.model.max_length)
    if n := sum(e.truncated for e in eval_set):
        log.warning("%d evaluation samples are longer than model.max-length: truncated", n)
    return eval_set


def _anchors(cfg: Config, who: str) -> list:
    if not cfg.data.anchors:
        raise FedqcError(f"{who} needs an anchor set: set data.anchors=FILE")
    return load_samples(cfg.data.anchors)


@dataclass(frozen=True)
class ServerPlan:
    """Phase 1 on the server: the (calibrated) scorer, τ on the oriented scale (None for
    drop-fraction and for mixture, fitted after the histograms), the anchors' oriented scores,
    the query message with its records, and threshold.json's record (None for a resumed run:
    it keeps its own)."""

    scorer: object
    tau: float | None
    anchor_oriented: np.ndarray | None
    query: QueryConfig
    records: dict[str, ArrayRecord]
    threshold: dict | None


def _plan(
    cfg: Config, loaded, scorer, rule: Rule, stages: Stages, checkpoints, resumed
) -> ServerPlan:
    """The anchor plan (:func:`fedqc.quality.plan.plan_from_anchors`) and the query message.

    Checkpoint scorers: the anchor info is always needed (the anchors' mean gradients or tokens);
    the anchors are scored at the same checkpoints when the rule needs their scores. A resumed
    run keeps its τ and its threshold.json (an ensemble re-calibrates on the anchors).
    """
    checkpoint = checkpoints is not None
    shots = plan_shots(scorer.name, cfg.quality.shots, bool(cfg.data.anchors))
    anchors = None
    if checkpoint or rule.needs_anchors or shots:
        anchors = _anchors(cfg, f"scorer '{scorer.name}'" if checkpoint else f"rule '{rule}'")
    records, anchor_scores, warmup = {}, None, {}
    fresh = resumed is None or is_ensemble(scorer.name)
    if checkpoint:
        if fresh:
            stages.stage(
                f"phase 1: {len(anchors)} anchors at {len(checkpoints)} warm-up checkpoints "
                f"({scorer.name})"
            )
        info, anchor_scores = anchor_side(
            cfg, loaded, anchors, checkpoints, with_scores=fresh and rule.needs_anchors
        )
        records = query_payload(checkpoints, info)
        warmup = {"fingerprint": info.fingerprint, "checkpoint_lrs": [c.lr for c in checkpoints]}
    if not fresh:
        log.info("resuming after round %d with the saved τ", resumed[0]["round"])
        prefix = few_shot_prefix(loaded, anchors, shots, cfg.model.max_length)
        tau = resumed[0]["tau"]
        query = _query_config(cfg, scorer, rule, tau, prefix, None, warmup)
        return ServerPlan(scorer, tau, None, query, records, None)
    if not checkpoint and rule.needs_anchors:
        stages.stage(
            f"phase 1: scoring {len(anchors)} anchors ({scorer.name}, {shots} shots)",
            len(anchors) * (2 if scorer.needs_bare else 1),
        )
    plan = plan_from_anchors(
        loaded,
        anchors,
        scorer,
        rule,
        shots=shots,
        max_length=cfg.model.max_length,
        batch_tokens=cfg.quality.batch_tokens,
        on_batch=stages.advance,
        anchor_scores=anchor_scores,
    )
    threshold = plan.record() | {
        "model": cfg.scoring_model().name,
        "max_length": cfg.model.max_length,
        "placement": loaded.placement.describe(),
    }
    if checkpoint:
        threshold |= {
            "fingerprint": warmup["fingerprint"],
            "warmup_rounds": len(checkpoints),
            "checkpoint_lrs": warmup["checkpoint_lrs"],
        }
    query = _query_config(cfg, plan.scorer, rule, plan.tau, plan.prefix, plan.edges, warmup)
    return ServerPlan(plan.scorer, plan.tau, plan.anchor_oriented, query, records, threshold)


def _query_config(
    cfg: Config,
    scorer,
    rule: Rule,
    tau: float | None,
    prefix: tuple[int, ...],
    edges: list[float] | None,
    warmup: dict,
) -> QueryConfig:
    """query.score's settings: what every client scores and selects with."""
    q = cfg.quality
    return QueryConfig(
        scorer=scorer.name,
        rule=str(rule),
        model=cfg.scoring_model().name,
        max_length=cfg.model.max_length,
        batch_tokens=batch_tokens_for(q.scorer, q.batch_tokens, q.backward_batch_tokens),
        tau=tau,
        drop_fraction=rule.value if rule.kind == "drop-fraction" else None,
        calibration=scorer.calibration if is_ensemble(scorer.name) else None,
        prefix=list(prefix) or None,
        edges=edges,
        **warmup,
    )


def _record_budget(
    run_dir: Path,
    cfg: Config,
    rule: Rule,
    warmup: bool,
    resumed: tuple[dict, ArrayRecord] | None,
) -> None:
    """threshold.json's ``privacy_budget``: what one client's noisy counts cost this run so far
    (:func:`fedqc.federation.privacy.privacy_budget`), counting the query rounds of the earlier
    starts of a resumed run (from its checkpoint's participation log) and this one."""
    earlier = resumed[0]["participation"] if resumed else []
    rounds = 1 + sum(e["phase"] == QUERY_SCORE for e in earlier)
    budget = privacy_budget(cfg.quality.dp_epsilon, rule.needs_histograms, warmup, rounds)
    _update_threshold(run_dir, {"privacy_budget": budget})
    if budget is not None:
        log.info(
            "privacy: ε = %.4g per client for the counts (basic composition, %d releases × "
            "ε = %.4g, %d query round(s))",
            budget["epsilon_total"],
            len(budget["releases"]),
            budget["epsilon"],
            rounds,
        )


def _update_threshold(run_dir: Path, fields: dict) -> None:
    """Add ``fields`` to the run's record threshold.json (the server reads nothing back)."""
    path = run_dir / "threshold.json"
    write_json(path, json.loads(path.read_text()) | fields)


def _selection(phase1, rule: Rule) -> dict:
    """selection.json: τ, the rule, each node that answered phase 1 with its partition id, the
    counts summed over them, and per client its counts and whether it sits out training. Under
    quality.secure-sum the server has no per-client counts: ``clients`` is None."""
    clients = None
    if phase1.clients is not None:
        clients = sorted(phase1.clients, key=lambda s: (s.get("partition-id", -1), s["node"]))
        for s in clients:
            s["sat-out"] = int(s["kept"]) == 0
    return {
        "tau": phase1.tau,
        "rule": str(rule),
        "secure_sum": phase1.clients is None,
        "sums": phase1.sums,
        "nodes": [
            {"node": n, "partition-id": pid}
            for n, pid in sorted(phase1.nodes.items(), key=lambda x: (x[1], x[0]))
        ],
        "clients": clients,
        "dropped": phase1.dropped,
    }


def _check_same_selection(saved: dict | list, now: dict) -> None:
    """A resumed run must select what the interrupted one did (scoring is deterministic): each
    client's counts, or under a secure sum the summed ones when the same clients answered."""
    if isinstance(saved, list):  # a checkpoint written before selection.json held the sums
        saved = {"clients": saved, "sums": None}
    if saved.get("clients") is None or now["clients"] is None:
        old, new = saved.get("sums"), now["sums"]

        def pids(selection: dict) -> list[int]:
            return sorted(n["partition-id"] for n in selection.get("nodes", []))

        if pids(saved) != pids(now):  # two sums over other clients subtract to a client's counts
            raise FedqcError(
                f"cannot resume: under quality.secure-sum the run summed clients {pids(saved)}, "
                f"now {pids(now)}; a changed client set would reveal the difference"
            )
        if old is None:
            return
        if (old["total"], old["kept"]) != (new["total"], new["kept"]):
            raise FedqcError(
                f"cannot resume: the federation now keeps {new['kept']} of {new['total']} "
                f"samples, but kept {old['kept']} of {old['total']} when the run started; its "
                "data or the model changed"
            )
        return
    before = {s["partition-id"]: s for s in saved["clients"] if s.get("partition-id", -1) >= 0}
    for s in now["clients"]:
        old = before.get(s.get("partition-id", -1))
        if old is not None and (old["total"], old["kept"]) != (s["total"], s["kept"]):
            raise FedqcError(
                f"cannot resume: client {s['partition-id']} now keeps {s['kept']} of "
                f"{s['total']} samples, but kept {old['kept']} of {old['total']} when the run "
                "started; its data or the model changed"
            )


def _phase2_training(
    cfg: Config,
    grid: ParticipationGrid,
    loaded,
    run_dir: Path,
    stages: Stages,
    tau: float | None,
    selection: dict,
    initial: ArrayRecord,
    resumed: tuple[dict, ArrayRecord] | None,
    eval_set: list,
    history: list[dict],
) -> None:
    offset = resumed[0]["round"] if resumed else 0
    if resumed:
        grid.exchanges[:0] = resumed[0]["participation"]
    start = resumed[1] if resumed else initial
    if selection["clients"] is None:  # secure sum: who kept nothing is not known; all train
        clients = {int(s["node"]): int(s["partition-id"]) for s in selection["nodes"]}
    else:
        clients = {
            int(s["node"]): int(s.get("partition-id", -1))
            for s in selection["clients"]
            if s["kept"] > 0
        }
    strategy = build_strategy(cfg, clients, grid, offset)
    if resumed:  # FedAdam's moments, FedAvgM's momentum: as they were after the last round
        restore_optimizer_state(strategy, load_optimizer(run_dir, resumed[0]))
    final = {"arrays": start}

    def on_round(r: int, arrays: ArrayRecord, initial: bool) -> MetricRecord | None:
        final["arrays"] = arrays
        if resumed and initial:  # evaluated before the interruption
            return None
        set_adapter_state(loaded.model, arrays.to_torch_state_dict())
        loaded.model.save_pretrained(run_dir / "rounds" / f"round-{r}")
        metrics: dict = {"round": r}
        if eval_set:
            metrics |= evaluate(
                loaded.model, eval_set, loaded.tokenizer.pad_token_id, cfg.quality.batch_tokens
            )
            log.info(
                "round %d: eval loss %.4f (ppl %.2f)", r, metrics["eval_loss"], metrics["eval_ppl"]
            )
        history.append(dict(metrics) | round_row(strategy, grid, r, ("train", "evaluate")))
        if r:
            stages.advance()
            save_checkpoint(
                run_dir,
                {
                    "round": r,
                    "rounds": cfg.train.rounds,
                    "tau": tau,
                    "selection": selection,
                    "history": history,
                    "participation": grid.exchanges,
                    "strategy": _describe(strategy),
                    "config": cfg.to_flat(),
                },
                arrays,
                optimizer_state(strategy),
            )
        return (
            MetricRecord({k: v for k, v in metrics.items() if k != "round"}) if eval_set else None
        )

    remaining = cfg.train.rounds - offset
    if clients and remaining > 0:
        stages.stage(f"phase 2: federated LoRA, rounds {offset + 1}–{cfg.train.rounds}", remaining)
        rounds = (offset, cfg.train.rounds)
        run_rounds(cfg, grid, strategy, start, rounds, on_round, cfg.quality.curriculum)
    else:
        if not clients:
            log.warning("no client kept a sample: no training rounds (quality.allow-empty)")
        on_round(offset, start, True)
    set_adapter_state(loaded.model, final["arrays"].to_torch_state_dict())
    loaded.model.save_pretrained(run_dir / "adapter")
    write_json(run_dir / "participation.json", grid.exchanges)
    _write_history(run_dir, history)


def _describe(strategy) -> dict:
    base = getattr(strategy, "strategy", strategy)
    out = {"name": type(strategy).__name__, "base": type(base).__name__}

    if base is not strategy:
        out |= {
            "noise-multiplier": strategy.noise_multiplier,
            "clipping-norm": strategy.clipping_norm,
        }
    return out


def wait_for_nodes(grid: Grid, expected: int, minimum: int, join_timeout: float) -> list[int]:
    """Poll until ``expected`` nodes are connected (at start Flower may report none).

    After ``join_timeout`` seconds the run goes on with the nodes there, if at least ``minimum``.
    """
    deadline = time.monotonic() + join_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= minimum:
                log.warning(
                    "only %d of %d nodes joined; going on without the rest", len(nodes), expected
                )
                return nodes
            raise FedqcError(
                f"only {len(nodes)} of {expected} nodes connected in {join_timeout:.0f} s "
                f"(federation.join-timeout), fewer than federation.min-nodes = {minimum}"
            )
        time.sleep(0.5)


def _write_history(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / "metrics.json", history)
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )


app = build_server_app()
