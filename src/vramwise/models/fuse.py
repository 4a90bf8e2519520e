"""Fused projections, applied as a pass over a loaded model: QKV in one matmul, gate+up in one.

At decode batch sizes each projection is a GEMV bound by its weight read; fusing three (or two) of them
into one launch removes launches and lets one kernel stream one contiguous weight. Loading is untouched
(checkpoints, GGUF repack, GPTQ/AWQ import and vramwise checkpoints all load into the unfused modules by
their HF names); this pass runs after loading/quantizing:

    model = load_model(...)
    fuse_projections(model)   # attention: qkv_proj replaces q/k/v_proj; MLP: gate_up_proj replaces gate/up

Fused output columns are the parts in order: qkv = [q | k | v], gate_up = [gate | up] (what the model's
split and kernels/fused.py silu_and_mul expect).

- nn.Linear: weights concatenated along out_features (dim 0), biases likewise (all or none must have one).
- QuantLinear, same spec (bits, group size, symmetric) and in_features: concatenated along N, which is the
  packed tensors' N axis: W4A16 qweight (N/8, K/8, 8) along dim 0 (each 8-channel slab is self-contained),
  scales/mins (K/G, N) along dim 1; W8A16 qweight (K, N) and scales along dim 1.
- Anything else (a mix of float and quantized parts, different specs as in GGUF Q4_K_M mixes, a bias on some
  parts only, parts on different devices or dtypes, another module type): left unfused, and fuse_projections
  reports which and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from vramwise.quant.formats import PackedWeight
from vramwise.quant.linear import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class FuseReport:
    fused: list[str] = field(default_factory=list)  # e.g. "model.layers.0.self_attn.qkv_proj"
    skipped: dict[str, str] = field(default_factory=dict)  # name of the would-be fused module -> why not


def _why_not(parts: list[nn.Module]) -> str | None:
    """None when `parts` can be concatenated along out_features, else the reason."""
    kinds = {type(p) for p in parts}
    if len(kinds) != 1 or not (kinds <= {nn.Linear, QuantLinear}):
        return "parts are of different or unsupported module types: " + ", ".join(sorted(k.__name__ for k in kinds))
    if len({p.in_features for p in parts}) != 1:
        return "parts have different in_features"
    if len({p.bias is None for p in parts}) != 1:
        return "some parts have a bias and some do not"
    if kinds == {QuantLinear}:
        specs = {(p.spec, p.group_size) for p in parts}
        if len(specs) != 1:
            return "parts are quantized differently: " + ", ".join(sorted({p.spec.name for p in parts}))
    tensors = [p.weight for p in parts] if kinds == {nn.Linear} else [p.qweight for p in parts]
    if len({(t.device, t.dtype) for t in tensors}) != 1:
        return "parts live on different devices or in different dtypes"
    return None


@torch.no_grad()
def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One module computing torch.cat([p(x) for p in parts], -1). Raises ValueError when they cannot be fused."""
    why = _why_not(parts)
    if why is not None:
        raise ValueError(f"cannot fuse these projections: {why}")
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    if isinstance(parts[0], nn.Linear):
        w = torch.cat([p.weight for p in parts], dim=0)  # (sum N, K)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    first: QuantLinear = parts[0]
    qdim = 0 if first.spec.bits == 4 else 1  # N axis of qweight: (N/8, K/8, 8) or (K, N)
    packed = PackedWeight(
        qweight=torch.cat([p.qweight for p in parts], dim=qdim),
        scales=torch.cat([p.scales for p in parts], dim=1),  # (K/G, sum N)
        mins=None if first.mins is None else torch.cat([p.mins for p in parts], dim=1),
        spec=first.spec,
        in_features=first.in_features,
        out_features=sum(p.out_features for p in parts),
    )
    return QuantLinear.from_packed(packed, bias)


def _fuse_into(owner: nn.Module, part_names: list[str], fused_name: str, prefix: str, report: FuseReport) -> None:
    if getattr(owner, fused_name, None) is not None:
        return  # already fused
    parts = [getattr(owner, n, None) for n in part_names]
    full = f"{prefix}.{fused_name}" if prefix else fused_name
    if any(p is None for p in parts):
        report.skipped[full] = "a part is missing"
        return
    why = _why_not(parts)
    if why is not None:
        report.skipped[full] = why
        return
    fused = fuse_linears(parts)
    for n in part_names:
        delattr(owner, n)  # frees the parts' storage (the fused module holds copies)
    setattr(owner, fused_name, fused)
    report.fused.append(full)


def fuse_projections(model: nn.Module) -> FuseReport:
    """Fuse q/k/v_proj into qkv_proj and gate/up_proj into gate_up_proj wherever a module declares the fused
    slot (an attribute `qkv_proj` / `gate_up_proj`, None until fused). Idempotent. Returns what was fused
    and what was left alone, with reasons (also logged)."""
    report = FuseReport()
    for name, module in list(model.named_modules()):
        if hasattr(module, "qkv_proj"):
            _fuse_into(module, ["q_proj", "k_proj", "v_proj"], "qkv_proj", name, report)
        if hasattr(module, "gate_up_proj"):
            _fuse_into(module, ["gate_proj", "up_proj"], "gate_up_proj", name, report)
    if report.skipped:
        reasons = sorted(set(report.skipped.values()))
        log.info("left %d projection group(s) unfused: %s", len(report.skipped), "; ".join(reasons))
    return report
