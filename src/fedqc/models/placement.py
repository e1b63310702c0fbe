"""Where a model runs and in which dtype: ``model.device`` and ``model.dtype``, resolved once.

``model.device=auto`` picks the first of CUDA, Apple's MPS and the CPU that this process can use.

``model.dtype`` names the dtype of the base model's weights, of scoring and of training. ``auto``
keeps the weights and scoring in float32, so keep decisions are float32's, and trains under
bfloat16 autocast where the device computes bf16 natively (a CUDA GPU with bf16; a CPU with AMX
or AVX512-BF16), float32 elsewhere (a CPU without those units emulates bf16 several times slower
than float32). Scoring the demo in bf16 flipped 4 of 300 keep decisions (docs/hardware.md): more
than the 1% a default may flip, so bf16 scoring is opt-in (``model.dtype=bfloat16``).

The LoRA weights and the optimiser state always stay float32 (PEFT's ``autocast_adapter_dtype``);
training runs forward and backward under :meth:`Placement.autocast`, as PEFT and TRL users train.
The output head, the log-softmax and every per-sample sum are computed in float32
(:func:`fedqc.models.likelihood.response_token_nll`).
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
    """The resolved device, the dtype of the weights and scoring, and training's autocast dtype."""

    device: torch.device
    dtype: torch.dtype
    train_dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return _name(self.dtype)

    def describe(self) -> dict[str, str]:
        """What a run records: ``{"device": "cpu", "dtype": "float32", "train_dtype": ...}``."""
        return {
            "device": str(self.device),
            "dtype": self.dtype_name,
            "train_dtype": _name(self.train_dtype),
        }

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Training's matrix products in ``train_dtype`` (nothing to do in float32)."""
        if self.train_dtype == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.train_dtype):
            yield


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def resolve(device: str, dtype: str) -> Placement:
    """The placement of ``model.device`` and ``model.dtype`` on this machine."""
    where = resolve_device(device)
    if dtype == "auto":
        train = torch.bfloat16 if native_bf16(where) else torch.float32
        return Placement(where, torch.float32, train)
    if dtype not in DTYPES:
        raise FedqcError(f"model.dtype: '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return Placement(where, DTYPES[dtype], DTYPES[dtype])


def model_placement(model: torch.nn.Module) -> Placement:
    """A model's own placement: its embedding weights' device and dtype (training in it too)."""
    weight = model.get_input_embeddings().weight
    return Placement(weight.device, weight.dtype, weight.dtype)
