"""The quality filter: fit a plan on trusted anchors, apply it to samples (scikit-learn's shape).

    quality = QualityFilter(scorer="ppl", rule="anchor-mean", shots=0)
    plan = quality.fit("anchors.jsonl")            # τ, calibration, demonstrations, the promise
    plan.save("threshold.json")                    # the plan file of `fedqc threshold` and a run
    selection = QualityPlan.load("threshold.json").apply("client-0.jsonl")
    selection.keep, selection.counts(), selection.subset(dataset)

:meth:`QualityFilter.fit` is the server's side (the anchors stay there), :meth:`QualityPlan.apply`
a client's (its samples stay there). τ lives in the plan once, on the oriented scale (higher is
better); ``tau_raw`` is derived. `fedqc threshold`, `fedqc score --plan`, `fedqc filter --plan`
and :mod:`fedqc.flower` decide with this code, on the functions `fedqc run`'s server and clients
call (``plan_from_anchors``, ``score_samples``, ``select``), so they decide alike
(tests/test_filter.py).

Forward scorers only: the checkpoint scorers (tracin, clues, ...) score at the warm-up checkpoints
of a federated run, which `fedqc run` makes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedqc.config import Config, ModelConfig, QualityConfig
from fedqc.data.samples import Sample, _schema_of, _to_sample, load_samples
from fedqc.errors import FedqcError
from fedqc.models.loading import LoadedModel, load
from fedqc.quality.plan import (
    AnchorPlan,
    plan_from_anchors,
    plan_from_scores,
    plan_record,
    plan_shots,
    write_json,
)
from fedqc.quality.rules import Rule, parse_rule
from fedqc.quality.selection import Selection as Decisions
from fedqc.quality.selection import select
from fedqc.scoring.ensemble import is_ensemble
from fedqc.scoring.scorers import (
    CheckpointScorer,
    Scorer,
    Scores,
    any_scorer,
    get_scorer,
    is_checkpoint_scorer,
    score_samples,
)

MODEL, QUALITY = ModelConfig(), QualityConfig()
# Samples: a data file (any format `fedqc score` reads), or rows: Samples, dicts in a known schema
# (an HF datasets.Dataset yields those), (prompt, response) pairs, or anything ``to_sample`` maps.
Data = str | Path | Iterable[Any]
ToSample = Callable[[Any], Sample | tuple[str, str]]
# The model that scores: a registry name, folder or hub id, its settings, or one already loaded.
Model = str | ModelConfig | LoadedModel | None
# threshold.json's keys that a QualityPlan holds; it keeps the others (placement, ...) as read.
PLAN_KEYS = {
    *("scorer", "direction", "rule", "shots", "guarantee", "tau", "tau_raw", "anchor_scores"),
    *("anchors_truncated", "calibration", "prefix", "model", "max_length", "batch_tokens"),
}


def as_samples(data: Data, to_sample: ToSample | None = None) -> list[Sample]:
    """``data`` as fedqc samples, in order; a row without an ``id`` gets its position."""
    if isinstance(data, str | Path):
        return load_samples(data)
    samples = []
    for i, row in enumerate(data):
        value = to_sample(row) if to_sample is not None else row
        if isinstance(value, Sample):
            samples.append(value)
        elif isinstance(value, Mapping):
            record, where = dict(value), f"row {i}"
            samples.append(_to_sample(record, _schema_of(record, where), str(i), where))
        elif (
            isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)
        ):
            samples.append(Sample(str(i), *value))
        else:
            raise FedqcError(
                f"row {i}: a {type(value).__name__} is not a sample; give dicts with "
                "'prompt'+'response' (or another known schema), or to_sample=ROW -> (prompt, "
                "response)"
            )
    return samples


@dataclass
class Selection(Decisions):
    """A plan applied to samples: the keep decision and raw score (scorer's units) per sample."""

    raw: np.ndarray
    truncated: int  # samples cut to the plan's max-length (scored on what was kept)

    @property
    def total(self) -> int:
        return len(self.keep)

    def counts(self) -> dict[str, int]:
        """The counts, and nothing per sample: all of a selection that may leave a client."""
        return {
            "total": self.total,
            "kept": self.kept,
            "rejected_below_threshold": self.rejected_below_threshold,
            "rejected_non_finite": self.rejected_non_finite,
            "truncated": self.truncated,
        }

    def subset(self, dataset):
        """The kept rows of ``dataset``, the rows scored: ``dataset.select`` for an HF Dataset,
        else a list."""
        return subset(dataset, self.keep)


def subset(dataset, keep: np.ndarray):
    """The rows of ``dataset`` where ``keep`` is true, in order (one decision per row)."""
    if len(dataset) != len(keep):
        raise FedqcError(
            f"the dataset has {len(dataset)} rows, the selection {len(keep)}: apply the plan to "
            "this dataset"
        )
    indices = np.flatnonzero(keep).tolist()
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]


@dataclass(frozen=True)
class QualityPlan:
    """What :meth:`QualityFilter.fit` learned from the anchors; threshold.json is its file."""

    scorer: Scorer | CheckpointScorer  # an ensemble comes calibrated on the anchors
    rule: Rule
    tau: float | None  # oriented: keep score ≥ τ; None: drop-fraction (each client its own)
    guarantee: str  # what τ promises about clean samples, and under which assumption
    shots: int = 0
    prefix: tuple[int, ...] = ()  # the demonstrations' token ids, in front of every sample
    anchor_scores: tuple[float | None, ...] | None = None  # raw; None: unscored
    anchors_truncated: int | None = None
    model: str | None = None  # the scoring model's name (None: a plan of a fixed τ)
    max_length: int | None = None
    batch_tokens: int = QUALITY.batch_tokens
    extra: dict = field(default_factory=dict, compare=False)  # the file's other fields

    @property
    def tau_raw(self) -> float | None:
        """τ in the scorer's units (what `fedqc threshold` prints)."""
        return None if self.tau is None else self.scorer.raw(self.tau)

    @property
    def calibration(self) -> list[float] | None:
        return getattr(self.scorer, "calibration", None)

    @classmethod
    def of(
        cls,
        plan: AnchorPlan,
        model: str | None = None,
        max_length: int | None = None,
        batch_tokens: int = QUALITY.batch_tokens,
        **extra,
    ) -> QualityPlan:
        """The plan of :func:`fedqc.quality.plan.plan_from_anchors` (the run's server's)."""
        a = plan.anchor_scores
        edges = {"edges": plan.edges} if plan.edges is not None else {}
        return cls(
            plan.scorer,
            plan.rule,
            plan.tau,
            plan.guarantee,
            plan.shots,
            tuple(plan.prefix),
            None if a is None else tuple(_finite(x) for x in a.raw.tolist()),
            None if a is None else a.truncated,
            model,
            max_length,
            batch_tokens,
            edges | extra,
        )

    @classmethod
    def fixed(cls, scorer: str, tau_raw: float) -> QualityPlan:
        """The plan of a τ given in the scorer's units (`fedqc filter --threshold`)."""
        return cls.of(plan_from_scores(any_scorer(scorer), parse_rule(f"fixed:{tau_raw!r}"), None))

    def record(self) -> dict:
        """threshold.json, as `fedqc run` and `fedqc threshold --out` write it."""
        return (
            plan_record(
                self.scorer,
                self.rule,
                self.shots,
                self.prefix,
                self.tau,
                self.guarantee,
                self.anchor_scores,
                self.anchors_truncated,
            )
            | {
                "model": self.model,
                "max_length": self.max_length,
                "batch_tokens": self.batch_tokens,
            }
            | self.extra
        )

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.record())

    @classmethod
    def load(cls, path: str | Path) -> QualityPlan:
        """The plan in ``path``: a threshold.json of `fedqc run` or `fedqc threshold --out`."""
        try:
            data = json.loads(Path(path).read_text())
            name, calibration = str(data["scorer"]), data.get("calibration")
            scorer = (
                get_scorer(name, [float(x) for x in calibration])
                if is_ensemble(name) and calibration
                else any_scorer(name)
            )
            tau = _tau(data, scorer)
            anchors = data.get("anchor_scores")
            plan = cls(
                scorer,
                parse_rule(str(data["rule"])),
                tau,
                str(data.get("guarantee", "")),
                int(data.get("shots", 0)),
                tuple(int(t) for t in data.get("prefix", [])),
                None if anchors is None else tuple(_finite(x) for x in anchors),
                _int_or_none(data.get("anchors_truncated")),
                None if data.get("model") is None else str(data["model"]),
                _int_or_none(data.get("max_length")),
                int(data.get("batch_tokens", QUALITY.batch_tokens)),
                {k: v for k, v in data.items() if k not in PLAN_KEYS},
            )
        except FileNotFoundError:
            raise FedqcError(
                f"{path}: file not found (a threshold.json: fedqc threshold --out)"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FedqcError(
                f"{path}: not a threshold.json plan ({exc.__class__.__name__}: {exc}); write one "
                "with fedqc threshold --out threshold.json"
            ) from None
        if plan.shots and not plan.prefix:
            raise FedqcError(
                f"{path}: a {plan.shots}-shot plan without its prefix (written before fedqc "
                "recorded it); write it again with fedqc threshold --out"
            )
        return plan

    def score(
        self,
        samples: Data,
        model: Model = None,
        to_sample: ToSample | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Scores:
        """Every sample's score, as a run's client scores it: with the plan's demonstrations."""
        if is_checkpoint_scorer(self.scorer.name):
            raise FedqcError(_checkpoint_only(self.scorer.name))
        items = as_samples(samples, to_sample)
        if self.model is None and model is None:
            raise FedqcError("the plan names no scoring model: pass model=NAME")
        loaded = _loaded(model, ModelConfig(name=self.model or ""))
        max_length = self.max_length or MODEL.max_length
        prefixes = [self.prefix] * len(items)
        return score_samples(
            loaded, items, self.scorer, max_length, self.batch_tokens, on_batch, prefixes
        )

    def select(self, raw: Sequence[float] | np.ndarray, truncated: int = 0) -> Selection:
        """Keep decisions on raw scores (in the scorer's units): oriented score ≥ τ, finite."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.tau is None and self.rule.kind != "drop-fraction":
            raise FedqcError(f"rule '{self.rule}' has no τ yet: it is fitted inside fedqc run")
        drop = self.rule.value if self.tau is None else None
        d = select(self.scorer.orient(raw), tau=self.tau, drop_fraction=drop)
        return Selection(d.keep, d.rejected_below_threshold, d.rejected_non_finite, raw, truncated)

    def apply(
        self,
        samples: Data,
        model: Model = None,
        to_sample: ToSample | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Selection:
        """Score ``samples`` and decide which to keep (what one client does)."""
        scores = self.score(samples, model, to_sample, on_batch)
        return self.select(scores.raw, scores.truncated)


@dataclass(frozen=True)
class QualityFilter:
    """The method's settings: a scorer, a threshold rule, shots, and the model that scores.

    Defaults are `fedqc run`'s (``ensemble-min:cond-prob+ifd+end-loss``, ``anchor-gaussian:0.1``,
    2 shots, SmolLM2-135M, 256 tokens); :meth:`from_config` takes a run's.
    """

    scorer: str = QUALITY.scorer
    rule: str = QUALITY.rule
    shots: int = QUALITY.shots
    model: str = MODEL.name
    max_length: int = MODEL.max_length
    batch_tokens: int = QUALITY.batch_tokens
    device: str = MODEL.device
    dtype: str = MODEL.dtype

    def __post_init__(self) -> None:
        any_scorer(self.scorer)  # an unknown name, rule or model setting: one clear line
        parse_rule(self.rule)
        self.model_config()
        if self.shots < 0 or self.batch_tokens <= 0:
            raise FedqcError(
                f"shots must be ≥ 0 and batch_tokens > 0 (got {self.shots}, {self.batch_tokens})"
            )

    @classmethod
    def from_config(cls, cfg: Config) -> QualityFilter:
        """The filter of a run's config (its scoring model: quality.model, else model.name)."""
        m, q = cfg.scoring_model(), cfg.quality
        return cls(
            q.scorer, q.rule, q.shots, m.name, m.max_length, q.batch_tokens, m.device, m.dtype
        )

    def model_config(self) -> ModelConfig:
        keys = {
            "name": self.model,
            "max-length": self.max_length,
            "device": self.device,
            "dtype": self.dtype,
        }
        return Config.from_flat({f"model.{k}": v for k, v in keys.items()}, "QualityFilter").model

    def fit(
        self,
        anchors: Data | None = None,
        model: Model = None,
        to_sample: ToSample | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> QualityPlan:
        """The plan of ``anchors`` (None: a rule that needs none, e.g. ``fixed:V``), zero- or
        ``shots``-shot, scored by ``model`` (default: this filter's)."""
        scorer, rule = any_scorer(self.scorer), parse_rule(self.rule)
        if is_checkpoint_scorer(scorer.name):
            raise FedqcError(_checkpoint_only(scorer.name))
        if rule.needs_histograms:
            raise FedqcError(
                f"rule '{rule}' is fitted to the clients' score histograms inside a run: use it "
                "with fedqc run --set quality.rule=mixture"
            )
        if rule.needs_anchors and anchors is None:
            raise FedqcError(f"rule '{rule}' sets τ from anchors: pass them, fit(anchors)")
        samples = None if anchors is None else as_samples(anchors, to_sample)
        shots = plan_shots(scorer.name, self.shots, samples is not None)
        loaded = None
        if samples is not None and (rule.needs_anchors or shots):
            loaded = _loaded(model, self.model_config())
        plan = plan_from_anchors(
            loaded,
            samples,
            scorer,
            rule,
            shots=shots,
            max_length=self.max_length,
            batch_tokens=self.batch_tokens,
            on_batch=on_batch,
        )
        where = {} if loaded is None else {"placement": loaded.placement.describe()}
        return QualityPlan.of(plan, self.model, self.max_length, self.batch_tokens, **where)


def _loaded(model: Model, default: ModelConfig) -> LoadedModel:
    """The scoring model: ``model`` as given (a name, its settings, or loaded), else ``default``."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load(dataclasses.replace(default, name=model))
    return load(model if isinstance(model, ModelConfig) else default)


def _checkpoint_only(name: str) -> str:
    return (
        f"scorer '{name}' scores at the warm-up checkpoints of a federated run: use fedqc run "
        f"--set quality.scorer={name} (or fedqc threshold/score --scorer {name} --warmup RUN_DIR)"
    )


def _tau(data: dict, scorer) -> float | None:
    """τ on the oriented scale: as recorded, or (older files) from τ in the scorer's units."""
    if data.get("tau") is not None:
        return float(data["tau"])
    raw = data.get("tau_raw")
    return None if raw is None else float(scorer.direction * float(raw))


def _finite(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def _is_str(x) -> bool:
    return isinstance(x, str)
