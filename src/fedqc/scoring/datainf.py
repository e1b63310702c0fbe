"""DataInf (Kwon et al. 2023) in closed form per LoRA block, vectorised and streaming.

For each LoRA weight matrix l (a "block", d_l entries), with training gradients g_il (i = 1..n, the
scored samples themselves) and a validation vector v_l (here the mean anchor gradient):

    λ_l  = damping · mean_i mean(g_il²)                       (DataInf: damping = 1/10)
    c_il = ⟨v_l, g_il⟩ / (λ_l + ‖g_il‖²)
    h_l  = (1/(n λ_l)) Σ_i (v_l − c_il g_il) = (v_l − S_l / n) / λ_l,   S_l = Σ_i c_il g_il
    I(k) = −Σ_l ⟨h_l, g_kl⟩                                   (DataInf's influence: > 0 = harmful)

fedqc's ``datainf`` score is −I(k) = Σ_l (⟨v_l, g_kl⟩ − ⟨S_l, g_kl⟩/n) / λ_l, so higher is better.

Without keeping per-sample gradients (n × P), this takes three streaming passes of the gradient
engine over the data, each one batched forward+backward per batch:

1. per sample and block, ‖g_il‖² and ⟨v_l, g_il⟩ (n × L scalars) → λ_l and c_il;
2. S_l = Σ_i c_il g_il, one LoRA-sized matrix per block (a weighted gradient sum);
3. per sample and block, ⟨v_l, g_kl⟩ and ⟨S_l, g_kl⟩ → the score.

Passes 1-2 (:func:`datainf_statistics`) depend on the training set, pass 3 (:func:`datainf_scores`)
scores any samples against them. :func:`datainf_dense` is the same formula on in-memory per-block
gradient matrices (three matrix products per block), for tests and small sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedqc.data.encoding import Encoded
from fedqc.errors import FedqcError
from fedqc.scoring.gradient import (
    Directions,
    as_directions,
    gradient_sum,
    lora_blocks,
    per_sample_stats,
)

DAMPING = 0.1


@dataclass
class DataInfStats:
    """What the training set contributes: λ_l and S_l per block, and n."""

    names: list[str]  # block names, lora_blocks order
    lam: np.ndarray  # (L,)
    s: dict[str, torch.Tensor]  # name -> S_l = Σ_i c_il g_il
    n: int


def datainf_dense(
    grads: Sequence[torch.Tensor], v: Sequence[torch.Tensor], damping: float = DAMPING
) -> torch.Tensor:
    """−I for every training sample from in-memory gradients; float64.

    ``grads[l]``: (n, d_l) per-sample gradients of block l (flattened); ``v[l]``: (d_l,).
    """
    score = None
    for g, vl in zip(grads, v, strict=True):
        g, vl = g.double().reshape(g.shape[0], -1), vl.double().reshape(-1)
        n, d = g.shape
        sq = (g * g).sum(1)  # ‖g_il‖²
        a = g @ vl  # ⟨v_l, g_il⟩
        lam = damping * sq.mean() / d
        c = a / (lam + sq)
        s = c @ g  # S_l
        part = (a - (g @ s) / n) / lam
        score = part if score is None else score + part
    if score is None:
        raise FedqcError("DataInf needs at least one LoRA block")
    return score


def lambdas(
    block_sq_norm: np.ndarray, sizes: Sequence[int], damping: float = DAMPING
) -> np.ndarray:
    """λ_l = damping · mean_i ‖g_il‖²/d_l from the (n, L) per-block squared norms."""
    return damping * (block_sq_norm / np.asarray(sizes, dtype=np.float64)).mean(axis=0)


def datainf_statistics(
    model: PeftModel,
    encoded: list[Encoded],
    pad_id: int,
    v: Directions,
    *,
    damping: float = DAMPING,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> DataInfStats:
    """Passes 1 and 2 over the training set (the client's own samples): λ_l and S_l."""
    if not encoded:
        raise FedqcError("DataInf needs training samples")
    blocks = lora_blocks(model)
    stats = per_sample_stats(
        model,
        encoded,
        pad_id,
        directions=v,
        per_block=True,
        batch_tokens=batch_tokens,
        on_batch=on_batch,
    )
    lam = lambdas(stats.block_sq_norm, [b.size for b in blocks], damping)
    if not np.all(lam > 0):
        zero = [b.name for b, x in zip(blocks, lam, strict=True) if not x > 0]
        raise FedqcError(f"DataInf: zero gradients in every sample for {zero[:2]}")
    c = stats.block_dots[:, :, 0] / (lam + stats.block_sq_norm)  # (n, L)
    s = gradient_sum(
        model, encoded, pad_id, weights=c, batch_tokens=batch_tokens, on_batch=on_batch
    )
    return DataInfStats([b.name for b in blocks], lam, s, len(encoded))


def datainf_scores(
    model: PeftModel,
    encoded: list[Encoded],
    pad_id: int,
    v: Directions,
    stats: DataInfStats,
    *,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    leave_self_out: bool = False,
) -> np.ndarray:
    """Pass 3: −I(k) = Σ_l (⟨v_l, g_kl⟩ − ⟨S_l, g_kl⟩/n)/λ_l for every sample (higher = better).

    ``leave_self_out``: v is the mean gradient of ``encoded`` themselves (the anchors scored for
    the threshold); sample k's ⟨v_l, g_kl⟩ then uses the mean of the others,
    (m ⟨v_l, g_kl⟩ − ‖g_kl‖²)/(m − 1) over the m samples.
    """
    blocks = lora_blocks(model)
    if [b.name for b in blocks] != stats.names:
        raise FedqcError("DataInf statistics were computed for other LoRA weights")
    vs = as_directions(v, blocks)
    if vs[0].shape[0] != 1:
        raise FedqcError("DataInf takes one validation vector")
    both = {b.name: torch.cat([vs[j], stats.s[b.name].unsqueeze(0)]) for j, b in enumerate(blocks)}
    out = per_sample_stats(
        model,
        encoded,
        pad_id,
        directions=both,
        per_block=True,
        batch_tokens=batch_tokens,
        on_batch=on_batch,
    )
    a, e = out.block_dots[:, :, 0], out.block_dots[:, :, 1]
    if leave_self_out:
        m = len(encoded)
        a = (m * a - out.block_sq_norm) / (m - 1)
    return ((a - e / stats.n) / stats.lam).sum(axis=1)
