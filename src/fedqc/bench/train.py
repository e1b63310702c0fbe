"""Training arms: each is a real `fedqc run` on the arm's kept samples, through Flower's simulation.

The arm's selection is made up front (from the scored pool), written as one ``client-<i>.jsonl``
per client holding what that client keeps, and the pipeline runs with
``quality.rule=drop-fraction:0`` (keeps everything) - so ServerApp, ClientApp and FedAvg are the
ones `fedqc run` uses. A client that keeps nothing sits out, as it would in `fedqc run`.

A finished training leaves ``done.json`` in its folder with a fingerprint of what it trained (the
config that changes the result, the kept samples' ids and texts, the held-out set): the same
training asked again (``fedqc bench --resume``) is read back instead of run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from fedqc.config import Config
from fedqc.data.samples import Sample
from fedqc.models.loading import LoadedModel, set_adapter_state


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(
                json.dumps(
                    {"id": s.id, "prompt": s.prompt, "response": s.response}, ensure_ascii=False
                )
                + "\n"
            )


def arm_folder(name: str) -> str:
    return name.replace("/", "_").replace(":", "-")


def train_arm(
    cfg: Config,
    clients: Sequence[Sequence[Sample]],
    keep: Sequence[np.ndarray],
    eval_path: Path,
    arm_dir: Path,
    stages=None,
) -> dict:
    """Federated LoRA on the kept samples; returns the run's history and its folders.

    ``history``: one row per round (round 0 = the untrained model) with ``eval_loss`` and
    ``eval_ppl``; ``kept``: samples per client; ``adapter``: the final adapter's folder.
    """
    from fedqc.federation.simulation import run_simulation
    from fedqc.pipeline import prepare

    kept = [
        [s for s, k in zip(c, flags, strict=True) if k]
        for c, flags in zip(clients, keep, strict=True)
    ]
    fingerprint = training_fingerprint(cfg, kept, eval_path)
    if (finished := _finished(arm_dir, fingerprint)) is not None:
        return finished
    shutil.rmtree(arm_dir, ignore_errors=True)  # the bench owns this folder
    training = [c for c in kept if c]
    result = {"kept": [len(c) for c in kept], "history": [], "adapter": None}
    if not training:
        return result
    for i, samples in enumerate(training):
        write_samples(arm_dir / "clients" / f"client-{i}.jsonl", samples)
    arm_cfg = cfg.replace(
        **{
            "data.federation": "",
            "data.clients-dir": str(arm_dir / "clients"),
            "data.anchors": "",
            "data.eval": str(eval_path),
            "quality.scorer": "ppl",
            "quality.rule": "drop-fraction:0",
            "quality.shots": 0,  # the selection is made: the scores are not used
        }
    )
    (arm_dir / "run").mkdir()
    arm_cfg = prepare(arm_cfg, arm_dir / "run")
    run_simulation(arm_cfg, arm_cfg.data.num_clients, stages=stages)
    run_dir = Path(arm_cfg.output.run_dir)
    result["history"] = json.loads((run_dir / "metrics.json").read_text())
    result["adapter"] = run_dir / "adapter"
    done = {"fingerprint": fingerprint, "kept": result["kept"], "history": result["history"]}
    (arm_dir / "done.json").write_text(json.dumps(done))
    return result


def training_fingerprint(cfg: Config, kept: Sequence[Sequence[Sample]], eval_path: Path) -> str:
    """SHA-256 of what decides a training's result: the config (not the output paths), each
    client's kept samples and the held-out set."""
    h = hashlib.sha256()
    settings = {k: v for k, v in cfg.to_flat().items() if not k.startswith(("output.", "data."))}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for samples in kept:
        h.update(json.dumps([[s.id, s.prompt, s.response] for s in samples]).encode())
    h.update(Path(eval_path).read_bytes())
    return h.hexdigest()


def _finished(arm_dir: Path, fingerprint: str) -> dict | None:
    """The saved result of this very training, if it finished (None otherwise)."""
    try:
        done = json.loads((arm_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") != fingerprint:
        return None
    adapter = arm_dir / "run" / "adapter"
    return {"kept": done["kept"], "history": done["history"], "adapter": adapter, "reused": True}


def load_adapter(loaded: LoadedModel, folder: Path | None) -> None:
    """Put a saved adapter (PEFT ``save_pretrained``) on the model; None: the initial one."""
    if folder is None:
        loaded.reset_adapter()
    else:
        set_adapter_state(loaded.model, load_file(str(folder / "adapter_model.safetensors")))
