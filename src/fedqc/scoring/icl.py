"""In-context probes: the anchors as a shared cached prefix (``icl``) and NUGGETS (``nuggets``).

A demonstration is a whole encoded sample (prompt + response + EOS, exactly as ``encode`` builds it
for scoring and training); demonstrations are concatenated in front of the scored sequence. The
prefix's keys and values are computed once (batch size 1) and shared by every row of a batch, so a
row costs one forward pass over its own tokens only, attending to the cached prefix.

``icl``: s(z) = ℓ(r|q) − ℓ(r | anchors, q), token means over the response; > 0: the anchors make
the response more predictable (higher = better). The anchors, in their order, fill a prefix of at
most ``prefix_tokens`` tokens (anchors that do not fit are left out; at least one must fit).

``nuggets`` (Li et al., "One-shot learning as instruction data prospector"): s(z) = the fraction of
anchor tasks a whose reference-answer loss ℓ(r_a | z, q_a) with z as a one-shot demonstration is
lower than the zero-shot loss ℓ(r_a | q_a). Cost: for n candidates and |A| anchor tasks, n prefix
forwards over z plus n·|A| task forwards (batched per candidate, each over the task's tokens with
z's cached prefix), on top of |A| zero-shot forwards: about |A|·T_a/T_z times a forward-only score
such as ``ppl`` (|A| = 10 anchors: an order of magnitude; NUGGETS' own |A| = 100: two). Slow by
design; it is here for comparison.

Scoring the anchors themselves (for the threshold) leaves the anchor out of its own prefix or task
set: ``exclude[i]`` names the anchor that sample i is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedqc.data.encoding import Encoded
from fedqc.errors import FedqcError
from fedqc.models.likelihood import response_nll


def anchor_prefix(
    demos: Sequence[Encoded], prefix_tokens: int, exclude: int | None = None
) -> tuple[int, ...]:
    """The demos' tokens, in order, while they fit in ``prefix_tokens``; skips ``exclude``."""
    ids: list[int] = []
    for j, d in enumerate(demos):
        if j == exclude:
            continue
        if len(ids) + len(d.input_ids) > prefix_tokens:
            break
        ids.extend(d.input_ids)
    if not ids:
        raise FedqcError(
            f"icl: no anchor fits in a prefix of {prefix_tokens} tokens; raise the prefix budget"
        )
    return tuple(ids)


def prefixed_nll(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    pad_id: int,
    prefix: Sequence[int],
    batch_tokens: int = 4096,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) of each response with ``prefix`` in front; eval mode.

    Only ``indices`` (default: all) are computed; other rows stay 0.
    """
    indices = list(range(len(encoded)) if indices is None else indices)
    sums, counts = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=np.int64)
    if indices:
        rows = [encoded[i] for i in indices]
        s, c = response_nll(model, rows, pad_id, batch_tokens, on_batch, [prefix] * len(rows))
        sums[indices], counts[indices] = s, c
    return sums, counts


def icl_losses(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    pad_id: int,
    demos: Sequence[Encoded],
    prefix_tokens: int,
    *,
    exclude: Sequence[int | None] | None = None,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ℓ(r|q), ℓ(r | anchors, q)) per sample, token means."""
    enc = list(encoded)
    sums, counts = response_nll(model, enc, pad_id, batch_tokens, on_batch)
    plain = sums / np.maximum(counts, 1)
    exclude = [None] * len(enc) if exclude is None else list(exclude)
    with_prefix = np.zeros(len(enc))
    for skip in dict.fromkeys(exclude):  # one cached prefix per distinct left-out anchor
        rows = [i for i, e in enumerate(exclude) if e == skip]
        prefix = anchor_prefix(demos, prefix_tokens, skip)
        s, c = prefixed_nll(model, enc, pad_id, prefix, batch_tokens, rows, on_batch)
        with_prefix[rows] = s[rows] / np.maximum(c[rows], 1)
    return plain, with_prefix


def icl_scores(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    pad_id: int,
    demos: Sequence[Encoded],
    prefix_tokens: int,
    **kw,
) -> np.ndarray:
    """ℓ(r|q) − ℓ(r | anchors, q) per sample (higher = better); keywords as :func:`icl_losses`."""
    plain, with_prefix = icl_losses(model, encoded, pad_id, demos, prefix_tokens, **kw)
    return plain - with_prefix


def nuggets_scores(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    pad_id: int,
    tasks: Sequence[Encoded],
    *,
    exclude: Sequence[int | None] | None = None,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Fraction of anchor tasks whose answer loss drops with the sample as one-shot demo."""
    tasks = list(tasks)
    if not tasks:
        raise FedqcError("nuggets needs anchor tasks")
    zs, zc = response_nll(model, tasks, pad_id, batch_tokens)
    zero_shot = zs / np.maximum(zc, 1)
    exclude = [None] * len(encoded) if exclude is None else list(exclude)
    out = np.zeros(len(encoded))
    for i, demo in enumerate(encoded):
        keep = [j for j in range(len(tasks)) if j != exclude[i]]
        s, c = prefixed_nll(model, tasks, pad_id, demo.input_ids, batch_tokens, keep)
        one_shot = s[keep] / np.maximum(c[keep], 1)
        out[i] = float(np.mean(one_shot < zero_shot[keep])) if keep else np.nan
        if on_batch is not None:
            on_batch(1)
    return out
