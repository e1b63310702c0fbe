"""`fedqc bench --draws N`: the anchor rules over N random draws of the anchors.

τ rests on a few anchors (``data.num-anchors``), so one draw says little about a rule. The pool and
every anchor are scored once per scoring setting (zero-shot, and ``quality.shots`` demonstrations);
each draw is then arithmetic on those losses. Per draw, plan, scorer and rule it measures

- the selection F1 on the main federation and on the contamination sweep's federations, and the
  F1 of the best threshold (``best τ``: it knows the labels, the ceiling of the scorer's ranking);
- the clean-rejection rate: the share of the pool's clean items that fall below τ. The pool and the
  anchors come from one shuffle of one source, so a clean item is as exchangeable with the anchors
  as the rules assume; ``anchor-conformal:A`` and ``anchor-gaussian:A`` promise this rate is A.

The demonstrations are the first ``quality.shots`` anchors that fit whole, as in `fedqc run`, in
every draw and setting, so the pool is scored once; each draw takes n = ``data.num-anchors`` of the
other anchors, in random order. A plan says which anchors calibrate the ensemble and which set τ:

- ``drawn``: the n drawn anchors do both; the demonstrations are further anchors, in no draw.
- ``run``: as `fedqc run` does: the n anchors are the demonstrations and the first n − shots drawn
  ones (each demonstration scored with the next anchor in its own place: here anchor ``shots``,
  fixed, where `fedqc run` would take the first drawn one); all n calibrate the ensemble and set τ.
- ``split:C``: the same n anchors as ``run``; the first C of them (the demonstrations first)
  calibrate the ensemble and the other n − C set τ. No τ anchor then shapes the score function or
  sees another prefix than the clients' samples do.
"""

from __future__ import annotations

import csv
import math
import random
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedqc.bench.arms import mixture_tau
from fedqc.bench.config import BenchConfig
from fedqc.bench.experiment import Federation, ForwardScores, fitting_size, make_federation
from fedqc.bench.pool import Losses, score_pool, split_data
from fedqc.config import Config
from fedqc.data.partition import parse_partition
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.quality.rules import Rule, global_threshold
from fedqc.quality.selection import select, selection_metrics
from fedqc.report.tables import fmt, markdown_table, write_csv
from fedqc.scoring.scorers import CHECKPOINT_SCORERS

BEST = "best τ"
PROMISING = ("anchor-conformal", "anchor-gaussian")  # the rules that promise a rejection rate


def draw_anchors(
    seed: int, draw_seed: int, draws: int, n: int, demos: Sequence[int], pool: int
) -> list[np.ndarray]:
    """``draws`` random draws of ``n`` anchor indices from the ``pool`` anchors that are not
    demonstrations (``demos``), each in random order (``run`` and ``split`` take the first
    n − shots)."""
    free = [j for j in range(pool) if j not in set(demos)]
    if len(free) < n:
        raise FedqcError(
            f"--draws takes {n} anchors (data.num-anchors) from the {len(free)} anchors "
            "that are not demonstrations; raise bench.anchor-sweep's largest count or lower "
            "data.num-anchors"
        )
    out = []
    for r in range(draws):
        rng = random.Random(f"fedqc-bench-{seed}-draw-{draw_seed}-{r}")
        out.append(np.array(rng.sample(free, n), dtype=np.int64))
    return out


def plan_anchors(
    plan: str, draw: np.ndarray, demos: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(anchors that calibrate the ensemble, anchors that set τ) of one draw under ``plan``;
    ``demos``: the demonstrations' anchor indices."""
    if plan == "drawn":
        return draw, draw
    chosen = np.concatenate([np.asarray(demos, dtype=np.int64), draw[: len(draw) - len(demos)]])
    if plan == "run":
        return chosen, chosen
    c = split_size(plan)
    return chosen[:c], chosen[c:]


def demonstration_indices(truncated: np.ndarray, shots: int) -> list[int]:
    """The demonstrations as fedqc run picks them: the first ``shots`` anchors that fit whole
    (not cut at model.max-length; :func:`fedqc.scoring.shots.demonstration_anchors`)."""
    return [int(j) for j in np.flatnonzero(~np.asarray(truncated, dtype=bool))[:shots]]


def split_size(plan: str) -> int:
    return int(plan.partition(":")[2])


def clean_rejected(pool_oriented: np.ndarray, clean_entries: np.ndarray, tau: float) -> float:
    """The share of clean entries a client would reject at τ (non-finite scores are rejected)."""
    return 1.0 - float(select(pool_oriented[clean_entries], tau=tau).keep.mean())


def best_f1(oriented: np.ndarray, clean: np.ndarray) -> float:
    """The F1 of the best threshold (keep score ≥ τ; non-finite scores never kept)."""
    finite = np.isfinite(oriented)
    order = np.argsort(-oriented[finite], kind="stable")
    scores, good = oriented[finite][order], np.asarray(clean)[finite][order]
    kept = np.arange(1, len(scores) + 1)
    f1 = 2 * np.cumsum(good) / (kept + np.asarray(clean).sum())
    cut = np.append(scores[1:] != scores[:-1], True)  # a threshold keeps every tied score
    return float(f1[cut].max()) if cut.any() else 0.0


def measure(
    source: ForwardScores,
    rules: Sequence[Rule],
    feds: Sequence[Federation],
    clean_entries: np.ndarray,
    calibration: np.ndarray,
    tau_anchors: np.ndarray,
) -> list[dict]:
    """One row per rule (and ``best τ``) for one draw: τ, clean-rejection rate, F1 per federation.

    A rule that cannot be applied to these anchors gets a row with its reason in ``note``.
    """
    try:
        scorer, pool, every_anchor = source.scored(calibration)
    except FedqcError as exc:  # the ensemble cannot be calibrated on these anchors
        return [{"rule": str(r), "promised": None, "note": str(exc)} for r in rules]
    anchor = every_anchor[tau_anchors]
    rows = []
    for rule in rules:
        row: dict = {"rule": str(rule), "promised": rule.value if rule.kind in PROMISING else None}
        try:
            if rule.kind == "mixture":  # fitted to each federation's histogram: no one τ
                taus = [mixture_tau([pool[e] for e in f.entries], anchor) for f in feds]
                row |= {"tau": math.nan, "clean_rejected": math.nan}
            else:
                tau = global_threshold(rule, scorer, anchor)
                taus = [tau] * len(feds)
                row |= {
                    "tau": float(scorer.raw(tau)),
                    "clean_rejected": clean_rejected(pool, clean_entries, tau),
                }
        except FedqcError as exc:
            rows.append(row | {"note": str(exc)})
            continue
        for fed, tau in zip(feds, taus, strict=True):
            keep = select(pool[np.concatenate(fed.entries)], tau=tau).keep
            row[f"f1_{fed.label}"] = selection_metrics(keep, np.concatenate(fed.clean))["f1"]
        rows.append(row)
    best = {"rule": BEST, "promised": None, "tau": math.nan, "clean_rejected": math.nan}
    for fed in feds:
        best[f"f1_{fed.label}"] = best_f1(
            pool[np.concatenate(fed.entries)], np.concatenate(fed.clean)
        )
    return [*rows, best]


def sweep(
    losses: dict[int, tuple[Losses, Losses]],
    bench: BenchConfig,
    feds: Sequence[Federation],
    clean_entries: np.ndarray,
    draws: Sequence[np.ndarray],
) -> list[dict]:
    """Every (scoring setting, plan, scorer, draw): the rows of :func:`measure`, labelled."""
    rows = []
    for shots, (pool, anchors) in losses.items():
        for plan in bench.plan_list:
            if shots == 0 and plan == "run":
                continue  # zero-shot, `run` is `drawn`
            for name in bench.scorer_list:
                source = ForwardScores(name, pool, anchors)
                for r, draw in enumerate(draws):
                    calibration, tau_anchors = plan_anchors(
                        plan, draw, demonstration_indices(anchors.truncated, shots)
                    )
                    label = {"shots": shots, "plan": plan, "scorer": name, "draw": r}
                    for row in measure(
                        source, bench.rule_list, feds, clean_entries, calibration, tau_anchors
                    ):
                        rows.append(label | row)
    return rows


def summarise(rows: Sequence[dict], feds: Sequence[Federation]) -> list[dict]:
    """Per (setting, plan, scorer, rule): F1 mean and 10th percentile per federation, and the
    clean-rejection rate's mean, standard error, 10th and 90th percentiles over the draws."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shots"], row["plan"], row["scorer"], row["rule"]), []).append(row)
    out = []
    for (shots, plan, scorer, rule), g in groups.items():
        entry = {"shots": shots, "plan": plan, "scorer": scorer, "rule": rule}
        entry["promised"] = g[0]["promised"]
        failed = [x["note"] for x in g if x.get("note")]
        if failed:
            out.append(entry | {"draws": len(g) - len(failed), "note": failed[0]})
            continue
        entry["draws"] = len(g)
        for fed in feds:
            f1 = [x[f"f1_{fed.label}"] for x in g]
            entry[f"f1_{fed.label}"] = f"{fmt(float(np.mean(f1)))} / {fmt(_p(f1, 10))}"
            entry[f"f1_mean_{fed.label}"] = float(np.mean(f1))
        rate = [x["clean_rejected"] for x in g]
        if all(math.isfinite(v) for v in rate):
            entry |= {
                "clean_rejected": float(np.mean(rate)),
                "clean_rejected_se": float(np.std(rate, ddof=1) / math.sqrt(len(rate)))
                if len(rate) > 1
                else math.nan,
                "clean_rejected_p10": _p(rate, 10),
                "clean_rejected_p90": _p(rate, 90),
            }
            if entry["promised"] is not None:
                above = np.mean([v > entry["promised"] for v in rate])
                entry["draws_above"] = float(above)
        out.append(entry)
    return out


def _p(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q))


def _setting(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots} shots"


def tables(summary: Sequence[dict], feds: Sequence[Federation]) -> str:
    """The F1 table (mean / 10th percentile) and the clean-rejection table, as markdown."""
    f1_rows, cover_rows = [], []
    for s in summary:
        label = {"setting": _setting(s["shots"])} | s
        if s.get("note"):
            cover_rows.append(label)
            continue
        f1_rows.append(label)
        if s["rule"] != BEST and "clean_rejected" in s:
            cover_rows.append(
                label
                | {
                    "clean_rejected_text": f"{fmt(s['clean_rejected'])} ± "
                    f"{fmt(s['clean_rejected_se'])}",
                    "range": f"{fmt(s['clean_rejected_p10'])} – {fmt(s['clean_rejected_p90'])}",
                    "f1_main": f"{fmt(s[f'f1_mean_{feds[0].label}'])}",
                }
            )
    head = [("setting", "scoring"), ("plan", "plan"), ("scorer", "scorer"), ("rule", "rule")]
    f1_columns = head + [(f"f1_{f.label}", _fed_header(f)) for f in feds]
    cover_columns = head + [
        ("promised", "promised A"),
        ("clean_rejected_text", "clean rejected (mean ± s.e.)"),
        ("range", "10th – 90th percentile"),
        ("draws_above", "draws above A"),
        ("f1_main", "F1, main (mean)"),
        ("note", "note"),
    ]
    return (
        "## Selection F1 over the draws (mean / 10th percentile)\n\n"
        + markdown_table(f1_rows, f1_columns)
        + "\n## Clean samples rejected, against the promise\n\n"
        + "The share of the pool's clean items below τ, per draw; its mean over the draws is what "
        "`anchor-conformal:A` and `anchor-gaussian:A` promise to hold to A. The standard error is "
        "over the draws only: every draw takes its anchors from the same anchor set and is "
        "measured on the same clean items, which adds an error it does not show. A scorer that "
        "does not depend on the anchors (no ensemble) under the `drawn` plan is the control: "
        "there the conformal promise is exact in theory, so its distance from ⌊A(n+1)⌋/(n+1) "
        "shows that error.\n\n" + markdown_table(cover_rows, cover_columns)
    )


def _fed_header(fed: Federation) -> str:
    share = f"{fed.true_rate:.0%}"
    return f"main ({share})" if fed.label == "main" else share


def federations(cfg: Config, bench: BenchConfig, data) -> list[Federation]:
    """The bench's main federation and the contamination sweep's, as `fedqc bench` builds them."""
    d, types = cfg.data, bench.type_list
    partition, contamination = bench.main_partition(cfg)
    feds = [
        make_federation(
            data,
            partition,
            d.num_clients,
            d.samples_per_client,
            contamination,
            types,
            d.seed,
            "main",
        )
    ]
    sweep_partition = parse_partition(bench.sweep_partition)
    for rate in bench.contamination_list:
        n = fitting_size(data, types, rate, d.num_clients)
        feds.append(
            make_federation(
                data,
                sweep_partition,
                d.num_clients,
                n,
                rate,
                types,
                d.seed,
                f"contamination-{rate:g}",
            )
        )
    return feds


def run_draws(
    cfg: Config, bench: BenchConfig, run_dir: Path, draws: int, stages, command: str = ""
) -> str:
    """Score the pool zero-shot and with ``quality.shots``, measure ``draws`` anchor draws, and
    write results.csv, results.md and each setting's losses; returns the markdown."""
    from fedqc.bench.run import _LogStages

    start, stages = time.perf_counter(), stages or _LogStages()
    bench.check(cfg)
    checkpoint = [s for s in bench.scorer_list if s in CHECKPOINT_SCORERS]
    if checkpoint:
        raise FedqcError(
            f"--draws scores forward scorers only: drop {', '.join(checkpoint)} from bench.scorers"
        )
    bench.check_plans(cfg.quality.shots, cfg.data.num_anchors)
    (run_dir / "bench.toml").write_text(cfg.to_toml() + "\n" + bench.to_toml())
    data = split_data(cfg, bench)
    feds = federations(cfg, bench, data)
    losses, loaded = {}, None
    for shots in sorted({0, cfg.quality.shots}):
        path = f"losses-{shots}shot.csv"
        if bench.reuse_losses:
            losses[shots] = _read_losses(Path(bench.reuse_losses) / path, cfg, bench, data)
        else:
            loaded = loaded or load(cfg.scoring_model())
            losses[shots] = score_pool(loaded, cfg, data, shots, stages)
        _write_losses(run_dir / path, *losses[shots])
    demos = demonstration_indices(losses[cfg.quality.shots][1].truncated, cfg.quality.shots)
    anchor_draws = draw_anchors(
        cfg.data.seed, bench.draw_seed, draws, cfg.data.num_anchors, demos, len(data.anchors)
    )
    scoring = time.perf_counter() - start
    clean_entries = np.arange(len(data.items))  # entries() lists every item's clean version first
    rows = sweep(losses, bench, feds, clean_entries, anchor_draws)
    write_csv(run_dir / "results.csv", rows)
    summary = summarise(rows, feds)
    text = (
        "# fedqc bench: anchor rules over random anchor draws\n\n"
        + (f"Command: `{command}`\n\n" if command else "")
        + f"{draws} draws of {cfg.data.num_anchors} anchors (draw seed {bench.draw_seed}) from the "
        f"{len(data.anchors) - len(demos)} anchors that are not demonstrations; the "
        f"demonstrations are anchors {demos}, the first {cfg.quality.shots} that fit whole. Pool: "
        f"{len(data.items)} items, {len(data.entries())} scored entries; clean items: "
        f"{len(clean_entries)}. "
        + (
            f"Losses reused from {bench.reuse_losses}; "
            if bench.reuse_losses
            else f"Scoring took {scoring:.0f} s, "
        )
        + f"the draws "
        f"{time.perf_counter() - start - scoring:.0f} s.\n\n" + tables(summary, feds)
    )
    (run_dir / "results.md").write_text(text, encoding="utf-8")
    return text


def _write_losses(path: Path, pool: Losses, anchors: Losses) -> None:
    """Each pool entry's and anchor's losses (entries in BenchData.entries() order)."""
    rows = []
    for kind, losses in (("pool", pool), ("anchor", anchors)):
        end = losses.end if losses.end is not None else np.full(len(losses.cond), math.nan)
        rows += [
            {"set": kind, "index": i, "cond": c, "bare": b, "end": e, "truncated": bool(t)}
            for i, (c, b, e, t) in enumerate(
                zip(losses.cond, losses.bare, end, losses.truncated, strict=True)
            )
        ]
    write_csv(path, rows)


def _read_losses(path: Path, cfg: Config, bench: BenchConfig, data) -> tuple[Losses, Losses]:
    """A previous ``--draws`` run's losses, if that run scored this very pool and model."""
    previous = path.parent / "bench.toml"
    if not path.is_file() or not previous.is_file():
        raise FedqcError(f"bench.reuse-losses: {path} (and its bench.toml) not found")
    again = dict(_scoring_setup(cfg.to_toml() + "\n" + bench.to_toml()))
    before = dict(_scoring_setup(previous.read_text(encoding="utf-8")))
    changed = sorted(k for k in again if again[k] != before.get(k))
    if changed:
        raise FedqcError(
            f"bench.reuse-losses: {previous} scored another pool ({', '.join(changed)} differ); "
            "reuse a run with the same model, data and bench.types"
        )
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    sets = []
    for kind, size in (("pool", len(data.entries())), ("anchor", len(data.anchors))):
        part = [r for r in rows if r["set"] == kind]
        if len(part) != size:
            raise FedqcError(f"bench.reuse-losses: {path} has {len(part)} {kind} rows, not {size}")
        column = {
            k: np.array([float(r[k] or "nan") for r in part]) for k in ("cond", "bare", "end")
        }
        truncated = np.array([r["truncated"] == "True" for r in part], dtype=bool)
        sets.append(Losses(column["cond"], column["bare"], truncated, column["end"]))
    return sets[0], sets[1]


# What decides the scored losses: the model, the data split and the pool's corruptions.
SCORING_KEYS = (
    "model.",
    "data.",
    "quality.shots",
    "bench.types",
    "bench.variants",
    "bench.source",
    "bench.client-sources",
)


def _scoring_setup(toml_text: str):
    """(section.key, value) pairs of a bench.toml that decide the scored losses."""
    for section, values in tomllib.loads(toml_text).items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name.startswith(SCORING_KEYS + ("bench.anchor-sweep",)) and key != "contamination":
                yield name, value
