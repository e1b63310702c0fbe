"""The per-domain standard: grouping, assignment, samples like no anchor, τ per domain."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from fedqc.errors import FedqcError
from fedqc.quality.domains import (
    PER_DOMAIN,
    anchor_domains,
    assign,
    centred_scores,
    centroids,
    decide,
    domain_standard,
    domain_thresholds,
    group_anchors,
    leave_one_out_distances,
    mondrian_thresholds,
    ood_bounds,
    pooled_gaussian_thresholds,
    standard_from_record,
)
from fedqc.quality.rules import RULES, global_threshold, guarantee, parse_rule
from fedqc.quality.selection import select
from fedqc.scoring.scorers import get_scorer

PPL = get_scorer("ppl")
DIM = 32


def clusters(rng, sizes, spread=0.15, dim=DIM):
    """Points around len(sizes) random orthogonal directions, and their cluster labels."""
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(sizes)]
    rows, labels = [], []
    for k, size in enumerate(sizes):
        rows.append(basis[k] + spread * rng.normal(size=(size, dim)) / math.sqrt(dim))
        labels += [k] * size
    return np.concatenate(rows), np.array(labels), basis


def same_partition(a, b):
    return (
        len(set(zip(a.tolist(), b.tolist(), strict=True)))
        == len(set(a.tolist()))
        == len(set(b.tolist()))
    )


# --- grouping ---------------------------------------------------------------------------------


def test_grouping_finds_three_clusters():
    x, truth, _ = clusters(np.random.default_rng(0), [5, 4, 6])
    g = group_anchors(x)
    assert g.num_domains == 3 and same_partition(g.labels, truth)
    assert g.reason.startswith("3 groups: silhouette") and "≥ 0.4 " in g.reason


def test_grouping_returns_one_group_for_one_cluster():
    for seed in range(5):
        x, _, _ = clusters(np.random.default_rng(seed), [12], spread=0.3)
        g = group_anchors(x)
        assert g.num_domains == 1 and (g.labels == 0).all(), g.reason
        assert g.reason.startswith("one group: ")


def test_grouping_too_few_anchors_is_one_group():
    x, _, _ = clusters(np.random.default_rng(0), [3])
    assert group_anchors(x).reason.startswith("one group: 3 anchors cannot form 2 groups")


def test_labels_win_over_grouping_and_must_be_all_or_none():
    x, _, _ = clusters(np.random.default_rng(0), [4, 4])
    g = anchor_domains(x, ["math", "code", "math", "code", "math", "code", "math", "code"])
    assert g.names == ("code", "math") and g.labels.tolist() == [1, 0] * 4
    assert g.reason == "2 domains from the anchors' labels (code 4, math 4)"
    with pytest.raises(FedqcError, match="1 of 8 anchors carry a domain"):
        anchor_domains(x, ["math"] + [None] * 7)
    assert anchor_domains(x, [None] * 8).reason.startswith("2 groups")


# --- assignment and samples like no anchor ----------------------------------------------------


def test_assignment_picks_the_nearest_centroid():
    rng = np.random.default_rng(1)
    x, truth, basis = clusters(rng, [6, 6, 6])
    c = centroids(x, truth, 3)
    samples = basis[[2, 0, 1, 1]] + 0.1 * rng.normal(size=(4, DIM)) / math.sqrt(DIM)
    nearest, dist = assign(samples, c)
    assert nearest.tolist() == [2, 0, 1, 1]
    assert np.allclose(
        dist, 1 - np.sum(samples / np.linalg.norm(samples, axis=1)[:, None] * c[nearest], axis=1)
    )
    # cosine, not euclidean: a long vector along centroid 0 is still domain 0
    assert assign(10 * basis[:1], c)[0].tolist() == [0]


def test_out_of_domain_flags_a_far_point_and_never_an_anchor():
    rng = np.random.default_rng(2)
    x, truth, basis = clusters(rng, [5, 5, 2])
    c = centroids(x, truth, 3)
    bounds = ood_bounds(x, truth, 3)
    nearest, dist = assign(x, c)
    assert (dist <= bounds[nearest]).all()  # no anchor is like no anchor
    far = np.linalg.qr(np.vstack([basis, rng.normal(size=(1, DIM))]).T)[0][:, 3]  # ⟂ all three
    mixed = basis[0] + basis[1]  # halfway between two domains: like neither
    near = basis[1] + 0.05 * rng.normal(size=DIM) / math.sqrt(DIM)
    nearest, dist = assign(np.stack([far, mixed, near]), c)
    assert (dist > bounds[nearest]).tolist() == [True, True, False]


def test_out_of_domain_bound_is_margin_times_largest_leave_one_out_distance():
    rng = np.random.default_rng(3)
    x, truth, _ = clusters(rng, [4, 1])
    loo = leave_one_out_distances(x, truth)
    assert np.isnan(loo[4]) and np.isfinite(loo[:4]).all()
    b = ood_bounds(x, truth, 2, margin=2.0)
    assert b[0] == pytest.approx(2 * loo[:4].max()) and b[1] == b[0]  # one anchor: borrows
    with pytest.raises(FedqcError, match="margin must be ≥ 1"):
        ood_bounds(x, truth, 2, margin=0.5)


# --- τ per domain -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[2, 3, 5, 10], [2, 2, 2, 2]])
def test_pooled_gaussian_rejects_alpha_per_domain_over_many_draws(sizes):
    """Control with known theory: normal clean scores, different means, one sd; 2–10 anchors
    per domain. The rejection rate of a clean sample, Φ((τ_d − μ_d)/σ) averaged over draws, must
    be α in every domain (with 2 per domain, N − D = 4 degrees of freedom: N − 1 would miss)."""
    rng = np.random.default_rng(4)
    alpha, sigma = 0.1, 0.7
    mus = np.array([-3.0, 0.0, 5.0, 1.0])
    sizes = np.array(sizes)
    labels = np.repeat(np.arange(4), sizes)
    draws = 4000
    rates = np.zeros((draws, 4))
    for i in range(draws):
        s = mus[labels] + sigma * rng.normal(size=labels.size)
        taus, _, dof = pooled_gaussian_thresholds(s, labels, 4, alpha)
        rates[i] = norm.cdf((taus - mus) / sigma)
    assert dof == sizes.sum() - 4
    assert np.abs(rates.mean(0) - alpha).max() < 0.005, rates.mean(0)


def test_mondrian_conformal_rejects_at_most_alpha_per_domain():
    """Exchangeable draws (any continuous law; here exponential and normal per domain): the
    rejection rate per domain is ≤ α and close to its exact value ⌊α(n+1)⌋/(n+1)."""
    rng = np.random.default_rng(5)
    alpha = 0.2
    sizes = np.array([6, 9, 13])  # exact 1/7, 2/10, 2/14: below α where ⌊⌋ rounds down
    labels = np.repeat(np.arange(3), sizes)
    draws = 6000
    rates = np.zeros((draws, 3))
    laws = [
        (lambda size: rng.exponential(2.0, size), lambda t: 1 - np.exp(-max(t, 0) / 2.0)),
        (lambda size: rng.normal(10, 1, size), lambda t: norm.cdf(t - 10)),
        (lambda size: rng.normal(-4, 3, size), lambda t: norm.cdf((t + 4) / 3)),
    ]
    for i in range(draws):
        s = np.concatenate([draw(n) for (draw, _), n in zip(laws, sizes, strict=True)])
        taus = mondrian_thresholds(s, labels, 3, alpha)
        rates[i] = [cdf(t) for (_, cdf), t in zip(laws, taus, strict=True)]
    exact = np.floor(alpha * (sizes + 1)) / (sizes + 1)
    assert (rates.mean(0) <= alpha + 0.005).all()
    assert np.abs(rates.mean(0) - exact).max() < 0.01, (rates.mean(0), exact)


def test_conformal_per_domain_with_too_few_anchors_fails_in_one_line_or_falls_back():
    s = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12, 13, 14, 15, 16, 17, 18, 19])
    labels = np.array([0] * 3 + [1] * 10)
    rule = parse_rule("anchor-conformal:0.1")
    with pytest.raises(FedqcError) as err:
        domain_thresholds(rule, s, labels, ("a", "b"))
    assert "needs ≥ 9 anchors in every domain; too few in a (3)" in str(err.value)
    assert "\n" not in str(err.value)
    t = domain_thresholds(rule, s, labels, ("a", "b"), conformal_fallback=True)
    gauss = pooled_gaussian_thresholds(s, labels, 2, 0.1)[0]
    assert t.taus[0] == gauss[0] and t.taus[1] == 10.0  # ⌊0.1·11⌋ = 1: the smallest of b
    assert t.promises[0].startswith("a: too few anchors for conformal (3); if each domain")
    assert "exactly 1/11" in t.promises[1]


@pytest.mark.parametrize(
    "text",
    [
        r.replace(":Q", ":0.2").replace(":A", ":0.2").replace(":V", ":3").replace(":P", ":0.2")
        for r in RULES
    ],
)
def test_every_rule_has_a_per_domain_form_or_says_why_not(text):
    rule = parse_rule(text)
    assert rule.kind in PER_DOMAIN
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1, 2], 10)
    s = np.array([0.0, 4.0, 8.0])[labels] + rng.normal(size=30)
    t = domain_thresholds(rule, s, labels, ("x", "y", "z"), scorer=PPL)
    assert len(t.promises) == 3 and all(t.promises)
    if t.taus is not None and rule.kind != "fixed":
        assert t.taus[0] < t.taus[1] < t.taus[2]  # each domain's τ follows its own location


def test_one_domain_reproduces_the_single_tau_bit_for_bit():
    rng = np.random.default_rng(7)
    s = rng.normal(size=12)
    s[3] = np.nan
    labels = np.zeros(12, dtype=np.int64)
    for text in (
        "anchor-mean",
        "anchor-quantile:0.2",
        "anchor-gaussian:0.1",
        "anchor-conformal:0.1",
        "fixed:3",
    ):
        rule = parse_rule(text)
        t = domain_thresholds(rule, s, labels, ("all",), scorer=PPL)
        assert t.taus[0] == global_threshold(rule, PPL, s) == t.pooled_tau
        assert t.promises == (guarantee(rule, s[np.isfinite(s)]),)


def test_one_domain_without_labels_decides_exactly_as_the_single_tau_rule():
    rng = np.random.default_rng(8)
    anchors, _, basis = clusters(rng, [10], spread=0.3)
    anchor_scores = rng.normal(size=10)
    client = basis[0] + 0.3 * rng.normal(size=(200, DIM)) / math.sqrt(DIM)
    client[:20] = rng.normal(size=(20, DIM))  # some like no anchor: judged by the same pooled τ
    scores = rng.normal(-0.5, 1.2, size=200)
    scores[5] = np.nan
    for text in ("anchor-gaussian:0.1", "anchor-mean", "anchor-conformal:0.1"):
        rule = parse_rule(text)
        standard = domain_standard(rule, anchor_scores, anchors)
        assert standard.names == ("all",) and standard.reason.startswith("one group")
        got = decide(standard, scores, client)
        want = select(scores, global_threshold(rule, PPL, anchor_scores))
        assert got.counts.out_of_domain > 0
        assert (got.keep == want.keep).all()
        assert sum(got.counts.kept) + got.counts.out_of_domain_kept == want.kept
        assert got.counts.non_finite == want.rejected_non_finite == 1


def test_decide_applies_each_domain_its_own_tau_and_the_ood_setting():
    rng = np.random.default_rng(9)
    anchors, truth, basis = clusters(rng, [4, 4], spread=0.1)
    anchor_scores = np.where(truth == 0, 0.0, 10.0) + np.tile([-1.0, -0.5, 0.5, 1.0], 2)
    labels = ["easy" if t else "hard" for t in truth]  # sorted: hard = 0, easy = 1
    rule = parse_rule("anchor-gaussian:0.1")
    far = np.linalg.qr(np.vstack([basis, rng.normal(size=(1, DIM))]).T)[0][:, 2]
    emb = np.stack([basis[0], basis[0], basis[1], basis[1], far, far])
    scores = np.array([-0.5, -9.0, 9.5, 0.5, 9.5, -20.0])
    results = {}
    for ood in ("keep", "reject", "pooled"):
        standard = domain_standard(rule, anchor_scores, anchors, labels, ood=ood)
        assert standard.names == ("easy", "hard")
        results[ood] = decide(standard, scores, emb)
    d = results["pooled"]
    assert d.domain[:4].tolist() == [1, 1, 0, 0] and d.out_of_domain.tolist() == [0] * 4 + [1] * 2
    # hard-domain −0.5 kept, −9 not; easy-domain 9.5 kept, 0.5 (fine in the hard domain) not
    assert d.keep[:4].tolist() == [True, False, True, False]
    assert results["keep"].keep[4:].tolist() == [True, True]
    assert results["reject"].keep[4:].tolist() == [False, False]
    assert d.keep[4:].tolist() == [True, False]  # the pooled τ is between the domains
    assert d.counts.samples == (2, 2) and d.counts.kept == (1, 1)
    assert (d.counts.out_of_domain, d.counts.out_of_domain_kept) == (2, 1)
    lines = domain_standard(rule, anchor_scores, anchors, labels).lines()
    assert lines[0].startswith("domains: 2 domains from the anchors' labels (easy 4, hard 4)")
    assert lines[1].startswith("  easy: 4 anchors, τ = ")


def test_drop_fraction_ranks_within_each_domain():
    rng = np.random.default_rng(10)
    anchors, truth, basis = clusters(rng, [4, 4], spread=0.1)
    standard = domain_standard(
        parse_rule("drop-fraction:0.5"),
        rng.normal(size=8),
        anchors,
        ["a" if t == 0 else "b" for t in truth],
    )
    emb = np.stack([basis[0]] * 4 + [basis[1]] * 4)
    scores = np.array([1.0, 2, 3, 4, 11, 12, 13, 14])
    assert decide(standard, scores, emb).keep.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_mixture_per_domain_centres_scores_by_domain():
    rng = np.random.default_rng(11)
    anchors, truth, basis = clusters(rng, [3, 3], spread=0.1)
    anchor_scores = np.array([0.0, 1, 2, 10, 11, 12])
    standard = domain_standard(parse_rule("mixture"), anchor_scores, anchors, ["a"] * 3 + ["b"] * 3)
    assert standard.thresholds.centres.tolist() == [1.0, 11.0]
    emb = np.stack([basis[0], basis[1]])
    assert centred_scores(standard, np.array([1.5, 11.5]), emb).tolist() == [0.5, 0.5]
    with pytest.raises(FedqcError, match="fit the mixture"):
        decide(standard, np.array([1.5, 11.5]), emb)
    fitted = standard.with_mixture(-0.25)
    assert fitted.taus.tolist() == [0.75, 10.75]
    assert decide(fitted, np.array([0.5, 11.0]), emb).keep.tolist() == [False, True]


def test_the_standard_survives_its_json_record():
    rng = np.random.default_rng(12)
    anchors, truth, basis = clusters(rng, [4, 4, 1])
    labels = ["a", "b", "c"]
    for text in ("anchor-gaussian:0.1", "mixture", "drop-fraction:0.3"):
        standard = domain_standard(
            parse_rule(text), rng.normal(size=9), anchors, [labels[t] for t in truth], ood="keep"
        )
        back = standard_from_record(json.loads(json.dumps(standard.record())))
        assert back.record() == standard.record()
        emb = basis[[0, 1, 2, 2]] + 0.3 * rng.normal(size=(4, DIM))
        scores = rng.normal(size=4)
        if standard.taus is not None or text.startswith("drop"):
            assert (decide(back, scores, emb).keep == decide(standard, scores, emb).keep).all()
    lone = domain_standard(parse_rule("anchor-mean"), np.zeros(1), anchors[:1])
    assert (
        lone.record()["bounds"] == [None]
        and standard_from_record(lone.record()).bounds[0] == np.inf
    )


def test_anchor_files_may_carry_a_domain(tmp_path):
    from fedqc.data.samples import load_samples

    rows = [
        {"question": "q1", "answer": "a1", "domain": "code"},
        {"question": "q2", "answer": "a2", "domain": " "},
        {"question": "q3", "answer": "a3"},
    ]
    path = tmp_path / "anchors.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [s.domain for s in load_samples(path)] == ["code", None, None]
    path.write_text(json.dumps({"question": "q", "answer": "a", "domain": 3}))
    with pytest.raises(FedqcError, match="the domain must be a string"):
        load_samples(path)
