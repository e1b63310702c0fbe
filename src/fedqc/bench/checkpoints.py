"""Checkpoint scorers in the bench: a federated warm-up, then scores at its checkpoints.

1. Warm-up: ``bench.warmup-rounds`` (W) rounds of federated LoRA on the main federation's
   unfiltered data, as a real `fedqc run` through Flower's simulation (the training arms'
   machinery, :func:`fedqc.bench.train.train_arm`, keeping every sample). The global adapter that
   run saves after round k (``run/rounds/round-k``, a PEFT folder) is the checkpoint θ_k; η_k is
   that round's learning rate, from the same schedule the clients used. (`fedqc run` with a
   checkpoint scorer runs its own warm-up, :mod:`fedqc.federation.warmup`: the same W FedAvg
   rounds on the same unfiltered data and η_k, with its own batch seeds. The bench uses the
   training arms' run instead, so that with W = train.rounds the warm-up is the ``mixed`` arm.)
2. Scoring, with the pure core of :mod:`fedqc.scoring.checkpointed` on both sides, as the
   federation does it: ``prepare_anchor_info`` on the anchors that set τ (ḡ_k, or the anchors'
   tokens for icl / nuggets), ``score_with_checkpoints`` on the client samples, and on the anchors
   with ``anchor_self=True`` for the threshold.

What the scores depend on decides where the bench can reuse them:

- tracin, tracin-cos, icl, nuggets score each sample on its own (given the checkpoints and the
  anchors): the whole pool is scored once, and every federation of the main anchors looks its
  scores up, like the forward-only scorers. The sweeps' federations reuse the main federation's
  warm-up checkpoints (a note on their rows says so).
- datainf's statistics (λ_l, S_l) come from each client's own samples: it is scored client by
  client, on the main federation.
- Another anchor draw (the anchor sweep) changes ḡ_k or the prefix, and another federation changes
  datainf's client statistics: those need a re-scoring, done only with
  ``bench.rescore-checkpoints=true`` (slow); otherwise the rows are ``n/a`` with the reason.
- ``clues`` is refused: it needs each client's Adam moments from its own warm-up steps, which a
  `fedqc run` client does not keep.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from fedqc.bench.experiment import Federation, NotMeasured, anchor_key
from fedqc.bench.pool import BenchData
from fedqc.bench.train import train_arm
from fedqc.config import Config
from fedqc.data.partition import Member
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import LoadedModel
from fedqc.scoring.checkpointed import AnchorInfo, prepare_anchor_info, score_with_checkpoints
from fedqc.scoring.gradient import Checkpoint, ScoringSettings
from fedqc.scoring.scorers import get_checkpoint_scorer
from fedqc.train.local import round_lr

DEPENDS = {
    "gradients": "the mean anchor gradients ḡ_k",
    "datainf": "the mean anchor gradients ḡ_k",
    "prefix": "the anchors' prompt prefix",
    "tasks": "the anchor tasks",
}


@dataclass
class Warmup:
    """The warm-up run: its checkpoints (θ_k, η_k), folders, and what `train_arm` returned."""

    rounds: int
    checkpoints: list[Checkpoint]
    folders: list[Path]  # run/rounds/round-k, k = 1..W
    result: dict  # train_arm's: history (eval loss per round), kept, adapter
    seconds: float

    @property
    def lrs(self) -> list[float]:
        return [c.lr for c in self.checkpoints]


def round_lrs(cfg: Config, rounds: int) -> list[float]:
    """η_k of rounds 1..W: the learning rate the clients used in each warm-up round."""
    return [round_lr(cfg.train.lr, cfg.train.lr_schedule, k, rounds) for k in range(1, rounds + 1)]


def load_checkpoints(run_dir: Path, lrs: Sequence[float]) -> tuple[list[Checkpoint], list[Path]]:
    """The global adapters a `fedqc run` saved after rounds 1..len(lrs), as checkpoints."""
    checkpoints, folders = [], []
    for k, lr in enumerate(lrs, start=1):
        folder = run_dir / "rounds" / f"round-{k}"
        path = folder / "adapter_model.safetensors"
        if not path.is_file():
            raise FedqcError(f"warm-up: {path} is missing; round {k} did not finish")
        adapter = {name: t.float().contiguous() for name, t in load_file(str(path)).items()}
        checkpoints.append(Checkpoint(adapter, float(lr)))
        folders.append(folder)
    return checkpoints, folders


def warm_up(
    cfg: Config,
    rounds: int,
    clients: Sequence[Sequence[Sample]],
    eval_path: Path,
    folder: Path,
    stages=None,
) -> Warmup:
    """W rounds of `fedqc run` on every client's unfiltered samples (quality.rule=drop-fraction:0,
    as the training arms), into ``folder``; the checkpoints are the run's per-round adapters."""
    start = time.perf_counter()
    result = train_arm(
        cfg.replace(**{"train.rounds": rounds}),
        clients,
        [np.ones(len(c), dtype=bool) for c in clients],
        eval_path,
        folder,
        stages,
    )
    checkpoints, folders = load_checkpoints(folder / "run", round_lrs(cfg, rounds))
    return Warmup(rounds, checkpoints, folders, result, time.perf_counter() - start)


@dataclass
class CheckpointScores:
    """A checkpoint scorer as a score source of the :class:`~fedqc.bench.experiment.Selector`.

    Scores are raw (the scorer's units) in the caches and oriented on the way out. ``seconds``
    adds up the time spent scoring.
    """

    name: str
    loaded: LoadedModel
    warmup: Warmup
    data: BenchData
    max_length: int
    batch_tokens: int
    main_anchors: np.ndarray
    rescore: bool = False
    stages: object = None
    seconds: float = 0.0
    _info: dict = field(default_factory=dict)  # anchor key -> AnchorInfo
    _anchors: dict = field(default_factory=dict)  # anchor key -> raw scores of those anchors
    _pool: dict = field(default_factory=dict)  # anchor key -> (raw per pool entry, scored mask)
    _clients: dict = field(default_factory=dict)  # (federation, anchor key) -> raw per client

    def __post_init__(self) -> None:
        self.kind = get_checkpoint_scorer(self.name)
        self.per_sample = self.kind.needs != "datainf"
        self.settings = ScoringSettings.for_model(self.loaded.tokenizer, self.name, self.max_length)
        self.main_key = anchor_key(self.main_anchors)
        self._entries = self.data.entries()
        self._main_entries: list[np.ndarray] = []

    # --- what the Selector asks ---------------------------------------------------------------

    def scorer(self, anchors: np.ndarray):
        return self.kind

    def anchor_scores(self, anchors: np.ndarray) -> np.ndarray:
        key = anchor_key(anchors)
        self._check(key, None)
        if key not in self._anchors:
            chosen = [self.data.anchors[i] for i in key]
            self._anchors[key] = self._score(chosen, key, anchor_self=True)
        return self.kind.orient(self._anchors[key])

    def client_scores(self, fed: Federation, anchors: np.ndarray) -> list[np.ndarray]:
        key = anchor_key(anchors)
        self._check(key, fed)
        if self.per_sample:
            raw, _ = self._pool_scores(key, np.concatenate(fed.entries))
            return [self.kind.orient(raw[e]) for e in fed.entries]
        cache = (fed.label, key)
        if cache not in self._clients:
            self._clients[cache] = [
                self._score([self._sample(e) for e in entries], key) for entries in fed.entries
            ]
        return [self.kind.orient(r) for r in self._clients[cache]]

    def note(self, fed: Federation, anchors: np.ndarray) -> str:
        if fed.label == "main":
            return ""
        return (
            f"{self.name}: checkpoints from the main federation's {self.warmup.rounds}-round "
            "warm-up, not one on this federation"
        )

    def pool_raw(self, anchors: np.ndarray) -> np.ndarray:
        """Raw scores per pool entry with these anchors; NaN where not scored (datainf: the main
        federation's samples, scored client by client)."""
        key = anchor_key(anchors)
        out = np.full(len(self._entries), np.nan)
        if self.per_sample and key in self._pool:
            raw, scored = self._pool[key]
            out[scored] = raw[scored]
        for (label, k), per_client in self._clients.items():
            if label == "main" and k == key:
                for entries, raw in zip(self._main_entries, per_client, strict=True):
                    out[entries] = raw
        return out

    # --- scoring ------------------------------------------------------------------------------

    def prepare(self, fed: Federation) -> None:
        """Score what the main federation needs with the main anchors (and, per sample, the whole
        pool, for the sweeps)."""
        self._main_entries = fed.entries
        self.anchor_scores(self.main_anchors)
        if self.per_sample:
            self._pool_scores(self.main_key, np.arange(len(self._entries)))
        else:
            self.client_scores(fed, self.main_anchors)

    def _check(self, key: tuple[int, ...], fed: Federation | None) -> None:
        if self.rescore:
            return
        if key != self.main_key:
            raise NotMeasured(
                f"{self.name}: another anchor draw changes {DEPENDS[self.kind.needs]}, so every "
                "sample would need re-scoring at each checkpoint (bench.rescore-checkpoints=true)"
            )
        if fed is not None and not self.per_sample and fed.label != "main":
            raise NotMeasured(
                f"{self.name}: each client's influence statistics come from its own samples, so "
                "this federation's clients would need re-scoring "
                "(bench.rescore-checkpoints=true)"
            )

    def _pool_scores(self, key: tuple[int, ...], needed: np.ndarray):
        n = len(self._entries)
        raw, scored = self._pool.setdefault(key, (np.full(n, np.nan), np.zeros(n, dtype=bool)))
        todo = np.unique(needed[~scored[needed]])
        if todo.size:
            raw[todo] = self._score([self._sample(e) for e in todo], key)
            scored[todo] = True
        return raw, scored

    def _sample(self, entry: int) -> Sample:
        item, corruption = self._entries[int(entry)]
        return self.data.sample(Member(item, corruption))

    def _anchor_info(self, key: tuple[int, ...]) -> AnchorInfo:
        if key not in self._info:
            self._info[key] = self._timed(
                prepare_anchor_info,
                self.loaded,
                [self.data.anchors[i] for i in key],
                self.warmup.checkpoints,
                self.settings,
                batch_tokens=self.batch_tokens,
                on_batch=self._advance,
            )
        return self._info[key]

    def _score(
        self, samples: list[Sample], key: tuple[int, ...], anchor_self: bool = False
    ) -> np.ndarray:
        info = self._anchor_info(key)
        scores = self._timed(
            score_with_checkpoints,
            self.loaded,
            samples,
            self.warmup.checkpoints,
            info,
            self.settings,
            batch_tokens=self.batch_tokens,
            anchor_self=anchor_self,
            on_batch=self._advance,
        )
        return np.asarray(scores.raw, dtype=np.float64)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def _advance(self, n: int) -> None:
        if self.stages is not None:
            self.stages.advance(n)
