"""The `fedqc` command."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedqc.bench.command import bench
from fedqc.config import Config, ModelConfig, QualityConfig, load_config
from fedqc.errors import FedqcError
from fedqc.terminal import (
    OverwriteOpt,
    ProgressStages,
    ReuseOpt,
    VerboseOpt,
    console,
    err_console,
    progress_bars,
    setup_logging,
)

app = typer.Typer(
    help="Data quality control for federated fine-tuning of LLMs, on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build federations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.command()(bench)
MODEL, QUALITY = ModelConfig(), QualityConfig()  # the run's defaults, as the commands' defaults


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FedqcError(f"{path}: exists; choose another path or add --force")


SAMPLES_HELP = "Samples: .jsonl, .json, .csv, .parquet, a save_to_disk folder or hub:OWNER/NAME."
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: key=value.")]
ModelOpt = Annotated[str, typer.Option(help="Registry name, local folder or HF hub id.")]
MaxLenOpt = Annotated[int, typer.Option(help="Maximum tokens of prompt + response.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (bfloat16 where the device runs it natively), float32, ...")
]


def _model_config(name: str, max_length: int, device: str, dtype: str) -> ModelConfig:
    """The model options of `fedqc score` / `fedqc threshold`, checked like config keys."""
    keys = {"name": name, "max-length": max_length, "device": device, "dtype": dtype}
    return Config.from_flat({f"model.{k}": v for k, v in keys.items()}, "option").model


ShotsOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Forward scorers: show the first K whole anchors in context before each sample, as "
        "quality.shots does in a run (0: zero-shot).",
    ),
]


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/<time>).")] = None,
    force: ReuseOpt = False,
    verbose: VerboseOpt = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run directory from its last round.")
    ] = None,
    allow_empty: Annotated[
        bool, typer.Option(help="Go on (no training) when τ drops every sample.")
    ] = False,
) -> None:
    """Run the whole pipeline: anchors → τ → client selection → federated LoRA → report."""
    from fedqc.pipeline import open_run, summarize

    with console.status("checking model and data (the first run converts SmolLM2 once)"):
        cfg, run_dir = open_run(config, set_, out, force, allow_empty, resume)
    from fedqc.federation.simulation import run_simulation

    setup_logging(verbose, run_dir / "fedqc.log")
    logging.getLogger("fedqc").info("run directory: %s", run_dir)
    with progress_bars() as progress:
        run_simulation(cfg, cfg.data.num_clients, stages=ProgressStages(progress))
    _print_summary(summarize(cfg), cfg)
    console.print(f"[bold]outputs:[/] {run_dir}")


def _print_summary(summary: dict, cfg: Config) -> None:
    th = summary["threshold"]
    tau = "per-client" if th["tau"] is None else f"{th['tau_raw']:.5g}"
    shots = f", {th['shots']} shots" if th.get("shots") else ""
    console.print(
        f"\n[bold]scorer[/] {th['scorer']} ({th['direction']}{shots})   [bold]rule[/] "
        f"{th['rule']}   [bold]τ[/] {tau}"
    )
    if th.get("guarantee"):
        console.print(f"[dim]{th['guarantee']}[/]")
    if summary.get("placement"):
        where = summary["placement"]
        console.print(
            f"[bold]model[/] {cfg.model.name} on {where['device']}: {where['dtype']}, "
            f"training in {where['train_dtype']}"
        )
    if cfg.separate_scorer:
        console.print(f"[bold]scoring model[/] {cfg.scoring_model().name} (quality.model)")
    if budget := summary.get("privacy_budget"):
        console.print(
            f"[bold]privacy[/] ε = {budget['epsilon_total']:.4g} per client for its counts "
            f"(basic composition: {len(budget['releases'])} releases × ε = {budget['epsilon']:.4g}"
            f" × {budget['query_rounds']} query round(s); adapters and losses not covered)"
        )
    if summary.get("secure_sum"):
        where = (
            "the rows per client below come from the clients' own files on this machine"
            if summary["clients"]
            else "per-client rows unavailable"
        )
        console.print(
            f"[bold]secure sum[/] phase 1 reached the server only as the 'all' row; phase 2 "
            f"still gave it each training client's kept count and adapter; {where}"
        )
    for line in (summary.get("threshold") or {}).get("server_learns") or []:
        console.print(f"[bold]server learned[/] {line}")
    table = Table(title="Selection per client (clean = positive)")
    for col in ("client", "total", "kept", "rejected", "precision", "recall", "F1"):
        table.add_column(col, justify="right")

    def fmt(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "–"

    for row in summary["clients"]:
        table.add_row(
            str(row["client"]),
            str(row["total"]),
            str(row["kept"]),
            str(row["rejected"]),
            fmt(row, "precision"),
            fmt(row, "recall"),
            fmt(row, "f1"),
        )
    total, kept = summary["totals"]["total"], summary["totals"]["kept"]
    sel = summary["selection"]
    table.add_row(
        "all",
        str(total),
        str(kept),
        str(total - kept),
        fmt(sel, "precision"),
        fmt(sel, "recall"),
        fmt(sel, "f1"),
        style="bold",
    )
    console.print(table)
    rounds = Table(title="Global model on the held-out set")
    for col in ("round", "eval loss", "eval ppl", "train loss"):
        rounds.add_column(col, justify="right")
    for r in summary["rounds"]:
        train = r.get("train_train_loss")
        rounds.add_row(
            f"warm-up {r['round']}" if r.get("phase") == "warmup" else str(r["round"]),
            f"{r.get('eval_loss', math.nan):.4f}",
            f"{r.get('eval_ppl', math.nan):.3f}",
            "–" if train is None else f"{train:.4f}",
        )
    console.print(rounds)
    from fedqc.pipeline import summary_notes

    for note in summary_notes(summary):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


WarmupOpt = Annotated[
    Path | None,
    typer.Option(
        help="Checkpoint scorers (tracin, clues, ...): a fedqc run directory whose warm-up "
        "checkpoints to score at (its warmup.json)."
    ),
]


PlanOpt = Annotated[
    Path | None,
    typer.Option(
        help="A plan: threshold.json of `fedqc threshold --out` or of a run directory; score with "
        "its scorer, calibration, shots and prefix."
    ),
]


@app.command()
def score(
    data: Annotated[Path, typer.Argument(help=SAMPLES_HELP)],
    out: Annotated[Path, typer.Option(help="Output SCORES.jsonl.")],
    scorer: Annotated[
        str | None,
        typer.Option(
            help="ppl, cond-prob, ifd, ira, or with --warmup: tracin, clues, ...; an ensemble "
            "needs its --plan (the plan's scorer by default)."
        ),
    ] = None,
    plan: PlanOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Registry name, local folder or HF hub id [default: the "
            "plan's, else smollm2-135m]."
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(help="Maximum tokens of prompt + response [default: the plan's, else 256]."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: OverwriteOpt = False,
    warmup: WarmupOpt = None,
    anchors: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint scorers: the anchors (the server's side of the score); with "
            "--shots: the anchors shown in context."
        ),
    ] = None,
    shots: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Forward scorers: show the first K anchors in context before each sample, as "
            "quality.shots does in a run [default: the plan's, else 0].",
        ),
    ] = None,
    moments: Annotated[
        Path | None,
        typer.Option(
            help="clues: the node's output folder holding its warm-up Adam moments "
            "(warmup/moments-round-k.npz; simulated runs: RUN_DIR/clients/client-<i>)."
        ),
    ] = None,
) -> None:
    """Score every sample (what one client does); one line per sample, in input order."""
    from fedqc.data.samples import load_samples
    from fedqc.scoring.scorers import any_scorer, is_checkpoint_scorer

    setup_logging(False)
    planned = None
    if plan is not None:
        planned, model, max_length = _plan_settings(plan, scorer, shots, anchors, model, max_length)
        chosen = planned.scorer
    elif scorer is None:
        raise FedqcError("give the scorer: --scorer NAME, or --plan threshold.json")
    else:
        chosen = any_scorer(_not_ensemble(scorer))
    mcfg = _model_config(model or MODEL.name, max_length or MODEL.max_length, device, dtype)
    shots = shots or 0
    if is_checkpoint_scorer(chosen.name):
        if warmup is not None and anchors is None:
            raise FedqcError(
                f"scorer '{chosen.name}' scores against the anchors: add --anchors ANCHORS.jsonl"
            )
        if warmup is not None and chosen.name == "clues" and moments is None:
            raise FedqcError(
                "scorer 'clues' needs the client's Adam moments of its warm-up steps: add "
                "--moments NODE_DIR (the node's output folder; simulated runs: "
                "RUN_DIR/clients/client-<i>)"
            )
        warm = _warmup(chosen.name, warmup, mcfg)  # a clear error without --warmup
    elif shots and anchors is None:
        raise FedqcError(
            f"--shots {shots} shows the first {shots} anchors in context: add --anchors "
            "ANCHORS.jsonl"
        )
    _refuse_overwrite(out, force)
    samples = load_samples(data)
    if is_checkpoint_scorer(chosen.name):
        scores = _score_at_checkpoints(warm, samples, load_samples(anchors), moments)
    elif planned is not None:  # the plan's scorer, calibration, demonstrations and max-length
        loaded = _load(mcfg)
        scores = _progress(chosen, samples, lambda on: planned.score(samples, loaded, None, on))
    else:
        from fedqc.quality.plan import few_shot_prefix
        from fedqc.scoring.scorers import score_samples

        loaded = _load(mcfg)
        demos = load_samples(anchors) if shots else []
        prefix = few_shot_prefix(loaded, demos, shots, mcfg.max_length)
        prefixes = [prefix] * len(samples)
        scores = _progress(
            chosen,
            samples,
            lambda on: score_samples(loaded, samples, chosen, mcfg.max_length, 4096, on, prefixes),
        )
    with open(out, "w", encoding="utf-8") as fh:
        for s, value in zip(samples, scores.raw, strict=True):
            fh.write(
                json.dumps({"id": s.id, "score": _finite(value), "scorer": chosen.name}) + "\n"
            )
    console.print(
        f"scored {len(samples)} samples with {chosen.name} → {out}"
        + (
            f" ({scores.truncated} truncated to {mcfg.max_length} tokens)"
            if scores.truncated
            else ""
        )
    )


def _plan_settings(
    path: Path,
    scorer: str | None,
    shots: int | None,
    anchors: Path | None,
    model: str | None,
    max_length: int | None,
):
    """(plan, model, max-length) of `fedqc score --plan`: the plan's, which the options may not
    contradict."""
    import dataclasses

    from fedqc.filter import QualityPlan
    from fedqc.scoring.scorers import is_checkpoint_scorer

    plan = QualityPlan.load(path)
    name = plan.scorer.name
    if scorer is not None and scorer != name:
        raise FedqcError(f"--scorer {scorer}: the plan {path} scores with {name}; drop --scorer")
    if is_checkpoint_scorer(name):
        raise FedqcError(
            f"{path}: a plan of checkpoint scorer '{name}'; score at the run's warm-up "
            f"checkpoints instead: fedqc score --scorer {name} --warmup RUN_DIR --anchors FILE"
        )
    if shots is not None or anchors is not None:
        raise FedqcError(
            f"{path}: the plan brings its shots ({plan.shots}) and their prefix; drop --shots "
            "and --anchors"
        )
    for option, given, planned in (
        ("--model", model, plan.model),
        ("--max-length", max_length, plan.max_length),
    ):
        if given is not None and planned is not None and given != planned:
            raise FedqcError(
                f"{option} {given}: the plan {path} was made with {planned}; its prefix and τ "
                f"hold for that only (drop {option})"
            )
    max_length = max_length or plan.max_length or MODEL.max_length
    return dataclasses.replace(plan, max_length=max_length), model or plan.model, max_length


def _load(mcfg: ModelConfig):
    from fedqc.models.loading import load

    with console.status(f"loading {mcfg.name}"):
        return load(mcfg)


def _progress(scorer, samples: list, score):
    """``score(on_batch)`` of ``samples``, with a progress bar."""
    passes = 2 if scorer.needs_bare else 1
    with progress_bars() as progress:
        task = progress.add_task(f"scoring ({scorer.name})", total=len(samples) * passes)
        return score(lambda k: progress.advance(task, k))


def _warmup(scorer: str, run_dir: Path | None, mcfg: ModelConfig):
    """(config, loaded model, checkpoints) for a checkpoint scorer, from a run's warm-up."""
    from fedqc.models.loading import load
    from fedqc.scoring.warmup import load_warmup

    if run_dir is None:
        raise FedqcError(
            f"scorer '{scorer}' scores at a run's warm-up checkpoints: add --warmup RUN_DIR "
            "(a fedqc run directory made with quality.scorer set to a checkpoint scorer)"
        )
    checkpoints = load_warmup(run_dir)
    saved = run_dir / "config.toml"
    cfg = load_config(saved if saved.is_file() else None)  # the run's LoRA and training settings
    cfg = cfg.replace(
        **{
            "model.name": mcfg.name,
            "model.max-length": mcfg.max_length,
            "model.device": mcfg.device,
            "model.dtype": mcfg.dtype,
            "quality.scorer": scorer,
        }
    )
    model = mcfg.name
    with console.status(f"loading {model}"):
        loaded = load(cfg.model)
    adapter_keys = set(loaded.initial_adapter)
    if any(set(c.adapter) != adapter_keys for c in checkpoints):
        raise FedqcError(
            f"{run_dir}: its warm-up adapters do not fit model '{model}' with the run's LoRA "
            "settings; pass the run's model with --model"
        )
    return cfg, loaded, checkpoints


def _score_at_checkpoints(warm, samples, anchors, moments: Path | None):
    """What a client does with the server's anchor info: score at the warm-up checkpoints."""
    import dataclasses

    from fedqc.scoring.checkpointed import score_with_checkpoints
    from fedqc.scoring.scorers import batch_tokens_for
    from fedqc.scoring.warmup import anchor_side, read_moments, settings_for, unflatten_moments

    cfg, loaded, checkpoints = warm
    if cfg.quality.scorer == "clues":
        found = [read_moments(moments, k) for k in range(1, len(checkpoints) + 1)]
        if any(m is None for m in found):
            raise FedqcError(
                f"{moments}: holds no warm-up Adam moments (warmup/moments-round-k.npz) for "
                f"all {len(checkpoints)} warm-up rounds; give the node's output folder"
            )
        checkpoints = [
            dataclasses.replace(c, moments=unflatten_moments(m))
            for c, m in zip(checkpoints, found, strict=True)
        ]
    with console.status(f"anchor side at {len(checkpoints)} checkpoints ({cfg.quality.scorer})"):
        info, _ = anchor_side(cfg, loaded, anchors, checkpoints, with_scores=False)
    q = cfg.quality
    with progress_bars() as progress:
        task = progress.add_task(f"scoring ({q.scorer})", total=None)
        return score_with_checkpoints(
            loaded,
            samples,
            checkpoints,
            info,
            settings_for(cfg, loaded),
            batch_tokens=batch_tokens_for(q.scorer, q.batch_tokens, q.backward_batch_tokens),
            on_batch=lambda n: progress.advance(task, n),
        )


def _not_ensemble(scorer: str) -> str:
    from fedqc.scoring.ensemble import is_ensemble

    if is_ensemble(scorer):
        raise FedqcError(
            f"scorer '{scorer}' is calibrated on the anchors: score with its plan, fedqc score "
            "--plan threshold.json (from fedqc threshold --out, or a run directory)"
        )
    return scorer


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@app.command()
def threshold(
    anchors: Annotated[Path, typer.Argument(help="Trusted anchor samples.")],
    scorer: Annotated[
        str,
        typer.Option(
            help="ppl, cond-prob, ifd, ira, an ensemble (ensemble-min:a+b+c, calibrated on the "
            "anchors), or with --warmup: tracin, clues, ..."
        ),
    ] = QUALITY.scorer,
    rule: Annotated[
        str,
        typer.Option(
            help="anchor-mean, anchor-quantile:Q, anchor-conformal:A, anchor-gaussian:A or fixed:V."
        ),
    ] = QUALITY.rule,
    model: ModelOpt = MODEL.name,
    max_length: MaxLenOpt = MODEL.max_length,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    warmup: WarmupOpt = None,
    shots: ShotsOpt = QUALITY.shots,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the plan, threshold.json as `fedqc run` writes it, for `fedqc score "
            "--plan` and `fedqc filter --plan`."
        ),
    ] = None,
    force: OverwriteOpt = False,
) -> None:
    """Compute the global threshold τ from anchors (what the server does); prints τ."""
    from fedqc.data.samples import load_samples
    from fedqc.filter import QualityFilter, QualityPlan
    from fedqc.quality.rules import parse_rule
    from fedqc.scoring.scorers import any_scorer, is_checkpoint_scorer

    setup_logging(False)
    chosen, parsed = any_scorer(scorer), parse_rule(rule)
    if not parsed.is_global:
        raise FedqcError(f"rule '{rule}' sets no global threshold (each client drops its own)")
    if parsed.needs_histograms:
        raise FedqcError(
            f"rule '{rule}' is fitted to the clients' score histograms inside a run: use it "
            "with fedqc run --set quality.rule=mixture"
        )
    mcfg = _model_config(model, max_length, device, dtype)
    if out is not None:
        _refuse_overwrite(out, force)
    anchor_samples = load_samples(anchors)
    if is_checkpoint_scorer(chosen.name):
        from fedqc.quality.plan import plan_from_scores
        from fedqc.scoring.warmup import anchor_side

        cfg, loaded, checkpoints = _warmup(chosen.name, warmup, mcfg)
        with console.status(f"scoring anchors at {len(checkpoints)} checkpoints ({chosen.name})"):
            _, scores = anchor_side(cfg, loaded, anchor_samples, checkpoints, with_scores=True)
        where = loaded.placement.describe()
        plan = QualityPlan.of(
            plan_from_scores(chosen, parsed, scores), mcfg.name, mcfg.max_length, placement=where
        )
    else:
        quality = QualityFilter(scorer, rule, shots, model, max_length, device=device, dtype=dtype)
        loaded = _load(mcfg)
        passes = (2 if chosen.needs_bare else 1) if parsed.needs_anchors else 0
        with progress_bars() as progress:
            task = progress.add_task(
                f"scoring anchors ({chosen.name})", total=len(anchor_samples) * passes
            )
            plan = quality.fit(anchor_samples, loaded, on_batch=lambda n: progress.advance(task, n))
    if out is not None:
        plan.save(out)
    name, keep = plan.scorer.name, "≥" if plan.scorer.direction > 0 else "≤"
    err_console.print(f"{name} {parsed}: keep samples with {name} {keep} τ")
    err_console.print(plan.guarantee)
    print(f"{plan.tau_raw:.6g}")


@app.command(name="filter")
def filter_(
    data: Annotated[Path, typer.Argument(help=SAMPLES_HELP)],
    scores: Annotated[Path, typer.Option(help="SCORES.jsonl from `fedqc score`.")],
    out: Annotated[Path, typer.Option(help="Output KEPT: .jsonl, .json, .csv or .parquet.")],
    threshold: Annotated[
        float | None, typer.Option(help="τ in the scorer's units (`fedqc threshold`).")
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="Take τ from this plan (threshold.json).")
    ] = None,
    force: OverwriteOpt = False,
) -> None:
    """Keep the samples whose score passes τ; writes them unchanged, in the format of --out."""
    from fedqc.data.samples import load_records, read_scores
    from fedqc.data.sources import check_output, write_rows
    from fedqc.filter import QualityPlan

    if (threshold is None) == (plan is None):
        raise FedqcError("give τ: --threshold T (fedqc threshold) or --plan threshold.json")
    if threshold is not None and not math.isfinite(threshold):
        raise FedqcError(f"--threshold {threshold}: τ must be a finite number (fedqc threshold)")
    planned = None if plan is None else QualityPlan.load(plan)
    check_output(out)
    if out.resolve() == data.resolve():
        raise FedqcError(f"--out {out}: is the input; choose another path")
    _refuse_overwrite(out, force)
    records = load_records(data)
    ids, values, scorer_name = read_scores(scores)
    if ids != [s.id for s, _ in records]:
        raise FedqcError(f"{scores}: its ids do not match {data} line for line; re-run fedqc score")
    if planned is None:
        planned = QualityPlan.fixed(scorer_name, threshold)
    elif planned.scorer.name != scorer_name:
        raise FedqcError(
            f"{scores}: scored with {scorer_name}, the plan {plan} with {planned.scorer.name}; "
            f"score with fedqc score --plan {plan}"
        )
    selection = planned.select(values)
    write_rows(
        out, [record for (_, record), keep in zip(records, selection.keep, strict=True) if keep]
    )
    console.print(
        f"kept {selection.kept} of {len(records)} samples → {out} "
        f"({selection.rejected_below_threshold} below τ, "
        f"{selection.rejected_non_finite} without a finite score)"
    )


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Write into a non-empty folder.")] = False,
) -> None:
    """Write the GSM8K demo federation: clients, anchors, eval set and ground-truth flags."""
    from fedqc.data.demo import write_demo

    cfg = load_config(config, set_)
    if out.exists() and any(out.iterdir()) and not force:
        raise FedqcError(f"{out}: exists and is not empty; choose another --out or add --force")
    d = cfg.data
    manifest = write_demo(
        out, d.num_clients, d.samples_per_client, d.num_anchors, d.num_eval, d.contamination, d.seed
    )
    for c in manifest["clients"]:
        console.print(f"client-{c['client']}: {c['samples']} samples, {c['corrupted']} corrupted")
    console.print(f"wrote {out}/clients, anchors.jsonl, eval.jsonl and truth/ (flags)")


def main() -> None:
    try:
        app()
    except FedqcError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted: continue a run with fedqc run --resume RUN_DIR")
        sys.exit(130)
