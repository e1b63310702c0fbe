"""Corruptions of answers, as in the papers: cut, deletion, exchange, substitute, noise.

Each function takes the answer text and a seeded ``random.Random``; ``exchange`` works on a set of
samples at once (answers are swapped between questions).
"""

from __future__ import annotations

import random
import string

CORRUPTIONS = ("cut", "deletion", "exchange", "substitute", "noise")


def cut(text: str, rng: random.Random) -> str:
    """Truncate the answer to its first 20–60% of words.

    [A] keeps the first 100 tokens; GSM8K answers are mostly shorter than that, so the cut is
    relative, and it always removes the final answer line.
    """
    words = text.split(" ")
    keep = max(1, int(len(words) * rng.uniform(0.2, 0.6)))
    return " ".join(words[:keep])


def deletion(text: str, rng: random.Random, fraction: float = 0.3) -> str:
    """Remove a random ``fraction`` of the words (at least one)."""
    words = text.split(" ")
    n_drop = max(1, int(len(words) * fraction)) if len(words) > 1 else 0
    dropped = set(rng.sample(range(len(words)), n_drop))
    return " ".join(w for i, w in enumerate(words) if i not in dropped)


def substitute(text: str, rng: random.Random, vocabulary: list[str], fraction: float = 0.3) -> str:
    """Replace a random ``fraction`` of the words by random words from ``vocabulary``."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def noise(text: str, rng: random.Random, fraction: float = 0.15) -> str:
    """Insert random characters at random places (``fraction`` × length of them)."""
    chars = list(text)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    for _ in range(max(1, int(len(chars) * fraction))):
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(alphabet))
    return "".join(chars)


def exchange(answers: list[str], rng: random.Random) -> list[str]:
    """Swap answers between questions: a random cyclic shift, so no answer stays in place."""
    if len(answers) < 2:
        raise ValueError("exchange needs at least two answers")
    order = list(range(len(answers)))
    rng.shuffle(order)
    out = list(answers)
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        out[b] = answers[a]
    return out
