"""Benchmark federations with known corruptions: who holds how many corrupted samples, and which.

Three steps, each deterministic given its random generator:

1. :func:`corrupted_counts` - how many of each client's samples are corrupted, by partition:
   ``iid`` (a global proportion, spread at random), ``niid-1`` (the corrupted samples split over
   clients by a Dirichlet(β) draw, equal client sizes; paper [A] App. B), ``niid-2`` (half the
   clients 70% corrupted, half 90%) or ``explicit`` (one proportion per client).
2. :func:`corrupt_variants` - corrupted versions of each item's answer (cut, deletion, exchange,
   substitute, noise; :mod:`fedqc.data.corrupt`). A variant identical to the clean text is
   dropped, so a sample flagged as corrupted always differs from its clean answer.
3. :func:`assemble` - disjoint items for every client: its corrupted samples (a balanced mixture
   of the chosen types) and its clean ones.

:func:`build_federation` runs all three on a list of samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedqc.data.corrupt import CORRUPTIONS, cut, deletion, exchange, noise, substitute
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError

PARTITIONS = ("iid", "niid-1[:β]", "niid-2[:LO,HI]", "explicit[:R1,R2,...]")
NIID2_RATES = (0.7, 0.9)


@dataclass(frozen=True)
class Partition:
    kind: str  # iid, niid-1, niid-2 or explicit
    beta: float = 1.0  # niid-1: Dirichlet concentration
    rates: tuple[float, ...] = ()  # niid-2: (low, high); explicit: one per client (or one for all)

    def __str__(self) -> str:
        if self.kind == "niid-1":
            return f"niid-1:{self.beta:g}"
        if self.rates:
            return f"{self.kind}:{','.join(f'{r:g}' for r in self.rates)}"
        return self.kind


def parse_partition(text: str) -> Partition:
    """``iid``, ``niid-1`` / ``niid-1:β``, ``niid-2`` / ``niid-2:LO,HI``, ``explicit:R1,R2,...``."""
    kind, _, arg = text.strip().partition(":")
    try:
        values = tuple(float(x) for x in arg.split(",")) if arg else ()
    except ValueError:
        values = (math.nan,)
    rates_ok = all(0 <= v <= 1 for v in values)
    if kind == "iid" and not arg:
        return Partition(kind)
    if kind == "niid-1" and len(values) <= 1 and all(math.isfinite(v) and v > 0 for v in values):
        return Partition(kind, beta=values[0] if values else 1.0)
    if kind == "niid-2" and len(values) in (0, 2) and rates_ok:
        return Partition(kind, rates=values or NIID2_RATES)
    if kind == "explicit" and rates_ok:  # no rates: the caller supplies them
        return Partition(kind, rates=values)
    raise FedqcError(
        f"unknown partition '{text}'; use one of: {', '.join(PARTITIONS)} "
        "(β > 0, rates in [0, 1]; e.g. niid-1:0.5 or explicit:0.1,0.3,0.5,0.7)"
    )


def corrupted_counts(
    partition: Partition,
    num_clients: int,
    samples_per_client: int,
    contamination: float,
    rng: np.random.Generator,
) -> list[int]:
    """How many of each client's ``samples_per_client`` samples are corrupted.

    ``contamination`` is the global proportion for ``iid`` and ``niid-1`` (their total is exactly
    round(contamination × all samples)); ``niid-2`` and ``explicit`` carry their own rates.
    """
    n, total = samples_per_client, num_clients * samples_per_client
    if partition.kind in ("iid", "niid-1") and not 0 <= contamination <= 1:
        raise FedqcError(f"contamination {contamination}: must be in [0, 1]")
    if partition.kind == "iid":
        flags = np.zeros(total, dtype=np.int64)
        flags[: round(contamination * total)] = 1
        flags = rng.permutation(flags)
        return [int(flags[c * n : (c + 1) * n].sum()) for c in range(num_clients)]
    if partition.kind == "niid-1":
        share = rng.dirichlet(np.full(num_clients, partition.beta))
        return _spread(round(contamination * total), share, n)
    if partition.kind == "niid-2":
        low, high = partition.rates
        return [round((low if c < num_clients // 2 else high) * n) for c in range(num_clients)]
    if partition.kind == "explicit":
        rates = partition.rates * num_clients if len(partition.rates) == 1 else partition.rates
        if len(rates) != num_clients:  # none given also lands here
            raise FedqcError(
                f"partition '{partition}': gives {len(rates)} rates for {num_clients} clients"
            )
        return [round(r * n) for r in rates]
    raise FedqcError(f"unknown partition kind '{partition.kind}'")


def _spread(total: int, share: np.ndarray, capacity: int) -> list[int]:
    """Integers proportional to ``share`` summing to ``total``, none above ``capacity``.

    Largest remainders first; what a full client cannot take goes to the clients with room, the
    largest share first.
    """
    exact = share * total
    counts = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[c] += 1
    excess = int(np.clip(counts - capacity, 0, None).sum())
    counts = np.minimum(counts, capacity)
    for c in np.argsort(-share, kind="stable"):
        take = min(excess, capacity - int(counts[c]))
        counts[c] += take
        excess -= take
    return [int(x) for x in counts]


def balanced_types(n: int, types: Sequence[str], rng: random.Random) -> list[str]:
    """``n`` corruption types, each ⌊n/k⌋ or ⌈n/k⌉ times (which get one more is random)."""
    start = rng.randrange(len(types))
    kinds = [types[(start + i) % len(types)] for i in range(n)]
    rng.shuffle(kinds)
    return kinds


def corrupt_variants(
    answers: Sequence[str],
    wanted: Sequence[Sequence[str]],
    rng: random.Random,
    vocabulary: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """For each answer, its corrupted versions of the types in ``wanted[i]``.

    ``exchange`` gives item i the answer of another item that also wants an exchange variant
    (a derangement among them). ``substitute`` draws words from ``vocabulary`` (default: every word
    of the answers). A variant whose text equals the answer is left out.
    """
    if vocabulary is None:
        vocabulary = sorted({w for a in answers for w in a.split()})
    unknown = {t for types in wanted for t in types} - set(CORRUPTIONS)
    if unknown:
        raise FedqcError(f"unknown corruption {sorted(unknown)}; use {', '.join(CORRUPTIONS)}")
    out: list[dict[str, str]] = [{} for _ in answers]
    swap = [i for i, types in enumerate(wanted) if "exchange" in types]
    if len(swap) >= 2:
        for i, text in zip(swap, exchange([answers[i] for i in swap], rng), strict=True):
            out[i]["exchange"] = text
    for i, types in enumerate(wanted):
        for kind in types:
            if kind == "cut":
                out[i][kind] = cut(answers[i], rng)
            elif kind == "deletion":
                out[i][kind] = deletion(answers[i], rng)
            elif kind == "substitute":
                out[i][kind] = substitute(answers[i], rng, list(vocabulary))
            elif kind == "noise":
                out[i][kind] = noise(answers[i], rng)
        out[i] = {k: v for k, v in out[i].items() if v != answers[i]}
    return out


@dataclass(frozen=True)
class Member:
    """One sample of a client: an item of the pool, clean (None) or in one corruption type."""

    item: int
    corruption: str | None

    @property
    def corrupted(self) -> bool:
        return self.corruption is not None


def assemble(
    available: Sequence[Sequence[str]],
    sizes: Sequence[int],
    counts: Sequence[int],
    types: Sequence[str],
    rng: random.Random,
) -> list[list[Member]]:
    """Disjoint items for each client c: ``counts[c]`` corrupted, ``sizes[c] − counts[c]`` clean.

    ``available[i]`` lists the corruption types item i has a variant of. Each client's corrupted
    samples are a balanced mixture of ``types``; corrupted samples are placed first (for every
    client), so clean samples never use up the items a type needs.
    """
    order = list(range(len(available)))
    rng.shuffle(order)
    used: set[int] = set()
    queues = {t: [i for i in order if t in available[i]] for t in types}
    heads = dict.fromkeys(types, 0)

    def take(kind: str) -> int:
        queue = queues[kind]
        while heads[kind] < len(queue) and queue[heads[kind]] in used:
            heads[kind] += 1
        if heads[kind] == len(queue):
            raise FedqcError(
                f"the pool has too few items with a '{kind}' variant for this federation; "
                "use a larger pool or fewer corrupted samples"
            )
        used.add(queue[heads[kind]])
        return queue[heads[kind]]

    clients: list[list[Member]] = []
    for size, n_bad in zip(sizes, counts, strict=True):
        if not 0 <= n_bad <= size:
            raise ValueError(f"{n_bad} corrupted samples do not fit a client of {size}")
        clients.append([Member(take(k), k) for k in balanced_types(n_bad, types, rng)])
    free = (i for i in order if i not in used)
    for size, members in zip(sizes, clients, strict=True):
        for _ in range(size - len(members)):
            item = next(free, None)
            if item is None:
                raise FedqcError(
                    f"the pool has {len(available)} items: too few for this federation"
                )
            used.add(item)
            members.append(Member(item, None))
        rng.shuffle(members)
    return clients


def build_federation(
    samples: Sequence[Sample],
    partition: Partition,
    num_clients: int,
    samples_per_client: int,
    contamination: float = 0.0,
    types: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
) -> list[list[dict]]:
    """Client pools built from clean ``samples``: per sample ``id``, ``prompt``, ``response``
    (corrupted or not), ``corrupted`` and ``corruption`` (the ground-truth flags)."""
    rng = random.Random(f"fedqc-federation-{seed}")
    counts = corrupted_counts(
        partition, num_clients, samples_per_client, contamination, np.random.default_rng(seed)
    )
    variants = corrupt_variants([s.response for s in samples], [tuple(types)] * len(samples), rng)
    clients = assemble(
        [tuple(v) for v in variants], [samples_per_client] * num_clients, counts, types, rng
    )
    return [
        [
            {
                "id": samples[m.item].id,
                "prompt": samples[m.item].prompt,
                "response": variants[m.item][m.corruption]
                if m.corrupted
                else samples[m.item].response,
                "corrupted": m.corrupted,
                "corruption": m.corruption,
            }
            for m in members
        ]
        for members in clients
    ]
