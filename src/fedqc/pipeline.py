"""`fedqc run`: prepare a run directory, run the federation, and summarise what happened."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedqc.config import Config
from fedqc.data.demo import write_demo
from fedqc.errors import FedqcError
from fedqc.quality.selection import selection_metrics

DEMOS = ("gsm8k",)


def new_run_dir(out: str | None, force: bool) -> Path:
    run_dir = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise FedqcError(f"{run_dir}: exists and is not empty; choose another --out or add --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare(cfg: Config, run_dir: Path) -> Config:
    """Resolve the data (building the demo federation if asked) and write the resolved config."""
    d = cfg.data
    if d.federation and d.federation not in DEMOS:
        raise FedqcError(
            f"unknown demo federation '{d.federation}'; use one of {DEMOS}, or "
            "data.federation='' with data.clients-dir, data.anchors and data.eval"
        )
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
    clients = Path(cfg.data.clients_dir)
    if not clients.is_dir():
        raise FedqcError(f"data.clients-dir '{clients}': folder not found")
    n = 0
    while (clients / f"client-{n}.jsonl").is_file():
        n += 1
    if n == 0:
        raise FedqcError(f"{clients}: holds no client-0.jsonl (one client-<i>.jsonl per client)")
    for key in ("anchors", "eval"):
        path = getattr(cfg.data, key)
        if path and not Path(path).is_file():
            raise FedqcError(f"data.{key} '{path}': file not found")
    cfg = cfg.replace(**{"data.num-clients": n, "output.run-dir": str(run_dir)})
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return cfg


def summarize(cfg: Config) -> dict:
    """Join the run's outputs with ground-truth flags (where they exist) into summary.json."""
    run_dir = Path(cfg.output.run_dir)
    threshold = _read(run_dir / "threshold.json")
    selection = _read(run_dir / "selection.json")
    truth_dir = Path(cfg.data.clients_dir).parent / "truth"
    clients, all_keep, all_clean = [], [], []
    for stats in selection["clients"]:
        pid = int(stats.get("partition-id", -1))
        row = {
            "client": pid,
            "total": int(stats["total"]),
            "kept": int(stats["kept"]),
            "rejected": int(stats["total"]) - int(stats["kept"]),
            "truncated": int(stats["truncated"]),
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
        "threshold": threshold,
        "clients": clients,
        "selection": overall,
        "rounds": _read(run_dir / "metrics.json"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _read(path: Path):
    if not path.is_file():
        raise FedqcError(f"{path}: missing; the run did not finish (see fedqc.log)")
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
