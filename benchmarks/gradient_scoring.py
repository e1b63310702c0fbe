"""Speed and peak memory of fedqc's batched hook engine for per-sample LoRA gradient scores.

Three methods run in this one process on the real model (``load(ModelConfig())``: SmolLM2-135M,
LoRA r=8 on q/v) over the same demo samples (GSM8K, ``write_demo``), tokenised the same way
(``fedqc.data.encoding``, same ``max_length``), at one checkpoint (a seeded random adapter with
B ≠ 0) and one anchor direction ḡ (the mean gradient of the demo anchors, computed before timing):

1. **hooks** - ``per_sample_stats``: one batched forward+backward per length-bucketed batch
   (``token_budget_batches``), hooks on the LoRA factors, per-sample ⟨g_i, ḡ⟩ and ‖g_i‖² (all that
   tracin and tracin-cos need per checkpoint). Also timed with the Adam transform (``hooks+adam``,
   what clues needs).
2. **loop** - the reference as LESS / CLUES collect gradients: batch size 1,
   ``model(input_ids, labels=...)`` (HF's loss, full-vocabulary logits), ``loss.backward()``,
   flatten every LoRA ``.grad`` into one vector, dot it with the flat ḡ and take its norm. (The
   loop keeps no per-sample vectors, which flatters its memory: CLUES keeps and pickles them all.)
   Its numbers are checked against the hooks' (relative difference ≤ 1e-3).
3. **train** - a plain LoRA training step per batch on the same batches: ``batch_nll``, the
   token-mean loss, ``backward()`` into the LoRA ``.grad``, an AdamW step (adapter restored after).

Time: each method is warmed up once on a few samples; then ``--repeats`` rounds run every method
once, interleaved (the machine may be shared: interleaving spreads load changes over all methods),
and the best round of each is kept. The timed rounds use glibc's default malloc settings. Ratios
are of throughput, tokens (prompt + response) per wall-clock second, so the slow loop may run on
the first ``--loop-samples`` samples only. Process CPU seconds (user + system, all threads) are
printed too. Goals: loop/hooks >= 1.5x (throughput of hooks over loop), hooks/train <= 1.3x (cost
of hooks over a training step).

Peak memory, in a fresh subprocess after the timed rounds (the same script with
``--memory-child``; it loads the model, takes a random direction for ḡ, warms each method up on one
sample, then runs each once): torch has no CPU allocator statistics and ``tracemalloc`` does not
see torch's allocations, so the kernel's counters are used. Before each run the peak-RSS mark is
reset to the current RSS (``/proc/self/clear_refs``, value 5); after it the peak (``VmHWM``) is
read. The figure is peak minus RSS before the run: the extra memory the run needed at its worst
moment. The subprocess starts with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every block of
64 KiB or more by mmap and unmaps it on free (torch's CPU allocator caches nothing): RSS then tracks
live memory instead of malloc's free lists. (That setting costs page faults, so it is kept out of
the timed process.) It runs on the first ``--memory-samples`` samples (default: all), the hooks
engine also on half of those: its peak follows the largest batch (at most ``--batch-tokens``
padded tokens, printed beside it), not the number of samples.

    .venv/bin/python benchmarks/gradient_scoring.py [--samples 64] [--loop-samples 16]
        [--memory-samples 16] [--repeats 1] [--threads 2] [--batch-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedqc.config import ModelConfig, QualityConfig
from fedqc.data.demo import write_demo
from fedqc.data.encoding import Encoded, encode_all, token_budget_batches
from fedqc.data.samples import Sample, load_samples
from fedqc.models.likelihood import batch_nll
from fedqc.models.loading import LoadedModel, get_adapter_state, load, set_adapter_state
from fedqc.scoring.gradient import flatten, lora_blocks, mean_gradient, per_sample_stats

GOAL_VS_LOOP, GOAL_VS_TRAIN = 1.5, 1.3
METHODS = ("hooks", "hooks+adam", "loop", "train")


def demo_data(n: int, clients: int = 4) -> tuple[list[Sample], list[Sample]]:
    """``n`` demo samples (an equal share from each client) and the demo anchors."""
    per_client = math.ceil(n / clients)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp), num_clients=clients, samples_per_client=per_client)
        pools = [load_samples(Path(tmp) / "clients" / f"client-{c}.jsonl") for c in range(clients)]
        anchors = load_samples(Path(tmp) / "anchors.jsonl")
    return [s for group in zip(*pools, strict=True) for s in group][:n], anchors


class Setup:
    """The model at a fixed checkpoint, the encoded samples and the anchor direction ḡ."""

    def __init__(
        self,
        n: int,
        max_length: int,
        batch_tokens: int,
        anchors: bool = True,
        device: str = "auto",
        dtype: str = "auto",
    ):
        self.loaded: LoadedModel = load(ModelConfig(device=device, dtype=dtype))
        self.model, tok = self.loaded.model, self.loaded.tokenizer
        self.pad, self.batch_tokens = tok.pad_token_id, batch_tokens
        g = torch.Generator().manual_seed(0)
        self.adapter = {
            k: (v + 1e-3 * torch.randn(v.shape, generator=g)) if ".lora_B." in k else v
            for k, v in get_adapter_state(self.model).items()
        }
        set_adapter_state(self.model, self.adapter)
        samples, anchor_samples = demo_data(n)
        self.encoded = encode_all(tok, samples, max_length)
        self.blocks = lora_blocks(self.model)
        if anchors:
            enc_anchors = encode_all(tok, anchor_samples, max_length)
            self.g_bar = mean_gradient(self.model, enc_anchors, self.pad, batch_tokens=batch_tokens)
        else:  # the memory round: any direction of the right shape costs the same
            self.g_bar = {b.name: torch.randn(b.shape, generator=g) for b in self.blocks}
        self.g_flat = flatten(self.g_bar, self.blocks)
        self.moments = {
            k: (1e-3 * torch.randn(v.shape, generator=g), 1e-6 * torch.rand(v.shape, generator=g))
            for k, v in self.adapter.items()
        }

    def run(self, method: str, encoded: list[Encoded]) -> np.ndarray | None:
        """Run one method over ``encoded``; scoring methods return (n, 2): ⟨g, ḡ⟩ and ‖g‖²."""
        if method in ("hooks", "hooks+adam"):
            stats = per_sample_stats(
                self.model,
                encoded,
                self.pad,
                directions=self.g_bar,
                moments=self.moments if method == "hooks+adam" else None,
                batch_tokens=self.batch_tokens,
            )
            return np.stack([stats.dots[:, 0], stats.sq_norm], axis=1)
        if method == "loop":
            return self.loop(encoded)
        self.train(encoded)
        return None

    def loop(self, encoded: list[Encoded]) -> np.ndarray:
        """LESS / CLUES: batch size 1, HF loss, backward, flatten the .grad, dot and norm."""
        model = self.model
        model.eval()
        adapter = model.active_adapter
        params = {n.replace(f".{adapter}", ""): p for n, p in model.named_parameters()}
        weights = [params[b.name] for b in self.blocks]
        out = np.zeros((len(encoded), 2))
        for i, e in enumerate(encoded):
            ids = torch.tensor([e.input_ids], device=self.loaded.placement.device)
            labels = ids.clone()
            labels[:, : e.n_prompt] = -100
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            flat = torch.cat([p.grad.reshape(-1) for p in weights])
            out[i] = float(flat @ self.g_flat.to(flat.device)), float(flat @ flat)
            for p in weights:
                p.grad = None
        return out

    def train(self, encoded: list[Encoded]) -> None:
        """Plain LoRA training steps over the same batches (fedqc.train.local's loss and AdamW,
        under autocast in the model's dtype)."""
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.eval()  # same numerics as scoring (dropout off); the cost is the same
        for batch in token_budget_batches(encoded, self.batch_tokens, self.pad):
            with self.loaded.placement.autocast():
                sums, counts = batch_nll(model, batch)
                loss = sums.sum() / counts.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        set_adapter_state(model, self.adapter)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@dataclass
class Run:
    wall: float
    cpu: float
    peak_extra_mib: float
    result: object


def measure(fn: Callable[[], object]) -> Run:
    """Wall and CPU seconds of ``fn()`` and the extra peak RSS it needed."""
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Run(wall, cpu, (_status_kib("VmHWM") - before) / 1024, result)


def memory_round(args: argparse.Namespace) -> None:
    """In a fresh process started with the mmap threshold: each method's peak extra MiB, as JSON."""
    setup = Setup(args.samples, args.max_length, args.batch_tokens, False, args.device, args.dtype)
    enc = setup.encoded[: args.memory_samples]
    data = {m: enc for m in METHODS}
    data["loop"] = enc[: args.loop_samples or len(enc)]
    for m in METHODS:
        setup.run(m, enc[:1])
    peak = {m: measure(lambda m=m: setup.run(m, data[m])).peak_extra_mib for m in METHODS}
    peak["hooks@half"] = measure(lambda: setup.run("hooks", enc[: len(enc) // 2])).peak_extra_mib
    print(json.dumps(peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="demo samples to score")
    parser.add_argument(
        "--loop-samples",
        type=int,
        default=None,
        help="run the reference loop on the first N samples only (default: all)",
    )
    parser.add_argument(
        "--memory-samples", type=int, default=None, help="samples of the memory round (all)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timed rounds")
    parser.add_argument(
        "--warmup-samples",
        type=int,
        default=4,
        help="samples in the one warm-up run of each method",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--max-length", type=int, default=ModelConfig().max_length)
    parser.add_argument(  # what fedqc uses for the gradient scorers
        "--batch-tokens", type=int, default=QualityConfig().backward_batch_tokens
    )
    parser.add_argument("--device", default="auto", help="model.device")
    parser.add_argument("--dtype", default="auto", help="model.dtype")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_round(args)
        return

    t0 = time.perf_counter()
    setup = Setup(
        args.samples, args.max_length, args.batch_tokens, device=args.device, dtype=args.dtype
    )
    enc = setup.encoded
    data = {m: enc for m in METHODS}
    data["loop"] = enc[: args.loop_samples or len(enc)]
    tokens = {m: sum(len(e.input_ids) for e in data[m]) for m in METHODS}
    print(
        f"SmolLM2-135M on {setup.loaded.placement.device}, "
        f"{setup.loaded.placement.dtype_name}, torch {torch.__version__}, {args.threads} threads"
        f" | {len(enc)} samples "
        f"(loop: {len(data['loop'])}), {tokens['hooks']} tokens "
        f"({sum(e.n_response for e in enc)} response), max_length {args.max_length}, "
        f"batch_tokens {args.batch_tokens} | {sum(b.size for b in setup.blocks)} LoRA "
        f"parameters in {len(setup.blocks)} blocks"
    )

    for m in METHODS:
        setup.run(m, enc[: args.warmup_samples])
    load_start = os.getloadavg()[0]
    best: dict[str, Run] = {}
    for _ in range(args.repeats):
        for m in METHODS:
            run = measure(lambda m=m: setup.run(m, data[m]))
            if m not in best or run.wall < best[m].wall:
                best[m] = run
    load_end = os.getloadavg()[0]
    n_mem = min(args.memory_samples or len(enc), len(enc))
    child = [*sys.argv[1:], "--memory-child", "--memory-samples", str(n_mem)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the docstring: memory
    out = subprocess.run(
        [sys.executable, __file__, *child], env=env, capture_output=True, text=True, check=True
    ).stdout
    peak = json.loads(out.strip().splitlines()[-1])
    half = peak.pop("hooks@half")

    loop = best["loop"].result
    hooks = best["hooks"].result[: len(loop)]
    scale = np.abs(loop).max(axis=0)  # per column: the dots, the squared norms
    worst = float(np.max(np.abs(loop - hooks) / scale))
    if worst > 1e-3:
        raise AssertionError(f"loop and hooks differ: max relative difference {worst:.1e}")

    tps = {m: tokens[m] / best[m].wall for m in METHODS}
    print(
        f"\n{'method':<12} {'samples':>7} {'wall s':>8} {'CPU s':>8} {'ms/sample':>10} "
        f"{'tokens/s':>9} {'peak extra MiB':>15} (memory round: {n_mem} samples)"
    )
    for m in METHODS:
        r, n = best[m], len(data[m])
        print(
            f"{m:<12} {n:>7} {r.wall:>8.2f} {r.cpu:>8.2f} {1000 * r.wall / n:>10.1f} "
            f"{tps[m]:>9.1f} {peak[m]:>15.0f}"
        )
    cpu_tps = {m: tokens[m] / best[m].cpu for m in METHODS}
    vs_loop, vs_train = tps["hooks"] / tps["loop"], tps["train"] / tps["hooks"]
    print(
        f"\nloop / hooks         {vs_loop:5.2f}x wall, "
        f"{cpu_tps['hooks'] / cpu_tps['loop']:5.2f}x CPU  "
        f"(goal >= {GOAL_VS_LOOP}x: {'met' if vs_loop >= GOAL_VS_LOOP else 'NOT met'})"
    )
    print(
        f"hooks / train step   {vs_train:5.2f}x wall, "
        f"{cpu_tps['train'] / cpu_tps['hooks']:5.2f}x CPU  "
        f"(goal <= {GOAL_VS_TRAIN}x: {'met' if vs_train <= GOAL_VS_TRAIN else 'NOT met'})"
    )
    print(f"hooks+adam / hooks   {tps['hooks'] / tps['hooks+adam']:5.2f}x wall")
    largest = {
        k: max(b.input_ids.numel() for b in token_budget_batches(e, args.batch_tokens, setup.pad))
        for k, e in (("half", enc[: n_mem // 2]), ("all", enc[:n_mem]))
    }
    print(
        f"hooks peak extra: {half:.0f} MiB on {n_mem // 2} samples (largest "
        f"batch {largest['half']} padded tokens), {peak['hooks']:.0f} MiB on {n_mem} "
        f"(largest batch {largest['all']}): it follows the batch, not the number of samples"
    )
    print(
        f"loop matches hooks: max relative difference {worst:.1e} (limit 1e-3) | best of "
        f"{args.repeats} timed round(s) | load average {load_start:.1f} at start of timing, "
        f"{load_end:.1f} at end | total runtime {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
