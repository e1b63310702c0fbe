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
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.scorers import get_scorer, score_samples
from fedqc.scoring.shots import (
    anchor_prefixes,
    demonstration_anchors,
    demonstrations,
    log_demonstrations,
)

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


def _anchor(j: int, cut: bool) -> Encoded:
    return Encoded((100 + j, 200 + j), 1, cut)


def test_demonstrations_are_the_first_anchors_that_fit_whole():
    # anchors 1 and 4 were cut at model.max-length: never shown
    enc = [_anchor(j, cut=j in (1, 4)) for j in range(6)]
    ids = [e.input_ids for e in enc]
    assert demonstration_anchors(enc, 2) == [0, 2, 3]
    assert demonstrations(enc, 2) == ids[0] + ids[2]
    # a demonstration scored itself gets the next whole anchor in its place; the others,
    # cut ones included, get the demonstrations
    assert anchor_prefixes(enc, 2) == [
        ids[2] + ids[3],
        ids[0] + ids[2],
        ids[0] + ids[3],
        ids[0] + ids[2],
        ids[0] + ids[2],
        ids[0] + ids[2],
    ]


def test_with_too_few_whole_anchors_all_that_fit_are_shown_and_a_warning_says_so(caplog):
    enc = [_anchor(j, cut=j != 2) for j in range(4)]
    ids = [e.input_ids for e in enc]
    assert demonstrations(enc, 2) == ids[2]
    assert anchor_prefixes(enc, 2) == [ids[2], ids[2], (), ids[2]]  # no whole one to stand in
    assert demonstrations([_anchor(j, cut=True) for j in range(3)], 2) == ()  # zero-shot
    with caplog.at_level(logging.INFO, logger="fedqc"):
        log_demonstrations(enc, 2, 16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "only 1 of the 4 anchors fit whole in model.max-length = 16 (prompt, response and end of "
        "sequence): 1 demonstrations instead of quality.shots = 2; raise model.max-length or add "
        "shorter anchors"
    ]
    assert "demonstrations: anchors [2]; anchors [0, 1, 3], longer than" in caplog.text


def test_the_demonstrations_and_the_cut_anchors_passed_over_are_logged(loaded, caplog):
    long = Sample("long", "Tell a story.", "Once upon a time " * 20)
    anchors = [ANCHORS[0], long, ANCHORS[2]]
    cut_at = max(len(e.input_ids) for e in encode_all(loaded.tokenizer, ANCHORS, MAX_LENGTH))
    enc = encode_all(loaded.tokenizer, anchors, cut_at)
    assert [e.truncated for e in enc] == [False, True, False]
    with caplog.at_level(logging.INFO, logger="fedqc"):
        log_demonstrations(enc, 0, cut_at)
        assert not caplog.records
        log_demonstrations(enc, 2, cut_at)
    assert caplog.messages == [
        f"demonstrations: anchors [0, 2]; anchors [1], longer than model.max-length = {cut_at}, "
        "passed over"
    ]
    assert demonstrations(enc, 2) == enc[0].input_ids + enc[2].input_ids
