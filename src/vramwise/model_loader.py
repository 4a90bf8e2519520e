"""Builds a model from a weight source without ever holding two copies of it in memory.

The module tree is created on the meta device (no storage), then materialised empty on the target device
in the target dtype, then filled tensor by tensor from the checkpoint.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vramwise.config import ModelConfig
from vramwise.models.registry import resolve_model_class
from vramwise.weights.base import WeightsError, WeightSource

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, float32, float16, bfloat16")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    return torch.bfloat16 if "bfloat16" in cfg.torch_dtype else torch.float16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model with uninitialised parameters of the right dtype on `device`."""
    cls = resolve_model_class(cfg)
    with _default_dtype(dtype), torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces each module's parameters separately: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.build_cache(device)
    model.eval()
    return model


def load_model(source: WeightSource, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = build_empty_model(source.config, device, dtype)
    try:
        loaded = model.load_weights(source.iter_weights())
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{source.path}: {e.args[0] if e.args else e}") from e
    missing = sorted(model.expected_weight_names() - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{source.path}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")
    return model
