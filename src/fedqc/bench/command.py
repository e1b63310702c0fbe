"""The `fedqc bench` command, registered in :mod:`fedqc.cli`."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedqc.errors import FedqcError
from fedqc.terminal import ReuseOpt, VerboseOpt


def bench(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config: the run sections and \\[bench]."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override: key=value (bench.* too).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small profile: under 20 minutes on a 2-core CPU.")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="Large profile: every corruption, every arm trained.")
    ] = False,
    effect: Annotated[
        bool,
        typer.Option(
            "--effect",
            help="The trained model's benefit: mixed, paper, default and oracle, 3 seeds each "
            "(about an hour on 2 CPU cores).",
        ),
    ] = False,
    out: Annotated[
        str | None, typer.Option(help="Run directory (default runs/bench-<time>).")
    ] = None,
    draws: Annotated[
        int | None,
        typer.Option(
            help="Only the anchor rules over N random anchor draws: selection F1 and the share "
            "of clean samples rejected, zero-shot and with quality.shots (no training)."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Go on with a stopped bench in this folder, with its bench.toml: trainings and "
            "answers it finished are read back, the rest runs."
        ),
    ] = None,
    force: ReuseOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Benchmark quality control on a federation with known corruptions: every arm, the sweeps,
    short training, tables, plots and report.html."""
    from fedqc.bench.config import load_bench_config
    from fedqc.bench.run import run_bench
    from fedqc.models.loading import resolve
    from fedqc.pipeline import new_run_dir
    from fedqc.terminal import ProgressStages, console, progress_bars, setup_logging

    if quick + full + effect > 1:
        raise FedqcError("choose one profile: --quick, --full or --effect")
    profile = "quick" if quick else "full" if full else "effect" if effect else None
    if resume is not None:
        if profile or config or set_ or out or draws is not None:
            raise FedqcError(
                "--resume DIR takes the settings of DIR/bench.toml: leave out the profile, "
                "--config, --set, --out and --draws"
            )
        if not (resume / "bench.toml").is_file():
            raise FedqcError(f"--resume {resume}: no bench.toml there (not a bench run folder)")
        config, out, force = resume / "bench.toml", str(resume), True
    cfg, options = load_bench_config(config, set_, profile)
    options.check(cfg)
    if draws is not None:
        if draws < 1:
            raise FedqcError(f"--draws {draws}: give a number of anchor draws ≥ 1, e.g. --draws 40")
        options.check_plans(cfg.quality.shots, cfg.data.num_anchors)
    run_dir = new_run_dir(out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}", force)
    setup_logging(verbose, run_dir / "fedqc.log")
    with console.status("preparing the model (the first run converts SmolLM2 once)"):
        resolve(cfg.model.name)
        resolve(cfg.scoring_model().name)
    command = "fedqc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = run_dir / "command.txt"  # the command that started it, quoted by results.md
    if resume is not None and started.is_file():
        command = started.read_text().strip() + f" (resumed with: {command})"
    elif resume is None:
        started.write_text(command + "\n")
    if draws is not None:
        from fedqc.bench.draws import run_draws

        with progress_bars() as progress:
            text = run_draws(cfg, options, run_dir, draws, ProgressStages(progress), command)
        console.print(text, markup=False, highlight=False)
        console.print(f"[bold]outputs:[/] {run_dir}/results.md, results.csv")
        return
    with progress_bars() as progress:
        result = run_bench(cfg, options, run_dir, ProgressStages(progress), command)
    _print(result, console)
    console.print(f"[bold]outputs:[/] {run_dir}/results.md, results.csv, report.html, plots/")


TERMINAL = (
    "arm",
    "tau",
    "kept_fraction",
    "precision",
    "recall",
    "f1",
    "accuracy",
    "eval_loss",
    "exact_match",
)


def _print(result: dict, console) -> None:
    from rich.table import Table

    from fedqc.bench.publish import MAIN_COLUMNS, TRAIN_COLUMNS
    from fedqc.report.tables import fmt

    main = [c for c in MAIN_COLUMNS if c[0] in TERMINAL]
    for title, rows, columns in (
        ("Every arm on the main federation (selection: clean = positive)", result["main"], main),
        (
            "Trained arms: the final global adapter on the clean held-out set",
            result["train"],
            TRAIN_COLUMNS,
        ),
    ):
        if not rows:
            continue
        table = Table(title=title)
        for key, header in columns:
            if key == "arm":
                table.add_column(header, no_wrap=True)
            else:
                table.add_column(header, justify="right")
        for row in rows:
            style = "bold" if row.get("kind") in ("mixed", "oracle") else None
            table.add_row(*(fmt(row.get(key)) for key, _ in columns), style=style)
        console.print(table)
    for note in result["findings"]:
        console.print(f"[yellow]•[/] {note}", highlight=False)
