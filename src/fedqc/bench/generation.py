"""Greedy answers to held-out questions, for the metrics of :mod:`fedqc.train.answers`."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from fedqc.data.encoding import format_prompt
from fedqc.data.samples import Sample
from fedqc.models.loading import LoadedModel
from fedqc.train.answers import NUMBER

_ANSWERED = re.compile(r"####\s*" + NUMBER + r"\s*\n")  # the final line is complete
GEN_BATCH = 32


class _Answered(StoppingCriteria):
    """Per row: stop once a ``#### N`` line is complete (what follows it is never scored)."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        return torch.tensor([bool(_ANSWERED.search(t)) for t in texts], device=input_ids.device)


@torch.inference_mode()
def generate(loaded: LoadedModel, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
    """Greedy answers to the samples' prompts on the model's current adapter, in input order.

    A row stops at EOS, after its ``#### N`` line, or after ``max_new_tokens``.
    """
    tok, model = loaded.tokenizer, loaded.model
    model.eval()
    prompts = [tok(format_prompt(tok, s.prompt), add_special_tokens=False) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]["input_ids"]))
    out: list[str] = [""] * len(samples)
    for start in range(0, len(order), GEN_BATCH):
        rows = order[start : start + GEN_BATCH]
        width = max(len(prompts[i]["input_ids"]) for i in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every row ends where generation starts
            p = prompts[i]["input_ids"]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        generated = model.generate(
            input_ids=ids.to(loaded.placement.device),
            attention_mask=mask.to(loaded.placement.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_Answered(tok, width)]),
        )
        for r, i in enumerate(rows):
            out[i] = tok.decode(generated[r, width:], skip_special_tokens=True)
    return out
