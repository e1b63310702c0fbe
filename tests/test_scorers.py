"""The batched scorers against a plain, unbatched HF forward pass with `labels`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedqc.config import ModelConfig
from fedqc.data.encoding import encode, encode_all, token_budget_batches
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.formulas import HIGHER_IS_BETTER, LOWER_IS_BETTER, SCORERS
from fedqc.scoring.scorers import get_scorer, score_samples

MAX_LENGTH = 128
BATCH_TOKENS = 160

SAMPLES = [
    Sample("a", "What is 2+2?", "4"),
    Sample("b", "Name three colours of the rainbow.", "Red, orange and yellow are three of them."),
    Sample("c", "Hi", "Hello! How can I help you today? Ask me anything you like."),
    Sample(
        "d",
        "Write one sentence about the sea, with some detail on waves and tides.",
        "The sea rolls in long grey waves that rise with the tide twice a day.",
    ),
    Sample("e", "Add 17 and 25.", "17 + 25 = 42"),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelConfig(name=str(tiny_model_dir), max_length=MAX_LENGTH))


def _direct_loss(loaded, sample: Sample, bare: bool) -> float:
    """Token-mean response NLL from the HF model's own loss, batch size 1, no padding."""
    enc = encode(loaded.tokenizer, sample, MAX_LENGTH, bare=bare)
    ids = torch.tensor([enc.input_ids])
    labels = ids.clone()
    labels[0, : enc.n_prompt] = -100
    loaded.model.eval()
    with torch.no_grad():
        return float(loaded.model(ids, labels=labels).loss)


@pytest.fixture(scope="module")
def direct(loaded):
    cond = np.array([_direct_loss(loaded, s, bare=False) for s in SAMPLES])
    bare = np.array([_direct_loss(loaded, s, bare=True) for s in SAMPLES])
    return cond, bare


def test_batches_have_padding_and_several_batches(loaded):
    encoded = encode_all(loaded.tokenizer, SAMPLES, MAX_LENGTH)
    batches = list(token_budget_batches(encoded, BATCH_TOKENS, loaded.tokenizer.pad_token_id))
    assert len(batches) > 1
    assert any(b.input_ids.shape[0] > 1 and not bool(b.attention_mask.all()) for b in batches)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(SAMPLES)))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ppl", lambda c, b: np.exp(c)),
        ("cond-prob", lambda c, b: -c),
        ("ifd", lambda c, b: c / b),
        ("ira", lambda c, b: b - c),
    ],
)
def test_scorer_matches_unbatched_hf_loss(loaded, direct, name, expected):
    cond, bare = direct
    calls = []
    scores = score_samples(
        loaded,
        SAMPLES,
        get_scorer(name),
        MAX_LENGTH,
        batch_tokens=BATCH_TOKENS,
        on_batch=calls.append,
    )
    np.testing.assert_allclose(scores.raw, expected(cond, bare), rtol=1e-4, atol=1e-6)
    passes = 2 if name in {"ifd", "ira"} else 1
    assert sum(calls) == passes * len(SAMPLES)
    assert scores.truncated == 0


@pytest.mark.parametrize("name", list(SCORERS))
def test_oriented_is_direction_times_raw(loaded, name):
    scorer = get_scorer(name)
    scores = score_samples(loaded, SAMPLES[:2], scorer, MAX_LENGTH, batch_tokens=BATCH_TOKENS)
    np.testing.assert_array_equal(scores.oriented, scorer.direction * scores.raw)
    assert scorer.raw(float(scores.oriented[0])) == pytest.approx(scores.raw[0])


def test_directions():
    assert get_scorer("ppl").direction == LOWER_IS_BETTER
    assert get_scorer("ifd").direction == LOWER_IS_BETTER
    assert get_scorer("cond-prob").direction == HIGHER_IS_BETTER
    assert get_scorer("ira").direction == HIGHER_IS_BETTER
    # a lower perplexity must be a higher (better) oriented score
    ppl = get_scorer("ppl")
    low, high = ppl.orient(np.array([2.0, 9.0]))
    assert low > high


def test_unknown_scorer():
    with pytest.raises(FedqcError, match="unknown scorer 'nope'"):
        get_scorer("nope")


def test_truncation_is_counted(loaded):
    long = Sample("long", "Tell me a story. " * 20, "Once upon a time " * 20)
    max_length = 48
    full = [len(encode(loaded.tokenizer, s, 10_000).input_ids) for s in [SAMPLES[0], long]]
    assert full[0] <= max_length < full[1]
    scores = score_samples(loaded, [SAMPLES[0], long], get_scorer("ppl"), max_length)
    assert scores.truncated == 1
    assert np.isfinite(scores.raw).all()
    enc = encode(loaded.tokenizer, long, max_length)
    assert enc.truncated and len(enc.input_ids) == max_length and enc.n_response > 0


@pytest.mark.parametrize("max_length", [128, 48])
def test_bare_pass_scores_the_same_response_tokens(loaded, max_length):
    tok = loaded.tokenizer
    for s in [*SAMPLES, Sample("long", "Tell me a story. " * 20, "Once upon a time " * 20)]:
        cond = encode(tok, s, max_length)
        bare = encode(tok, s, max_length, bare=True)
        assert bare.n_response == cond.n_response > 0
        assert bare.input_ids[bare.n_prompt :] == cond.input_ids[cond.n_prompt :]
        assert bare.truncated == cond.truncated
