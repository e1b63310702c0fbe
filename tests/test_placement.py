"""model.device and model.dtype: how they resolve, and that every path computes in them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedqc.config import CHOICES, Config, ModelConfig, load_config
from fedqc.data.encoding import collate, encode_all
from fedqc.data.samples import load_samples
from fedqc.errors import FedqcError
from fedqc.federation.simulation import run_simulation
from fedqc.models import placement
from fedqc.models.likelihood import batch_nll, response_losses
from fedqc.models.loading import get_adapter_state, load
from fedqc.pipeline import check_inputs, new_run_dir, prepare
from fedqc.scoring.gradient import applied, mean_gradient, per_sample_stats
from fedqc.train.local import evaluate, train_steps_with_optimizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_the_cpu_without_an_accelerator(no_accelerator):
    assert placement.resolve_device("auto") == torch.device("cpu")
    assert placement.resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement.resolve_device("auto") == torch.device("cuda", 0)
    assert placement.resolve_device("cuda") == torch.device("cuda", 0)
    assert placement.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FedqcError, match=r"'cuda:2' but this machine has 2 CUDA GPU"):
        placement.resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_a_missing_device_is_one_clear_line(no_accelerator, name):
    with pytest.raises(FedqcError, match=rf"^model.device: '{name}' but .*; .*cpu$") as err:
        placement.resolve_device(name)
    assert "\n" not in str(err.value)


CPU_CAPS = [
    ({}, torch.float32),
    ({"avx512_bf16": True}, torch.bfloat16),
    ({"amx_bf16": True}, torch.bfloat16),
]


@pytest.mark.parametrize("caps, expected", CPU_CAPS)
def test_auto_scores_in_float32_and_trains_in_native_bf16_on_cpu(monkeypatch, caps, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    auto = placement.resolve("cpu", "auto")
    assert auto.dtype == torch.float32 and auto.train_dtype == expected
    half = placement.resolve("cpu", "float16")
    assert half.dtype == half.train_dtype == torch.float16


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_trains_in_bf16_where_the_gpu_has_it(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    auto = placement.resolve("cuda", "auto")
    assert auto.dtype == torch.float32
    assert auto.train_dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_config_names_the_bad_device_or_dtype():
    with pytest.raises(FedqcError, match=r"'model.device' must be one of auto, cpu, cuda, cuda:N"):
        load_config(None, ["model.device=gpu"])
    with pytest.raises(FedqcError, match=r"'model.dtype' must be one of auto, float32, bfloat16"):
        load_config(None, ["model.dtype=half"])
    with pytest.raises(FedqcError, match=r"'federation.client-gpus' must be ≥ 0"):
        load_config(None, ["federation.client-gpus=-1"])
    assert load_config(None, ["model.device=cuda:3"]).model.device == "cuda:3"
    assert set(CHOICES["model.dtype"]) == {"auto", *placement.DTYPES}  # one list of dtypes


def test_client_gpus_without_cuda_stop_before_anything_is_written(no_accelerator):
    cfg = load_config(None, ["federation.client-gpus=0.5"])
    with pytest.raises(FedqcError, match=r"federation.client-gpus = 0.5, but torch .* no CUDA GPU"):
        check_inputs(cfg)


@pytest.fixture(scope="module")
def samples(demo_dir):
    return load_samples(demo_dir / "clients" / "client-0.jsonl")


def _loaded(tiny_model_dir, dtype: str, device: str = "cpu"):
    return load(ModelConfig(name=str(tiny_model_dir), max_length=128, device=device, dtype=dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_scoring_runs_in_the_dtype_and_sums_in_float32(tiny_model_dir, samples, dtype):
    low = _loaded(tiny_model_dir, dtype)
    lm = low.model.get_base_model()
    assert lm.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert low.placement.dtype == getattr(torch, dtype)
    assert all(p.dtype == torch.float32 for p in low.model.parameters() if p.requires_grad)
    assert all(v.dtype == torch.float32 for v in low.initial_adapter.values())
    enc = encode_all(low.tokenizer, samples, 128)
    sums, counts = batch_nll(low.model, collate(enc[:3], [0, 1, 2], low.tokenizer.pad_token_id))
    assert sums.dtype == torch.float32
    low_losses = response_losses(low.model, enc, low.tokenizer.pad_token_id)
    full = _loaded(tiny_model_dir, "float32")
    full_losses = response_losses(full.model, enc, full.tokenizer.pad_token_id)
    for a, b in zip(low_losses, full_losses, strict=True):
        assert a.dtype == np.float64 or a.dtype == np.int64
        np.testing.assert_allclose(a, b, rtol=0.02)


def test_training_keeps_lora_and_adam_in_float32_under_autocast(tiny_model_dir, samples):
    low = _loaded(tiny_model_dir, "bfloat16")
    enc = encode_all(low.tokenizer, samples, 128)
    seen = []
    q = next(m for n, m in low.model.named_modules() if n.endswith("q_proj.base_layer"))
    handle = q.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        loss, optimizer = train_steps_with_optimizer(
            low.model, enc, low.tokenizer.pad_token_id, 2, 2, 1e-3, gradient_checkpointing=True
        )
    finally:
        handle.remove()
    assert np.isfinite(loss) and seen and set(seen) == {torch.bfloat16}
    assert not low.model.get_base_model().is_activation_checkpointing  # switched off after
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    adapter = get_adapter_state(low.model)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(not torch.equal(adapter[k], low.initial_adapter[k]) for k in adapter)
    assert evaluate(low.model, enc, low.tokenizer.pad_token_id)["eval_loss"] > 0


@pytest.fixture
def scalers(monkeypatch) -> list:
    """Every torch.amp.GradScaler that training makes, with the calls made on it, in order."""
    made = []

    class Recording(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[str] = []
            self.device_type = args[0] if args else kwargs.get("device", "cuda")
            made.append(self)

        def scale(self, outputs):
            self.calls.append("scale")
            scaled = super().scale(outputs)
            if self.is_enabled():  # the loss that backward sees is the loss times the scale
                torch.testing.assert_close(scaled, outputs * self.get_scale())
            return scaled

        def step(self, optimizer, *args, **kwargs):
            self.calls.append("step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None) -> None:
            self.calls.append("update")
            super().update(new_scale)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    return made


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_float16_training_uses_a_gradient_scaler(tiny_model_dir, samples, scalers, device):
    """float16 gradients underflow without loss scaling: training must scale the loss, step the
    optimizer through the scaler (which unscales, and skips a step with inf/NaN) and update it."""
    low = _loaded(tiny_model_dir, "float16", device)
    enc = encode_all(low.tokenizer, samples, 128)
    loss, _ = train_steps_with_optimizer(low.model, enc, low.tokenizer.pad_token_id, 2, 2, 1e-3)
    (scaler,) = scalers
    assert scaler.is_enabled() and scaler.device_type == device
    assert scaler.calls == ["scale", "step", "update"] * 2
    assert np.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in get_adapter_state(low.model).values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_and_bfloat16_training_scale_nothing(tiny_model_dir, samples, scalers, dtype):
    """bf16 has float32's exponent range: no loss scaling (a scaler there would be disabled)."""
    loaded = _loaded(tiny_model_dir, dtype)
    enc = encode_all(loaded.tokenizer, samples, 128)
    train_steps_with_optimizer(loaded.model, enc, loaded.tokenizer.pad_token_id, 1, 2, 1e-3)
    assert not any(s.is_enabled() for s in scalers)


def test_auto_on_native_bf16_trains_float32_weights_under_bf16_autocast(
    monkeypatch, tiny_model_dir, samples
):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    auto = _loaded(tiny_model_dir, "auto")
    assert auto.placement.describe() == {
        "device": "cpu",
        "dtype": "float32",
        "train_dtype": "bfloat16",
    }
    assert auto.model.get_base_model().model.embed_tokens.weight.dtype == torch.float32
    enc = encode_all(auto.tokenizer, samples, 128)
    seen = []
    q = next(m for n, m in auto.model.named_modules() if n.endswith("q_proj.base_layer"))
    handle = q.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        response_losses(auto.model, enc[:2], auto.tokenizer.pad_token_id)
        assert set(seen) == {torch.float32}  # scoring: float32, the decisions of float32
        seen.clear()
        train_steps_with_optimizer(
            auto.model, enc, auto.tokenizer.pad_token_id, 1, 2, 1e-3, placement=auto.placement
        )
        assert set(seen) == {torch.bfloat16}  # training: bf16 autocast
    finally:
        handle.remove()


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, samples):
    full = _loaded(tiny_model_dir, "float32")
    enc = encode_all(full.tokenizer, samples, 128)
    results = []
    for checkpointing in (False, True):
        full.reset_adapter()
        train_steps_with_optimizer(
            full.model, enc, full.tokenizer.pad_token_id, 2, 2, 1e-3, 0.0, 0, checkpointing
        )
        results.append(get_adapter_state(full.model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_gradient_scorers_run_in_the_dtype(tiny_model_dir, samples):
    out = {}
    for dtype in ("float32", "bfloat16"):
        loaded = _loaded(tiny_model_dir, dtype)
        g = torch.Generator().manual_seed(0)
        adapter = {
            k: v + 1e-2 * torch.randn(v.shape, generator=g)
            for k, v in loaded.initial_adapter.items()
        }
        enc = encode_all(loaded.tokenizer, samples, 128)
        pad = loaded.tokenizer.pad_token_id
        with applied(loaded.model, adapter):
            g_bar = mean_gradient(loaded.model, enc[:4], pad)
            assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in g_bar.values())
            out[dtype] = per_sample_stats(loaded.model, enc, pad, directions=g_bar)
    assert np.all(np.isfinite(out["bfloat16"].dots))
    corr = np.corrcoef(out["float32"].dots[:, 0], out["bfloat16"].dots[:, 0])[0, 1]
    assert corr > 0.95


def test_a_bfloat16_federation_records_what_it_used(tmp_path, tiny_model_dir, demo_dir):
    run_dir = new_run_dir(str(tmp_path / "r"), force=False)
    cfg = Config.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.max-length": 512,  # the demo's anchors whole: end-loss needs their end
            "model.dtype": "bfloat16",
            "model.device": "cpu",
            "data.clients-dir": str(demo_dir / "clients"),
            "data.anchors": str(demo_dir / "anchors.jsonl"),
            "data.eval": str(demo_dir / "eval.jsonl"),
            "quality.scorer": "ensemble-min:cond-prob+ifd+end-loss",
            "train.rounds": 1,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "train.gradient-checkpointing": True,
        }
    )
    cfg = prepare(cfg, run_dir)
    toml = (run_dir / "config.toml").read_text()
    assert 'dtype = "bfloat16"  # this machine: bfloat16, training in bfloat16' in toml
    assert 'device = "cpu"  # this machine: cpu' in toml
    assert load_config(run_dir / "config.toml") == cfg  # the comments do not change the config
    run_simulation(cfg, cfg.data.num_clients)
    used = {"device": "cpu", "dtype": "bfloat16", "train_dtype": "bfloat16"}
    assert json.loads((run_dir / "threshold.json").read_text())["placement"] == used
    for client in ("client-0", "client-1"):
        local = json.loads((run_dir / "clients" / client / "selection.json").read_text())
        assert local["placement"] == used
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["round"] for m in metrics] == [0, 1] and np.isfinite(metrics[-1]["eval_loss"])


@needs_cuda
def test_cuda_scores_match_the_cpu(tiny_model_dir, samples):
    cpu = _loaded(tiny_model_dir, "float32")
    enc = encode_all(cpu.tokenizer, samples, 128)
    want = response_losses(cpu.model, enc, cpu.tokenizer.pad_token_id)
    gpu = _loaded(tiny_model_dir, "float32", "cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    got = response_losses(gpu.model, enc, gpu.tokenizer.pad_token_id)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3)


@needs_cuda
def test_cuda_trains_and_scores_gradients(tiny_model_dir, samples):
    gpu = _loaded(tiny_model_dir, "auto", "cuda")
    enc = encode_all(gpu.tokenizer, samples, 128)
    pad = gpu.tokenizer.pad_token_id
    loss, _ = train_steps_with_optimizer(gpu.model, enc, pad, 2, 2, 1e-3)
    assert np.isfinite(loss)
    assert all(v.device.type == "cpu" for v in get_adapter_state(gpu.model).values())
    stats = per_sample_stats(gpu.model, enc, pad, directions=mean_gradient(gpu.model, enc, pad))
    assert np.all(np.isfinite(stats.sq_norm))
