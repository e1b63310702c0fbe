"""The hook engine's per-sample LoRA gradient statistics against a batch-size-1 autograd loop,
and the checkpoint protocol (fingerprint, anchor directions, tracin / tracin-cos / clues)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gradient_reference import (
    ANCHORS,
    BATCH_TOKENS,
    MAX_LENGTH,
    SAMPLES,
    block_slices,
    current_adapter,
    random_checkpoint,
    reference_grads,
)

from fedqc.config import ModelConfig
from fedqc.data.encoding import encode_all, token_budget_batches
from fedqc.errors import FedqcError
from fedqc.models.loading import load, set_adapter_state
from fedqc.scoring.checkpointed import AnchorInfo, prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import (
    ScoringSettings,
    adam_transform,
    check_fingerprint,
    fingerprint,
    flatten,
    gradient_sum,
    lora_blocks,
    mean_gradient,
    moments_from_optimizer,
    per_sample_stats,
    unflatten,
)
from fedqc.scoring.scorers import CHECKPOINT_SCORERS, HIGHER_IS_BETTER, get_checkpoint_scorer

RTOL = 1e-5


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))
    set_adapter_state(loaded.model, random_checkpoint(loaded, 1, 1.0).adapter)
    yield loaded
    loaded.reset_adapter()


@pytest.fixture(scope="module")
def encoded(loaded):
    return encode_all(loaded.tokenizer, SAMPLES, MAX_LENGTH)


@pytest.fixture(scope="module")
def ref(loaded, encoded):
    return reference_grads(loaded.model, encoded)


def _close(got, want, rtol=RTOL):
    """Relative to 1e-5, with the scale of the whole array as the floor for near-zero entries."""
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_batches_have_padding_different_lengths_and_several_batches(loaded, encoded):
    batches = list(token_budget_batches(encoded, BATCH_TOKENS, loaded.tokenizer.pad_token_id))
    assert len(batches) >= 3
    assert any(b.input_ids.shape[0] > 1 and not bool(b.attention_mask.all()) for b in batches)
    assert len({len(e.input_ids) for e in encoded}) == len(encoded)


def test_norms_dots_and_losses_match_batch_size_one_autograd(loaded, encoded, ref):
    g = torch.Generator().manual_seed(7)
    directions = torch.randn(3, ref.shape[1], generator=g)
    directions[0] = ref.mean(0).float()  # an anchor-like direction
    loaded.model.train()  # the engine must switch dropout off by itself
    stats = per_sample_stats(
        loaded.model,
        encoded,
        loaded.tokenizer.pad_token_id,
        directions=directions,
        per_block=True,
        batch_tokens=BATCH_TOKENS,
    )
    assert not loaded.model.training
    _close(stats.sq_norm, (ref**2).sum(1).numpy())
    _close(stats.dots, (ref @ directions.double().T).numpy())
    for j, sl in enumerate(block_slices(loaded.model)):
        _close(stats.block_sq_norm[:, j], (ref[:, sl] ** 2).sum(1).numpy())
        _close(stats.block_dots[:, j], (ref[:, sl] @ directions[:, sl].double().T).numpy())
    # the per-sample losses are the token-mean response losses
    model = loaded.model
    for i, e in enumerate(encoded):
        ids = torch.tensor([e.input_ids])
        labels = ids.clone()
        labels[0, : e.n_prompt] = -100
        with torch.no_grad():
            assert stats.loss[i] == pytest.approx(float(model(ids, labels=labels).loss), rel=1e-5)
        assert stats.counts[i] == e.n_response


def test_directions_by_name_equal_flat_directions(loaded, encoded, ref):
    blocks = lora_blocks(loaded.model)
    flat = torch.randn(2, ref.shape[1], generator=torch.Generator().manual_seed(3))
    named = unflatten(flat, blocks)
    assert torch.equal(flatten(named, blocks), flat)
    single = unflatten(flat[0], blocks)
    assert tuple(single[blocks[0].name].shape) == blocks[0].shape
    assert torch.equal(flatten(single, blocks), flat[0])
    pad = loaded.tokenizer.pad_token_id
    a = per_sample_stats(loaded.model, encoded[:3], pad, directions=named)
    b = per_sample_stats(loaded.model, encoded[:3], pad, directions=flat)
    np.testing.assert_array_equal(a.dots, b.dots)
    bad = dict(named)
    bad[blocks[0].name] = torch.zeros(2, 3, 3)
    with pytest.raises(FedqcError, match="does not fit"):
        per_sample_stats(loaded.model, encoded[:1], pad, directions=bad)
    missing = {k: v for k, v in named.items() if k != blocks[-1].name}
    with pytest.raises(FedqcError, match="no entry"):
        per_sample_stats(loaded.model, encoded[:1], pad, directions=missing)


def test_adam_preconditioned_dots_match_reference(loaded, encoded, ref):
    blocks = lora_blocks(loaded.model)
    ckpt = random_checkpoint(loaded, 5, 1.0, moments=True)
    m = flatten({k: v[0] for k, v in ckpt.moments.items()}, blocks).double()
    v = flatten({k: v[1] for k, v in ckpt.moments.items()}, blocks).double()
    b1, b2, eps = 0.9, 0.999, 1e-8
    gamma = (b1 * m + (1 - b1) * ref) / torch.sqrt(b2 * v + (1 - b2) * ref**2 + eps)
    direction = ref.mean(0)
    stats = per_sample_stats(
        loaded.model,
        encoded,
        loaded.tokenizer.pad_token_id,
        directions=direction.float(),
        moments=ckpt.moments,
        batch_tokens=BATCH_TOKENS,
    )
    _close(stats.dots[:, 0], (gamma @ direction).numpy())
    _close(stats.sq_norm, (gamma**2).sum(1).numpy())
    # the elementwise transform itself
    g = torch.randn(4, 3)
    mm, vv = torch.randn(3), torch.rand(3)
    want = (0.9 * mm + 0.1 * g) / torch.sqrt(0.999 * vv + 0.001 * g * g + 1e-8)
    torch.testing.assert_close(adam_transform(g, mm, vv), want)


def test_mean_gradient_and_weighted_sums_match_reference(loaded, encoded, ref):
    blocks = lora_blocks(loaded.model)
    pad = loaded.tokenizer.pad_token_id
    mean = flatten(mean_gradient(loaded.model, encoded, pad, batch_tokens=BATCH_TOKENS), blocks)
    _close(mean.double().numpy(), ref.mean(0).numpy())
    rng = np.random.default_rng(0)
    w = rng.normal(size=(len(encoded), len(blocks)))
    got = flatten(
        gradient_sum(loaded.model, encoded, pad, weights=w, batch_tokens=BATCH_TOKENS), blocks
    )
    want = torch.cat(
        [torch.from_numpy(w[:, j]) @ ref[:, sl] for j, sl in enumerate(block_slices(loaded.model))]
    )
    _close(got.double().numpy(), want.numpy())


def test_moments_are_mapped_by_name_not_position(loaded, encoded):
    model = loaded.model
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # two groups in an order unlike named_parameters(), as HF Trainer's decay groups do
    groups = [{"params": [p for _, p in params[1::2]]}, {"params": [p for _, p in params[0::2]]}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    before = current_adapter(model)
    loss = sum(p.sum() * (i + 1) for i, (_, p) in enumerate(params))
    loss.backward()
    opt.step()
    moments = moments_from_optimizer(model, opt)
    set_adapter_state(model, before)
    for n, p in params:
        p.grad = None
        key = n.replace(f".{model.active_adapter}", "")
        torch.testing.assert_close(moments[key][0], opt.state[p]["exp_avg"])
        torch.testing.assert_close(moments[key][1], opt.state[p]["exp_avg_sq"])
    assert set(moments) == {b.name for b in lora_blocks(model)}


# --- checkpoints, fingerprint, the protocol ----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(loaded):
    return [
        random_checkpoint(loaded, 11 + k, lr, moments=True) for k, lr in enumerate([3e-4, 1e-4])
    ]


def _settings(loaded, scorer, **kw):
    return ScoringSettings.for_model(loaded.tokenizer, scorer, MAX_LENGTH, **kw)


def test_fingerprint_detects_any_difference(loaded, checkpoints):
    base = _settings(loaded, "tracin")
    fp = fingerprint(checkpoints, base)
    assert fp == fingerprint([dataclasses.replace(c) for c in checkpoints], base)
    check_fingerprint(fp, checkpoints, base)
    changed_weight = dict(checkpoints[1].adapter)
    name = next(iter(changed_weight))
    changed_weight[name] = changed_weight[name].clone()
    changed_weight[name][0, 0] += 1e-6
    variants = [
        (checkpoints, _settings(loaded, "tracin-cos")),
        (checkpoints, dataclasses.replace(base, max_length=64)),
        (checkpoints, dataclasses.replace(base, template=base.template + " ")),
        (checkpoints, dataclasses.replace(base, adam_eps=1e-6)),
        (checkpoints[:1], base),
        (checkpoints[::-1], base),
        ([checkpoints[0], dataclasses.replace(checkpoints[1], lr=1.01e-4)], base),
        ([checkpoints[0], dataclasses.replace(checkpoints[1], adapter=changed_weight)], base),
    ]
    assert fingerprint(checkpoints, _settings(loaded, "tracin")) == fp  # rebuilt: the same
    for i, (ckpts, settings) in enumerate(variants):
        assert fingerprint(ckpts, settings) != fp, i
        with pytest.raises(FedqcError, match="fingerprint mismatch"):
            check_fingerprint(fp, ckpts, settings)
    # client-local Adam moments are not part of it
    assert fingerprint([dataclasses.replace(c, moments=None) for c in checkpoints], base) == fp


@pytest.fixture(scope="module")
def ref_at_checkpoints(loaded, checkpoints, encoded):
    """Per checkpoint: batch-size-1 gradients of the samples and of the anchors."""
    anchors_enc = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    before = current_adapter(loaded.model)
    out = []
    for ckpt in checkpoints:
        set_adapter_state(loaded.model, ckpt.adapter)
        out.append(
            (reference_grads(loaded.model, encoded), reference_grads(loaded.model, anchors_enc))
        )
    set_adapter_state(loaded.model, before)
    return out


def _manual_scores(loaded, name, checkpoints, grads, anchor_grads, leave_one_out=False):
    """(1/K) Σ_k η_k ⟨g_k or Γ_k, ḡ_k⟩ (or the cosine) from batch-size-1 autograd gradients.

    ``leave_one_out``: ``grads`` are the anchors themselves; sample i uses the others' mean.
    """
    blocks = lora_blocks(loaded.model)
    total = 0.0
    for ckpt, g, ga in zip(checkpoints, grads, anchor_grads, strict=True):
        g_bar = ga.mean(0)
        if leave_one_out:
            n = ga.shape[0]
            g_bar = (n * g_bar - ga) / (n - 1)  # row i: the mean gradient of the others
        if name == "clues":
            m = flatten({k: v[0] for k, v in ckpt.moments.items()}, blocks).double()
            v = flatten({k: v[1] for k, v in ckpt.moments.items()}, blocks).double()
            g = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)
        s = (g * g_bar).sum(1) if leave_one_out else g @ g_bar
        if name == "tracin-cos":
            s = s / (g.norm(dim=1) * g_bar.norm(dim=-1))
        total = total + ckpt.lr * s.numpy()
    return total / len(checkpoints)


@pytest.mark.parametrize("name", ["tracin", "tracin-cos", "clues"])
def test_anchor_and_client_scores_match_reference_at_same_checkpoints(
    loaded, checkpoints, ref_at_checkpoints, name
):
    settings = _settings(loaded, name)
    before = current_adapter(loaded.model)
    info = prepare_anchor_info(loaded, ANCHORS, checkpoints, settings, batch_tokens=BATCH_TOKENS)
    assert len(info.directions) == len(checkpoints)
    # the info survives the trip as flat arrays
    info = AnchorInfo.from_arrays(info.scorer, info.fingerprint, info.to_arrays())
    calls = []
    scores = score_with_checkpoints(
        loaded,
        SAMPLES,
        checkpoints,
        info,
        settings,
        batch_tokens=BATCH_TOKENS,
        on_batch=calls.append,
    )
    grads, anchor_grads = zip(*ref_at_checkpoints, strict=True)
    _close(scores.raw, _manual_scores(loaded, name, checkpoints, grads, anchor_grads))
    assert sum(calls) == len(checkpoints) * len(SAMPLES)
    np.testing.assert_array_equal(scores.oriented, scores.raw)  # higher is better
    assert np.isfinite(scores.cond_loss).all() and np.isnan(scores.bare_loss).all()
    # the anchors, scored the same way for the threshold
    anchor_scores = score_with_checkpoints(
        loaded, ANCHORS, checkpoints, info, settings, batch_tokens=BATCH_TOKENS, anchor_self=True
    )
    # each anchor against the mean gradient of the others (its own ‖g‖²/n left out)
    want = _manual_scores(loaded, name, checkpoints, anchor_grads, anchor_grads, True)
    _close(anchor_scores.raw, want)
    # the model's adapter is back to what it was
    for k, v in current_adapter(loaded.model).items():
        assert torch.equal(v, before[k])


def test_client_with_other_checkpoints_or_settings_refuses_to_score(loaded, checkpoints):
    settings = _settings(loaded, "tracin")
    info = prepare_anchor_info(loaded, ANCHORS[:1], checkpoints, settings)
    stale = [checkpoints[0], random_checkpoint(loaded, 99, checkpoints[1].lr)]
    with pytest.raises(FedqcError, match="fingerprint mismatch"):
        score_with_checkpoints(loaded, SAMPLES[:1], stale, info, settings)
    with pytest.raises(FedqcError, match="fingerprint mismatch"):
        score_with_checkpoints(
            loaded, SAMPLES[:1], checkpoints, info, dataclasses.replace(settings, max_length=64)
        )
    other = _settings(loaded, "tracin-cos")
    with pytest.raises(FedqcError, match="anchor info is for scorer 'tracin'"):
        score_with_checkpoints(loaded, SAMPLES[:1], checkpoints, info, other)


def test_clues_needs_moments(loaded, checkpoints):
    bare = [dataclasses.replace(c, moments=None) for c in checkpoints]
    settings = _settings(loaded, "clues")
    info = prepare_anchor_info(loaded, ANCHORS[:1], bare, settings)
    with pytest.raises(FedqcError, match="Adam moments"):
        score_with_checkpoints(loaded, SAMPLES[:1], bare, info, settings)


def test_checkpoint_scorers_declare_directions():
    assert set(CHECKPOINT_SCORERS) == {"tracin", "tracin-cos", "clues", "datainf", "icl", "nuggets"}
    assert all(s.direction == HIGHER_IS_BETTER for s in CHECKPOINT_SCORERS.values())
    with pytest.raises(FedqcError, match="unknown checkpoint scorer"):
        get_checkpoint_scorer("nope")
