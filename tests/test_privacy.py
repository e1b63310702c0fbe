"""Privacy: what a client sends holds no text, token ids or per-sample scores."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedqc.config import Config, ModelConfig
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.privacy import (
    LEDGER_FILE,
    SAMPLES_KEY,
    SECURE_STATE_KEY,
    AuditLog,
    EdgesRefused,
    NodeFacts,
    NodeRequirements,
    OutgoingGuard,
    PrivacyViolation,
    RequirementRefused,
    check_edges,
    check_reply,
    check_request,
    ledger_total,
    noisy_histogram,
    record_release,
)
from fedqc.federation.protocol import (
    ERROR_REASONS,
    HISTOGRAM_BINS,
    HISTOGRAM_REPLY,
    MASKED_KEY,
    MIN_BIN_SHARE,
    QUERY_SCORE,
    REASON_EDGES,
    REASON_EPSILON,
    REASON_FAILED,
    REASON_GUARD,
    REASON_INPUT,
    REASON_MIN_CLIENTS,
    REASON_NEEDS_SECURE_SUM,
    REASON_NO_EVALUATE,
    REPLY_COUNTS,
    REQUIREMENT_REASONS,
    SECURE_KEYS,
    SECURE_RECORD,
    SECURE_SHARES,
    SECURE_UNMASK,
    CountsReply,
    EvaluateMetrics,
    HistogramReply,
    TrainMetrics,
)
from fedqc.federation.secure_sum import (
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    fernet_key,
)
from fedqc.federation.simulation import run_simulation
from fedqc.models.loading import load
from fedqc.pipeline import new_run_dir, prepare
from fedqc.quality.mixture import histogram_edges


def test_every_client_message_of_a_run_is_counts_and_adapter_only(
    tmp_path, tiny_model_dir, demo_dir
):
    audit = tmp_path / "audit.jsonl"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 96,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "quality.scorer": "ppl",
            "quality.rule": "anchor-quantile:0.2",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.fraction-evaluate": 1.0,
        }
    )
    cfg = prepare(cfg, new_run_dir(str(tmp_path / "run"), force=False))
    run_simulation(cfg, cfg.data.num_clients, client_mods=[AuditLog(str(audit))])

    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = sorted(e["message_type"] for e in entries)
    assert kinds == ["evaluate", "evaluate", "query.score", "query.score", "train", "train"]
    adapter = load(ModelConfig(name=str(tiny_model_dir))).initial_adapter
    texts = [s.prompt for s in load_samples(demo_dir / "clients" / "client-0.jsonl")]
    allowed = {*CountsReply.record_keys(), *TrainMetrics.record_keys()}
    allowed |= set(EvaluateMetrics.record_keys())  # the keys come from the messages' fields
    for entry in entries:
        assert not entry["error"], entry
        for name, record in entry["records"].items():
            if record["kind"] == "ArrayRecord":
                assert name == "arrays"
                shapes = {k: v["shape"] for k, v in record["entries"].items()}
                assert shapes == {k: list(v.shape) for k, v in adapter.items()}
            else:
                assert record["kind"] == "MetricRecord", record
                for key, value in record["entries"].items():
                    assert key in allowed
                    assert isinstance(value, int | float), (key, value)
        dumped = json.dumps(entry)
        assert not any(t[:30] in dumped for t in texts)


# A node with 10 samples and partition id 0; a plain request (no secure sum), or rule mixture's.
FACTS = NodeFacts(samples=10, partition_id=0)
DP_FACTS = NodeFacts(samples=10, epsilon=1.0, partition_id=0)  # counts may carry noise
ASKED = RecordDict({"config": ConfigRecord({"tau": 0.5})})
ASKED_HISTOGRAM = RecordDict({"config": ConfigRecord({"edges": [0.0, 1.0]})})
COUNTS_OK = {
    "total": 10,
    "kept": 7,
    "rejected-below-threshold": 2,
    "rejected-non-finite": 1,
    "truncated": 0,
    "partition-id": 0,
}


def _counts(**changes) -> RecordDict:
    """A query reply of this node's counts, with ``changes`` (None: the key is left out)."""
    values = {k: v for k, v in (COUNTS_OK | changes).items() if v is not None}
    return RecordDict({"stats": MetricRecord(values)})


def test_guard_passes_counts_and_lora_arrays():
    check_reply(QUERY_SCORE, ASKED, _counts(), FACTS)
    check_reply("query.select", ASKED, _counts(**{"score-seconds": 1.5}), FACTS)
    own = {"m.lora_A.weight": ((2, 3), "float32")}
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"m.lora_A.weight": torch.zeros(2, 3)}),
            "metrics": MetricRecord({"num-examples": 7, "train-loss": 0.5}),
        }
    )
    check_reply("train", ASKED, reply, NodeFacts(adapter=own, samples=10))


@pytest.mark.parametrize(
    "content",
    [
        _counts(scores=[0.1, 0.2, 0.3]),  # per-sample scores as a list
        _counts(**{"sample-7-score": 0.3}),  # a per-sample score under its own key
        RecordDict({"stats": ConfigRecord({"total": 10, "text": "What is 2+3?"})}),
        RecordDict({"tokens": ConfigRecord({"ids": [1, 2, 3]})}),
    ],
)
def test_guard_stops_anything_else(content):
    with pytest.raises(PrivacyViolation):
        check_reply(QUERY_SCORE, ASKED, content, FACTS)


def test_guard_stops_non_adapter_arrays():
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"input_ids": torch.arange(5)}),
            "metrics": MetricRecord({"num-examples": 7, "train-loss": 0.5}),
        }
    )
    with pytest.raises(PrivacyViolation):
        check_reply("train", ASKED, reply, NodeFacts(adapter=OWN, samples=10))


def _histogram(values, **changes) -> RecordDict:
    """Rule mixture's query.score reply, its total the histogram's sum (no non-finite)."""
    total = sum(v for v in values if isinstance(v, int)) if isinstance(values, list) else 0
    stats = {"histogram": values, "total": total, "rejected-non-finite": 0, "truncated": 0}
    stats |= {"partition-id": 0} | changes
    return RecordDict({"stats": MetricRecord({k: v for k, v in stats.items() if v is not None})})


def test_guard_passes_a_histogram_of_the_agreed_length():
    check_reply(QUERY_SCORE, ASKED_HISTOGRAM, _histogram([0] * (HISTOGRAM_BINS - 1) + [10]), FACTS)


@pytest.mark.parametrize(
    "values",
    [
        [1] * (HISTOGRAM_BINS - 1),  # too short
        [1] * (HISTOGRAM_BINS + 1),  # too long
        [1] * (HISTOGRAM_BINS - 1) + [-1],  # negative
        [0.5] * HISTOGRAM_BINS,  # per-sample scores would be floats
        [],
    ],
    ids=["short", "long", "negative", "floats", "empty"],
)
def test_guard_stops_a_histogram_that_is_not_counts_over_the_bins(values):
    with pytest.raises(PrivacyViolation):
        check_reply(QUERY_SCORE, ASKED_HISTOGRAM, _histogram(values), DP_FACTS)


def test_guard_allows_a_histogram_only_in_the_stats_record():
    record = MetricRecord({"histogram": [0] * HISTOGRAM_BINS, "num-examples": 3})
    with pytest.raises(PrivacyViolation):
        check_reply("evaluate", ASKED, RecordDict({"metrics": record}), FACTS)
    with pytest.raises(PrivacyViolation):  # a histogram where the request asked for counts
        check_reply(QUERY_SCORE, ASKED, _histogram([0] * (HISTOGRAM_BINS - 1) + [10]), FACTS)
    assert "histogram" in HISTOGRAM_REPLY and "histogram" not in REPLY_COUNTS


def test_noisy_histogram_adds_laplace_noise_per_bin():
    rng = np.random.default_rng(0)
    counts = [5] * HISTOGRAM_BINS
    assert noisy_histogram(counts, 0.0, rng) == counts
    draws = np.array([noisy_histogram(counts, 0.5, rng) for _ in range(500)])
    assert draws.shape == (500, HISTOGRAM_BINS) and draws.min() >= 0
    assert abs(draws.mean() - 5) < 0.2 and draws.std() > 1
    check_reply(
        QUERY_SCORE,
        ASKED_HISTOGRAM,
        _histogram(noisy_histogram(counts, 0.5, rng), total=300),
        NodeFacts(samples=320, epsilon=0.5, partition_id=0),
    )


def test_every_reply_of_a_warm_up_and_mixture_run_is_counts_histogram_or_adapter(
    tmp_path, tiny_model_dir, demo_dir
):
    """tracin + mixture, in-process: train.warmup, query.score (histogram), query.select, train."""
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    audit = tmp_path / "audit.jsonl"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.federation": "",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "tracin-cos",
            "quality.rule": "mixture",
            "quality.warmup-rounds": 1,
            "quality.dp-epsilon": 1.0,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    run_server(LocalGrid(build_client_app(cfg, [AuditLog(str(audit))]), 2), cfg, QuietStages())
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [e["message_type"] for e in entries]
    assert set(kinds) == {"train.warmup", "query.score", "query.select", "train"}
    assert kinds.count("train.warmup") == kinds.count("query.score") == 2
    adapter = load(ModelConfig(name=str(tiny_model_dir))).initial_adapter
    texts = [s.prompt for s in load_samples(demo_dir / "clients" / "client-0.jsonl")]
    allowed = {
        "query.score": set(HistogramReply.record_keys()),
        "query.select": set(CountsReply.record_keys()),
        "train": set(TrainMetrics.record_keys()),
        "train.warmup": set(TrainMetrics.record_keys()),
    }
    for entry in entries:
        assert not entry["error"], entry
        for name, record in entry["records"].items():
            if record["kind"] == "ArrayRecord":
                assert name == "arrays" and entry["message_type"].startswith("train")
                shapes = {k: v["shape"] for k, v in record["entries"].items()}
                assert shapes == {k: list(v.shape) for k, v in adapter.items()}
                continue
            assert record["kind"] == "MetricRecord", record
            assert set(record["entries"]) <= allowed[entry["message_type"]], entry
            for key, value in record["entries"].items():
                if key == "histogram":  # the audit log writes lists as their repr
                    counts = json.loads(value)
                    assert len(counts) == HISTOGRAM_BINS
                    assert all(isinstance(c, int) and c >= 0 for c in counts)
                else:
                    assert isinstance(value, int | float), (key, value)
        assert "score-seconds" not in json.dumps(entry)  # under DP: no timings
        assert not any(t[:30] in json.dumps(entry) for t in texts)
    budget = json.loads((tmp_path / "run" / "threshold.json").read_text())["privacy_budget"]
    assert budget["releases"][0] == {"message": "train.warmup", "counts": ["total"], "epsilon": 1.0}
    assert budget["epsilon_total"] == 4.0  # total, histogram, truncated; query.select's kept


# The guard as a mod, against a node whose own adapter is two small LoRA weights.
OWN = {"m.lora_A.weight": ((2, 3), "float32"), "m.lora_B.weight": ((3, 2), "float32")}
SCORES = torch.linspace(0, 1, 75)  # a client's 75 per-sample scores


def _adapter(**changes) -> ArrayRecord:
    arrays = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    return ArrayRecord({k: v for k, v in (arrays | changes).items() if v is not None})


def _train_reply(arrays: ArrayRecord | None = None, **metrics) -> RecordDict:
    records = {"arrays": arrays if arrays is not None else _adapter()}
    values = {"num-examples": 10, "train-loss": 0.5} | metrics
    return RecordDict(records | {"metrics": MetricRecord(values)})


def _scores_as_the_adapter_reordered() -> ArrayRecord:
    """75 per-sample scores in the adapter's two float32 shapes (6 + 6 of them), its names in
    the other order: every name, shape and dtype right, every value finite."""
    a, b = SCORES[:6].reshape(2, 3).float(), SCORES[6:12].reshape(3, 2).float()
    return ArrayRecord({"m.lora_B.weight": b, "m.lora_A.weight": a})


def _token_of(plain: bytes) -> bytes:
    """A valid Fernet token of ``plain`` under slot 0's key for slot 1 (what the node could
    encrypt), of the size of its real shares."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt

    state = SESSION_STATE
    return encrypt(fernet_key(state["sk2"], state["pk2s"][1]), plain)


def _with_bytes_after_the_values() -> ArrayRecord:
    record = _adapter()
    good = record["m.lora_A.weight"]
    record["m.lora_A.weight"] = Array(good.dtype, good.shape, good.stype, good.data + b"secret")
    return record


def _guarded_reply(
    kind: str,
    reply,
    request: RecordDict | None = None,
    epsilon: float = 0.0,
    secure: dict | None = None,
) -> Message:
    """What leaves a node (10 samples, partition id 0, released under ``epsilon``, in the secure
    sum session ``secure``) whose handler returns ``reply`` (content or an Error) for ``kind``,
    asked with ``request`` (by default a config with τ)."""
    app = ClientApp(mods=[OutgoingGuard(lambda context: OWN)])

    def handler(msg: Message, context: Context) -> Message:
        if callable(reply):
            reply()
        return Message(reply, reply_to=msg)

    category, _, action = kind.partition(".")
    getattr(app, category)(action or "default")(handler)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # the server's
    content = request if request is not None else RecordDict({"config": ConfigRecord({"tau": 0.5})})
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    state = RecordDict({SAMPLES_KEY: ConfigRecord({"samples": 10, "epsilon": epsilon})})
    if secure is not None:
        state[SECURE_STATE_KEY] = ConfigRecord(secure)
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=state, run_config={}
    )
    return app(msg, context)


def _evaluate_reply(**metrics) -> RecordDict:
    values = {"num-examples": 7, "eval-loss": 0.7} | metrics
    return RecordDict({"metrics": MetricRecord(values)})


def test_the_guard_lets_the_own_adapter_and_counts_leave():
    assert not _guarded_reply("train", _train_reply(**{"train-loss": 0.5})).has_error()
    assert not _guarded_reply("train.warmup", _train_reply()).has_error()
    assert not _guarded_reply("evaluate", _evaluate_reply()).has_error()
    assert not _guarded_reply("query.score", _counts()).has_error()
    assert not _guarded_reply("query.score", _counts(total=13, kept=13), epsilon=1.0).has_error()
    failed = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=REASON_FAILED)
    assert _guarded_reply("train", failed).error.reason == REASON_FAILED


SMUGGLING = {
    # arrays: only the node's own adapter, exactly
    "scores-as-an-extra-lora-key": ("train", _train_reply(_adapter(**{"m.lora_C.weight": SCORES}))),
    "scores-in-place-of-a-lora-weight": (
        "train",
        _train_reply(_adapter(**{"m.lora_A.weight": SCORES})),
    ),
    "lora-weight-transposed": (
        "train",
        _train_reply(_adapter(**{"m.lora_A.weight": torch.zeros(3, 2)})),
    ),
    "lora-weight-float64": (
        "train",
        _train_reply(_adapter(**{"m.lora_A.weight": torch.zeros(2, 3, dtype=torch.float64)})),
    ),
    "token-ids-as-int64-lora": (
        "train",
        _train_reply(_adapter(**{"m.lora_A.weight": torch.arange(6).reshape(2, 3)})),
    ),
    "a-lora-weight-missing": ("train", _train_reply(_adapter(**{"m.lora_B.weight": None}))),
    "bytes-after-the-values": ("train", _train_reply(_with_bytes_after_the_values())),
    "nan-payload": (
        "train",
        _train_reply(_adapter(**{"m.lora_A.weight": torch.full((2, 3), float("nan"))})),
    ),
    "adapter-in-a-query-reply": ("query.score", RecordDict({"arrays": _adapter()})),
    "adapter-in-an-evaluate-reply": ("evaluate", RecordDict({"arrays": _adapter()})),
    # records and metrics: known records and keys, one number each
    "scores-as-a-metric-list": ("train", _train_reply(**{"train-loss": SCORES.tolist()})),
    "a-score-under-an-unknown-key": ("query.score", _counts(**{"sample-7-score": 0.3})),
    "text-in-a-config-record": (
        "query.score",
        RecordDict({"stats": ConfigRecord({"total": 10, "text": "What is 2+3?"})}),
    ),
    "string-as-a-metric-in-a-config-record": (
        "train",
        RecordDict({"arrays": _adapter(), "metrics": ConfigRecord({"train-loss": "0.5 2+3"})}),
    ),
    "an-extra-record": (
        "query.score",
        RecordDict({"stats": _counts()["stats"], "debug": MetricRecord({"total": 1})}),
    ),
    "token-ids-in-an-extra-array-record": (
        "query.score",
        RecordDict({"stats": _counts()["stats"], "tokens": ArrayRecord({"ids": torch.arange(5)})}),
    ),
    # the histogram: HISTOGRAM_BINS non-negative integers in stats only
    "histogram-too-long": ("query.score", _histogram([1] * (HISTOGRAM_BINS + 1))),
    "histogram-of-floats": ("query.score", _histogram([0.25] * HISTOGRAM_BINS)),
    "histogram-negative": ("query.score", _histogram([1] * (HISTOGRAM_BINS - 1) + [-3])),
    "histogram-in-train-metrics": ("train", _train_reply(histogram=[0] * HISTOGRAM_BINS)),
    # by content: what a node with 10 samples, partition id 0 and this adapter can have sent
    "scores-reshaped-to-the-adapter-names-reordered": (
        "train",
        _train_reply(_scores_as_the_adapter_reordered()),
    ),
    "the-own-adapter-reordered": (
        "train",
        _train_reply(
            ArrayRecord({"m.lora_B.weight": torch.ones(3, 2), "m.lora_A.weight": torch.zeros(2, 3)})
        ),
    ),
    "a-stats-record-in-a-train-reply": (
        "train",
        RecordDict({**_train_reply(), "stats": _counts()["stats"]}),
    ),
    "a-stats-record-in-an-evaluate-reply": (
        "evaluate",
        RecordDict({**_evaluate_reply(), "stats": _counts()["stats"]}),
    ),
    "no-adapter-in-a-train-reply": ("train", RecordDict({"metrics": _train_reply()["metrics"]})),
    "a-count-missing": ("query.score", _counts(truncated=None)),
    "kept-plus-rejected-is-not-the-total": (
        "query.score",
        _counts(**{"rejected-below-threshold": 1}),
    ),
    "a-total-other-than-the-sample-count": (
        "query.score",
        _counts(total=8, kept=5),  # 5 + 2 + 1 = 8: consistent, but not its 10
    ),
    "a-warm-up-num-examples-other-than-the-sample-count": (
        "train.warmup",
        _train_reply(**{"num-examples": 9}),
    ),
    "num-examples-beyond-the-sample-count": ("train", _train_reply(**{"num-examples": 75})),
    "nan-train-loss": ("train", _train_reply(**{"train-loss": float("nan")})),
    "inf-eval-loss": ("evaluate", _evaluate_reply(**{"eval-loss": float("inf")})),
    "negative-train-seconds": ("train", _train_reply(**{"train-seconds": -1.0})),
    "a-float-partition-id": ("query.score", _counts(**{"partition-id": 0.0})),
    "another-nodes-partition-id": ("query.score", _counts(**{"partition-id": 3})),
    "a-float-count": ("evaluate", _evaluate_reply(**{"num-examples": 7.25})),
    # error replies: a fixed reason and code only
    "text-in-an-error-reason": (
        "query.score",
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="line 3: 'What is 2+3?'"),
    ),
    "data-in-an-error-code": ("query.score", Error(code=1234567, reason=REASON_FAILED)),
}


# Under DP (ε = 1) the identities kept + rejected = total no longer hold, so these are refused by
# the range checks alone: counts beyond the sample count (plus the DP tail), kept > total.
DP_SMUGGLING = {
    "counts-beyond-the-sample-count": (
        "query.score",
        _counts(total=75, kept=75, **{"rejected-below-threshold": 0, "rejected-non-finite": 0}),
    ),  # fmt: skip
    "kept-greater-than-total": ("query.score", _counts(total=5, kept=8)),
    "a-negative-count": ("query.score", _counts(truncated=-1)),
    "a-histogram-bin-beyond-the-sample-count": (
        "query.score",
        _histogram([0] * (HISTOGRAM_BINS - 1) + [75], total=10),
    ),
}


@pytest.mark.parametrize("kind,reply", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_the_guard_refuses_every_smuggling_attempt_with_one_line(kind, reply, caplog):
    with caplog.at_level(logging.ERROR, logger="fedqc.federation.privacy"):
        sent = _guarded_reply(kind, reply)
    assert sent.has_error() and not sent.has_content()
    assert (sent.error.code, sent.error.reason) == (
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        REASON_GUARD,
    )
    lines = [r for r in caplog.records if "reply stopped by the privacy guard" in r.getMessage()]
    assert len(lines) == 1 and len(caplog.records) == 1 and not lines[0].exc_info
    assert "\n" not in lines[0].getMessage() and "2+3" not in lines[0].getMessage()


@pytest.mark.parametrize("kind,reply", DP_SMUGGLING.values(), ids=DP_SMUGGLING.keys())
def test_the_guard_refuses_counts_no_noise_explains(kind, reply):
    request = ASKED_HISTOGRAM if "histogram" in reply["stats"] else None
    sent = _guarded_reply(kind, reply, request, epsilon=1.0)
    assert sent.has_error() and sent.error.reason == REASON_GUARD


# quality.secure-sum: a session's keys, encrypted shares, masked vector and unmasking shares, each
# checked against what the request asked for.
def _secure_session():
    states, keys = zip(*(client_keys() for _ in range(3)), strict=True)
    pk1s, pk2s = [k["pk1"] for k in keys], [k["pk2"] for k in keys]
    ciphertexts = [client_shares(states[i], i, pk1s, pk2s) for i in range(3)]
    masked = client_mask(states[0], [c[0] for c in ciphertexts], [12, 9, 3, 0, 1])
    for i in (1, 2):
        client_mask(states[i], [c[i] for c in ciphertexts], [0] * 5)
    return {
        "keys": keys[0],
        "shares-request": {"slot": 0, "pk1": pk1s, "pk2": pk2s},
        "ciphertexts": ciphertexts[0],
        "masked": masked,
        "unmask-request": {"active": [0, 2], "dead": [1]},
        "shares": client_unmask(states[0], [0, 2], [1]),
        "state": states[0],  # slot 0's session state, as its context.state holds it
    }


SESSION = _secure_session()
SESSION_STATE = SESSION["state"]


def _secure(body: dict, **extra) -> RecordDict:
    return RecordDict({SECURE_RECORD: ConfigRecord(body), **extra})


def _masked(vector, **stats) -> RecordDict:
    return RecordDict({"stats": MetricRecord({MASKED_KEY: vector, "partition-id": 0, **stats})})


KEYS_ASKED = _secure({})
SHARES_ASKED = _secure(SESSION["shares-request"])
UNMASK_ASKED = _secure(SESSION["unmask-request"])
SCORE_ASKED = _secure({"ciphertexts": [b""] * 3}, config=ConfigRecord({"tau": 0.5}))
TOKEN = SESSION["ciphertexts"][1]
PLAIN_LENGTH = 20 + 52 + 324  # src, dst, length; a seed share and a key share (Flower's layout)
SCORE_BYTES = SCORES.numpy().tobytes()
SECURE_OK = {
    "keys": (SECURE_KEYS, KEYS_ASKED, _secure(SESSION["keys"])),
    "shares": (SECURE_SHARES, SHARES_ASKED, _secure({"ciphertexts": SESSION["ciphertexts"]})),
    "masked": (QUERY_SCORE, SCORE_ASKED, _masked(SESSION["masked"])),
    "unmask": (SECURE_UNMASK, UNMASK_ASKED, _secure({"shares": SESSION["shares"]})),
}
SECURE_SMUGGLING = {
    # query.keys: two PEM public keys, nothing else
    "text-beside-the-keys": (
        SECURE_KEYS,
        KEYS_ASKED,
        _secure(SESSION["keys"] | {"note": "What is 2+3?"}),
    ),
    "scores-as-a-public-key": (
        SECURE_KEYS,
        KEYS_ASKED,
        _secure({"pk1": SCORE_BYTES[: len(SESSION["keys"]["pk1"])], "pk2": SESSION["keys"]["pk2"]}),
    ),
    "text-as-a-public-key": (
        SECURE_KEYS,
        KEYS_ASKED,
        _secure({"pk1": "What is 2+3?", "pk2": SESSION["keys"]["pk2"]}),
    ),
    "counts-beside-the-keys": (
        SECURE_KEYS,
        KEYS_ASKED,
        _secure(SESSION["keys"], stats=_counts()["stats"]),
    ),
    "keys-in-a-metric-record": (
        SECURE_KEYS,
        KEYS_ASKED,
        RecordDict({SECURE_RECORD: MetricRecord({"pk1": 1.0, "pk2": 2.0})}),
    ),
    # query.shares: one Fernet token of the fixed size per other slot
    "scores-in-place-of-a-ciphertext": (
        SECURE_SHARES,
        SHARES_ASKED,
        _secure({"ciphertexts": [b"", SCORE_BYTES[: len(TOKEN)], TOKEN]}),
    ),
    "bytes-after-a-ciphertext": (
        SECURE_SHARES,
        SHARES_ASKED,
        _secure({"ciphertexts": [b"", TOKEN + b"c2VjcmV0", TOKEN]}),
    ),
    "an-extra-ciphertext": (
        SECURE_SHARES,
        SHARES_ASKED,
        _secure({"ciphertexts": [*SESSION["ciphertexts"], TOKEN]}),
    ),
    "data-at-the-own-slot": (
        SECURE_SHARES,
        SHARES_ASKED,
        _secure({"ciphertexts": [b"What is 2+3?", TOKEN, TOKEN]}),
    ),
    # by content: a valid token of the right size under the right key, holding scores
    "scores-in-a-valid-token": (
        SECURE_SHARES,
        SHARES_ASKED,
        _secure(
            {
                "ciphertexts": [
                    b"",
                    _token_of((SCORE_BYTES * 2)[:PLAIN_LENGTH]),
                    SESSION["ciphertexts"][2],
                ]
            }
        ),
    ),
    "another-slots-shares-in-a-valid-token": (  # slot 2's ciphertext sent where slot 1's is due
        SECURE_SHARES,
        SHARES_ASKED,
        _secure({"ciphertexts": [b"", SESSION["ciphertexts"][2], SESSION["ciphertexts"][2]]}),
    ),
    "keys-the-node-did-not-make": (
        SECURE_KEYS,
        KEYS_ASKED,
        _secure(client_keys()[1]),
    ),
    "shares-the-node-does-not-hold": (
        SECURE_UNMASK,
        UNMASK_ASKED,
        _secure({"shares": [bytes(len(x)) for x in SESSION["shares"]]}),
    ),
    "a-float-partition-id-beside-the-masked-vector": (
        QUERY_SCORE,
        SCORE_ASKED,
        _masked(SESSION["masked"], **{"partition-id": 0.0}),
    ),
    "another-partition-id-beside-the-masked-vector": (
        QUERY_SCORE,
        SCORE_ASKED,
        _masked(SESSION["masked"], **{"partition-id": 2}),
    ),
    # the data reply under a secure sum: the masked vector and the partition id only
    "plaintext-counts-beside-the-masked-vector": (
        QUERY_SCORE,
        SCORE_ASKED,
        _masked(SESSION["masked"], kept=9),
    ),
    "plaintext-counts-instead-of-the-masked-vector": (QUERY_SCORE, SCORE_ASKED, _counts()),
    "a-masked-vector-too-long": (QUERY_SCORE, SCORE_ASKED, _masked([*SESSION["masked"], 7])),
    "a-masked-vector-outside-the-ring": (
        QUERY_SCORE,
        SCORE_ASKED,
        _masked([1 << 40, *SESSION["masked"][1:]]),
    ),
    "a-masked-vector-of-scores": (QUERY_SCORE, SCORE_ASKED, _masked(SCORES[:5].tolist())),
    "a-masked-vector-unasked": (QUERY_SCORE, None, _masked(SESSION["masked"])),
    "a-masked-vector-in-train-metrics": ("train", None, _train_reply(masked=SESSION["masked"])),
    "a-session-record-in-a-query-reply": (
        QUERY_SCORE,
        None,
        RecordDict({"stats": _counts()["stats"], SECURE_RECORD: ConfigRecord({"x": SCORE_BYTES})}),
    ),
    # query.unmask: one share per slot asked for, of the seed's or the key's fixed size
    "an-extra-share": (
        SECURE_UNMASK,
        UNMASK_ASKED,
        _secure({"shares": [*SESSION["shares"], SESSION["shares"][0]]}),
    ),
    "bytes-after-a-share": (
        SECURE_UNMASK,
        UNMASK_ASKED,
        _secure({"shares": [SESSION["shares"][0] + b"x", *SESSION["shares"][1:]]}),
    ),
    "a-seed-share-where-a-key-share-is-due": (
        SECURE_UNMASK,
        UNMASK_ASKED,
        _secure({"shares": [SESSION["shares"][0]] * 3}),
    ),
    "slots-beside-the-shares": (
        SECURE_UNMASK,
        UNMASK_ASKED,
        _secure({"shares": SESSION["shares"], "slots": [0, 1, 2]}),
    ),
}


@pytest.mark.parametrize("kind,request_,reply", SECURE_OK.values(), ids=SECURE_OK.keys())
def test_the_guard_lets_a_secure_sums_own_replies_leave(kind, request_, reply):
    assert not _guarded_reply(kind, reply, request_, secure=SESSION_STATE).has_error()


@pytest.mark.parametrize(
    "kind,request_,reply", SECURE_SMUGGLING.values(), ids=SECURE_SMUGGLING.keys()
)
def test_the_guard_refuses_smuggling_through_a_secure_sum_with_one_line(
    kind, request_, reply, caplog
):
    with caplog.at_level(logging.ERROR, logger="fedqc.federation.privacy"):
        sent = _guarded_reply(kind, reply, request_, secure=SESSION_STATE)
    assert sent.has_error() and not sent.has_content()
    assert sent.error.reason == REASON_GUARD
    lines = [r for r in caplog.records if "reply stopped by the privacy guard" in r.getMessage()]
    assert len(lines) == 1 and len(caplog.records) == 1 and not lines[0].exc_info
    assert "\n" not in lines[0].getMessage() and "2+3" not in lines[0].getMessage()


def test_a_failure_leaves_only_a_fixed_reason(caplog):
    def fail():
        raise ValueError("line 3 of client-2.jsonl: 'What is 2+3?'")

    def user_error():
        raise FedqcError("client-2.jsonl, line 3: no 'answer' field")

    with caplog.at_level(logging.ERROR, logger="fedqc.federation.privacy"):
        sent = _guarded_reply("query.score", fail)
        assert sent.error.reason == REASON_FAILED
        assert _guarded_reply("query.score", user_error).error.reason == REASON_INPUT
    assert "2+3" in caplog.text  # the details stay in the node's log
    failures = {REASON_INPUT, REASON_GUARD, REASON_EDGES, REASON_FAILED}
    assert set(ERROR_REASONS) == failures | set(REQUIREMENT_REASONS)
    assert not any("client-" in r or "2+3" in r for r in ERROR_REASONS)


def test_a_node_that_smuggles_is_dropped_with_one_line_and_the_run_goes_on(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch, caplog
):
    """Client 1's train handler adds its per-sample scores as one more LoRA-named array."""
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation import client_app
    from fedqc.federation.server_app import run_server

    real = client_app.handle_train

    def smuggling(msg, context, cfg):
        content = real(msg, context, cfg)
        if int(context.node_config["partition-id"]) == 1:
            name = next(iter(content["arrays"]))
            content["arrays"][name.replace("lora_A", "lora_S")] = Array(np.linspace(0, 1, 12))
        return content

    monkeypatch.setattr(client_app, "handle_train", smuggling)
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.num-clients": 2,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",  # keeps everything
            "quality.shots": 0,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    grid = LocalGrid(client_app.build_client_app(cfg), 2)
    with caplog.at_level(logging.WARNING, logger="fedqc"):
        run_server(grid, cfg, QuietStages())
    participation = json.loads((tmp_path / "run" / "participation.json").read_text())
    train = [e for e in participation if e["phase"] == "train"]
    assert [e["dropped"] for e in train] == [[{"node": grid.node_of[1], "reason": REASON_GUARD}]]
    assert train[0]["answered"] == [grid.node_of[0]]
    stopped = [r for r in caplog.records if "reply stopped by the privacy guard" in r.getMessage()]
    assert len(stopped) == 1 and "lora_S" in stopped[0].getMessage()
    dropped = [r for r in caplog.records if f"node {grid.node_of[1]} dropped" in r.getMessage()]
    assert len(dropped) == 1 and REASON_GUARD in dropped[0].getMessage()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# The mixture rule's bin edges, as a client checks them before it reads any data.
EVEN = np.linspace(-3.0, 1.0, HISTOGRAM_BINS + 1)
COMB = np.concatenate([[-100.0], np.linspace(0.5, 0.5 + 1e-3, HISTOGRAM_BINS)])  # 63 fine bins


def test_clients_accept_the_servers_own_edges():
    rng = np.random.default_rng(0)
    for scale in (1e-5, 1.0, 1e3):
        assert len(check_edges(histogram_edges(rng.normal(0, scale, 10)).tolist())) == 65
    check_edges(histogram_edges(np.array([5.0, 5.0])).tolist())  # zero spread: the floor
    # 63 bins of width 1 and one of 63: uneven, but no bin under 1/128 of the span
    uneven = [float(i) for i in range(HISTOGRAM_BINS)] + [2.0 * HISTOGRAM_BINS - 2]
    check_edges(uneven)
    assert MIN_BIN_SHARE == 1 / (2 * HISTOGRAM_BINS)


@pytest.mark.parametrize(
    "edges",
    [
        EVEN[:-1].tolist(),
        [*EVEN.tolist(), 2.0],
        [*EVEN[:-1].tolist(), float("nan")],
        [*EVEN[:-1].tolist(), float("inf")],
        EVEN[::-1].tolist(),
        [*EVEN[:32].tolist(), *EVEN[31:-1].tolist()],  # one bin of width 0
        COMB.tolist(),
        [0.0, *np.linspace(1.0, 1.0 + 1e-9, HISTOGRAM_BINS).tolist()],
        [*EVEN[:-1].tolist(), "2.0"],
    ],
    ids=["short", "long", "nan", "inf", "decreasing", "repeated", "comb", "needle", "string"],
)
def test_clients_refuse_malformed_or_too_fine_edges(edges):
    with pytest.raises(EdgesRefused):
        check_edges(edges)


def test_a_client_given_too_fine_edges_replies_a_fixed_reason_before_scoring(caplog):
    from fedqc.federation.client_app import SCORES_KEY, build_client_app

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = ConfigRecord({"edges": COMB.tolist(), "model": "smollm2-135m", "tau": float("nan")})
    msg = Message(RecordDict({"config": config}), dst_node_id=7, message_type="query.score")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.ERROR, logger="fedqc.federation.privacy"):
        reply = build_client_app(Config.from_flat({}))(msg, context)
    assert reply.has_error() and reply.error.reason == REASON_EDGES
    assert SCORES_KEY not in context.state  # refused before scoring
    assert "finer than this node accepts" in caplog.text


# --- a node's own requirements (its node config), refused before it reads any data -----------


def _need(**config) -> NodeRequirements:
    return NodeRequirements.from_node_config(config)


def _secure_asked(body: dict) -> RecordDict:
    return RecordDict({SECURE_RECORD: ConfigRecord(body)})


def _no_ledger() -> Path:
    raise AssertionError("the ledger is read only for a release under max-epsilon-total")


REFUSALS = {
    "evaluate-refused": (
        "evaluate",
        ASKED,
        _need(**{"answer-evaluate": False}),
        3.0,
        REASON_NO_EVALUATE,
    ),
    "phase-1-in-the-clear": (
        "query.score",
        ASKED,
        _need(**{"require-secure-sum": True}),
        3.0,
        REASON_NEEDS_SECURE_SUM,
    ),
    "select-in-the-clear": (
        "query.select",
        ASKED,
        _need(**{"require-secure-sum": "true"}),
        3.0,
        REASON_NEEDS_SECURE_SUM,
    ),
    "a-sum-of-one-in-the-clear": (
        "query.score",
        ASKED,
        _need(**{"min-clients": 2}),
        3.0,
        REASON_MIN_CLIENTS,
    ),
    "too-few-slots": (
        "query.shares",
        _secure_asked({"slot": 0, "pk1": [b"a"] * 3, "pk2": [b"b"] * 3}),
        _need(**{"min-clients": 4}),
        3.0,
        REASON_MIN_CLIENTS,
    ),
    "too-few-senders": (
        "query.score",
        _secure_asked({"ciphertexts": [b"", b"", b"x", b""]}),
        _need(**{"min-clients": 3}),
        3.0,
        REASON_MIN_CLIENTS,
    ),
    "too-few-active": (
        "query.unmask",
        _secure_asked({"active": [0, 1], "dead": [2]}),
        _need(**{"min-clients": 3}),
        3.0,
        REASON_MIN_CLIENTS,
    ),
    "no-noise": ("query.score", ASKED, _need(**{"max-epsilon": 10.0}), math.inf, REASON_EPSILON),
    "more-epsilon-than-allowed": (
        "train.warmup",
        ASKED,
        _need(**{"max-epsilon": 2.0}),
        3.0,
        REASON_EPSILON,
    ),
}


@pytest.mark.parametrize(
    "kind,request_,need,epsilon,reason", REFUSALS.values(), ids=REFUSALS.keys()
)
def test_a_node_refuses_a_request_that_does_not_meet_its_requirements(
    kind, request_, need, epsilon, reason
):
    with pytest.raises(RequirementRefused) as refused:
        check_request(kind, request_, need, epsilon, _no_ledger)
    assert refused.value.reason == reason and reason in ERROR_REASONS


def test_a_node_answers_what_meets_its_requirements_and_keeps_a_ledger(tmp_path):
    ledger = tmp_path / "privacy-ledger.jsonl"
    need = _need(**{"require-secure-sum": True, "min-clients": 3, "max-epsilon": 3.0})
    shares = _secure_asked({"slot": 0, "pk1": [b"a"] * 3, "pk2": [b"b"] * 3})
    assert not check_request("query.shares", shares, need, 3.0, _no_ledger)
    masked = _secure_asked({"ciphertexts": [b"", b"x", b"y"]})
    assert check_request("query.score", masked, need, 3.0, _no_ledger)  # a release
    assert not check_request("evaluate", ASKED, need, 3.0, _no_ledger)
    total = _need(**{"max-epsilon-total": 5.0})
    assert check_request("query.score", ASKED, total, 3.0, lambda: ledger)
    record_release(ledger, 1, 3.0)
    with pytest.raises(RequirementRefused, match="the ledger holds ε = 3; this run's 3 would"):
        check_request("query.score", ASKED, total, 3.0, lambda: ledger)  # the next run: 6 > 5
    assert check_request("query.score", ASKED, total, 3.0, lambda: ledger, recorded=True)
    assert ledger_total(ledger) == 3.0
    with pytest.raises(FedqcError, match="node config min-clients='many'"):
        _need(**{"min-clients": "many"})
    with pytest.raises(FedqcError, match="node config answer-evaluate=1"):
        _need(**{"answer-evaluate": 1})


def _requirement_config(tiny_model_dir, demo_dir, run_dir: Path, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.num-clients": 3,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",  # keeps everything
            "quality.shots": 0,
            "train.rounds": 0,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.min-nodes": 1,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
            **extra,
        }
    )


def _dropped(run_dir: Path) -> dict[str, list[dict]]:
    participation = json.loads((run_dir / "participation.json").read_text())
    return {e["phase"]: e["dropped"] for e in participation if e["dropped"]}


def test_nodes_refuse_phase_1_in_the_clear_and_evaluate_before_reading_data(
    tmp_path, tiny_model_dir, demo_dir
):
    """In-process (the ClientApp of a simulation or a SuperNode, per-node node configs): node 0
    requires a secure sum and its data file does not exist (read first, it would fail with
    another reason); node 1 answers no evaluate requests; node 2 requires nothing."""
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    clients = demo_dir / "clients"
    nodes = [
        {"require-secure-sum": True, "data-path": str(tmp_path / "no-such-file.jsonl")},
        {"answer-evaluate": False, "data-path": str(clients / "client-1.jsonl")},
        {"data-path": str(clients / "client-0.jsonl")},
    ]
    for node, pid in zip(nodes, range(3), strict=True):
        node["output-dir"] = str(tmp_path / f"site-{pid}")
    extra = {"train.rounds": 1, "federation.fraction-evaluate": 1.0}
    cfg = _requirement_config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    grid = LocalGrid(build_client_app(cfg), 3, node_configs=nodes)
    run_server(grid, cfg, QuietStages())
    dropped = _dropped(tmp_path / "run")
    assert dropped["query.score"] == [{"node": grid.node_of[0], "reason": REASON_NEEDS_SECURE_SUM}]
    assert dropped["evaluate"] == [{"node": grid.node_of[1], "reason": REASON_NO_EVALUATE}]
    assert set(dropped) == {"query.score", "evaluate"}
    assert not (tmp_path / "site-0").exists()  # node 0 wrote nothing: it never scored
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [c["partition-id"] for c in selection["clients"]] == [1, 2]


def test_nodes_cap_their_epsilon_per_run_and_across_runs_by_their_ledger(
    tmp_path, tiny_model_dir, demo_dir
):
    """ε = 1 per release, 3 releases: a run costs 3. Node 0 allows 2 per run; node 1 allows 5 in
    all, so it answers the first run (its ledger: 3) and refuses the second (6 > 5)."""
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    clients = demo_dir / "clients"
    nodes = [
        {"max-epsilon": 2.0, "data-path": str(tmp_path / "no-such-file.jsonl")},
        {"max-epsilon-total": 5.0, "data-path": str(clients / "client-1.jsonl")},
        {"data-path": str(clients / "client-0.jsonl")},
    ]
    for node, pid in zip(nodes, range(3), strict=True):
        node["output-dir"] = str(tmp_path / f"site-{pid}")
    for run in ("first", "second"):
        cfg = _requirement_config(
            tiny_model_dir, demo_dir, tmp_path / run, **{"quality.dp-epsilon": 1.0}
        )
        grid = LocalGrid(build_client_app(cfg), 3, node_configs=nodes)
        run_server(grid, cfg, QuietStages())
        refused = {d["node"]: d["reason"] for d in _dropped(tmp_path / run)["query.score"]}
        expected = {grid.node_of[0]: REASON_EPSILON}
        if run == "second":
            expected[grid.node_of[1]] = REASON_EPSILON
        assert refused == expected, run
    ledger = tmp_path / "site-1" / LEDGER_FILE
    assert [json.loads(line)["epsilon"] for line in ledger.read_text().splitlines()] == [3.0]
    assert ledger_total(tmp_path / "site-2" / LEDGER_FILE) == 6.0  # recorded without a cap too
    assert not (tmp_path / "site-0").exists()


def test_a_node_refuses_a_secure_sum_over_fewer_clients_than_its_min_clients(
    tmp_path, tiny_model_dir, demo_dir
):
    from local_grid import LocalGrid, QuietStages

    from fedqc.federation.client_app import build_client_app
    from fedqc.federation.server_app import run_server

    clients = demo_dir / "clients"
    nodes = [
        {"min-clients": 4, "data-path": str(tmp_path / "no-such-file.jsonl")},
        {"min-clients": 2, "data-path": str(clients / "client-1.jsonl")},
        {"data-path": str(clients / "client-0.jsonl")},
    ]
    extra = {"quality.secure-sum": True, "quality.allow-empty": True}
    cfg = _requirement_config(tiny_model_dir, demo_dir, tmp_path / "run", **extra)
    grid = LocalGrid(build_client_app(cfg), 3, node_configs=nodes)
    run_server(grid, cfg, QuietStages())
    dropped = _dropped(tmp_path / "run")
    assert dropped == {"query.shares": [{"node": grid.node_of[0], "reason": REASON_MIN_CLIENTS}]}
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [n["partition-id"] for n in selection["nodes"]] == [1, 2]
    assert selection["sums"]["total"] == 24  # the two others' 12 samples each


def test_node_requirements_hold_in_flowers_simulation(tmp_path, tiny_model_dir, demo_dir):
    """Ray: partition 0 answers no evaluate requests. Flower's simulation gives every node the
    same node config, so a mod first adds partition 0's own requirement to its config."""
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",
            "quality.shots": 0,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.fraction-evaluate": 1.0,
            "federation.min-nodes": 1,
        }
    )
    cfg = prepare(cfg, new_run_dir(str(tmp_path / "run"), force=False))
    run_simulation(cfg, cfg.data.num_clients, client_mods=[_site_requirements])
    participation = json.loads((Path(cfg.output.run_dir) / "participation.json").read_text())
    selection = json.loads((Path(cfg.output.run_dir) / "selection.json").read_text())
    node_of = {c["partition-id"]: c["node"] for c in selection["clients"]}
    evaluate = [e for e in participation if e["phase"] == "evaluate"]
    assert evaluate and all(
        e["dropped"] == [{"node": node_of[0], "reason": REASON_NO_EVALUATE}] for e in evaluate
    )
    assert all(e["answered"] == [node_of[1]] for e in evaluate)
    assert not [e for e in participation if e["phase"] != "evaluate" and e["dropped"]]


def _site_requirements(msg: Message, context: Context, call_next) -> Message:
    """What ``--node-config answer-evaluate=false`` sets on partition 0's SuperNode."""
    if int(context.node_config["partition-id"]) == 0:
        context.node_config["answer-evaluate"] = False
    return call_next(msg, context)
