"""Building blocks shared by decoder families: RMSNorm, rotary embedding, SwiGLU.

Each dispatches to the fused kernels of kernels/fused.py: Triton on CUDA, their torch references elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
