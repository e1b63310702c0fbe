"""Few-shot scoring: demonstrations in a cached prefix against one uncached forward of the whole
sequence, each anchor left out of its own prefix, and the bench scoring as the federation does."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gradient_reference import ANCHORS, MAX_LENGTH, SAMPLES

from fedqc.bench.pool import score_losses
from fedqc.config import ModelConfig
from fedqc.data.encoding import Encoded, encode_all
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.scorers import get_scorer, score_samples
from fedqc.scoring.shots import anchor_prefixes, demonstrations, warn_if_cut

BATCH_TOKENS = 600  # with a ~150-token prefix: a few rows per batch, several batches


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))


def _direct(model, prefix: tuple[int, ...], e: Encoded) -> tuple[float, float]:
    """(token-mean response NLL, NLL of the last token) of prefix + sample, uncached, unpadded."""
    ids = torch.tensor([list(prefix) + list(e.input_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    response = nll[len(prefix) + e.n_prompt - 1 :]
    return float(response.mean()), float(response[-1])


def test_few_shot_losses_equal_one_forward_of_demonstrations_and_sample(loaded):
    tok = loaded.tokenizer
    prefix = demonstrations(encode_all(tok, ANCHORS, MAX_LENGTH), 2)
    calls = []
    got = score_samples(
        loaded,
        SAMPLES,
        get_scorer("ifd"),
        MAX_LENGTH,
        BATCH_TOKENS,
        calls.append,
        [prefix] * len(SAMPLES),
    )
    assert len(calls) > 2 and max(calls) > 1  # several batches per pass, padded rows
    loaded.model.eval()
    cond = [_direct(loaded.model, prefix, e) for e in encode_all(tok, SAMPLES, MAX_LENGTH)]
    bare = [_direct(loaded.model, prefix, e) for e in encode_all(tok, SAMPLES, MAX_LENGTH, True)]
    np.testing.assert_allclose(got.cond_loss, [c[0] for c in cond], rtol=1e-5)
    np.testing.assert_allclose(got.bare_loss, [b[0] for b in bare], rtol=1e-5)
    np.testing.assert_allclose(got.end_loss, [c[1] for c in cond], rtol=1e-4, atol=1e-5)
    zero_shot = score_samples(loaded, SAMPLES, get_scorer("ifd"), MAX_LENGTH, BATCH_TOKENS)
    assert not np.allclose(zero_shot.cond_loss, got.cond_loss)  # the demonstrations matter


def test_each_anchor_is_left_out_of_its_own_demonstrations(loaded):
    enc = encode_all(loaded.tokenizer, ANCHORS[:3], MAX_LENGTH)
    ids = [e.input_ids for e in enc]
    assert demonstrations(enc, 2) == ids[0] + ids[1]
    assert anchor_prefixes(enc, 2) == [ids[1] + ids[2], ids[0] + ids[2], ids[0] + ids[1]]
    assert anchor_prefixes(enc, 0) == [(), (), ()]
    with pytest.raises(FedqcError, match="quality.shots = 3 needs at least 4 anchors"):
        anchor_prefixes(enc, 3)
    with pytest.raises(FedqcError, match="quality.shots = 4 needs at least 4 anchors"):
        demonstrations(enc, 4)


def test_bench_scores_anchors_and_samples_as_the_federation_does(loaded):
    tok = loaded.tokenizer
    enc = encode_all(tok, ANCHORS, MAX_LENGTH)
    prefixes = anchor_prefixes(enc, 2)
    bench = score_losses(loaded, ANCHORS, MAX_LENGTH, BATCH_TOKENS, None, prefixes)
    server = score_samples(
        loaded, ANCHORS, get_scorer("ifd"), MAX_LENGTH, BATCH_TOKENS, None, prefixes
    )
    np.testing.assert_allclose(bench.cond, server.cond_loss, rtol=1e-6)
    np.testing.assert_allclose(bench.bare, server.bare_loss, rtol=1e-6)
    np.testing.assert_allclose(bench.end, server.end_loss, rtol=1e-6)


def test_cut_demonstrations_are_named_in_a_warning(loaded, caplog):
    whole = encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH)
    cut = encode_all(loaded.tokenizer, ANCHORS, 16)  # every anchor is longer than 16 tokens
    assert all(e.truncated for e in cut) and not any(e.truncated for e in whole)
    with caplog.at_level(logging.WARNING, logger="fedqc"):
        warn_if_cut(whole, 2, MAX_LENGTH)
        warn_if_cut(cut, 0, 16)
        assert not caplog.records
        warn_if_cut(cut, 2, 16)
    assert "demonstration anchors [0, 1, 2] are longer than model.max-length = 16" in caplog.text
