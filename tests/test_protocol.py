"""The wire messages (fedqc.federation.protocol): one dataclass per message, to and from records."""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedqc.federation.protocol import (
    QUERY_CONFIG,
    REPLY_COUNTS,
    CountsReply,
    QueryConfig,
    SelectConfig,
    TrainConfig,
    TrainMetrics,
)


def test_a_message_travels_as_a_record_and_back():
    query = QueryConfig("ppl", "mixture", "m", 96, 4096, edges=[0.0, 0.5, 1.0], prefix=[1, 2])
    record = query.to_record()
    assert isinstance(record, ConfigRecord)
    assert QueryConfig.from_record(record) == query
    assert SelectConfig.from_record(SelectConfig(-1.5).to_record()).tau == -1.5
    reply = CountsReply(10, 7, 2, 1, 0, partition_id=3)
    assert isinstance(reply.to_record(), MetricRecord)
    assert CountsReply.from_record(reply.to_record()) == reply


def test_none_is_nan_for_tau_and_left_out_otherwise():
    record = QueryConfig("ppl", "drop-fraction:0.1", "m", 96, 4096, drop_fraction=0.1).to_record()
    assert math.isnan(record["tau"]) and record["drop-fraction"] == 0.1
    assert "edges" not in record and "calibration" not in record and "prefix" not in record
    back = QueryConfig.from_record(record)
    assert back.tau is None and back.edges is None
    assert "score-seconds" not in CountsReply(1, 1, 0, 0, 0, 0).to_record()  # under DP
    assert "train-seconds" not in TrainMetrics(3, 0.5).to_record()


def test_keys_come_from_the_fields_and_flower_keys_are_ignored():
    assert QueryConfig.record_keys() == QUERY_CONFIG and "drop-fraction" in QUERY_CONFIG
    assert REPLY_COUNTS[:2] == ("total", "kept")
    train = TrainConfig.from_record(
        {"local-steps": 1, "batch-size": 2, "lr": 0.1, "weight-decay": 0.0, "seed": 0}
        | {"max-length": 64, "server-round": 2, "clipping_norm": 1.0}
    )
    assert (train.server_round, train.round_offset, train.lr_schedule) == (2, 0, "constant")
    with pytest.raises(ValueError, match="no 'batch-size'"):
        TrainConfig.from_record({"local-steps": 1})
    with pytest.raises(AttributeError):
        QueryConfig.key("threshold")
