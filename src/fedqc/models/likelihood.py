"""Per-sample response negative log-likelihoods from one batched forward pass.

The output head runs only on response positions: prompt and padding positions never pay for the
full-vocabulary logits, which dominate the cost of small models. The same pass also gives the NLL
of each response's last token, the end-of-sequence token that encoding appends: a response that
stops mid-way makes that token unlikely.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedqc.data.encoding import Batch, Encoded, token_budget_batches


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM itself (a PEFT model's base model, with the LoRA layers in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def response_token_nll(
    lm: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every response token, flattened row by row, and the (rows, T-1) response mask.

    ``hidden``: the backbone's last hidden states (rows, T, d); the output head runs only where
    the next token is a response token (label ≠ -100).
    """
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[keep], reduction="none"), keep


def batch_nll(model: torch.nn.Module, batch: Batch, last: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed response NLL and response-token count for each row of the batch (with autograd).

    ``last``: also the NLL of each row's last response token (NaN for a row without one).
    """
    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    nll, keep = response_token_nll(lm, hidden, batch.labels)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(batch.indices), dtype=nll.dtype).index_add(0, rows, nll)
    counts = keep.sum(dim=1)
    if not last:
        return sums, counts
    ends = torch.full_like(sums, float("nan"))
    has = counts > 0
    ends[has] = nll[counts.cumsum(0)[has] - 1]  # rows are in order in the flattened positions
    return sums, counts, ends


def response_nll(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) per sample, in input order; the model is put in eval mode."""
    sums, counts, _ = response_losses(model, encoded, pad_id, batch_tokens, on_batch)
    return sums, counts


@torch.inference_mode()
def response_losses(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(summed NLL, token count, NLL of the last response token) per sample, in input order.

    The last token is the end-of-sequence token unless the sample was truncated: its end NLL is
    then NaN. The model is put in eval mode.
    """
    model.eval()
    sums = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    ends = np.full(len(encoded), np.nan)
    for batch in token_budget_batches(encoded, batch_tokens, pad_id):
        s, c, e = batch_nll(model, batch, last=True)
        sums[batch.indices] = s.double().numpy()
        counts[batch.indices] = c.numpy()
        ends[batch.indices] = e.double().numpy()
        if on_batch is not None:
            on_batch(len(batch.indices))
    ends[np.array([e.truncated for e in encoded], dtype=bool)] = np.nan
    return sums, counts, ends
