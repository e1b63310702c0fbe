"""The bench's data, scored once: a clean evaluation set, clean anchors, and a client pool whose
items each carry their clean answer and some corrupted versions.

Scoring is the expensive part, so every pool entry (an item, clean or in one corruption) is scored
exactly once: one pass for ℓ(r|q) and one for ℓ(r), from which all four scorers follow. Every
federation of the bench (the main one, and those of the sweeps) is assembled from these entries, so
its scores are looked up, not recomputed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedqc.bench.config import BenchConfig
from fedqc.config import Config
from fedqc.data.catalog import gsm8k_overlap, load_source
from fedqc.data.encoding import encode_all
from fedqc.data.partition import Member, corrupt_variants
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.likelihood import response_losses, response_nll
from fedqc.models.loading import LoadedModel
from fedqc.quality.plan import encode_anchors
from fedqc.scoring.scorers import get_scorer
from fedqc.scoring.shots import anchor_prefixes, demonstrations


@dataclass
class BenchData:
    eval: list[Sample]  # clean, held out: eval loss and exact match
    anchors: list[Sample]  # clean, the server's: the first data.num-anchors set τ
    items: list[Sample]  # clean base items of the client pool
    variants: list[dict[str, str]]  # per item: corruption type -> corrupted response
    # bench.client-sources: per client, the items of its own source (its federations' samples
    # come from these only); None: every client draws from the whole pool
    groups: list[list[int]] | None = None

    def entries(self) -> list[tuple[int, str | None]]:
        """Every (item, corruption or None) the pool holds: the units that get scored."""
        out: list[tuple[int, str | None]] = [(i, None) for i in range(len(self.items))]
        out += [(i, k) for i, v in enumerate(self.variants) for k in v]
        return out

    def sample(self, member: Member) -> Sample:
        item = self.items[member.item]
        if member.corruption is None:
            return item
        return Sample(item.id, item.prompt, self.variants[member.item][member.corruption])


def source_samples(bench: BenchConfig) -> list[Sample]:
    return load_source(bench.source or "gsm8k")


def split_data(cfg: Config, bench: BenchConfig) -> BenchData:
    """Eval, anchors and pool: disjoint, from one seeded shuffle of the source.

    Item k of the shuffled pool gets ``bench.variants`` corruption types, taken in turn from
    ``bench.types`` (so each type has the same number of items).
    """
    if bench.client_source_list:
        return split_by_client(cfg, bench)
    d, types = cfg.data, bench.type_list
    num_anchors = max(d.num_anchors, *bench.anchor_counts)
    pool_size = d.num_clients * d.samples_per_client
    samples = source_samples(bench)
    need = d.num_eval + num_anchors + pool_size
    if need > len(samples):
        raise FedqcError(
            f"the bench needs {need} samples (eval {d.num_eval} + anchors {num_anchors} + "
            f"pool {d.num_clients}×{d.samples_per_client}) but the source has {len(samples)}"
        )
    rng = random.Random(f"fedqc-bench-{d.seed}")
    samples = list(samples)
    rng.shuffle(samples)
    eval_set, anchors = samples[: d.num_eval], samples[d.num_eval : d.num_eval + num_anchors]
    items = samples[d.num_eval + num_anchors : need]
    v = min(bench.variants, len(types))
    wanted = [[types[(k * v + j) % len(types)] for j in range(v)] for k in range(len(items))]
    variants = corrupt_variants([s.response for s in items], wanted, rng)
    return BenchData(eval_set, anchors, items, variants)


def split_by_client(cfg: Config, bench: BenchConfig) -> BenchData:
    """Eval and anchors from ``bench.source``; client c's items from ``bench.client-sources[c]``.

    Clients that name the same source share one seeded shuffle of it, data.samples-per-client
    items each. Corruption types are taken in turn within each source, and exchanged answers stay
    within it (a wrong answer from the same domain and language). Anchors and eval leave out the
    GSM8K problems that a client source holds in translation, and a client source that is
    ``bench.source`` itself leaves out the anchors and the eval set.
    """
    d, types, sources = cfg.data, bench.type_list, bench.client_source_list
    num_anchors = max(d.num_anchors, *bench.anchor_counts)
    rng = random.Random(f"fedqc-bench-{d.seed}")
    loaded = {source: load_source(source) for source in dict.fromkeys(sources)}
    overlap = set().union(*(gsm8k_overlap(source) for source in loaded))
    server = [s for s in source_samples(bench) if s.id not in overlap]
    if d.num_eval + num_anchors > len(server):
        raise FedqcError(
            f"bench.source: eval {d.num_eval} + anchors {num_anchors} need "
            f"{d.num_eval + num_anchors} samples but it has {len(server)} (after leaving out "
            f"{len(overlap)} that the client sources hold)"
        )
    rng.shuffle(server)
    eval_set = server[: d.num_eval]
    anchors = server[d.num_eval : d.num_eval + num_anchors]
    taken = {s.id for s in eval_set + anchors}
    v = min(bench.variants, len(types))
    items: list[Sample] = []
    variants: list[dict[str, str]] = []
    groups: list[list[int]] = [[] for _ in sources]
    owner: dict[str, str] = {}
    for source, samples in loaded.items():
        clients = [c for c, name in enumerate(sources) if name == source]
        samples = [s for s in samples if s.id not in taken]
        need = len(clients) * d.samples_per_client
        if need > len(samples):
            raise FedqcError(
                f"bench.client-sources: '{source}' has {len(samples)} samples; "
                f"{len(clients)} client(s) × data.samples-per-client {d.samples_per_client} "
                f"need {need}"
            )
        for s in samples:
            if owner.setdefault(s.id, source) != source:
                raise FedqcError(
                    f"bench.client-sources: id '{s.id}' is in both '{owner[s.id]}' and "
                    f"'{source}'; give the samples distinct ids"
                )
        rng.shuffle(samples)
        chosen = samples[:need]
        wanted = [[types[(k * v + j) % len(types)] for j in range(v)] for k in range(need)]
        made = corrupt_variants([s.response for s in chosen], wanted, rng)
        for j, c in enumerate(clients):
            part = range(j * d.samples_per_client, (j + 1) * d.samples_per_client)
            groups[c] = list(range(len(items) + part.start, len(items) + part.stop))
        items += chosen
        variants += made
    return BenchData(eval_set, anchors, items, variants, groups)


@dataclass
class Losses:
    """Per-sample losses: token means ℓ(r|q) and ℓ(r), and the end-of-sequence NLL ℓ_end;
    every forward scorer is a formula of them."""

    cond: np.ndarray
    bare: np.ndarray
    truncated: np.ndarray  # bool: cut to model.max-length
    end: np.ndarray | None = None  # ℓ_end, NaN where truncated (None: not measured)

    def raw(self, scorer: str) -> np.ndarray:
        with np.errstate(all="ignore"):
            return get_scorer(scorer).formula(self.cond, self.bare, self.end).astype(np.float64)

    def oriented(self, scorer: str) -> np.ndarray:
        return get_scorer(scorer).orient(self.raw(scorer))

    def take(self, index: np.ndarray | Sequence[int]) -> Losses:
        index = np.asarray(index, dtype=np.int64)
        end = None if self.end is None else self.end[index]
        return Losses(self.cond[index], self.bare[index], self.truncated[index], end)


def score_losses(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    max_length: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> Losses:
    """ℓ(r|q), ℓ(r) and ℓ_end of each sample on the model's current adapter, each pass run once.

    The same encodings and batched pass as :func:`fedqc.scoring.scorers.score_samples` (with the
    same ``prefixes``: each sample's demonstrations); bare sequences that are identical token for
    token after the same prefix (an exchanged answer and its own item) are scored once.
    """
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    prefixes = [tuple(p) for p in prefixes] if prefixes is not None else [()] * len(samples)
    cond = encode_all(tok, list(samples), max_length)
    sums, counts, ends = response_losses(loaded.model, cond, pad, batch_tokens, on_batch, prefixes)
    bare = encode_all(tok, list(samples), max_length, bare=True)
    unique: dict[tuple, int] = {}
    slot = [
        unique.setdefault((p, e.input_ids), len(unique))
        for p, e in zip(prefixes, bare, strict=True)
    ]
    firsts = {s: i for i, s in reversed(list(enumerate(slot)))}
    distinct = [firsts[s] for s in range(len(unique))]
    bsums, bcounts = response_nll(
        loaded.model,
        [bare[i] for i in distinct],
        pad,
        batch_tokens,
        on_batch,
        [prefixes[i] for i in distinct],
    )
    slot_arr = np.asarray(slot, dtype=np.int64)
    return Losses(
        sums / np.maximum(counts, 1),
        (bsums / np.maximum(bcounts, 1))[slot_arr] if len(slot) else np.zeros(0),
        np.array([e.truncated for e in cond], dtype=bool),
        ends,
    )


def score_pool(
    loaded: LoadedModel, cfg: Config, data: BenchData, shots: int, stages
) -> tuple[Losses, Losses]:
    """The losses of every pool entry and of every anchor, scored with ``shots`` demonstrations:
    the first ``shots`` anchors before every pool entry; each of them scored with the next anchor
    in its own place (as the server scores its anchors)."""
    entries = data.entries()
    max_length, batch_tokens = cfg.model.max_length, cfg.quality.batch_tokens
    encoded_anchors = encode_anchors(loaded, data.anchors, shots, max_length)
    demos = demonstrations(encoded_anchors, shots)
    stages.stage(
        f"scoring the pool: {len(entries)} samples, ℓ(r|q) and ℓ(r), {shots} shots",
        2 * len(entries),
    )
    losses = score_losses(
        loaded,
        [data.sample(Member(i, k)) for i, k in entries],
        max_length,
        batch_tokens,
        stages.advance,
        [demos] * len(entries),
    )
    stages.stage(f"scoring {len(data.anchors)} anchors, {shots} shots", 2 * len(data.anchors))
    anchor_losses = score_losses(
        loaded,
        data.anchors,
        max_length,
        batch_tokens,
        stages.advance,
        anchor_prefixes(encoded_anchors, shots),
    )
    return losses, anchor_losses
