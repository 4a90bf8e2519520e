"""Building blocks shared by decoder families: RMSNorm, rotary embedding, SwiGLU, and the projection + epilogue
helpers linear_add / gate_up_silu.

Each dispatches to the fused kernels of kernels/fused.py: Triton on CUDA, their torch references elsewhere.
The helpers use a fused method where the projection module offers one (a quantized linear's GEMV with the
residual add or SwiGLU in its epilogue); the model file calls them without knowing what the module is.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from vramwise.config import RopeScaling
from vramwise.kernels import fused


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it (one Triton kernel on CUDA).

    forward(x) -> RMSNorm(x); forward(x, residual) -> (RMSNorm(x + residual), x + residual). Numerics of
    transformers: normalise in fp32, cast back to the input dtype, then multiply by the weight.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out, new_residual = fused.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
        inv_freq = scaled
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), as in HF Llama, with a cos/sin table per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build_cache(self, device: torch.device | str) -> None:
        """(max_positions, head_dim) table: first half cos, second half sin; fp32 for accuracy."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        t = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def table(self, device: torch.device) -> torch.Tensor:
        """The (max_positions, head_dim) fp32 [cos | sin] table on `device` (built on first use there)."""
        if self.cos_sin.numel() == 0 or self.cos_sin.device != device:
            self.build_cache(device)
        return self.cos_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfused rotary (the attention layer uses the fused rotary + KV write; this stays the reference).
        positions (T,), q (T, Hq, D), k (T, Hkv, D)."""
        cs = self.table(q.device).index_select(0, positions)  # (T, D)
        half = self.head_dim // 2
        cos = cs[:, None, :half]
        sin = cs[:, None, half:]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU silu(gate) * up on separate (..., I) tensors (one Triton kernel on CUDA)."""
    return fused.silu_and_mul_split(gate, up)


def silu_and_mul_merged(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate+up projection's output (..., 2I) = [gate | up] -> (..., I)."""
    return fused.silu_and_mul(gate_up)


def _called_plainly(module: nn.Module) -> bool:
    """True when module(x) would run module.forward(x) and nothing else: no forward (pre-)hooks on it and no
    global ones. The fused entry points below bypass __call__, so where hooks observe the call (GPTQ's
    calibration collects each linear's inputs with forward hooks, quant/gptq.py) the unfused call runs."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or getattr(_nn_module, "_global_forward_hooks", None)
                or getattr(_nn_module, "_global_forward_pre_hooks", None))


def linear_add(module: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """module(x) + residual: a projection followed by its residual connection. x (T, in), residual (T, out).

    A module with a `forward_add(x, residual)` method (QuantLinear: the add in the decode GEMV's epilogue) is
    called through it; a plain nn.Linear without bias on CUDA becomes one torch.addmm (cuBLAS adds the
    residual in fp32 before its single rounding: within one rounding of the unfused result); anything else,
    or a module with hooks, computes module(x) + residual."""
    if _called_plainly(module):
        fused = getattr(module, "forward_add", None)
        if fused is not None:
            return fused(x, residual)
        if (type(module) is nn.Linear and module.bias is None and x.is_cuda and x.dim() == 2
                and residual.shape == (x.shape[0], module.out_features) and residual.dtype == x.dtype
                and module.weight.dtype == x.dtype):
            return torch.addmm(residual, x, module.weight.t())
    return module(x) + residual


def gate_up_silu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu_and_mul_merged(module(x)) for a fused gate+up projection (outputs [gate | up], (T, 2I)) -> (T, I).

    A module with a `forward_silu_mul(x)` method (QuantLinear: one GEMV computing both halves of each output
    channel and storing silu(gate) * up) is called through it; anything else, or a module with hooks, computes
    silu_and_mul_merged(module(x))."""
    if _called_plainly(module):
        fused = getattr(module, "forward_silu_mul", None)
        if fused is not None:
            return fused(x)
    return silu_and_mul_merged(module(x))
