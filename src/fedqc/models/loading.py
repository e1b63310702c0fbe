"""Resolve a model name, load it once per process, attach LoRA, move adapter state in and out."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedqc.config import ModelConfig
from fedqc.errors import FedqcError
from fedqc.models import assets
from fedqc.models.placement import Placement
from fedqc.models.placement import resolve as resolve_placement

log = logging.getLogger(__name__)

# Registry names that install without hub access (fedqc.models.assets).
REGISTRY = {name: partial(assets.model_folder, spec) for name, spec in assets.MODELS.items()}


def resolve(name: str) -> str:
    """A registry name, a local folder, or a Hugging Face hub id (needs internet)."""
    if name in REGISTRY:
        return str(REGISTRY[name]())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise FedqcError(f"model '{name}': not a folder with a Hugging Face model")
    return name


@dataclass
class LoadedModel:
    """The one base model of a process with its LoRA adapter attached, and where it runs."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    initial_adapter: dict[str, torch.Tensor]
    placement: Placement

    def reset_adapter(self) -> None:
        set_adapter_state(self.model, self.initial_adapter)


def load(cfg: ModelConfig) -> LoadedModel:
    """Load (or reuse) this process's model; the adapter is reset to its seeded initial state."""
    placement = resolve_placement(cfg.device, cfg.dtype)
    loaded = _load_cached(
        cfg.name, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, placement
    )
    loaded.reset_adapter()
    return loaded


@lru_cache(maxsize=2)  # the trained model, and a separate scoring model (quality.model)
def _load_cached(
    name: str, r: int, alpha: int, dropout: float, targets: str, placement: Placement
) -> LoadedModel:
    path = resolve(name)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0]
        raise FedqcError(
            f"model '{name}': cannot load it ({first}). Use {' or '.join(map(repr, REGISTRY))}, "
            "a local folder, or a hub id with internet access."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)  # the same initial adapter in every process: FedAvg starts from it
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads a deprecated HF attribute
            # The LoRA weights stay float32 whatever the base dtype (autocast_adapter_dtype).
            model = get_peft_model(base, lora, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise FedqcError(f"model '{name}': LoRA targets '{targets}' do not fit ({exc})") from None
    model.to(placement.device)
    model.eval()
    return LoadedModel(model, tokenizer, get_adapter_state(model), placement)


def get_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA weights as float32 CPU tensors, ready for a Flower ArrayRecord."""
    return {
        k: v.detach().to(torch.float32).cpu().clone()
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys this model lacks: {unexpected[:3]}")
