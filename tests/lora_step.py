"""One LoRA step on a real registry model: it moves the adapter and leaves the base frozen."""

from __future__ import annotations

import numpy as np
import torch

from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample
from fedqc.models.loading import LoadedModel, get_adapter_state
from fedqc.train.local import train_steps


def check_one_lora_step(loaded: LoadedModel, samples: list[Sample], max_length: int) -> None:
    before = get_adapter_state(loaded.model)
    embeddings = loaded.model.get_base_model().get_input_embeddings().weight
    frozen = embeddings.clone()
    encoded = encode_all(loaded.tokenizer, samples, max_length)
    loss = train_steps(
        loaded.model, encoded, loaded.tokenizer.pad_token_id, steps=1, batch_size=2, lr=1e-3
    )
    after = get_adapter_state(loaded.model)
    assert np.isfinite(loss) and loss > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(frozen, loaded.model.get_base_model().get_input_embeddings().weight)
    loaded.reset_adapter()
