"""fedqc.flower in an existing Flower app: the quality round, the answer, the kept subset.

The example app (examples/flowertune-qc) runs end to end on Flower's simulation runtime; the
drop-in's own contract is checked on the in-process grid of the federation tests.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import datasets
import pytest
from flwr.app import Message, MetricRecord
from flwr.clientapp import ClientApp
from local_grid import LocalGrid

from fedqc import QualityFilter
from fedqc.errors import FedqcError
from fedqc.federation.protocol import ERROR_REASONS, CountsReply
from fedqc.flower import QUERY_QUALITY, answer_quality_query, kept, quality_round

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flowertune-qc"
MAX_LENGTH = 512
COUNT_KEYS = ("total", "kept", "rejected_below_threshold", "rejected_non_finite", "truncated")


class RecordingGrid(LocalGrid):
    """The in-process grid, keeping every reply the server receives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def quality_app(data: dict[int, object]) -> ClientApp:
    """A user's ClientApp answering the quality query with its own dataset per partition."""
    app = ClientApp()

    @app.query("quality")
    def quality(msg: Message, context) -> Message:
        return answer_quality_query(msg, context, data[int(context.node_config["partition-id"])])

    return app


def assert_counts_only(reply: Message) -> CountsReply:
    """The reply holds one MetricRecord of CountsReply's keys, each one number."""
    assert not reply.has_error(), reply.error
    assert list(reply.content) == [CountsReply.RECORD]
    stats = reply.content[CountsReply.RECORD]
    assert isinstance(stats, MetricRecord)
    assert set(stats) <= set(CountsReply.record_keys())
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in stats.values())
    return CountsReply.from_record(stats)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_a_node_keeps_the_plans_decisions_and_a_failing_node_says_nothing(demo_dir, tiny_model_dir):
    mine = datasets.Dataset.from_list(rows(demo_dir / "clients" / "client-0.jsonl"))
    secret = "patient 4711 has"
    broken = [{"note": f"{secret} diabetes"}]  # no known schema: the node fails
    grid = RecordingGrid(quality_app({0: mine, 1: broken}), 2)
    quality = QualityFilter(scorer="ppl", rule="anchor-mean", shots=1, model=str(tiny_model_dir))
    plan, counts = quality_round(grid, demo_dir / "anchors.jsonl", quality, min_nodes=1)

    expected = plan.apply(mine)
    assert 0 < expected.kept < expected.total  # not vacuous
    (node,) = counts
    assert grid.partition[node] == 0
    assert {k: getattr(counts[node], k) for k in COUNT_KEYS} == expected.counts()
    assert kept(grid.contexts[node], mine)["id"] == expected.subset(mine)["id"]

    answered, failed = (r for r in sorted(grid.replies, key=lambda r: r.has_error()))
    assert_counts_only(answered)
    assert failed.error.reason in ERROR_REASONS and secret not in failed.error.reason
    with pytest.raises(FedqcError, match="1 of 2 nodes answered the quality query"):
        quality_round(grid, None, plan, min_nodes=2)


def test_training_before_the_quality_round_is_refused(demo_dir):
    grid = LocalGrid(quality_app({}), 1)
    (context,) = grid.contexts.values()
    with pytest.raises(FedqcError, match="answered no quality query"):
        kept(context, [1, 2, 3])


def test_quality_control_costs_the_example_at_most_30_lines():
    files = [*sorted((EXAMPLE / "flowertune_qc").glob("*.py")), EXAMPLE / "pyproject.toml"]
    marked = [line for f in files for line in f.read_text().splitlines() if "# fedqc" in line]
    assert 0 < len(marked) <= 30, len(marked)
    # Every line that imports fedqc or calls the drop-in is marked, so the count is the cost; the
    # plain fine-tune also takes its offline model and demo data from fedqc (not quality control).
    uses = re.compile(
        r"^(from|import) fedqc|answer_quality_query\(|kept\(|quality_round\(|QualityFilter\("
        r"|load_anchors\("
    )
    unmarked = [
        line.strip()
        for f in files
        for line in f.read_text().splitlines()
        if uses.search(line.strip()) and "# fedqc" not in line
    ]
    assert [line.split(" import ")[0] for line in unmarked] == [
        "from fedqc.data.demo",
        "from fedqc.models.loading",
    ]


@pytest.fixture(scope="module")
def example(tmp_path_factory, demo_dir, tiny_model_dir):
    """The example app copied with tiny settings (its pyproject.toml holds the defaults that the
    in-process runtime, which passes no run config, falls back to)."""
    root = tmp_path_factory.mktemp("example") / "flowertune-qc"
    shutil.copytree(EXAMPLE, root)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    for key, value in {
        "num-server-rounds": 1,
        "model.name": json.dumps(str(tiny_model_dir)),
        "model.max-length": MAX_LENGTH,
        "train.max-steps": 1,
        "train.batch-size": 2,
        "dataset.path": json.dumps(str(demo_dir)),
    }.items():
        text, n = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    pyproject.write_text(text)
    return root


def test_the_example_app_runs_on_the_simulation_runtime(example, demo_dir, tiny_model_dir):
    """Its nodes keep what QualityFilter.fit(anchors).apply(their data) keeps, reply counts only,
    and train on the kept rows."""
    from flwr.simulation import run_simulation
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    received: list[Message] = []
    original = InMemoryGrid.send_and_receive

    def recording(self, *args, **kwargs):
        replies = list(original(self, *args, **kwargs))
        received.extend(replies)
        return replies

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(example))  # the ServerApp's thread
        paths = [str(example), os.environ.get("PYTHONPATH", "")]
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))  # Ray's workers
        patch.setattr(InMemoryGrid, "send_and_receive", recording)
        for name in [m for m in sys.modules if m.startswith("flowertune_qc")]:
            patch.delitem(sys.modules, name)
        server = importlib.import_module("flowertune_qc.server_app")
        client = importlib.import_module("flowertune_qc.client_app")
        run_simulation(
            server_app=server.app,
            client_app=client.app,
            num_supernodes=2,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
            },
            verbose_logging=False,
        )

    quality = [r for r in received if r.metadata.message_type == QUERY_QUALITY]
    trained = [r for r in received if r.metadata.message_type == "train"]
    assert len(quality) == 2 and len(trained) == 2
    counts = {r.metadata.src_node_id: assert_counts_only(r) for r in quality}

    settings = QualityFilter(model=str(tiny_model_dir), max_length=MAX_LENGTH)  # the example's
    plan = settings.fit(demo_dir / "anchors.jsonl")
    expected = {
        pid: plan.apply(demo_dir / "clients" / f"client-{pid}.jsonl").counts() for pid in (0, 1)
    }
    assert {c.partition_id: {k: getattr(c, k) for k in COUNT_KEYS} for c in counts.values()} == (
        expected
    )
    kept_total = sum(c["kept"] for c in expected.values())
    assert 0 < kept_total < sum(c["total"] for c in expected.values())  # not vacuous
    for reply in trained:  # each node trained on its kept rows only
        c = counts[reply.metadata.src_node_id]
        assert reply.content["metrics"]["num-examples"] == c.kept
