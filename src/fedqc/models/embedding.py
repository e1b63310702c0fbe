"""Sample embeddings from the scoring model's own hidden states (no new dependency).

A sample's embedding is one layer's hidden states, mean-pooled over the sample's own tokens (its
prompt, a blank line, its response: no chat template, whose fixed system turn would be shared by
every sample and pull all embeddings together) and L2-normalised. The pooled positions are the
real tokens only (padding is masked out), so an embedding does not depend on which batch the
sample fell into. The per-domain standard (:mod:`fedqc.quality.domains`) assigns a sample to the
nearest anchor domain by the cosine of these vectors, on the client, with the same model that
scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedqc.data.encoding import Encoded, token_budget_batches
from fedqc.data.samples import Sample
from fedqc.models.likelihood import causal_lm
from fedqc.models.loading import LoadedModel
from fedqc.models.placement import model_placement

# Which hidden state to pool: index into the backbone's hidden states (0: the token embeddings,
# -1: the last layer, after the final norm). A middle layer carries more of what the text is about
# and less of the next token; see embed_samples.
DEFAULT_LAYER = -1


def embedding_text(sample: Sample) -> str:
    """The text a sample is embedded from: its prompt and response, without a template."""
    return f"{sample.prompt}\n\n{sample.response}"


def encode_for_embedding(tokenizer, samples: Sequence[Sample], max_length: int) -> list[Encoded]:
    """Each sample's own tokens (no special tokens, no template), cut at ``max_length``."""
    out = []
    for sample in samples:
        ids = tokenizer(embedding_text(sample), add_special_tokens=False)["input_ids"]
        if not ids:  # an empty text still gets one token, so that its embedding is defined
            ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        out.append(Encoded(tuple(ids[:max_length]), 0, len(ids) > max_length))
    return out


@torch.inference_mode()
def embed_encoded(
    model: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    *,
    layer: int = DEFAULT_LAYER,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n, hidden) float64 array: ``layer``'s hidden states mean-pooled over each row's real
    tokens, L2-normalised, in input order. The model is put in eval mode."""
    lm = causal_lm(model)
    lm.eval()
    backbone = getattr(lm, lm.base_model_prefix)
    device = model_placement(lm).device
    width = int(lm.config.hidden_size)
    out = np.zeros((len(encoded), width), dtype=np.float64)
    for batch in token_budget_batches(encoded, batch_tokens, pad_id):
        batch = batch.to(device)
        states = backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states[layer]
        mask = batch.attention_mask.unsqueeze(-1).float()
        pooled = (states.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[batch.indices] = pooled.double().cpu().numpy()
        if on_batch is not None:
            on_batch(len(batch.indices))
    return unit_rows(out)


def embed_samples(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    max_length: int = 512,
    layer: int = DEFAULT_LAYER,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Unit-length embeddings of ``samples`` (:func:`embed_encoded`), from ``loaded``'s model as it
    is (the adapter in it included: embed with the same model state on every party)."""
    encoded = encode_for_embedding(loaded.tokenizer, samples, max_length)
    pad_id = loaded.tokenizer.pad_token_id
    return embed_encoded(
        loaded.model,
        encoded,
        0 if pad_id is None else pad_id,
        layer=layer,
        batch_tokens=batch_tokens,
        on_batch=on_batch,
    )


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
