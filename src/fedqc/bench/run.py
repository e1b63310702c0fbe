"""`fedqc bench` from start to end: data, one scoring pass, for checkpoint scorers a federated
warm-up and scoring at its checkpoints, selection arms and sweeps, training arms, exact match, and
the outputs (results.csv, results.md, plots, report.html, timing.json)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from fedqc.bench.arms import Arm, make_arms
from fedqc.bench.checkpoints import CheckpointScores, Warmup, warm_up
from fedqc.bench.config import BenchConfig
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
    entries = data.entries()
    losses, anchor_losses = score_pool(loaded, cfg, data, cfg.quality.shots, stages)
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
    trained = _train_arms(cfg, bench, run_dir, data, fed, arms, main_rows, outcomes, stages, warmup)
    timing["training"] = time.perf_counter() - start - sum(timing.values())
    em = _exact_match(bench, run_dir, loaded, data, trained, stages)
    timing["generation"] = time.perf_counter() - start - sum(timing.values())
    train_rows = _train_rows(arms, trained, em)
    for row in main_rows:
        if row["client"] == "all" and row["arm"] in trained:
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
        histories={name: t["history"] for name, t in trained.items() if t["history"]},
        warmup=warmup,
        mixed_from_warmup=bool(trained.get("mixed", {}).get("from_warmup")),
        timing=_write_timing(run_dir, timing | {"total": time.perf_counter() - start}),
    )


def default_arm() -> str:
    """The arm of `fedqc run`'s default scorer and rule."""
    q = QualityConfig()
    return f"{q.scorer}/{q.rule}"


def arms_to_train(spec: str, arms: list[Arm], main_rows: list[dict]) -> list[Arm]:
    """``mixed``, ``oracle``, ``default`` (`fedqc run`'s default scorer and rule), ``best`` (the
    QC arm with the highest overall F1 on the main federation; picked with the ground truth),
    ``all``, ``none``, or arm names."""
    by_name = {a.name: a for a in arms}
    overall = {r["arm"]: r for r in main_rows if r["client"] == "all"}
    chosen: list[Arm] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word == "none":
            continue
        if word == "all":
            picks = arms
        elif word == "default":
            name = default_arm()
            if name not in by_name:
                raise FedqcError(
                    f"bench.train: the default arm {name} needs its scorer in bench.scorers and "
                    "its rule in bench.rules"
                )
            picks = [by_name[name]]
        elif word == "best":
            qc = [a for a in arms if a.kind == "qc"]
            picks = [max(qc, key=lambda a: overall[a.name]["f1"])] if qc else []
        elif word in by_name:
            picks = [by_name[word]]
        else:
            raise FedqcError(
                f"bench.train: unknown arm '{word}'; use mixed, oracle, default, best, all, "
                f"none or arm names such as {arms[-1].name}"
            )
        chosen += [a for a in picks if a not in chosen]
    return chosen


def _train_arms(
    cfg, bench, run_dir, data, fed, arms, main_rows, outcomes, stages, warmup: Warmup | None
) -> dict:
    trained = {}
    clients = [[data.sample(m) for m in members] for members in fed.members]
    for arm in arms_to_train(bench.train, arms, main_rows):
        if arm.kind == "mixed" and warmup is not None and warmup.rounds == cfg.train.rounds:
            # the warm-up was this very run: every sample, the same config and seed
            trained[arm.name] = warmup.result | {"from_warmup": True}
            continue
        stages.stage(f"training arm {arm.name}")
        trained[arm.name] = train_arm(
            cfg,
            clients,
            outcomes[arm.name].keep,
            run_dir / "data" / "eval.jsonl",
            run_dir / "train" / arm_folder(arm.name),
            stages,
        )
        for i, (name, overrides) in enumerate(bench.fl_arm_list(cfg), start=1):
            stages.stage(f"training arm {arm.name} + {name}")
            trained[f"{arm.name} + {name}"] = train_arm(
                cfg.replace(**overrides),
                clients,
                outcomes[arm.name].keep,
                run_dir / "data" / "eval.jsonl",
                run_dir / "train" / f"{arm_folder(arm.name)}+fl{i}",
                stages,
            )
    return trained


def _exact_match(bench, run_dir, loaded, data, trained, stages) -> dict[str, dict]:
    """Greedy generation on held-out questions: the untrained model ('base') and each trained arm,
    with exact match, answer format and ROUGE-L (:func:`answer_metrics`).

    Only where every reference answer ends with a ``#### N`` number (GSM8K).
    """
    questions = data.eval[: bench.em_questions]
    if not questions or any(final_number(s.response) is None for s in questions):
        return {}
    models = {"base": None} | {n: t["adapter"] for n, t in trained.items() if t["adapter"]}
    results, generations = {}, []
    for name, adapter in models.items():
        stages.stage(f"exact match: {name}, {len(questions)} greedy answers")
        load_adapter(loaded, adapter)
        answers = generate(loaded, questions, bench.max_new_tokens)
        results[name] = answer_metrics(answers, [s.response for s in questions])
        generations += [
            {"arm": name, "id": s.id, "answer": a, "reference": s.response}
            for s, a in zip(questions, answers, strict=True)
        ]
    load_adapter(loaded, None)
    with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for g in generations:
            fh.write(json.dumps(g, ensure_ascii=False) + "\n")
    return results


def _train_rows(arms: list[Arm], trained: dict, em: dict) -> dict[str, dict]:
    """One row per trained arm (and 'base', the untrained model): final eval loss, ppl, EM."""
    kinds = {a.name: a.kind for a in arms}
    rows = {}
    first = next((t["history"] for t in trained.values() if t["history"]), [])
    if first or "base" in em:
        base = first[0] if first else {}
        rows["base"] = {
            "arm": "base (no training)",
            "kind": "base",
            "rounds": 0,
            "eval_loss": base.get("eval_loss", math.nan),
            "eval_ppl": base.get("eval_ppl", math.nan),
            **em.get("base", {}),
        }
    for name, t in trained.items():
        final = t["history"][-1] if t["history"] else {}
        rows[name] = {
            "arm": name,
            "kind": kinds[name.split(" + ")[0]],  # a bench.fl-arms arm: its selection's kind
            "trained_samples": int(sum(t["kept"])),
            "clients_training": int(sum(k > 0 for k in t["kept"])),
            "rounds": final.get("round", 0),
            "eval_loss": final.get("eval_loss", math.nan),
            "eval_ppl": final.get("eval_ppl", math.nan),
            **em.get(name, {}),
            **({"note": "the checkpoint scorers' warm-up run"} if t.get("from_warmup") else {}),
        }
    return rows


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
