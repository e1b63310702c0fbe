"""`fedqc bench --draws N`: the draws, the plans, the clean-rejection rate and best τ against known
cases, and a tiny end-to-end run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from fedqc.bench.config import BenchConfig, load_bench_config
from fedqc.bench.draws import (
    BEST,
    best_f1,
    clean_rejected,
    demonstration_indices,
    draw_anchors,
    measure,
    plan_anchors,
    run_draws,
    summarise,
)
from fedqc.bench.experiment import Federation, ForwardScores
from fedqc.bench.pool import Losses
from fedqc.errors import FedqcError
from fedqc.quality.rules import parse_rule


def test_clean_rejected_counts_scores_below_tau_and_non_finite():
    pool = np.array([0.1, 0.5, np.nan, 0.9, 0.2, 0.3])
    clean = np.array([0, 1, 2, 3])  # entries 4 and 5 are corrupted ones: not counted
    assert clean_rejected(pool, clean, 0.5) == pytest.approx(2 / 4)  # 0.1 below, NaN rejected
    assert clean_rejected(pool, clean, 0.05) == pytest.approx(1 / 4)


def test_best_f1_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, np.nan])
    clean = np.array([True, False, True, False, True])
    # keep top 1: P=1, R=1/3 → 0.5; top 3: P=2/3, R=2/3 → 2/3; NaN is never kept
    assert best_f1(scores, clean) == pytest.approx(2 / 3)
    # tied scores are kept or dropped together: only "keep both" or "keep none" of the tie
    assert best_f1(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(2 / 3)


def test_draws_are_seeded_distinct_and_leave_out_the_demonstrations():
    draws = draw_anchors(seed=0, draw_seed=0, draws=20, n=10, demos=[0, 1], pool=50)
    assert all(len(set(d.tolist())) == 10 and d.min() >= 2 and d.max() < 50 for d in draws)
    assert len({tuple(d) for d in draws}) == 20
    again = draw_anchors(seed=0, draw_seed=0, draws=20, n=10, demos=[0, 1], pool=50)
    assert all((a == b).all() for a, b in zip(draws, again, strict=True))
    other = draw_anchors(seed=0, draw_seed=1, draws=20, n=10, demos=[0, 1], pool=50)
    assert any((a != b).any() for a, b in zip(draws, other, strict=True))
    with pytest.raises(FedqcError, match="data.num-anchors"):
        draw_anchors(seed=0, draw_seed=0, draws=1, n=10, demos=[0, 1], pool=11)


def test_demonstrations_are_the_first_whole_anchors_and_no_draw_takes_them():
    truncated = np.array([False, True, False, False, False, False])
    assert demonstration_indices(truncated, 2) == [0, 2]
    assert demonstration_indices(truncated, 0) == []
    draws = draw_anchors(seed=0, draw_seed=0, draws=10, n=3, demos=[0, 2], pool=6)
    assert all(set(d.tolist()) <= {1, 3, 4, 5} for d in draws)
    calibration, tau = plan_anchors("run", np.array([4, 1, 5]), demos=[0, 2])
    assert calibration.tolist() == tau.tolist() == [0, 2, 4]


def test_plans_say_which_anchors_calibrate_and_set_tau():
    draw = np.array([7, 3, 9, 4, 5])
    calibration, tau = plan_anchors("drawn", draw, demos=[0, 1])
    assert calibration.tolist() == tau.tolist() == [7, 3, 9, 4, 5]
    calibration, tau = plan_anchors("run", draw, demos=[0, 1])  # the demonstrations are 0 and 1
    assert calibration.tolist() == tau.tolist() == [0, 1, 7, 3, 9]
    calibration, tau = plan_anchors("split:2", draw, demos=[0, 1])
    assert calibration.tolist() == [0, 1] and tau.tolist() == [7, 3, 9]
    calibration, tau = plan_anchors("split:3", draw, demos=[])
    assert calibration.tolist() == [7, 3, 9] and tau.tolist() == [4, 5]


@pytest.mark.parametrize(
    ("plans", "message"),
    [("drawn,halves", "unknown plan 'halves'"), ("split:1", "≤ C ≤"), ("split:9", "≤ C ≤")],
)
def test_plan_errors_name_the_key(plans, message):
    bench = BenchConfig(draw_plans=plans)
    with pytest.raises(FedqcError, match=message):
        bench.check_plans(shots=2, num_anchors=10)


def _normal_losses(rng, n: int) -> Losses:
    cond = rng.normal(1.0, 0.2, n)
    bare = cond + rng.normal(0.5, 0.1, n)
    end = np.abs(rng.normal(1.0, 0.3, n))
    return Losses(cond, bare, np.zeros(n, dtype=bool), end)


def _federation(n: int) -> Federation:
    entries = np.arange(n)
    return Federation([], [entries], [np.ones(n, dtype=bool)], "main")


def _rates(scorer: str, plan: str, rules, draws=400, n=10) -> dict[str, float]:
    """Mean clean-rejection rate over ``draws`` draws on i.i.d. normal losses."""
    rng = np.random.default_rng(0)
    pool, anchors = _normal_losses(rng, 20_000), _normal_losses(rng, 1_000)
    source = ForwardScores(scorer, pool, anchors)
    fed = _federation(200)
    rows = []
    for d in draw_anchors(0, 0, draws, n, demos=[], pool=len(anchors.cond)):
        calibration, tau = plan_anchors(plan, d, demos=[])
        rows += measure(source, rules, [fed], np.arange(20_000), calibration, tau)
    by_rule: dict[str, list[float]] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], []).append(row["clean_rejected"])
    return {rule: float(np.mean(v)) for rule, v in by_rule.items()}


def test_conformal_rejects_its_promised_share_of_exchangeable_clean_samples():
    # 10 anchors, α = 0.1: τ is the lowest anchor, so a clean sample falls below it with
    # probability exactly 1/11; the gaussian bound's rate is exactly α for normal scores.
    rules = [parse_rule("anchor-conformal:0.1"), parse_rule("anchor-gaussian:0.1")]
    rates = _rates("cond-prob", "drawn", rules)
    assert rates["anchor-conformal:0.1"] == pytest.approx(1 / 11, abs=0.01)
    assert rates["anchor-gaussian:0.1"] == pytest.approx(0.1, abs=0.01)


def test_split_calibration_keeps_the_promise_for_an_ensemble():
    # Calibrated on other anchors (split), the ensemble is a fixed function for the τ anchors and
    # the clean samples, so they are exchangeable again: below the median of 10 τ anchors half
    # the time.
    rules = [parse_rule("anchor-quantile:0.5")]
    split = _rates("ensemble-min:cond-prob+ifd+end-loss", "split:2", rules, n=12)
    assert split["anchor-quantile:0.5"] == pytest.approx(0.5, abs=0.02)


def test_summary_gives_mean_percentiles_and_draws_above_the_promise():
    rows = [
        {
            "shots": 0,
            "plan": "drawn",
            "scorer": "s",
            "rule": "anchor-gaussian:0.1",
            "promised": 0.1,
            "draw": r,
            "tau": 0.0,
            "clean_rejected": rate,
            "f1_main": f1,
        }
        for r, (rate, f1) in enumerate([(0.05, 0.9), (0.15, 0.8), (0.2, 0.7), (0.0, 1.0)])
    ]
    (entry,) = summarise(rows, [_federation(4)])
    assert entry["clean_rejected"] == pytest.approx(0.1)
    assert entry["draws_above"] == pytest.approx(0.5)
    assert entry["f1_mean_main"] == pytest.approx(0.85)
    assert entry["f1_main"] == f"0.850 / {np.percentile([0.9, 0.8, 0.7, 1.0], 10):.3f}"


def test_a_rule_the_anchors_cannot_support_gets_its_reason():
    rng = np.random.default_rng(1)
    pool, anchors = _normal_losses(rng, 50), _normal_losses(rng, 20)
    rows = measure(
        ForwardScores("cond-prob", pool, anchors),
        [parse_rule("anchor-conformal:0.05")],
        [_federation(50)],
        np.arange(50),
        np.arange(10),
        np.arange(10),
    )
    assert "needs at least 19 anchors" in rows[0]["note"]
    assert rows[1]["rule"] == BEST and 0 < rows[1]["f1_main"] <= 1


def test_draws_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    cfg, bench = load_bench_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "model.max-length=512",
            "data.num-clients=2",
            "data.samples-per-client=10",
            "data.num-anchors=10",
            "data.num-eval=2",
            "data.contamination=0.2,0.6",
            "bench.scorers=ensemble-min:cond-prob+ifd+end-loss,cond-prob",
            "bench.rules=anchor-conformal:0.1,anchor-gaussian:0.1",
            "bench.anchor-sweep=13",
            "bench.contamination-sweep=0.5",
            "bench.draw-plans=drawn,run,split:2",
        ],
    )
    text = run_draws(cfg, bench, tmp_path, 3, None, "fedqc bench --draws 3 (test)")
    assert (tmp_path / "results.md").read_text() == text
    assert "Command: `fedqc bench --draws 3 (test)`" in text
    assert "## Selection F1 over the draws" in text and "## Clean samples rejected" in text
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # zero-shot: drawn, split:2; 2 shots: drawn, run, split:2 — 2 scorers, 3 draws, 2 rules + best
    assert len(rows) == 5 * 2 * 3 * 3
    split = [r for r in rows if r["plan"] == "split:2" and r["rule"] == "anchor-conformal:0.1"]
    assert split and all("needs at least 9 anchors" in r["note"] for r in split)
    drawn = [r for r in rows if r["plan"] == "drawn" and r["rule"] == "anchor-gaussian:0.1"]
    assert all(0 <= float(r["clean_rejected"]) <= 1 for r in drawn)
    assert all(0 <= float(r["f1_contamination-0.5"]) <= 1 for r in drawn)
    # the same draws from the saved losses, without the model: the same rows
    bench.reuse_losses = str(tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    run_draws(cfg, bench, again, 3, None)
    assert (again / "results.csv").read_text() == (tmp_path / "results.csv").read_text()
    assert (again / "losses-2shot.csv").read_text() == (tmp_path / "losses-2shot.csv").read_text()
    cfg.data.num_anchors = 9  # another pool: refused, by name
    with pytest.raises(FedqcError, match="data.num-anchors"):
        run_draws(cfg, bench, again, 3, None)


def test_cli_refuses_zero_draws(tmp_path):
    from fedqc.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["bench", "--draws", "0", "--out", str(out)])
    assert isinstance(result.exception, FedqcError)  # fedqc.cli.main: one line, exit 2
    assert "--draws 0" in str(result.exception) and not out.exists()
