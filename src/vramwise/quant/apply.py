"""Swap nn.Linear modules for QuantLinear from outside the model (the model file knows nothing of this)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .formats import QuantSpec
from .linear import QuantLinear

__all__ = ["quantize_model", "set_submodule"]

SpecFor = Callable[[str, nn.Linear], "QuantSpec | None"]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where root.<name> (a dotted submodule path) was."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, spec_for: SpecFor, *, progress: bool = False,
                   device: torch.device | str | None = None) -> nn.Module:
    """Replace every nn.Linear for which `spec_for(name, linear)` returns a QuantSpec with a QuantLinear (RTN).

    Layers are quantized one at a time and the fp weight is released as soon as its replacement exists, so
    peak memory is the model plus one layer. `device` (optional): where to run the quantization math (e.g.
    "cuda" for speed); the QuantLinear is moved back to the linear's original device. Mixed formats are fine
    (spec_for may return int8 for attention and int4 for the MLP, None to keep a layer in full precision).
    Returns the model (modified in place).
    """
    targets: list[tuple[str, nn.Linear, QuantSpec]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear):
            spec = spec_for(name, mod)
            if spec is not None:
                if not isinstance(spec, QuantSpec):
                    raise TypeError(f"spec_for({name!r}) returned {type(spec).__name__}, expected QuantSpec or None")
                spec.check_shape(mod.out_features, mod.in_features)  # fail before anything is replaced
                targets.append((name, mod, spec))

    it = targets
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(targets, desc="quantizing", unit="layer")
        except ImportError:  # tqdm is a dependency, but a progress bar is never worth failing for
            pass
    for name, linear, spec in it:
        home = linear.weight.device
        src = linear if device is None else _moved_copy(linear, device)
        qlin = QuantLinear.from_linear(src, spec).to(home)
        set_submodule(model, name, qlin)
        # Drop the fp weight now rather than when the loop ends (the caller may hold no other reference).
        del src
        linear.weight = None
        linear.bias = None
    return model


def _moved_copy(linear: nn.Linear, device: torch.device | str) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return out
