"""The per-domain standard: anchors grouped into domains, a τ per domain, samples like no anchor.

Pure numpy/scipy: the server builds a :class:`DomainStandard` from its anchors' oriented scores
and embeddings (:func:`domain_standard`); a client applies it to its own samples
(:func:`decide`) and only counts leave it. Everything the standard holds comes from the anchors.

1. **Domains** (:func:`anchor_domains`). Anchors that carry a ``domain`` label are grouped by it.
   Without labels, :func:`group_anchors` clusters their embeddings: average-linkage on cosine
   distance, cut at k = 2..``max_groups`` groups, the anchors of a group smaller than
   ``min_size`` joining the nearest larger group; the split with the highest mean silhouette wins
   if that silhouette is ≥ ``min_silhouette``, otherwise the anchors are one domain (today's
   single τ, bit for bit).
2. **Assignment** (:func:`assign`). A sample belongs to the domain whose centroid (the normalised
   mean of the domain's unit anchor embeddings) is nearest by cosine.
3. **Like no anchor** (:func:`ood_bounds`). A sample is *out of domain* when its cosine distance
   to its nearest centroid exceeds that domain's bound: ``margin`` × the largest leave-one-out
   distance of the domain's anchors (each anchor to the centroid of the others). With margin 1, a
   sample exchangeable with a domain's n_d anchors exceeds it with probability about ≤ 1/(n_d+1)
   (conservative: the new sample's centroid uses one anchor more than the leave-one-out ones);
   the margin (default :data:`OOD_MARGIN`) lowers that further. A domain with one anchor borrows
   the largest leave-one-out distance of the other domains. No anchor is ever out of domain
   (its distance to a centroid that includes it is at most its leave-one-out distance). One
   setting decides what becomes of out-of-domain samples: ``keep``, ``reject`` or ``pooled``
   (judged by the all-anchor τ of the same rule; with one domain that is the domain's own τ).
4. **τ per domain** (:func:`domain_thresholds`, one form per rule, :data:`PER_DOMAIN`), each with a
   printed promise per domain. For few anchors per domain, ``anchor-gaussian:α`` shifts the
   location per domain and pools the spread: τ_d = m_d − t(1−α; N−D)·s_p·√(1 + 1/n_d).
   ``anchor-conformal:α`` is exact Mondrian conformal per domain and needs n_d ≥ ⌈1/α⌉ − 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.stats import t as student_t

from fedqc.errors import FedqcError
from fedqc.quality.mixture import histogram_edges
from fedqc.quality.rules import (
    Rule,
    conformal_threshold,
    global_threshold,
    guarantee,
    parse_rule,
)
from fedqc.quality.selection import select

OOD_SETTINGS = ("keep", "reject", "pooled")
# Both measured on SmolLM2-135M last-layer embeddings of GSM8K, GPQA, HumanEval and MGSM German and
# Russian (140 samples, max 256 tokens). Margin 1.5 with 5 anchors per source: 6% of the samples
# of covered sources fall out of domain, and 92% of a source without anchors (HumanEval 68%).
# The best split of one source's anchors (GSM8K, 5–20 anchors, 30 draws) had silhouette ≤ 0.35;
# splits of several sources' anchors 0.42–0.93 (one draw of 2 per source: 0.33).
OOD_MARGIN = 1.5  # × the largest leave-one-out anchor distance of the domain
MIN_SILHOUETTE = 0.4
MAX_GROUPS = 8
MIN_GROUP_SIZE = 2

# How each rule is applied per domain (or why it has no per-domain τ).
PER_DOMAIN = {
    "anchor-mean": "τ_d = the mean of domain d's anchors (the paper's rule, per domain)",
    "anchor-quantile": (
        "τ_d = domain d's anchor mean + the Q-quantile of all anchors' residuals from their own "
        "domain's mean (location shift, one pooled shape)"
    ),
    "anchor-gaussian": (
        "τ_d = m_d − t(1−α; N−D)·s_p·√(1+1/n_d): location per domain, sd pooled within domains"
    ),
    "anchor-conformal": (
        "Mondrian conformal: τ_d = the ⌊α(n_d+1)⌋-th smallest of domain d's own anchors "
        "(needs n_d ≥ ⌈1/α⌉−1)"
    ),
    "mixture": (
        "one fit on scores centred by their domain's anchor mean (location shift): the clients "
        "send one histogram of centred scores, not one per domain, whose few samples each could "
        "not carry a two-component fit; τ_d = m_d + the fit's τ"
    ),
    "fixed": "no per-domain τ: a fixed τ uses no anchors, so it is the same in every domain",
    "drop-fraction": (
        "no τ: each client drops its lowest-scoring fraction P within each of its domains"
    ),
}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


# ---------------------------------------------------------------------------------------------
# 1. Domains


@dataclass(frozen=True)
class Grouping:
    """Which domain each anchor is in (0..D−1), the domains' names, and why there are D."""

    labels: np.ndarray  # int per anchor
    names: tuple[str, ...]
    reason: str

    @property
    def num_domains(self) -> int:
        return len(self.names)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of unit rows ``x`` under cosine distance (a singleton scores 0)."""
    dist = np.clip(1.0 - unit(x) @ unit(x).T, 0.0, 2.0)
    groups = np.unique(labels)
    values = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() < 2:
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, labels == g].mean() for g in groups if g != labels[i])
        values[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(values.mean())


def group_anchors(
    embeddings: np.ndarray,
    *,
    min_silhouette: float = MIN_SILHOUETTE,
    max_groups: int = MAX_GROUPS,
    min_size: int = MIN_GROUP_SIZE,
) -> Grouping:
    """Domains of unlabelled anchors: average-linkage clustering on cosine distance, cut at
    k ∈ 2..``max_groups`` (a group of fewer than ``min_size`` anchors joins the nearest larger
    one); the split with the highest mean silhouette is taken only if that silhouette is
    ≥ ``min_silhouette``, otherwise the anchors are one domain. ``reason`` says which, in one
    line."""
    x = unit(embeddings)
    n = len(x)
    one = np.zeros(n, dtype=np.int64)
    top = min(max_groups, n // min_size)
    if top < 2:
        return Grouping(
            one, ("all",), f"one group: {n} anchors cannot form 2 groups of ≥ {min_size}"
        )
    tree = linkage(x, method="average", metric="cosine")
    best: tuple[float, int, np.ndarray] | None = None
    seen: set[tuple[int, ...]] = set()
    for k in range(2, top + 1):
        labels = _join_small(x, fcluster(tree, k, criterion="maxclust"), min_size)
        key = tuple(labels.tolist())
        if len(set(key)) < 2 or key in seen:
            continue
        seen.add(key)
        score = silhouette(x, labels)
        if best is None or score > best[0] + 1e-12:
            best = (score, len(set(key)), labels)
    rule = (
        f"average-linkage on cosine distance cut at k = 2..{top}; groups of < {min_size} "
        "anchors join the nearest group"
    )
    if best is None:
        return Grouping(one, ("all",), f"one group: no split into groups of ≥ {min_size} ({rule})")
    score, k, labels = best
    if score < min_silhouette:
        return Grouping(
            one,
            ("all",),
            f"one group: the best split ({k} groups) has silhouette {score:.2f} < "
            f"{min_silhouette:g} ({rule})",
        )
    # number the groups by their first anchor, so that the names do not depend on scipy's order
    order = {g: i for i, g in enumerate(dict.fromkeys(labels.tolist()))}
    relabelled = np.array([order[g] for g in labels.tolist()], dtype=np.int64)
    return Grouping(
        relabelled,
        tuple(f"group-{i + 1}" for i in range(k)),
        f"{k} groups: silhouette {score:.2f} ≥ {min_silhouette:g} ({rule})",
    )


def _join_small(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with the anchors of groups smaller than ``min_size`` moved to the nearest
    (by cosine to its centroid) group of at least ``min_size``."""
    names, sizes = np.unique(labels, return_counts=True)
    big = names[sizes >= min_size]
    if big.size == 0:
        return np.zeros_like(labels)
    centres = unit(np.stack([x[labels == g].mean(0) for g in big]))
    out = labels.copy()
    small = ~np.isin(labels, big)
    out[small] = big[np.argmax(x[small] @ centres.T, axis=1)]
    return out


def anchor_domains(
    embeddings: np.ndarray, labels: Sequence[str | None] | None = None, **grouping
) -> Grouping:
    """The anchors' domains: their labels when every anchor has one (names sorted), else
    :func:`group_anchors` on their embeddings (``grouping``: its settings)."""
    given = [] if labels is None else [x for x in labels if x is not None]
    if labels is not None and given and len(given) != len(labels):
        raise FedqcError(
            f"{len(given)} of {len(labels)} anchors carry a domain: give every anchor a domain, "
            "or none (fedqc then groups them itself)"
        )
    if not given:
        return group_anchors(embeddings, **grouping)
    names = tuple(sorted(set(given)))
    index = {name: i for i, name in enumerate(names)}
    counts = ", ".join(f"{name} {given.count(name)}" for name in names)
    return Grouping(
        np.array([index[x] for x in given], dtype=np.int64),
        names,
        f"{len(names)} domain{'s' if len(names) > 1 else ''} from the anchors' labels ({counts})",
    )


def centroids(embeddings: np.ndarray, labels: np.ndarray, num_domains: int) -> np.ndarray:
    """(D, dim) unit rows: each domain's normalised mean of its anchors' unit embeddings."""
    x = unit(embeddings)
    return unit(np.stack([x[labels == d].mean(0) for d in range(num_domains)]))


# ---------------------------------------------------------------------------------------------
# 2. Assignment, and samples like no anchor


def assign(embeddings: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centroid by cosine, cosine distance 1 − cos to it) per sample."""
    sim = unit(embeddings) @ unit(centres).T
    nearest = np.argmax(sim, axis=1)
    return nearest, 1.0 - sim[np.arange(len(sim)), nearest]


def leave_one_out_distances(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each anchor's cosine distance to the centroid of the other anchors of its domain (NaN for
    the only anchor of a domain)."""
    x = unit(embeddings)
    out = np.full(len(x), np.nan)
    for d in np.unique(labels):
        rows = np.flatnonzero(labels == d)
        if len(rows) < 2:
            continue
        total = x[rows].sum(0)
        for r in rows:
            others = unit((total - x[r])[None])[0]
            out[r] = 1.0 - float(x[r] @ others)
    return out


def ood_bounds(
    embeddings: np.ndarray, labels: np.ndarray, num_domains: int, margin: float = OOD_MARGIN
) -> np.ndarray:
    """Per domain, the cosine distance beyond which a sample is like no anchor: ``margin`` × the
    domain's largest leave-one-out anchor distance (module docstring); a one-anchor domain uses
    the largest over the other domains, and with no such distance at all nothing is out (inf)."""
    if margin < 1:
        raise FedqcError(f"the out-of-domain margin must be ≥ 1 (got {margin:g})")
    loo = leave_one_out_distances(embeddings, labels)
    everywhere = np.nanmax(loo) if np.isfinite(loo).any() else math.inf
    bounds = np.empty(num_domains)
    for d in range(num_domains):
        own = loo[labels == d]
        own = own[np.isfinite(own)]
        bounds[d] = margin * (own.max() if own.size else everywhere)
    return bounds


# ---------------------------------------------------------------------------------------------
# 3. τ per domain


@dataclass(frozen=True)
class DomainThresholds:
    """τ per domain (oriented) and the promise of each, with the pooled all-anchor τ."""

    taus: np.ndarray | None  # (D,); None for drop-fraction, and for mixture before its fit
    pooled_tau: float | None  # the same rule on all anchors at once; None where it has no τ
    centres: np.ndarray  # (D,) the location that mixture centres a domain's scores by
    pooled_centre: float
    promises: tuple[str, ...]  # one line per domain
    anchors: tuple[int, ...]  # anchors with finite scores per domain
    edges: np.ndarray | None = None  # mixture: bins of the centred scores


def pooled_gaussian_thresholds(
    scores: np.ndarray, labels: np.ndarray, num_domains: int, alpha: float
) -> tuple[np.ndarray, float, int]:
    """τ_d = m_d − t(1−α; N−D)·s_p·√(1 + 1/n_d), with s_p² = Σ_a (s_a − m_d(a))² / (N − D).

    Promise: if each domain's clean scores are normal with their own mean and one sd common to all
    domains, and anchors and clean samples are independent, (s − m_d)/(s_p √(1+1/n_d)) is
    Student-t with N − D degrees of freedom, so a clean sample of domain d is rejected with
    probability exactly α, in every domain, with as few as 1 anchor in a domain (N − D ≥ 1).
    Returns (τ per domain, s_p, N − D).
    """
    n = np.bincount(labels, minlength=num_domains)
    dof = len(scores) - num_domains
    if n.min() < 1 or dof < 1:
        raise FedqcError(
            f"anchor-gaussian:{alpha:g} per domain needs an anchor with a finite score in every "
            f"domain and one more than the {num_domains} domains in all (has {len(scores)})"
        )
    means = np.bincount(labels, weights=scores, minlength=num_domains) / n
    sp = math.sqrt(float(np.sum((scores - means[labels]) ** 2)) / dof)
    taus = means - float(student_t.ppf(1 - alpha, dof)) * sp * np.sqrt(1 + 1 / n)
    return taus, sp, dof


def mondrian_thresholds(
    scores: np.ndarray, labels: np.ndarray, num_domains: int, alpha: float
) -> list[float | None]:
    """Per domain, the ⌊α(n_d+1)⌋-th smallest of its own anchors' scores (None: too few).

    Promise: if a clean sample of domain d is exchangeable with d's n_d anchors, it is rejected
    with probability at most α, exactly ⌊α(n_d+1)⌋/(n_d+1) for continuous scores, whatever the
    other domains hold.
    """
    out: list[float | None] = []
    for d in range(num_domains):
        own = scores[labels == d]
        out.append(conformal_threshold(own, alpha) if math.floor(alpha * (len(own) + 1)) else None)
    return out


def domain_thresholds(
    rule: Rule,
    anchor_oriented: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    scorer=None,
    conformal_fallback: bool = False,
) -> DomainThresholds:
    """τ per domain by ``rule``'s per-domain form (:data:`PER_DOMAIN`), with one promise line
    per domain. Anchors with non-finite scores are left out, as the single-τ rules do.

    One domain: τ, the pooled τ and the promise are the single-τ rule's own
    (:func:`fedqc.quality.rules.global_threshold`), bit for bit. ``scorer``: needed by ``fixed``
    only. ``conformal_fallback``: a domain with too few anchors for Mondrian conformal takes the
    pooled-spread Gaussian τ at the same α instead of an error.
    """
    num = len(names)
    scores = np.asarray(anchor_oriented, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    finite = np.isfinite(scores)
    s, lab = scores[finite], labels[finite]
    n = np.bincount(lab, minlength=num)
    anchors = tuple(int(x) for x in n)
    kind, a = rule.kind, rule.value
    if kind == "fixed" and scorer is None:
        raise ValueError("the fixed rule needs the scorer (its direction)")
    if kind in {"anchor-mean", "anchor-quantile", "anchor-gaussian", "anchor-conformal", "mixture"}:
        empty = [names[d] for d in range(num) if n[d] == 0]
        if empty:
            raise FedqcError(
                f"rule '{rule}' per domain: no anchor with a finite score in domain "
                f"{', '.join(empty)}"
            )
    means = np.bincount(lab, weights=s, minlength=num) / np.maximum(n, 1)
    pooled_centre = float(s.mean()) if s.size else 0.0
    if kind == "drop-fraction":
        line = f"each client drops its lowest-scoring {a:g} of its samples of this domain"
        return DomainThresholds(None, None, means, pooled_centre, (line,) * num, anchors)
    if kind == "mixture":
        if num == 1:  # the single-τ mixture: scores not centred, bins on the anchors themselves
            centres, pooled_centre = np.zeros(1), 0.0
            edges = histogram_edges(s)
            lines = (guarantee(rule, s),)
        else:
            centres = means
            edges = histogram_edges(s - means[lab])
            lines = tuple(
                f"{name}: τ_d = its anchor mean + where the fit of the federation's scores, "
                "centred by their domain's anchor mean, finds clean and corrupted equally likely "
                "(no bound; assumes the domains differ only in location)"
                for name in names
            )
        return DomainThresholds(None, None, centres, pooled_centre, lines, anchors, edges)
    if num == 1:
        pooled = global_threshold(rule, scorer, s)
        return DomainThresholds(
            np.array([pooled]), pooled, means, pooled_centre, (guarantee(rule, s),), anchors
        )
    try:  # the all-anchor τ, for samples like no anchor under ood=pooled
        pooled = global_threshold(rule, scorer, s)
    except FedqcError:
        pooled = None
    if kind == "fixed":
        line = "a fixed τ, given in the scorer's units, the same in every domain (no anchors)"
        return DomainThresholds(
            np.full(num, pooled), pooled, means, pooled_centre, (line,) * num, anchors
        )
    if kind == "anchor-mean":
        lines = tuple(
            f"{name}: the paper's rule per domain: about half of this domain's clean samples "
            f"that look like its {n[d]} anchors fall below τ_d"
            for d, name in enumerate(names)
        )
        return DomainThresholds(means, pooled, means, pooled_centre, lines, anchors)
    if kind == "anchor-quantile":
        taus = means + float(np.quantile(s - means[lab], a))
        lines = tuple(
            f"{name}: about {a:g} of this domain's clean samples are rejected, if the domains' "
            f"clean scores differ only in location ({n[d]} own anchors, shape from all {s.size}; "
            "no bound)"
            for d, name in enumerate(names)
        )
        return DomainThresholds(taus, pooled, means, pooled_centre, lines, anchors)
    if kind == "anchor-gaussian":
        taus, _, dof = pooled_gaussian_thresholds(s, lab, num, a)
        lines = tuple(
            _gaussian_line(name, a, int(n[d]), s.size, num, dof) for d, name in enumerate(names)
        )
        return DomainThresholds(taus, pooled, means, pooled_centre, lines, anchors)
    if kind == "anchor-conformal":
        found = mondrian_thresholds(s, lab, num, a)
        short = [d for d, t in enumerate(found) if t is None]
        if short and not conformal_fallback:
            need = math.ceil(1 / a) - 1
            which = ", ".join(f"{names[d]} ({n[d]})" for d in short)
            raise FedqcError(
                f"anchor-conformal:{a:g} per domain needs ≥ {need} anchors in every domain; too "
                f"few in {which}: add anchors there, or use anchor-gaussian:{a:g} (location per "
                "domain, spread pooled: works with 2 per domain)"
            )
        taus, lines = np.empty(num), []
        if short:
            gauss, _, dof = pooled_gaussian_thresholds(s, lab, num, a)
        for d, name in enumerate(names):
            if found[d] is None:
                taus[d] = gauss[d]
                lines.append(
                    f"{name}: too few anchors for conformal ({n[d]}); "
                    + _gaussian_line(name, a, int(n[d]), s.size, num, dof).partition(": ")[2]
                )
            else:
                k = math.floor(a * (n[d] + 1))
                taus[d] = found[d]
                lines.append(
                    f"{name}: a clean sample exchangeable with this domain's {n[d]} anchors is "
                    f"rejected with probability at most {a:g} (exactly {k}/{n[d] + 1} = "
                    f"{k / (n[d] + 1):.3f} for continuous scores; Mondrian conformal)"
                )
        return DomainThresholds(taus, pooled, means, pooled_centre, tuple(lines), anchors)
    raise ValueError(f"no per-domain form for rule '{rule}'")


def _gaussian_line(name: str, alpha: float, n_d: int, total: int, num: int, dof: int) -> str:
    return (
        f"{name}: if each domain's clean scores are normal with their own mean and one sd shared "
        f"by all domains, a clean sample of this domain is rejected with probability {alpha:g} "
        f"({n_d} own anchors; sd pooled over {total} anchors in {num} domains, {dof} df)"
    )


# ---------------------------------------------------------------------------------------------
# The standard, and a client's decisions


@dataclass(frozen=True)
class DomainStandard:
    """What the server sends for the per-domain standard; all of it comes from the anchors."""

    rule: Rule
    names: tuple[str, ...]
    centroids: np.ndarray  # (D, dim) unit rows
    bounds: np.ndarray  # (D,) cosine distance beyond which a sample is like no anchor
    thresholds: DomainThresholds
    ood: str  # keep | reject | pooled
    reason: str  # why there are D domains

    def __post_init__(self) -> None:
        if self.ood not in OOD_SETTINGS:
            raise FedqcError(
                f"unknown out-of-domain setting '{self.ood}'; use one of {', '.join(OOD_SETTINGS)}"
            )

    @property
    def taus(self) -> np.ndarray | None:
        return self.thresholds.taus

    def with_mixture(self, centred_tau: float) -> DomainStandard:
        """The mixture rule's τ per domain once fitted on centred scores: centre_d + ``centred_tau``
        (and the pooled one for out-of-domain samples)."""
        t = self.thresholds
        return replace(
            self,
            thresholds=replace(
                t, taus=t.centres + centred_tau, pooled_tau=t.pooled_centre + centred_tau
            ),
        )

    def record(self) -> dict:
        """The standard as JSON-ready fields (for the plan file); :func:`standard_from_record`
        reads them back. An infinite bound (nothing out of domain) is written as null."""
        t = self.thresholds
        return {
            "rule": str(self.rule),
            "names": list(self.names),
            "reason": self.reason,
            "ood": self.ood,
            "centroids": self.centroids.tolist(),
            "bounds": [_finite_or_none(b) for b in self.bounds.tolist()],
            "taus": None if t.taus is None else t.taus.tolist(),
            "pooled_tau": t.pooled_tau,
            "centres": t.centres.tolist(),
            "pooled_centre": t.pooled_centre,
            "promises": list(t.promises),
            "anchors": list(t.anchors),
            "edges": None if t.edges is None else t.edges.tolist(),
        }

    def lines(self) -> list[str]:
        """For people: why D domains, then each domain's anchors, τ and promise."""
        t = self.thresholds
        out = [f"domains: {self.reason}; samples like no anchor: {self.ood}"]
        for d, name in enumerate(self.names):
            tau = "τ after the clients' histograms" if t.taus is None else f"τ = {t.taus[d]:.5g}"
            out.append(f"  {name}: {t.anchors[d]} anchors, {tau}; {t.promises[d]}")
        return out


def standard_from_record(data: dict) -> DomainStandard:
    """A :meth:`DomainStandard.record` read back (KeyError, TypeError, ValueError if malformed)."""
    names = tuple(str(x) for x in data["names"])
    cents = np.asarray(data["centroids"], dtype=np.float64)
    bounds = np.array([math.inf if b is None else float(b) for b in data["bounds"]])
    if cents.ndim != 2 or len(cents) != len(names) or len(bounds) != len(names):
        raise ValueError("one centroid and one bound per domain")
    taus = None if data["taus"] is None else np.asarray(data["taus"], dtype=np.float64)
    edges = None if data.get("edges") is None else np.asarray(data["edges"], dtype=np.float64)
    thresholds = DomainThresholds(
        taus,
        None if data["pooled_tau"] is None else float(data["pooled_tau"]),
        np.asarray(data["centres"], dtype=np.float64),
        float(data["pooled_centre"]),
        tuple(str(x) for x in data["promises"]),
        tuple(int(x) for x in data["anchors"]),
        edges,
    )
    return DomainStandard(
        parse_rule(str(data["rule"])),
        names,
        cents,
        bounds,
        thresholds,
        str(data["ood"]),
        str(data["reason"]),
    )


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def domain_standard(
    rule: Rule,
    anchor_oriented: np.ndarray,
    anchor_embeddings: np.ndarray,
    anchor_labels: Sequence[str | None] | None = None,
    *,
    scorer=None,
    ood: str = "pooled",
    margin: float = OOD_MARGIN,
    conformal_fallback: bool = False,
    **grouping,
) -> DomainStandard:
    """The per-domain standard of the anchors: domains (labels, or :func:`group_anchors`),
    centroids, out-of-domain bounds and τ per domain with its promises."""
    emb = np.asarray(anchor_embeddings, dtype=np.float64)
    if len(emb) != len(anchor_oriented):
        raise ValueError("one embedding per anchor score")
    g = anchor_domains(emb, anchor_labels, **grouping)
    thresholds = domain_thresholds(
        rule,
        anchor_oriented,
        g.labels,
        g.names,
        scorer=scorer,
        conformal_fallback=conformal_fallback,
    )
    if (
        ood == "pooled"
        and thresholds.pooled_tau is None
        and rule.kind
        not in {
            "drop-fraction",
            "mixture",
        }
    ):
        raise FedqcError(f"rule '{rule}' has no pooled τ for out-of-domain samples")
    return DomainStandard(
        rule,
        g.names,
        centroids(emb, g.labels, g.num_domains),
        ood_bounds(emb, g.labels, g.num_domains, margin),
        thresholds,
        ood,
        g.reason,
    )


@dataclass(frozen=True)
class DomainCounts:
    """One client's counts: all of the per-domain standard that may leave it."""

    samples: tuple[int, ...]  # per domain, samples assigned to it and not out of domain
    kept: tuple[int, ...]
    out_of_domain: int
    out_of_domain_kept: int
    non_finite: int  # samples with a non-finite score (always rejected)


@dataclass(frozen=True)
class DomainDecision:
    """One client's decisions. ``domain`` and ``out_of_domain`` never leave the client."""

    keep: np.ndarray  # bool per sample
    domain: np.ndarray  # nearest domain per sample
    out_of_domain: np.ndarray  # bool per sample
    counts: DomainCounts


def decide(
    standard: DomainStandard, oriented: np.ndarray, embeddings: np.ndarray
) -> DomainDecision:
    """Keep decisions of one client under ``standard``: a sample in domain d is kept when its
    finite score is ≥ τ_d; a sample like no anchor is kept (``keep``), rejected (``reject``) or
    judged by the pooled τ (``pooled``). Under ``drop-fraction`` each domain's samples (and the
    out-of-domain ones, as one more group unless kept or rejected outright) drop their lowest P.
    """
    x = np.asarray(oriented, dtype=np.float64)
    if len(x) != len(embeddings):
        raise ValueError("one embedding per score")
    finite = np.isfinite(x)
    if len(x) == 0:
        nearest, dist = np.zeros(0, dtype=np.int64), np.zeros(0)
    else:
        nearest, dist = assign(embeddings, standard.centroids)
    out = dist > standard.bounds[nearest]
    t = standard.thresholds
    keep = np.zeros(len(x), dtype=bool)
    if standard.rule.kind == "drop-fraction":
        groups = [(~out) & (nearest == d) for d in range(len(standard.names))]
        if standard.ood == "pooled":
            groups.append(out)
        for rows in groups:
            if rows.any():
                keep[rows] = select(x[rows], drop_fraction=standard.rule.value).keep
    else:
        if t.taus is None:
            raise FedqcError(f"rule '{standard.rule}': τ per domain not set yet (fit the mixture)")
        inside = ~out
        keep[inside] = finite[inside] & (x[inside] >= t.taus[nearest[inside]])
        if standard.ood == "pooled":
            keep[out] = finite[out] & (x[out] >= t.pooled_tau)
    if standard.ood == "keep":
        keep[out] = finite[out]
    elif standard.ood == "reject":
        keep[out] = False
    num = len(standard.names)
    counts = DomainCounts(
        tuple(int(((~out) & (nearest == d)).sum()) for d in range(num)),
        tuple(int((keep & ~out & (nearest == d)).sum()) for d in range(num)),
        int(out.sum()),
        int((keep & out).sum()),
        int((~finite).sum()),
    )
    return DomainDecision(keep, nearest, out, counts)


def centred_scores(
    standard: DomainStandard, oriented: np.ndarray, embeddings: np.ndarray
) -> np.ndarray:
    """The mixture rule's client side: each score minus its domain's centre (out-of-domain
    samples: the pooled centre), for the histogram over ``standard.thresholds.edges``."""
    x = np.asarray(oriented, dtype=np.float64)
    if len(x) == 0:
        return x
    nearest, dist = assign(embeddings, standard.centroids)
    out = dist > standard.bounds[nearest]
    t = standard.thresholds
    return x - np.where(out, t.pooled_centre, t.centres[nearest])
