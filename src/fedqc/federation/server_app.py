"""The ServerApp: τ from the anchors, one query round for selection, then FedAvg on kept data."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedqc.config import Config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.protocol import QUERY_SCORE
from fedqc.models.loading import load, set_adapter_state
from fedqc.quality.rules import global_threshold, parse_rule
from fedqc.scoring.scorers import get_scorer, score_samples
from fedqc.train.local import evaluate

log = logging.getLogger(__name__)


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
    run_dir = Path(cfg.output.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    stages.stage("waiting for nodes")
    nodes = wait_for_nodes(
        grid, cfg.federation.min_nodes or cfg.data.num_clients, cfg.federation.timeout
    )
    loaded = load(cfg.model)
    scorer, rule = get_scorer(cfg.quality.scorer), parse_rule(cfg.quality.rule)

    # Phase 1, server: score the anchors and set τ.
    anchor_scores = None
    if rule.needs_anchors:
        if not cfg.data.anchors:
            raise FedqcError(f"rule '{rule}' needs an anchor set: set data.anchors=FILE")
        anchors = load_samples(cfg.data.anchors)
        stages.stage(
            f"phase 1: scoring {len(anchors)} anchors ({scorer.name})",
            len(anchors) * (2 if scorer.needs_bare else 1),
        )
        anchor_scores = score_samples(
            loaded,
            anchors,
            scorer,
            cfg.model.max_length,
            cfg.quality.batch_tokens,
            on_batch=stages.advance,
        )
    tau = global_threshold(rule, scorer, None if anchor_scores is None else anchor_scores.oriented)
    _write_json(
        run_dir / "threshold.json",
        {
            "scorer": scorer.name,
            "direction": "higher is better" if scorer.direction > 0 else "lower is better",
            "rule": str(rule),
            "tau": tau,
            "tau_raw": None if tau is None else scorer.raw(tau),
            "anchor_scores": None
            if anchor_scores is None
            else [None if not math.isfinite(x) else x for x in anchor_scores.raw.tolist()],
        },
    )
    if tau is not None:
        log.info("phase 1: τ = %.4f (%s, raw %s = %.4f)", tau, rule, scorer.name, scorer.raw(tau))

    # Phase 1, clients: one query round carries τ, the scorer settings and the global adapter.
    qc = ConfigRecord(
        {
            "scorer": scorer.name,
            "rule": str(rule),
            "model": cfg.model.name,
            "tau": math.nan if tau is None else tau,
            "drop-fraction": rule.value if rule.kind == "drop-fraction" else math.nan,
            "max-length": cfg.model.max_length,
            "batch-tokens": cfg.quality.batch_tokens,
        }
    )
    initial = ArrayRecord(loaded.initial_adapter)
    msgs = [
        Message(
            RecordDict({"config": qc, "arrays": initial}), dst_node_id=n, message_type=QUERY_SCORE
        )
        for n in nodes
    ]
    stages.stage(f"phase 1: {len(nodes)} clients score and select locally")
    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.timeout))
    selection = []
    for reply in replies:
        if reply.has_error():
            log.warning(
                "node %s failed the query round: %s", reply.metadata.src_node_id, reply.error.reason
            )
            continue
        stats = dict(reply.content["stats"])
        selection.append({"node": reply.metadata.src_node_id, **stats})
    selection.sort(key=lambda s: (s.get("partition-id", -1), s["node"]))
    _write_json(run_dir / "selection.json", {"tau": tau, "rule": str(rule), "clients": selection})
    total_kept = sum(int(s["kept"]) for s in selection)
    if not selection:
        raise FedqcError("no client answered the quality query round")
    if total_kept == 0:
        raise FedqcError(
            f"τ = {tau} drops every sample in the federation; use a looser "
            "quality.rule (e.g. anchor-quantile:0.1)"
        )
    log.info("phase 1: kept %d of %d samples", total_kept, sum(int(s["total"]) for s in selection))

    # Phase 2: FedAvg on the kept samples, weighted by the kept counts.
    eval_set = (
        encode_all(loaded.tokenizer, load_samples(cfg.data.eval), cfg.model.max_length)
        if cfg.data.eval
        else []
    )
    history: list[dict] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        set_adapter_state(loaded.model, arrays.to_torch_state_dict())
        loaded.model.save_pretrained(run_dir / "rounds" / f"round-{server_round}")
        metrics = {"round": server_round}
        if eval_set:
            metrics |= evaluate(
                loaded.model, eval_set, loaded.tokenizer.pad_token_id, cfg.quality.batch_tokens
            )
            log.info(
                "round %d: eval loss %.4f (ppl %.2f)",
                server_round,
                metrics["eval_loss"],
                metrics["eval_ppl"],
            )
        history.append(metrics)
        if server_round:
            stages.advance()
        return (
            MetricRecord({k: v for k, v in metrics.items() if k != "round"}) if eval_set else None
        )

    n = len(selection)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        min_train_nodes=n,
        min_evaluate_nodes=1 if cfg.federation.fraction_evaluate else 0,
        min_available_nodes=n,
    )
    train_config = ConfigRecord(
        {
            "local-steps": cfg.train.local_steps,
            "batch-size": cfg.train.batch_size,
            "lr": cfg.train.lr,
            "weight-decay": cfg.train.weight_decay,
            "seed": cfg.train.seed,
            "max-length": cfg.model.max_length,
        }
    )
    stages.stage(f"phase 2: federated LoRA, {cfg.train.rounds} rounds", cfg.train.rounds)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.train.rounds,
        timeout=cfg.federation.timeout,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    set_adapter_state(loaded.model, result.arrays.to_torch_state_dict())
    loaded.model.save_pretrained(run_dir / "adapter")
    _write_history(run_dir, history, result)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Poll until ``expected`` nodes are connected (at start Flower may report none)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return sorted(nodes)
        if time.monotonic() > deadline:
            raise FedqcError(f"only {len(nodes)} of {expected} nodes connected in {timeout:.0f} s")
        time.sleep(0.5)


def _write_history(run_dir: Path, history: list[dict], result) -> None:
    train = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
    rows = []
    for metrics in history:
        r = metrics["round"]
        rows.append(
            {**metrics, **{f"train_{k.replace('-', '_')}": v for k, v in train.get(r, {}).items()}}
        )
    _write_json(run_dir / "metrics.json", rows)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


app = build_server_app()
