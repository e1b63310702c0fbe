"""The public quality filter: fit on anchors, apply to samples, decide exactly as `fedqc run`."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from local_grid import run_default_in_process

from fedqc import QualityFilter, QualityPlan
from fedqc.config import Config
from fedqc.data.samples import Sample, load_samples
from fedqc.errors import FedqcError

MAX_LENGTH = 512  # no demo anchor is cut: each has an end-loss


@pytest.fixture(scope="module")
def ran(tmp_path_factory, demo_dir, tiny_model_dir) -> tuple[Config, dict]:
    """`fedqc run`'s server and clients (in process) with the default scorer, rule and 2 shots."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = run_default_in_process(tiny_model_dir, demo_dir, run_dir, MAX_LENGTH)
    clients = {
        i: [json.loads(x) for x in (run_dir / "clients" / f"client-{i}" / "scores.jsonl").open()]
        for i in range(2)
    }
    return cfg, {"threshold": json.loads((run_dir / "threshold.json").read_text()), **clients}


@pytest.fixture(scope="module")
def plan(ran, demo_dir) -> QualityPlan:
    cfg, _ = ran
    return QualityFilter.from_config(cfg).fit(demo_dir / "anchors.jsonl")


def test_fit_makes_the_runs_plan(ran, plan):
    _, run = ran
    record = plan.record()
    for key in ("scorer", "rule", "shots", "tau", "tau_raw", "calibration", "prefix"):
        assert record[key] == run["threshold"][key], key
    assert record["anchor_scores"] == run["threshold"]["anchor_scores"]
    assert plan.shots == 2 and len(plan.prefix) > 0
    assert plan.tau_raw == plan.scorer.raw(plan.tau)


def test_apply_keeps_exactly_what_the_runs_clients_kept(ran, plan, demo_dir):
    _, run = ran
    kept_any = False
    for i in range(2):
        selection = plan.apply(demo_dir / "clients" / f"client-{i}.jsonl")
        assert [_finite(x) for x in selection.raw] == [r["score"] for r in run[i]]
        assert selection.keep.tolist() == [r["keep"] for r in run[i]]
        assert selection.kept == sum(r["keep"] for r in run[i])
        kept_any |= selection.kept > 0
    assert kept_any  # not vacuous


def test_a_saved_plan_loads_back_and_decides_the_same(plan, demo_dir, tmp_path):
    path = tmp_path / "threshold.json"
    plan.save(path)
    loaded = QualityPlan.load(path)
    assert loaded.record() == plan.record()
    assert loaded.tau == plan.tau  # oriented, as fitted (not re-derived from the raw value)
    data = demo_dir / "clients" / "client-1.jsonl"
    before, after = plan.apply(data), loaded.apply(data)
    assert after.keep.tolist() == before.keep.tolist()
    np.testing.assert_array_equal(after.raw, before.raw)


def test_rows_and_datasets_are_scored_and_subset_in_order(plan, demo_dir):
    path = demo_dir / "clients" / "client-0.jsonl"
    rows = [json.loads(x) for x in path.open()]
    from_file = plan.apply(path)
    dataset = datasets.Dataset.from_list(rows)
    from_dataset = plan.apply(dataset)
    assert from_dataset.keep.tolist() == from_file.keep.tolist()
    expected = [r["id"] for r, keep in zip(rows, from_file.keep, strict=True) if keep]
    assert from_file.subset(dataset)["id"] == expected
    assert [r["id"] for r in from_file.subset(rows)] == expected
    pairs = [(s.prompt, s.response) for s in load_samples(path)]
    as_pairs = plan.apply(pairs)
    assert as_pairs.keep.tolist() == from_file.keep.tolist()
    mapped = plan.apply(rows, to_sample=lambda r: (r["question"], r["answer"]))
    assert mapped.keep.tolist() == from_file.keep.tolist()
    counts = from_file.counts()
    assert counts["total"] == len(rows) and counts["kept"] == len(expected)
    assert counts["kept"] + counts["rejected_below_threshold"] + counts["rejected_non_finite"] == (
        len(rows)
    )
    with pytest.raises(FedqcError, match="the dataset has 3 rows, the selection 12"):
        from_file.subset(rows[:3])


def test_a_fixed_tau_needs_no_model_and_keeps_tau_in_one_form():
    plan = QualityFilter(scorer="ppl", rule="fixed:6.5", shots=0, model="no-such-model").fit()
    assert plan.tau == -6.5 and plan.tau_raw == 6.5  # ppl: lower is better
    selection = plan.select([1.0, 6.5, 7.0, float("nan")])
    assert selection.keep.tolist() == [True, True, False, False]
    assert (selection.rejected_below_threshold, selection.rejected_non_finite) == (1, 1)
    assert QualityPlan.fixed("ppl", 6.5).tau == plan.tau


def test_an_older_plan_with_only_the_raw_tau_is_read_oriented(tmp_path):
    path = tmp_path / "old.json"
    QualityPlan.fixed("ppl", 6.5).save(path)
    record = json.loads(path.read_text())
    del record["tau"]
    path.write_text(json.dumps(record))
    assert QualityPlan.load(path).tau == -6.5


def test_a_drop_fraction_plan_drops_per_client():
    plan = QualityFilter(scorer="ppl", rule="drop-fraction:0.5", shots=0).fit()
    assert plan.tau is None
    assert plan.select([4.0, 1.0, 3.0, 2.0]).keep.tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"scorer": "nope"}, "unknown scorer 'nope'"),
        ({"rule": "anchor-quantile:2"}, "unknown threshold rule 'anchor-quantile:2'"),
        ({"dtype": "half"}, "'model.dtype' must be one of"),
        ({"shots": -1}, "shots must be ≥ 0"),
    ],
)
def test_bad_settings_are_one_clear_error(settings, fragment):
    with pytest.raises(FedqcError, match=fragment):
        QualityFilter(**settings)


def test_what_the_filter_cannot_fit_says_where_to_go(tmp_path):
    with pytest.raises(FedqcError, match="warm-up checkpoints of a federated run: use fedqc run"):
        QualityFilter(scorer="tracin").fit([Sample("a", "q", "r")])
    with pytest.raises(FedqcError, match="fitted to the clients' score histograms"):
        QualityFilter(rule="mixture").fit([Sample("a", "q", "r")])
    with pytest.raises(FedqcError, match="sets τ from anchors: pass them"):
        QualityFilter().fit()
    with pytest.raises(FedqcError, match="row 1: missing fields"):
        QualityFilter(shots=0).fit([{"prompt": "q", "response": "r"}, {"text": "x"}])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FedqcError, match="not a threshold.json plan"):
        QualityPlan.load(tmp_path / "bad.json")


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
