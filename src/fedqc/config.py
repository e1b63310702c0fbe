"""One typed configuration for a run, with sections.

The CLI (`--config FILE`, `--set key=value`), `flwr run --run-config` and the tests all build it the
same way: from flat dotted keys such as ``quality.scorer`` or ``train.local-steps``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedqc.errors import FedqcError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # registry name, HF hub id or local folder
    max_length: int = 256  # tokens of prompt + response; longer samples are truncated and counted
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,v_proj"
    # auto: CUDA, else MPS, else the CPU; bfloat16 where that device runs it natively, else
    # float32 (fedqc.models.placement). The run records what it used.
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16


@dataclass
class DataConfig:
    federation: str = "gsm8k"  # "gsm8k" builds the demo federation; "" uses the paths below
    clients_dir: str = ""  # folder with client-0.jsonl, client-1.jsonl, ... (or .csv, .parquet)
    anchors: str = ""  # trusted anchor samples (server side only)
    eval: str = ""  # held-out evaluation samples (server side only)
    num_clients: int = 4
    samples_per_client: int = 75
    num_anchors: int = 10
    num_eval: int = 40
    contamination: str = "0.1,0.3,0.5,0.7"  # demo: corrupted share per client
    seed: int = 0


@dataclass
class QualityConfig:
    # The best default measured in `fedqc bench` (docs/choosing.md): a sample must look like the
    # anchors on ℓ(r|q), on IFD and on its end-of-sequence NLL, scored with 2 anchors in context
    # (shots, below), and τ is the anchors' one-sided 90% normal prediction bound. Over 40 random
    # draws of 10 anchors its mean F1 was ≥ 0.90 at 20, 50 and 80% contamination on the demo-sized
    # pool; anchor-conformal:0.1 (distribution-free) averaged 0.88 at 80%.
    # The papers' rule is quality.scorer=ppl with quality.rule=anchor-mean and quality.shots=0.
    scorer: str = "ensemble-min:cond-prob+ifd+end-loss"
    rule: str = "anchor-gaussian:0.1"
    batch_tokens: int = 4096  # token budget of one scoring batch
    # Gradient scorers (tracin, tracin-cos, clues, datainf): the budget of one forward+backward
    # batch. A backward pass keeps every layer's activations: about 1.6 GiB per 1024 tokens on
    # SmolLM2-135M, and larger batches are no faster on CPU.
    backward_batch_tokens: int = 1024
    allow_empty: bool = False  # go on (without training) when τ drops every sample
    dp_epsilon: float = 0.0  # > 0: Laplace(1/ε) noise on every count a client reports
    # Phase 1's counts and histogram reach the server only as sums over clients (SecAgg on the
    # complete graph, cost n², fedqc.federation.secure_sum). Phase 2 and warm-up replies still
    # carry each client's kept count / total and adapter: docs/privacy.md, "What the server learns".
    secure_sum: bool = False
    warmup_rounds: int = 2  # checkpoint scorers (tracin, clues, ...): federated warm-up rounds
    # Forward scorers: the first `shots` anchors that fit whole in model.max-length are shown in
    # context before every scored sample, so the model knows the answer format
    # (fedqc.scoring.shots); 0, or a run without anchors, scores zero-shot.
    shots: int = 2
    # FedDQC's easy→hard training (fedqc.quality.curriculum): "off", or "stages:K" (the kept
    # samples in K stages of the rounds, best first, re-scored by the global adapter at each
    # stage), or "stages:K:once" (ranked by the quality round's scores)
    curriculum: str = "off"
    # The model that scores (the server's anchors and every client's samples): empty for
    # model.name, or another registry name, hub id or folder, e.g. a stronger judge than the
    # model being fine-tuned (Superfiltering's proxy scorer). A separate scoring model scores
    # with its base weights: the global adapter belongs to the trained model.
    model: str = ""


@dataclass
class TrainConfig:
    rounds: int = 3
    local_steps: int = 5
    batch_size: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: str = "constant"  # or "cosine": lr → lr/10 over the rounds (by absolute round)
    dp_mode: str = "off"  # DP-FedAvg: "server" or "client" clipping (Flower's DP wrappers)
    dp_noise_multiplier: float = 1.0  # Gaussian noise std = multiplier × clipping norm / clients
    dp_clipping_norm: float = 1.0  # L2 bound on one client's adapter update per round
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    # Flower's strategy (fedqc.federation.strategy): fedavg, fedprox:MU, fedavgm:MOMENTUM,
    # fedadam[:ETA], fedyogi[:ETA], fedadagrad[:ETA], or the robust fedmedian,
    # fedtrimmedavg:BETA (0 ≤ BETA < 0.5), krum:F (F clients assumed malicious)
    strategy: str = "fedavg"
    # How the clients' adapters are combined: mean (the strategy's own: FedAvg's weighted mean),
    # or merged as task vectors: merge:ties:DENSITY, merge:dare-ties:DENSITY,
    # merge:task-arithmetic (fedqc.train.merge)
    aggregation: str = "mean"


@dataclass
class FederationConfig:
    min_nodes: int = 1  # fewest nodes that must answer a round; fewer stops the run (resumable)
    join_timeout: float = 600.0  # at start: wait this long for all data.num-clients nodes
    timeout: float = 3600.0  # seconds to wait for replies in one round
    client_cpus: int = 1  # simulation: CPUs per ClientApp
    client_gpus: float = 0.0  # simulation: share of a GPU per ClientApp (Ray resources)
    fraction_evaluate: float = 0.0  # share of clients that also evaluate the global adapter locally


@dataclass
class OutputConfig:
    run_dir: str = ""  # empty: runs/<timestamp>
    resume: bool = False  # continue the run in run-dir from its last checkpoint
    force: bool = False  # write over a previous run's outputs in run-dir


# Keys with a fixed set of values, keys with a lower bound, and keys that must be positive.
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "train.lr-schedule": ("constant", "cosine"),
    "train.dp-mode": ("off", "server", "client"),
}
AT_LEAST = {
    "quality.dp-epsilon": 0.0,
    "quality.warmup-rounds": 1,
    "quality.shots": 0,
    "train.rounds": 0,
    "train.dp-noise-multiplier": 0.0,
    "federation.min-nodes": 1,
    "federation.client-gpus": 0.0,
}
POSITIVE = {"train.dp-clipping-norm"}
# Keys whose value must match a pattern: (regular expression, what to write instead).
_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"  # ≥ 0
_BELOW_ONE, _BELOW_HALF = r"(0|0?\.\d+)", r"(0|0?\.[0-4]\d*)"
PATTERNS = {
    "model.device": (r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps"),
    "train.strategy": (
        rf"fedavg|fedprox:{_NUMBER}|fedavgm:{_BELOW_ONE}|(fedadam|fedyogi|fedadagrad)(:{_NUMBER})?"
        rf"|fedmedian|fedtrimmedavg:{_BELOW_HALF}|krum:\d+",
        "fedavg, fedprox:MU (MU ≥ 0), fedavgm:MOMENTUM (0 ≤ MOMENTUM < 1), fedadam[:ETA], "
        "fedyogi[:ETA], fedadagrad[:ETA], fedmedian, fedtrimmedavg:BETA (0 ≤ BETA < 0.5) or "
        "krum:F (F = 0, 1, 2, ...)",
    ),
    "quality.curriculum": (r"off|stages:[1-9]\d*(:once)?", "off, stages:K or stages:K:once"),
    "train.aggregation": (
        r"mean|merge:task-arithmetic|merge:(ties|dare-ties):(0?\.\d*[1-9]\d*|1(\.0*)?)",
        "mean, merge:ties:DENSITY, merge:dare-ties:DENSITY (0 < DENSITY ≤ 1) or "
        "merge:task-arithmetic",
    ),
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def scoring_model(self) -> ModelConfig:
        """The model settings that score: model.* with quality.model's name when it is set."""
        return dataclasses.replace(self.model, name=self.quality.model or self.model.name)

    @property
    def separate_scorer(self) -> bool:
        """Whether a model other than the trained one scores (quality.model)."""
        return self.scoring_model().name != self.model.name

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys with dashes (``train.local-steps``), as Flower's run config uses them."""
        flat = {}
        for section in fields(self):
            for f in fields(getattr(self, section.name)):
                key = f"{section.name}.{f.name.replace('_', '-')}"
                flat[key] = getattr(getattr(self, section.name), f.name)
        return flat

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        for key, value in values.items():
            cfg.set(key, value, source)
        return cfg

    def set(self, key: str, value: Any, source: str = "config") -> None:
        """Set one dotted key, converting the value to the field's type."""
        section_name, _, name = key.partition(".")
        section = getattr(self, section_name, None)
        attr = name.replace("-", "_")
        if not dataclasses.is_dataclass(section) or attr not in {f.name for f in fields(section)}:
            known = ", ".join(self.to_flat())
            raise FedqcError(f"{source}: unknown config key '{key}'. Known keys: {known}")
        default = getattr(type(section)(), attr)
        value = _coerce(value, type(default), key, source)
        flat_key = f"{section_name}.{attr.replace('_', '-')}"
        if flat_key in CHOICES and value not in CHOICES[flat_key]:
            raise FedqcError(
                f"{source}: '{key}' must be one of {', '.join(CHOICES[flat_key])}, got {value!r}"
            )
        if flat_key in PATTERNS and not re.fullmatch(PATTERNS[flat_key][0], value):
            raise FedqcError(
                f"{source}: '{key}' must be one of {PATTERNS[flat_key][1]}, got {value!r}"
            )
        if flat_key in AT_LEAST and not value >= AT_LEAST[flat_key]:
            raise FedqcError(f"{source}: '{key}' must be ≥ {AT_LEAST[flat_key]}, got {value!r}")
        if flat_key in POSITIVE and not value > 0:
            raise FedqcError(f"{source}: '{key}' must be > 0, got {value!r}")
        setattr(section, attr, value)

    def replace(self, **flat: Any) -> Config:
        """A copy with some dotted keys changed (keys use '.' and '-' like to_flat())."""
        return Config.from_flat({**self.to_flat(), **flat})

    def to_toml(self, comments: dict[str, str] | None = None) -> str:
        """The config as TOML; ``comments`` puts a comment after some dotted keys' lines."""
        lines = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            for f in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                key = f.name.replace("_", "-")
                note = (comments or {}).get(f"{section.name}.{key}")
                lines.append(f"{key} = {_toml_value(value)}" + (f"  # {note}" if note else ""))
            lines.append("")
        return "\n".join(lines)


def toml_settings(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Each ``section.key`` and its value in a TOML file of [sections], in file order."""
    path = Path(path)
    if not path.is_file():
        raise FedqcError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedqcError(f"{path}: not valid TOML ({exc})") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise FedqcError(f"{path}: '{section}' must be a [section] of keys")
        for key, value in values.items():
            yield f"{section}.{key}", value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a TOML file with [sections], then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        for key, value in toml_settings(path):
            cfg.set(key, value, str(Path(path)))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedqcError(f"--set {item!r}: expected key=value, e.g. --set quality.scorer=ifd")
        cfg.set(key.strip(), value.strip(), "--set")
    return cfg


def _coerce(value: Any, kind: type, key: str, source: str) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0"}:
                    raise ValueError(value)
                return value.lower() in {"true", "1"}
            return bool(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise FedqcError(
            f"{source}: '{key}' must be of type {kind.__name__}, got {value!r}"
        ) from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML
