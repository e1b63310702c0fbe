"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and the demo federation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedqc.data.demo import write_demo
from fedqc.models.assets import smollm2_folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the fedqc cache."""
    return smollm2_folder()


def save_tiny_llama(out: Path, smollm2_dir: Path, hidden_size: int = 64, seed: int = 0) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved to ``out``."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,  # room for few-shot demonstrations
            tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


def tiny_effect_settings(model_dir: Path) -> list[str]:
    """--set items of a tiny effect-shaped bench run: 2 clients × 6 samples, half corrupted, one
    round of one step, 2 held-out questions of 4 new tokens, ppl with anchor-mean only."""
    return [
        f"model.name={model_dir}",
        "model.max-length=96",
        "data.num-clients=2",
        "data.samples-per-client=6",
        "data.num-anchors=3",
        "data.num-eval=2",
        "data.contamination=0.5",
        "train.rounds=1",
        "train.local-steps=1",
        "train.batch-size=2",
        "bench.scorers=ppl",
        "bench.rules=anchor-mean",
        "bench.anchor-sweep=3",
        "bench.anchor-repeats=1",
        "bench.contamination-sweep=0.5",
        "bench.em-questions=2",
        "bench.max-new-tokens=4",
    ]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo federation: 2 clients of 12 samples, 4 anchors, 6 eval samples."""
    out = tmp_path_factory.mktemp("demo")
    write_demo(
        out,
        num_clients=2,
        samples_per_client=12,
        num_anchors=4,
        num_eval=6,
        contamination="0.25,0.5",
        seed=1,
    )
    return out
