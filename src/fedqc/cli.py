"""The `fedqc` command."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedqc.bench.command import bench
from fedqc.config import Config, ModelConfig, QualityConfig, load_config
from fedqc.errors import FedqcError

app = typer.Typer(
    help="Data quality control for federated fine-tuning of LLMs, on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build federations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.command()(bench)
console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [RichHandler(console=err_console, show_path=False)]
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handlers.append(file_handler)
    logging.basicConfig(level=logging.WARNING, handlers=handlers, format="%(message)s", force=True)
    logging.getLogger("fedqc").setLevel(logging.INFO)
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # Flower prints its own log, shown with --verbose only
    flwr_log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    flwr_log.addFilter(_HideSimulationDeprecation())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class _HideSimulationDeprecation(logging.Filter):
    """Flower warnings about what fedqc does on purpose: the in-process simulation entry point,
    and server-side (not federated) evaluation."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "run_simulation" not in message and "evaluation will be skipped" not in message


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


class _ProgressStages:
    """Server stages as rich progress bars: one bar per stage, finished when the next begins."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.task = progress, None

    def stage(self, description: str, total: int | None = None) -> None:
        if self.task is not None:
            self.progress.update(
                self.task,
                completed=self.progress.tasks[-1].total or 1,
                total=self.progress.tasks[-1].total or 1,
            )
            self.progress.stop_task(self.task)
        logging.getLogger("fedqc").info("%s", description)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


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
    force: Annotated[bool, typer.Option(help="Reuse a non-empty run directory.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's own log.")] = False,
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

    _setup_logging(verbose, run_dir / "fedqc.log")
    logging.getLogger("fedqc").info("run directory: %s", run_dir)
    with _progress() as progress:
        run_simulation(cfg, cfg.data.num_clients, stages=_ProgressStages(progress))
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
        console.print(f"[bold]secure sum[/] the server learned only the 'all' row; {where}")
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


@app.command()
def score(
    data: Annotated[Path, typer.Argument(help=SAMPLES_HELP)],
    scorer: Annotated[
        str, typer.Option(help="ppl, cond-prob, ifd, ira, or with --warmup: tracin, clues, ...")
    ],
    out: Annotated[Path, typer.Option(help="Output SCORES.jsonl.")],
    model: ModelOpt = "smollm2-135m",
    max_length: MaxLenOpt = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
    warmup: WarmupOpt = None,
    anchors: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint scorers: the anchors (the server's side of the score); with "
            "--shots: the anchors shown in context."
        ),
    ] = None,
    shots: ShotsOpt = 0,
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

    _setup_logging(False)
    chosen = any_scorer(_not_ensemble(scorer))
    mcfg = _model_config(model, max_length, device, dtype)
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
    else:
        demos = load_samples(anchors) if shots else []
        scores = _score(mcfg, samples, chosen, shots, demos)
    with open(out, "w", encoding="utf-8") as fh:
        for s, value in zip(samples, scores.raw, strict=True):
            fh.write(
                json.dumps({"id": s.id, "score": _finite(value), "scorer": chosen.name}) + "\n"
            )
    console.print(
        f"scored {len(samples)} samples with {chosen.name} → {out}"
        + (f" ({scores.truncated} truncated to {max_length} tokens)" if scores.truncated else "")
    )


def _score(mcfg: ModelConfig, samples, scorer, shots: int = 0, anchors=()):
    """Forward scores; ``shots`` > 0: the first ``shots`` anchors in context (the anchors
    themselves, when ``samples`` is ``anchors``, each without itself)."""
    from fedqc.data.encoding import encode_all
    from fedqc.models.loading import load
    from fedqc.scoring.scorers import score_samples
    from fedqc.scoring.shots import anchor_prefixes, demonstrations

    with console.status(f"loading {mcfg.name}"):
        loaded = load(mcfg)
    prefixes = None
    if shots:
        encoded = encode_all(loaded.tokenizer, list(anchors), mcfg.max_length)
        if samples is anchors:
            prefixes = anchor_prefixes(encoded, shots)
        else:
            prefixes = [demonstrations(encoded, shots)] * len(samples)
    passes = 2 if scorer.needs_bare else 1
    with _progress() as progress:
        task = progress.add_task(f"scoring ({scorer.name})", total=len(samples) * passes)
        return score_samples(
            loaded,
            samples,
            scorer,
            mcfg.max_length,
            on_batch=lambda n: progress.advance(task, n),
            prefixes=prefixes,
        )


def _warmup(scorer: str, run_dir: Path | None, mcfg: ModelConfig):
    """(config, loaded model, checkpoints) for a checkpoint scorer, from a run's warm-up."""
    from fedqc.federation.warmup import load_warmup
    from fedqc.models.loading import load

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

    from fedqc.federation.warmup import anchor_side, load_moments, settings_for
    from fedqc.scoring.checkpointed import score_with_checkpoints
    from fedqc.scoring.scorers import batch_tokens_for

    cfg, loaded, checkpoints = warm
    if cfg.quality.scorer == "clues":
        found = [load_moments(None, moments, k) for k in range(1, len(checkpoints) + 1)]
        if any(m is None for m in found):
            raise FedqcError(
                f"{moments}: holds no warm-up Adam moments (warmup/moments-round-k.npz) for "
                f"all {len(checkpoints)} warm-up rounds; give the node's output folder"
            )
        checkpoints = [
            dataclasses.replace(c, moments=m) for c, m in zip(checkpoints, found, strict=True)
        ]
    with console.status(f"anchor side at {len(checkpoints)} checkpoints ({cfg.quality.scorer})"):
        info, _ = anchor_side(cfg, loaded, anchors, checkpoints, with_scores=False)
    q = cfg.quality
    with _progress() as progress:
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
            f"scorer '{scorer}' is calibrated on the anchors inside a run: use it with "
            "fedqc run --set quality.scorer=...; fedqc score takes the single scorers"
        )
    return scorer


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@app.command()
def threshold(
    anchors: Annotated[Path, typer.Argument(help="Trusted anchor samples.")],
    scorer: Annotated[
        str, typer.Option(help="ppl, cond-prob, ifd, ira, or with --warmup: tracin, clues, ...")
    ],
    rule: Annotated[
        str,
        typer.Option(
            help="anchor-mean, anchor-quantile:Q, anchor-conformal:A, anchor-gaussian:A or fixed:V."
        ),
    ] = QualityConfig().rule,
    model: ModelOpt = "smollm2-135m",
    max_length: MaxLenOpt = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    warmup: WarmupOpt = None,
    shots: ShotsOpt = 0,
) -> None:
    """Compute the global threshold τ from anchors (what the server does); prints τ."""
    from fedqc.data.samples import load_samples
    from fedqc.quality.rules import global_threshold, guarantee, parse_rule
    from fedqc.scoring.scorers import any_scorer, is_checkpoint_scorer

    _setup_logging(False)
    chosen, parsed = any_scorer(_not_ensemble(scorer)), parse_rule(rule)
    mcfg = _model_config(model, max_length, device, dtype)
    if not parsed.is_global:
        raise FedqcError(f"rule '{rule}' sets no global threshold (each client drops its own)")
    if parsed.needs_histograms:
        raise FedqcError(
            f"rule '{rule}' is fitted to the clients' score histograms inside a run: use it "
            "with fedqc run --set quality.rule=mixture"
        )
    if is_checkpoint_scorer(chosen.name):
        from fedqc.federation.warmup import anchor_side

        cfg, loaded, checkpoints = _warmup(chosen.name, warmup, mcfg)
        with console.status(f"scoring anchors at {len(checkpoints)} checkpoints ({chosen.name})"):
            _, scores = anchor_side(
                cfg, loaded, load_samples(anchors), checkpoints, with_scores=True
            )
    elif parsed.needs_anchors:
        anchor_samples = load_samples(anchors)
        scores = _score(mcfg, anchor_samples, chosen, shots, anchor_samples)
    else:
        scores = None
    tau = global_threshold(parsed, chosen, None if scores is None else scores.oriented)
    keep = "≥" if chosen.direction > 0 else "≤"
    err_console.print(f"{chosen.name} {parsed}: keep samples with {chosen.name} {keep} τ")
    err_console.print(guarantee(parsed, None if scores is None else scores.oriented))
    print(f"{chosen.raw(tau):.6g}")


@app.command(name="filter")
def filter_(
    data: Annotated[Path, typer.Argument(help=SAMPLES_HELP)],
    scores: Annotated[Path, typer.Option(help="SCORES.jsonl from `fedqc score`.")],
    threshold: Annotated[float, typer.Option(help="τ in the scorer's units (`fedqc threshold`).")],
    out: Annotated[Path, typer.Option(help="Output KEPT: .jsonl, .json, .csv or .parquet.")],
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Keep the samples whose score passes τ; writes them unchanged, in the format of --out."""
    import numpy as np

    from fedqc.data.samples import load_records, read_scores
    from fedqc.data.sources import check_output, write_rows
    from fedqc.quality.selection import select
    from fedqc.scoring.scorers import any_scorer

    if not math.isfinite(threshold):
        raise FedqcError(f"--threshold {threshold}: τ must be a finite number (fedqc threshold)")
    check_output(out)
    if out.resolve() == data.resolve():
        raise FedqcError(f"--out {out}: is the input; choose another path")
    _refuse_overwrite(out, force)
    records = load_records(data)
    ids, values, scorer_name = read_scores(scores)
    if ids != [s.id for s, _ in records]:
        raise FedqcError(f"{scores}: its ids do not match {data} line for line; re-run fedqc score")
    scorer = any_scorer(scorer_name)
    selection = select(
        scorer.orient(np.array(values, dtype=np.float64)), tau=scorer.direction * threshold
    )
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
