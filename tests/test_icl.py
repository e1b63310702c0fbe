"""The in-context probes with a cached prefix against direct computations without KV caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradient_reference import ANCHORS, MAX_LENGTH, SAMPLES, random_checkpoint

from fedqc.config import ModelConfig
from fedqc.data.encoding import Encoded, encode_all
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.checkpointed import AnchorInfo, prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import ScoringSettings, applied
from fedqc.scoring.icl import anchor_prefix, icl_scores, nuggets_scores, prefixed_nll

BATCH_TOKENS = 600  # with a ~150-token prefix: a few rows per batch, several batches


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))
    yield loaded
    loaded.reset_adapter()


@pytest.fixture(scope="module")
def ckpt(loaded):
    return random_checkpoint(loaded, 3, 1e-4)


def _direct(model, prefix: tuple[int, ...], e: Encoded) -> float:
    """Token-mean response loss of prefix + sample in one uncached, unpadded HF forward."""
    ids = torch.tensor([list(prefix) + list(e.input_ids)])
    labels = ids.clone()
    labels[0, : len(prefix) + e.n_prompt] = -100
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def test_cached_prefix_equals_uncached_forward(loaded, ckpt):
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    enc = encode_all(tok, SAMPLES, MAX_LENGTH)
    demos = encode_all(tok, ANCHORS, MAX_LENGTH)
    prefix = anchor_prefix(demos, 10_000)
    assert prefix == tuple(t for d in demos for t in d.input_ids)
    with applied(loaded.model, ckpt.adapter):
        calls = []
        sums, counts = prefixed_nll(
            loaded.model, enc, pad, prefix, BATCH_TOKENS, None, calls.append
        )
        assert len(calls) > 1 and max(calls) > 1  # several batches, padded rows
        want = np.array([_direct(loaded.model, prefix, e) for e in enc])
        np.testing.assert_allclose(sums / counts, want, rtol=1e-5)
        plain = np.array([_direct(loaded.model, (), e) for e in enc])
        scores = icl_scores(loaded.model, enc, pad, demos, 10_000, batch_tokens=BATCH_TOKENS)
    np.testing.assert_allclose(scores, plain - want, rtol=1e-4, atol=1e-5)


def test_prefix_budget_and_leave_one_out(loaded):
    demos = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    lengths = [len(d.input_ids) for d in demos]
    assert len(anchor_prefix(demos, lengths[0] + lengths[1])) == lengths[0] + lengths[1]
    assert len(anchor_prefix(demos, lengths[0] + lengths[1] - 1)) == lengths[0]
    assert anchor_prefix(demos, 10_000, exclude=1) == demos[0].input_ids + demos[2].input_ids
    with pytest.raises(FedqcError, match="no anchor fits"):
        anchor_prefix(demos, lengths[0] - 1)


def test_icl_anchors_are_left_out_of_their_own_prefix(loaded, ckpt):
    settings = ScoringSettings.for_model(loaded.tokenizer, "icl", MAX_LENGTH)
    info = prepare_anchor_info(loaded, ANCHORS, [ckpt], settings)
    assert info.directions == [] and len(info.demos) == len(ANCHORS)
    info = AnchorInfo.from_arrays(info.scorer, info.fingerprint, info.to_arrays())
    got = score_with_checkpoints(
        loaded, ANCHORS, [ckpt], info, settings, batch_tokens=BATCH_TOKENS, anchor_self=True
    )
    with applied(loaded.model, ckpt.adapter):
        want = []
        for j, d in enumerate(info.demos):
            prefix = anchor_prefix(info.demos, settings.icl_prefix_tokens, exclude=j)
            want.append(_direct(loaded.model, (), d) - _direct(loaded.model, prefix, d))
    np.testing.assert_allclose(got.raw, want, rtol=1e-4, atol=1e-5)


def test_nuggets_equals_direct_one_shot_vs_zero_shot(loaded, ckpt):
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    enc = encode_all(tok, SAMPLES[:2], MAX_LENGTH)
    tasks = encode_all(tok, ANCHORS, MAX_LENGTH)
    with applied(loaded.model, ckpt.adapter):
        got = nuggets_scores(loaded.model, enc, pad, tasks, batch_tokens=BATCH_TOKENS)
        left_out = nuggets_scores(
            loaded.model, tasks, pad, tasks, exclude=[0, 1, 2], batch_tokens=BATCH_TOKENS
        )
        zero = [_direct(loaded.model, (), t) for t in tasks]
        want = [
            np.mean(
                [
                    _direct(loaded.model, e.input_ids, t) < z
                    for t, z in zip(tasks, zero, strict=True)
                ]
            )
            for e in enc
        ]
        want_left_out = [
            np.mean(
                [
                    _direct(loaded.model, a.input_ids, t) < z
                    for j, (t, z) in enumerate(zip(tasks, zero, strict=True))
                    if j != i
                ]
            )
            for i, a in enumerate(tasks)
        ]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(left_out, want_left_out)
    assert set(np.round(got * len(tasks)).astype(int)) <= set(range(len(tasks) + 1))
