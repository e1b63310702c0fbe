"""Demonstrations that fit whole against the first K anchors, on phase 1 of the README demo.

Runs phase 1 of the README demo (``fedqc run`` with its defaults: 4 clients × 75 GSM8K samples,
10 anchors, the default scorer, rule and 2 shots; ``train.rounds=0``) twice on the CPU: with the
code at ``--before`` (a git revision, checked out in a temporary worktree; it shows the first K
anchors, cut or not) and with this tree (the first K anchors that fit whole). For each it prints
the demonstration anchors, τ, the kept count and the selection F1, precision and recall against
the demo's ground truth (``data/truth``).

    python benchmarks/demonstrations.py --before REV [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dtype_agreement import decisions

from fedqc.config import load_config
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.models.loading import load
from fedqc.quality.selection import selection_metrics
from fedqc.scoring.shots import demonstration_anchors

TREE = Path(__file__).resolve().parents[1]


def run_phase1(src: Path, out: Path) -> float:
    """``fedqc run`` up to the clients' decisions with the package in ``src``; its wall time."""
    start = time.perf_counter()
    cmd = [
        sys.executable, "-c", "from fedqc.cli import main; main()", "run", "--out", str(out),
        "--force", "--set", "train.rounds=0", "--set", "model.device=cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision with the old rule")
    parser.add_argument("--out", default="runs/demonstrations")
    args = parser.parse_args()
    out = Path(args.out)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(TREE), "worktree", "add", "--detach", str(old),
                        args.before], check=True, capture_output=True)  # fmt: skip
        try:
            seconds["before"] = run_phase1(old / "src", out / "before")
        finally:
            subprocess.run(["git", "-C", str(TREE), "worktree", "remove", "--force", str(old)],
                           check=True)  # fmt: skip
    seconds["after"] = run_phase1(TREE / "src", out / "after")

    cfg = load_config(out / "after" / "config.toml")
    shots, max_length = cfg.quality.shots, cfg.model.max_length
    anchors = encode_all(load(cfg.model).tokenizer, load_samples(cfg.data.anchors), max_length)
    cut = [j for j, a in enumerate(anchors) if a.truncated]
    shown = {
        "before": list(range(shots)),
        "after": demonstration_anchors(anchors, shots)[:shots],
    }
    print(
        f"demo phase 1, quality.shots = {shots}, model.max-length = {max_length}: anchors cut "
        f"{cut} of {len(anchors)}; --before {args.before}"
    )
    print(f"{'rule':<7} {'demos':<8} {'wall s':>7} {'tau':>9} {'kept':>5} {'F1':>6} "
          f"{'prec':>6} {'recall':>6}")  # fmt: skip
    for rule in ("before", "after"):
        d = decisions(out / rule)
        ids = sorted(d)
        keep = np.array([d[i][1] for i in ids])
        clean = np.array([d[i][2] for i in ids])
        m = selection_metrics(keep, clean)
        tau = json.loads((out / rule / "threshold.json").read_text())["tau_raw"]
        print(
            f"{rule:<7} {str(shown[rule]):<8} {seconds[rule]:>7.0f} {tau:>9.4f} "
            f"{int(keep.sum()):>5} {m['f1']:>6.3f} {m['precision']:>6.3f} {m['recall']:>6.3f}"
        )
    print(f"samples: {len(ids)}, clean: {int(clean.sum())}")


if __name__ == "__main__":
    main()
