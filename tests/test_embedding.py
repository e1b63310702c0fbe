"""Sample embeddings from the scoring model's hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedqc.config import ModelConfig
from fedqc.data.samples import Sample
from fedqc.models.embedding import embed_samples, encode_for_embedding
from fedqc.models.loading import load
from fedqc.quality.domains import assign, centroids

TEXTS = [
    Sample("a", "Add two numbers.", "def add(a, b):\n    return a + b"),
    Sample("b", "What is 2 + 3?", "5"),
    Sample("c", "Tell me a long story about a cat. " * 8, "Once upon a time there was a cat."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(ModelConfig(name=str(tiny_model_dir), max_length=64))


def test_embeddings_are_unit_rows_in_input_order(tiny):
    e = embed_samples(tiny, TEXTS, max_length=64)
    assert e.shape == (3, 64) and e.dtype == np.float64
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
    alone = [embed_samples(tiny, [s], max_length=64)[0] for s in TEXTS]
    assert np.allclose(e, np.stack(alone), atol=1e-5)  # padding never enters the pooled mean


def test_pooling_covers_the_prompt_and_response_tokens_without_template(tiny):
    (enc,) = encode_for_embedding(tiny.tokenizer, TEXTS[1:2], 64)
    assert tiny.tokenizer.decode(enc.input_ids) == "What is 2 + 3?\n\n5"
    (cut,) = encode_for_embedding(tiny.tokenizer, TEXTS[2:3], 8)
    assert len(cut.input_ids) == 8 and cut.truncated


def test_layer_picks_the_hidden_state(tiny):
    last = embed_samples(tiny, TEXTS, max_length=64)
    first = embed_samples(tiny, TEXTS, max_length=64, layer=0)  # the token embeddings
    assert not np.allclose(last, first)
    ids = tiny.tokenizer(TEXTS[1].prompt + "\n\n" + TEXTS[1].response, add_special_tokens=False)
    table = tiny.model.get_input_embeddings().weight.detach().double()
    mean = table[torch.tensor(ids["input_ids"])].mean(0).numpy()
    assert np.allclose(first[1], mean / np.linalg.norm(mean), atol=1e-5)


CODE = [
    ("Write a function that reverses a string.", "def reverse(s):\n    return s[::-1]"),
    ("Return the maximum of a list.", "def biggest(xs):\n    return max(xs)"),
    ("Count the vowels in a word.", "def vowels(w):\n    return sum(c in 'aeiou' for c in w)"),
    ("Check whether n is even.", "def is_even(n):\n    return n % 2 == 0"),
    ("Sum the squares up to n.", "def squares(n):\n    return sum(i * i for i in range(n + 1))"),
    ("Join words with commas.", "def join(words):\n    return ', '.join(words)"),
]
MATH = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "6 * 5 = 30\n#### 30"),
    ("Sara had 20 dollars and spent 8. How much is left?", "20 - 8 = 12\n#### 12"),
    ("A train travels 60 miles an hour for 3 hours. How far does it go?", "60 * 3 = 180\n#### 180"),
    ("Ben reads 12 pages a day. How many pages in a week?", "12 * 7 = 84\n#### 84"),
    ("Four friends share 28 cookies equally. How many each?", "28 / 4 = 7\n#### 7"),
]


@pytest.mark.slow
def test_smollm2_embeddings_separate_code_from_word_problems(smollm2_dir):
    torch.set_num_threads(2)
    loaded = load(ModelConfig(name="smollm2-135m", max_length=128))
    samples = [Sample(f"c{i}", p, r) for i, (p, r) in enumerate(CODE)]
    samples += [Sample(f"m{i}", p, r) for i, (p, r) in enumerate(MATH)]
    e = embed_samples(loaded, samples, max_length=128)
    kind = np.array([0] * len(CODE) + [1] * len(MATH))
    anchor = np.array([True, True, False, False, False, False] * 2)  # 2 anchors per kind
    c = centroids(e[anchor], kind[anchor], 2)
    nearest, _ = assign(e[~anchor], c)
    assert (nearest == kind[~anchor]).all()
