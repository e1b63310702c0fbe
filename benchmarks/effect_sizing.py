"""Learning curves of mixed and oracle, to size the effect study (issue 27, step 1).

Trains two arms with fedqc's own federated LoRA (``fedqc.bench.train.train_arm``: Flower's
simulation runtime, as ``fedqc run``) on one demo-shaped GSM8K federation, one seed each:

- ``mixed``: every client sample, ``--contamination`` of them corrupted (cut, deletion, exchange);
- ``oracle``: the clean samples only.

The held-out loss is measured after every round on ``--eval`` samples; at the rounds in
``--generate-at`` the saved global adapter answers ``--questions`` held-out GSM8K questions
greedily (the bench's generation) and is scored by answer-format rate, exact match and ROUGE-L.
Where the curves part and stay apart says how large the study must be.

Each arm's training and each generation is saved under ``--out`` as it finishes; the same command
again goes on from there (a 180-minute session can stop it).

    python benchmarks/effect_sizing.py --out runs/effect-sizing [--clients 4 --samples 75 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedqc.bench.generation import generate
from fedqc.bench.train import load_adapter, train_arm
from fedqc.config import Config
from fedqc.data.demo import write_demo
from fedqc.data.samples import load_samples
from fedqc.models.loading import load
from fedqc.train.answers import answer_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/effect-sizing")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--samples", type=int, default=75, help="samples per client")
    p.add_argument("--contamination", default="0.5")
    p.add_argument("--eval", type=int, default=40, help="held-out samples for the loss")
    p.add_argument("--questions", type=int, default=80, help="held-out questions to answer")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="local steps per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--generate-at", default="2,4,8", help="rounds whose adapter answers")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    data = out / "data"
    if not (data / "eval.jsonl").is_file():
        held_out = max(a.eval, a.questions)
        write_demo(data, a.clients, a.samples, 10, held_out, a.contamination, a.seed)
    held_out = load_samples(data / "eval.jsonl")
    loss_set = out / "eval-loss.jsonl"
    loss_set.write_text("".join(ln + "\n" for ln in _lines(data / "eval.jsonl")[: a.eval]))
    questions = held_out[: a.questions]
    clients = [load_samples(data / "clients" / f"client-{i}.jsonl") for i in range(a.clients)]
    truth = [
        np.array([not json.loads(ln)["corrupted"] for ln in _lines(data / "truth" / f.name)])
        for f in sorted((data / "clients").glob("client-*.jsonl"))
    ]
    cfg = Config().replace(
        **{
            "model.max-length": a.max_length,
            "train.rounds": a.rounds,
            "train.local-steps": a.steps,
            "train.batch-size": a.batch,
            "train.lr": a.lr,
            "train.seed": a.seed,
        }
    )
    arms = {"mixed": [np.ones(len(t), bool) for t in truth], "oracle": truth}
    curves: dict[str, dict] = {}
    for name, keep in arms.items():
        done = out / name / "history.json"
        if not done.is_file():
            start = time.perf_counter()
            r = train_arm(cfg, clients, keep, loss_set, out / name)
            done.write_text(json.dumps({"history": r["history"], "kept": r["kept"],
                                        "seconds": time.perf_counter() - start}))  # fmt: skip
        curves[name] = json.loads(done.read_text())
        print(f"{name}: kept {curves[name]['kept']}, trained in {curves[name]['seconds']:.0f} s")
    loaded = load(cfg.model)
    references = [s.response for s in questions]
    rounds = [int(r) for r in a.generate_at.split(",")]
    answers: dict[tuple[str, int], dict] = {}
    for r in [0, *rounds]:
        for name in ["base"] if r == 0 else list(arms):
            path = out / "answers" / f"{name}-round-{r}.json"
            if not path.is_file():
                start = time.perf_counter()
                adapter = out / name / "run" / "rounds" / f"round-{r}"
                load_adapter(loaded, None if r == 0 else adapter)
                texts = generate(loaded, questions, a.max_new_tokens)
                path.parent.mkdir(parents=True, exist_ok=True)
                metrics = answer_metrics(texts, references)
                path.write_text(json.dumps({"metrics": metrics, "answers": texts,
                                            "seconds": time.perf_counter() - start}))  # fmt: skip
            answers[(name, r)] = json.loads(path.read_text())
    print(f"\n{len(questions)} questions, loss on {a.eval} held-out samples")
    print("| round | loss mixed | loss oracle | format mixed | format oracle | EM mixed | "
          "EM oracle | ROUGE-L mixed | ROUGE-L oracle |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in range(a.rounds + 1):
        loss = [curves[n]["history"][r]["eval_loss"] for n in arms]
        cells = [f"{v:.4f}" for v in loss]
        for key in ("answer_format", "exact_match", "rouge_l"):
            for n in arms:
                got = answers.get(("base", 0) if r == 0 else (n, r))
                cells.append(f"{got['metrics'][key]:.3f}" if got else "")
        print(f"| {r} | " + " | ".join(cells) + " |")
    seconds = {n: round(c["seconds"]) for n, c in curves.items()}
    gen = {f"{n}@{r}": round(v["seconds"]) for (n, r), v in answers.items()}
    print(f"\ntraining seconds {seconds}; generation seconds {gen}")


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


if __name__ == "__main__":
    main()
