"""A client's local LoRA steps, and the server's held-out evaluation."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from fedqc.data.encoding import Encoded, collate
from fedqc.models.likelihood import batch_nll, causal_lm, response_nll
from fedqc.models.placement import Placement, model_placement


def round_lr(lr: float, schedule: str, absolute_round: int, total_rounds: int) -> float:
    """The learning rate of one round: constant, or cosine from lr down to lr/10 over the run.

    It depends on the absolute round (counted from the start of the run, across resumes). The
    warm-up rounds of the checkpoint scorers follow the same schedule over their own W rounds.
    """
    if schedule == "cosine" and total_rounds > 1:
        low, progress = lr / 10, (absolute_round - 1) / (total_rounds - 1)
        return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr


def train_steps(*args: Any, **kwargs: Any) -> float:
    """``steps`` AdamW steps on random batches (response-only token-mean loss); mean loss.

    The arguments of :func:`train_steps_with_optimizer`, which this returns without the optimizer.
    """
    return train_steps_with_optimizer(*args, **kwargs)[0]


def train_steps_with_optimizer(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    placement: Placement | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, torch.optim.AdamW]:
    """:func:`train_steps`, also returning the optimizer (its Adam moments, for ``clues``).

    The LoRA weights and AdamW's state are float32; forward and backward run under autocast in
    ``placement.train_dtype`` (:mod:`fedqc.models.placement`; default: the model's own dtype),
    float16 with a gradient scaler.
    ``gradient_checkpointing`` recomputes the activations in the backward pass: less memory for
    long sequences and big models, about a third more compute.
    ``proximal_mu`` > 0 adds FedProx's proximal term mu/2 · ||w − w_0||² over the trainable (LoRA)
    weights, w_0 being their values at the start (the global adapter); the mean loss returned is
    the data loss without it.
    """
    if not encoded:
        raise ValueError("no samples to train on")
    rng = random.Random(seed)
    torch.manual_seed(seed)  # LoRA dropout
    placement = placement or model_placement(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    half = placement.train_dtype == torch.float16
    scaler = torch.amp.GradScaler(placement.device.type, enabled=half)
    lm = causal_lm(model)
    if gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    losses = []
    try:
        for _ in range(steps):
            rows = rng.sample(range(len(encoded)), min(batch_size, len(encoded)))
            with placement.autocast():
                sums, counts = batch_nll(model, collate([encoded[i] for i in rows], rows, pad_id))
                loss = sums.sum() / counts.sum().clamp(min=1)
            total = loss
            if start:
                drift = sum(
                    ((p.float() - p0.float()) ** 2).sum()
                    for p, p0 in zip(params, start, strict=True)
                )
                total = loss + proximal_mu / 2 * drift
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    finally:
        model.eval()
        if gradient_checkpointing:
            lm.activation_checkpointing_disable()
    return float(np.mean(losses)), optimizer


def evaluate(
    model: torch.nn.Module, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096
) -> dict[str, float]:
    """Token-weighted mean response loss over a held-out set, and its perplexity."""
    sums, counts = response_nll(model, encoded, pad_id, batch_tokens)
    loss = float(sums.sum() / max(counts.sum(), 1))
    return {"eval_loss": loss, "eval_ppl": math.exp(loss)}
