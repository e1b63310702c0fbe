"""Secure sum of the phase-1 counts (``quality.secure-sum``): SecAgg on the complete graph.

This is SecAgg (Bonawitz et al. 2017) with every client masking with every other (cost n² in
keys, shares and unmasking), not SecAgg+, whose sparse random neighbour graph is not implemented.

The server learns the sum over clients of an integer vector (the five counts, or the mixture rule's
histogram with its three counts), never one client's vector, and the sum survives clients that
drop out after the keys are shared, while at least ``threshold`` clients answer.

Why not Flower's own SecAgg+ (``SecAggPlusWorkflow`` / ``secaggplus_mod``): the workflow drives a
legacy ``Strategy`` through ``configure_fit`` / ``aggregate_fit`` with ``FitIns`` parameters in
``train`` messages, and the mod wraps a legacy ``fit`` whose float parameters it clips, quantises
and weights by ``num_examples``. fedqc's phase 1 is a ``query`` exchange of integer counts in a
Message-API ServerApp, so it runs the same protocol here with Flower's primitives:

- key agreement: ``flwr.supercore.primitives.asymmetric`` (EC key pairs on SECP384R1, PEM) and
  ``flwr.common.secure_aggregation.crypto.symmetric_encryption.generate_shared_key`` (ECDH, HKDF);
- secret sharing: ``flwr.common.secure_aggregation.crypto.shamir`` (pycryptodome's Shamir);
- encryption of the shares: ``symmetric_encryption.encrypt`` / ``decrypt`` (Fernet), with
  ``secaggplus_utils.share_keys_plaintext_concat`` / ``_separate`` as the plaintext layout;
- masks: the ChaCha20 keystream of the ``cryptography`` package, keyed by a 32-byte secret.
  Flower's ``secaggplus_utils.pseudo_rand_gen`` folds its seed to 32 bits for numpy's Mersenne
  Twister, so a server could try every seed; ChaCha20 keeps the full 256-bit key.

The protocol (SecAgg on the complete graph: every client masks with every other; SecAgg+ would
reduce that to a random neighbourhood for large federations, and is not what runs here). One
session sums one vector; the mixture rule runs two sessions (histogram, then counts) with fresh
keys, because unmasking one vector reveals secrets that must not serve another; both sessions must
unmask exactly the same clients (``require``), else one sum minus the other is a client's vector.
Each client has a slot 0..n-1 (the server orders the nodes that sent keys); every message names
clients by slot.

1. ``query.keys``: each client makes two key pairs and sends the public keys (pk1 for masks, pk2
   for the shares' encryption).
2. ``query.shares``: the server sends every slot's public keys; each client draws a 32-byte seed b,
   splits b and its secret key sk1 into n Shamir shares with threshold t = n // 2 + 1, and sends
   slot j's shares encrypted under ECDH(sk2, pk2_j).
3. The data message (``query.score`` / ``query.select``) carries the ciphertexts addressed to the
   client; it decrypts them and sends y = x + PRG(b) + Σ_{j<i} PRG(s_ij) − Σ_{j>i} PRG(s_ij)
   mod 2^32, with s_ij = ECDH(sk1_i, pk1_j), over the slots j that sent it shares.
4. ``query.unmask``: the server names the slots that sent y (active) and those that shared keys
   but did not (dead); each client sends its shares of b for the active ones and of sk1 for the
   dead ones, never both for one slot, and answers once per session. From t shares the server
   rebuilds every active b and every dead sk1, removes those masks, and the pairwise masks of the
   active clients cancel: Σ y − Σ PRG(b) ± (the dead clients' pairwise masks) = Σ x mod 2^32.

Threat model: an honest-but-curious server, which follows the protocol and reads everything it
gets. t > n / 2 stops it from collecting t shares of b and t shares of sk1 of one client by telling
two groups of clients different stories; SecAgg's signed consistency round against a server that
lies actively is not implemented. A client checks that it is asked for one kind of share per slot.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedqc.errors import FedqcError
from fedqc.federation.protocol import (
    MASK_BITS,
    SECURE_KEYS,
    SECURE_SHARES,
    SECURE_UNMASK,
    KeysReply,
    KeysRequest,
    MaskedReply,
    MaskRequest,
    SharesReply,
    SharesRequest,
    UnmaskReply,
    UnmaskRequest,
    Wire,
)

MODULUS = 1 << MASK_BITS
HALF = MODULUS >> 1  # the ring holds signed values in [-HALF, HALF)
SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20's counter and nonce: every key masks exactly one vector


class SecureSumError(ValueError):
    """A session message that a client (or the server) cannot accept."""


def threshold_for(n: int) -> int:
    """Shares needed to rebuild a secret among n clients: a majority (see the threat model)."""
    return n // 2 + 1


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform integers mod 2^32 from ChaCha20's keystream under a 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint64)


def pair_key(secret_key: bytes, public_key: bytes) -> bytes:
    """The 32-byte secret two slots share: ECDH + HKDF (Flower's generate_shared_key)."""
    shared = generate_shared_key(bytes_to_private_key(secret_key), bytes_to_public_key(public_key))
    return base64.urlsafe_b64decode(shared)


def fernet_key(secret_key: bytes, public_key: bytes) -> bytes:
    """The Fernet key two slots share for the encrypted shares (ECDH + HKDF)."""
    return generate_shared_key(bytes_to_private_key(secret_key), bytes_to_public_key(public_key))


def _sizes() -> tuple[int, int, int, int]:
    """Byte lengths fixed by the primitives: a PEM public key, a share of a seed, a share of a
    PEM secret key, and one encrypted pair of shares (the guard checks replies against them)."""
    sk, pk = generate_key_pairs()
    sk_bytes = private_key_to_bytes(sk)
    seed_share = create_shares(bytes(SEED_BYTES), 2, 2)[0]
    sk_share = create_shares(sk_bytes, 2, 2)[0]
    plain = share_keys_plaintext_concat(0, 1, seed_share, sk_share)
    token = encrypt(fernet_key(sk_bytes, public_key_to_bytes(pk)), plain)
    return len(public_key_to_bytes(pk)), len(seed_share), len(sk_share), len(token)


PUBLIC_KEY_BYTES, SEED_SHARE_BYTES, SK_SHARE_BYTES, CIPHERTEXT_BYTES = _sizes()


def check_public_key(key) -> None:
    """A public key as ``query.keys`` sends it: PEM that re-serialises to exactly its bytes."""
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
        raise SecureSumError(f"a public key must be {PUBLIC_KEY_BYTES} bytes")
    try:
        same = public_key_to_bytes(bytes_to_public_key(key)) == key
    except Exception:
        same = False
    if not same:
        raise SecureSumError("a public key does not decode as one")


# --- client side: the session's state is a dict of bytes / ints / lists (a ConfigRecord) ---


def client_keys() -> tuple[dict, dict]:
    """Step 1: (the session state to keep, the reply: two public keys)."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {
        "sk1": private_key_to_bytes(sk1),
        "pk1": public_key_to_bytes(pk1),
        "sk2": private_key_to_bytes(sk2),
        "pk2": public_key_to_bytes(pk2),
        "step": 1,
    }
    return state, {"pk1": state["pk1"], "pk2": state["pk2"]}


def client_shares(state: dict, slot: int, pk1s: Sequence[bytes], pk2s: Sequence[bytes]) -> list:
    """Step 2: Shamir shares of a fresh seed and of sk1, one encrypted pair per other slot
    (b"" at this client's own slot). Updates ``state``."""
    n = len(pk1s)
    if state.get("step") != 1:
        raise SecureSumError("query.shares before query.keys")
    if n < 2 or len(pk2s) != n or not 0 <= slot < n:
        raise SecureSumError(f"{n} slots and slot {slot}: a secure sum needs two clients or more")
    if (pk1s[slot], pk2s[slot]) != (state["pk1"], state["pk2"]):
        raise SecureSumError("the server lists other public keys at this client's slot")
    if len(set(pk1s) | set(pk2s)) != 2 * n:
        raise SecureSumError("two slots share a public key")
    for key in (*pk1s, *pk2s):
        check_public_key(key)
    t = threshold_for(n)
    seed = os.urandom(SEED_BYTES)
    seed_shares = create_shares(seed, t, n)
    sk_shares = create_shares(state["sk1"], t, n)
    ciphertexts = []
    for j in range(n):
        if j == slot:
            ciphertexts.append(b"")
            continue
        plain = share_keys_plaintext_concat(slot, j, seed_shares[j], sk_shares[j])
        ciphertexts.append(encrypt(fernet_key(state["sk2"], pk2s[j]), plain))
    seed_held, sk_held = [b""] * n, [b""] * n
    seed_held[slot], sk_held[slot] = seed_shares[slot], sk_shares[slot]
    state |= {
        "step": 2,
        "slot": slot,
        "pk1s": list(pk1s),
        "pk2s": list(pk2s),
        "seed": seed,
        "seed-shares": seed_held,
        "sk-shares": sk_held,
    }
    return ciphertexts


def client_mask(state: dict, ciphertexts: Sequence[bytes], vector: Sequence[int]) -> list[int]:
    """Step 3: store the shares the other slots sent (``ciphertexts[j]``, b"" where slot j sent
    none) and mask ``vector``: signed integers in [-2^31, 2^31) (DP noise on a count may make it
    negative), as two's complement mod 2^32. Updates ``state``."""
    if state.get("step") != 2:
        raise SecureSumError("a masked reply before query.shares")
    slot, n = int(state["slot"]), len(state["pk1s"])
    if len(ciphertexts) != n:
        raise SecureSumError(f"{len(ciphertexts)} ciphertexts for {n} slots")
    values = np.asarray([int(v) for v in vector], dtype=np.int64)
    if (values < -HALF).any() or (values >= HALF).any():
        raise SecureSumError("a secure sum adds integers in [-2^31, 2^31)")
    values = values % MODULUS
    seed_held, sk_held = list(state["seed-shares"]), list(state["sk-shares"])
    neighbours = []
    for j, token in enumerate(ciphertexts):
        if j == slot or not token:
            continue
        plain = decrypt(fernet_key(state["sk2"], state["pk2s"][j]), token)
        src, dst, seed_share, sk_share = share_keys_plaintext_separate(plain)
        if (src, dst) != (j, slot):
            raise SecureSumError(f"slot {j} sent shares made for slot {dst} by slot {src}")
        seed_held[j], sk_held[j] = seed_share, sk_share
        neighbours.append(j)
    if len(neighbours) + 1 < threshold_for(n):
        raise SecureSumError(f"shares from {len(neighbours)} other slots: fewer than the threshold")
    length = len(values)
    masked = values.astype(np.uint64) + prg(state["seed"], length)
    for j in neighbours:
        mask = prg(pair_key(state["sk1"], state["pk1s"][j]), length)
        masked = masked + mask if slot > j else masked + (MODULUS - mask)
    state |= {"step": 3, "seed-shares": seed_held, "sk-shares": sk_held}
    return [int(v) for v in masked % MODULUS]


def client_unmask(state: dict, active: Sequence[int], dead: Sequence[int]) -> list[bytes]:
    """Step 4: this client's shares of the active slots' seeds and the dead slots' sk1, in the
    order of ``active`` then ``dead``. Once per session, never both kinds for one slot."""
    if state.get("step") != 3:
        raise SecureSumError("query.unmask before a masked reply, or twice in one session")
    slot, n = int(state["slot"]), len(state["pk1s"])
    slots = [int(s) for s in (*active, *dead)]
    if len(set(slots)) != len(slots) or not all(0 <= s < n for s in slots):
        raise SecureSumError("query.unmask names a slot twice, or one that does not exist")
    if slot not in active:
        raise SecureSumError("query.unmask does not count this client among the active slots")
    if len(active) < threshold_for(n):
        raise SecureSumError(f"{len(active)} active slots: fewer than the threshold")
    seed_held, sk_held = state["seed-shares"], state["sk-shares"]
    if any(not seed_held[s] for s in active) or any(not sk_held[s] for s in dead):
        raise SecureSumError("query.unmask asks for a share this client does not hold")
    state["step"] = 4
    return [seed_held[s] for s in active] + [sk_held[s] for s in dead]


# --- server side ---


def unmask_sum(
    length: int,
    pk1s: Sequence[bytes],
    masked: Mapping[int, Sequence[int]],
    dead: Sequence[int],
    shares: Mapping[int, Sequence[bytes]],
) -> np.ndarray:
    """The exact sum of the active slots' vectors, as signed int64 (two's complement mod 2^32:
    exact while every partial sum stays in [-2^31, 2^31)).

    ``masked`` maps each active slot to its masked vector; ``dead`` are the slots that shared keys
    but sent no vector; ``shares`` maps each active and dead slot to the shares the answering
    clients sent of its seed (active) or sk1 (dead).
    """
    n = len(pk1s)
    t = threshold_for(n)
    if len(masked) < t:
        raise SecureSumError(f"{len(masked)} masked vectors: fewer than the threshold {t}")
    total = np.zeros(length, dtype=np.uint64)
    for vector in masked.values():
        if len(vector) != length:
            raise SecureSumError(f"a masked vector of length {len(vector)}, not {length}")
        total = (total + np.asarray(vector, dtype=np.uint64)) % MODULUS
    for s in (*masked, *dead):
        if len(shares.get(s, ())) < t:
            raise SecureSumError(
                f"{len(shares.get(s, ()))} shares of slot {s}'s secret: fewer than the "
                f"threshold {t}; too many clients dropped out"
            )
    for s in masked:
        seed = combine_shares(list(shares[s]))
        total = (total + MODULUS - prg(seed, length)) % MODULUS
    for d in dead:
        sk1 = combine_shares(list(shares[d]))
        for s in masked:
            # Slot s added +mask if s > d, else −mask; remove it.
            mask = prg(pair_key(sk1, pk1s[s]), length)
            total = (total + (MODULUS - mask if s > d else mask)) % MODULUS
    total = total.astype(np.int64)
    return np.where(total >= HALF, total - MODULUS, total)


def run_session(
    grid,
    nodes: Sequence[int],
    kind: str,
    content_of: Callable[[int], RecordDict],
    length: int,
    timeout: float,
    need: int,
    require: set[int] | None = None,
) -> tuple[np.ndarray, dict[int, int], list[dict]]:
    """One secure sum over ``nodes`` (a ParticipationGrid): (the exact sum of the vectors of the
    clients that answered the data message ``kind``, those nodes with their partition ids, every
    node that dropped out of any step with the reason).

    ``content_of(node)`` is the data message's content; the session adds its ciphertexts. Fewer
    than max(2, ``need``) answers to the keys, or than ``need`` (the grid's check) or the
    threshold to a later step, stop the run (FedqcError); so does a reply that breaks the
    protocol. ``require``: the partition ids whose vectors this sum must add, exactly (the run's
    earlier secure sum, or the run being resumed); any other set of masked vectors stops the run
    before anything is unmasked, since the difference of two sums over different sets is the
    vectors of the clients in one and not the other.
    """
    dropped: list[dict] = []
    first = max(2, need)
    grid.min_answers |= {SECURE_KEYS: first, SECURE_SHARES: first}
    keys = _exchange(
        grid, {n: KeysRequest() for n in nodes}, SECURE_KEYS, KeysReply, timeout, dropped
    )
    slots = sorted(keys)
    pk1s = [keys[n].pk1 for n in slots]
    pk2s = [keys[n].pk2 for n in slots]
    if len(set(pk1s) | set(pk2s)) != 2 * len(slots):
        raise FedqcError("secure sum: two nodes sent the same public key")
    n, t = len(slots), threshold_for(len(slots))
    grid.min_answers |= {SECURE_SHARES: need, kind: need, SECURE_UNMASK: need}

    def enough(answered: int, what: str) -> None:
        if answered < t:
            raise FedqcError(
                f"secure sum: only {answered} of {n} nodes {what}; the sum needs {t} (a majority "
                f"of the {n} that sent keys): too many dropped out"
            )

    asked = {node: SharesRequest(i, pk1s, pk2s) for i, node in enumerate(slots)}
    sent = _exchange(grid, asked, SECURE_SHARES, SharesReply, timeout, dropped)
    enough(len(sent), "sent their shares")
    ciphertexts = {slots.index(node): r.ciphertexts for node, r in sent.items()}
    if any(len(c) != n for c in ciphertexts.values()):
        raise FedqcError("secure sum: a node sent shares for another number of slots")
    senders = sorted(ciphertexts)
    messages = []
    for i in senders:
        content = content_of(slots[i])
        own = MaskRequest([ciphertexts[j][i] if j in ciphertexts else b"" for j in range(n)])
        content[own.RECORD] = own.to_record()
        messages.append(Message(content, dst_node_id=slots[i], message_type=kind))
    replies = _replies(grid, messages, timeout, dropped)
    masked, partition = {}, {}
    for i in senders:
        reply = replies.get(slots[i])
        if reply is None:
            continue
        try:
            answer = MaskedReply.from_record(reply[MaskedReply.RECORD])
        except (KeyError, TypeError, ValueError):
            answer = None
        vector = [] if answer is None else answer.masked
        if len(vector) != length or not all(0 <= v < MODULUS for v in vector):
            raise FedqcError(f"secure sum: node {slots[i]} sent a malformed masked vector")
        masked[i], partition[slots[i]] = vector, answer.partition_id
    enough(len(masked), f"sent their masked {kind} reply")
    if require is not None and (
        sorted(partition.values()) != sorted(require) or len(set(partition.values())) != len(masked)
    ):
        raise FedqcError(
            f"secure sum: {kind} was answered by partitions {sorted(partition.values())}, not "
            f"exactly {sorted(require)} as the run's other secure sum: stopped before unmasking, "
            "since one sum minus the other would give a client's counts"
        )
    active, dead = sorted(masked), [i for i in senders if i not in masked]
    asked = {slots[i]: UnmaskRequest(active, dead) for i in active}
    answers = _exchange(grid, asked, SECURE_UNMASK, UnmaskReply, timeout, dropped)
    enough(len(answers), "answered query.unmask")
    held: dict[int, list[bytes]] = {s: [] for s in (*active, *dead)}
    for answer in answers.values():
        for s, share in zip((*active, *dead), answer.shares, strict=True):
            held[s].append(share)
    try:
        total = unmask_sum(length, pk1s, masked, dead, held)
    except (SecureSumError, ValueError) as exc:
        raise FedqcError(f"secure sum: {exc}") from None
    return total, partition, dropped


def _exchange(
    grid, asked: dict[int, Wire], kind: str, reply: type[Wire], timeout: float, dropped: list
) -> dict:
    """Send each node its session record; {node: its reply, read as ``reply``} of those that
    answered."""
    messages = [
        Message(RecordDict({body.RECORD: body.to_record()}), dst_node_id=node, message_type=kind)
        for node, body in asked.items()
    ]
    return {
        node: reply.from_record(content[reply.RECORD])
        for node, content in _replies(grid, messages, timeout, dropped).items()
    }


def _replies(grid, messages: list[Message], timeout: float, dropped: list) -> dict:
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # The grid gives each message its id as it sends it.
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    dropped += grid.exchanges[-1]["dropped"]
    return {
        node_of[r.metadata.reply_to_message_id]: r.content
        for r in replies
        if not r.has_error() and r.metadata.reply_to_message_id in node_of
    }
