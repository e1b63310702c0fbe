"""Per-sample response negative log-likelihoods from one batched forward pass.

The output head runs only on response positions: prompt and padding positions never pay for the
full-vocabulary logits, which dominate the cost of small models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedqc.data.encoding import Batch, Encoded, token_budget_batches


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def batch_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response NLL and response-token count for each row of the batch (with autograd)."""
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    nll = F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(batch.indices), dtype=nll.dtype).index_add(0, rows, nll)
    counts = keep.sum(dim=1)
    return sums, counts


@torch.inference_mode()
def response_nll(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) per sample, in input order; the model is put in eval mode."""
    model.eval()
    sums = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    for batch in token_budget_batches(encoded, batch_tokens, pad_id):
        s, c = batch_nll(model, batch)
        sums[batch.indices] = s.double().numpy()
        counts[batch.indices] = c.numpy()
        if on_batch is not None:
            on_batch(len(batch.indices))
    return sums, counts
