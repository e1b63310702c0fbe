"""An in-process Grid for fast federation tests: each message goes straight to a ClientApp object.

No Ray and no network, but the same ServerApp code (``run_server``), the same ClientApp with its
mods (privacy guard, DP clipping) and one persistent Context per node, as Flower keeps them.
A node can be made to die at a given phase and round: from then on the grid answers for it as the
SuperLink does for a node that stopped sending heartbeats.
"""

from __future__ import annotations

from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1


class LocalGrid:
    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_configs: list[dict] | None = None,
        dies: dict[int, tuple[str, int]] | None = None,
    ) -> None:
        # The ServerApp's identity, as Flower's runtimes set it before the ServerApp runs.
        TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.app = client_app
        self.node_ids = [1000 + 17 * i for i in range(num_nodes)]  # not in partition order
        self.node_ids.reverse()
        self.partition = {}
        self.contexts = {}
        for pid, node in enumerate(sorted(self.node_ids)):
            config = {"partition-id": pid, "num-partitions": num_nodes}
            config |= (node_configs or [{}] * num_nodes)[pid]
            self.partition[node] = pid
            self.contexts[node] = Context(
                run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={}
            )
        self.node_of = {pid: node for node, pid in self.partition.items()}
        self.dies = {self.node_of[pid]: when for pid, when in (dies or {}).items()}
        self.dead: set[int] = set()
        self.delivered: list[tuple[int, str, int]] = []  # (partition, message type, round)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.node_ids if n not in self.dead]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            config = msg.content.get("config", {})
            server_round = int(config.get("server-round", 0))
            if self.dies.get(node) == (kind, server_round):
                self.dead.add(node)
            if node in self.dead:  # what the SuperLink replies once a node stops heartbeating
                reply = Message(
                    Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                    reply_to=msg,
                )
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(reply)
                continue
            self.delivered.append((self.partition[node], kind, server_round))
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # what Flower's runtime sends when a ClientApp raises
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{exc!r}")
                replies.append(Message(error, reply_to=msg))
        return replies


class QuietStages:
    """The server's progress reports, dropped."""

    def stage(self, description: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def run_default_in_process(model_dir, demo_dir, run_dir, max_length: int):
    """`fedqc run` in process on the demo's 2 clients with the default scorer, rule and 2 shots
    (one short round): the run the step-by-step CLI and the filter object must decide as. Returns
    its config; the outputs are in ``run_dir``."""
    from fedqc.config import Config, QualityConfig
    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    cfg = Config.from_flat(
        {
            "model.name": str(model_dir),
            "model.max-length": max_length,
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.num-clients": 2,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(run_dir),
        }
    )
    assert (cfg.quality.scorer, cfg.quality.shots) == (QualityConfig().scorer, 2)
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
    return cfg
