"""The trained model's benefit, over training seeds: mean ± sd per arm, paired differences against
``mixed``, the share of the mixed → oracle gap an arm recovers, and issue 14's goal checks.

Every trained arm trains once per seed (``bench.seeds``) on the same selection, so a difference
between two arms is taken seed by seed (paired) before it is averaged. Standard deviations are
sample standard deviations (ddof 1): NaN with fewer than two seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedqc.report.tables import fmt

# (key, label, +1 where higher is better / -1 where lower is better)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("eval_loss", "held-out loss", -1),
    ("answer_format", "format rate", 1),
    ("exact_match", "exact match", 1),
    ("rouge_l", "ROUGE-L", 1),
)
GENERATION = tuple(m for m in METRICS if m[0] != "eval_loss")
GAP_SHARE = 0.9  # the default arm must recover this share of the mixed → oracle gap
SEPARATION = 3.0  # the oracle must beat mixed by this many seed standard deviations

PerSeed = Mapping[int, Mapping[str, float]]  # seed -> metric -> value


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where there are too few)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), sd


def paired(arm: PerSeed, base: PerSeed, metric: str) -> tuple[float, float]:
    """Mean and sd over the seeds both arms trained with of (arm − base) on ``metric``."""
    seeds = [s for s in arm if s in base]
    return mean_sd([arm[s].get(metric, math.nan) - base[s].get(metric, math.nan) for s in seeds])


def gap_recovered(mixed: float, oracle: float, arm: float) -> float:
    """(arm − mixed) / (oracle − mixed): 1 is as good as the oracle, 0 no better than mixed;
    NaN when the oracle and mixed are equal (there is no gap)."""
    gap = oracle - mixed
    if not math.isfinite(gap) or gap == 0 or not math.isfinite(arm):
        return math.nan
    return (arm - mixed) / gap


def summarize(runs: Mapping[str, PerSeed]) -> dict[str, dict[str, float]]:
    """Per arm: ``<metric>`` mean, ``<metric>_sd``, and against mixed (when it was trained)
    ``d_<metric>`` / ``d_<metric>_sd`` (paired) and ``gap_<metric>`` (share of the mixed →
    oracle gap, on the means; when the oracle was trained too)."""
    out: dict[str, dict[str, float]] = {}
    for name, seeds in runs.items():
        row: dict[str, float] = {"seeds": float(len(seeds))}
        for key, _, _ in METRICS:
            row[key], row[f"{key}_sd"] = mean_sd([v.get(key, math.nan) for v in seeds.values()])
        out[name] = row
    if "mixed" in runs:
        for name, seeds in runs.items():
            for key, _, _ in METRICS:
                d, d_sd = paired(seeds, runs["mixed"], key)
                out[name][f"d_{key}"], out[name][f"d_{key}_sd"] = d, d_sd
    if "random" in runs:  # each arm against random subsets of the same size, seed-paired
        for name, seeds in runs.items():
            for key, _, _ in METRICS:
                d, d_sd = paired(seeds, runs["random"], key)
                out[name][f"dr_{key}"], out[name][f"dr_{key}_sd"] = d, d_sd
    if "mixed" in out and "oracle" in out:
        for row in out.values():
            for key, _, _ in METRICS:
                row[f"gap_{key}"] = gap_recovered(out["mixed"][key], out["oracle"][key], row[key])
    return out


def pm(mean: float, sd: float, digits: int = 3) -> str:
    """``mean ± sd``, or the mean alone when sd is NaN (one seed)."""
    if not math.isfinite(sd):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(sd, digits)}"


def separation(summary: Mapping[str, Mapping[str, float]], key: str, sign: int) -> tuple:
    """(oracle's improvement over mixed, the threshold 3 × the larger seed sd of the two, whether
    the improvement exceeds it)."""
    mixed, oracle = summary["mixed"], summary["oracle"]
    improvement = sign * (oracle[key] - mixed[key])
    threshold = SEPARATION * max(mixed[f"{key}_sd"], oracle[f"{key}_sd"])
    return improvement, threshold, bool(math.isfinite(threshold) and improvement > threshold)


def goal_checks(summary: Mapping[str, Mapping[str, float]], default: str) -> list[str]:
    """Issue 14's goals, each as a computed sentence: the oracle beats mixed by more than 3 seed
    sd on held-out loss and on a generation metric; the default arm recovers ≥ 90% of that gap on
    held-out loss and on such a metric, and beats the paper arm there."""
    if "mixed" not in summary or "oracle" not in summary:
        return []
    seeds = int(min(summary["mixed"]["seeds"], summary["oracle"]["seeds"]))
    if seeds < 2:
        return [
            "Goal checks need at least two training seeds for a seed standard deviation "
            "(bench.seeds=0,1,2); this run trained mixed and oracle with one."
        ]
    lines, separated = [], {}
    for key, label, sign in METRICS:
        improvement, threshold, ok = separation(summary, key, sign)
        separated[key] = ok
        oracle = summary["oracle"]
        lines.append(
            f"Oracle vs mixed on {label}: the oracle is better by {fmt(improvement, 4)} "
            f"(paired oracle − mixed {pm(oracle[f'd_{key}'], oracle[f'd_{key}_sd'], 4)}); "
            f"{SEPARATION:g} × the larger seed sd = {fmt(threshold, 4)}: "
            f"{'separated' if ok else 'not separated'}."
        )
    generation = [m for m in GENERATION if separated[m[0]]]
    met = separated["eval_loss"] and bool(generation)
    lines.append(
        f"Goal (the experiment discriminates: held-out loss and ≥ 1 generation metric): "
        f"{'met' if met else 'not met'}"
        + (f" (on {', '.join(m[1] for m in generation)})." if generation else ".")
    )
    if default not in summary:
        lines.append(f"Goal (the default recovers the gap): the default arm {default} not trained.")
        return lines
    checked = [METRICS[0], *generation] if generation else list(METRICS)
    recovered, beats = {}, {}
    mine = summary[default]
    for key, label, sign in checked:
        share = mine.get(f"gap_{key}", math.nan)
        recovered[key] = math.isfinite(share) and share >= GAP_SHARE
        paper = summary.get("paper", {}).get(key, math.nan)
        beats[key] = math.isfinite(paper) and sign * (mine[key] - paper) > 0
        lines.append(
            f"Default ({default}) on {label}: {pm(mine[key], mine[f'{key}_sd'], 4)}, "
            f"{fmt(share * 100, 1)}% of the mixed → oracle gap recovered"
            + (
                f"; paper {pm(paper, summary['paper'][f'{key}_sd'], 4)}: "
                f"{'beaten' if beats[key] else 'not beaten'}."
                if "paper" in summary
                else "; the paper arm was not trained."
            )
        )
    gen_ok = any(recovered[k] and beats[k] for k, _, _ in generation)
    met = separated["eval_loss"] and recovered["eval_loss"] and beats["eval_loss"] and gen_ok
    lines.append(
        f"Goal (the default recovers ≥ {GAP_SHARE:.0%} of the gap on held-out loss and on a "
        f"separating generation metric, and beats paper there): {'met' if met else 'not met'}."
    )
    return lines + beats_random(summary, default, checked)


def beats_random(
    summary: Mapping[str, Mapping[str, float]], default: str, checked: Sequence[tuple]
) -> list[str]:
    """The default against ``random`` (the same kept counts, drawn at random), seed-paired on each
    checked metric: it beats random where the paired difference is better by more than its sd."""
    if "random" not in summary or default not in summary:
        return []
    mine, rnd = summary[default], summary["random"]
    lines, wins = [], []
    for key, label, sign in checked:
        d, sd = mine.get(f"dr_{key}", math.nan), mine.get(f"dr_{key}_sd", math.nan)
        ok = math.isfinite(d) and math.isfinite(sd) and sign * d > sd
        wins.append(ok)
        lines.append(
            f"Default vs random at the same kept count on {label}: "
            f"{pm(mine[key], mine[f'{key}_sd'], 4)} against {pm(rnd[key], rnd[f'{key}_sd'], 4)} "
            f"(paired default − random {pm(d, sd, 4)}): "
            f"{'beaten (better by more than the paired sd)' if ok else 'not beaten'}."
        )
    lines.append(
        f"Goal (the default beats random at the same kept count on held-out loss and a generation "
        f"metric): {'met' if wins[0] and any(wins[1:]) else 'not met'}."
    )
    return lines
