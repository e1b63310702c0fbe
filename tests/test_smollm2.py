"""The real SmolLM2-135M-Instruct: loads offline, scores sensibly, takes a LoRA step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_step import check_one_lora_step

from fedqc.config import ModelConfig
from fedqc.data.samples import Sample
from fedqc.models.loading import load
from fedqc.scoring.scorers import SCORERS, score_samples

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"
SAMPLES = [
    Sample("clean", QUESTION, "Tom has 3 + 2 = 5 apples.\n#### 5"),
    Sample("exchange", QUESTION, "The train leaves at 9 and the trip takes 4 hours.\n#### 13"),
    Sample("noise", QUESTION, "T%om h#as 3 +q 2 =] 5 ap!ples.\n##Z## 5"),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    torch.set_num_threads(2)
    return load(ModelConfig(name="smollm2-135m", max_length=128))


def test_loads_with_chat_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert sum(p.numel() for p in smollm2.model.parameters()) > 130_000_000
    trainable = sum(p.numel() for p in smollm2.model.parameters() if p.requires_grad)
    assert trainable == 460_800  # LoRA r=8 on q_proj and v_proj, 30 layers


def test_perplexity_ranks_clean_above_corrupted(smollm2):
    scores = score_samples(smollm2, SAMPLES, SCORERS["ppl"], max_length=128)
    clean, exchanged, noisy = scores.raw
    assert np.isfinite(scores.raw).all()
    assert clean < exchanged and clean < noisy
    ira = score_samples(smollm2, SAMPLES, SCORERS["ira"], max_length=128).raw
    assert ira[0] > ira[1]  # the question explains the clean answer better than a swapped one


def test_one_lora_step_moves_only_the_adapter(smollm2):
    check_one_lora_step(smollm2, SAMPLES[:1] * 2, 128)
