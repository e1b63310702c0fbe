"""Batch-size-1 autograd references for the gradient-scoring tests (not a test module).

This is the reference loop as LESS / CLUES / DataInf run it: one sample at a time, the HF model's
own token-mean loss over the response tokens, ``torch.autograd.grad`` on the LoRA weights, each
gradient flattened in ``lora_blocks`` order.
"""

from __future__ import annotations

import torch

from fedqc.data.encoding import Encoded
from fedqc.data.samples import Sample
from fedqc.models.loading import get_adapter_state
from fedqc.scoring.gradient import Checkpoint, lora_blocks

# Different lengths: with a small token budget they form several batches, with padding.
SAMPLES = [
    Sample("a", "What is 2+2?", "4"),
    Sample("b", "Name three colours of the rainbow.", "Red, orange and yellow are three of them."),
    Sample("c", "Hi", "Hello! How can I help you today? Ask me anything you like."),
    Sample(
        "d",
        "Write one sentence about the sea, with some detail on waves and tides.",
        "The sea rolls in long grey waves that rise with the tide twice a day.",
    ),
    Sample("e", "Add 17 and 25.", "17 + 25 = 42"),
    Sample("f", "Translate 'chat' from French.", "cat"),
]
ANCHORS = [
    Sample("x", "What is 3+5?", "3 + 5 = 8"),
    Sample("y", "Name a fruit.", "An apple."),
    Sample("z", "Say hello.", "Hello there!"),
]
MAX_LENGTH = 128
BATCH_TOKENS = 160


def random_checkpoint(loaded, seed: int, lr: float, moments: bool = False) -> Checkpoint:
    """A checkpoint with random A and B (PEFT's B = 0 would make every ∇A vanish)."""
    g = torch.Generator().manual_seed(seed)
    adapter = {
        k: 0.05 * torch.randn(v.shape, generator=g) for k, v in loaded.initial_adapter.items()
    }
    mom = None
    if moments:
        mom = {
            k: (1e-3 * torch.randn(v.shape, generator=g), 1e-6 * torch.rand(v.shape, generator=g))
            for k, v in adapter.items()
        }
    return Checkpoint(adapter, lr, mom)


def reference_grads(model, encoded: list[Encoded]) -> torch.Tensor:
    """(n, P) float64: each sample's flattened LoRA gradient, batch size 1, no padding."""
    blocks = lora_blocks(model)
    adapter = model.active_adapter
    params = {n.replace(f".{adapter}", ""): p for n, p in model.named_parameters()}
    weights = [params[b.name] for b in blocks]
    model.eval()
    rows = []
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        labels = ids.clone()
        labels[0, : e.n_prompt] = -100
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, weights)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def block_slices(model) -> list[slice]:
    out, start = [], 0
    for b in lora_blocks(model):
        out.append(slice(start, start + b.size))
        start += b.size
    return out


def current_adapter(model) -> dict[str, torch.Tensor]:
    return get_adapter_state(model)
