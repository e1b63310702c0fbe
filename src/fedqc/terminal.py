"""The terminal: the console, logging, and progress bars of the `fedqc` commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err_console = Console(stderr=True)

# Options that several commands share (`fedqc run`, `fedqc bench`, the client steps).
ReuseOpt = Annotated[bool, typer.Option(help="Reuse a non-empty run directory.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Overwrite --out.")]
VerboseOpt = Annotated[bool, typer.Option(help="Show Flower's own log.")]


def setup_logging(verbose: bool, log_file: Path | None = None) -> None:
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


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


class ProgressStages:
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
