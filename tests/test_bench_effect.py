"""The bench's effect measurement: training seeds, per-seed summaries and paired differences
against made-up numbers, the goal checks, and a tiny effect-shaped run (2 seeds, 1 round)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_effect_settings

from fedqc.bench.arms import random_keep
from fedqc.bench.config import PROFILES, load_bench_config
from fedqc.bench.effect import gap_recovered, goal_checks, mean_sd, paired, summarize
from fedqc.bench.run import default_arm
from fedqc.errors import FedqcError
from fedqc.report.tables import fmt

# --- bench.seeds ----------------------------------------------------------------------------


def test_seeds_default_to_train_seed_and_parse():
    cfg, bench = load_bench_config(None, ["train.seed=7"])
    assert bench.seed_list(cfg) == [7]
    cfg, bench = load_bench_config(None, ["bench.seeds=0, 1,2"])
    assert bench.seed_list(cfg) == [0, 1, 2]


@pytest.mark.parametrize("seeds", ["0,x", "1,1", "-1", "0.5"])
def test_bad_seeds_are_one_line(seeds):
    cfg, bench = load_bench_config(None, [f"bench.seeds={seeds}"])
    with pytest.raises(FedqcError, match=r"bench.seeds '.*': different whole numbers") as info:
        bench.check(cfg)
    assert "\n" not in str(info.value)


def test_effect_profile_checks_and_trains_the_four_arms_on_three_seeds():
    cfg, bench = load_bench_config(None, [], "effect")
    bench.check(cfg)
    assert bench.list_of("train") == ["mixed", "paper", "default", "oracle"]
    assert len(bench.seed_list(cfg)) == 3
    assert "effect" in PROFILES


# --- the summary, by hand ---------------------------------------------------------------------

# Three seeds; eval loss and format rate of each arm.
RUNS = {
    "mixed": {
        0: {"eval_loss": 1.10, "answer_format": 0.5},
        1: {"eval_loss": 1.12, "answer_format": 0.6},
        2: {"eval_loss": 1.14, "answer_format": 0.4},
    },  # noqa: E501
    "oracle": {
        0: {"eval_loss": 1.00, "answer_format": 0.9},
        1: {"eval_loss": 1.01, "answer_format": 0.8},
        2: {"eval_loss": 1.02, "answer_format": 0.85},
    },  # noqa: E501
    "dflt": {
        0: {"eval_loss": 1.01, "answer_format": 0.85},
        1: {"eval_loss": 1.02, "answer_format": 0.8},
        2: {"eval_loss": 1.03, "answer_format": 0.9},
    },  # noqa: E501
    "paper": {
        0: {"eval_loss": 1.05, "answer_format": 0.7},
        1: {"eval_loss": 1.07, "answer_format": 0.7},
        2: {"eval_loss": 1.06, "answer_format": 0.7},
    },  # noqa: E501
}


def test_mean_sd_and_paired_differences_exact():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    mean, sd = mean_sd([4.0, math.nan])
    assert mean == 4.0 and math.isnan(sd)  # one finite value: no sd
    # oracle − mixed per seed: -0.10, -0.11, -0.12 → mean -0.11, sd 0.01
    assert paired(RUNS["oracle"], RUNS["mixed"], "eval_loss") == pytest.approx((-0.11, 0.01))
    # only the seeds both trained with are paired
    assert paired({1: {"m": 3.0}, 5: {"m": 9.0}}, {1: {"m": 1.0}, 2: {"m": 0.0}}, "m")[0] == 2.0


def test_gap_recovered_either_direction():
    assert gap_recovered(1.12, 1.01, 1.02) == pytest.approx(10 / 11)  # loss: lower is better
    assert gap_recovered(0.5, 0.85, 0.85) == pytest.approx(1.0)  # a rate: higher is better
    assert gap_recovered(0.5, 0.85, 0.4) == pytest.approx(-2 / 7)  # worse than mixed
    assert math.isnan(gap_recovered(1.0, 1.0, 0.9))  # no gap


def test_summarize_exact():
    s = summarize(RUNS)
    assert s["mixed"]["eval_loss"] == pytest.approx(1.12)
    assert s["mixed"]["eval_loss_sd"] == pytest.approx(0.02)
    assert s["dflt"]["d_eval_loss"] == pytest.approx(-0.10)
    assert s["dflt"]["d_eval_loss_sd"] == pytest.approx(0.01)  # -0.09, -0.10, -0.11
    assert s["dflt"]["gap_eval_loss"] == pytest.approx(0.10 / 0.11)
    assert s["paper"]["gap_answer_format"] == pytest.approx((0.7 - 0.5) / (0.85 - 0.5))
    assert s["oracle"]["gap_eval_loss"] == pytest.approx(1.0)
    assert math.isnan(s["mixed"]["exact_match"])  # not measured: NaN, not 0
    assert s["mixed"]["seeds"] == 3


def test_goal_checks_are_computed():
    lines = goal_checks(summarize(RUNS), "dflt")
    text = "\n".join(lines)
    # loss: oracle better by 0.11; 3 × max(sd mixed 0.02, sd oracle 0.01) = 0.06 → separated
    assert "on held-out loss: the oracle is better by 0.1100" in text
    assert "3 × the larger seed sd = 0.0600: separated." in text
    # format: oracle better by 0.35; 3 × max(0.1, 0.05) = 0.3 → separated
    assert "on format rate: the oracle is better by 0.3500" in text
    assert "discriminates: held-out loss and ≥ 1 generation metric): met (on format rate)." in text
    # default: 90.9% of the loss gap, 100% of the format gap, better than paper on both
    assert "Default (dflt) on held-out loss: 1.0200 ± 0.0100, 90.9% of the mixed" in text
    assert "Default (dflt) on format rate: 0.8500 ± 0.0500, 100.0% of the mixed" in text
    assert lines[-1].endswith("and beats paper there): met.")
    # a default that recovers 80% of the loss gap misses the goal
    worse = RUNS | {
        "dflt": {s: v | {"eval_loss": v["eval_loss"] + 0.012} for s, v in RUNS["dflt"].items()}
    }  # noqa: E501
    assert goal_checks(summarize(worse), "dflt")[-1].endswith("): not met.")
    # one seed: no standard deviation, no verdict
    one = {arm: {0: seeds[0]} for arm, seeds in RUNS.items()}
    (only,) = goal_checks(summarize(one), "dflt")
    assert "at least two training seeds" in only


def test_default_against_random_is_seed_paired():
    # random: the default's kept counts drawn at random; worse than dflt by 0.03 ± 0.01 in loss
    rnd = {s: v | {"eval_loss": v["eval_loss"] + 0.02 + 0.01 * s} for s, v in RUNS["dflt"].items()}
    lines = goal_checks(summarize(RUNS | {"random": rnd}), "dflt")
    text = "\n".join(lines)
    assert "on held-out loss: 1.0200 ± 0.0100 against 1.0500 ± 0.0200" in text
    assert "(paired default − random -0.0300 ± 0.0100): beaten" in text
    assert lines[-1].endswith("metric): not met.")  # format: equal draws, not beaten
    better = {s: v | {"answer_format": v["answer_format"] - 0.2 - 0.01 * s} for s, v in rnd.items()}
    lines = goal_checks(summarize(RUNS | {"random": better}), "dflt")
    assert lines[-1].endswith("metric): met.")
    # a random arm as good as the default is not beaten, whatever the means' noise
    assert goal_checks(summarize(RUNS | {"random": RUNS["dflt"]}), "dflt")[-1].endswith("not met.")


def test_random_keep_draws_the_same_counts_per_client_and_seed():
    kept = [np.array([1, 1, 0, 0, 1, 0], bool), np.zeros(4, bool), np.ones(3, bool)]
    a, b, c = random_keep(kept, 0), random_keep(kept, 0), random_keep(kept, 1)
    assert [int(k.sum()) for k in a] == [3, 0, 3]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # seeded
    draws = {tuple(random_keep(kept, s)[0]) for s in range(20)}
    assert len(draws) > 5  # not the default's own samples, nor one fixed subset
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


# --- a tiny effect-shaped run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def effect_run(tmp_path_factory, tiny_model_dir):
    from fedqc.bench.run import run_bench

    run_dir = tmp_path_factory.mktemp("effect")
    cfg, bench = load_bench_config(
        None,
        [
            *tiny_effect_settings(tiny_model_dir),
            # random draws the default arm's kept counts: its scorer and rule must be scored, on
            # anchors long enough for end-loss
            "model.max-length=512",
            "bench.scorers=ppl,ensemble-min:cond-prob+ifd+end-loss",
            "bench.rules=anchor-mean,anchor-gaussian:0.1",
            "bench.train=mixed,paper,random",  # 6 Flower runs; the goal checks are tested above
            "bench.seeds=0,1",
        ],
        "effect",
    )
    result = run_bench(cfg, bench, run_dir, command="fedqc bench --effect (test)")
    return run_dir, result


def test_effect_run_trains_every_arm_once_per_seed_on_one_selection(effect_run):
    run_dir, result = effect_run
    saved = json.loads((run_dir / "training.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert set(saved["arms"]) == {"mixed", "paper", "random"}
    for arm in saved["arms"].values():
        assert set(arm["seeds"]) == {"0", "1"}
        for run in arm["seeds"].values():
            assert [h["round"] for h in run["history"]] == [0, 1]
            assert 0.0 <= run["final"]["answer_format"] <= 1.0
    mixed = saved["arms"]["mixed"]["seeds"]
    # the seed moves the batches, not the data: other losses, the same start
    assert mixed["0"]["final"]["eval_loss"] != mixed["1"]["final"]["eval_loss"]
    assert mixed["0"]["history"][0] == mixed["1"]["history"][0]
    train = {r["arm"]: r for r in result["train"]}
    assert train["mixed"]["seeds"] == 2 and train["mixed"]["trained_samples"] == 12
    losses = [mixed[s]["final"]["eval_loss"] for s in ("0", "1")]
    assert train["mixed"]["eval_loss"] == pytest.approx(sum(losses) / 2)
    sd = abs(losses[0] - losses[1]) / math.sqrt(2)  # the sample sd of two values
    assert train["mixed"]["eval_loss_text"] == f"{fmt(sum(losses) / 2)} ± {fmt(sd)}"
    paper = saved["arms"]["paper"]["seeds"]
    d = [paper[s]["final"]["eval_loss"] - mixed[s]["final"]["eval_loss"] for s in ("0", "1")]
    assert train["paper"]["d_eval_loss"] == pytest.approx(sum(d) / 2)
    # the paper arm was scored zero-shot (quality.shots is 2): its row says so
    row = next(r for r in result["main"] if r["arm"] == "paper")
    assert "zero-shot" in row["note"] and row["scorer"] == "ppl"
    assert train["paper"]["trained_samples"] == row["kept"]
    generations = (run_dir / "generations.jsonl").read_text().splitlines()
    assert len(generations) == (1 + 3 * 2) * 2  # base, 3 arms × 2 seeds; 2 questions each
    # random trains the default's kept count on every client, a different draw per seed
    default = next(r for r in result["main"] if r["arm"] == default_arm() and r["client"] == "all")
    rnd = saved["arms"]["random"]
    assert sum(rnd["kept"]) == default["kept"] == train["random"]["trained_samples"]
    ids = [
        sorted(json.loads(x)["id"] for f in sorted((run_dir / "train" / "random" / f"seed-{s}"
               / "clients").glob("*.jsonl")) for x in f.read_text().splitlines())
        for s in (0, 1)
    ]  # fmt: skip
    assert len(ids[0]) == len(ids[1]) == default["kept"]
    if default["kept"] < 12:  # a real subset of the 12 samples: the two draws differ
        assert ids[0] != ids[1]


def test_a_resumed_bench_reads_back_its_trainings_and_answers(effect_run, monkeypatch):
    from fedqc.bench import run as bench_run
    from fedqc.federation import simulation

    run_dir, result = effect_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished training or generation ran again")

    monkeypatch.setattr(simulation, "run_simulation", refuse)
    monkeypatch.setattr(bench_run, "generate", refuse)
    cfg, bench = load_bench_config(run_dir / "bench.toml")
    again = bench_run.run_bench(cfg, bench, run_dir, command="resumed")
    assert again["train"] == result["train"]


def test_effect_run_reports_the_seed_table_and_band_plot(effect_run):
    run_dir, result = effect_run
    text = (run_dir / "results.md").read_text()
    assert "| Δ loss |" in text and "| seeds |" in text
    rounds = text.split("## Eval loss per round")[1].split("##")[0]
    assert rounds.count(" ± ") == 2 * 3  # rounds 0 and 1, three arms
    page = (run_dir / "report.html").read_text()
    assert (run_dir / "plots" / "eval-loss.png").exists()
    assert page.count("data:image/png;base64,") == len(list((run_dir / "plots").glob("*.png")))
