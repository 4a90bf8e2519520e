"""GPTQ: quantize each linear layer so that its *outputs* on calibration inputs change least.

For a layer y = x W^T with W (N, K), GPTQ minimises ||X W^T - X Q^T||^2 over the calibration inputs X
(tokens, K). The objective decouples over output rows and has the Hessian H = 2 X^T X (K, K), shared by all
rows. Columns are quantized one at a time; after column k is rounded, its error is pushed onto the columns
not yet quantized, in proportion to the inverse Hessian, so correlated inputs compensate each other
(Frantar et al., "GPTQ", 2022; the "Optimal Brain Quantization" update restricted to a fixed column order):

    Hinv = upper Cholesky factor U of H^-1 (U^T U = H^-1)
    for each column k:   q_k = quant(w_k);   e = (w_k - q_k) / U[k, k];   W[:, k+1:] -= e U[k, k+1:]

Columns are processed in blocks of 128 (the lazy batch update: the in-block updates touch only the block, the
rest of W is updated once per block with a matmul). Dampening adds `damp * mean(diag H)` to the diagonal so
that H is safely positive definite. Group parameters (scale, min) of a group are fixed when the sweep
reaches the group's first column, from the weights as updated by then, with the same fp16 scale/min rules as
RTN (quant/rtn.py), so a GPTQ layer is stored exactly like an RTN one; by default the group's range is also
searched over shrunk (clipped) candidates for the least |error|^2.4, as the GPTQ reference's "mse" option does
(on SmolLM2 int4 it took perplexity +19.9 % -> +16.1 % over the imported model, see benchmarks/QUALITY.md).

act_order: columns are visited in decreasing diag(H) (the inputs with the largest energy first, while there
are many columns left to absorb their error). Our packed format has contiguous groups, so with act_order the
group parameters are computed up front from the unmodified weights in the natural order ("static groups")
and only the visiting order changes; the stored layer needs no permutation at run time.

refit (after the sweep): with the codes fixed, each row's dequantized weights are linear in its groups'
(scale, min), so the (scale, min) that minimise the same layer objective tr(E H E^T) solve a small least-squares
problem per row (`_refit`; the weighted refit llama.cpp's k-quants do with their importance matrix, here with
the full Hessian). Static act-order groups are fixed before the sweep from weights the sweep then changes,
which the refit corrects; further rounds re-run the sweep on the refitted grid. The best round is kept.

`quantize_model_gptq` runs the whole model layer by layer: the calibration hidden states enter layer 0,
forward hooks on the layer's nn.Linear modules accumulate X^T X, the layer's linears are quantized and swapped
for QuantLinear, and the *quantized* layer's outputs become the next layer's inputs (so each layer corrects
for the error of those before it). true_sequential (default) does the same inside a layer: q/k/v first, then
o_proj against the attention output of the quantized q/k/v, then gate/up, then down_proj against the
quantized gate/up (the GPTQ reference's --true-sequential). awq first folds activation-aware per-input
scales into the float layer (quant/awq.py), so GPTQ quantizes the rescaled weights. tune (off by default)
then tunes each quantized layer's scales/mins (and optionally its rounding) against the whole layer's output
on the first `tune.samples` calibration windows (quant/blocktune.py), before its outputs feed the next layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocktune import TuneConfig, layer_forward, tune_layer
from .formats import PackedWeight, QuantSpec, make_int4, make_int8

log = logging.getLogger(__name__)

__all__ = ["GPTQConfig", "HessianAccumulator", "gptq_quantize_shared", "gptq_quantize_weight", "quantize_model_gptq",
           "select_calibration"]


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128  # columns per lazy-update block
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True  # visit columns by decreasing diag(H) (static groups, see module doc)
    clip_search: bool = True  # per-group range shrink search for the scale/min (see _group_params)
    refit: int = 1  # rounds of Hessian-weighted least-squares refit of each group's (scale, min) (see _refit)
    true_sequential: bool = True  # later linears of a layer see the already-quantized earlier ones' outputs
    awq: bool = True  # activation-aware input scaling folded into the producer first (quant/awq.py)
    tune: TuneConfig | None = None  # block-wise output reconstruction after each layer (quant/blocktune.py)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"GPTQ block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ damp must be in [0, 1), got {self.damp}")
        if self.refit < 0:
            raise ValueError(f"GPTQ refit must be >= 0 rounds, got {self.refit}")


class HessianAccumulator:
    """Running H = (2 / n) * sum over tokens of x x^T, (K, K) fp32, from batches of inputs (..., K)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (tokens, K)
        t = x.shape[0]
        if t == 0:
            return
        # Keep H a mean (not a sum) so its scale does not grow with the calibration size.
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)


@dataclass
class _GroupParams:
    """fp16-rounded (scale, min) of one group, per output row, kept in fp32: scale/min (N,) as stored,
    divisor (N,) = scale with zeros replaced by 1 (an all-equal group rounds to code 0 / the min)."""

    scale: torch.Tensor
    min: torch.Tensor | None
    divisor: torch.Tensor


def _round_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, min) in fp32 holding fp16 values for ranges [lo, hi] (any leading shape), by RTN's rules."""
    if spec.bits == 8:
        return (torch.maximum(hi.abs(), lo.abs()) / 127.0).to(torch.float16).float(), None
    if spec.symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / 7.5).to(torch.float16).float()
        return scale, (-8.0 * scale).to(torch.float16).float()
    return ((hi - lo) / 15.0).to(torch.float16).float(), lo.to(torch.float16).float()


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round w to the grid (scale, min) broadcast over its rows, and return the grid values."""
    d = torch.where(scale == 0, torch.ones_like(scale), scale)
    if mn is None:
        return torch.round(w / d).clamp_(-127, 127) * scale
    return torch.round((w - mn) / d).clamp_(0, 15) * scale + mn


def _group_params(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> _GroupParams:
    """Scale and min for one group of input features w (G, N) (rows = inputs, as GPTQ holds W transposed), by
    the same rules as RTN (quant/rtn.py): int8 absmax/127; int4 asymmetric (max - min)/15 with the group min;
    int4 symmetric absmax/7.5 with min = -8 * scale; all rounded to fp16 before any code is chosen, so the codes
    fit the values actually stored.

    clip_search: also try the range shrunk towards zero by 2.5 % steps down to 20 % of it and keep, per output
    channel, the candidate with the least sum |w - w~|^2.4 (the GPTQ reference's "mse" grid search): clipping
    a few extreme weights buys a finer step for all the others."""
    lo, hi = w.amin(dim=0), w.amax(dim=0)  # (N,)
    if not clip_search:
        scale, mn = _round_params(lo, hi, spec)
    else:
        shrink = 1.0 - torch.arange(_CLIP_STEPS, device=w.device, dtype=torch.float32) / _CLIP_GRID  # (C,)
        scale_c, mn_c = _round_params(lo * shrink[:, None], hi * shrink[:, None], spec)  # (C, N)
        err = torch.stack([  # (C, N); one candidate at a time keeps the temporary at (G, N)
            (_fake_quant(w, scale_c[c], None if mn_c is None else mn_c[c], spec.bits) - w).abs_().pow_(2.4).sum(0)
            for c in range(_CLIP_STEPS)])
        best = err.argmin(dim=0, keepdim=True)  # (1, N)
        scale = scale_c.gather(0, best)[0]
        mn = None if mn_c is None else mn_c.gather(0, best)[0]
    if not torch.isfinite(scale).all() or (mn is not None and not torch.isfinite(mn).all()):
        raise ValueError("weights too large for the float16 scales of this format")
    return _GroupParams(scale, mn, torch.where(scale == 0, torch.ones_like(scale), scale))


_CLIP_GRID = 40  # shrink steps of 1/40 = 2.5 %
_CLIP_STEPS = 32  # down to 1 - 31/40 = 22.5 % of the range


@torch.no_grad()
def _gptq(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, config: GPTQConfig
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of one (N, K) weight: codes (N, K) fp32, scales (K/G, N) fp32, mins (K/G, N) fp32 or None (int8)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    spec.check_shape(n, k)
    if tuple(H.shape) != (k, k):
        raise ValueError(f"Hessian must be ({k}, {k}) for a weight with {k} inputs, got {tuple(H.shape)}")
    g = spec.group_size_for(k)
    dev = weight.device
    Wt = weight.detach().to(torch.float32).t().contiguous()  # (K, N), natural input order
    H = H.detach().to(dev, torch.float32).clone()

    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter, quantize them as 0
    H[dead, dead] = 1.0
    Wt[dead, :] = 0.0
    H.diagonal().add_(config.damp * torch.mean(torch.diag(H)))  # (K, K) damped, natural order

    # Static group parameters (act_order, or per-channel int8 where the "group" is the whole row).
    static: list[_GroupParams] | None = None
    if config.act_order or g == k:
        static = [_group_params(Wt[j : j + g], spec, config.clip_search) for j in range(0, k, g)]

    order = torch.argsort(torch.diag(H), descending=True) if config.act_order else torch.arange(k, device=dev)
    U = _inverse_hessian_factor(H[order][:, order])  # (K, K) upper triangular, U^T U = H^-1 (visiting order)
    codes, scales, mins = _sweep(Wt, U, order, static, spec, config)
    if config.refit:
        best = (_objective(Wt, codes, scales, mins, H, g), codes, scales, mins)
        for r in range(config.refit):
            if r:  # GPTQ again, on the refitted grid: the codes follow the better parameters
                codes, scales, mins = _sweep(Wt, U, order, _params_list(scales, mins), spec, config)
            scales, mins = _refit(Wt, codes, scales, mins, H, spec, g)
            obj = _objective(Wt, codes, scales, mins, H, g)
            if obj < best[0]:
                best = (obj, codes, scales, mins)
        _, codes, scales, mins = best
    return codes.t(), scales, mins


def _params_list(scales: torch.Tensor, mins: torch.Tensor | None) -> list[_GroupParams]:
    """Static group parameters from (K/G, N) scales/mins."""
    return [_GroupParams(s, None if mins is None else mins[j], torch.where(s == 0, torch.ones_like(s), s))
            for j, s in enumerate(scales)]


@torch.no_grad()
def _sweep(Wt: torch.Tensor, U: torch.Tensor, order: torch.Tensor, static: list[_GroupParams] | None,
           spec: QuantSpec, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ column sweep over Wt (K, N) (natural order, not modified) in the visiting `order`, with U the
    upper Cholesky factor of H^-1 in that order. static: fixed parameters per group, or None to fix each
    group's parameters when the sweep reaches its first input (natural order only).
    Returns codes (K, N) in natural order, scales (K/G, N), mins (K/G, N) or None."""
    k, n = Wt.shape
    dev = Wt.device
    g = spec.group_size_for(k)
    Wt = Wt[order]  # (K, N) in visiting order, a copy updated in place as errors move on
    U_diag = torch.diagonal(U).tolist()
    codes = torch.zeros(k, n, dtype=torch.float32, device=dev)  # (K, N) in visiting order
    scales = torch.zeros(k // g, n, dtype=torch.float32, device=dev)
    mins = torch.zeros(k // g, n, dtype=torch.float32, device=dev) if spec.bits == 4 else None
    lo, hi = (-127.0, 127.0) if spec.bits == 8 else (0.0, 15.0)
    params: _GroupParams | None = None
    order_l = order.tolist()

    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        W1 = Wt[i1:i2].clone()  # (B, N)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order_l[i1 + i]  # original input index
            grp = col // g
            if static is not None:
                params = static[grp]
            elif col % g == 0:
                # First input of a group (natural order): fix its parameters from the updated weights.
                # Groups never straddle blocks when g divides block_size; otherwise take what is updated.
                end = i + g
                w_grp = W1[i:end] if end <= W1.shape[0] else torch.cat([W1[i:], Wt[i2 : i1 + end]], dim=0)
                params = _group_params(w_grp, spec, config.clip_search)
                scales[grp] = params.scale
                if mins is not None:
                    mins[grp] = params.min  # type: ignore[index]
            assert params is not None
            w = W1[i]  # (N,)
            if params.min is None:  # int8: q = round(w / s), w~ = q * s
                q = torch.round(w / params.divisor).clamp_(lo, hi)
                dq = q * params.scale
            else:  # int4: q = round((w - min) / s), w~ = q * s + min (the format's two fp32 ops)
                q = torch.round((w - params.min) / params.divisor).clamp_(lo, hi)
                dq = q * params.scale + params.min
            codes[i1 + i] = q
            err = (w - dq).div_(U_diag[i1 + i])  # (N,)
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # push the error onto the inputs not yet rounded
            Err1[i] = err
        if i2 < k:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy update of the inputs after the block

    if static is not None:
        for j, p in enumerate(static):
            scales[j] = p.scale
            if mins is not None:
                mins[j] = p.min  # type: ignore[index]
    natural = torch.empty_like(codes)
    natural[order] = codes
    return natural, scales, mins


def _dequant(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, g: int) -> torch.Tensor:
    """(K, N) values of codes (K, N) on the grid scales/mins (K/G, N)."""
    s = scales.repeat_interleave(g, dim=0)
    return codes * s if mins is None else codes * s + mins.repeat_interleave(g, dim=0)


def _objective(Wt: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               H: torch.Tensor, g: int) -> float:
    """GPTQ's layer objective tr(E^T H E), E = Wt - dequant (K, N): the output error on the calibration inputs."""
    E = Wt - _dequant(codes, scales, mins, g)
    return float((E * (H @ E)).sum())


@torch.no_grad()
def _refit(Wt: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
           H: torch.Tensor, spec: QuantSpec, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With the codes fixed, the grid that minimises the layer objective: per output row, a least-squares
    problem in that row's group parameters (the dequantized row is linear in them).

    Row r's dequantized weights are w~ = A theta with theta = (scale_1..scale_P, min_1..min_P) of its P = K/G
    groups and A (K, 2P): A[k, grp(k)] = code q_k, A[k, P + grp(k)] = 1. Minimising (w - A theta)^T H (w - A theta)
    gives (A^T H A) theta = A^T H w, a (2P, 2P) system per row, built from block products without forming A.
    Symmetric int4 (min = -8 * scale) has the basis q_k - 8 and int8 the basis q_k, with P unknowns. A small
    ridge towards the current parameters keeps degenerate groups (a single code value) well posed. The
    solution is rounded to fp16 as stored. Returns scales, mins (K/G, N) fp32 holding fp16 values.
    """
    k, n = Wt.shape
    p = k // g
    if spec.bits == 8:
        bases = [codes.t()]  # (N, K)
    elif spec.symmetric:
        bases = [codes.t() - 8.0]
    else:
        bases = [codes.t(), torch.ones(n, k, device=Wt.device)]
    W = Wt.t()  # (N, K)
    m = len(bases) * p
    A = torch.empty(n, m, m, device=Wt.device)  # rows of (A^T H A)
    for jb, Bb in enumerate(bases):
        for b in range(p):
            P = Bb[:, b * g : (b + 1) * g] @ H[b * g : (b + 1) * g]  # (N, K): H times the b-group column
            for ja, Ba in enumerate(bases):
                A[:, ja * p : (ja + 1) * p, jb * p + b] = (Ba * P).view(n, p, g).sum(-1)
    HW = W @ H  # (N, K)
    rhs = torch.cat([(Ba * HW).view(n, p, g).sum(-1) for Ba in bases], dim=1)  # (N, m)
    theta0 = scales.t() if len(bases) == 1 else torch.cat([scales.t(), mins.t()], dim=1)  # type: ignore[union-attr]
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # (N,)
    A.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    theta = torch.linalg.solve(A, (rhs + ridge[:, None] * theta0).unsqueeze(-1)).squeeze(-1)  # (N, m)
    theta = torch.where(torch.isfinite(theta), theta, theta0).to(torch.float16).float()
    theta = torch.where(torch.isfinite(theta), theta, theta0)  # fp16 overflow: keep the old values
    new_scales = theta[:, :p].t().contiguous()
    if spec.bits == 8:
        return new_scales, None
    if spec.symmetric:
        return new_scales, (-8.0 * new_scales).to(torch.float16).float()
    return new_scales, theta[:, p:].t().contiguous()


def _pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, spec: QuantSpec, k: int
          ) -> PackedWeight:
    """codes (N, K) fp32 integers, scales/mins (K/G, N) fp32 (fp16 values) -> PackedWeight on CPU."""
    if spec.bits == 8:
        return make_int8(codes.to(torch.int8).cpu(), scales.cpu(), spec.group_size)
    return make_int4(codes.to(torch.uint8).cpu(), scales.cpu(), mins.cpu(),  # type: ignore[union-attr]
                     spec.group_size_for(k), symmetric=bool(spec.symmetric))


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
                         config: GPTQConfig = GPTQConfig()) -> PackedWeight:
    """GPTQ-quantize one (N, K) weight given its input Hessian H (K, K). Math in fp32 on weight's device.

    The weight is held transposed, Wt (K, N), so that "column k of W" is the contiguous row k of Wt: the
    rank-1 error updates then run over contiguous memory (25x faster on CPU than on strided columns).
    """
    codes, scales, mins = _gptq(weight, H, spec, config)
    return _pack(codes, scales, mins, spec, weight.shape[1])


def gptq_quantize_shared(weights: Sequence[torch.Tensor], H: torch.Tensor, spec: QuantSpec,
                         config: GPTQConfig = GPTQConfig()) -> list[PackedWeight]:
    """GPTQ for several weights (N_i, K) that see the same inputs (q/k/v, gate/up): one run over the rows
    stacked. The objective is separable over output rows given H, so this equals quantizing each alone (one
    Cholesky and one column sweep instead of several)."""
    stacked = torch.cat([w.detach() for w in weights], dim=0)  # (sum N_i, K)
    codes, scales, mins = _gptq(stacked, H, spec, config)
    out, start = [], 0
    for w in weights:
        n = w.shape[0]
        out.append(_pack(codes[start : start + n], scales[:, start : start + n],
                         None if mins is None else mins[:, start : start + n], spec, w.shape[1]))
        start += n
    return out


def _inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding more dampening if H is not numerically positive definite."""
    extra = 0.0
    mean_diag = float(torch.mean(torch.diag(H)))
    for _ in range(6):
        try:
            Hd = H if extra == 0 else H + extra * mean_diag * torch.eye(H.shape[0], device=H.device)
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = 0.01 if extra == 0 else extra * 10
            log.debug("GPTQ: Hessian not positive definite, retrying with extra damp %g", extra)
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with heavy dampening; "
                     "use more calibration text or --method rtn")


# ------------------------------------------------------------------------------------------------------------
# Whole-model driver
# ------------------------------------------------------------------------------------------------------------


def _layer_meta(num_seqs: int, seq_len: int, block_size: int, device: torch.device):
    """Attention metadata for `num_seqs` independent prefills of `seq_len` tokens over a private KV pool."""
    from vramwise.models.attention import AttentionMetadata

    blocks_per_seq = seq_len // block_size
    t = num_seqs * seq_len
    return AttentionMetadata(
        slot_mapping=torch.arange(t, dtype=torch.long, device=device),
        block_tables=torch.arange(num_seqs * blocks_per_seq, dtype=torch.long, device=device).view(num_seqs, -1),
        query_start_loc=[i * seq_len for i in range(num_seqs + 1)],
        context_lens=[seq_len] * num_seqs,
        context_lens_t=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        max_context_len=seq_len,
        all_decode=False,
    )


class _StopForward(Exception):
    """Raised by a hook once every hooked linear has seen its batch: the rest of the layer is not needed."""


class _SharedInputHessians:
    """Forward hooks that accumulate one Hessian per distinct input of a layer's linears.

    q/k/v (and gate/up) see the very same input tensor: the first module to see a tensor owns the Hessian and
    the modules that then see the same object alias it, so X^T X is computed once per input, not per module.
    owner_of lists the linears in the order the forward pass reaches them. accumulate=False only records who
    shares an input with whom; stop=True ends each forward (with _StopForward) once every hooked linear ran.
    """

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, accumulate: bool = True,
                 stop: bool = False) -> None:
        self.owner_of: dict[str, str] = {}
        self.accs: dict[str, HessianAccumulator] = {}
        self._device = device
        self._accumulate, self._stop = accumulate, stop
        self._seen: set[str] = set()  # hooked linears that ran in the current forward
        self._last: tuple[torch.Tensor | None, str] = (None, "")  # previous hook's input and its owner
        self._hooks = [lin.register_forward_hook(self._hook_for(name)) for name, lin in linears.items()]

    def _hook_for(self, name: str):
        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0]
            if name not in self.owner_of:
                self.owner_of[name] = self._last[1] if x is self._last[0] else name
            owner = self.owner_of[name]
            if owner == name and self._accumulate:
                self.accs.setdefault(name, HessianAccumulator(x.shape[-1], self._device)).add(x)
            self._last = (x, owner)
            self._seen.add(name)
            if self._stop and len(self._seen) == len(self._hooks):
                self._seen.clear()
                raise _StopForward
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        return self.accs[self.owner_of[name]].H

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._last = (None, "")


def _collect(layer: nn.Module, xs: list[torch.Tensor], seq_len: int, block: int, linears: dict[str, nn.Linear],
             device: torch.device, accumulate: bool = True, stop: bool = True) -> _SharedInputHessians:
    """Run the layer over the calibration batches with hooks on `linears`; returns the filled hooks."""
    hooks = _SharedInputHessians(linears, device, accumulate=accumulate, stop=stop)
    try:
        for x in xs:
            try:
                _run_layer(layer, [x], seq_len, block)
            except _StopForward:
                pass
    finally:
        hooks.remove()
    return hooks


def _run_layer(layer: nn.Module, xs: list[torch.Tensor], seq_len: int, block: int) -> list[torch.Tensor]:
    """One decoder layer over batches of calibration hidden states (b * seq_len, hidden) -> same shapes."""
    outs = []
    for x in xs:
        b = x.shape[0] // seq_len
        positions = torch.arange(seq_len, device=x.device).repeat(b)  # (b * seq_len,)
        outs.append(layer(positions, x, _layer_meta(b, seq_len, block, x.device)))
    return outs


def _awq_layer(layer: nn.Module, hidden: list[torch.Tensor], seq_len: int, block: int,
               linears: dict[str, nn.Linear], specs: dict[str, QuantSpec], device: torch.device
               ) -> dict[str, torch.Tensor]:
    """Search and fold the AWQ input scales of one float layer (before any of its linears is quantized: a
    producer such as up_proj is itself quantized later, with its rows already scaled). Returns the Hessians
    of the scaled inputs, {first linear of the input: H (K, K)}: x / s has Hessian H / (s s^T)."""
    from .awq import fold_scale, scalable_inputs, search_scale

    items = [it for it in scalable_inputs(layer) if all(n in specs for n in it.names)]
    if not items:
        return {}
    hooks = _collect(layer, hidden, seq_len, block, {n: linears[n] for it in items for n in it.names}, device)
    out = {}
    for it in items:
        H = hooks.hessian(it.names[0])
        s, alpha = search_scale([linears[n].weight for n in it.names], H, specs[it.names[0]])
        log.debug("AWQ %s: alpha %.2f", "+".join(it.names), alpha)
        eff = fold_scale(layer, it, s).to(H.device, torch.float32)
        out[it.names[0]] = H / (eff[:, None] * eff[None, :])
    return out


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    calibration: torch.Tensor,
    spec_for: Callable[[str, nn.Linear], QuantSpec | None],
    swap: Callable[[nn.Module, str, PackedWeight, torch.Tensor | None], None],
    config: GPTQConfig = GPTQConfig(),
    batch_seqs: int = 4,
    progress: bool = True,
) -> dict[str, QuantSpec]:
    """GPTQ-quantize a Llama-family model in place, layer by layer.

    calibration: int64 (num_seqs, seq_len) token ids (seq_len a multiple of 16).
    spec_for(name, linear) -> the spec for a decoder-layer linear, or None to keep it in float.
    swap(parent, child_name, packed, bias) replaces parent.<child_name> by a quantized module.
    Returns {module name: spec} of what was quantized. The embedding and lm_head are not touched.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    num_seqs, seq_len = calibration.shape
    block = 16
    if seq_len % block:
        raise ValueError(f"calibration sequence length must be a multiple of {block}, got {seq_len}")
    cfg = model.config
    batch_seqs = max(1, min(batch_seqs, num_seqs))
    # One private KV pool big enough for one batch of calibration sequences (rebound to each layer in turn).
    kv_shape = (batch_seqs * seq_len // block, block, cfg.num_key_value_heads, cfg.head_dim)
    kv_pool = (torch.zeros(kv_shape, dtype=dtype, device=device), torch.zeros(kv_shape, dtype=dtype, device=device))

    # Hidden states entering layer 0, per batch: list of (b * seq_len, hidden).
    hidden = [model.model.embed_tokens(calibration[i : i + batch_seqs].to(device).reshape(-1))
              for i in range(0, num_seqs, batch_seqs)]

    tune = config.tune
    tune_rows = min(tune.samples, num_seqs) * seq_len if tune is not None else 0
    # Block tuning with target "float": the float model's hidden states of the tuning windows, (rows, hidden).
    float_hidden = _first_rows(hidden, tune_rows) if tune is not None and tune.target == "float" else None

    done: dict[str, QuantSpec] = {}
    layers = model.model.layers
    bar = tqdm(range(len(layers)), desc="GPTQ" if tune is None else "GPTQ+tune", unit="layer", disable=not progress)
    for li in bar:
        layer = layers[li]
        attn = layer.self_attn.attn
        saved_cache, attn.kv_cache = attn.kv_cache, kv_pool
        prefix = f"model.layers.{li}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        specs = {n: s for n, s in ((n, spec_for(prefix + n, m)) for n, m in linears.items()) if s is not None}
        swaps: list[tuple[str, PackedWeight, torch.Tensor | None]] = []
        if tune is not None:  # the teacher's outputs, from the float layer before AWQ's fold and GPTQ
            tune_x = _first_rows(hidden, tune_rows)  # the student's inputs: the quantized model's
            tune_y = _layer_forward_chunked(layer, tune_x if float_hidden is None else float_hidden, seq_len)
            if float_hidden is not None:
                float_hidden = tune_y
        scaled_H = _awq_layer(layer, hidden, seq_len, block, linears, specs, device) if specs and config.awq else {}
        if specs:
            hooked = {n: linears[n] for n in specs}
            if config.true_sequential:  # who shares an input, in forward order: one sequence is enough
                first = _collect(layer, [hidden[0][:seq_len]], seq_len, block, hooked, device, accumulate=False)
            else:  # every Hessian from the float layer in one pass
                first = _collect(layer, hidden, seq_len, block, hooked, device)
            stages: dict[tuple[str, QuantSpec], list[str]] = {}  # linears sharing an input and a spec
            for n, owner in first.owner_of.items():
                stages.setdefault((owner, specs[n]), []).append(n)
            for i, ((owner, spec), names) in enumerate(stages.items()):
                if config.true_sequential and i == 0 and owner in scaled_H:
                    H = scaled_H.pop(owner)  # the float layer's first input: AWQ has just measured it
                elif config.true_sequential:
                    # This stage's inputs as produced by the stages already quantized (q/k/v before o_proj,
                    # gate/up before down_proj), the layer run only as far as these linears.
                    H = _collect(layer, hidden, seq_len, block, {n: linears[n] for n in names}, device).hessian(owner)
                else:
                    H = first.hessian(owner)
                packs = gptq_quantize_shared([linears[n].weight.data for n in names], H, spec, config)
                for n, packed in zip(names, packs):
                    lin = linears[n]
                    # Until the layer's outputs are computed, run it in float with the quantized values: the
                    # same numbers as the QuantLinear, without its per-call dequantization on CPU.
                    lin.weight.data.copy_(packed.dequantize(lin.weight.dtype))
                    swaps.append((n, packed, None if lin.bias is None else lin.bias.data))
            del first, scaled_H
        if tune is not None and swaps:
            packed, res = tune_layer(layer, {n: p for n, p, _ in swaps}, tune_x, tune_y, seq_len, tune)
            for n, p in packed.items():
                linears[n].weight.data.copy_(p.dequantize(linears[n].weight.dtype))
            swaps = [(n, packed[n], bias) for n, _, bias in swaps]
            log.debug("block tuning layer %d: output MSE %.4g -> %.4g%s", li, res.before, res.after,
                      "" if res.tuned else " (kept GPTQ's)")
            bar.set_postfix_str(f"mse {res.before:.3g}->{res.after:.3g}")
        hidden = _run_layer(layer, hidden, seq_len, block)  # the quantized layer's outputs feed the next layer
        for n, packed, bias in swaps:
            parent_name, _, child = n.rpartition(".")
            swap(layer.get_submodule(parent_name) if parent_name else layer, child, packed.to(device), bias)
            done[prefix + n] = specs[n]
        attn.kv_cache = saved_cache
    return done


def _first_rows(batches: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The first `rows` rows of a list of (b * seq_len, hidden) batches, as one fp32 tensor (rows, hidden)."""
    out, have = [], 0
    for x in batches:
        if have >= rows:
            break
        out.append(x[: rows - have].float())
        have += out[-1].shape[0]
    return torch.cat(out)


@torch.no_grad()
def _layer_forward_chunked(layer: nn.Module, x: torch.Tensor, seq_len: int, windows: int = 4) -> torch.Tensor:
    """blocktune.layer_forward over (n * seq_len, hidden) a few windows at a time (bounded temporaries)."""
    rows = windows * seq_len
    return torch.cat([layer_forward(layer, x[i : i + rows], seq_len) for i in range(0, x.shape[0], rows)])


def select_calibration(token_ids: Sequence[int], num_seqs: int, seq_len: int) -> torch.Tensor:
    """Cut `num_seqs` non-overlapping windows of `seq_len` tokens from the start of a token stream.
    Returns int64 (num_seqs, seq_len); raises ValueError when the text is too short."""
    need = num_seqs * seq_len
    if len(token_ids) < need:
        raise ValueError(f"calibration text has {len(token_ids)} tokens, {need} are needed "
                         f"({num_seqs} x {seq_len}); give a longer text or fewer samples")
    return torch.tensor(list(token_ids[:need]), dtype=torch.long).view(num_seqs, seq_len)
