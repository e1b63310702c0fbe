"""Per-sample response negative log-likelihoods from one batched forward pass.

The output head runs only on response positions: prompt and padding positions never pay for the
full-vocabulary logits, which dominate the cost of small models. The same pass also gives the NLL
of each response's last token, the end-of-sequence token that encoding appends: a response that
stops mid-way makes that token unlikely.

A row may be preceded by a prefix (demonstrations: whole encoded samples shown in context). The
prefix's keys and values are computed once and shared by every row of a batch, and only the row's
own response tokens count in its losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache

from fedqc.data.encoding import Batch, Encoded, token_budget_batches
from fedqc.errors import FedqcError
from fedqc.models.placement import model_placement

KV = list[tuple[torch.Tensor, torch.Tensor]]


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM itself (a PEFT model's base model, with the LoRA layers in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def response_token_nll(
    lm: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every response token, flattened row by row, and the (rows, T-1) response mask.

    ``hidden``: the backbone's last hidden states (rows, T, d); the output head runs only where
    the next token is a response token (label ≠ -100), in float32 (so do the log-softmax and every
    sum after it) whatever dtype the model runs in.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    head = lm.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):  # float32 whatever the model's dtype
        bias = None if head.bias is None else head.bias.float()
        logits = F.linear(hidden[:, :-1][keep].float(), head.weight.float(), bias)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[keep], reduction="none"), keep


def prefix_cache(model: torch.nn.Module, prefix: Sequence[int]) -> KV:
    """Every layer's keys and values of ``prefix`` (one row), to put in front of a batch's rows."""
    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    ids = torch.tensor([list(prefix)], device=model_placement(lm).device)
    out = backbone(input_ids=ids, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers]


def batch_nll(
    model: torch.nn.Module, batch: Batch, last: bool = False, prefix: KV | None = None
) -> tuple[torch.Tensor, ...]:
    """Summed response NLL and response-token count for each row of the batch (with autograd).

    ``last``: also the NLL of each row's last response token (NaN for a row without one).
    ``prefix``: a :func:`prefix_cache` that every row attends to.
    """
    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    batch = batch.to(model_placement(lm).device)
    if prefix is None:
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    else:
        rows, p = batch.input_ids.shape[0], prefix[0][0].shape[-2]
        shared = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix]
        cache = DynamicCache(ddp_cache_data=shared, config=lm.config)
        ones = torch.ones_like(batch.attention_mask[:, :1]).expand(rows, p)
        mask = torch.cat([ones, batch.attention_mask], 1)
        hidden = backbone(
            input_ids=batch.input_ids, attention_mask=mask, cache=cache, use_cache=True
        )[0]
    nll, keep = response_token_nll(lm, hidden, batch.labels)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(batch.indices), dtype=nll.dtype, device=nll.device)
    sums = sums.index_add(0, rows, nll)
    counts = keep.sum(dim=1)
    if not last:
        return sums, counts
    ends = torch.full_like(sums, float("nan"))
    has = counts > 0
    ends[has] = nll[counts.cumsum(0)[has] - 1]  # rows are in order in the flattened positions
    return sums, counts, ends


def response_nll(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) per sample, in input order; the model is put in eval mode.

    The arguments of :func:`response_losses`, which this returns without the end NLLs.
    """
    sums, counts, _ = response_losses(*args, **kwargs)
    return sums, counts


@torch.inference_mode()
def response_losses(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(summed NLL, token count, NLL of the last response token) per sample, in input order.

    The last token is the end-of-sequence token unless the sample was truncated: its end NLL is
    then NaN. ``prefixes``: per sample, the token ids shown in front of it (empty: none); samples
    with the same prefix share its cache. The model is put in eval mode.
    """
    model.eval()
    sums = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    ends = np.full(len(encoded), np.nan)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(encoded)):
        groups.setdefault(tuple(prefixes[i]) if prefixes is not None else (), []).append(i)
    for prefix, rows in groups.items():
        cache = None
        if prefix:
            _check_positions(model, len(prefix), [encoded[i] for i in rows])
            cache = prefix_cache(model, prefix)
        for batch in token_budget_batches(encoded, batch_tokens, pad_id, rows, len(prefix)):
            s, c, e = batch_nll(model, batch, last=True, prefix=cache)
            sums[batch.indices] = s.double().cpu().numpy()
            counts[batch.indices] = c.cpu().numpy()
            ends[batch.indices] = e.double().cpu().numpy()
            if on_batch is not None:
                on_batch(len(batch.indices))
    ends[np.array([e.truncated for e in encoded], dtype=bool)] = np.nan
    return sums, counts, ends


def _check_positions(model: torch.nn.Module, prefix_len: int, encoded: Sequence[Encoded]) -> None:
    limit = getattr(causal_lm(model).config, "max_position_embeddings", None)
    longest = prefix_len + max((len(e.input_ids) for e in encoded), default=0)
    if limit and longest > limit:
        raise FedqcError(
            f"a prefix of {prefix_len} tokens + a sample of {longest - prefix_len} exceeds the "
            f"model's {limit} positions; use fewer demonstrations or a lower model.max-length"
        )
