"""`fedqc run`: check the inputs, prepare a run directory, run the federation, and summarise.

Every user mistake is found before anything is written or started: :func:`check_inputs` reads the
config's names (scorer, rule, model) and every data file; :func:`prepare` then writes the run
directory; :func:`prepare_resume` reopens one to continue it from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedqc.config import Config, load_config
from fedqc.data.demo import write_demo
from fedqc.data.samples import load_samples
from fedqc.data.sources import client_source, source_exists
from fedqc.errors import FedqcError
from fedqc.quality.selection import selection_metrics

DEMOS = ("gsm8k",)


def new_run_dir(out: str | None, force: bool) -> Path:
    run_dir = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise FedqcError(f"{run_dir}: exists and is not empty; choose another --out or add --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_inputs(cfg: Config) -> None:
    """Stop with one clear line on a bad scorer, rule, model or data file (writes nothing)."""
    import torch

    from fedqc.federation.strategy import check_strategy
    from fedqc.models.loading import load
    from fedqc.quality.curriculum import check_curriculum
    from fedqc.quality.plan import check_scoring_model
    from fedqc.quality.rules import global_threshold, parse_rule
    from fedqc.scoring.scorers import any_scorer, get_checkpoint_scorer, is_checkpoint_scorer
    from fedqc.scoring.shots import require_anchors

    scorer, rule = any_scorer(cfg.quality.scorer), parse_rule(cfg.quality.rule)
    check_strategy(cfg)
    check_curriculum(cfg.quality.curriculum, cfg.train.rounds, is_checkpoint_scorer(scorer.name))
    check_scoring_model(
        [scorer.name], cfg.quality.curriculum, cfg.scoring_model().name, cfg.model.name
    )
    d = cfg.data
    if d.federation and d.federation not in DEMOS:
        raise FedqcError(
            f"unknown demo federation '{d.federation}'; use one of {DEMOS}, or "
            "data.federation='' with data.clients-dir, data.anchors and data.eval"
        )
    num_anchors = d.num_anchors
    if not d.federation or d.clients_dir:
        if not d.clients_dir:
            raise FedqcError("data.federation='' needs data.clients-dir (client-<i>.jsonl files)")
        for path in client_files(Path(d.clients_dir)):
            load_samples(path)
        if d.eval:
            load_samples(d.eval)
        num_anchors = len(load_samples(d.anchors)) if d.anchors else 0
    if is_checkpoint_scorer(scorer.name):
        # The anchors give the gradient direction (or the prompt) whatever the rule; icl and
        # nuggets score each anchor against the others.
        need = 2 if get_checkpoint_scorer(scorer.name).needs in ("prefix", "tasks") else 1
        if num_anchors < need:
            raise FedqcError(
                f"scorer '{scorer.name}' needs an anchor set of at least {need} samples "
                f"(it has {num_anchors}): set data.anchors=FILE (demo: data.num-anchors)"
            )
    if not is_checkpoint_scorer(scorer.name) and cfg.quality.shots and num_anchors:
        require_anchors(num_anchors, cfg.quality.shots, leave_one_out=rule.needs_anchors)
    if rule.needs_anchors:
        if num_anchors == 0:
            raise FedqcError(f"rule '{rule}' needs an anchor set: set data.anchors=FILE")
        # The rule decides how many anchors it needs: let it try that many placeholder scores.
        placeholder = np.arange(num_anchors, dtype=np.float64)
        if rule.needs_histograms:
            from fedqc.quality.mixture import histogram_edges

            histogram_edges(placeholder)
        else:
            global_threshold(rule, scorer, placeholder)
    if cfg.federation.client_gpus > 0 and not torch.cuda.is_available():
        raise FedqcError(
            f"federation.client-gpus = {cfg.federation.client_gpus}, but torch "
            f"{torch.__version__} sees no CUDA GPU here; set it to 0 (clients on the CPU)"
        )
    load(cfg.model)  # a model that does not exist, does not take the LoRA targets, or a device
    # or dtype (model.device, model.dtype) this machine does not have
    if cfg.separate_scorer:
        load(cfg.scoring_model())


def client_files(clients: Path) -> list[Path]:
    """Client 0, 1, ... data (consecutive) in a clients folder (:func:`client_source`)."""
    if not clients.is_dir():
        raise FedqcError(f"data.clients-dir '{clients}': folder not found")
    files = []
    while (found := client_source(clients, len(files))) is not None:
        files.append(found)
    if not files:
        raise FedqcError(
            f"{clients}: holds no client-0.jsonl (one client-<i>.jsonl per client; or .json, "
            ".csv, .parquet, or a client-<i>/ save_to_disk folder)"
        )
    return files


def write_config(run_dir: Path, cfg: Config) -> None:
    """``config.toml``, with the device and dtype that ``model.device`` and ``model.dtype`` give
    on this machine as comments (the keys keep their values, so the file runs anywhere)."""
    from fedqc.models.placement import resolve

    used = resolve(cfg.model.device, cfg.model.dtype).describe()
    notes = {
        "model.device": f"this machine: {used['device']}",
        "model.dtype": f"this machine: {used['dtype']}, training in {used['train_dtype']}",
    }
    (run_dir / "config.toml").write_text(cfg.to_toml(notes))


def prepare(cfg: Config, run_dir: Path) -> Config:
    """Resolve the data (building the demo federation if asked) and write the resolved config."""
    d = cfg.data
    if d.federation and d.federation not in DEMOS:
        raise FedqcError(f"unknown demo federation '{d.federation}'; use one of {DEMOS}")
    if d.federation and not d.clients_dir:
        data_dir = run_dir / "data"
        write_demo(
            data_dir,
            d.num_clients,
            d.samples_per_client,
            d.num_anchors,
            d.num_eval,
            d.contamination,
            d.seed,
        )
        cfg = cfg.replace(
            **{
                "data.clients-dir": str(data_dir / "clients"),
                "data.anchors": str(data_dir / "anchors.jsonl"),
                "data.eval": str(data_dir / "eval.jsonl"),
            }
        )
    n = len(client_files(Path(cfg.data.clients_dir)))
    for key in ("anchors", "eval"):
        path = getattr(cfg.data, key)
        if path and not source_exists(path):
            raise FedqcError(f"data.{key} '{path}': file not found")
    cfg = cfg.replace(**{"data.num-clients": n, "output.run-dir": str(run_dir)})
    write_config(run_dir, cfg)
    return cfg


def prepare_resume(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config of an interrupted run, ready to continue from its last checkpoint (or, before
    phase 2's first one, from its last finished warm-up round).

    ``overrides`` (``key=value``) may change only what does not change a round's result:
    train.rounds (to run longer) and federation.*.
    """
    from fedqc.federation.checkpoint import RESUMABLE_CHANGES, resume_point

    if not (run_dir / "config.toml").is_file():
        raise FedqcError(f"{run_dir}: not a fedqc run directory (no config.toml)")
    saved = load_config(run_dir / "config.toml")
    cfg = load_config(run_dir / "config.toml", overrides)
    for key in (k for k, v in cfg.to_flat().items() if saved.to_flat()[k] != v):
        if not key.startswith(RESUMABLE_CHANGES) or key.startswith("output."):
            raise FedqcError(
                f"--set {key}: a resumed run keeps its config; only train.rounds and "
                "federation.* may change"
            )
    # Stopped before phase 2's first checkpoint, with warm-up rounds on disk: those are reused and
    # the rest runs again. Otherwise the last checkpoint (a clear error when there is none).
    resume_point(run_dir, cfg, refuse_finished=True)
    cfg = cfg.replace(**{"output.run-dir": str(run_dir), "output.resume": True})
    check_inputs(cfg)
    write_config(run_dir, cfg.replace(**{"output.resume": False}))
    return cfg


def open_run(
    config: str | Path | None,
    overrides: list[str] | None,
    out: str | None,
    force: bool = False,
    allow_empty: bool = False,
    resume: str | Path | None = None,
) -> tuple[Config, Path]:
    """What `fedqc run` does before the federation starts: (config, run directory).

    A new run checks every input first, then creates the run directory (refusing a non-empty one
    without ``force``) and prepares it. ``resume`` reopens an interrupted run instead.
    """
    if resume is not None:
        given = [f for f, v in (("--config", config), ("--out", out), ("--force", force)) if v]
        if allow_empty:
            given.append("--allow-empty")
        if given:
            raise FedqcError(
                f"--resume continues a run with its own config and directory; drop {given[0]}"
            )
        return prepare_resume(Path(resume), overrides), Path(resume)
    cfg = load_config(config, overrides)
    cfg = cfg.replace(**{"quality.allow-empty": allow_empty or cfg.quality.allow_empty})
    check_inputs(cfg)
    run_dir = new_run_dir(out or cfg.output.run_dir or None, force)
    cfg = cfg.replace(**{"output.force": force, "output.resume": False})
    return prepare(cfg, run_dir), run_dir


def summary_notes(summary: dict) -> list[str]:
    """What the summary table does not show: truncation, non-finite scores, sit-outs, dropouts."""
    notes = []
    clients, totals = summary["clients"], summary["totals"]
    if summary.get("secure_sum"):
        notes.append(
            "secure sum: phase 1's counts reached the server only as sums over clients, but "
            "phase 2 replies still carried each training client's kept count (num-examples) "
            "and adapter; "
            + (
                "the per-client rows come from the clients' own files on this machine"
                if clients
                else "per-client rows are unavailable"
            )
        )
    if n := totals["truncated"]:
        notes.append(f"{n} samples were longer than model.max-length and were truncated")
    if n := totals["rejected-non-finite"]:
        notes.append(f"{n} samples had no finite score (NaN or ±inf) and were rejected")
    for c in clients:
        if c.get("sat_out"):
            notes.append(f"client {c['client']} kept no samples and sat out training")
    for d in summary.get("dropouts", []):
        where = "the quality round" if d["phase"].startswith("query") else f"round {d['round']}"
        who = f"client {d['client']}" if d["client"] >= 0 else f"node {d['node']}"
        notes.append(f"{who} dropped out of {where} ({d['phase']}): {d['reason']}")
    return notes


def summarize(cfg: Config) -> dict:
    """Join the run's outputs with ground-truth flags (where they exist) into summary.json."""
    run_dir = Path(cfg.output.run_dir)
    threshold = _read(run_dir / "threshold.json")
    selection = _read(run_dir / "selection.json")
    truth_dir = Path(cfg.data.clients_dir).parent / "truth"
    clients, all_keep, all_clean = [], [], []
    secure = bool(selection.get("secure_sum"))
    for stats in _client_counts(run_dir, selection):
        pid = int(stats.get("partition-id", -1))
        row = {
            "client": pid,
            "total": int(stats["total"]),
            "kept": int(stats["kept"]),
            "rejected": max(0, int(stats["total"]) - int(stats["kept"])),
            "rejected_non_finite": int(stats["rejected-non-finite"]),
            "truncated": int(stats["truncated"]),
            "sat_out": int(stats["kept"]) == 0,
        }
        truth = truth_dir / f"client-{pid}.jsonl"
        scores = run_dir / "clients" / f"client-{pid}" / "scores.jsonl"
        if truth.is_file() and scores.is_file():
            keep = {r["id"]: r["keep"] for r in _read_jsonl(scores)}
            flags = _read_jsonl(truth)
            k = np.array([keep[f["id"]] for f in flags])
            c = np.array([not f["corrupted"] for f in flags])
            row |= selection_metrics(k, c)
            all_keep.append(k)
            all_clean.append(c)
        clients.append(row)
    overall = (
        selection_metrics(np.concatenate(all_keep), np.concatenate(all_clean)) if all_keep else {}
    )
    summary = {
        "placement": threshold.get("placement"),
        "threshold": threshold,
        # quality.secure-sum: the server has only the sums; "clients" then holds the rows that
        # the clients' own files (simulation: RUN_DIR/clients/) give, if any
        "secure_sum": secure,
        "totals": selection.get("sums") or _sums(selection["clients"]),
        "clients": clients,
        "selection": overall,
        "rounds": _read(run_dir / "metrics.json"),
        "dropouts": dropouts(run_dir),
        # quality.dp-epsilon > 0: ε per client for the noisy counts (None without noise)
        "privacy_budget": threshold.get("privacy_budget"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _client_counts(run_dir: Path, selection: dict) -> list[dict]:
    """Each client's counts: from selection.json, or under a secure sum from the client's own
    selection.json where this machine has it (a simulation's RUN_DIR/clients/client-<id>/)."""
    if selection["clients"] is not None:
        return selection["clients"]
    rows = []
    for node in selection["nodes"]:
        local = run_dir / "clients" / f"client-{node['partition-id']}" / "selection.json"
        if local.is_file():
            rows.append({"partition-id": node["partition-id"], **json.loads(local.read_text())})
    return rows


def _sums(clients: list[dict]) -> dict[str, int]:
    keys = ("total", "kept", "rejected-below-threshold", "rejected-non-finite", "truncated")
    return {k: sum(int(c.get(k, 0)) for c in clients) for k in keys}


def dropouts(run_dir: Path) -> list[dict]:
    """Every node that was asked and did not answer: phase, round, node, client, reason."""
    path = run_dir / "participation.json"
    if not path.is_file():
        return []
    selection = _read(run_dir / "selection.json")
    nodes = selection.get("nodes") or selection["clients"]
    client_of = {s["node"]: s.get("partition-id", -1) for s in nodes}
    return [
        {
            "phase": e["phase"],
            "round": e["round"],
            "node": d["node"],
            "client": client_of.get(d["node"], -1),
            "reason": d["reason"],
        }
        for e in _read(path)
        for d in e["dropped"]
    ]


def _read(path: Path):
    if not path.is_file():
        raise FedqcError(f"{path}: missing; the run did not finish (see fedqc.log)")
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
