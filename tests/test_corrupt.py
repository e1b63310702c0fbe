"""Answer corruptions: each changes the text the way its name says."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedqc.data.corrupt import cut, deletion, exchange, noise, substitute

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
WORDS = " ".join(f"w{i}" for i in range(20))
VOCAB = ["apple", "banana", "cherry", "delta"]
SEEDS = range(25)


def _is_subsequence(small, big) -> bool:
    it = iter(big)
    return all(x in it for x in small)


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_keeps_a_shorter_prefix_without_the_final_answer(seed):
    out = cut(GSM8K_ANSWER, random.Random(seed))
    assert len(out.split(" ")) < len(GSM8K_ANSWER.split(" "))
    assert GSM8K_ANSWER.startswith(out)
    assert "####" not in out
    assert out


@pytest.mark.parametrize("seed", SEEDS)
def test_deletion_drops_30_percent_keeping_order(seed):
    out = deletion(WORDS, random.Random(seed)).split(" ")
    assert len(out) == 20 - 6
    assert len(set(out)) == len(out)
    assert _is_subsequence(out, WORDS.split(" "))


def test_deletion_drops_at_least_one_word():
    assert deletion("one two", random.Random(0)) in {"one", "two"}


@pytest.mark.parametrize("seed", SEEDS)
def test_substitute_replaces_words_from_the_vocabulary(seed):
    out = substitute(WORDS, random.Random(seed), VOCAB).split(" ")
    original = WORDS.split(" ")
    assert len(out) == len(original)
    changed = [i for i, (a, b) in enumerate(zip(original, out, strict=True)) if a != b]
    assert len(changed) == 6
    assert all(out[i] in VOCAB for i in changed)


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_inserts_characters(seed):
    out = noise(GSM8K_ANSWER, random.Random(seed))
    assert len(out) == len(GSM8K_ANSWER) + int(len(GSM8K_ANSWER) * 0.15)
    assert _is_subsequence(GSM8K_ANSWER, out)
    assert out != GSM8K_ANSWER


@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("seed", range(10))
def test_exchange_moves_every_answer(n, seed):
    answers = [f"answer {i}" for i in range(n)]
    out = exchange(answers, random.Random(seed))
    assert all(a != b for a, b in zip(answers, out, strict=True))
    assert Counter(out) == Counter(answers)
    assert answers == [f"answer {i}" for i in range(n)]  # input untouched


@pytest.mark.parametrize("answers", [[], ["only one"]])
def test_exchange_needs_two_answers(answers):
    with pytest.raises(ValueError):
        exchange(answers, random.Random(0))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda rng: cut(GSM8K_ANSWER, rng),
        lambda rng: deletion(WORDS, rng),
        lambda rng: substitute(WORDS, rng, VOCAB),
        lambda rng: noise(GSM8K_ANSWER, rng),
        lambda rng: exchange(WORDS.split(" "), rng),
    ],
)
def test_same_seed_same_result(corrupt):
    assert corrupt(random.Random(7)) == corrupt(random.Random(7))
    results = {str(corrupt(random.Random(seed))) for seed in range(10)}
    assert len(results) > 1
