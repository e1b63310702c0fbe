"""Selection experiments on federations assembled from the scored pool: the main federation (every
arm, per client and overall) and the three sweeps (contamination, anchor count, corruption type).

Scores come from score sources, one per scorer: :class:`ForwardScores` looks them up in the pool's
:class:`Losses` (an ensemble is calibrated on the anchors that set τ, as the server does), and
:class:`fedqc.bench.checkpoints.CheckpointScores` holds scores at the warm-up checkpoints. A
source raises :class:`NotMeasured` where it cannot give the federation's scores faithfully
(without re-scoring); the experiment then writes an ``n/a`` row with the reason.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedqc.bench.arms import Arm, auc, outcome_metrics, run_arm
from fedqc.bench.pool import BenchData, Losses
from fedqc.data.partition import Member, Partition, assemble, corrupted_counts
from fedqc.errors import FedqcError
from fedqc.scoring.ensemble import Calibration, is_ensemble
from fedqc.scoring.scorers import get_scorer

NA = "n/a"


class NotMeasured(Exception):
    """A scorer's scores on this federation or anchor draw would need re-scoring; the message
    says why."""


@dataclass
class Federation:
    members: list[list[Member]]
    entries: list[np.ndarray]  # per client: the pool-entry index of each sample
    clean: list[np.ndarray]  # per client: ground-truth flags, clean = True
    label: str = ""  # "main", "contamination-0.2", ...: names the federation

    @property
    def total(self) -> int:
        return sum(len(c) for c in self.clean)

    @property
    def true_rate(self) -> float:
        """The true global corrupted proportion."""
        return sum(int((~c).sum()) for c in self.clean) / max(self.total, 1)


def make_federation(
    data: BenchData,
    partition: Partition,
    num_clients: int,
    samples_per_client: int,
    contamination: float,
    types: Sequence[str],
    seed: int,
    label: str,
) -> Federation:
    """A federation of the pool's items, deterministic in (seed, label)."""
    rng = random.Random(f"fedqc-bench-{seed}-{label}")
    counts = corrupted_counts(
        partition,
        num_clients,
        samples_per_client,
        contamination,
        np.random.default_rng(rng.randrange(2**63)),
    )
    available = [tuple(v) for v in data.variants]
    if data.groups is None:
        members = assemble(available, [samples_per_client] * num_clients, counts, types, rng)
    else:  # bench.client-sources: each client from its own source's items
        if len(data.groups) != num_clients:
            raise FedqcError(f"{len(data.groups)} client sources for {num_clients} clients")
        members = []
        for group, n_bad in zip(data.groups, counts, strict=True):
            own = [available[i] for i in group]
            (chosen,) = assemble(own, [samples_per_client], [n_bad], types, rng)
            members.append([Member(group[m.item], m.corruption) for m in chosen])
    return federation_of(data, members, label)


def federation_of(data: BenchData, members: list[list[Member]], label: str) -> Federation:
    """The federation of these clients' pool members: their entries and ground-truth flags."""
    index = {e: i for i, e in enumerate(data.entries())}
    return Federation(
        members,
        [np.array([index[(m.item, m.corruption)] for m in c], dtype=np.int64) for c in members],
        [np.array([not m.corrupted for m in c], dtype=bool) for c in members],
        label,
    )


def fitting_size(data: BenchData, types: Sequence[str], rate: float, num_clients: int) -> int:
    """Samples per client of the largest federation at ``rate`` (a balanced mixture of ``types``)
    that the pool can hold, at most the main federation's size.

    With client sources (``data.groups``) a client's corrupted count is not capped by the global
    one (an iid spread, a Dirichlet share), so each client gets the size that fits even with all
    its samples corrupted: at most its source's items, and ``len(types)`` × its fewest variants of
    one type.
    """
    if data.groups is not None:
        return min(_client_size(data, group, types, rate) for group in data.groups)
    per_type = min(sum(t in v for v in data.variants) for t in types)
    pool = len(data.items)
    if rate > 0:
        # A client's balanced mixture may give one type one sample more than its share.
        margin = num_clients if len(types) > 1 else 0
        pool = min(pool, math.floor(max(per_type - margin, 0) * len(types) / rate))
    return pool // num_clients


def _client_size(data: BenchData, group: list[int], types: Sequence[str], rate: float) -> int:
    """The most samples a client of ``group``'s items can hold with all of them corrupted (a
    balanced mixture gives each type at most ⌈n / len(types)⌉)."""
    if rate == 0:
        return len(group)
    fewest = min(sum(t in data.variants[i] for i in group) for t in types)
    return min(len(group), len(types) * fewest)


def anchor_key(anchors: np.ndarray) -> tuple[int, ...]:
    return tuple(int(a) for a in anchors)


class ForwardScores:
    """A forward-only scorer or an ensemble, from the pool's losses (no model run).

    An ensemble is calibrated on the anchors that set τ (as the server calibrates it on its
    anchors), so its pool scores are recomputed for each anchor draw.
    """

    def __init__(self, name: str, losses: Losses, anchor_losses: Losses) -> None:
        self.name = name
        self._losses, self._anchor_losses = losses, anchor_losses
        self._cache: dict[tuple[int, ...] | None, tuple] = {}

    def scored(self, anchors: np.ndarray):
        """(scorer, oriented pool scores, oriented scores of every anchor); an ensemble is
        calibrated on ``anchors``."""
        key = anchor_key(anchors) if is_ensemble(self.name) else None
        if key not in self._cache:
            scorer = get_scorer(self.name)
            if key is not None:
                a = self._anchor_losses.take(anchors)
                scorer = Calibration(self.name).fit(a.cond, a.bare, a.end).scorer()
            with np.errstate(all="ignore"):
                pool = scorer.orient(
                    scorer.formula(self._losses.cond, self._losses.bare, self._losses.end)
                )
                every = self._anchor_losses
                anchor = scorer.orient(scorer.formula(every.cond, every.bare, every.end))
            self._cache[key] = (
                scorer,
                np.asarray(pool, np.float64),
                np.asarray(anchor, np.float64),
            )
        return self._cache[key]

    def scorer(self, anchors: np.ndarray):
        return self.scored(anchors)[0]

    def client_scores(self, fed: Federation, anchors: np.ndarray) -> list[np.ndarray]:
        pool = self.scored(anchors)[1]
        return [pool[e] for e in fed.entries]

    def anchor_scores(self, anchors: np.ndarray) -> np.ndarray:
        return self.scored(anchors)[2][anchors]

    def pool_raw(self, anchors: np.ndarray) -> np.ndarray:
        scorer, pool, _ = self.scored(anchors)
        return scorer.raw(pool)

    def note(self, fed: Federation, anchors: np.ndarray) -> str:
        return ""


class Selector:
    """Runs arms on federations; each scorer's scores come from its source.

    ``main_anchors``: the anchors that set τ on the main federation (and in the other sweeps).
    """

    def __init__(self, sources: Sequence, main_anchors: np.ndarray) -> None:
        self.sources = {s.name: s for s in sources}
        self.main_anchors = np.asarray(main_anchors, dtype=np.int64)

    @property
    def scorers(self) -> list[str]:
        return list(self.sources)

    def scores(
        self, scorer: str, fed: Federation, anchors: np.ndarray | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Oriented scores per client and of the anchors; raises :class:`NotMeasured`."""
        anchors = self.main_anchors if anchors is None else anchors
        source = self.sources[scorer]
        return source.client_scores(fed, anchors), source.anchor_scores(anchors)

    def scorer(self, name: str, anchors: np.ndarray | None = None):
        """The scorer as applied with these anchors (an ensemble: its calibration)."""
        return self.sources[name].scorer(self.main_anchors if anchors is None else anchors)

    def note(self, scorer: str, fed: Federation, anchors: np.ndarray) -> str:
        return self.sources[scorer].note(fed, anchors)

    def run(self, arm: Arm, fed: Federation, anchors: np.ndarray):
        """(outcome, per-client metrics, overall metrics); ``anchors``: which anchors set τ."""
        if arm.selects:
            scores, anchor = self.scores(arm.scorer, fed, anchors)
        else:
            scores, anchor = [np.zeros(len(c)) for c in fed.clean], np.zeros(0)
        outcome = run_arm(arm, scores, fed.clean, anchor, fed.true_rate)
        per_client, overall = outcome_metrics(outcome, fed.clean)
        return outcome, per_client, overall

    def auc(self, scorer: str, fed: Federation, anchors: np.ndarray | None = None) -> float:
        scores, _ = self.scores(scorer, fed, anchors)
        return auc(np.concatenate(scores), np.concatenate(fed.clean))


def _raw(scorer, tau: float | None) -> float:
    return math.nan if tau is None or scorer is None else float(scorer.raw(tau))


def _tau_of(scorer, outcome) -> float:
    """τ in the scorer's units; per-client rules report the mean of the clients' τ."""
    if outcome.tau is not None:
        return _raw(scorer, outcome.tau)
    taus = [_raw(scorer, t) for t in outcome.client_tau if t is not None]
    return float(np.mean(taus)) if taus else math.nan


def _row(experiment: str, arm: Arm, **extra) -> dict:
    return {
        "experiment": experiment,
        "arm": arm.name,
        "kind": arm.kind,
        "scorer": arm.scorer or "",
        "rule": arm.rule or ("" if arm.kind in ("mixed", "oracle") else arm.kind),
        **extra,
    }


@dataclass
class Experiment:
    """What every experiment of a bench run shares: the scores, the arms, the pool and the setup."""

    selector: Selector
    arms: Sequence[Arm]
    data: BenchData
    num_clients: int
    types: Sequence[str]
    seed: int
    num_anchors: int  # the first num_anchors anchors set τ (except in the anchor sweep)

    def federation(
        self, partition: Partition, n: int, rate: float, types: Sequence[str], label: str
    ) -> Federation:
        return make_federation(
            self.data, partition, self.num_clients, n, rate, types, self.seed, label
        )

    def _measure(self, arm: Arm, fed: Federation, anchors: np.ndarray):
        """(outcome, per-client, overall row fields) of one arm; raises NotMeasured / FedqcError."""
        outcome, per_client, overall = self.selector.run(arm, fed, anchors)
        if not arm.selects:
            return outcome, per_client, {"tau": math.nan, "auc": math.nan} | overall, None
        scorer = self.selector.scorer(arm.scorer, anchors)
        fields = {
            "tau": _tau_of(scorer, outcome),
            "auc": self.selector.auc(arm.scorer, fed, anchors),
        }
        note = self.selector.note(arm.scorer, fed, anchors)
        return outcome, per_client, fields | overall | ({"note": note} if note else {}), scorer

    def overall(self, experiment: str, fed: Federation, arms, chosen=None, **extra) -> list[dict]:
        """One overall row per arm on ``fed``; ``chosen``: the anchors that set τ (default the
        first num_anchors). An arm that cannot be measured faithfully gets an ``n/a`` row."""
        chosen = np.arange(self.num_anchors) if chosen is None else chosen
        rows = []
        for arm in arms:
            try:
                _, _, fields, _ = self._measure(arm, fed, chosen)
            except (NotMeasured, FedqcError) as exc:
                rows.append(na_row(experiment, arm, str(exc), **extra))
                continue
            rows.append(_row(experiment, arm, client="all", **extra) | fields)
        return rows

    def main(self, fed: Federation) -> tuple[list[dict], dict]:
        """Every arm on the main federation: rows overall and per client; outcomes by arm name."""
        anchors = np.arange(self.num_anchors)
        rows, outcomes = [], {}
        for arm in self.arms:
            outcome, per_client, fields, scorer = self._measure(arm, fed, anchors)
            outcomes[arm.name] = outcome
            rows.append(_row("main", arm, client="all") | fields)
            rows += [
                _row("main", arm, client=c, tau=_raw(scorer, outcome.client_tau[c])) | metrics
                for c, metrics in enumerate(per_client)
            ]
        return rows, outcomes

    @property
    def _compared(self) -> list[Arm]:
        """The arms the sweeps compare: every scoring arm, and mixed (keep everything)."""
        return [a for a in self.arms if a.selects or a.kind == "mixed"]

    def contamination_sweep(self, partition: Partition, rates: Sequence[float]) -> list[dict]:
        """τ and selection at each global corrupted share (paper [B] Fig. 4)."""
        rows = []
        for rate in rates:
            n = fitting_size(self.data, self.types, rate, self.num_clients)
            fed = self.federation(partition, n, rate, self.types, f"contamination-{rate:g}")
            rows += self.overall("contamination", fed, self._compared, contamination=rate)
        return rows

    def anchor_sweep(self, fed: Federation, counts: Sequence[int], repeats: int) -> list[dict]:
        """τ and selection with k random anchors (``repeats`` draws each), QC arms only.

        An arm that cannot be measured at k anchors (anchor-conformal with too few anchors; a
        checkpoint scorer whose scores depend on the draw) gets one ``n/a`` row for that k.
        """
        pool = len(self.data.anchors)
        rows = []
        for k in counts:
            if k > pool:
                raise FedqcError(f"bench.anchor-sweep asks for {k} anchors; the set has {pool}")
            missing: set[str] = set()
            for r in range(1 if k == pool else repeats):
                rng = random.Random(f"fedqc-bench-{self.seed}-anchors-{k}-{r}")
                chosen = np.array(sorted(rng.sample(range(pool), k)), dtype=np.int64)
                for arm in (a for a in self.arms if a.kind == "qc" and a.name not in missing):
                    try:
                        _, _, fields, _ = self._measure(arm, fed, chosen)
                    except (NotMeasured, FedqcError) as exc:
                        missing.add(arm.name)
                        rows.append(na_row("anchors", arm, str(exc), anchors=k))
                        continue
                    rows.append(_row("anchors", arm, client="all", anchors=k, repeat=r) | fields)
        # a draw that failed after others succeeded leaves only the n/a row for that arm and k
        failed = {(r["arm"], r["anchors"]) for r in rows if r.get("status") == NA}
        return [r for r in rows if r.get("status") == NA or (r["arm"], r["anchors"]) not in failed]

    def type_sweep(self, partition: Partition, rate: float) -> list[dict]:
        """Selection on federations corrupted by one type only, and by the mixture."""
        rows = []
        for kind in [*self.types, "mixture"]:
            chosen = list(self.types) if kind == "mixture" else [kind]
            n = fitting_size(self.data, chosen, rate, self.num_clients)
            if n == 0:
                continue
            fed = self.federation(partition, n, rate, chosen, f"type-{kind}-{rate:g}")
            rows += self.overall("types", fed, self._compared, corruption=kind, contamination=rate)
        return rows


def na_row(experiment: str, arm: Arm, reason: str, **extra) -> dict:
    """An arm the bench does not measure here, and why (metrics left empty)."""
    return _row(experiment, arm, client="all", **extra) | {"status": NA, "note": reason}


def measured(rows: Sequence[dict]) -> list[dict]:
    """The rows with numbers (not ``n/a``)."""
    return [r for r in rows if r.get("status") != NA]
