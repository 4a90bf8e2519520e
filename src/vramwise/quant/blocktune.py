"""Block-wise output reconstruction after GPTQ: tune one decoder layer's quantization against its output.

GPTQ (quant/gptq.py) minimises each linear's own output error ||X W^T - X Q^T||^2; the errors of q/k/v, o,
gate/up and down then meet in the attention softmax, the SwiGLU and the residual stream, which no per-linear
objective sees. After GPTQ has quantized a decoder layer, this step tunes that layer's quantization parameters
against the whole layer's output on a subset of the calibration windows, with torch autograd over one layer:

    loss = mean (layer_q(x_student) - layer_float(x_teacher))^2        over (tokens, hidden)

  student   the layer with its quantized linears' weights written as  w = code * scale + min  per group,
            on the inputs the *quantized* model gives this layer (the previous layers already tuned);
  teacher   the float layer (before AWQ's fold and GPTQ) on the float model's inputs (target "float"), or on
            the same quantized inputs (target "quant"; then the step only undoes this layer's own error).

What is learned (both keep the packed format unchanged: a group's codes and fp16 scale/min):
  - every group's scale and min (OmniQuant's "learnable weight clipping", here on GPTQ's grid):
    scale = scale0 * exp(a), min = min0 + b * scale0, a and b (K/G, N) from 0, Adam;
  - with rounding=True also a rounding offset v per weight (AutoRound, Cheng et al. 2023, "signed gradient
    descent"): code = clamp(round(code0 + v), 0, 15), v in [-1, 1] from 0, the round passed straight through
    (its gradient taken as 1), v moved by lr * sign(grad) (signSGD), so a code can move one step from
    GPTQ's. AutoRound offsets round(w / s) by v in [-0.5, 0.5]; starting from GPTQ's integer codes instead,
    the offset needs a width of 1 on each side to move a code at all.
Both learning rates decay linearly to 0 over the steps (as AutoRound's). A quarter of the tuning windows is
held out for early stopping (see tune_layer). The kept scales/mins are rounded to fp16 and the codes to
integers, the loss over all the tuning windows is measured once more, and GPTQ's own parameters are kept if
they do better: the step never makes its objective on its calibration data worse.

The layer is run by `layer_forward`, a plain-torch fp32 copy of the Llama decoder layer (RMSNorm, neox rotary,
causal GQA attention through scaled_dot_product_attention, SwiGLU, residuals; fused or separate q/k/v and
gate/up) that takes the quantized weights as arguments: the engine's own forward writes K/V into paged cache
pages and may run Triton kernels, neither of which autograd goes through. tests check the copy against the
engine's layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import PackedWeight, make_int4, make_int8, unpack_int4

log = logging.getLogger(__name__)

__all__ = ["TUNE_TARGETS", "TuneConfig", "TuneResult", "layer_forward", "tune_layer"]

TUNE_TARGETS = ("float", "quant")


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 100  # optimiser steps per decoder layer
    samples: int = 32  # calibration windows used (the first ones; a quarter of them held out)
    batch: int = 2  # windows per step
    lr: float = 5e-3  # Adam, on log(scale) and on min in units of the initial scale
    rounding: bool = False  # also learn a rounding offset per weight (AutoRound-style, see the module doc)
    round_lr: float = 1.5e-2  # signSGD step of the rounding offsets (decayed: at most 0.75 in total over the steps)
    target: str = "float"  # teacher inputs: "float" (float model) or "quant" (the same quantized inputs)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"block tuning needs steps >= 1, got {self.steps}")
        if self.samples < 1 or self.batch < 1:
            raise ValueError(f"block tuning needs samples >= 1 and batch >= 1, got {self.samples} and {self.batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.round_lr > 0 and math.isfinite(self.round_lr)):
            raise ValueError(f"block tuning learning rates must be positive, got lr={self.lr}, "
                             f"round_lr={self.round_lr}")
        if self.target not in TUNE_TARGETS:
            raise ValueError(f"block tuning target must be one of {', '.join(TUNE_TARGETS)}, got {self.target!r}")


@dataclass(frozen=True)
class TuneResult:
    """Layer-output MSE over all the tuning windows with GPTQ's parameters (before) and the kept ones (after)."""

    before: float
    after: float
    tuned: bool  # False: the tuned parameters did no better and GPTQ's were kept


# ------------------------------------------------------------------------------------------------------------
# The decoder layer in plain torch
# ------------------------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary on x (b, s, H, D) with cos/sin (s, 1, D/2) fp32 (models/layers.py's, batched)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def layer_forward(layer: nn.Module, x: torch.Tensor, seq_len: int,
                  weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A Llama decoder layer over independent sequences in fp32, differentiable: x (b * seq_len, hidden),
    each sequence at positions 0..seq_len-1 -> (b * seq_len, hidden). weights: {linear name inside the layer:
    (N, K) weight} replacing those modules' own (the others, the biases and the norms are the layer's)."""
    weights = weights or {}
    attn, mlp = layer.self_attn, layer.mlp

    def lin(name: str, inp: torch.Tensor) -> torch.Tensor:
        mod = layer.get_submodule(name)
        w = weights.get(name)
        w = mod.weight.float() if w is None else w
        return F.linear(inp, w, None if mod.bias is None else mod.bias.float())

    def norm(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (h.shape[-1],), mod.weight.float(), mod.eps)

    t = x.shape[0]
    b = t // seq_len
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = norm(layer.input_layernorm, x)
    if attn.qkv_proj is not None:
        q, k, v = lin("self_attn.qkv_proj", h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    else:
        q, k, v = lin("self_attn.q_proj", h), lin("self_attn.k_proj", h), lin("self_attn.v_proj", h)
    cs = attn.rotary.table(x.device)[:seq_len].float()  # (s, D) = [cos | sin]
    cos, sin = cs[:, None, : d // 2], cs[:, None, d // 2 :]
    q = _rotate(q.reshape(b, seq_len, hq, d), cos, sin).transpose(1, 2)  # (b, Hq, s, D)
    k = _rotate(k.reshape(b, seq_len, hkv, d), cos, sin).transpose(1, 2)  # (b, Hkv, s, D)
    v = v.reshape(b, seq_len, hkv, d).transpose(1, 2)
    if hq != hkv:  # grouped-query attention: each kv head serves hq / hkv query heads
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.attn.scale)  # (b, Hq, s, D)
    x = x + lin("self_attn.o_proj", o.transpose(1, 2).reshape(t, hq * d))
    h = norm(layer.post_attention_layernorm, x)
    if mlp.gate_up_proj is not None:
        gate, up = lin("mlp.gate_up_proj", h).chunk(2, dim=-1)  # [gate | up]
    else:
        gate, up = lin("mlp.gate_proj", h), lin("mlp.up_proj", h)
    return x + lin("mlp.down_proj", F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------------------------


class _Quantized:
    """One packed linear as learnable tensors: w (N, K) = clamp(round(code0 + v)) * scale + min, per group."""

    def __init__(self, packed: PackedWeight, device: torch.device, rounding: bool) -> None:
        self.spec = packed.spec
        self.g = packed.group_size
        self.n, self.k = packed.out_features, packed.in_features
        if packed.spec.bits == 4:
            self.codes0 = unpack_int4(packed.qweight).to(device, torch.float32)  # (N, K)
            self.lo, self.hi = 0.0, 15.0
        else:
            self.codes0 = packed.qweight.t().to(device, torch.float32)  # (N, K)
            self.lo, self.hi = -127.0, 127.0
        self.scale0 = packed.scales.to(device, torch.float32)  # (K/G, N)
        self.min0 = None if packed.mins is None else packed.mins.to(device, torch.float32)
        self.asym = packed.spec.bits == 4 and not packed.spec.symmetric
        self.a = torch.zeros_like(self.scale0, requires_grad=True)  # log scale multiplier
        self.b = torch.zeros_like(self.scale0, requires_grad=True) if self.asym else None  # min shift / scale0
        self.v = torch.zeros_like(self.codes0, requires_grad=True) if rounding else None  # rounding offsets

    def adam_params(self) -> list[torch.Tensor]:
        return [self.a] + ([self.b] if self.b is not None else [])

    def params(self, final: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scale (K/G, N), min (K/G, N) or None, codes (N, K)); final: fp16-rounded scale/min, integer codes,
        no graph."""
        scale = self.scale0 * torch.exp(self.a)
        if self.asym:
            mn = self.min0 + self.b * self.scale0  # type: ignore[operator]
        elif self.min0 is not None:  # symmetric int4: the min is tied to the scale
            mn = -8.0 * scale
        else:
            mn = None
        if self.v is None:
            codes = self.codes0
        else:
            c = self.codes0 + self.v
            codes = c + (torch.round(c).clamp(self.lo, self.hi) - c).detach()  # straight-through round
        if final:
            scale = scale.detach().to(torch.float16).float()
            bad = ~torch.isfinite(scale) | (scale < 0)
            scale = torch.where(bad, self.scale0, scale)
            if mn is not None:
                mn = (-8.0 * scale if not self.asym else mn.detach()).to(torch.float16).float()
                mn = torch.where(torch.isfinite(mn), mn, self.min0)  # type: ignore[arg-type]
            codes = torch.round(codes.detach()).clamp(self.lo, self.hi)
        return scale, mn, codes

    def weight(self, final: bool = False) -> torch.Tensor:
        scale, mn, codes = self.params(final)
        w = codes * scale.t().repeat_interleave(self.g, dim=1)  # (N, K)
        return w if mn is None else w + mn.t().repeat_interleave(self.g, dim=1)

    def pack(self) -> PackedWeight:
        scale, mn, codes = self.params(final=True)
        if self.spec.bits == 8:
            return make_int8(codes.to(torch.int8).cpu(), scale.cpu(), self.spec.group_size)
        return make_int4(codes.to(torch.uint8).cpu(), scale.cpu(), mn.cpu(), self.g,  # type: ignore[union-attr]
                         symmetric=bool(self.spec.symmetric))


@torch.no_grad()
def _full_loss(layer: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               seq_len: int, chunk: int) -> float:
    """MSE over all windows, `chunk` windows at a time (the same mean as one pass)."""
    rows = chunk * seq_len
    total = 0.0
    for i in range(0, x.shape[0], rows):
        out = layer_forward(layer, x[i : i + rows], seq_len, weights)
        total += float(((out - y[i : i + rows]) ** 2).sum())
    return total / y.numel()


def tune_layer(layer: nn.Module, packed: dict[str, PackedWeight], x: torch.Tensor, y: torch.Tensor, seq_len: int,
               config: TuneConfig) -> tuple[dict[str, PackedWeight], TuneResult]:
    """Tune the quantization of `packed` (linear name inside the layer -> its GPTQ result) against the layer
    output. x: the student's inputs, y: the teacher's outputs, both (windows * seq_len, hidden) fp32.

    With 4 or more windows the last quarter is held out: the steps use the others, the held-out loss of the
    rounded parameters is measured every tenth of the steps and the best point is kept (early stopping; on
    SmolLM2 the training windows' loss fell 10-15 % per layer while held-out windows' barely moved).
    The result is kept only if it lowers both the held-out loss and the loss over all the windows.
    Returns the packed weights to keep (tuned, or `packed` itself) and the losses over all the windows. The
    layer's modules are not modified (its other weights are read)."""
    if x.shape != y.shape or x.shape[0] % seq_len:
        raise ValueError(f"tuning inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be equal "
                         f"(windows * {seq_len}, hidden)")
    dev = x.device
    q = {n: _Quantized(p, dev, config.rounding) for n, p in packed.items()}
    windows = x.shape[0] // seq_len
    held = windows // 4  # held-out windows (the last ones)
    train = windows - held
    chunk = max(config.batch, 4)
    xv, yv = (x[train * seq_len :], y[train * seq_len :]) if held else (x, y)

    def final_weights() -> dict[str, torch.Tensor]:
        return {n: m.weight(final=True) for n, m in q.items()}

    def snapshot() -> list[torch.Tensor | None]:
        return [t.detach().clone() if t is not None else None for m in q.values() for t in (m.a, m.b, m.v)]

    with torch.no_grad():
        before = _full_loss(layer, final_weights(), x, y, seq_len, chunk)
        best_val = _full_loss(layer, final_weights(), xv, yv, seq_len, chunk)
    start = best = snapshot()
    adam_params = [t for m in q.values() for t in m.adam_params()]
    opt = torch.optim.Adam(adam_params, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / config.steps)
    offsets = [m.v for m in q.values() if m.v is not None]
    check_every = max(1, config.steps // 10)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for step in range(config.steps):
            pick = torch.randperm(train, generator=gen)[: config.batch].tolist()
            idx = torch.cat([torch.arange(w * seq_len, (w + 1) * seq_len) for w in pick]).to(dev)
            out = layer_forward(layer, x[idx], seq_len, {n: m.weight() for n, m in q.items()})
            loss = F.mse_loss(out, y[idx])
            opt.zero_grad(set_to_none=True)
            for v in offsets:
                v.grad = None
            loss.backward()
            opt.step()
            sched.step()
            if offsets:
                step_size = config.round_lr * (1.0 - step / config.steps)
                with torch.no_grad():
                    for v in offsets:
                        if v.grad is not None:
                            v.sub_(step_size * torch.sign(v.grad)).clamp_(-1.0, 1.0)
            if (step + 1) % check_every == 0 or step + 1 == config.steps:
                val = _full_loss(layer, final_weights(), xv, yv, seq_len, chunk)
                if val < best_val:
                    best_val, best = val, snapshot()
    if best is start:
        return packed, TuneResult(before, before, tuned=False)
    with torch.no_grad():
        for t, b in zip((t for m in q.values() for t in (m.a, m.b, m.v)), best):
            if t is not None:
                t.copy_(b)  # type: ignore[arg-type]
        after = _full_loss(layer, final_weights(), x, y, seq_len, chunk)
    if not after < before:
        return packed, TuneResult(before, before, tuned=False)
    return {n: m.pack() for n, m in q.items()}, TuneResult(before, after, tuned=True)
