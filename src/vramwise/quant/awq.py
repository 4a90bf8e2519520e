"""Activation-aware per-input-channel scaling (AWQ-style), folded into the op before a linear, for GPTQ.

For y = x W^T and any positive s (K,), y = (x / s) (W diag(s))^T. Scaling up the columns of W that meet large
activations gives them relatively finer quantization steps (their group's range grows less than they do), at
the price of coarser steps for the others; the 1/s goes into whatever produced x, so the model computes the
same function in float (Lin et al., "AWQ", 2023). Here s = a^alpha with a (K,) the RMS of each input channel
over the calibration tokens, alpha picked per layer input from a grid by the layer objective of GPTQ,

    err(alpha) = tr(E H E^T),   E = W - Q(W diag(s)) diag(s)^-1,   H = 2/n X^T X

with Q the plain round-to-nearest grid of the target spec (alpha = 0 is s = 1, no change, so the search never
chooses a worse point than none by that measure). GPTQ then quantizes W diag(s) against the rescaled inputs.

Where 1/s goes, in a Llama decoder layer (the pairs of `scalable_inputs`):
    input_layernorm.weight            -> q_proj, k_proj, v_proj
    post_attention_layernorm.weight   -> gate_proj, up_proj
    up_proj (its output rows)         -> down_proj      (silu(gate) * up is linear in up)
o_proj is left alone: with grouped-query attention its inputs are v_proj rows shared by several heads.
RMSNorm weights are stored in the checkpoint's float dtype, so the folded norm weight is rounded to bf16
(exact in fp16 and fp32 too) and the columns of W take exactly the scale that rounding leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .formats import QuantSpec

__all__ = ["ScalableInput", "fold_scale", "scalable_inputs", "search_scale"]

#: alpha grid: 0, 0.05, ..., 0.95.
ALPHA_GRID = tuple(i / 20 for i in range(20))


@dataclass(frozen=True)
class ScalableInput:
    """Linears (names inside the layer) sharing one input, and the module whose output is that input:
    an RMSNorm (its weight is divided by s) or a linear (its output rows `rows`, and bias, are divided by s)."""

    prev: nn.Module
    names: tuple[str, ...]
    rows: slice | None = None  # None: all of them


def _linear(module: nn.Module | None, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def scalable_inputs(layer: nn.Module) -> list[ScalableInput]:
    """The foldable (producer, consumers) pairs of a Llama-family decoder layer, with q/k/v and gate/up
    separate or fused (models/fuse.py: qkv_proj, gate_up_proj = [gate | up]); [] for other layers."""
    out = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if hasattr(layer, "input_layernorm"):
        if all(_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            out.append(ScalableInput(layer.input_layernorm,
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
        elif _linear(attn, "qkv_proj"):
            out.append(ScalableInput(layer.input_layernorm, ("self_attn.qkv_proj",)))
    if not _linear(mlp, "down_proj"):
        return out
    if _linear(mlp, "gate_proj") and _linear(mlp, "up_proj"):
        if hasattr(layer, "post_attention_layernorm"):
            out.append(ScalableInput(layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj")))
        out.append(ScalableInput(mlp.up_proj, ("mlp.down_proj",)))
    elif _linear(mlp, "gate_up_proj"):
        if hasattr(layer, "post_attention_layernorm"):
            out.append(ScalableInput(layer.post_attention_layernorm, ("mlp.gate_up_proj",)))
        inter = mlp.down_proj.in_features  # up is the second half of gate_up_proj's output rows
        out.append(ScalableInput(mlp.gate_up_proj, ("mlp.down_proj",), slice(inter, 2 * inter)))
    return out


def _fake_rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w (N, K) rounded to the spec's RTN grid (fp16 scale/min, as quant/rtn.py stores them), in fp32."""
    n, k = w.shape
    g = spec.group_size_for(k)
    wg = w.reshape(n, k // g, g)
    if spec.bits == 8:
        scale = (wg.abs().amax(-1, keepdim=True) / 127.0).half().float()
        return (torch.round(wg / torch.where(scale == 0, 1.0, scale)).clamp(-127, 127) * scale).reshape(n, k)
    if spec.symmetric:
        scale = (wg.abs().amax(-1, keepdim=True) / 7.5).half().float()
        mn = -8.0 * scale
    else:
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale, mn = ((hi - lo) / 15.0).half().float(), lo.half().float()
    q = torch.round((wg - mn) / torch.where(scale == 0, 1.0, scale)).clamp(0, 15)
    return (q * scale + mn).reshape(n, k)


@torch.no_grad()
def search_scale(weights: Sequence[torch.Tensor], H: torch.Tensor, spec: QuantSpec,
                 alphas: Sequence[float] = ALPHA_GRID) -> tuple[torch.Tensor, float]:
    """The per-input scale s (K,) fp32 for linears (N_i, K) sharing inputs with Hessian H (K, K), and its alpha.

    s = a^alpha / sqrt(max * min) (normalised so that the scales straddle 1), a = sqrt(diag(H) / 2) the input
    RMS; the alpha with the least tr(E H E^T) of the RTN-quantized, unscaled-back weights wins."""
    W = torch.cat([w.detach().float() for w in weights], dim=0)  # (N, K)
    H = H.float()
    a = (torch.diagonal(H) / 2).clamp_min(0).sqrt()
    a = torch.where(a > 0, a, a[a > 0].min() if bool((a > 0).any()) else torch.ones_like(a))
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in alphas:
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        E = W - _fake_rtn(W * s, spec) / s  # (N, K)
        err = float((E * (E @ H)).sum())
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1]


@torch.no_grad()
def fold_scale(layer: nn.Module, item: ScalableInput, s: torch.Tensor) -> torch.Tensor:
    """Apply s (K,): the consumers' columns times s, the producer's output divided by s; the layer's float
    function is unchanged (up to the producer's rounding, see the module doc). Returns the scale applied (K,)
    (s, or what the bf16-rounded norm weight leaves of it): the consumers' inputs are now x / that."""
    prev = item.prev
    if isinstance(prev, nn.Linear):
        rows = item.rows or slice(None)
        prev.weight[rows].div_(s.to(prev.weight.dtype)[:, None])  # (K, K_prev): output rows
        if prev.bias is not None:
            prev.bias[rows].div_(s.to(prev.bias.dtype))
        eff = s
    else:  # a norm: its weight is stored in the checkpoint's float dtype, possibly bf16
        old = prev.weight.detach().float()
        new = (old / s).to(torch.bfloat16).float()
        eff = torch.where(new != 0, old / new, s)  # the scale the rounded weight really applies
        prev.weight.copy_(new.to(prev.weight.dtype))
    for name in item.names:
        lin = layer.get_submodule(name)
        lin.weight.mul_(eff.to(lin.weight.dtype)[None, :])
    return eff
