"""The registry's Gemma-3-270M (multilingual, pretrained): from pinned PyPI chunk wheels,
converted once; it reads other languages, scores sensibly and takes a LoRA step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_step import check_one_lora_step

from fedqc.config import ModelConfig
from fedqc.data.encoding import encode
from fedqc.data.samples import Sample
from fedqc.files import cache_dir
from fedqc.models.assets import GEMMA3
from fedqc.models.loading import load
from fedqc.scoring.scorers import SCORERS, score_samples

# Opt-in (`pytest -m gemma`): the first run downloads 253 MB of wheels and converts them for
# about 7 minutes, which would double the default suite's time.
pytestmark = [pytest.mark.slow, pytest.mark.gemma]

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"
FRAGE = "Tom hat 3 Äpfel und kauft 2 dazu. Wie viele Äpfel hat er?"
SAMPLES = [
    Sample("clean", QUESTION, "Tom has 3 + 2 = 5 apples.\n#### 5"),
    Sample("exchange", QUESTION, "The train leaves at 9 and the trip takes 4 hours.\n#### 13"),
    Sample("noise", QUESTION, "T%om h#as 3 +q 2 =] 5 ap!ples.\n##Z## 5"),
    Sample("sauber", FRAGE, "Tom hat 3 + 2 = 5 Äpfel.\n#### 5"),
    Sample("rauschen", FRAGE, "T%om h#at 3 +q 2 =] 5 Äp!fel.\n##Z## 5"),
]


@pytest.fixture(scope="module")
def gemma():
    torch.set_num_threads(2)
    return load(ModelConfig(name="gemma3-270m", max_length=128))


def test_converted_once_from_the_pinned_wheels(gemma):
    folder = cache_dir() / "models" / GEMMA3.name
    pins = (folder / ".fedqc-complete").read_text().split()
    assert pins == [w.requirement for w in GEMMA3.wheels] + [GEMMA3.gguf_sha256]
    assert type(gemma.model.get_base_model()).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in gemma.model.parameters()) > 260_000_000
    trainable = sum(p.numel() for p in gemma.model.parameters() if p.requires_grad)
    assert trainable == 18 * 8 * ((640 + 4 * 256) + (640 + 256))  # LoRA r=8 on q_proj, v_proj


def test_every_prompt_starts_with_bos(gemma):
    tok = gemma.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    for bare in (False, True):  # Gemma's loss is far higher without it
        encoded = encode(tok, SAMPLES[0], 128, bare=bare)
        assert encoded.input_ids[0] == tok.bos_token_id
        assert encoded.input_ids[-1] == tok.eos_token_id


@torch.inference_mode()
def test_continues_german_and_french_sensibly(gemma):
    tok, model = gemma.tokenizer, gemma.model
    for text, expected in (
        ("Montag, Dienstag, Mittwoch,", "Donnerstag"),
        ("lundi, mardi, mercredi,", "jeudi"),
    ):
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert expected in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_perplexity_ranks_clean_above_corrupted_in_two_languages(gemma):
    raw = score_samples(gemma, SAMPLES, SCORERS["ppl"], max_length=128).raw
    clean, exchanged, noisy, sauber, rauschen = raw
    assert np.isfinite(raw).all()
    assert clean < exchanged and clean < noisy and sauber < rauschen


def test_one_lora_step_moves_only_the_adapter(gemma):
    check_one_lora_step(gemma, [SAMPLES[0], SAMPLES[3]], 128)
