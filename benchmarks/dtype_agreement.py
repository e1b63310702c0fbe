"""Do bfloat16 and float32 make the same keep decisions on the demo federation?

Runs phase 1 of the README demo (``fedqc run`` with its defaults: 4 clients × 75 GSM8K samples,
10 anchors, the default scorer, rule and shots; ``train.rounds=0``) once per dtype on the same
device, and compares what the clients decided:

- the share of the 300 samples whose keep decision is the same in both dtypes;
- τ (in the scorer's units) and the selection F1 against the demo's ground truth in each;
- the ranking AUC (clean above corrupted) of each dtype's scores;
- the largest and the median absolute difference between the two dtypes' scores.

    python benchmarks/dtype_agreement.py [--device cpu] [--dtypes float32,bfloat16] [--out DIR]

On a CPU without native bf16 (no AMX or AVX512-BF16) the bfloat16 run is emulated and slower
than the float32 run, but its numbers are those of bf16 arithmetic all the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedqc.bench.arms import auc
from fedqc.quality.selection import selection_metrics


def run_phase1(out: Path, device: str, dtype: str) -> float:
    """``fedqc run`` up to the clients' decisions; returns its wall time."""
    start = time.perf_counter()
    cmd = [
        str(Path(sys.executable).parent / "fedqc"), "run", "--out", str(out), "--force",
        "--set", "train.rounds=0", "--set", f"model.device={device}",
        "--set", f"model.dtype={dtype}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def decisions(run_dir: Path) -> dict[str, tuple[float, bool, bool]]:
    """id → (score, keep, clean) over every client of a run."""
    out = {}
    for scores in sorted((run_dir / "clients").glob("client-*/scores.jsonl")):
        truth = run_dir / "data" / "truth" / f"{scores.parent.name}.jsonl"
        clean = {r["id"]: not r["corrupted"] for r in map(json.loads, truth.open())}
        for r in map(json.loads, scores.open()):
            score = np.nan if r["score"] is None else r["score"]
            out[r["id"]] = (score, r["keep"], clean[r["id"]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default="runs/dtype-agreement")
    args = parser.parse_args()
    reference, other = args.dtypes.split(",")
    runs, seconds = {}, {}
    for dtype in (reference, other):
        runs[dtype] = Path(args.out) / dtype
        seconds[dtype] = run_phase1(runs[dtype], args.device, dtype)
    a, b = decisions(runs[reference]), decisions(runs[other])
    ids = sorted(a)
    assert sorted(b) == ids, "the two runs scored different samples"
    clean = np.array([a[i][2] for i in ids])
    n_bad = int((~clean).sum())
    print(f"demo federation: {len(ids)} samples, {n_bad} corrupted, device {args.device}")
    print(f"{'dtype':<10} {'wall s':>7} {'tau':>9} {'kept':>5} {'F1':>6} {'AUC':>6}")
    for dtype, d in ((reference, a), (other, b)):
        score = np.array([d[i][0] for i in ids])
        keep = np.array([d[i][1] for i in ids])
        tau = json.loads((runs[dtype] / "threshold.json").read_text())["tau_raw"]
        f1 = selection_metrics(keep, clean)["f1"]
        print(
            f"{dtype:<10} {seconds[dtype]:>7.0f} {tau:>9.4f} {int(keep.sum()):>5} {f1:>6.3f} "
            f"{auc(score, clean):>6.3f}"
        )
    same = np.array([a[i][1] == b[i][1] for i in ids])
    diff = np.abs(np.array([a[i][0] - b[i][0] for i in ids]))
    finite = np.isfinite(diff)
    print(f"identical keep decisions: {int(same.sum())}/{len(ids)} = {same.mean():.4f}")
    print(
        f"|score difference|: median {np.median(diff[finite]):.4f}, max {diff[finite].max():.4f}"
        f" ({int((~finite).sum())} samples non-finite in one dtype)"
    )
    for i in (i for i, s in zip(ids, same, strict=True) if not s):
        print(f"  flipped {i}: {reference} {a[i][0]:.4f} keep={a[i][1]}, "
              f"{other} {b[i][0]:.4f} keep={b[i][1]}, clean={a[i][2]}")  # fmt: skip


if __name__ == "__main__":
    main()
