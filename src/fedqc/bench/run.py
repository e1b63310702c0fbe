"""`fedqc bench` from start to end: data, one scoring pass, for checkpoint scorers a federated
warm-up and scoring at its checkpoints, selection arms and sweeps, training arms, exact match, and
the outputs (results.csv, results.md, plots, report.html, timing.json)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from fedqc.bench.arms import RANDOM, Arm, make_arms, random_keep
from fedqc.bench.by_type import MIXTURE, retype, table_rows
from fedqc.bench.checkpoints import CheckpointScores, Warmup, warm_up
from fedqc.bench.config import BenchConfig
from fedqc.bench.effect import goal_checks, pm, summarize
from fedqc.bench.experiment import (
    Experiment,
    Federation,
    ForwardScores,
    Selector,
    make_federation,
)
from fedqc.bench.generation import generate
from fedqc.bench.pool import BenchData, score_pool, split_data
from fedqc.bench.publish import publish
from fedqc.bench.train import arm_folder, load_adapter, train_arm, write_samples
from fedqc.config import Config, QualityConfig
from fedqc.data.partition import parse_partition
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.scorers import CHECKPOINT_SCORERS, batch_tokens_for
from fedqc.train.answers import answer_metrics, final_number

log = logging.getLogger("fedqc.bench")


class _LogStages:
    def stage(self, description: str, total: int | None = None) -> None:
        log.info("%s", description)

    def advance(self, n: int = 1) -> None:
        pass


def run_bench(
    cfg: Config, bench: BenchConfig, run_dir: Path, stages=None, command: str = ""
) -> dict:
    """Run the whole bench into ``run_dir``; returns what :func:`publish` wrote, as data."""
    stages = stages or _LogStages()
    start = time.perf_counter()
    bench.check(cfg)
    d, types, scorers = cfg.data, bench.type_list, bench.scorer_list
    (run_dir / "bench.toml").write_text(cfg.to_toml() + "\n" + bench.to_toml())

    data = split_data(cfg, bench)
    partition, contamination = bench.main_partition(cfg)
    fed = make_federation(
        data, partition, d.num_clients, d.samples_per_client, contamination, types, d.seed, "main"
    )
    _write_data(run_dir / "data", data, fed)

    loaded = load(cfg.model)
    scoring = load(cfg.scoring_model()) if cfg.separate_scorer else loaded  # quality.model
    entries = data.entries()
    losses, anchor_losses = score_pool(scoring, cfg, data, cfg.quality.shots, stages)
    timing = {"scoring": time.perf_counter() - start}
    main_anchors = np.arange(d.num_anchors)
    sources = {
        s: ForwardScores(s, losses, anchor_losses) for s in scorers if s not in CHECKPOINT_SCORERS
    }
    warmup, checkpointed = None, {}
    if bench.checkpoint_scorers:
        w = bench.warmup_rounds
        stages.stage(f"warm-up: {w} rounds of federated LoRA on the main federation, unfiltered")
        clients = [[data.sample(m) for m in members] for members in fed.members]
        warmup = warm_up(
            cfg, w, clients, run_dir / "data" / "eval.jsonl", run_dir / "warmup", stages
        )
        timing["warm-up"] = warmup.seconds
        for name in bench.checkpoint_scorers:
            stages.stage(f"scoring the pool and the anchors at {w} checkpoints: {name}")
            checkpointed[name] = sources[name] = CheckpointScores(
                name,
                loaded,
                warmup,
                data,
                cfg.model.max_length,
                batch_tokens_for(name, cfg.quality.batch_tokens, cfg.quality.backward_batch_tokens),
                main_anchors,
                bench.rescore_checkpoints,
                stages,
            )
            checkpointed[name].prepare(fed)
            timing[f"scoring {name}"] = checkpointed[name].seconds
    selector = Selector([sources[s] for s in scorers], main_anchors)
    _write_scores(run_dir / "scores.csv", data, entries, losses, selector)

    stages.stage("selection: every arm, and the sweeps")
    arms = make_arms(scorers, bench.list_of("rules"))
    experiment = Experiment(selector, arms, data, d.num_clients, types, d.seed, d.num_anchors)
    main_rows, outcomes = experiment.main(fed)
    train_arms = list(arms)
    zero_shot = None
    if "paper" in bench.list_of("train"):
        paper_start = time.perf_counter()
        zero_shot = _zero_shot(cfg, scoring, data, losses, anchor_losses, stages)
        paper_rows, paper_outcomes = _paper_arm(cfg, data, fed, zero_shot, types)
        main_rows += paper_rows
        outcomes |= paper_outcomes
        train_arms.append(PAPER)
        timing["scoring zero-shot (paper)"] = time.perf_counter() - paper_start
    sweep = parse_partition(bench.sweep_partition)
    sweeps = {
        "contamination": experiment.contamination_sweep(sweep, bench.contamination_list),
        "anchors": experiment.anchor_sweep(fed, bench.anchor_counts, bench.anchor_repeats),
        "types": experiment.type_sweep(sweep, bench.type_rate),
    }
    rescoring = sum(c.seconds for c in checkpointed.values()) - sum(
        timing[f"scoring {n}"] for n in checkpointed
    )
    if rescoring:
        timing["re-scoring for the sweeps"] = rescoring
    timing["selection"] = time.perf_counter() - start - sum(timing.values())
    chosen = arms_to_train(bench.train, train_arms, main_rows)
    train_arms += [RANDOM] * (RANDOM in chosen)
    runs = _train_arms(
        cfg, bench, run_dir, run_dir / "train", data, fed, chosen, outcomes, stages, warmup
    )
    timing["training"] = time.perf_counter() - start - sum(timing.values())
    base, generated = _exact_match(bench, run_dir, loaded, data, runs, stages)
    timing["generation"] = time.perf_counter() - start - sum(timing.values())
    per_seed = _per_seed(runs, generated)
    summary = summarize(per_seed)
    by_type_rows = []
    if bench.by_type:
        by_type_rows = _by_type(
            cfg,
            bench,
            run_dir,
            data,
            fed,
            experiment,
            train_arms,
            main_rows,
            zero_shot,
            loaded,
            per_seed,
            stages,
        )
        timing["by type"] = time.perf_counter() - start - sum(timing.values())
    goals = goal_checks(summary, default_arm())
    train_rows = _train_rows(train_arms, runs, base, summary)
    _write_training(run_dir / "training.json", bench.seed_list(cfg), runs, per_seed, summary, goals)
    for row in main_rows:
        if row["client"] == "all" and row["arm"] in runs:
            row.update({k: v for k, v in train_rows[row["arm"]].items() if k not in row})

    return publish(
        run_dir,
        cfg,
        bench,
        command=command,
        data=data,
        fed=fed,
        partition=str(partition),
        contamination=contamination,
        losses=losses,
        selector=selector,
        outcomes=outcomes,
        arms=arms,
        main_rows=main_rows,
        sweeps=sweeps,
        train_rows=list(train_rows.values()),
        by_type_rows=by_type_rows,
        histories={
            name: {seed: t["history"] for seed, t in seeds.items() if t["history"]}
            for name, seeds in runs.items()
            if any(t["history"] for t in seeds.values())
        },
        goals=goals,
        warmup=warmup,
        mixed_from_warmup=any(t.get("from_warmup") for t in runs.get("mixed", {}).values()),
        timing=_write_timing(run_dir, timing | {"total": time.perf_counter() - start}),
    )


# The papers' arm: ppl + anchor-mean, scored zero-shot (FedDQC, Superfiltering).
PAPER = Arm("paper", "qc", "ppl", "anchor-mean")


def default_arm() -> str:
    """The arm of `fedqc run`'s default scorer and rule."""
    q = QualityConfig()
    return f"{q.scorer}/{q.rule}"


def arms_to_train(spec: str, arms: list[Arm], main_rows: list[dict]) -> list[Arm]:
    """``mixed``, ``oracle``, ``default`` (`fedqc run`'s default scorer and rule), ``paper`` (among
    ``arms`` when it was asked for: ppl + anchor-mean scored zero-shot), ``random`` (the default's
    kept count per client, drawn at random for each training seed), ``best`` (the QC arm with the
    highest overall F1 on the main federation; picked with the ground truth), ``all``, ``none``,
    or arm names."""
    by_name = {a.name: a for a in arms}
    overall = {r["arm"]: r for r in main_rows if r["client"] == "all"}
    chosen: list[Arm] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word == "none":
            continue
        if word == "all":
            picks = arms
        elif word in ("default", "random"):
            name = default_arm()
            if name not in by_name:
                why = "" if word == "default" else "random draws its kept counts; "
                raise FedqcError(
                    f"bench.train: {why}the default arm {name} needs its scorer in "
                    "bench.scorers and its rule in bench.rules"
                )
            picks = [by_name[name] if word == "default" else RANDOM]
        elif word == "best":
            qc = [a for a in arms if a.kind == "qc"]
            picks = [max(qc, key=lambda a: overall[a.name]["f1"])] if qc else []
        elif word in by_name:
            picks = [by_name[word]]
        else:
            raise FedqcError(
                f"bench.train: unknown arm '{word}'; use mixed, oracle, default, paper, best, all, "
                f"none or arm names such as {arms[-1].name}"
            )
        chosen += [a for a in picks if a not in chosen]
    return chosen


def _zero_shot(cfg, loaded, data, losses, anchor_losses, stages):
    """The pool's and the anchors' losses without demonstrations (the papers' arm scores
    zero-shot): scored again unless the main scoring already was zero-shot."""
    if not cfg.quality.shots:
        return losses, anchor_losses
    load_adapter(loaded, None)  # the untrained model scores, as in the main pass
    return score_pool(loaded, cfg, data, 0, stages)


def _paper_arm(cfg, data, fed, zero_shot, types):
    """The papers' arm (ppl + anchor-mean, zero-shot) on ``fed``: its rows and outcome."""
    d = cfg.data
    anchors = np.arange(d.num_anchors)
    selector = Selector([ForwardScores(PAPER.scorer, *zero_shot)], anchors)
    experiment = Experiment(selector, [PAPER], data, d.num_clients, types, d.seed, d.num_anchors)
    return experiment.main(fed)


def _by_type(
    cfg, bench, run_dir, data, fed, experiment, arms, main_rows, zero_shot, loaded, per_seed, stages
) -> list[dict]:
    """``bench.by-type``: on each corruption type's federation (:func:`retype`), the trained arms
    except the oracle, whose selection is the main one's (its ``per_seed`` results stand in);
    returns the table's rows for every type and then for the main federation's mixture."""
    oracle = {"oracle": per_seed["oracle"]} if "oracle" in per_seed else {}
    selection, summaries = {}, {}
    for kind in bench.type_list:
        fed_kind = retype(fed, data, kind)
        rows, outcomes = experiment.main(fed_kind)
        if zero_shot is not None:
            paper_rows, paper_outcomes = _paper_arm(cfg, data, fed_kind, zero_shot, bench.type_list)
            rows, outcomes = rows + paper_rows, outcomes | paper_outcomes
        chosen = [a for a in arms_to_train(bench.train, arms, rows) if a.kind != "oracle"]
        folder = run_dir / "by-type" / kind
        stages.stage(f"by type: {kind} only, {len(chosen)} arm(s) to train")
        runs = _train_arms(
            cfg, bench, run_dir, folder, data, fed_kind, chosen, outcomes, stages, None
        )
        _, generated = _exact_match(bench, folder, loaded, data, runs, stages, with_base=False)
        selection[kind] = [r for r in rows if r["client"] == "all"]
        summaries[kind] = summarize(_per_seed(runs, generated) | oracle)
    selection[MIXTURE] = [r for r in main_rows if r["client"] == "all"]
    summaries[MIXTURE] = summarize(per_seed)
    return table_rows(selection, summaries, [a.name for a in arms])


def _train_arms(
    cfg, bench, run_dir, train_dir, data, fed, chosen, outcomes, stages, warmup: Warmup | None
) -> dict[str, dict[int, dict]]:
    """Every ``chosen`` arm (and its bench.fl-arms variants), once per training seed, each in its
    folder under ``train_dir``, evaluated on ``run_dir``'s data/eval.jsonl: arm -> seed ->
    :func:`train_arm`'s result."""
    runs: dict[str, dict[int, dict]] = {}
    clients = [[data.sample(m) for m in members] for members in fed.members]
    eval_path = run_dir / "data" / "eval.jsonl"
    seeds = bench.seed_list(cfg)
    variants = [("", "", {})] + [
        (f" + {name}", f"+fl{i}", overrides)
        for i, (name, overrides) in enumerate(bench.fl_arm_list(cfg), start=1)
    ]
    for arm in chosen:
        for suffix, folder_suffix, overrides in variants:
            name = arm.name + suffix
            runs[name] = {}
            for seed in seeds:
                if (
                    not overrides
                    and arm.kind == "mixed"
                    and warmup is not None
                    and warmup.rounds == cfg.train.rounds
                    and seed == cfg.train.seed
                ):
                    # the warm-up was this very run: every sample, the same config and seed
                    runs[name][seed] = warmup.result | {"from_warmup": True}
                    continue
                folder = train_dir / (arm_folder(arm.name) + folder_suffix)
                if len(seeds) > 1:
                    folder = folder / f"seed-{seed}"
                stages.stage(f"training arm {name}" + (f", seed {seed}" if len(seeds) > 1 else ""))
                keep = (
                    random_keep(outcomes[default_arm()].keep, seed)
                    if arm.kind == "random"
                    else outcomes[arm.name].keep
                )
                runs[name][seed] = train_arm(
                    cfg.replace(**overrides, **{"train.seed": seed}),
                    clients,
                    keep,
                    eval_path,
                    folder,
                    stages,
                )
    return runs


def _exact_match(
    bench, run_dir, loaded, data, runs, stages, with_base: bool = True
) -> tuple[dict, dict]:
    """Greedy generation on held-out questions: the untrained model ('base', unless
    ``with_base`` is false) and each trained arm and seed, with exact match, answer format and
    ROUGE-L (:func:`answer_metrics`); returns (base metrics, arm -> seed -> metrics), and the
    answers as ``run_dir``/generations.jsonl.

    Only where every reference answer ends with a ``#### N`` number (GSM8K).
    """
    questions = data.eval[: bench.em_questions]
    if not questions or any(final_number(s.response) is None for s in questions):
        return {}, {}
    models = [("base", None, None)] * with_base + [
        (name, seed, t["adapter"])
        for name, seeds in runs.items()
        for seed, t in seeds.items()
        if t["adapter"]
    ]
    references = [s.response for s in questions]
    base, results, generations = {}, {}, []
    for name, seed, adapter in models:
        label = name if seed is None or len(runs[name]) == 1 else f"{name}, seed {seed}"
        stages.stage(f"exact match: {label}, {len(questions)} greedy answers")
        cache = (adapter.parent.parent if adapter else run_dir / "train") / "answers.json"
        answers = _answers(loaded, adapter, questions, bench.max_new_tokens, cache)
        metrics = answer_metrics(answers, references)
        if seed is None:
            base = metrics
        else:
            results.setdefault(name, {})[seed] = metrics
        generations += [
            {"arm": name, "seed": seed, "id": s.id, "answer": a, "reference": s.response}
            for s, a in zip(questions, answers, strict=True)
        ]
    load_adapter(loaded, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for g in generations:
            fh.write(json.dumps(g, ensure_ascii=False) + "\n")
    return base, results


def _answers(loaded, adapter: Path | None, questions, max_new_tokens: int, cache: Path) -> list:
    """Greedy answers of ``adapter`` (None: the untrained model), read back from ``cache`` when
    an earlier run of the bench answered the same questions with the same adapter."""
    key = hashlib.sha256(
        json.dumps([[s.id, s.prompt] for s in questions] + [max_new_tokens]).encode()
        + (Path(adapter, "adapter_model.safetensors").read_bytes() if adapter else b"base")
    ).hexdigest()
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["answers"]
    except (OSError, ValueError, KeyError):
        pass
    load_adapter(loaded, adapter)
    answers = generate(loaded, questions, max_new_tokens)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "answers": answers}, ensure_ascii=False))
    return answers


def _per_seed(runs: dict, generated: dict) -> dict[str, dict[int, dict[str, float]]]:
    """arm -> seed -> the final round's eval loss and ppl and the generation metrics."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, seeds in runs.items():
        for seed, t in seeds.items():
            final = t["history"][-1] if t["history"] else {}
            out.setdefault(name, {})[seed] = {
                "eval_loss": final.get("eval_loss", math.nan),
                "eval_ppl": final.get("eval_ppl", math.nan),
                **generated.get(name, {}).get(seed, {}),
            }
    return out


TEXT_METRICS = ("eval_loss", "answer_format", "exact_match", "rouge_l")


def _train_rows(arms: list[Arm], runs: dict, base: dict, summary: dict) -> dict[str, dict]:
    """One row per trained arm (and 'base', the untrained model): the means over the training
    seeds of the final eval loss, ppl and generation metrics, their sd, and the paired
    differences against mixed (``*_text``: ``mean ± sd`` for the tables)."""
    kinds = {a.name: a.kind for a in arms}
    rows = {}
    first = next(
        (t["history"] for seeds in runs.values() for t in seeds.values() if t["history"]), []
    )
    if first or base:
        start = first[0] if first else {}
        rows["base"] = {
            "arm": "base (no training)",
            "kind": "base",
            "rounds": 0,
            "eval_loss": start.get("eval_loss", math.nan),
            "eval_ppl": start.get("eval_ppl", math.nan),
            **base,
        }
        rows["base"] |= {
            f"{k}_text": pm(rows["base"].get(k, math.nan), math.nan) for k in TEXT_METRICS
        }
    for name, seeds in runs.items():
        results = list(seeds.values())
        final = results[0]["history"][-1] if results[0]["history"] else {}
        s = summary[name]
        ppl = [t["history"][-1]["eval_ppl"] for t in results if t["history"]]
        row = {
            "arm": name,
            "kind": kinds[name.split(" + ")[0]],  # a bench.fl-arms arm: its selection's kind
            "trained_samples": int(sum(results[0]["kept"])),
            "clients_training": int(sum(k > 0 for k in results[0]["kept"])),
            "rounds": final.get("round", 0),
            "seeds": len(seeds),
            "eval_ppl": float(np.mean(ppl)) if ppl else math.nan,
            # the gap of mixed (0) and of the oracle (1) is theirs by definition: left out
            **{
                k: v
                for k, v in s.items()
                if k != "seeds" and not (k.startswith("gap_") and name in ("mixed", "oracle"))
            },
            **(
                {"note": "the checkpoint scorers' warm-up run"}
                if any(t.get("from_warmup") for t in results)
                else {"note": "the default's kept count per client, drawn at random per seed"}
                if kinds[name.split(" + ")[0]] == "random"
                else {}
            ),
        }
        for k in TEXT_METRICS:
            row[f"{k}_text"] = pm(s[k], s[f"{k}_sd"])
            if f"d_{k}" in s and name != "mixed":
                row[f"d_{k}_text"] = pm(s[f"d_{k}"], s[f"d_{k}_sd"])
        rows[name] = row
    return rows


def _write_training(path: Path, seeds, runs, per_seed, summary, goals) -> None:
    """training.json: per arm and seed the kept counts, eval loss per round and the final metrics;
    the summary over seeds and the goal checks."""
    arms = {
        name: {
            "kept": next(iter(seeds.values()))["kept"],
            "seeds": {
                str(seed): {"history": t["history"], "final": per_seed[name][seed]}
                for seed, t in seeds.items()
            },
            "summary": summary[name],
        }
        for name, seeds in runs.items()
    }
    data = _plain({"seeds": seeds, "arms": arms, "goals": goals})
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def _plain(value):
    """JSON-ready: non-finite floats become null, paths strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_data(folder: Path, data: BenchData, fed: Federation) -> None:
    """Eval and anchors (clean), the pool with its variants, and the main federation's flags."""
    write_samples(folder / "eval.jsonl", data.eval)
    write_samples(folder / "anchors.jsonl", data.anchors)
    with open(folder / "pool.jsonl", "w", encoding="utf-8") as fh:
        for item, variants in zip(data.items, data.variants, strict=True):
            row = {"id": item.id, "prompt": item.prompt, "response": item.response}
            fh.write(json.dumps(row | {"variants": variants}, ensure_ascii=False) + "\n")
    clients = [
        [
            {"id": data.items[m.item].id, "corrupted": m.corrupted, "corruption": m.corruption}
            for m in members
        ]
        for members in fed.members
    ]
    (folder / "federation.json").write_text(json.dumps({"clients": clients}, indent=1) + "\n")


def _write_timing(run_dir: Path, timing: dict[str, float]) -> dict[str, float]:
    """Seconds per stage, also as timing.json (to size a profile from its stages)."""
    (run_dir / "timing.json").write_text(
        json.dumps({k: round(v, 2) for k, v in timing.items()}, indent=1) + "\n"
    )
    return timing


def _write_scores(path: Path, data: BenchData, entries, losses, selector: Selector) -> None:
    """Every pool entry's losses and raw scores (with the main anchors; empty: not scored)."""
    from fedqc.report.tables import write_csv

    raw = {s: selector.sources[s].pool_raw(selector.main_anchors) for s in selector.scorers}
    write_csv(
        path,
        [
            {
                "id": data.items[i].id,
                "corruption": kind or "",
                "truncated": bool(losses.truncated[j]),
                "loss_cond": float(losses.cond[j]),
                "loss_bare": float(losses.bare[j]),
                "loss_end": float(losses.end[j]) if losses.end is not None else math.nan,
                **{s: float(raw[s][j]) for s in raw},
            }
            for j, (i, kind) in enumerate(entries)
        ],
    )
