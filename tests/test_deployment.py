"""A real Flower deployment on this machine: one SuperLink and two SuperNodes as processes on
127.0.0.1, each node pointed at its own data folder through --node-config; `flwr run` submits
the pipeline and `flwr list --format json` (not the exit code of `flwr run`) tells how it ended.

One node is killed (SIGKILL, with its ClientApp processes) as soon as it starts training round 1:
the run must go on with the other node and record who dropped when. About two minutes, most of it
the SuperLink waiting out the dead node's heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedqc.federation.protocol import EVALUATE_METRICS, REPLY_COUNTS, TRAIN_METRICS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedqc-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind (superexec, apps)
    process.wait(timeout=15)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir, demo_dir):
    """SuperLink + two SuperNodes; yields their details; stops them (by recorded PID) at the end."""
    root = tmp_path_factory.mktemp("deployment")
    link_port = _free_port()
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec & co.
    }
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        processes[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return processes[name]

    try:
        link = start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
            "--port", str(link_port), "--disable-runtime-dependency-installation",
        )  # fmt: skip
        _wait_for_port(link_port, link, root / "superlink.log")
        sites = []
        for i in (0, 1):
            site = root / f"site-{i}"  # what a site holds: its data, and its own outputs
            (site / "data").mkdir(parents=True)
            shutil.copy(demo_dir / "clients" / f"client-{i}.jsonl", site / "data" / "train.jsonl")
            node_config = (
                f'data-path="{site / "data" / "train.jsonl"}" output-dir="{site / "fedqc"}" '
                f'partition-id={i} audit-log="{site / "fedqc" / "sent.jsonl"}" '
                # the site's own requirements, met by this run (parsed from a real --node-config)
                "answer-evaluate=true min-clients=1 require-secure-sum=false"
            )
            start(
                f"supernode-{i}", "flower-supernode", "--insecure",
                "--superlink", f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                "--node-config", node_config,
            )  # fmt: skip
            sites.append(site)
        server = root / "server"  # only the server holds the anchors and the evaluation set
        server.mkdir()
        for name in ("anchors.jsonl", "eval.jsonl"):
            shutil.copy(demo_dir / name, server / name)
        yield {
            "root": root,
            "env": env,
            "sites": sites,
            "server": server,
            "model": tiny_model_dir,
            "processes": processes,
            "pids": {name: p.pid for name, p in processes.items()},
        }
    finally:
        for process in processes.values():
            _stop(process)


def _flwr(federation, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=ROOT,
        env=federation["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _status(federation, run_id: str) -> dict:
    done = _flwr(federation, "list", CONNECTION, "--run-id", run_id, "--format", "json")
    runs = json.loads(done.stdout)["runs"]
    assert len(runs) == 1, done.stdout
    return runs[0]


@pytest.fixture(scope="module")
def finished(federation):
    """The pipeline via `flwr run`; node 1 is killed when it starts training round 1."""
    out = federation["server"] / "run"
    config = {
        "model.name": str(federation["model"]),
        "model.max-length": 64,
        "data.federation": "",
        "data.num-clients": 2,
        "data.anchors": str(federation["server"] / "anchors.jsonl"),
        "data.eval": str(federation["server"] / "eval.jsonl"),
        "quality.scorer": "ppl",
        "quality.rule": "anchor-quantile:0.3",
        "train.rounds": 2,
        "train.local-steps": 20,
        "train.batch-size": 2,
        # not the defaults, to run them on a real SuperLink too: a stateful Flower strategy,
        # adapter merging and the curriculum's per-stage picks on each site
        "train.strategy": "fedadam",
        "train.aggregation": "merge:ties:0.5",
        "quality.curriculum": "stages:2",
        "federation.min-nodes": 1,
        "federation.join-timeout": 120.0,
        "federation.timeout": 600.0,
        "output.run-dir": str(out),
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    submitted = _flwr(
        federation, "run", str(ROOT), CONNECTION, "--run-config", run_config, "--format", "json"
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.loads(submitted.stdout)["run-id"]
    assert run_id, submitted.stdout

    journal = federation["sites"][1] / "fedqc" / "train.jsonl"
    node = federation["processes"]["supernode-1"]
    killed: dict = {}

    def kill_when_training_starts() -> None:  # the node's own journal says when
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and node.poll() is None:
            if journal.is_file() and '"event": "start"' in journal.read_text():
                os.killpg(node.pid, signal.SIGKILL)  # the SuperNode and its ClientApp process
                node.wait(timeout=15)
                killed["round"] = json.loads(journal.read_text().splitlines()[0])["round"]
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_training_starts, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 600
    status = _status(federation, run_id)
    while time.monotonic() < deadline and not status["status"].startswith("finished"):
        time.sleep(2)
        status = _status(federation, run_id)
    watcher.join(timeout=30)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(federation["root"].glob("*.log"))
    )
    return {"status": status, "killed_at": killed.get("round"), "out": out, "logs": logs}


def test_flwr_run_on_a_superlink_with_two_supernodes_completes(federation, finished):
    assert finished["status"]["status"] == "finished:completed", finished["logs"]
    assert set(federation["pids"]) == {"superlink", "supernode-0", "supernode-1"}
    out = finished["out"]
    for name in (
        "threshold.json",
        "selection.json",
        "metrics.json",
        "participation.json",
        "adapter",
    ):
        assert (out / name).exists(), name
    selection = json.loads((out / "selection.json").read_text())
    assert [c["partition-id"] for c in selection["clients"]] == [0, 1]
    assert all(c["total"] == 12 for c in selection["clients"])
    # per-sample scores and decisions stay on each site; the server has none
    for site in federation["sites"]:
        scores = (site / "fedqc" / "scores.jsonl").read_text().splitlines()
        assert len(scores) == 12 and all("score" in json.loads(line) for line in scores)
    assert not (out / "clients").exists()
    assert not list(out.rglob("scores.jsonl"))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["strategy"]["name"] == "QualityFedAdam"
    assert (out / "checkpoint" / state["optimizer"]).is_file()  # FedAdam's moments
    picks = json.loads((federation["sites"][0] / "fedqc" / "curriculum.json").read_text())
    assert sorted(picks) == ["0", "1"] and not set(picks["0"]) & set(picks["1"])
    assert not list(out.rglob("curriculum.json"))  # the picks stay on the site


def test_each_site_logs_what_it_sent_and_that_is_counts_and_adapter_only(federation, finished):
    allowed = set(REPLY_COUNTS) | set(TRAIN_METRICS) | set(EVALUATE_METRICS)
    sent = {}
    for i, site in enumerate(federation["sites"]):
        sent[i] = [json.loads(x) for x in (site / "fedqc" / "sent.jsonl").read_text().splitlines()]
        for entry in sent[i]:
            assert not entry["error"], entry
            for name, record in entry["records"].items():
                if record["kind"] == "ArrayRecord":
                    assert name == "arrays" and all("lora_" in k for k in record["entries"])
                else:
                    assert record["kind"] == "MetricRecord" and set(record["entries"]) <= allowed
    assert [e["message_type"] for e in sent[0]] == ["query.score", "train", "train"]
    assert [e["message_type"] for e in sent[1]] == ["query.score"]  # killed while training


def test_a_supernode_killed_mid_round_drops_out_and_the_run_goes_on(federation, finished):
    assert finished["killed_at"] == 1, finished["logs"]
    assert finished["status"]["status"] == "finished:completed", finished["logs"]
    selection = json.loads((finished["out"] / "selection.json").read_text())
    node_of = {c["partition-id"]: c["node"] for c in selection["clients"]}
    rows = json.loads((finished["out"] / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["train_sampled"] == sorted(node_of.values())
    assert (rows[1]["train_answered"], rows[1]["train_dropped"]) == ([node_of[0]], [node_of[1]])
    assert (rows[2]["train_sampled"], rows[2]["train_answered"]) == ([node_of[0]], [node_of[0]])
    survivor = federation["sites"][0] / "fedqc" / "train.jsonl"
    done = [json.loads(x) for x in survivor.read_text().splitlines() if '"done"' in x]
    assert [d["round"] for d in done] == [1, 2]
    participation = json.loads((finished["out"] / "participation.json").read_text())
    reasons = [d["reason"] for e in participation for d in e["dropped"]]
    assert len(reasons) == 1 and "Node Unavailable" in reasons[0], reasons
