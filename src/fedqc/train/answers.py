"""Metrics of generated answers against GSM8K-style references that end with ``#### N``.

- ``answer_format``: the answer's last non-blank line is ``#### N`` (a number, optionally after a
  ``$``, and nothing else): the format the model was trained to end with.
- ``exact_match``: the number after the answer's last ``####`` equals the reference's
  (commas, a leading ``$`` and trailing zeros ignored; no number counts as wrong).
- ``rouge_l``: ROUGE-L F-measure of the whole answer against the whole reference, from Google's
  ``rouge-score`` package (its default tokenizer: lower-cased ASCII letters and digits, no
  stemming; text in other scripts is dropped by it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from rouge_score import rouge_scorer

NUMBER = r"\$?\s*(-?[\d,]*\.?\d+)"  # after "####": the answer, in group 1
_FINAL = re.compile(r"####\s*" + NUMBER)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def final_number(text: str) -> Decimal | None:
    """The number after the last ``####`` (commas, a leading ``$`` and trailing zeros ignored)."""
    found = _FINAL.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def has_final_line(text: str) -> bool:
    """Whether the last non-blank line is ``#### N`` and nothing else."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and _FINAL.fullmatch(lines[-1].strip()) is not None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer against its reference (0 when either has no tokens)."""
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Shares over the answers: ``exact_match``, ``answer_format`` and mean ``rouge_l``."""
    if len(predictions) != len(references):
        raise ValueError("one prediction per reference")
    if not predictions:
        return {"exact_match": float("nan"), "answer_format": float("nan"), "rouge_l": float("nan")}
    pairs = list(zip(predictions, references, strict=True))
    hits = sum(final_number(p) is not None and final_number(p) == final_number(r) for p, r in pairs)
    return {
        "exact_match": hits / len(pairs),
        "answer_format": sum(has_final_line(p) for p in predictions) / len(pairs),
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
    }
