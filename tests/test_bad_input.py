"""Bad input to `fedqc run`: every user mistake stops with one clear line before anything is
written; samples too long are truncated and counted; non-finite scores are rejected and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from local_grid import LocalGrid, QuietStages

import fedqc.federation.client_app as client_app
from fedqc.config import Config, ModelConfig
from fedqc.data.encoding import encode
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.client_app import build_client_app
from fedqc.federation.server_app import run_server
from fedqc.models.loading import load
from fedqc.pipeline import check_inputs, open_run, summarize, summary_notes
from fedqc.scoring.scorers import Scores

FEDQC = Path(sys.executable).with_name("fedqc")
GOOD = '{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "q", "response": "s"}\n'


@pytest.fixture
def own_data(tmp_path, tiny_model_dir, demo_dir):
    """A config for one's own data: two client files, anchors and eval from the demo."""
    clients = tmp_path / "clients"
    clients.mkdir()
    for i in (0, 1):
        (clients / f"client-{i}.jsonl").write_text(GOOD)

    def config(**extra) -> Config:
        return Config.from_flat(
            {
                "model.name": str(tiny_model_dir),
                "data.federation": "",
                "data.clients-dir": str(clients),
                "data.anchors": str(demo_dir / "anchors.jsonl"),
                "data.eval": str(demo_dir / "eval.jsonl"),
                "quality.scorer": "ppl",  # the paper's method: 4 anchors, fixed τ in ppl units
                "quality.rule": "anchor-mean",
                **extra,
            }
        )

    return clients, config


@pytest.mark.parametrize(
    "text,fragment",
    [
        (b'{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt"\n', ":2: malformed"),
        (b"", ": holds no samples"),
        (b'{"prompt": "caf\xe9", "response": "r"}\n', ": not UTF-8 text (byte 15)"),
        (b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "output": "r"}\n', ":2: missing"),
        (b'{"id": "a", "prompt": "p", "response": "r"}\n' * 2, ":2: duplicate id 'a'"),
        (
            b'{"prompt": "p", "response": "r"}\n{"question": "p", "answer": "r"}\n',
            ":2: uses the 'qa' schema but line 1 uses 'prompt-response'",
        ),
    ],
    ids=["malformed", "empty", "not-utf8", "missing-field", "duplicate-id", "mixed-schemas"],
)
def test_a_bad_client_file_is_named_with_its_line(own_data, text, fragment):
    clients, config = own_data
    (clients / "client-1.jsonl").write_bytes(text)
    with pytest.raises(FedqcError) as info:
        check_inputs(config())
    assert str(info.value).startswith(f"{clients / 'client-1.jsonl'}{fragment}")


def test_client_data_as_csv_is_checked_row_by_row(own_data):
    clients, config = own_data
    (clients / "client-1.jsonl").unlink()
    (clients / "client-1.csv").write_text("id,prompt,response\na,p,r\nb,q,\n")
    with pytest.raises(FedqcError) as info:
        check_inputs(config())
    assert str(info.value).startswith(f"{clients / 'client-1.csv'} (row 2): missing fields")
    (clients / "client-1.csv").write_text("id,prompt,response\na,p,r\nb,q,s\n")
    anchors = [json.loads(line) for line in Path(config().data.anchors).read_text().splitlines()]
    datasets.Dataset.from_list(anchors).to_parquet(str(clients.parent / "anchors.parquet"))
    datasets.Dataset.from_list(anchors).save_to_disk(str(clients.parent / "eval"))
    places = {
        "data.anchors": clients.parent / "anchors.parquet",
        "data.eval": clients.parent / "eval",
    }
    check_inputs(config(**{key: str(path) for key, path in places.items()}))
    (clients / "client-1.jsonl").write_text(GOOD)
    with pytest.raises(FedqcError, match="client 1 has client-1.jsonl, client-1.csv; keep one"):
        check_inputs(config())


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ({"quality.scorer": "nope"}, "unknown scorer 'nope'"),
        ({"quality.rule": "anchor-median"}, "unknown threshold rule 'anchor-median'"),
        ({"data.anchors": ""}, "rule 'anchor-mean' needs an anchor set"),
        ({"quality.rule": "anchor-conformal:0.1"}, "needs at least 9 anchors"),
        (
            {"quality.shots": 4},
            "quality.shots = 4 needs at least 5 anchors, but the anchor set has 4",
        ),
        ({"model.name": "/no/such/model"}, "model '/no/such/model': not a folder"),
        ({"data.federation": "mnist"}, "unknown demo federation 'mnist'"),
    ],
)
def test_a_bad_name_or_too_few_anchors_stops_before_the_run(own_data, extra, fragment):
    _, config = own_data
    with pytest.raises(FedqcError, match=fragment.replace("(", r"\(")):
        check_inputs(config(**extra))


def test_an_empty_anchor_set(own_data, tmp_path):
    _, config = own_data
    (tmp_path / "anchors.jsonl").write_text("\n")
    with pytest.raises(FedqcError, match="anchors.jsonl: holds no samples"):
        check_inputs(config(**{"data.anchors": str(tmp_path / "anchors.jsonl")}))


def test_bad_choices_and_ranges_in_the_config():
    for key, value, fragment in [
        ("train.dp-mode", "maybe", "must be one of off, server, client"),
        ("train.lr-schedule", "linear", "must be one of constant, cosine"),
        ("quality.dp-epsilon", "-1", "must be ≥ 0.0"),
        ("federation.min-nodes", "0", "must be ≥ 1"),
        ("train.dp-clipping-norm", "0", "must be > 0"),
        ("train.strategy", "fedprox:-1", "'train.strategy' must be one of fedavg, fedprox:MU"),
        ("train.aggregation", "merge:ties:0", "'train.aggregation' must be one of mean"),
    ]:
        with pytest.raises(FedqcError, match=fragment):
            Config.from_flat({key: value}, "--set")


def test_resume_mistakes(tmp_path):
    with pytest.raises(FedqcError, match="not a fedqc run directory"):
        open_run(None, None, None, resume=tmp_path)
    (tmp_path / "config.toml").write_text(Config().to_toml())
    with pytest.raises(FedqcError, match="no checkpoint to resume"):
        open_run(None, None, None, resume=tmp_path)
    with pytest.raises(FedqcError, match="drop --out"):
        open_run(None, None, "elsewhere", resume=tmp_path)


def _run(cfg: Config) -> Path:
    run_server(LocalGrid(build_client_app(cfg), cfg.data.num_clients), cfg, QuietStages())
    return Path(cfg.output.run_dir)


def test_non_finite_scores_are_rejected_and_counted(
    tiny_model_dir, demo_dir, tmp_path, monkeypatch
):
    real = client_app.score_samples

    def with_bad_scores(*args, **kwargs) -> Scores:
        s = real(*args, **kwargs)
        raw = s.raw.copy()
        raw[:3] = [np.nan, np.inf, -np.inf]
        return dataclasses.replace(s, raw=raw, oriented=-raw)  # ppl: oriented = −raw

    monkeypatch.setattr(client_app, "score_samples", with_bad_scores)
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",  # every finite perplexity passes
            "train.rounds": 1,
            "train.local-steps": 1,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    run_dir = _run(cfg)
    for c in json.loads((run_dir / "selection.json").read_text())["clients"]:
        assert (c["total"], c["kept"], c["rejected-non-finite"]) == (12, 9, 3)
        local = (run_dir / "clients" / f"client-{c['partition-id']}" / "scores.jsonl").read_text()
        rows = [json.loads(line) for line in local.splitlines()]
        assert [(r["score"], r["keep"]) for r in rows[:3]] == [(None, False)] * 3
        assert all(r["keep"] for r in rows[3:])
    assert "6 samples had no finite score (NaN or ±inf) and were rejected" in summary_notes(
        summarize(cfg)
    )


def test_long_samples_are_truncated_and_counted(tiny_model_dir, demo_dir, tmp_path):
    tok = load(ModelConfig(name=str(tiny_model_dir))).tokenizer
    lengths = {
        i: [len(encode(tok, s, 10_000).input_ids) for s in load_samples(p)]
        for i, p in enumerate(sorted((demo_dir / "clients").glob("client-*.jsonl")))
    }
    max_length = int(np.median(lengths[0]))
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": max_length,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",
            "train.rounds": 1,
            "train.local-steps": 1,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    run_dir = _run(cfg)
    expected = {i: sum(n > max_length for n in ns) for i, ns in lengths.items()}
    assert 0 < expected[0] < 12
    counted = json.loads((run_dir / "selection.json").read_text())["clients"]
    assert {c["partition-id"]: c["truncated"] for c in counted} == expected
    summary = summarize(cfg)
    assert [c["truncated"] for c in summary["clients"]] == [expected[0], expected[1]]
    note = f"{sum(expected.values())} samples were longer than model.max-length and were truncated"
    assert note in summary_notes(summary)


# --- the `fedqc` command, as a user runs it -------------------------------------------------


def _start(*args, cwd: Path) -> subprocess.Popen:
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


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_model_dir, demo_dir) -> tuple[Path, dict]:
    """Each mistake in its own `fedqc run`, all started together."""
    cwd = tmp_path_factory.mktemp("cli-bad")
    (cwd / "clients").mkdir()
    (cwd / "clients" / "client-0.jsonl").write_text(GOOD + GOOD.splitlines()[0] + "\n")
    (cwd / "taken").mkdir()
    (cwd / "taken" / "notes.txt").write_text("mine")
    demo = [
        "--set", f"model.name={tiny_model_dir}", "--set", "model.max-length=64",
        "--set", f"data.clients-dir={demo_dir / 'clients'}",
        "--set", f"data.anchors={demo_dir / 'anchors.jsonl'}",
        "--set", "train.rounds=1", "--set", "train.local-steps=1",
        "--set", "quality.scorer=ppl", "--set", "quality.rule=anchor-mean",
    ]  # fmt: skip
    started = {
        "duplicate-id": _start(
            "run",
            "--set",
            "data.federation=",
            "--set",
            f"data.clients-dir={cwd / 'clients'}",
            "--set",
            f"model.name={tiny_model_dir}",
            "--set",
            "quality.scorer=ppl",
            "--set",
            "quality.rule=fixed:5",
            "--out",
            "a",
            cwd=cwd,
        ),  # fmt: skip
        "unknown-model": _start(
            "run", *demo, "--set", "model.name=smollm2-999m", "--out", "b", cwd=cwd
        ),
        "taken": _start("run", *demo, "--out", "taken", cwd=cwd),
        "drops-everything": _start(
            "run", *demo, "--set", "quality.rule=fixed:1.0", "--out", "c", cwd=cwd
        ),
        "bad-choice": _start("run", "--set", "train.dp-mode=maybe", "--out", "d", cwd=cwd),
        "bad-strategy": _start("run", "--set", "train.strategy=krum:x", "--out", "e", cwd=cwd),
        "merge-robust": _start(
            "run",
            *demo,
            "--set",
            "train.strategy=fedmedian",
            "--set",
            "train.aggregation=merge:ties:0.5",
            "--out",
            "f",
            cwd=cwd,
        ),  # fmt: skip
        "resume-nothing": _start("run", "--resume", "taken", cwd=cwd),
    }
    return cwd, {k: p.communicate(timeout=600) + (p.returncode,) for k, p in started.items()}


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("duplicate-id", "client-0.jsonl:3: duplicate id 'a' (first on line 1)"),
        ("unknown-model", "model 'smollm2-999m': cannot load it"),
        ("taken", "taken: exists and is not empty; choose another --out or add --force"),
        ("drops-everything", "drops every sample in the federation"),
        ("bad-choice", "'train.dp-mode' must be one of off, server, client"),
        ("bad-strategy", "'train.strategy' must be one of fedavg, fedprox:MU"),
        ("merge-robust", "train.aggregation=merge:ties:0.5 merges adapters"),
        ("resume-nothing", "taken: not a fedqc run directory"),
    ],
)
def test_fedqc_run_mistakes_give_one_line_and_exit_2(cli_runs, name, fragment):
    cwd, runs = cli_runs
    stdout, stderr, code = runs[name]
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], stderr
    out = {
        "duplicate-id": "a",
        "unknown-model": "b",
        "bad-choice": "d",
        "bad-strategy": "e",
        "merge-robust": "f",
    }.get(name)
    if out:  # found before the run directory is made
        assert not (cwd / out).exists()
    assert (cwd / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (cwd / "taken").iterdir()) == ["notes.txt"]


def test_allow_empty_and_force_reach_the_run_config(tmp_path, tiny_model_dir, demo_dir):
    sets = [f"model.name={tiny_model_dir}", f"data.clients-dir={demo_dir / 'clients'}"]
    sets += ["quality.scorer=ppl", "quality.rule=fixed:5"]
    cfg, run_dir = open_run(None, sets, str(tmp_path / "run"), allow_empty=True)
    assert cfg.quality.allow_empty and not cfg.output.force
    assert (run_dir / "config.toml").is_file()
    with pytest.raises(FedqcError, match="exists and is not empty"):
        open_run(None, sets, str(run_dir))
    cfg, _ = open_run(None, sets, str(run_dir), force=True)
    assert cfg.output.force and not cfg.quality.allow_empty


def test_output_run_dir_from_the_config_is_the_run_directory(tmp_path, tiny_model_dir, demo_dir):
    sets = [f"model.name={tiny_model_dir}", f"data.clients-dir={demo_dir / 'clients'}"]
    sets += ["quality.scorer=ppl", "quality.rule=fixed:5", f"output.run-dir={tmp_path / 'chosen'}"]
    cfg, run_dir = open_run(None, sets, None)
    assert run_dir == tmp_path / "chosen" and cfg.output.run_dir == str(run_dir)
    assert (run_dir / "config.toml").is_file()
    _, other = open_run(None, sets, str(tmp_path / "given"))  # --out wins over the config
    assert other == tmp_path / "given"
