"""quality.model: a scoring model separate from the trained one (Superfiltering's proxy scorer)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import save_tiny_llama
from safetensors.torch import load_file

from fedqc.bench.config import load_bench_config
from fedqc.bench.pool import split_data
from fedqc.bench.run import run_bench
from fedqc.config import Config
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.simulation import run_simulation
from fedqc.models.loading import load
from fedqc.pipeline import check_inputs, new_run_dir, prepare
from fedqc.quality.plan import check_scoring_model
from fedqc.scoring.scorers import get_scorer, score_samples


@pytest.fixture(scope="module")
def scorer_model_dir(tmp_path_factory, smollm2_dir):
    """Another random Llama, narrower than the trained tiny one: its adapter cannot be mixed up."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-scorer"), smollm2_dir, 32, seed=1)


def _config(tiny_model_dir, demo_dir, **extra) -> Config:
    return Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 128,
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "quality.scorer": "ifd",
            "quality.rule": "anchor-quantile:0.5",
            "quality.shots": 0,
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            **extra,
        }
    )


def test_scoring_model_defaults_to_the_trained_model():
    cfg = Config()
    assert cfg.scoring_model() == cfg.model and not cfg.separate_scorer
    cfg.set("quality.model", "gemma3-270m")
    assert cfg.scoring_model().name == "gemma3-270m" and cfg.separate_scorer
    assert cfg.scoring_model().max_length == cfg.model.max_length
    cfg.set("quality.model", cfg.model.name)
    assert not cfg.separate_scorer


@pytest.mark.parametrize(
    ("scorers", "curriculum", "message"),
    [
        (["ppl", "tracin"], "off", "scorer 'tracin' scores at the trained model's warm-up"),
        (["ppl"], "stages:3", "use stages:3:once"),
    ],
)
def test_a_separate_scoring_model_refuses_what_needs_the_trained_adapter(
    scorers, curriculum, message
):
    with pytest.raises(FedqcError, match=message):
        check_scoring_model(scorers, curriculum, "big-judge", "small-model")
    check_scoring_model(scorers, curriculum, "small-model", "small-model")  # same model: fine
    check_scoring_model(["ppl", "ifd"], "stages:3:once", "big-judge", "small-model")


def test_check_inputs_loads_the_scoring_model(tiny_model_dir, demo_dir, tmp_path):
    cfg = _config(tiny_model_dir, demo_dir, **{"quality.model": str(tmp_path / "missing")})
    with pytest.raises(FedqcError, match="missing"):
        check_inputs(cfg)


def test_clients_score_with_the_scoring_model_and_train_the_other(
    tmp_path, tiny_model_dir, scorer_model_dir, demo_dir
):
    run_dir = new_run_dir(str(tmp_path / "run"), force=False)
    cfg = _config(tiny_model_dir, demo_dir, **{"quality.model": str(scorer_model_dir)})
    check_inputs(cfg)
    cfg = prepare(cfg, run_dir)
    run_simulation(cfg, cfg.data.num_clients)

    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["model"] == str(scorer_model_dir)
    samples = load_samples(demo_dir / "clients" / "client-0.jsonl")
    reported = [
        json.loads(line)["score"]
        for line in (run_dir / "clients" / "client-0" / "scores.jsonl").read_text().splitlines()
    ]

    def scores_of(model_cfg) -> np.ndarray:
        return np.asarray(score_samples(load(model_cfg), samples, get_scorer("ifd"), 128).raw)

    np.testing.assert_allclose(reported, scores_of(cfg.scoring_model()), rtol=1e-5)
    assert not np.allclose(reported, scores_of(cfg.model), rtol=1e-3)
    # The adapter that trained is the trained model's (hidden 64), not the scorer's (hidden 32).
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if "lora_A" in k)
    assert a.shape[1] == 64


def test_the_bench_scores_its_pool_with_the_scoring_model(
    tmp_path, tiny_model_dir, scorer_model_dir
):
    cfg, bench = load_bench_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"quality.model={scorer_model_dir}",
            "quality.shots=0",
            "model.max-length=96",
            "data.num-clients=2",
            "data.samples-per-client=10",
            "data.num-anchors=3",
            "data.num-eval=3",
            "data.contamination=0.2,0.6",
            "bench.scorers=ppl",
            "bench.rules=anchor-mean",
            "bench.anchor-sweep=2",
            "bench.anchor-repeats=1",
            "bench.em-questions=0",
            "bench.train=none",
        ],
    )
    bench.check(cfg)
    (tmp_path / "bench").mkdir()
    run_bench(cfg, bench, tmp_path / "bench", command="fedqc bench (test)")
    with open(tmp_path / "bench" / "scores.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r["corruption"]]
    data = split_data(cfg, bench)
    clean = {s.id: s for s in data.items}
    samples = [clean[r["id"]] for r in rows]
    reported = [float(r["ppl"]) for r in rows]

    def ppl_of(model_cfg) -> list[float]:
        return score_samples(load(model_cfg), samples, get_scorer("ppl"), 96).raw

    np.testing.assert_allclose(reported, ppl_of(cfg.scoring_model()), rtol=1e-5)
    assert not np.allclose(reported, ppl_of(cfg.model), rtol=1e-3)
    setup = (tmp_path / "bench" / "results.md").read_text()
    assert f"| scoring model | {scorer_model_dir} (quality.model) |" in setup
