"""Speed of a LoRA training step in a low-precision dtype against the float32 step.

Both run fedqc's own local training (``fedqc.train.local.train_steps``: AdamW on float32 LoRA
weights, response-only token-mean loss) on SmolLM2-135M over the same demo samples, with the
same seed, so they draw the same batches. The float32 step is the reference (what fedqc did
before ``model.dtype``, and what the papers' code does on a CPU); the other runs with
``model.dtype=--dtype``: ``bfloat16`` (the default here) loads the base model in bf16, ``auto``
keeps float32 weights and trains under bf16 autocast where the hardware runs bf16 natively; both
run forward and backward under autocast, as PEFT and TRL users train. Each is warmed up with one
step, then timed over ``--steps`` steps, best of ``--repeats``, interleaved. Goal: the
low-precision step >= 2x the float32 step.

Whether the machine runs bf16 natively decides the answer: a CPU without AMX or AVX512-BF16
emulates it, several times slower than float32, and ``model.dtype=auto`` keeps float32 there.
gpu_check.sh runs it with ``--dtype auto`` on a GPU, the configuration a default run trains in.

    .venv/bin/python benchmarks/training_step.py [--device auto] [--dtype bfloat16] [--steps 3]
        [--batch-size 4] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from fedqc.config import ModelConfig, TrainConfig
from fedqc.data.demo import write_demo
from fedqc.data.encoding import encode_all
from fedqc.data.samples import load_samples
from fedqc.models.loading import load
from fedqc.models.placement import native_bf16
from fedqc.train.local import train_steps

GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype timed against float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp), num_clients=1, samples_per_client=32, contamination="0")
        samples = load_samples(Path(tmp) / "clients" / "client-0.jsonl")

    best: dict[str, float] = {}
    losses: dict[str, float] = {}
    placements: dict[str, dict[str, str]] = {}
    for _ in range(args.repeats):
        for dtype in ("float32", args.dtype):
            loaded = load(ModelConfig(device=args.device, dtype=dtype))
            placements[dtype] = loaded.placement.describe()
            encoded = encode_all(loaded.tokenizer, samples, ModelConfig().max_length)
            pad = loaded.tokenizer.pad_token_id

            def run(steps: int, loaded=loaded, encoded=encoded, pad=pad) -> float:
                loaded.reset_adapter()
                return train_steps(
                    loaded.model,
                    encoded,
                    pad,
                    steps,
                    args.batch_size,
                    5e-4,
                    placement=loaded.placement,
                )

            run(1)  # warm-up
            start = time.perf_counter()
            losses[dtype] = run(args.steps)
            if loaded.placement.device.type == "cuda":
                torch.cuda.synchronize()
            best[dtype] = min(best.get(dtype, math.inf), time.perf_counter() - start)
    device = loaded.placement.device
    print(
        f"SmolLM2-135M on {device} (native bf16: {native_bf16(device)}), torch "
        f"{torch.__version__}, {args.threads} threads | {args.steps} steps of batch "
        f"{args.batch_size}, best of {args.repeats}"
    )
    print(f"\n{'model.dtype':<12} {'weights':<9} {'autocast':<9} {'s/step':>8} {'mean loss':>10}")
    for dtype, seconds in best.items():
        used = placements[dtype]
        print(
            f"{dtype:<12} {used['dtype']:<9} {used['train_dtype']:<9} "
            f"{seconds / args.steps:>8.2f} {losses[dtype]:>10.4f}"
        )
    ratio = best["float32"] / best[args.dtype]
    print(
        f"\n{args.dtype} / float32 step   {ratio:5.2f}x  (goal >= {GOAL}x: "
        f"{'met' if ratio >= GOAL else 'NOT met'})"
    )
    print(
        f"total runtime {time.perf_counter() - t0:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
