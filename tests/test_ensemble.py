"""Ensemble scorers: components parsed, calibrated on anchors, combined as mean z-scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.errors import FedqcError
from fedqc.scoring.ensemble import Calibration, components, ensemble_scorer


def test_components_parse_and_reject_bad_names():
    assert [s.name for s in components("ensemble:ppl+ifd")] == ["ppl", "ifd"]
    for bad in ("ensemble:ppl", "ensemble:ppl+nope", "ensemble:ppl+ppl"):
        with pytest.raises(FedqcError, match="ensemble"):
            components(bad)


def test_ensemble_is_the_mean_of_anchor_standardised_oriented_scores():
    anchor_cond = np.array([1.0, 1.2, 0.8, 1.1])
    anchor_bare = np.array([2.0, 2.2, 1.9, 2.4])
    cal = Calibration("ensemble:cond-prob+ira").fit(anchor_cond, anchor_bare).calibration_
    cond, bare = np.array([1.0, 3.0]), np.array([2.0, 3.1])
    expected = []
    for o_anchor, o in ((-anchor_cond, -cond), (anchor_bare - anchor_cond, bare - cond)):
        expected.append((o - np.median(o_anchor)) / np.std(o_anchor))
    scorer = ensemble_scorer("ensemble:cond-prob+ira", cal)
    np.testing.assert_allclose(scorer.formula(cond, bare), np.mean(expected, axis=0))
    assert scorer.direction == 1 and scorer.needs_bare
    assert (
        scorer.formula(cond, bare)[0] > scorer.formula(cond, bare)[1]
    )  # the worse sample ranks lower


def test_calibration_length_is_checked():
    with pytest.raises(ValueError):
        ensemble_scorer("ensemble:ppl+ifd", [0.0, 1.0])


def test_ensemble_min_is_the_weakest_link_and_skips_missing_components():
    anchor_cond = np.array([1.0, 1.2, 0.8, 1.1])
    anchor_bare = np.array([2.0, 2.2, 1.9, 2.4])
    anchor_end = np.array([0.1, 0.3, 0.2, 0.2])
    name = "ensemble-min:cond-prob+end-loss"
    assert [s.name for s in components(name)] == ["cond-prob", "end-loss"]
    cal = Calibration(name).fit(anchor_cond, anchor_bare, anchor_end).calibration_
    scorer = ensemble_scorer(name, cal)
    # sample 0: good loss, end-of-sequence unlikely (cut); 1: both fine; 2: truncated (no end)
    cond, bare, end = np.array([1.0, 1.0, 3.0]), np.ones(3), np.array([6.0, 0.2, np.nan])
    z_cond = (-cond - np.median(-anchor_cond)) / np.std(-anchor_cond)
    z_end = (-end - np.median(-anchor_end)) / np.std(-anchor_end)
    got = scorer.formula(cond, bare, end)
    np.testing.assert_allclose(got[:2], np.minimum(z_cond, z_end)[:2])
    assert got[2] == pytest.approx(z_cond[2])  # the missing end-loss is left out
    assert got[0] < got[1]  # the cut sample ranks below the clean one, although its loss is fine
    mean = ensemble_scorer("ensemble:cond-prob+end-loss", cal).formula(cond, bare, end)
    assert got[0] < mean[0]
    assert np.isnan(scorer.formula(np.array([np.nan]), np.ones(1), np.array([np.nan])))[0]


def test_end_loss_is_the_nll_of_the_end_token_and_nan_when_truncated(tiny_model_dir):
    import torch

    from fedqc.config import ModelConfig
    from fedqc.data.encoding import encode_all
    from fedqc.data.samples import Sample
    from fedqc.models.likelihood import response_losses
    from fedqc.models.loading import load
    from fedqc.scoring.scorers import get_scorer, score_samples

    loaded = load(ModelConfig(name=str(tiny_model_dir), max_length=64))
    tok, model = loaded.tokenizer, loaded.model
    samples = [
        Sample("a", "Add 2 and 3.", "2 + 3 = 5"),
        Sample("b", "Name a colour.", "Blue is a colour of the sky on a clear day"),
        Sample("c", "Long.", " ".join(["word"] * 200)),
    ]
    enc = encode_all(tok, samples, 64)
    assert [e.truncated for e in enc] == [False, False, True]
    sums, counts, ends = response_losses(model, enc, tok.pad_token_id, batch_tokens=256)
    for i, e in enumerate(enc[:2]):  # batch-size-1 reference: NLL of the last (EOS) token
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -2].float()
        expected = torch.nn.functional.cross_entropy(logits[None], ids[0, -1:]).item()
        assert e.input_ids[-1] == tok.eos_token_id
        assert ends[i] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert np.isnan(ends[2]) and np.isfinite(sums).all()
    scores = score_samples(loaded, samples, get_scorer("end-loss"), 64, 256)
    np.testing.assert_allclose(scores.raw[:2], ends[:2])
    assert np.isnan(scores.raw[2]) and scores.truncated == 1
