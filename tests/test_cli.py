"""The `fedqc` console script end to end, in subprocesses (as a user runs it).

Each process pays for importing torch and transformers, so the independent commands are started
together in one fixture and checked in separate tests.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from fedqc.config import ModelConfig
from fedqc.data.samples import load_samples
from fedqc.models.loading import load
from fedqc.quality.plan import few_shot_prefix
from fedqc.quality.rules import guarantee, parse_rule
from fedqc.scoring.scorers import get_scorer, score_samples

FEDQC = Path(sys.executable).with_name("fedqc")
MAX_LENGTH = 128
SMALL_DEMO = [
    "--set",
    "data.num-clients=2",
    "--set",
    "data.samples-per-client=6",
    "--set",
    "data.num-anchors=3",
    "--set",
    "data.num-eval=2",
    "--set",
    "data.contamination=0.5",
]


def start(*args, cwd: Path) -> subprocess.Popen:
    command = (
        [str(FEDQC)]
        if FEDQC.exists()
        else [sys.executable, "-c", "from fedqc.cli import main; main()"]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fedqc(*args, cwd: Path) -> subprocess.CompletedProcess:
    return finish(start(*args, cwd=cwd))


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cli")
    result = fedqc("data", "demo", "--out", "demo", *SMALL_DEMO, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "demo"


@pytest.fixture(scope="module")
def runs(demo, tiny_model_dir) -> dict[str, subprocess.CompletedProcess]:
    """Every command that needs nothing but the demo folder, run side by side."""
    cwd = demo.parent
    data, model = demo / "clients" / "client-0.jsonl", ["--model", tiny_model_dir]
    (cwd / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    started = {
        "score": start(
            "score",
            data,
            "--scorer",
            "ppl",
            *model,
            "--max-length",
            MAX_LENGTH,
            "--out",
            "scores.jsonl",
            cwd=cwd,
        ),
        "threshold": start(
            "threshold",
            demo / "anchors.jsonl",
            "--scorer",
            "ppl",
            "--rule",
            "anchor-mean",
            "--shots",
            "0",  # the papers' zero-shot ppl (the default is a run's 2 shots)
            *model,
            "--max-length",
            MAX_LENGTH,
            cwd=cwd,
        ),
        "unknown-scorer": start(
            "score", data, "--scorer", "nope", *model, "--out", "x.jsonl", cwd=cwd
        ),
        "malformed": start(
            "score", cwd / "bad.jsonl", "--scorer", "ppl", *model, "--out", "y.jsonl", cwd=cwd
        ),
        "missing": start(
            "score", cwd / "missing.jsonl", "--scorer", "ppl", *model, "--out", "z.jsonl", cwd=cwd
        ),
        "run-unknown-key": start("run", "--set", "train.nope=1", "--out", "run", cwd=cwd),
        "shots-without-anchors": start(
            "score", data, "--scorer", "ppl", "--shots", "2", *model, "--out", "s.jsonl", cwd=cwd
        ),
        "nan-threshold": start(
            "filter",
            data,
            "--scores",
            "none.jsonl",
            "--threshold",
            "nan",
            "--out",
            "k.jsonl",
            cwd=cwd,
        ),
        "bad-dtype": start(
            "score", data, "--scorer", "ppl", *model, "--dtype", "half", "--out", "d.jsonl", cwd=cwd
        ),
        "missing-cuda": start(
            "score",
            data,
            "--scorer",
            "ppl",
            *model,
            "--device",
            "cuda:7",
            "--out",
            "c.jsonl",
            cwd=cwd,
        ),
        "score-bf16": start(
            "score",
            data,
            "--scorer",
            "ppl",
            *model,
            "--max-length",
            MAX_LENGTH,
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--out",
            "scores-bf16.jsonl",
            cwd=cwd,
        ),
        "score-2-shot": start(
            "score",
            data,
            "--scorer",
            "ppl",
            "--shots",
            "2",
            "--anchors",
            demo / "anchors.jsonl",
            *model,
            "--max-length",
            MAX_LENGTH,
            "--out",
            "scores-2-shot.jsonl",
            cwd=cwd,
        ),
    }
    return {name: finish(process) for name, process in started.items()}


@pytest.fixture(scope="module")
def scored(demo, runs) -> tuple[Path, Path]:
    assert runs["score"].returncode == 0, runs["score"].stderr
    return demo / "clients" / "client-0.jsonl", demo.parent / "scores.jsonl"


def test_data_demo_writes_files_and_refuses_to_overwrite(demo):
    files = sorted(p for p in demo.rglob("*") if p.is_file())
    names = {str(p.relative_to(demo)) for p in files}
    assert {
        "anchors.jsonl",
        "eval.jsonl",
        "manifest.json",
        "clients/client-0.jsonl",
        "clients/client-1.jsonl",
        "truth/client-0.jsonl",
        "truth/client-1.jsonl",
    } <= names
    assert len((demo / "clients" / "client-1.jsonl").read_text().splitlines()) == 6
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    again = fedqc("data", "demo", "--out", demo.name, "--set", "data.seed=9", cwd=demo.parent)
    assert_user_error(again, "exists and is not empty")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p for p in demo.rglob("*") if p.is_file()) == files


def _ppl(
    model_dir: Path, samples, dtype: str = "auto", demos=(), shots: int = 0, device: str = "auto"
) -> np.ndarray:
    """The perplexities `fedqc score` should write, computed here in this process."""
    mcfg = ModelConfig(name=str(model_dir), max_length=MAX_LENGTH, device=device, dtype=dtype)
    loaded = load(mcfg)
    prefix = few_shot_prefix(loaded, list(demos), shots, MAX_LENGTH)
    prefixes = [prefix] * len(samples)
    return score_samples(loaded, samples, get_scorer("ppl"), MAX_LENGTH, prefixes=prefixes).raw


def test_score_writes_one_line_per_sample_in_order(scored, tiny_model_dir):
    data, out = scored
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    samples = load_samples(data)
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert all(r["scorer"] == "ppl" for r in rows)
    want = _ppl(tiny_model_dir, samples)
    np.testing.assert_allclose([r["score"] for r in rows], want, rtol=1e-6)


def test_threshold_prints_the_anchor_mean(demo, runs, tiny_model_dir):
    result = runs["threshold"]
    assert result.returncode == 0, result.stderr
    tau = float(result.stdout.strip())
    anchors = load_samples(demo / "anchors.jsonl")
    ppl = _ppl(tiny_model_dir, anchors)
    assert tau == pytest.approx(float(np.mean(ppl)), rel=1e-5)
    promise = guarantee(parse_rule("anchor-mean"), -ppl)  # what the rule promises, printed
    assert promise in " ".join(result.stderr.split())


def test_filter_keeps_samples_with_ppl_at_most_tau(scored):
    data, scores = scored
    ppl = {r["id"]: r["score"] for r in map(json.loads, scores.read_text().splitlines())}
    tau = sorted(ppl.values())[len(ppl) // 2]  # a score itself: ties at τ are kept
    out = scores.parent / "kept.jsonl"
    result = fedqc(
        "filter",
        data,
        "--scores",
        scores,
        "--threshold",
        repr(tau),
        "--out",
        out,
        cwd=scores.parent,
    )
    assert result.returncode == 0, result.stderr
    originals = [json.loads(line) for line in data.read_text().splitlines()]
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [r for r in originals if ppl[r["id"]] <= tau]
    assert 0 < len(kept) < len(originals)


def test_filter_reads_parquet_writes_csv_and_never_the_input(scored):
    data, scores = scored
    ppl = {r["id"]: r["score"] for r in map(json.loads, scores.read_text().splitlines())}
    tau = sorted(ppl.values())[len(ppl) // 2]
    originals = [json.loads(line) for line in data.read_text().splitlines()]
    parquet = scores.parent / "client-0.parquet"
    datasets.Dataset.from_list(originals).to_parquet(str(parquet))
    before = parquet.read_bytes()
    common = ("filter", parquet, "--scores", scores, "--threshold", repr(tau))
    started = {
        "csv": start(*common, "--out", "kept.csv", cwd=scores.parent),
        "input": start(*common, "--out", parquet, "--force", cwd=scores.parent),
        "txt": start(*common, "--out", "kept.txt", cwd=scores.parent),
    }
    results = {name: finish(process) for name, process in started.items()}
    assert results["csv"].returncode == 0, results["csv"].stderr
    with open(scores.parent / "kept.csv", newline="", encoding="utf-8") as fh:
        kept = list(csv.DictReader(fh))
    expected = [r for r in originals if ppl[r["id"]] <= tau]
    assert [r["id"] for r in kept] == [r["id"] for r in expected]
    assert [r["question"] for r in kept] == [r["question"] for r in expected]
    assert_user_error(results["input"], f"--out {parquet}: is the input; choose another path")
    assert parquet.read_bytes() == before
    assert_user_error(results["txt"], "kept.txt: unknown output type '.txt'; name it .jsonl")
    assert not (scores.parent / "kept.txt").exists()


def test_shots_need_anchors_and_show_the_first_anchors(runs, scored, demo, tiny_model_dir):
    assert_user_error(runs["shots-without-anchors"], "--shots 2 shows the first 2 anchors")
    assert not (demo.parent / "s.jsonl").exists()
    assert runs["score-2-shot"].returncode == 0, runs["score-2-shot"].stderr
    two_shot = [json.loads(x) for x in (demo.parent / "scores-2-shot.jsonl").open()]
    samples, anchors = load_samples(scored[0]), load_samples(demo / "anchors.jsonl")
    assert [r["id"] for r in two_shot] == [s.id for s in samples]
    want = _ppl(tiny_model_dir, samples, demos=anchors, shots=2)  # the first 2 that fit whole
    np.testing.assert_allclose([r["score"] for r in two_shot], want, rtol=1e-6)
    zero_shot = _ppl(tiny_model_dir, samples)  # which scores without them would not pass
    assert np.abs(zero_shot / want - 1).max() > 1e-4


def test_filter_refuses_a_threshold_that_is_not_a_number(runs, demo):
    assert_user_error(runs["nan-threshold"], "--threshold nan: τ must be a finite number")
    assert not (demo.parent / "k.jsonl").exists()


def test_dtype_and_device_options(runs, scored, demo, tiny_model_dir):
    assert_user_error(runs["bad-dtype"], "'model.dtype' must be one of auto, float32")
    if not torch.cuda.is_available():
        assert_user_error(runs["missing-cuda"], "model.device: 'cuda:7' but this machine has no")
    assert not (demo.parent / "d.jsonl").exists() and not (demo.parent / "c.jsonl").exists()
    assert runs["score-bf16"].returncode == 0, runs["score-bf16"].stderr
    full = [json.loads(x)["score"] for x in scored[1].open()]
    low = [json.loads(x)["score"] for x in (demo.parent / "scores-bf16.jsonl").open()]
    want = _ppl(tiny_model_dir, load_samples(scored[0]), dtype="bfloat16", device="cpu")
    np.testing.assert_allclose(low, want, rtol=1e-6)  # bfloat16's scores
    assert np.abs(np.divide(full, want) - 1).max() > 1e-5  # which float32's would not pass
    np.testing.assert_allclose(low, full, rtol=0.05)  # and near float32's


def test_unknown_scorer(runs, demo):
    assert_user_error(runs["unknown-scorer"], "unknown scorer 'nope'")
    assert not (demo.parent / "x.jsonl").exists()


def test_malformed_json_names_file_and_line(runs, demo):
    assert_user_error(runs["malformed"], f"{demo.parent / 'bad.jsonl'}:2: malformed JSON")


def test_missing_data_file(runs, demo):
    assert_user_error(runs["missing"], f"{demo.parent / 'missing.jsonl'}: file not found")


def test_run_with_unknown_set_key(runs, demo):
    assert_user_error(runs["run-unknown-key"], "unknown config key 'train.nope'")
    assert not (demo.parent / "run").exists()


def test_the_step_by_step_cli_decides_exactly_as_a_run(demo, tiny_model_dir, tmp_path):
    """threshold --out → score --plan → filter --plan, with the default scorer (a calibrated
    ensemble), rule and 2 shots, keeps on each client exactly what `fedqc run`'s client keeps."""
    from local_grid import run_default_in_process

    run_dir, max_length = tmp_path / "run", 512  # no anchor is cut: each has an end-loss
    run_default_in_process(tiny_model_dir, demo, run_dir, max_length)
    ran = json.loads((run_dir / "threshold.json").read_text())

    model = ["--model", tiny_model_dir, "--max-length", max_length]
    plan = tmp_path / "threshold.json"
    result = fedqc("threshold", demo / "anchors.jsonl", *model, "--out", plan, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads(plan.read_text())
    for key in ("scorer", "rule", "shots", "tau", "calibration", "prefix", "anchor_scores"):
        assert written[key] == ran[key], key
    assert written["shots"] == 2 and len(written["prefix"]) > 0

    clients = sorted((demo / "clients").glob("client-*.jsonl"))
    scoring = [
        start("score", c, "--plan", plan, "--out", f"s-{i}.jsonl", cwd=tmp_path)
        for i, c in enumerate(clients)
    ]
    assert all(finish(p).returncode == 0 for p in scoring)
    decisions = []
    for i, data in enumerate(clients):
        kept = tmp_path / f"kept-{i}.jsonl"
        args = ["--scores", f"s-{i}.jsonl", "--plan", plan, "--out", kept]
        result = fedqc("filter", data, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        local = [
            json.loads(x) for x in (run_dir / "clients" / f"client-{i}" / "scores.jsonl").open()
        ]
        scores = [json.loads(x) for x in (tmp_path / f"s-{i}.jsonl").open()]
        assert [r["score"] for r in scores] == [r["score"] for r in local]
        kept_ids = [json.loads(x)["id"] for x in kept.open()]
        assert kept_ids == [r["id"] for r in local if r["keep"]]
        decisions += [r["keep"] for r in local]
    assert any(decisions)  # not vacuous: the run kept samples (and the CLI the same ones)
