"""quality.secure-sum: phase 1's counts and histogram reach the server only as sums over clients.

Phase 2 is not covered: each train reply still carries the client's kept count and adapter, and
the run says so (threshold.json's server_learns, the summary).

The protocol on its own (fedqc.federation.secure_sum), then phase 1 in-process (LocalGrid, no Ray,
train.rounds = 0) against a plaintext run: the same sums, τ and per-sample decisions, and the exact
sum of the survivors when a node dies after sharing its keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from local_grid import LocalGrid, QuietStages

from fedqc.cli import _print_summary, console
from fedqc.config import Config
from fedqc.data.demo import write_demo
from fedqc.errors import FedqcError
from fedqc.federation.client_app import RELEASED_KEY, build_client_app
from fedqc.federation.privacy import AuditLog, noisy_histogram
from fedqc.federation.protocol import COUNTS, HISTOGRAM_BINS, MASKED_KEY
from fedqc.federation.secure_sum import (
    MODULUS,
    SecureSumError,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    prg,
    threshold_for,
    unmask_sum,
)
from fedqc.federation.server_app import _check_same_selection, _resumed_clients, run_server
from fedqc.federation.simulation import run_simulation
from fedqc.federation.strategy import ParticipationGrid, QualityFedAvg
from fedqc.pipeline import new_run_dir, prepare, summarize, summary_notes

# --- the protocol on its own -----------------------------------------------------------------


def _session(n: int) -> tuple[list[dict], list[bytes], list[list[bytes]]]:
    """n clients after query.keys and query.shares: (states, pk1s, ciphertexts[src][dst])."""
    states, keys = zip(*(client_keys() for _ in range(n)), strict=True)
    states = list(states)
    pk1s, pk2s = [k["pk1"] for k in keys], [k["pk2"] for k in keys]
    ciphertexts = [client_shares(states[i], i, pk1s, pk2s) for i in range(n)]
    return states, pk1s, ciphertexts


def _sum(n: int, vectors: dict[int, list[int]], senders: list[int] | None = None) -> np.ndarray:
    """Mask the ``vectors`` of the slots that send one, unmask with the others dead."""
    states, pk1s, ciphertexts = _session(n)
    senders = list(range(n)) if senders is None else senders
    masked = {
        i: client_mask(states[i], [ciphertexts[j][i] if j in senders else b"" for j in range(n)], v)
        for i, v in vectors.items()
    }
    active, dead = sorted(masked), [i for i in senders if i not in masked]
    held = {s: [] for s in (*active, *dead)}
    for i in active:
        for s, share in zip((*active, *dead), client_unmask(states[i], active, dead), strict=True):
            held[s].append(share)
    return unmask_sum(len(next(iter(vectors.values()))), pk1s, masked, dead, held)


def test_the_masked_vectors_add_up_to_the_exact_signed_sum():
    rng = np.random.default_rng(0)
    vectors = {i: rng.integers(-50, 10_000, 67).tolist() for i in range(4)}
    vectors[3][0] = -(2**31)  # the ring's lowest value: two's complement, exactly
    vectors[2][0] = vectors[1][0] = vectors[0][0] = 0
    total = _sum(4, vectors)
    assert total.tolist() == np.array(list(vectors.values())).sum(0).tolist()
    assert total.min() < 0  # signed: DP noise may make a sum negative, and it stays so


def _mask_three(vectors: list[list[int]]) -> tuple[list[dict], list[list[int]]]:
    """Three clients mask ``vectors`` in one session: (their states, their masked vectors)."""
    states, _, ciphertexts = _session(3)
    masked = [
        client_mask(states[i], [ciphertexts[j][i] for j in range(3)], v)
        for i, v in enumerate(vectors)
    ]
    return states, masked


def test_a_masked_vector_alone_is_not_its_counts_and_is_uncorrelated_with_them():
    counts = [[12, 9, 3, 0, 1], [7, 7, 0, 0, 0], [30, 2, 20, 8, 5]]
    states, masked = _mask_three(counts)
    # the unmasked sum is the plain sum
    answers = [client_unmask(states[i], [0, 1, 2], []) for i in range(3)]
    held = {s: [a[s] for a in answers] for s in range(3)}
    assert _unmask(masked, states, held).tolist() == np.sum(counts, axis=0).tolist()
    for i in range(3):
        # every coordinate differs from the plaintext (chance of one equal: 2^-32)
        assert all(m != c for m, c in zip(masked[i], counts[i], strict=True))
        # the server rebuilds each active client's seed; its seed mask alone leaves the pairwise
        # masks of the others in place: decoding one vector alone does not give its counts
        alone = np.array(masked[i], dtype=np.uint64) + MODULUS - prg(states[i]["seed"], 5)
        assert (alone % MODULUS).tolist() != counts[i]
        assert all(a != c for a, c in zip((alone % MODULUS).tolist(), counts[i], strict=True))
    # over many sessions, the masked value of one count is uniform mod 2^32 and uncorrelated
    # with the count it hides (counts 0..99 against their masked values)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, 60)
    y = np.array([_mask_three([[int(v)] * 5, [0] * 5, [0] * 5])[1][0][0] for v in x], float)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.45  # |r| of independent draws: sd 1/sqrt(60)
    assert abs(y.mean() / MODULUS - 0.5) < 0.1 and y.std() / MODULUS > 0.2  # uniform: 0.29


def _unmask(masked, states, held) -> np.ndarray:
    pk1s = [s["pk1"] for s in states]
    return unmask_sum(5, pk1s, dict(enumerate(masked)), [], held)


def test_signed_dp_noise_in_the_ring_leaves_the_sum_of_empty_bins_unbiased():
    """Three clients with 64 empty bins, Laplace(1/ε = 1) noise each, over 12 sessions: the
    summed bins average 0. Noise clipped at 0 on each client (the old bug) averages about
    +0.9 per summed bin here (3 × 0.30)."""
    rng = np.random.default_rng(2)
    sums = []
    for _ in range(12):
        noisy = [noisy_histogram([0] * HISTOGRAM_BINS, 1.0, rng, signed=True) for _ in range(3)]
        states, _, ciphertexts = _session(3)
        masked = {
            i: client_mask(states[i], [ciphertexts[j][i] for j in range(3)], noisy[i])
            for i in range(3)
        }
        held = {s: [] for s in range(3)}
        for i in range(3):
            for s, share in enumerate(client_unmask(states[i], [0, 1, 2], [])):
                held[s].append(share)
        pk1s = [st["pk1"] for st in states]
        total = unmask_sum(HISTOGRAM_BINS, pk1s, masked, [], held)
        assert total.tolist() == np.sum(noisy, axis=0).tolist()
        sums.append(total)
    sums = np.concatenate(sums)
    assert (sums < 0).any()  # negative sums survive the ring
    assert abs(sums.mean()) < 0.35  # 3.5 standard errors (sd of a summed bin ≈ 2.5, 768 bins)
    clipped = [noisy_histogram([0] * HISTOGRAM_BINS, 1.0, rng) for _ in range(60)]
    assert np.mean(clipped) * 3 > 0.6  # what the clipped noise would have added


def test_a_client_that_drops_after_sharing_keys_is_unmasked_out():
    vectors = {0: [5, 4, 1, 0, 2], 1: [7, 7, 0, 0, 0], 3: [12, 3, 8, 1, 0]}  # slot 2 drops
    assert threshold_for(4) == 3
    total = _sum(4, vectors)
    assert total.tolist() == [24, 14, 9, 1, 2]


def test_a_client_that_never_shared_its_keys_is_left_out():
    vectors = {0: [1, 1, 0, 0, 0], 2: [2, 1, 1, 0, 0]}  # slot 1 sent keys but no shares
    assert _sum(3, vectors, senders=[0, 2]).tolist() == [3, 2, 1, 0, 0]


def test_below_the_threshold_the_sum_cannot_be_unmasked():
    with pytest.raises(SecureSumError, match="fewer than the threshold"):
        _sum(4, {0: [1] * 5, 1: [2] * 5})  # 2 of 4 survive; 3 needed


def test_a_client_gives_one_kind_of_share_per_slot_and_answers_once():
    states, _, ciphertexts = _session(3)
    for i in range(3):
        client_mask(states[i], [ciphertexts[j][i] for j in range(3)], [1] * 5)
    with pytest.raises(SecureSumError, match="twice"):
        client_unmask(states[0], [0, 1], [1])  # the seed and sk1 of slot 1 would unmask it
    with pytest.raises(SecureSumError, match="active"):
        client_unmask(states[0], [1, 2], [0])
    client_unmask(states[0], [0, 1, 2], [])
    with pytest.raises(SecureSumError, match="twice"):
        client_unmask(states[0], [0, 1], [2])  # a second story about the same session


def test_a_client_refuses_keys_it_did_not_send_and_values_outside_the_ring():
    states, keys = zip(*(client_keys() for _ in range(2)), strict=True)
    pk1s, pk2s = [k["pk1"] for k in keys], [k["pk2"] for k in keys]
    with pytest.raises(SecureSumError, match="other public keys"):
        client_shares(dict(states[0]), 1, pk1s, pk2s)
    with pytest.raises(SecureSumError, match="two clients"):
        client_shares(dict(states[0]), 0, pk1s[:1], pk2s[:1])
    state = dict(states[0])
    ciphertexts = [
        client_shares(state, 0, pk1s, pk2s),
        client_shares(dict(states[1]), 1, pk1s, pk2s),
    ]
    with pytest.raises(SecureSumError, match=r"\[-2\^31, 2\^31\)"):
        client_mask(state, [b"", ciphertexts[1][0]], [-(2**31) - 1, 0, 0, 0, 0])


# --- phase 1 in-process: secure against plaintext --------------------------------------------


@pytest.fixture(scope="module")
def three_clients(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo3")
    write_demo(
        out,
        num_clients=3,
        samples_per_client=10,
        num_anchors=4,
        num_eval=4,
        contamination="0.2,0.5,0.8",
        seed=2,
    )
    return out


def _run(
    tiny_model_dir, demo: Path, run_dir: Path, secure: bool, dies=None, rounds: int = 0
) -> dict:
    cfg = _config(tiny_model_dir, demo, run_dir, secure, rounds)
    run_server(LocalGrid(build_client_app(cfg), 3, dies=dies), cfg, QuietStages())
    local = {pid: run_dir / "clients" / f"client-{pid}" for pid in range(3)}
    return {
        "cfg": cfg,
        "selection": json.loads((run_dir / "selection.json").read_text()),
        "threshold": json.loads((run_dir / "threshold.json").read_text()),
        "keep": {
            pid: [
                json.loads(line)["keep"] for line in (d / "scores.jsonl").read_text().splitlines()
            ]
            for pid, d in local.items()
            if (d / "scores.jsonl").is_file()
        },
    }


def _config(tiny_model_dir, demo: Path, run_dir: Path, secure: bool, rounds: int = 0) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 48,
            "data.clients-dir": str(demo / "clients"),
            "data.anchors": str(demo / "anchors.jsonl"),
            "data.num-clients": 3,
            "quality.scorer": "ppl",
            "quality.rule": "mixture",
            "quality.shots": 0,
            "quality.secure-sum": secure,
            "quality.allow-empty": True,
            "train.rounds": rounds,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(run_dir),
        }
    )


def test_a_secure_sum_run_gives_the_plaintext_sums_tau_and_decisions(
    tiny_model_dir, three_clients, tmp_path
):
    plain = _run(tiny_model_dir, three_clients, tmp_path / "plain", secure=False)
    secure = _run(tiny_model_dir, three_clients, tmp_path / "secure", secure=True, rounds=1)
    clients = plain["selection"]["clients"]
    assert len(clients) == 3 and secure["selection"]["clients"] is None
    sums = {k: sum(int(c[k]) for c in clients) for k in COUNTS}
    assert secure["selection"]["sums"] == plain["selection"]["sums"] == sums
    assert secure["selection"]["secure_sum"] and not plain["selection"]["secure_sum"]
    assert [n["partition-id"] for n in secure["selection"]["nodes"]] == [0, 1, 2]
    # the mixture: the same summed histogram, so the same fit and τ
    assert len(secure["threshold"]["histogram"]) == HISTOGRAM_BINS
    assert secure["threshold"]["histogram"] == plain["threshold"]["histogram"]
    assert secure["threshold"]["tau"] == plain["threshold"]["tau"]
    assert secure["threshold"]["clients_in_histogram"] == 3
    assert secure["keep"] == plain["keep"] and len(secure["keep"]) == 3
    # the run summary: totals from the sums, rows from the clients' own files on this machine
    summary = summarize(secure["cfg"])
    assert summary["secure_sum"] and summary["totals"] == sums
    assert [(r["client"], r["kept"]) for r in summary["clients"]] == [
        (c["partition-id"], c["kept"]) for c in clients
    ]
    assert "f1" in summary["selection"]  # ground truth against the clients' local decisions
    assert any("secure sum" in note for note in summary_notes(summary))
    # phase 2: the server cannot tell who kept nothing, so every node that answered is asked
    participation = json.loads((tmp_path / "secure" / "participation.json").read_text())
    train = [e for e in participation if e["phase"] == "train"]
    assert len(train) == 1 and len(train[0]["answered"]) == 3
    with console.capture() as printed:
        _print_summary(summary, secure["cfg"])
    text = " ".join(printed.get().split())
    assert "phase 1 reached the server only as the 'all' row; phase 2 still gave it each " in text
    assert "training client's kept count and adapter; the rows per client below" in text
    assert "learned only" not in text
    # what the run states the server learned, per client, in these settings
    learns = secure["threshold"]["server_learns"]
    assert learns[0].startswith("phase 1: only the sums over clients of the counts and histogram")
    assert "kept count as num-examples (not covered by the secure sum)" in learns[1]
    assert all(" ".join(line.split()) in text for line in learns)
    assert plain["threshold"]["server_learns"][0].startswith("phase 1, per client: its counts")


def test_without_local_files_the_summary_says_per_client_rows_are_unavailable(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sums = {"total": 30, "kept": 20, "rejected-below-threshold": 9}
    sums |= {"rejected-non-finite": 1, "truncated": 2}
    (run_dir / "threshold.json").write_text(
        json.dumps(
            {"scorer": "ppl", "direction": "lower is better", "rule": "mixture"}
            | {"tau": 1.0, "tau_raw": 2.7}
        )
    )
    selection = {"tau": 1.0, "rule": "mixture", "secure_sum": True, "sums": sums}
    selection |= {"nodes": [{"node": 5, "partition-id": 0}], "clients": None, "dropped": []}
    (run_dir / "selection.json").write_text(json.dumps(selection))
    (run_dir / "metrics.json").write_text("[]")
    cfg = Config.from_flat({"output.run-dir": str(run_dir), "data.clients-dir": str(tmp_path)})
    summary = summarize(cfg)
    assert summary["clients"] == [] and summary["totals"] == sums
    notes = summary_notes(summary)
    assert notes[0].startswith(
        "secure sum: phase 1's counts reached the server only as sums over clients, but phase 2 "
        "replies still carried each training client's kept count (num-examples) and adapter; "
        "per-client rows are "
    )
    assert "2 samples were longer than model.max-length and were truncated" in notes
    with console.capture() as printed:
        _print_summary(summary, cfg)
    text = printed.get().replace("\n", " ")
    assert "per-client rows unavailable" in text and "30" in text and "20" in text


def test_a_round_in_which_only_nodes_that_kept_nothing_answer_keeps_the_adapter():
    grid = ParticipationGrid(LocalGrid(ClientApp(), 2))
    strategy = QualityFedAvg({1: 0, 2: 1}, grid)

    def reply(kept: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})})
        content["metrics"] = MetricRecord({"num-examples": kept, "train-loss": 0.0})
        return Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))

    assert strategy.aggregate_train(1, [reply(0), reply(0)]) == (None, None)
    arrays, _ = strategy.aggregate_train(1, [reply(0), reply(3)])
    assert arrays["w"].numpy().tolist() == [1.0, 1.0]


def test_a_node_dead_after_sharing_keys_leaves_the_exact_sum_of_the_survivors(
    tiny_model_dir, three_clients, tmp_path
):
    run_dir = tmp_path / "dropout"
    secure = _run(tiny_model_dir, three_clients, run_dir, secure=True, dies={1: ("query.score", 0)})
    selection = secure["selection"]
    assert [n["partition-id"] for n in selection["nodes"]] == [0, 2]
    survivors = [
        json.loads((run_dir / "clients" / f"client-{pid}" / "selection.json").read_text())
        for pid in (0, 2)
    ]
    assert selection["sums"] == {k: sum(s[k] for s in survivors) for k in COUNTS}
    assert {d["reason"] for d in selection["dropped"]} == {"Error: Node Unavailable"}
    participation = json.loads((run_dir / "participation.json").read_text())
    phases = [e["phase"] for e in participation]
    assert phases == ["query.keys", "query.shares", "query.score", "query.unmask"] + [
        "query.keys",
        "query.shares",
        "query.select",
        "query.unmask",
    ]
    summary = summarize(secure["cfg"])
    assert summary["totals"] == selection["sums"]
    assert [r["client"] for r in summary["clients"]] == [0, 2]


def test_secure_sum_needs_two_nodes(tiny_model_dir, demo_dir, tmp_path):
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "data.clients-dir": str(demo_dir / "clients"),
            "data.num-clients": 1,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",
            "quality.secure-sum": True,
            "train.rounds": 0,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(FedqcError, match="quality.secure-sum needs at least 2 nodes"):
        run_server(LocalGrid(build_client_app(cfg), 1), cfg, QuietStages())


def test_under_dp_the_secure_sum_adds_the_noisy_counts_each_client_released(
    tiny_model_dir, three_clients, tmp_path, monkeypatch
):
    """Noisy counts are rounded on the client and stay signed (not clipped at 0) in the ring: the
    sums are those of the signed released values, negative ones included (seeded noise)."""
    real = np.random.default_rng
    draws = iter(range(100, 200))
    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: real(next(draws)))
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 48,
            "data.clients-dir": str(three_clients / "clients"),
            "data.num-clients": 3,
            "quality.scorer": "ppl",
            "quality.rule": "fixed:1e9",
            "quality.shots": 0,
            "quality.secure-sum": True,
            "quality.dp-epsilon": 0.5,
            "quality.allow-empty": True,
            "train.rounds": 0,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    grid = LocalGrid(build_client_app(cfg), 3)
    run_server(grid, cfg, QuietStages())
    released = [dict(c.state[RELEASED_KEY]) for c in grid.contexts.values()]
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["sums"] == {k: sum(r[k] for r in released) for k in COUNTS}
    assert min(v for r in released for v in r.values()) < 0  # a negative release, summed as is
    threshold = json.loads((tmp_path / "run" / "threshold.json").read_text())
    assert threshold["privacy_budget"]["epsilon_total"] == 3 * 0.5  # the sum is post-processing


def test_too_many_dropouts_stop_the_secure_sum_with_one_line(
    tiny_model_dir, three_clients, tmp_path
):
    dies = {1: ("query.score", 0), 2: ("query.score", 0)}  # 1 of 3 left; a majority is 2
    with pytest.raises(
        FedqcError,
        match=r"secure sum: only 1 of 3 nodes sent their masked "
        r"query.score reply; the sum needs 2",
    ):
        _run(tiny_model_dir, three_clients, tmp_path / "run", secure=True, dies=dies)


def test_a_simulated_secure_sum_run_sends_only_masked_vectors(tmp_path, tiny_model_dir, demo_dir):
    """Flower's simulation runtime (Ray): the session's records cross the real message path."""
    audit = tmp_path / "audit.jsonl"
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 64,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "quality.scorer": "ppl",
            "quality.rule": "mixture",
            "quality.shots": 0,
            "quality.secure-sum": True,
            "quality.allow-empty": True,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
        }
    )
    cfg = prepare(cfg, new_run_dir(str(tmp_path / "run"), force=False))
    run_simulation(cfg, cfg.data.num_clients, client_mods=[AuditLog(str(audit))])

    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    session = ["query.keys", "query.shares", "query.unmask"]
    kinds = sorted(e["message_type"] for e in entries)
    assert kinds == sorted((session * 2 + ["query.score", "query.select", "train"]) * 2)
    for entry in entries:
        assert not entry["error"], entry
        if entry["message_type"] in ("query.score", "query.select"):
            assert set(entry["records"]) == {"stats"}
            assert set(entry["records"]["stats"]["entries"]) == {MASKED_KEY, "partition-id"}
    run_dir = Path(cfg.output.run_dir)
    selection = json.loads((run_dir / "selection.json").read_text())
    local = [
        json.loads((run_dir / "clients" / f"client-{pid}" / "selection.json").read_text())
        for pid in (0, 1)
    ]
    assert selection["clients"] is None
    assert selection["sums"] == {k: sum(c[k] for c in local) for k in COUNTS}
    assert summarize(cfg)["totals"] == selection["sums"]


def test_a_resumed_secure_sum_run_checks_the_summed_counts_of_the_same_clients():
    nodes = [{"node": 5, "partition-id": 0}, {"node": 6, "partition-id": 1}]
    sums = {"total": 24, "kept": 18}
    saved = {"clients": None, "sums": sums, "nodes": nodes}
    _check_same_selection(saved, {"clients": None, "sums": dict(sums), "nodes": nodes})
    with pytest.raises(FedqcError, match="now keeps 17 of 24 samples, but kept 18 of 24"):
        _check_same_selection(saved, {"clients": None, "sums": sums | {"kept": 17}, "nodes": nodes})
    # one client is missing now: the two sums would subtract to its counts
    with pytest.raises(FedqcError, match=r"summed clients \[0, 1\], now \[0\]"):
        _check_same_selection(
            saved, {"clients": None, "sums": {"total": 12, "kept": 9}, "nodes": nodes[:1]}
        )
    # the resumed run's sums must add exactly the saved clients, before anything is unmasked
    cfg = Config.from_flat({"quality.secure-sum": True})
    assert _resumed_clients(cfg, ({"selection": saved}, None)) == {0, 1}
    assert _resumed_clients(cfg.replace(**{"quality.secure-sum": False}), ({}, None)) is None


def test_a_second_secure_sum_over_other_clients_stops_before_unmasking(
    tiny_model_dir, three_clients, tmp_path
):
    """Rule mixture: node 1 dies at query.select, after the first sum added it. A second sum over
    nodes 0 and 2 minus the first would be node 1's histogram-free counts: refused, and no
    query.unmask of the second session is sent."""
    grid = {}

    def run():
        cfg = _config(tiny_model_dir, three_clients, tmp_path / "run", secure=True)
        grid["g"] = LocalGrid(build_client_app(cfg), 3, dies={1: ("query.select", 0)})
        run_server(grid["g"], cfg, QuietStages())

    with pytest.raises(
        FedqcError, match=r"answered by partitions \[0, 2\], not exactly \[0, 1, 2\]"
    ):
        run()
    kinds = [kind for _, kind, _ in grid["g"].delivered]
    assert kinds.count("query.unmask") == 3  # the first session's only
    assert kinds.count("query.select") == 2


def test_a_checkpoint_scorer_sums_securely_too(tiny_model_dir, demo_dir, tmp_path):
    """tracin-cos: the query message carries the checkpoints and anchor info beside the session."""
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 48,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.num-clients": 2,
            "quality.scorer": "tracin-cos",
            "quality.rule": "anchor-quantile:0.2",
            "quality.warmup-rounds": 1,
            "quality.secure-sum": True,
            "quality.allow-empty": True,
            "train.rounds": 0,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "federation.join-timeout": 5.0,
            "output.run-dir": str(tmp_path / "run"),
        }
    )
    run_server(LocalGrid(build_client_app(cfg), 2), cfg, QuietStages())
    run_dir = tmp_path / "run"
    local = [
        json.loads((run_dir / "clients" / f"client-{pid}" / "selection.json").read_text())
        for pid in (0, 1)
    ]
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["clients"] is None
    assert selection["sums"] == {k: sum(c[k] for c in local) for k in COUNTS}
