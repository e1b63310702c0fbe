"""quality.secure-sum: the server learns only the sums of the phase-1 counts and histogram.

The protocol on its own (fedqc.federation.secure_sum).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.federation.secure_sum import (
    MODULUS,
    SecureSumError,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    threshold_for,
    unmask_sum,
)

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


def test_the_masked_vectors_add_up_to_the_exact_sum():
    rng = np.random.default_rng(0)
    vectors = {i: rng.integers(0, 10_000, 67).tolist() for i in range(4)}
    vectors[3][0] = MODULUS - 1  # the ring wraps exactly
    total = _sum(4, vectors)
    assert total.tolist() == (np.array(list(vectors.values())).sum(0) % MODULUS).tolist()


def test_a_masked_vector_alone_says_nothing_of_its_counts():
    states, pk1s, ciphertexts = _session(3)
    zeros = client_mask(states[0], [ciphertexts[j][0] for j in range(3)], [0] * 5)
    assert zeros != [0] * 5 and all(0 <= v < MODULUS for v in zeros)
    assert len(set(zeros)) == 5  # uniform-looking mod 2^32, not the zeros it hides


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
    with pytest.raises(SecureSumError, match=r"\[0, 2\^32\)"):
        client_mask(state, [b"", ciphertexts[1][0]], [-1, 0, 0, 0, 0])
