"""Selection experiments on federations assembled from the scored pool: the main federation (every
arm, per client and overall) and the three sweeps (contamination, anchor count, corruption type).

None of this runs the model: every score is looked up in the pool's :class:`Losses`.
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
from fedqc.scoring.scorers import get_scorer


@dataclass
class Federation:
    members: list[list[Member]]
    entries: list[np.ndarray]  # per client: the pool-entry index of each sample
    clean: list[np.ndarray]  # per client: ground-truth flags, clean = True

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
    members = assemble(available, [samples_per_client] * num_clients, counts, types, rng)
    index = {e: i for i, e in enumerate(data.entries())}
    return Federation(
        members,
        [np.array([index[(m.item, m.corruption)] for m in c], dtype=np.int64) for c in members],
        [np.array([not m.corrupted for m in c], dtype=bool) for c in members],
    )


def fitting_size(data: BenchData, types: Sequence[str], rate: float, num_clients: int) -> int:
    """Samples per client of the largest federation at ``rate`` (a balanced mixture of ``types``)
    that the pool can hold, at most the main federation's size."""
    per_type = min(sum(t in v for v in data.variants) for t in types)
    pool = len(data.items)
    if rate > 0:
        # A client's balanced mixture may give one type one sample more than its share.
        margin = num_clients if len(types) > 1 else 0
        pool = min(pool, math.floor(max(per_type - margin, 0) * len(types) / rate))
    return pool // num_clients


class Selector:
    """Runs arms on federations, with each scorer's oriented pool scores computed once."""

    def __init__(self, losses: Losses, anchor_losses: Losses, scorers: Sequence[str]) -> None:
        self.oriented = {s: losses.oriented(s) for s in scorers}
        self.anchor_oriented = {s: anchor_losses.oriented(s) for s in scorers}

    def run(self, arm: Arm, fed: Federation, anchors: np.ndarray):
        """(outcome, per-client metrics, overall metrics); ``anchors``: which anchors set τ."""
        if arm.selects:
            scores = [self.oriented[arm.scorer][e] for e in fed.entries]
            anchor = self.anchor_oriented[arm.scorer][anchors]
        else:
            scores, anchor = [np.zeros(len(c)) for c in fed.clean], np.zeros(0)
        outcome = run_arm(arm, scores, fed.clean, anchor, fed.true_rate)
        per_client, overall = outcome_metrics(outcome, fed.clean)
        return outcome, per_client, overall

    def auc(self, scorer: str, fed: Federation) -> float:
        return auc(self.oriented[scorer][np.concatenate(fed.entries)], np.concatenate(fed.clean))


def _raw(arm: Arm, tau: float | None) -> float:
    return math.nan if tau is None or not arm.selects else get_scorer(arm.scorer).raw(tau)


def _tau_of(arm: Arm, outcome) -> float:
    """τ in the scorer's units; per-client rules report the mean of the clients' τ."""
    if outcome.tau is not None:
        return _raw(arm, outcome.tau)
    taus = [_raw(arm, t) for t in outcome.client_tau if t is not None]
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

    def overall(self, experiment: str, fed: Federation, arms, chosen=None, **extra) -> list[dict]:
        """One overall row per arm on ``fed``; ``chosen``: the anchors that set τ (default the
        first num_anchors)."""
        chosen = np.arange(self.num_anchors) if chosen is None else chosen
        rows = []
        for arm in arms:
            outcome, _, overall = self.selector.run(arm, fed, chosen)
            auc = self.selector.auc(arm.scorer, fed) if arm.selects else math.nan
            rows.append(
                _row(experiment, arm, client="all", tau=_tau_of(arm, outcome), auc=auc, **extra)
                | overall
            )
        return rows

    def main(self, fed: Federation) -> tuple[list[dict], dict]:
        """Every arm on the main federation: rows overall and per client; outcomes by arm name."""
        anchors = np.arange(self.num_anchors)
        rows, outcomes = [], {}
        for arm in self.arms:
            outcome, per_client, overall = self.selector.run(arm, fed, anchors)
            outcomes[arm.name] = outcome
            auc = self.selector.auc(arm.scorer, fed) if arm.selects else math.nan
            rows.append(
                _row("main", arm, client="all", tau=_tau_of(arm, outcome), auc=auc) | overall
            )
            rows += [
                _row("main", arm, client=c, tau=_raw(arm, outcome.client_tau[c])) | metrics
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
        """τ and selection with k random anchors (``repeats`` draws each), QC arms only."""
        pool = len(self.data.anchors)
        rows = []
        for k in counts:
            if k > pool:
                raise FedqcError(f"bench.anchor-sweep asks for {k} anchors; the set has {pool}")
            for r in range(1 if k == pool else repeats):
                rng = random.Random(f"fedqc-bench-{self.seed}-anchors-{k}-{r}")
                chosen = np.array(sorted(rng.sample(range(pool), k)), dtype=np.int64)
                for arm in (a for a in self.arms if a.kind == "qc"):
                    try:
                        rows += self.overall("anchors", fed, [arm], chosen, anchors=k, repeat=r)
                    except FedqcError:  # e.g. anchor-conformal with too few anchors
                        continue
        return rows

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
