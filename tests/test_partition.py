"""Benchmark federations: partitions (counts, determinism), corruption variants, assembly."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from fedqc.data.corrupt import CORRUPTIONS
from fedqc.data.partition import (
    NIID2_RATES,
    Partition,
    _spread,
    assemble,
    balanced_types,
    build_federation,
    corrupt_variants,
    corrupted_counts,
    parse_partition,
)
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError

ANSWERS = [
    f"Step one: item {i} costs {i + 3} dollars.\nStep two: {i + 3} * 2 = {2 * i + 6}.\n"
    f"#### {2 * i + 6}"
    for i in range(60)
]
SAMPLES = [Sample(f"s{i}", f"What is twice {i + 3}?", a) for i, a in enumerate(ANSWERS)]


def _subsequence(small, big) -> bool:
    it = iter(big)
    return all(x in it for x in small)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("iid", Partition("iid")),
        ("niid-1", Partition("niid-1", beta=1.0)),
        ("niid-1:0.5", Partition("niid-1", beta=0.5)),
        ("niid-2", Partition("niid-2", rates=NIID2_RATES)),
        ("niid-2:0.6,0.8", Partition("niid-2", rates=(0.6, 0.8))),
        ("explicit:0.1,0.3", Partition("explicit", rates=(0.1, 0.3))),
        ("explicit", Partition("explicit")),
    ],
)
def test_parse_partition(text, expected):
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    "text", ["dirichlet", "iid:0.3", "niid-1:0", "niid-1:x", "niid-2:0.7", "explicit:1.5", ""]
)
def test_parse_partition_errors(text):
    with pytest.raises(FedqcError, match="unknown partition"):
        parse_partition(text)


# --- how many corrupted samples each client holds ---------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_iid_hits_the_global_rate_and_spreads_it_evenly(rate, seed):
    counts = corrupted_counts(Partition("iid"), 5, 200, rate, np.random.default_rng(seed))
    assert sum(counts) == round(rate * 1000)
    assert all(abs(c / 200 - rate) < 0.1 for c in counts), counts


@pytest.mark.parametrize("seed", range(5))
def test_niid1_total_is_exact_and_capped_by_client_size(seed):
    counts = corrupted_counts(Partition("niid-1", 0.3), 6, 50, 0.5, np.random.default_rng(seed))
    assert sum(counts) == 150
    assert all(0 <= c <= 50 for c in counts)


def test_niid1_beta_controls_heterogeneity():
    def spread(beta):
        draws = [
            corrupted_counts(Partition("niid-1", beta), 8, 100, 0.4, np.random.default_rng(s))
            for s in range(20)
        ]
        return np.mean([np.std(c) for c in draws])

    assert spread(0.1) > 3 * spread(100.0)
    assert spread(100.0) < 5  # near-equal shares: 40 ± a few per client


def test_niid1_share_follows_the_dirichlet_draw():
    # Same generator, same draw: counts are the largest-remainder rounding of share × total.
    share = np.random.default_rng(3).dirichlet(np.ones(4))
    counts = corrupted_counts(Partition("niid-1"), 4, 100, 0.25, np.random.default_rng(3))
    assert np.all(np.abs(np.array(counts) - share * 100) < 1)


def test_niid2_half_at_70_half_at_90():
    counts = corrupted_counts(Partition("niid-2", rates=(0.7, 0.9)), 4, 50, 0.0, None)
    assert counts == [35, 35, 45, 45]


def test_explicit_rates_one_per_client_or_one_for_all():
    assert corrupted_counts(Partition("explicit", rates=(0.1, 0.5)), 2, 20, 0.0, None) == [2, 10]
    assert corrupted_counts(Partition("explicit", rates=(0.25,)), 3, 8, 0.0, None) == [2, 2, 2]
    with pytest.raises(FedqcError, match="3 rates for 2 clients"):
        corrupted_counts(Partition("explicit", rates=(0.1, 0.2, 0.3)), 2, 10, 0.0, None)


def test_counts_are_deterministic_by_seed():
    def run(part, seed):
        return corrupted_counts(part, 10, 30, 0.4, np.random.default_rng(seed))

    for part in (Partition("iid"), Partition("niid-1", 0.5)):
        assert run(part, 7) == run(part, 7)
        assert len({tuple(run(part, s)) for s in range(10)}) > 1


@pytest.mark.parametrize(
    "share, total, capacity, expected",
    [
        ([0.5, 0.5], 7, 10, [4, 3]),  # largest remainder; a tie goes to the first
        ([0.9, 0.1], 15, 10, [10, 5]),  # the overflow of a full client moves on
        ([0.7, 0.2, 0.1], 27, 10, [10, 10, 7]),
    ],
)
def test_spread_hand_computed(share, total, capacity, expected):
    assert _spread(total, np.array(share), capacity) == expected


# --- corruption variants ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_every_variant_changes_the_text_the_way_its_type_says(seed):
    variants = corrupt_variants(ANSWERS, [CORRUPTIONS] * len(ANSWERS), random.Random(seed))
    vocab = {w for a in ANSWERS for w in a.split()}
    for original, v in zip(ANSWERS, variants, strict=True):
        assert set(v) == set(CORRUPTIONS)  # none came out unchanged on these answers
        assert original.startswith(v["cut"]) and len(v["cut"]) < len(original)
        assert "####" not in v["cut"]
        kept = v["deletion"].split(" ")
        assert _subsequence(kept, original.split(" ")) and len(kept) < len(original.split(" "))
        assert v["exchange"] in ANSWERS and v["exchange"] != original
        words, subs = original.split(" "), v["substitute"].split(" ")
        assert len(subs) == len(words)
        changed = [b for a, b in zip(words, subs, strict=True) if a != b]
        assert changed and all(set(b.split()) <= vocab for b in changed)
        assert _subsequence(original, v["noise"]) and len(v["noise"]) > len(original)
    exchanged = [v["exchange"] for v in variants]
    assert Counter(exchanged) == Counter(ANSWERS)  # a derangement: every answer moved once


def test_a_variant_equal_to_the_answer_is_left_out():
    # One word: cut and deletion cannot change it; noise always can.
    variants = corrupt_variants(["42"], [("cut", "deletion", "noise")], random.Random(0))
    assert set(variants[0]) == {"noise"}


def test_unknown_corruption():
    with pytest.raises(FedqcError, match="unknown corruption"):
        corrupt_variants(["a b"], [("swap",)], random.Random(0))


@pytest.mark.parametrize("n", [0, 3, 5, 12, 23])
def test_balanced_types(n):
    kinds = balanced_types(n, CORRUPTIONS, random.Random(n))
    counts = Counter(kinds)
    assert len(kinds) == n
    assert max(counts.values(), default=0) - min(counts.get(t, 0) for t in CORRUPTIONS) <= 1


# --- assembling clients -----------------------------------------------------------------------


def test_assemble_gives_disjoint_items_with_the_asked_counts_and_types():
    available = [(CORRUPTIONS[i % 5],) for i in range(100)]  # one variant per item
    clients = assemble(available, [20, 20, 20], [2, 10, 16], CORRUPTIONS, random.Random(0))
    items = [m.item for c in clients for m in c]
    assert len(items) == len(set(items)) == 60
    assert [sum(m.corrupted for m in c) for c in clients] == [2, 10, 16]
    for c in clients:
        for m in c:
            assert m.corruption is None or m.corruption in available[m.item]
    kinds = Counter(m.corruption for m in clients[2] if m.corrupted)
    assert max(kinds.values()) - min(kinds.values()) <= 1 and len(kinds) == 5


def test_assemble_runs_out_of_a_type():
    available = [("cut",)] * 3 + [("noise",)] * 20
    with pytest.raises(FedqcError, match="too few items with a 'cut' variant"):
        assemble(available, [10], [8], ("cut", "noise"), random.Random(0))
    with pytest.raises(FedqcError, match="too few for this federation"):
        assemble(available, [15, 15], [0, 0], ("cut",), random.Random(0))


# --- whole federations --------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "niid-1", "niid-2", "explicit:0.1,0.3,0.5"])
def test_build_federation_flags_match_the_text(partition):
    clients = build_federation(SAMPLES, parse_partition(partition), 3, 15, 0.4, seed=2)
    original = {s.id: s for s in SAMPLES}
    ids = [x["id"] for c in clients for x in c]
    assert len(ids) == len(set(ids)) == 45
    for c in clients:
        for x in c:
            assert x["prompt"] == original[x["id"]].prompt
            assert x["corrupted"] == (x["response"] != original[x["id"]].response)
            assert (x["corruption"] is None) == (not x["corrupted"])
            if x["corruption"] == "cut":
                assert original[x["id"]].response.startswith(x["response"])


def test_build_federation_proportions():
    clients = build_federation(SAMPLES, Partition("explicit", rates=(0.2, 0.6)), 2, 20, seed=0)
    assert [sum(x["corrupted"] for x in c) for c in clients] == [4, 12]
    clients = build_federation(SAMPLES, Partition("iid"), 3, 20, 0.5, seed=0)
    assert sum(x["corrupted"] for c in clients for x in c) == 30
    kinds = Counter(x["corruption"] for c in clients for x in c if x["corrupted"])
    assert set(kinds) == set(CORRUPTIONS)


def test_build_federation_is_deterministic_by_seed():
    def run(seed):
        return build_federation(SAMPLES, Partition("niid-1"), 3, 10, 0.5, seed=seed)

    assert run(4) == run(4)
    assert run(4) != run(5)
