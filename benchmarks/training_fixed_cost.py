"""What one federated training costs beyond its own steps and evaluations (issue 27, step 3).

Each arm of the bench, and every `fedqc run`, is a Flower simulation: Ray starts, each ClientApp
actor loads the model and its data, the query round runs, then the rounds, the server's
evaluations and the adapters saved after every round. This benchmark runs one training with
``fedqc.bench.train.train_arm`` (exactly what the bench runs per arm and seed) on a small
demo-shaped federation, and, in the same process, the same compute without Flower: each client's
local steps on its samples and the server's evaluations, done directly with fedqc's own
functions (the reference). The difference is the fixed cost:

    fixed cost = wall time of the training − wall time of its steps and evaluations

``--before REV`` measures the training with the code of a git revision too (in a temporary
worktree, a subprocess with that package on its path), so before and after come from one command.

    python benchmarks/training_fixed_cost.py [--before REV] [--repeats 2]
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

TREE = Path(__file__).resolve().parents[1]
CLIENTS, SAMPLES, EVAL, ROUNDS, STEPS, BATCH, MAX_LENGTH = 2, 12, 8, 1, 2, 2, 384
SETTINGS = {
    "model.max-length": MAX_LENGTH,
    "model.device": "cpu",
    "train.rounds": ROUNDS,
    "train.local-steps": STEPS,
    "train.batch-size": BATCH,
}


def federation(out: Path) -> tuple[list, list[np.ndarray], Path]:
    """The demo federation's clients (all kept), and its held-out set."""
    from fedqc.data.demo import write_demo
    from fedqc.data.samples import load_samples

    write_demo(out, CLIENTS, SAMPLES, 10, EVAL, "0.5", 0)
    clients = [load_samples(out / "clients" / f"client-{i}.jsonl") for i in range(CLIENTS)]
    return clients, [np.ones(len(c), bool) for c in clients], out / "eval.jsonl"


def time_training(out: Path) -> float:
    """Wall time of one ``train_arm`` (the package on ``sys.path``)."""
    from fedqc.bench.train import train_arm
    from fedqc.config import Config

    clients, keep, eval_path = federation(out / "data")
    cfg = Config().replace(**SETTINGS)
    start = time.perf_counter()
    train_arm(cfg, clients, keep, eval_path, out / "arm")
    return time.perf_counter() - start


def time_compute(out: Path) -> float:
    """The same steps and evaluations without Flower: ROUNDS × (each client's STEPS local steps,
    one after the other as 2 cores run them) and ROUNDS + 1 evaluations, the model loaded once."""
    from fedqc.config import Config
    from fedqc.data.encoding import encode_all
    from fedqc.data.samples import load_samples
    from fedqc.models.loading import load
    from fedqc.train.local import evaluate, train_steps

    clients, _, eval_path = federation(out / "data-ref")
    cfg = Config().replace(**SETTINGS)
    loaded = load(cfg.model)
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    encoded = [encode_all(tok, c, MAX_LENGTH) for c in clients]
    held_out = encode_all(tok, load_samples(eval_path), MAX_LENGTH)
    start = time.perf_counter()
    evaluate(loaded.model, held_out, pad, cfg.quality.batch_tokens)
    for _ in range(ROUNDS):
        for enc in encoded:
            lr, placement = cfg.train.lr, loaded.placement
            train_steps(loaded.model, enc, pad, STEPS, BATCH, lr, placement=placement)
        evaluate(loaded.model, held_out, pad, cfg.quality.batch_tokens)
    return time.perf_counter() - start


def time_training_at(rev: str, out: Path) -> float:
    """:func:`time_training` with the package of git revision ``rev``, in a subprocess."""
    tree = out / "tree"
    subprocess.run(["git", "-C", str(TREE), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)  # fmt: skip
    try:
        code = (
            "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from training_fixed_cost import time_training;"
            "print(json.dumps(time_training(Path(sys.argv[2]))))"
        )
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        done = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(out / "run")],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", str(TREE), "worktree", "remove", "--force", str(tree)],
                       check=True, capture_output=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision to measure too (the code before)")
    parser.add_argument("--repeats", type=int, default=2, help="trainings per code version")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        compute = min(time_compute(root / f"ref-{i}") for i in range(args.repeats))
        rows = {"this tree": [time_training(root / f"now-{i}") for i in range(args.repeats)]}
        if args.before:
            old = [time_training_at(args.before, root / f"old-{i}") for i in range(args.repeats)]
            rows[f"{args.before} (before)"] = old
    print(
        f"one training: {CLIENTS} clients × {SAMPLES} samples, {ROUNDS} round × {STEPS} local "
        f"steps of batch {BATCH}, {EVAL} held-out samples, max-length {MAX_LENGTH}, on the CPU"
    )
    print(f"reference (the same steps and evaluations in this process, no Flower): {compute:.1f} s")
    print("| code | training wall (s), each run | fixed cost (s), best run | ratio to reference |")
    print("|---|---|---|---|")
    for label, walls in rows.items():
        best = min(walls)
        runs = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {label} | {runs} | {best - compute:.1f} | {best / compute:.2f}× |")
    print(json.dumps(rows | {"reference": compute}))


if __name__ == "__main__":
    main()
