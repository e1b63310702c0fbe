"""The bench's figures, written as PNG files with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

CLEAN, CORRUPTED = "#2b8cbe", "#e34a33"
LINE_STYLES = ("-", "--", ":", "-.")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _panel_row(panels: int, width: float, height: float, sharey: bool) -> tuple:
    """A figure of ``panels`` panels side by side (at least one), each ``width`` x ``height``."""
    n = max(panels, 1)
    return plt.subplots(1, n, figsize=(width * n, height), sharey=sharey, squeeze=False)


def _finish_panels(fig, axes, ylabel: str, title: str, path: Path) -> Path:
    """The first panel's y label, the legend right of the last panel and the title above the
    panels' own titles; then the figure saved to ``path``."""
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=10, y=1.04)
    return _save(fig, path)


def score_histograms(
    path: Path,
    title: str,
    scores: Sequence[np.ndarray],
    clean: Sequence[np.ndarray],
    thresholds: Mapping[str, Sequence[float | None]],
    xlabel: str,
) -> Path:
    """One panel per client: scores of clean and corrupted samples, and a line per τ.

    ``thresholds``: label -> τ per client (in the same units as ``scores``). A log x-axis is used
    when all scores are positive and span more than two decades (perplexity).
    """
    every = np.concatenate([np.asarray(s, dtype=float) for s in scores])
    every = every[np.isfinite(every)]
    log = every.size > 0 and every.min() > 0 and every.max() / every.min() > 100
    if every.size == 0:
        bins = np.linspace(0, 1, 21)
    elif log:
        bins = np.geomspace(every.min(), every.max(), 26)
    else:
        low, high = float(every.min()), float(every.max())
        bins = np.linspace(low, high if high > low else low + 1, 26)
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), sharex=True, squeeze=False)
    for c, ax in enumerate(axes[0]):
        s = np.asarray(scores[c], dtype=float)
        ok = np.isfinite(s)
        flags = np.asarray(clean[c], dtype=bool)
        ax.hist(s[ok & flags], bins=bins, color=CLEAN, alpha=0.7, label="clean")
        ax.hist(s[ok & ~flags], bins=bins, color=CORRUPTED, alpha=0.7, label="corrupted")
        for k, (label, taus) in enumerate(thresholds.items()):
            tau = taus[c]
            if tau is not None and math.isfinite(tau):
                ax.axvline(tau, color="black", ls=LINE_STYLES[k % 4], lw=1.2, label=f"τ {label}")
        if log:
            ax.set_xscale("log")
        ax.set_title(f"client {c} ({int((~flags).sum())}/{len(flags)} corrupted)", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    return _finish_panels(fig, axes, "samples", title, path)


def panels_by(
    path: Path,
    rows: Sequence[dict],
    x: str,
    y: str,
    *,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    panel: str = "scorer",
    line: str = "rule",
    err: str | None = None,
    sharey: bool = True,
) -> Path:
    """A panel per value of ``panel`` (e.g. scorer), a line per value of ``line`` (e.g. rule)."""
    panels = list(dict.fromkeys(r[panel] for r in rows))
    fig, axes = _panel_row(len(panels), 3.6, 3.0, sharey)
    for ax, name in zip(axes[0], panels, strict=False):
        mine = [r for r in rows if r[panel] == name]
        for k, key in enumerate(dict.fromkeys(r[line] for r in mine)):
            pts = sorted((r for r in mine if r[line] == key), key=lambda r: r[x])
            xs, ys = [r[x] for r in pts], [r[y] for r in pts]
            if err is None:
                ax.plot(xs, ys, marker="o", ls=LINE_STYLES[k % 4], label=key)
            else:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[r[err] for r in pts],
                    marker="o",
                    capsize=3,
                    ls=LINE_STYLES[k % 4],
                    label=key,
                )
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _finish_panels(fig, axes, ylabel, title, path)


def grouped_bars(
    path: Path,
    rows: Sequence[dict],
    y: str,
    *,
    panel: str = "rule",
    group: str = "corruption",
    bar: str = "scorer",
    title: str,
    ylabel: str = "",
) -> Path:
    """One panel per ``panel`` value; groups along x (e.g. corruption type), a bar per ``bar``."""
    panels = list(dict.fromkeys(r[panel] for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    bars = list(dict.fromkeys(r[bar] for r in rows))
    width = 0.8 / max(len(bars), 1)
    fig, axes = _panel_row(len(panels), 4.2, 3.2, sharey=True)
    for ax, name in zip(axes[0], panels, strict=False):
        for k, b in enumerate(bars):
            values = {r[group]: r[y] for r in rows if r[panel] == name and r[bar] == b}
            ax.bar(
                np.arange(len(groups)) + (k - (len(bars) - 1) / 2) * width,
                [values.get(g, np.nan) for g in groups],
                width,
                label=b,
            )
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, fontsize=7)
        ax.set_title(str(name), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _finish_panels(fig, axes, ylabel, title, path)


@dataclass
class Band:
    """One arm's eval loss per round over its training seeds."""

    rounds: list[int]
    mean: list[float]
    sd: list[float]  # sample sd (ddof 1); NaN with one seed
    low: list[float]  # the lowest seed's value
    high: list[float]  # the highest seed's value


def seed_band(seeds: Mapping[int, Sequence[dict]]) -> Band:
    """Mean, sd, min and max over seeds of the eval loss at each round that every seed reached."""
    curves = [
        {r["round"]: r["eval_loss"] for r in rows if "eval_loss" in r} for rows in seeds.values()
    ]
    rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = [np.array([c[k] for c in curves], dtype=float) for k in rounds]
    return Band(
        rounds,
        [float(v.mean()) for v in values],
        [float(v.std(ddof=1)) if v.size > 1 else math.nan for v in values],
        [float(v.min()) for v in values],
        [float(v.max()) for v in values],
    )


def eval_bands(
    path: Path, histories: Mapping[str, Mapping[int, Sequence[dict]]], title: str
) -> Path:
    """Held-out eval loss after each round (round 0: the untrained model), one line per arm: the
    mean over its training seeds, and a shaded band from the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, (arm, seeds) in enumerate(histories.items()):
        band = seed_band(seeds)
        if not band.rounds:
            continue
        (line,) = ax.plot(
            band.rounds, band.mean, marker="o", ms=3, ls=LINE_STYLES[k % 4], label=arm
        )
        if len(seeds) > 1:
            ax.fill_between(band.rounds, band.low, band.high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round", fontsize=8)
    ax.set_ylabel("eval loss (clean held-out)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
