"""Vectorised and streaming DataInf against a direct Python-loop port of the paper's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradient_reference import (
    ANCHORS,
    BATCH_TOKENS,
    MAX_LENGTH,
    SAMPLES,
    block_slices,
    random_checkpoint,
    reference_grads,
)

from fedqc.config import ModelConfig
from fedqc.data.encoding import encode_all
from fedqc.models.loading import load
from fedqc.scoring.checkpointed import prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.datainf import datainf_dense, datainf_scores, datainf_statistics
from fedqc.scoring.gradient import ScoringSettings, applied, lora_blocks, mean_gradient


def loop_influence(tr_grad: dict, val_grad: dict, lambda_const_param: float = 10) -> np.ndarray:
    """DataInf's IF(k) = −Σ_l ⟨h_l, g_kl⟩ exactly as its IFEngine computes it: Python loops over
    blocks and training points (``compute_hvp_proposed`` then ``compute_IF``)."""
    n = len(tr_grad)
    hvp = {}
    for name in val_grad:
        s = torch.zeros(n, dtype=torch.float64)
        for i in tr_grad:
            s[i] = torch.mean(tr_grad[i][name] ** 2)
        lam = torch.mean(s) / lambda_const_param
        h = torch.zeros(val_grad[name].shape, dtype=torch.float64)
        for i in tr_grad:
            g = tr_grad[i][name]
            c = torch.sum(val_grad[name] * g) / (lam + torch.sum(g**2))
            h += (val_grad[name] - c * g) / (n * lam)
        hvp[name] = h
    out = np.zeros(n)
    for i in tr_grad:
        value = 0.0
        for name in val_grad:
            value += float(torch.sum(hvp[name] * tr_grad[i][name]))
        out[i] = -value
    return out


def test_dense_closed_form_equals_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 16), (16, 4), (4, 8), (8, 4)]
    n = 9
    grads = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in shapes]
    v = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    tr = {i: {f"w{j}": grads[j][i] for j in range(len(shapes))} for i in range(n)}
    val = {f"w{j}": v[j] for j in range(len(shapes))}
    want = -loop_influence(tr, val)
    got = datainf_dense([x.reshape(n, -1) for x in grads], v).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))
    yield loaded
    loaded.reset_adapter()


def _loop_on_model(loaded, encoded, anchors_enc):
    """−IF from batch-size-1 autograd gradients, per-block dicts, and the loop formula."""
    blocks = lora_blocks(loaded.model)
    ref = reference_grads(loaded.model, encoded)
    v = reference_grads(loaded.model, anchors_enc).mean(0)
    sl = block_slices(loaded.model)
    tr = {i: {b.name: ref[i, s] for b, s in zip(blocks, sl, strict=True)} for i in range(len(ref))}
    val = {b.name: v[s] for b, s in zip(blocks, sl, strict=True)}
    return -loop_influence(tr, val)


@pytest.fixture(scope="module")
def checkpoints(loaded):
    return [random_checkpoint(loaded, 30 + k, lr) for k, lr in enumerate([2e-4, 1e-4])]


@pytest.fixture(scope="module")
def loop_scores(loaded, checkpoints):
    """Per checkpoint, −IF of every sample from the loop over batch-size-1 gradients."""
    encoded = encode_all(loaded.tokenizer, SAMPLES, MAX_LENGTH)
    anchors_enc = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    with applied(loaded.model, checkpoints[0].adapter):
        first = _loop_on_model(loaded, encoded, anchors_enc)
    with applied(loaded.model, checkpoints[1].adapter):
        second = _loop_on_model(loaded, encoded, anchors_enc)
    return [first, second]


def test_streaming_passes_equal_loop_on_the_model(loaded, checkpoints, loop_scores):
    pad = loaded.tokenizer.pad_token_id
    encoded = encode_all(loaded.tokenizer, SAMPLES, MAX_LENGTH)
    anchors_enc = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    with applied(loaded.model, checkpoints[0].adapter):
        v = mean_gradient(loaded.model, anchors_enc, pad, batch_tokens=BATCH_TOKENS)
        calls = []
        stats = datainf_statistics(
            loaded.model, encoded, pad, v, batch_tokens=BATCH_TOKENS, on_batch=calls.append
        )
        got = datainf_scores(loaded.model, encoded, pad, v, stats, batch_tokens=BATCH_TOKENS)
    assert sum(calls) == 2 * len(SAMPLES)  # passes 1 and 2
    assert stats.n == len(SAMPLES) and len(stats.lam) == len(lora_blocks(loaded.model))
    want = loop_scores[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_score_with_checkpoints_datainf_averages_checkpoints(loaded, checkpoints, loop_scores):
    settings = ScoringSettings.for_model(loaded.tokenizer, "datainf", MAX_LENGTH)
    info = prepare_anchor_info(loaded, ANCHORS, checkpoints, settings, batch_tokens=BATCH_TOKENS)
    scores = score_with_checkpoints(
        loaded, SAMPLES, checkpoints, info, settings, batch_tokens=BATCH_TOKENS
    )
    want = np.mean(loop_scores, axis=0)
    np.testing.assert_allclose(scores.raw, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(scores.oriented, scores.raw)  # −IF: higher is better


def test_anchor_self_scores_leave_each_anchor_out_of_v(loaded, checkpoints):
    """The anchors scored for τ: ⟨v, g_k⟩ uses the others' mean gradient, the rest is unchanged."""
    settings = ScoringSettings.for_model(loaded.tokenizer, "datainf", MAX_LENGTH)
    info = prepare_anchor_info(loaded, ANCHORS, checkpoints[:1], settings)
    got = score_with_checkpoints(loaded, ANCHORS, checkpoints[:1], info, settings, anchor_self=True)
    anchors_enc = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    with applied(loaded.model, checkpoints[0].adapter):
        grads = reference_grads(loaded.model, anchors_enc)  # (n, P), float64
    n = grads.shape[0]
    want = np.zeros(n)
    for sl in block_slices(loaded.model):
        g = grads[:, sl]
        v = g.mean(0)
        sq = (g * g).sum(1)
        lam = 0.1 * sq.mean() / g.shape[1]
        s = ((g @ v) / (lam + sq)) @ g  # S_l, from v with every anchor in it
        a_loo = (g @ v * n - sq) / (n - 1)  # ⟨v_−k, g_k⟩
        want += ((a_loo - (g @ s) / n) / lam).numpy()
    np.testing.assert_allclose(got.raw, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
