"""Per-sample LoRA gradient statistics from one batched forward+backward per batch.

The engine hooks the ``lora_A`` and ``lora_B`` Linear layers of every adapted module. Per batch it
runs one forward pass (``batch_nll``, output head on response positions only) and one backward pass
of the loss Σ_i mean_t ℓ_it, the sum of per-sample token means, so that each sample's gradient is
the gradient of its own token-mean loss (HF's batched loss, a token mean over the whole batch, would
weight samples by their lengths). The backward pass asks autograd only for the gradients of the
LoRA factors' outputs; with the inputs captured in the forward hooks they give every sample's
LoRA weight gradients, one batched matrix product per factor:

    ∇A_i = Σ_t (∂L/∂h_it) x_itᵀ        h = A x        (r × d_in)
    ∇B_i = Σ_t (∂L/∂o_it) h_itᵀ        o = B h        (d_out × r)

(the LoRA scaling is inside ∂L/∂o). These per-sample gradients exist for one factor of one batch
at a time, in float32, and are reduced at once to what the scorers need: squared norms, dot products
with D given directions, per-block versions of both (DataInf), optionally after LESS's one-step Adam
transform Γ = m̃/√(ṽ+ε). Nothing of size samples × LoRA parameters is ever kept, no gradient is
flattened into a dictionary, and no sample is run alone.

Parameter names and order. A LoRA weight is named by its key in ``get_adapter_state`` (PEFT's
adapter state dict, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). The
flat order is the order of those keys (the model's module order, A before B in each module);
:func:`lora_blocks` lists it, :func:`flatten` / :func:`unflatten` convert. Directions and Adam
moments are given by these names (or as flat vectors in this order) and are shape-checked.

The model is put in eval mode (LoRA dropout off) for every pass.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from fedqc.data.encoding import Batch, Encoded, format_prompt, token_budget_batches
from fedqc.errors import FedqcError
from fedqc.models.likelihood import batch_nll
from fedqc.models.loading import get_adapter_state, set_adapter_state
from fedqc.models.placement import model_placement

ADAM_BETAS = (0.9, 0.999)  # LESS / CLUES (HF AdamW defaults)
ADAM_EPS = 1e-8  # inside the square root, as in LESS and CLUES

Moments = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (exp_avg m, exp_avg_sq v)
Directions = Mapping[str, torch.Tensor] | torch.Tensor  # by name, or flat in lora_blocks order


# ---------------------------------------------------------------------------------------------
# LoRA blocks: names, shapes, order


@dataclass(frozen=True)
class LoraBlock:
    """One LoRA weight matrix (a DataInf "block")."""

    name: str  # key in get_adapter_state
    shape: tuple[int, int]
    layer: int  # index of its adapted module in LoraHooks.layers
    factor: str  # "A" or "B"

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def _lora_layers(model: PeftModel) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(module name, lora_A Linear, lora_B Linear) of each adapted module, in module order."""
    adapter = model.active_adapter
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        a, b = lora_a[adapter], module.lora_B[adapter]
        if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
            raise FedqcError(f"{name}: gradient scoring supports LoRA on Linear layers only")
        if (
            adapter in getattr(module, "lora_variant", {})
            or b.bias is not None
            or a.bias is not None
        ):
            raise FedqcError(
                f"{name}: gradient scoring supports plain LoRA (no DoRA, no LoRA bias)"
            )
        layers.append((name, a, b))
    if not layers:
        raise FedqcError("the model has no LoRA layers to take gradients of")
    return layers


def lora_blocks(model: PeftModel) -> list[LoraBlock]:
    """The LoRA weights in the fixed flat order (the keys of ``get_adapter_state``)."""
    adapter = model.active_adapter
    index = {}
    for i, (name, a, b) in enumerate(_lora_layers(model)):
        index[f"{name}.lora_A.{adapter}.weight".replace(f".{adapter}", "")] = (i, "A", a)
        index[f"{name}.lora_B.{adapter}.weight".replace(f".{adapter}", "")] = (i, "B", b)
    keys = list(get_peft_model_state_dict(model).keys())
    if sorted(keys) != sorted(index):
        raise FedqcError("the adapter state has weights other than plain LoRA A/B matrices")
    return [LoraBlock(k, tuple(index[k][2].weight.shape), index[k][0], index[k][1]) for k in keys]


def flatten(named: Mapping[str, torch.Tensor], blocks: Sequence[LoraBlock]) -> torch.Tensor:
    """A name → tensor dict as one float32 (P,) vector; (D, P) if the tensors have a leading D."""
    parts = as_directions(named, blocks)
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    single = tuple(torch.as_tensor(named[blocks[0].name]).shape) == blocks[0].shape
    return flat[0] if single else flat


def unflatten(flat: torch.Tensor, blocks: Sequence[LoraBlock]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten`: a (P,) or (D, P) tensor as name → (shape) or (D, *shape)."""
    squeeze = flat.ndim == 1
    flat = flat.reshape(1, -1) if squeeze else flat
    total = sum(b.size for b in blocks)
    if flat.shape[1] != total:
        raise FedqcError(f"flat vector has {flat.shape[1]} entries, the LoRA weights {total}")
    out, start = {}, 0
    for b in blocks:
        part = flat[:, start : start + b.size].reshape(flat.shape[0], *b.shape)
        out[b.name] = part[0] if squeeze else part
        start += b.size
    return out


def _shaped(named: Mapping[str, torch.Tensor], block: LoraBlock, lead: bool) -> torch.Tensor:
    """``named[block.name]`` as float32, shape-checked; with ``lead`` always (D, *shape)."""
    if block.name not in named:
        raise FedqcError(f"no entry for LoRA weight '{block.name}'")
    t = torch.as_tensor(named[block.name]).detach().to(torch.float32)
    if tuple(t.shape) == block.shape:
        return t.unsqueeze(0) if lead else t
    if lead and t.ndim == 3 and tuple(t.shape[1:]) == block.shape:
        return t
    raise FedqcError(f"'{block.name}': shape {tuple(t.shape)} does not fit {block.shape}")


def as_directions(directions: Directions, blocks: Sequence[LoraBlock]) -> list[torch.Tensor]:
    """Per block, a float32 (D, *shape) tensor; from a name dict or a flat (P,)/(D, P) vector."""
    if isinstance(directions, torch.Tensor):
        directions = unflatten(directions, blocks)
    extra = set(directions) - {b.name for b in blocks}
    if extra:
        raise FedqcError(f"directions name weights this model lacks: {sorted(extra)[:3]}")
    per_block = [_shaped(directions, b, lead=True) for b in blocks]
    if len({d.shape[0] for d in per_block}) != 1:
        raise FedqcError("directions have different leading sizes across LoRA weights")
    return per_block


def stack_directions(directions: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several name→tensor directions as one name → (D, *shape) dict."""
    return {k: torch.stack([d[k] for d in directions]) for k in directions[0]}


def moments_from_optimizer(
    model: PeftModel, optimizer: torch.optim.Optimizer
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adam(W) moments (exp_avg, exp_avg_sq) of the LoRA weights, by name, never by position.

    The optimizer's state is keyed by parameter object; it is matched to ``named_parameters`` and
    renamed to the adapter-state keys, so parameter groups or orderings cannot mix blocks up.
    """
    adapter = model.active_adapter
    out = {}
    for pname, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state:
            continue
        key = pname.replace(f".{adapter}", "")
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.shape != p.shape or v.shape != p.shape:
            raise FedqcError(f"'{pname}': Adam moments do not have the parameter's shape")
        out[key] = (m.detach().float().cpu().clone(), v.detach().float().cpu().clone())
    return out


# ---------------------------------------------------------------------------------------------
# The hook engine


class LoraHooks:
    """Forward hooks on every LoRA factor; per-sample gradients of one batch, block by block.

    Use as a context manager (the hooks exist only inside it)::

        with LoraHooks(model) as hooks:
            for batch in batches:
                grads = hooks.backward(batch)          # one forward + one backward
                for block, g in grads.blocks():        # g: (rows, *block.shape) float32
                    ...
    """

    def __init__(self, model: PeftModel):
        self.model = model
        self.layers = _lora_layers(model)
        self.blocks = lora_blocks(model)
        self._handles: list = []
        self._x: list[torch.Tensor | None] = []
        self._h: list[torch.Tensor | None] = []
        self._o: list[torch.Tensor | None] = []

    def __enter__(self) -> LoraHooks:
        self._reset()
        for i, (_, a, b) in enumerate(self.layers):
            self._handles.append(a.register_forward_hook(self._hook_a(i)))
            self._handles.append(b.register_forward_hook(self._hook_b(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reset()

    def _reset(self) -> None:
        n = len(self.layers)
        self._x, self._h, self._o = [None] * n, [None] * n, [None] * n

    def _hook_a(self, i: int) -> Callable:
        def hook(_module, args, out):
            if self._h[i] is not None:
                raise FedqcError(f"{self.layers[i][0]} ran twice in one forward pass")
            self._x[i], self._h[i] = args[0], out

        return hook

    def _hook_b(self, i: int) -> Callable:
        def hook(_module, _args, out):
            self._o[i] = out

        return hook

    def backward(self, batch: Batch) -> BatchGrads:
        """One forward and one backward over ``batch``; eval mode, sum of per-sample token means."""
        self.model.eval()
        self._reset()
        with torch.enable_grad():
            sums, counts = batch_nll(self.model, batch)
            loss = sums / counts.clamp(min=1)
            outputs = [t for pair in zip(self._h, self._o, strict=True) for t in pair]
            if any(t is None for t in outputs):
                raise FedqcError("a LoRA layer did not run in the forward pass")
            grads = torch.autograd.grad(
                loss.sum(), outputs, allow_unused=True, materialize_grads=True
            )
        result = BatchGrads(
            self,
            batch,
            loss.detach(),
            counts,
            [x.detach() for x in self._x],
            [h.detach() for h in self._h],
            list(grads[0::2]),
            list(grads[1::2]),
        )
        self._reset()
        return result


@dataclass
class BatchGrads:
    """What one batch left behind: per-sample losses and the captured factors of every layer."""

    hooks: LoraHooks
    batch: Batch
    loss: torch.Tensor  # (rows,) token-mean response loss
    counts: torch.Tensor  # (rows,) response tokens
    x: list[torch.Tensor]  # per layer: lora_A input (rows, T, d_in)
    h: list[torch.Tensor]  # per layer: lora_A output = lora_B input (rows, T, r)
    grad_h: list[torch.Tensor]  # per layer: ∂L/∂h (rows, T, r)
    grad_o: list[torch.Tensor]  # per layer: ∂L/∂(lora_B output) (rows, T, d_out)

    def block(self, block: LoraBlock) -> torch.Tensor:
        """Per-sample gradients of one LoRA weight: (rows, *block.shape), float32."""
        i = block.layer
        if block.factor == "A":
            return torch.bmm(self.grad_h[i].float().transpose(1, 2), self.x[i].float())
        return torch.bmm(self.grad_o[i].float().transpose(1, 2), self.h[i].float())

    def blocks(self) -> Iterator[tuple[int, LoraBlock, torch.Tensor]]:
        """(block index, block, per-sample gradients), one block at a time."""
        for j, b in enumerate(self.hooks.blocks):
            yield j, b, self.block(b)


def adam_transform(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, betas=ADAM_BETAS, eps: float = ADAM_EPS
) -> torch.Tensor:
    """LESS's one-step Adam update direction Γ = m̃/√(ṽ+ε), elementwise, broadcast over rows."""
    b1, b2 = betas
    return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)


# ---------------------------------------------------------------------------------------------
# Reductions over a data set


@dataclass
class GradStats:
    """Per-sample statistics, in input order (float64). ``g`` is Γ(g) when moments were given."""

    blocks: list[LoraBlock]
    loss: np.ndarray  # (n,) token-mean response loss ℓ(r|q)
    sq_norm: np.ndarray  # (n,) ‖g‖²
    dots: np.ndarray  # (n, D) ⟨g, d_j⟩ (D = 0 without directions)
    block_sq_norm: np.ndarray | None = None  # (n, L) ‖g_l‖², with per_block
    block_dots: np.ndarray | None = None  # (n, L, D) ⟨g_l, d_jl⟩, with per_block
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def per_sample_stats(
    model: PeftModel,
    encoded: list[Encoded],
    pad_id: int,
    *,
    directions: Directions | None = None,
    moments: Moments | None = None,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
    per_block: bool = False,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> GradStats:
    """Squared norms and dot products with ``directions`` of every sample's LoRA gradient.

    ``directions``: D vectors, as name → (D, *shape) (or (*shape) for D = 1) or a flat (D, P)
    tensor in :func:`lora_blocks` order. ``moments``: Adam (m, v) by name; then every statistic is
    of Γ = m̃/√(ṽ+ε) instead of g (the directions stay as given). ``per_block`` adds the
    statistics per LoRA weight.
    """
    device = model_placement(model).device
    with LoraHooks(model) as hooks:
        blocks = hooks.blocks
        dirs = None
        if directions is not None:
            dirs = [d.to(device) for d in as_directions(directions, blocks)]
        mom = None
        if moments is not None:
            mom = [
                tuple(_shaped({b.name: mv}, b, lead=False).to(device) for mv in _pair(moments, b))
                for b in blocks
            ]
        n, nb, nd = len(encoded), len(blocks), (dirs[0].shape[0] if dirs else 0)
        loss, sq = np.zeros(n), np.zeros(n)
        counts = np.zeros(n, dtype=np.int64)
        dots = np.zeros((n, nd))
        bsq = np.zeros((n, nb)) if per_block else None
        bdots = np.zeros((n, nb, nd)) if per_block else None
        for batch in token_budget_batches(encoded, batch_tokens, pad_id):
            grads = hooks.backward(batch)
            rows = batch.indices
            b_sq = torch.zeros(len(rows), nb, dtype=torch.float64, device=device)
            b_dot = torch.zeros(len(rows), nb, nd, dtype=torch.float64, device=device)
            for j, _b, g in grads.blocks():
                if mom is not None:
                    g = adam_transform(g, *mom[j], betas, eps)
                flat = g.reshape(g.shape[0], -1)
                b_sq[:, j] = flat.pow(2).sum(1).double()
                if dirs is not None:
                    b_dot[:, j] = (flat @ dirs[j].reshape(nd, -1).T).double()
            b_sq, b_dot = b_sq.cpu(), b_dot.cpu()
            loss[rows] = grads.loss.double().cpu().numpy()
            counts[rows] = grads.counts.cpu().numpy()
            sq[rows] = b_sq.sum(1).numpy()
            dots[rows] = b_dot.sum(1).numpy()
            if per_block:
                bsq[rows] = b_sq.numpy()
                bdots[rows] = b_dot.numpy()
            if on_batch is not None:
                on_batch(len(rows))
    return GradStats(blocks, loss, sq, dots, bsq, bdots, counts)


def _pair(moments: Moments, block: LoraBlock) -> tuple[torch.Tensor, torch.Tensor]:
    if block.name not in moments:
        raise FedqcError(f"Adam moments lack LoRA weight '{block.name}'")
    m, v = moments[block.name]
    return m, v


def gradient_sum(
    model: PeftModel,
    encoded: list[Encoded],
    pad_id: int,
    *,
    weights: np.ndarray | None = None,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_i w_i g_i by LoRA weight name (float32), from the same engine as the per-sample stats.

    ``weights``: None (all 1), (n,) per sample, or (n, L) per sample and LoRA block (DataInf).
    Each sample's contribution is its own outer-product sum; nothing is summed over the batch
    before the product (that would add cross-sample terms).
    """
    device = model_placement(model).device
    with LoraHooks(model) as hooks:
        blocks = hooks.blocks
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=device)
            w = w.reshape(len(encoded), -1).expand(len(encoded), len(blocks))
        out = {b.name: torch.zeros(b.shape, dtype=torch.float64, device=device) for b in blocks}
        for batch in token_budget_batches(encoded, batch_tokens, pad_id):
            grads = hooks.backward(batch)
            for j, b in enumerate(blocks):
                i = b.layer
                left, right = (
                    (grads.grad_h[i], grads.x[i])
                    if b.factor == "A"
                    else (grads.grad_o[i], grads.h[i])
                )
                left = left.float()
                if weights is not None:
                    left = left * w[batch.indices, j].view(-1, 1, 1)
                # Σ_i w_i Σ_t δ_it x_itᵀ: one matrix product over all (sample, token) rows
                rows = right.float().reshape(-1, right.shape[-1])
                out[b.name] += (left.reshape(-1, left.shape[-1]).T @ rows).double()
            if on_batch is not None:
                on_batch(len(batch.indices))
    return {k: v.float().cpu() for k, v in out.items()}


def mean_gradient(
    model: PeftModel,
    encoded: list[Encoded],
    pad_id: int,
    *,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """(1/n) Σ_i ∇ℓ_i, the mean per-sample gradient (server side: anchors' ḡ at a checkpoint)."""
    if not encoded:
        raise FedqcError("no samples to take a mean gradient of")
    total = gradient_sum(model, encoded, pad_id, batch_tokens=batch_tokens, on_batch=on_batch)
    return {k: v / len(encoded) for k, v in total.items()}  # float32, summed in float64


# ---------------------------------------------------------------------------------------------
# Checkpoints and the fingerprint that ties anchors and clients to the same ones


@dataclass
class Checkpoint:
    """A warm-up checkpoint θ_k: the global LoRA adapter after a warm-up round and its LR η_k.

    ``moments`` are Adam (m, v) by adapter-state name from the holder's own warm-up steps
    (clues only). They are local to their holder and not part of the fingerprint.
    """

    adapter: dict[str, torch.Tensor]
    lr: float
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@contextmanager
def applied(model: PeftModel, adapter: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Load ``adapter`` into the model for the block; the previous adapter comes back after."""
    saved = get_adapter_state(model)
    set_adapter_state(model, dict(adapter))
    try:
        yield
    finally:
        set_adapter_state(model, saved)


def template_signature(tokenizer) -> str:
    """How a sample becomes tokens: the prompt format around a placeholder, EOS and vocab size."""
    return (
        f"{format_prompt(tokenizer, '{instruction}')}|eos={tokenizer.eos_token_id}"
        f"|pad={tokenizer.pad_token_id}|vocab={len(tokenizer)}"
    )


@dataclass(frozen=True)
class ScoringSettings:
    """Everything besides the checkpoints that changes a checkpoint-based score."""

    scorer: str
    max_length: int
    template: str  # template_signature(tokenizer)
    adam_betas: tuple[float, float] = ADAM_BETAS
    adam_eps: float = ADAM_EPS
    datainf_damping: float = 0.1  # λ_l = damping · mean_i mean(g_il²) (DataInf's 1/10)
    icl_prefix_tokens: int = 2048  # token budget of the anchors' prefix (icl)

    @classmethod
    def for_model(cls, tokenizer, scorer: str, max_length: int, **kw) -> ScoringSettings:
        return cls(scorer, max_length, template_signature(tokenizer), **kw)


def fingerprint(checkpoints: Sequence[Checkpoint], settings: ScoringSettings) -> str:
    """SHA-256 over the checkpoints' arrays and LRs and the scoring settings.

    The server sends it with the anchor directions; a client recomputes it from its own copy of the
    checkpoints and settings and scores only if it matches (:func:`check_fingerprint`).
    """
    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(f"|K={len(checkpoints)}".encode())
    for k, ckpt in enumerate(checkpoints):
        if not math.isfinite(ckpt.lr):
            raise FedqcError(f"checkpoint {k}: learning rate {ckpt.lr} is not finite")
        h.update(f"|ckpt{k}|lr={float(ckpt.lr).hex()}".encode())
        for name in sorted(ckpt.adapter):
            t = ckpt.adapter[name].detach().to(torch.float32).contiguous().cpu()
            h.update(f"|{name}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_fingerprint(
    expected: str, checkpoints: Sequence[Checkpoint], settings: ScoringSettings
) -> None:
    """Raise unless these checkpoints and settings are the ones ``expected`` was computed from."""
    got = fingerprint(checkpoints, settings)
    if got != expected:
        raise FedqcError(
            f"scoring fingerprint mismatch: the anchors were scored under {expected[:12]}…, this "
            f"side has {got[:12]}… ({len(checkpoints)} checkpoints, scorer '{settings.scorer}', "
            f"max_length {settings.max_length}); checkpoints, learning rates, template or "
            "settings differ, so the scores would not be comparable"
        )
