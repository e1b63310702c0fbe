"""A client's local LoRA steps, and the server's held-out evaluation."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from fedqc.data.encoding import Encoded, collate
from fedqc.models.likelihood import batch_nll, response_nll


def train_steps(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """``steps`` AdamW steps on random batches (response-only token-mean loss); mean loss."""
    if not encoded:
        raise ValueError("no samples to train on")
    rng = random.Random(seed)
    torch.manual_seed(seed)  # LoRA dropout
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(steps):
        rows = rng.sample(range(len(encoded)), min(batch_size, len(encoded)))
        sums, counts = batch_nll(model, collate([encoded[i] for i in rows], rows, pad_id))
        loss = sums.sum() / counts.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses))


def evaluate(
    model: torch.nn.Module, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096
) -> dict[str, float]:
    """Token-weighted mean response loss over a held-out set, and its perplexity."""
    sums, counts = response_nll(model, encoded, pad_id, batch_tokens)
    loss = float(sums.sum() / max(counts.sum(), 1))
    return {"eval_loss": loss, "eval_ppl": math.exp(loss)}
