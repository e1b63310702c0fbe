"""`fedqc bench`: arms and metrics against hand-computed cases, config, the scored pool, and a tiny
end-to-end run on the random tiny model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedqc.bench.arms import Arm, auc, make_arms, outcome_metrics, run_arm
from fedqc.bench.config import BenchConfig, load_bench_config
from fedqc.bench.experiment import fitting_size, make_federation
from fedqc.bench.pool import BenchData, score_losses, split_data
from fedqc.bench.publish import anchor_summary
from fedqc.bench.run import arms_to_train, run_bench
from fedqc.config import Config, ModelConfig, QualityConfig
from fedqc.data.partition import Partition
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.loading import load
from fedqc.scoring.scorers import SCORERS, score_samples

# Two clients; oriented scores (higher = better) and ground truth (clean = True).
SCORES = [np.array([0.9, 0.1, 0.5, 0.7]), np.array([0.2, 0.8, 0.3])]
CLEAN = [np.array([True, False, True, False]), np.array([False, True, True])]
ANCHORS = np.array([0.4, 0.6])
RATE = 3 / 7  # 3 corrupted of 7


def _arm(kind, rule=None):
    return Arm(kind, kind, None if kind in ("mixed", "oracle") else "cond-prob", rule)


# --- arms and metrics, by hand ------------------------------------------------------------------


@pytest.mark.parametrize(
    "arm, keep, tau, client_tau",
    [
        (_arm("mixed"), [[1, 1, 1, 1], [1, 1, 1]], None, [None, None]),
        (_arm("oracle"), [[1, 0, 1, 0], [0, 1, 1]], None, [None, None]),
        # τ = mean(0.4, 0.6) = 0.5; keep score ≥ τ
        (_arm("qc", "anchor-mean"), [[1, 0, 1, 1], [0, 1, 0]], 0.5, [0.5, 0.5]),
        # np.quantile([0.4, 0.6], 0.5) = 0.5 as well; 0.25-quantile = 0.45
        (_arm("qc", "anchor-quantile:0.25"), [[1, 0, 1, 1], [0, 1, 0]], 0.45, [0.45, 0.45]),
        # each client drops round(3/7 × n): 2 of 4 (0.1, 0.5) and 1 of 3 (0.2)
        (_arm("drop-fraction"), [[1, 0, 0, 1], [0, 1, 1]], None, [0.7, 0.3]),
        # pooled: drop the 3 lowest of 7 (0.1, 0.2, 0.3)
        (_arm("global-proportion"), [[1, 0, 1, 1], [0, 1, 0]], 0.5, [0.5, 0.5]),
    ],
)
def test_run_arm_hand_computed(arm, keep, tau, client_tau):
    outcome = run_arm(arm, SCORES, CLEAN, ANCHORS, RATE)
    assert [k.tolist() for k in outcome.keep] == [[bool(x) for x in k] for k in keep]
    assert outcome.tau == pytest.approx(tau)
    assert outcome.client_tau == pytest.approx(client_tau)


def test_outcome_metrics_hand_computed():
    outcome = run_arm(_arm("qc", "anchor-mean"), SCORES, CLEAN, ANCHORS, RATE)
    per_client, overall = outcome_metrics(outcome, CLEAN)
    # client 0 keeps 0.9 (clean), 0.5 (clean), 0.7 (corrupted): P 2/3, R 2/2, acc 3/4
    assert per_client[0]["precision"] == pytest.approx(2 / 3)
    assert per_client[0]["recall"] == pytest.approx(1.0)
    assert per_client[0]["f1"] == pytest.approx(0.8)
    assert per_client[0]["accuracy"] == pytest.approx(0.75)
    assert per_client[0]["kept"] == 3 and per_client[0]["total"] == 4
    # client 1 keeps 0.8 (clean) and drops 0.3 (clean): P 1, R 1/2, F1 2/3, acc 2/3
    assert per_client[1]["f1"] == pytest.approx(2 / 3)
    assert per_client[1]["accuracy"] == pytest.approx(2 / 3)
    # overall: kept 4, of which 3 clean; 4 clean in all; 5 of 7 decisions right
    assert overall["precision"] == pytest.approx(0.75)
    assert overall["recall"] == pytest.approx(0.75)
    assert overall["f1"] == pytest.approx(0.75)
    assert overall["accuracy"] == pytest.approx(5 / 7)
    assert overall["kept_fraction"] == pytest.approx(4 / 7)


def test_non_finite_scores_are_dropped_by_every_scoring_arm():
    scores = [np.array([np.nan, 1.0, 2.0, 3.0])]
    clean = [np.array([True, True, True, False])]
    for arm in (_arm("qc", "anchor-mean"), _arm("drop-fraction"), _arm("global-proportion")):
        assert not run_arm(arm, scores, clean, np.array([0.0]), 0.25).keep[0][0]


def _two_bumps(rng, clean_n, bad_n):
    """Clean scores around 0 (sd 0.2), corrupted around -4 (sd 0.5): the gap is (-2.5, -0.6)."""
    flags = np.array([True] * clean_n + [False] * bad_n)
    scores = np.concatenate([rng.normal(0, 0.2, clean_n), rng.normal(-4, 0.5, bad_n)])
    order = rng.permutation(len(flags))
    return scores[order], flags[order]


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_mixture_arm_puts_tau_in_the_gap_without_the_rate(rate):
    from fedqc.quality.mixture import fit_mixture, histogram, histogram_edges

    rng = np.random.default_rng(1)
    clients = [_two_bumps(rng, round(n * (1 - rate)), round(n * rate)) for n in (40, 60, 100)]
    scores, clean = [c[0] for c in clients], [c[1] for c in clients]
    anchors = rng.normal(0, 0.2, 10)
    arm = _arm("qc", "mixture")
    # the true rate is not used by the rule: any value gives the same τ
    outcome = run_arm(arm, scores, clean, anchors, true_rate=0.0)
    assert -2.5 < outcome.tau < -0.6
    assert outcome.client_tau == [outcome.tau] * 3
    assert [k.tolist() for k in outcome.keep] == [c.tolist() for c in clean]
    # the federation's way: the server sums the clients' histograms over the anchor-fixed bins
    edges = histogram_edges(anchors)
    pooled = histogram(np.concatenate(scores), edges)
    assert sum(histogram(s, edges) for s in scores).tolist() == pooled.tolist()
    assert outcome.tau == fit_mixture(edges, pooled, anchors).tau


def _hand_made_pool(n_items=60, types=("cut", "noise")):
    """A pool whose losses separate perfectly: ℓ(r|q) ≈ 1 for clean answers, ≈ 3 corrupted; the
    bare loss ℓ(r) ≈ 2 everywhere. Anchors: clean-like."""
    from fedqc.bench.pool import Losses

    rng = np.random.default_rng(0)
    data = _data(n_items, list(types))
    data.anchors = [Sample(f"a{k}", f"qa{k}", f"anchor {k}") for k in range(20)]
    entries = data.entries()
    bad = np.array([k is not None for _, k in entries])
    cond = np.where(bad, 3.0, 1.0) + rng.normal(0, 0.05, len(entries))
    losses = Losses(cond, 2.0 + rng.normal(0, 0.05, len(entries)), np.zeros(len(entries), bool))
    anchor_losses = Losses(
        1.0 + rng.normal(0, 0.05, 20), 2.0 + rng.normal(0, 0.05, 20), np.zeros(20, bool)
    )
    return data, losses, anchor_losses


def test_every_rule_and_the_ensemble_on_a_hand_made_pool():
    from fedqc.bench.experiment import NA, Experiment, ForwardScores, Selector

    data, losses, anchor_losses = _hand_made_pool()
    scorers = ["cond-prob", "ensemble:ppl+ifd"]
    rules = ["anchor-mean", "anchor-quantile:0.1", "anchor-conformal:0.1", "mixture"]
    arms = make_arms(scorers, rules)
    selector = Selector([ForwardScores(s, losses, anchor_losses) for s in scorers], np.arange(10))
    experiment = Experiment(selector, arms, data, 2, ["cut", "noise"], 0, 10)
    fed = make_federation(
        data, Partition("explicit", rates=(0.2, 0.6)), 2, 20, math.nan, ["cut", "noise"], 0, "main"
    )
    rows, outcomes = experiment.main(fed)
    overall = {r["arm"]: r for r in rows if r["client"] == "all"}
    for scorer in scorers:
        mixture = overall[f"{scorer}/mixture"]
        assert mixture["f1"] == 1.0 and mixture["auc"] == 1.0
        # τ between the clean and the corrupted losses, in the scorer's units
        if scorer == "cond-prob":
            assert -2.9 < mixture["tau"] < -1.1
        assert overall[f"{scorer}/anchor-conformal:0.1"]["recall"] >= 0.7
    cont = experiment.contamination_sweep(Partition("iid"), [0.2, 0.5, 0.8])
    for row in (r for r in cont if r["rule"] == "mixture"):
        assert row["f1"] == 1.0, row
    assert {r["contamination"] for r in cont if r["rule"] == "mixture"} == {0.2, 0.5, 0.8}
    types = experiment.type_sweep(Partition("iid"), 0.5)
    assert {r["corruption"] for r in types if r["rule"] == "mixture"} == {"cut", "noise", "mixture"}
    anchors = experiment.anchor_sweep(fed, [5, 10, 20], 2)
    conformal = [r for r in anchors if r["rule"] == "anchor-conformal:0.1"]
    na = [r for r in conformal if r.get("status") == NA]
    # 5 anchors cannot support α = 0.1: one n/a row per scorer, with the reason
    assert {(r["anchors"], r["scorer"]) for r in na} == {(5, s) for s in scorers}
    assert all("needs at least 9 anchors" in r["note"] for r in na)
    assert {r["anchors"] for r in conformal if r.get("status") != NA} == {10, 20}
    assert {r["anchors"] for r in anchors if r["rule"] == "mixture"} == {5, 10, 20}


def test_an_ensemble_is_calibrated_on_the_anchors_that_set_tau():
    from fedqc.bench.experiment import ForwardScores
    from fedqc.scoring.ensemble import Calibration

    _, losses, anchor_losses = _hand_made_pool()
    source = ForwardScores("ensemble:ppl+ifd", losses, anchor_losses)
    first, other = np.arange(5), np.arange(5, 15)
    a = anchor_losses.take(first)
    assert source.scorer(first).calibration == (
        Calibration("ensemble:ppl+ifd").fit(a.cond, a.bare).calibration_
    )
    assert source.scorer(other).calibration != source.scorer(first).calibration
    # the anchors' scores are on their own calibration: median of each component at 0
    z = source.anchor_scores(first)
    assert abs(np.median(z)) < 1.0


def test_auc_hand_computed():
    # clean {0.9, 0.5} vs corrupted {0.1, 0.7}: 3 of the 4 pairs ordered right
    assert auc(np.array([0.9, 0.1, 0.5, 0.7]), np.array([1, 0, 1, 0])) == pytest.approx(0.75)
    assert auc(np.array([1.0, 1.0]), np.array([1, 0])) == pytest.approx(0.5)  # a tie: ½
    assert auc(np.array([np.nan, 0.0]), np.array([1, 0])) == pytest.approx(0.0)  # NaN is lowest
    assert math.isnan(auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_make_arms():
    names = [a.name for a in make_arms(["ppl", "ira"], ["anchor-mean"])]
    assert names == [
        "mixed",
        "oracle",
        "ppl/anchor-mean",
        "ira/anchor-mean",
        "ppl/drop-fraction",
        "ira/drop-fraction",
        "ppl/global-proportion",
        "ira/global-proportion",
    ]


def test_arms_to_train_picks_the_best_qc_arm_by_f1():
    arms = make_arms(["ppl", "ira"], ["anchor-mean"])
    f1 = {"ppl/anchor-mean": 0.6, "ira/anchor-mean": 0.7, "ppl/global-proportion": 0.9}
    rows = [{"arm": a.name, "client": "all", "f1": f1.get(a.name, 0.0)} for a in arms]
    pick = arms_to_train("mixed,oracle,best", arms, rows)
    assert [a.name for a in pick] == ["mixed", "oracle", "ira/anchor-mean"]
    assert arms_to_train("none", arms, rows) == []
    assert arms_to_train("all", arms, rows) == arms
    assert [a.name for a in arms_to_train("ppl/drop-fraction,mixed", arms, rows)] == [
        "ppl/drop-fraction",
        "mixed",
    ]
    with pytest.raises(FedqcError, match="unknown arm 'ppl'"):
        arms_to_train("ppl", arms, rows)


def test_arms_to_train_default_is_fedqc_runs_default_scorer_and_rule():
    q = QualityConfig()
    arms = make_arms(["ppl", q.scorer], ["anchor-mean", q.rule])
    rows = [{"arm": a.name, "client": "all", "f1": 0.0} for a in arms]
    assert [a.name for a in arms_to_train("default", arms, rows)] == [f"{q.scorer}/{q.rule}"]
    with pytest.raises(FedqcError, match="the default arm .* needs its scorer in bench.scorers"):
        arms_to_train("default", make_arms(["ppl"], ["anchor-mean"]), rows)
    with pytest.raises(FedqcError, match="random draws its kept counts; the default arm .* needs"):
        arms_to_train("random", make_arms(["ppl"], ["anchor-mean"]), rows)


def test_anchor_summary_mean_and_sd():
    rows = [
        {"arm": "a", "scorer": "ppl", "rule": "r", "anchors": 5, "tau": t, "f1": f}
        for t, f in [(1.0, 0.5), (3.0, 0.7)]
    ]
    (s,) = anchor_summary(rows)
    assert (s["tau"], s["tau_sd"], s["f1"], s["f1_sd"], s["draws"]) == pytest.approx(
        (2.0, 1.0, 0.6, 0.1, 2)
    )


# --- config ---------------------------------------------------------------------------------


def test_profile_then_file_then_set(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[data]\nnum-eval = 7\n[bench]\nvariants = 2\ntrain = "none"\n')
    cfg, bench = load_bench_config(path, ["bench.variants=3", "train.rounds=1"], "quick")
    assert cfg.data.samples_per_client == 20  # from --quick
    assert cfg.data.num_eval == 7  # the file beats the profile
    assert bench.train == "none"
    assert bench.variants == 3 and cfg.train.rounds == 1  # --set beats the file
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml() + "\n" + bench.to_toml())
    assert load_bench_config(again) == (cfg, bench)  # the written config reproduces the run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["bench.nope=1"], "unknown config key 'bench.nope'"),
        (["bench.variants=x"], "must be of type int"),
        (["bench.scorers=ppl,bogus"], "unknown scorer 'bogus'"),
        (["bench.rules=fixed:3"], "not an anchor rule"),
        (["bench.types=cut,swap"], "bench.types"),
        (["bench.partition=niid-1"], "takes one global rate"),
        (["bench.partition=explicit", "data.contamination=0.1,0.2"], "2 rates for 4 clients"),
        (["bench.contamination-sweep=0.2,1.5"], "bench.contamination-sweep"),
        (["bench.anchor-sweep=2.5"], "whole"),
        (["bench.scorers=ppl,clues"], "Adam moments"),
        (["bench.scorers=tracin", "bench.warmup-rounds=0"], "warmup-rounds must be ≥ 1"),
        (["bench.scorers=ppl,ppl"], "named twice"),
        (["quality.model=gemma3-270m", "bench.scorers=ppl,tracin"], "warm-up checkpoints"),
        (["bench.scorers=ensemble:ppl"], "two or more different scorers"),
        (["data.num-anchors=5", "bench.rules=anchor-conformal:0.1"], "needs at least 9 anchors"),
        (["data.num-anchors=1", "bench.rules=mixture"], "mixture needs"),
        (["bench.fl-arms=train.strategy=sgd"], "'train.strategy' must be one of"),
        (["bench.fl-arms=train.strategy"], "is not key=value"),
        (["bench.fl-arms=quality.curriculum=stages:4"], "needs train.rounds ≥ 4"),
        (
            ["bench.fl-arms=train.strategy=krum:1 & train.aggregation=merge:ties:0.5"],
            "merges adapters",
        ),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(FedqcError, match=message):
        cfg, bench = load_bench_config(None, overrides)
        bench.check(cfg)


def test_quick_profile_compares_every_rule_and_the_ensemble():
    cfg, bench = load_bench_config(None, [], "quick")
    bench.check(cfg)
    rules = bench.list_of("rules")
    for rule in ("anchor-mean", "anchor-quantile:0.1", "anchor-conformal:0.1", "mixture"):
        assert rule in rules
    for scorer in ("ppl", "cond-prob", "ifd", "ira", "ensemble:ppl+ifd"):
        assert scorer in bench.scorer_list
    cfg, bench = load_bench_config(None, ["bench.rules=mixture", "bench.scorers=tracin,ppl"])
    bench.check(cfg)
    assert bench.checkpoint_scorers == ["tracin"]


def test_cli_registers_bench():
    from fedqc.cli import app

    result = CliRunner().invoke(app, ["bench", "--quick", "--full"])
    assert isinstance(result.exception, FedqcError)
    assert "choose one profile" in str(result.exception)


# --- the scored pool ------------------------------------------------------------------------


def test_split_data_is_disjoint_clean_and_deterministic():
    cfg = Config.from_flat({"data.num-clients": 2, "data.samples-per-client": 10})
    bench = BenchConfig(anchor_sweep="5,12", variants=2)
    data = split_data(cfg, bench)
    assert (len(data.eval), len(data.anchors), len(data.items)) == (40, 12, 20)
    ids = [s.id for s in data.eval + data.anchors + data.items]
    assert len(ids) == len(set(ids))
    assert all(len(v) == 2 for v in data.variants)  # two types per item, in turn
    assert split_data(cfg, bench) == data
    other = split_data(cfg.replace(**{"data.seed": 1}), bench)
    assert [s.id for s in other.items] != [s.id for s in data.items]


def _data(n_items: int, types) -> BenchData:
    items = [Sample(f"i{k}", f"q{k}", f"answer {k} words here") for k in range(n_items)]
    variants = [{types[k % len(types)]: f"bad {k}"} for k in range(n_items)]
    return BenchData([], [], items, variants)


def test_federation_from_the_pool_matches_its_flags():
    data = _data(50, ["cut", "noise"])
    fed = make_federation(data, Partition("iid"), 2, 20, 0.5, ["cut", "noise"], 0, "x")
    entries = data.entries()
    assert fed.true_rate == pytest.approx(0.5)
    for members, idx, clean in zip(fed.members, fed.entries, fed.clean, strict=True):
        for m, e, c in zip(members, idx, clean, strict=True):
            assert entries[e] == (m.item, m.corruption)
            assert c == (m.corruption is None)
    again = make_federation(data, Partition("iid"), 2, 20, 0.5, ["cut", "noise"], 0, "x")
    assert again.members == fed.members
    other = make_federation(data, Partition("iid"), 2, 20, 0.5, ["cut", "noise"], 0, "y")
    assert other.members != fed.members


def test_fitting_size_keeps_federations_within_the_pool():
    data = _data(100, ["cut", "deletion", "exchange", "substitute", "noise"])  # 20 per type
    types = ["cut", "deletion", "exchange", "substitute", "noise"]
    assert fitting_size(data, types, 0.2, 4) == 25  # the whole pool fits
    assert fitting_size(data, types, 0.8, 4) == 25  # (20 − 4) × 5 / 0.8 = 100
    assert fitting_size(data, ["cut"], 0.5, 4) == 10  # 20 cut variants at 50%: 40 samples
    for rate in (0.2, 0.5, 0.8):  # and the assembly never runs short
        n = fitting_size(data, types, rate, 4)
        make_federation(data, Partition("iid"), 4, n, rate, types, 3, f"r{rate}")


def test_pool_losses_give_the_scorers_exactly(tiny_model_dir):
    loaded = load(ModelConfig(name=str(tiny_model_dir)))
    shared = "the same answer, twice"
    samples = [
        Sample("a", "first question", shared),
        Sample("b", "second, longer question here", shared),  # same bare pass as "a"
        Sample("c", "third question", "another answer\n#### 4"),
    ]
    losses = score_losses(loaded, samples, max_length=64)
    for name, scorer in SCORERS.items():
        expected = score_samples(loaded, samples, scorer, max_length=64)
        np.testing.assert_allclose(losses.raw(name), expected.raw, rtol=1e-6)
        np.testing.assert_allclose(losses.oriented(name), expected.oriented, rtol=1e-6)
    assert losses.bare[0] == losses.bare[1]


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("bench")
    cfg, bench = load_bench_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.max-length=96",
            "data.num-clients=2",
            "data.samples-per-client=10",
            "data.num-anchors=3",
            "data.num-eval=3",
            "data.contamination=0.2,0.6",
            "train.rounds=1",
            "train.local-steps=1",
            "train.batch-size=2",
            "bench.scorers=ppl,ira",
            "bench.rules=anchor-mean,mixture",
            "bench.anchor-sweep=2,5",
            "bench.anchor-repeats=2",
            "bench.em-questions=2",
            "bench.max-new-tokens=4",
            "bench.train=best",
            "bench.fl-arms=train.strategy=fedadam:0.1",
        ],
    )
    result = run_bench(cfg, bench, run_dir, command="fedqc bench (test)")
    return run_dir, result


def test_bench_writes_every_table(bench_run):
    run_dir, result = bench_run
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["experiment"] for r in rows} == {"main", "contamination", "anchors", "types", "train"}
    main = [r for r in rows if r["experiment"] == "main" and r["client"] == "all"]
    assert len(main) == 2 + 2 * 2 + 2 + 2  # mixed, oracle, 2 scorers × 2 rules, 2 baselines each
    oracle = next(r for r in main if r["arm"] == "oracle")
    assert float(oracle["f1"]) == 1.0 and float(oracle["precision"]) == 1.0
    mixed = next(r for r in main if r["arm"] == "mixed")
    assert float(mixed["recall"]) == 1.0 and float(mixed["kept_fraction"]) == 1.0
    assert {r["contamination"] for r in rows if r["experiment"] == "contamination"} == {
        "0.2",
        "0.5",
        "0.8",
    }
    assert {r["anchors"] for r in rows if r["experiment"] == "anchors"} == {"2", "5"}
    assert {r["corruption"] for r in rows if r["experiment"] == "types"} == {
        "cut",
        "deletion",
        "exchange",
        "substitute",
        "noise",
        "mixture",
    }
    per_client = [r for r in rows if r["experiment"] == "main" and r["client"] in ("0", "1")]
    assert len(per_client) == 2 * len(main)
    text = (run_dir / "results.md").read_text()
    for heading in ("## Main table", "## Selection per client", "## Training", "## Contamination"):
        assert heading in text
    assert "Command: `fedqc bench (test)`" in text


def test_bench_trains_the_best_arm_through_flower(bench_run):
    run_dir, result = bench_run
    train = {r["arm"]: r for r in result["train"]}
    best = max((r for r in result["main"] if r["kind"] == "qc"), key=lambda r: r["f1"])["arm"]
    adam = f"{best} + train.strategy=fedadam:0.1"  # bench.fl-arms: same selection, FedAdam
    assert set(train) == {"base (no training)", best, adam}
    assert train[adam]["trained_samples"] == train[best]["trained_samples"]
    assert train[adam]["eval_loss"] != train[best]["eval_loss"]
    assert train[best]["rounds"] == 1 and math.isfinite(train[best]["eval_loss"])
    assert train[best]["trained_samples"] == next(
        r["kept"] for r in result["main"] if r["arm"] == best
    )
    for metric in ("exact_match", "answer_format", "rouge_l"):
        assert 0.0 <= train[best][metric] <= 1.0
    assert "| ROUGE-L |" in (run_dir / "results.md").read_text()
    generations = (run_dir / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 3 * 2  # base and the two trained arms, 2 questions each
    assert json.loads(generations[0])["arm"] == "base"


def test_bench_data_is_clean_disjoint_and_flagged(bench_run):
    run_dir, _ = bench_run
    ids = {}
    for name in ("eval", "anchors", "pool"):
        with open(run_dir / "data" / f"{name}.jsonl") as fh:
            ids[name] = {json.loads(line)["id"] for line in fh}
    assert not (ids["eval"] & ids["anchors"]) and not (ids["eval"] | ids["anchors"]) & ids["pool"]
    fed = json.loads((run_dir / "data" / "federation.json").read_text())
    assert [sum(m["corrupted"] for m in c) for c in fed["clients"]] == [2, 6]


def test_bench_report_embeds_every_plot(bench_run):
    run_dir, result = bench_run
    pngs = sorted((run_dir / "plots").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"hist-ppl", "hist-ira", "contamination-tau", "contamination-f1", "eval-loss"} <= names
    assert {"anchors-tau", "anchors-f1", "types-f1", "types-auc"} <= names
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<img" in page and 'src="plots/' not in page  # nothing outside the file


def test_findings_say_where_qc_does_not_help():
    overall = [
        {"arm": "mixed", "kind": "mixed", "f1": 0.75, "precision": 0.6, "recall": 1.0},
        {
            "arm": "ppl/anchor-mean",
            "kind": "qc",
            "rule": "anchor-mean",
            "f1": 0.6,
            "precision": 0.9,
            "recall": 0.45,
        },
        {
            "arm": "ppl/anchor-quantile:0.1",
            "kind": "qc",
            "rule": "anchor-quantile:0.1",
            "f1": 0.8,
            "precision": 0.8,
            "recall": 0.8,
        },
    ]
    sweeps = {
        "contamination": [
            {"contamination": 0.2, "kind": "mixed", "arm": "mixed", "f1": 0.89},
            {"contamination": 0.2, "kind": "qc", "arm": "ppl/anchor-mean", "f1": 0.7},
            {"contamination": 0.8, "kind": "mixed", "arm": "mixed", "f1": 0.33},
            {"contamination": 0.8, "kind": "qc", "arm": "ppl/anchor-mean", "f1": 0.5},
        ],
        "types": [
            {"corruption": "exchange", "kind": "mixed", "arm": "mixed", "scorer": "", "f1": 0.6},
            {
                "corruption": "exchange",
                "kind": "qc",
                "arm": "ira/anchor-mean",
                "scorer": "ira",
                "f1": 0.5,
                "auc": 0.55,
            },
            {
                "corruption": "cut",
                "kind": "qc",
                "arm": "ira/anchor-mean",
                "scorer": "ira",
                "f1": 0.9,
                "auc": 0.95,
            },
        ],
    }
    train = [
        {"arm": "mixed", "kind": "mixed", "eval_loss": 1.20, "exact_match": 0.0},
        {"arm": "ppl/anchor-quantile:0.1", "kind": "qc", "eval_loss": 1.25, "exact_match": 0.0},
    ]
    from fedqc.bench.publish import findings

    text = "\n".join(findings(overall, sweeps, train, 0.4))
    assert "best QC arm by F1 is ppl/anchor-quantile:0.1 (F1 0.800" in text
    assert "anchor-mean rule at its best (ppl/anchor-mean) keeps 0.450 of the clean" in text
    assert "At corrupted share 0.2, no QC arm beats keeping everything" in text
    assert "corrupted share 0.8" not in text  # there QC does beat it
    assert "At corruption exchange, no QC arm beats" in text
    assert "exchange: hardly separated from clean samples by ira 0.550" in text
    assert "cut:" not in text
    assert "eval loss 1.250, not lower than mixed 1.200 (Δ +0.0500)" in text
    assert "Exact match does not separate the arms" in text


def test_generation_stops_a_row_once_its_final_line_is_complete(tiny_model_dir):
    from transformers import AutoTokenizer

    from fedqc.bench.generation import _Answered

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("question?", add_special_tokens=False)["input_ids"]
    rows = ["so 9 * 8 = 72\n#### 72\nQuestion", "so 9 * 8 = 72\n#### 72", "thinking"]
    ids = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in rows]
    width = max(map(len, ids))
    batch = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    assert _Answered(tok, len(prompt))(batch, None).tolist() == [True, False, False]
