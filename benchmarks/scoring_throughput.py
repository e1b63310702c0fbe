"""Throughput of fedqc's forward-only scorers against the papers' loop and a bare forward.

All three methods run in one process on SmolLM2-135M over the same demo samples (GSM8K,
``write_demo``), tokenised the same way (``fedqc.data.encoding``, the model's chat template, the
same ``max_length``), so they do identical work on identical tokens:

1. **fedqc** - ``score_samples`` with both passes (ℓ(r|q) conditioned, ℓ(r) bare), batched by
   ``token_budget_batches``, the output head only on response positions, in the scoring dtype
   that ``--dtype`` gives (``model.dtype``; ``auto`` scores in float32, ``bfloat16`` opts into
   bf16 weights and activations). All four scores (ppl, cond-prob, ifd, ira) come from those two
   per-sample losses. The timing includes tokenisation.
2. **reference** - what the papers ship (Cherry LLM's ``data_analysis.py``, FedDQC): the plain
   model in float32, batch size 1, two forwards per sample, ``model(input_ids, labels=...)``
   with HF's own loss: the conditioned pass with the prompt masked and the bare pass, and all
   four metrics derived from those two losses. When fedqc runs in float32 too, the scores are
   asserted to match (rtol 1e-3); otherwise their largest relative difference is printed.
3. **bare forward** - the practical limit: ``model(input_ids=..., attention_mask=...)`` with no
   labels under ``torch.inference_mode``, in fedqc's dtype, over the same length-bucketed
   batches, once over the conditioned and once over the bare sequences (the two passes fedqc
   needs). It yields no scores and its batches are built before timing starts. Like any plain
   ``model(...)`` call it computes full-vocabulary logits at every position, which fedqc skips
   on prompt and padding positions, so fedqc can exceed 1.0x of it.

Throughput = (response tokens in the samples) / (seconds to produce all four scores for them); the
bare forward uses the same token count over its own time. Goals: fedqc/reference >= 3x and
fedqc/bare-forward >= 0.9. Each method is warmed up once on a few samples, then timed in
round-robin (so a slow spell of a shared machine hits all alike) and its best run kept: fedqc and
the bare forward ``--repeats`` times, the reference ``--ref-repeats`` times (default once: one run
over all 64 samples takes minutes). The reference may run on the first ``--ref-samples`` samples
only; its throughput then counts the response tokens of that subset, so it scales to the full set.
A CPU-seconds column and ratios on CPU time are printed too: wall-clock ratios are only meaningful
on an otherwise idle machine (the header and footer show the load average).

    .venv/bin/python benchmarks/scoring_throughput.py [--repeats 3] [--ref-samples 64] [--threads 2]
        [--device auto] [--dtype auto]
    # -v prints every timed run. Estimated ~10 min on 2 idle cores; far longer on a busy machine.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from fedqc.config import ModelConfig, QualityConfig
from fedqc.data.demo import write_demo
from fedqc.data.encoding import Encoded, encode, encode_all, token_budget_batches
from fedqc.data.samples import Sample, load_samples
from fedqc.models.loading import LoadedModel, load, resolve
from fedqc.scoring.scorers import HIGHER_IS_BETTER, SCORERS, Scorer, score_samples

METRICS = ("ppl", "cond-prob", "ifd", "ira")
GOAL_VS_REFERENCE, GOAL_VS_BARE = 3.0, 0.9

# Hands score_samples' two per-sample losses back unchanged: raw[0] = ℓ(r|q), raw[1] = ℓ(r)
# (ℓ_end, the third argument every formula gets, is not needed here).
LOSSES = Scorer(
    "losses",
    HIGHER_IS_BETTER,
    True,
    lambda c, b, e=None: np.stack([c, b]),
    "(ℓ(r|q), ℓ(r)), from which every fedqc score is computed",
)


def demo_samples(n: int, clients: int = 4) -> list[Sample]:
    """``n`` demo samples, an equal share from each client (so every contamination rate shows)."""
    per_client = math.ceil(n / clients)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp), num_clients=clients, samples_per_client=per_client)
        pools = [load_samples(Path(tmp) / "clients" / f"client-{c}.jsonl") for c in range(clients)]
    return [s for group in zip(*pools, strict=True) for s in group][:n]


def all_scores(cond: np.ndarray, bare: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        return {m: SCORERS[m].formula(cond, bare).astype(np.float64) for m in METRICS}


def run_fedqc(
    loaded: LoadedModel, samples: list[Sample], max_length: int, batch_tokens: int
) -> dict[str, np.ndarray]:
    """fedqc's path: one conditioned + one bare batched pass, then all four formulas."""
    losses = score_samples(loaded, samples, LOSSES, max_length, batch_tokens).raw
    return all_scores(losses[0], losses[1])


def _loss(model: torch.nn.Module, e: Encoded, device: torch.device) -> float:
    """One batch-size-1 forward with full logits; HF's loss is the token-mean response NLL."""
    ids = torch.tensor([e.input_ids], device=device)
    labels = ids.clone()
    labels[:, : e.n_prompt] = -100
    return model(input_ids=ids, labels=labels).loss.item()


def run_reference(
    model: torch.nn.Module, tok, samples: list[Sample], max_length: int
) -> dict[str, np.ndarray]:
    """The papers' loop: per sample, the conditioned and the bare loss; every metric from them."""
    model.eval()
    device = model.device
    cond_loss, bare_loss = np.zeros(len(samples)), np.zeros(len(samples))
    with torch.no_grad():
        for i, sample in enumerate(samples):
            cond_loss[i] = _loss(model, encode(tok, sample, max_length), device)
            bare_loss[i] = _loss(model, encode(tok, sample, max_length, bare=True), device)
    return all_scores(cond_loss, bare_loss)


def bare_forward(
    loaded: LoadedModel, samples: list[Sample], max_length: int, batch_tokens: int
) -> Callable[[], None]:
    """A timed callable: the two batched passes, no labels, no scores (batches pre-built)."""
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    batches = [
        b
        for bare in (False, True)
        for b in token_budget_batches(encode_all(tok, samples, max_length, bare), batch_tokens, pad)
    ]
    model, device = loaded.model, loaded.placement.device
    batches = [b.to(device) for b in batches]

    def run() -> None:
        model.eval()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process over all threads, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def response_tokens(loaded: LoadedModel, samples: list[Sample], max_length: int) -> int:
    return sum(e.n_response for e in encode_all(loaded.tokenizer, samples, max_length))


def main() -> None:
    defaults = QualityConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="demo samples to score")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of fedqc and the bare forward (best kept)",
    )
    parser.add_argument(
        "--ref-repeats",
        type=int,
        default=1,
        help="timed runs of the reference loop (each run over all 64 samples takes minutes)",
    )
    parser.add_argument(
        "--ref-samples",
        type=int,
        default=None,
        help="run the reference on the first N samples only (default: all)",
    )
    parser.add_argument(
        "--warmup-samples",
        type=int,
        default=4,
        help="samples in the one warm-up run of each method",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--max-length", type=int, default=ModelConfig().max_length)
    parser.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    parser.add_argument("--device", default="auto", help="model.device for all three methods")
    parser.add_argument("--dtype", default="auto", help="model.dtype of fedqc and the bare forward")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every timed run")
    args = parser.parse_args()
    ref_n = min(args.ref_samples or args.samples, args.samples)
    ref_repeats = args.ref_repeats

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    loaded = load(ModelConfig(device=args.device, dtype=args.dtype))
    where = loaded.placement
    reference = AutoModelForCausalLM.from_pretrained(
        resolve(ModelConfig().name), dtype=torch.float32
    )
    reference.to(where.device)
    tok = loaded.tokenizer
    samples = demo_samples(args.samples)
    ref_samples, warm = samples[:ref_n], samples[: args.warmup_samples]
    n_resp = response_tokens(loaded, samples, args.max_length)
    n_resp_ref = response_tokens(loaded, ref_samples, args.max_length)
    cond = encode_all(loaded.tokenizer, samples, args.max_length)
    bare = encode_all(loaded.tokenizer, samples, args.max_length, bare=True)
    print(
        f"SmolLM2-135M on {where.device}, fedqc in {where.dtype_name}, reference in float32, "
        f"torch {torch.__version__}, {args.threads} threads | "
        f"{len(samples)} samples, "
        f"max_length {args.max_length}, batch_tokens {args.batch_tokens} | "
        f"tokens: {n_resp} response, {sum(len(e.input_ids) for e in cond)} conditioned, "
        f"{sum(len(e.input_ids) for e in bare)} bare, {sum(e.truncated for e in cond)} truncated"
        f" | load average {os.getloadavg()[0]:.1f}"
    )

    def fedqc_fn(s: list[Sample]) -> Callable[[], dict[str, np.ndarray]]:
        return lambda: run_fedqc(loaded, s, args.max_length, args.batch_tokens)

    # One warm-up of each method on a few samples, then the timed runs.
    fedqc_fn(warm)()
    run_reference(reference, tok, warm, args.max_length)
    bare_forward(loaded, warm, args.max_length, args.batch_tokens)()

    # Round-robin repeats, so a slow spell of the machine hits every method alike; best run kept.
    methods = {
        "fedqc": (fedqc_fn(samples), args.repeats),
        "bare": (bare_forward(loaded, samples, args.max_length, args.batch_tokens), args.repeats),
        "reference": (
            lambda: run_reference(reference, tok, ref_samples, args.max_length),
            ref_repeats,
        ),
    }
    best, best_cpu = dict.fromkeys(methods, math.inf), dict.fromkeys(methods, math.inf)
    results: dict[str, object] = {}
    for r in range(max(args.repeats, ref_repeats)):
        for name, (fn, reps) in methods.items():
            if r < reps:
                secs, cpu, results[name] = timed(fn)
                best[name], best_cpu[name] = min(best[name], secs), min(best_cpu[name], cpu)
                if args.verbose:
                    print(
                        f"  repeat {r + 1}: {name:<9} {secs:7.2f} s wall {cpu:7.2f} s CPU "
                        f"(load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    t_fedqc, t_bare, t_ref = best["fedqc"], best["bare"], best["reference"]
    fedqc_scores, ref_scores = results["fedqc"], results["reference"]

    worst = 0.0
    for m in METRICS:
        got, want = ref_scores[m], fedqc_scores[m][:ref_n]
        if where.dtype == torch.float32:
            np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=f"reference {m} != fedqc {m}")
        worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want))))

    tp_fedqc, tp_ref, tp_bare = n_resp / t_fedqc, n_resp_ref / t_ref, n_resp / t_bare
    rows = [
        ("fedqc score_samples", "2 batched", len(samples), args.repeats, "fedqc", n_resp),
        (
            "reference (bs=1, float32)",
            "2 per sample",
            ref_n,
            ref_repeats,
            "reference",
            n_resp_ref,
        ),
        ("bare batched forward", "2 batched", len(samples), args.repeats, "bare", n_resp),
    ]
    print(
        f"\n{'method':<30} {'passes':<13} {'samples':>7} {'best of':>7} {'wall s':>8} "
        f"{'resp tok/s':>10} {'CPU s':>8}"
    )
    for name, passes, n, reps, key, tokens in rows:
        print(
            f"{name:<30} {passes:<13} {n:>7} {reps:>7} {best[key]:>8.2f} "
            f"{tokens / best[key]:>10.1f} {best_cpu[key]:>8.2f}"
        )
    vs_ref, vs_bare = tp_fedqc / tp_ref, tp_fedqc / tp_bare
    cpu_tp = {k: tokens / best_cpu[k] for *_, k, tokens in rows}
    print(
        f"\nfedqc / reference     {vs_ref:6.2f}x  (goal >= {GOAL_VS_REFERENCE:.1f}x: "
        f"{'met' if vs_ref >= GOAL_VS_REFERENCE else 'NOT met'})"
    )
    print(
        f"fedqc / bare forward  {vs_bare:6.2f}x  (goal >= {GOAL_VS_BARE:.1f}x: "
        f"{'met' if vs_bare >= GOAL_VS_BARE else 'NOT met'})"
    )
    print(
        f"same ratios on CPU seconds (less sensitive to other load): "
        f"{cpu_tp['fedqc'] / cpu_tp['reference']:.2f}x, {cpu_tp['fedqc'] / cpu_tp['bare']:.2f}x"
    )
    match = "(rtol 1e-3)" if where.dtype == torch.float32 else f"(fedqc in {where.dtype_name})"
    print(
        f"reference scores against fedqc's on {ref_n} samples: max relative difference "
        f"{worst:.1e} {match}"
    )
    print(
        f"total runtime {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (other processes make every timing slower)"
    )


if __name__ == "__main__":
    main()
