"""Where a model runs and in which dtype: ``model.device`` and ``model.dtype``, resolved once.

``auto`` picks the first of CUDA, Apple's MPS and the CPU that this process can use, and bfloat16
where that device computes it natively (a CUDA GPU with bf16; a CPU with AMX or AVX512-BF16),
float32 elsewhere: a CPU without those units emulates bf16 several times slower than float32.

The base model's weights and activations take the dtype; the LoRA weights and the optimiser state
stay float32 (PEFT's ``autocast_adapter_dtype``), and matrix products run under
:meth:`Placement.autocast`, as PEFT and TRL users train. The output head, the log-softmax and
every per-sample sum are computed in float32 (:func:`fedqc.models.likelihood.response_token_nll`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedqc.config import PATTERNS
from fedqc.errors import FedqcError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN, DEVICES = PATTERNS["model.device"]


@dataclass(frozen=True)
class Placement:
    """The resolved device and dtype of one process's model."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str]:
        """What a run records: ``{"device": "cpu", "dtype": "float32"}``."""
        return {"device": str(self.device), "dtype": self.dtype_name}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Matrix products in the model's dtype (nothing to do in float32)."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return False


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise FedqcError(f"model.device: '{name}' is not one of {DEVICES}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FedqcError(
                f"model.device: '{name}' but this machine has no CUDA GPU that torch "
                f"{torch.__version__} can use; set model.device=auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FedqcError(f"model.device: '{name}' but this machine has {count} CUDA GPU(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FedqcError("model.device: 'mps' but Apple's MPS is not available here; use cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where ``device`` runs it natively, else float32; or the named dtype."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise FedqcError(f"model.dtype: '{name}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve(device: str, dtype: str) -> Placement:
    """The placement of ``model.device`` and ``model.dtype`` on this machine."""
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


def model_placement(model: torch.nn.Module) -> Placement:
    """The placement a loaded model was given: its embedding weights' device and dtype."""
    weight = model.get_input_embeddings().weight
    return Placement(weight.device, weight.dtype)
