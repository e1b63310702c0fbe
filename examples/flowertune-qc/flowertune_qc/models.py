"""The model: a causal LM with a LoRA adapter, its weights in and out, and local training."""

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedqc.models.loading import resolve  # an offline registry name, a folder or a hub id


def get_model(cfg: dict):
    """(model with a fresh LoRA adapter, tokenizer); every process starts from the same one."""
    path = resolve(cfg["name"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    lora = LoraConfig(
        r=cfg["lora"]["r"],
        lora_alpha=cfg["lora"]["alpha"],
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora), tokenizer


def get_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}


def set_weights(model, state: dict[str, torch.Tensor]) -> None:
    set_peft_model_state_dict(model, state)


def train(model, tokenizer, texts: list[str], cfg: dict, max_length: int, seed: int) -> float:
    """``max-steps`` AdamW steps on batches drawn from ``texts``; the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["learning-rate"]
    )
    model.train()
    losses = []
    for _ in range(cfg["max-steps"]):
        rows = torch.randperm(len(texts), generator=generator)[: cfg["batch-size"]].tolist()
        batch = tokenizer(
            [texts[i] for i in rows],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)
