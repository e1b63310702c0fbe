"""Merging client adapters as task vectors (CLUES-style), with ``peft.utils.merge_utils``.

Each client's task vector is its adapter minus the global adapter it started the round from, per
LoRA matrix. The merged adapter is the global one plus the merged task vectors:

- ``task-arithmetic``: the weighted sum of the task vectors; with the weights below this is
  FedAvg's weighted mean (up to float rounding), the reference the other two depart from;
- ``ties:DENSITY``: each task vector keeps its DENSITY largest-magnitude entries, a sign is elected
  per entry (by total weighted mass), and the surviving entries of that sign are averaged;
- ``dare-ties:DENSITY``: as ties, but entries are dropped at random (kept with probability
  DENSITY, rescaled by 1/DENSITY). The draws are seeded by the run seed and the absolute round,
  so a run and its resume merge alike.

Weights: a client's share of the kept samples (FedAvg's weights; equal under DP). TIES and
DARE-TIES divide by the number of clients that agree on an entry's sign, so their weights are the
shares times the number of clients (1 each when all clients kept as much).
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils


def parse_aggregation(value: str) -> tuple[str, float] | None:
    """None for ``mean``; else (method, density) of a ``merge:...`` value as config.py checked it
    (task-arithmetic has no density: 1)."""
    if value == "mean":
        return None
    _, method, *density = value.split(":")
    return method, float(density[0]) if density else 1.0


def merge_adapters(
    global_state: dict[str, torch.Tensor],
    client_states: list[dict[str, torch.Tensor]],
    weights: list[float],
    method: str,
    density: float = 1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The global adapter plus the merged task vectors of the clients (float32, same keys)."""
    shares = torch.tensor(weights, dtype=torch.float32) / float(sum(weights))
    if method != "task-arithmetic":
        shares = shares * len(weights)
    merged = {}
    with torch.random.fork_rng(devices=[]):  # DARE's draws, without touching the global RNG
        torch.manual_seed(seed)
        for key in sorted(global_state):
            base = global_state[key].float()
            vectors = [c[key].float() - base for c in client_states]
            if method == "task-arithmetic":
                delta = merge_utils.task_arithmetic(vectors, shares)
            elif method == "ties":
                delta = merge_utils.ties(vectors, shares, density)
            else:
                delta = merge_utils.dare_ties(vectors, shares, density)
            merged[key] = base + delta
    return merged
