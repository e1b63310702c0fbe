"""Prompt format and tokenisation with response-only labels, plus length-bucketed batching.

Prompt and response are tokenised separately and concatenated, so the response tokens are the same
in the conditioned pass (prompt + response) and the bare pass (empty instruction + response).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedqc.data.samples import Sample

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sequence; positions from ``n_prompt`` on are response tokens."""

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The model's chat template as a one-turn user message, else a plain instruction template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(instruction=instruction)


def encode(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, max_length: int, bare: bool = False
) -> Encoded:
    """Prompt + response + EOS, at most ``max_length`` tokens.

    ``bare`` puts an empty instruction in front of the same (equally truncated) response tokens,
    for ℓ(r): both passes then score identical response tokens.
    """
    prompt = _ids(tokenizer, format_prompt(tokenizer, sample.prompt))
    response = _ids(tokenizer, sample.response)
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        max_prompt = max_length // 2  # a long prompt keeps its tail, which holds the turn header
        if len(prompt) > max_prompt and len(prompt) + min(len(response), max_prompt) > max_length:
            prompt = prompt[-max(max_length - len(response), max_prompt) :]
        response = response[: max_length - len(prompt)]
    if bare:
        prompt = _ids(tokenizer, format_prompt(tokenizer, ""))
    return Encoded(tuple(prompt + response), len(prompt), truncated)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_all(
    tokenizer, samples: list[Sample], max_length: int, bare: bool = False
) -> list[Encoded]:
    return [encode(tokenizer, s, max_length, bare) for s in samples]


@dataclass
class Batch:
    indices: list[int]  # positions of these rows in the encoded list
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 outside the response

    def to(self, device: torch.device) -> Batch:
        """The same batch with its tensors on ``device``."""
        if self.input_ids.device == device:
            return self
        ids, mask, labels = (
            t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)
        )
        return Batch(self.indices, ids, mask, labels)


def collate(items: list[Encoded], indices: list[int], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, e.n_prompt : n] = ids[row, e.n_prompt : n]
    return Batch(indices, ids, mask, labels)


def token_budget_batches(
    encoded: list[Encoded],
    batch_tokens: int,
    pad_id: int,
    indices: Sequence[int] | None = None,
    prefix_len: int = 0,
) -> Iterator[Batch]:
    """Length-sorted batches whose padded size (rows × (prefix + longest row)) stays within the
    budget; ``indices``: only these samples (default: all)."""
    rows = range(len(encoded)) if indices is None else indices
    order = sorted(rows, key=lambda i: len(encoded[i].input_ids))
    current: list[int] = []
    for i in order:
        width = prefix_len + len(encoded[i].input_ids)  # sorted: the newest row is the longest
        if current and width * (len(current) + 1) > batch_tokens:
            yield collate([encoded[j] for j in current], current, pad_id)
            current = []
        current.append(i)
    if current:
        yield collate([encoded[j] for j in current], current, pad_id)
