"""Checkpoint sources: where weights, config and tokenizer come from.

open_weights(model) picks the source from what `model` is:
    None                 -> the bundled SmolLM2-135M-Instruct GGUF
    an existing dir      -> HF safetensors directory
    an existing .gguf    -> GGUF file
    "org/name"           -> downloaded from the Hugging Face hub (safetensors only)
"""

from __future__ import annotations

import os
from pathlib import Path

from vramwise.weights.base import WeightsError, WeightSource
from vramwise.weights.bundled import bundled_model_path
from vramwise.weights.gguf_file import GGUFSource
from vramwise.weights.hub import download_from_hub, looks_like_hub_id
from vramwise.weights.safetensors_dir import SafetensorsDirSource

__all__ = [
    "GGUFSource",
    "SafetensorsDirSource",
    "WeightSource",
    "WeightsError",
    "bundled_model_path",
    "open_weights",
]

_GGUF_MAGIC = b"GGUF"


def open_weights(model: str | os.PathLike[str] | None, *, show_progress: bool = True) -> WeightSource:
    """Open a checkpoint (see the module docstring). Raises WeightsError with a message naming what was wrong."""
    if model is None:
        return GGUFSource(bundled_model_path(), show_progress=show_progress)
    text = os.fspath(model)
    if text.startswith("random:"):  # random weights of a real shape, e.g. random:llama-2-13b
        from vramwise.weights.random_weights import RandomWeightSource

        try:
            return RandomWeightSource(text.removeprefix("random:"))
        except ValueError as e:
            raise WeightsError(str(e)) from None
    path = Path(text).expanduser()
    if path.is_dir():
        return SafetensorsDirSource(path, show_progress=show_progress)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return GGUFSource(path, show_progress=show_progress)
        if path.suffix == ".safetensors":
            raise WeightsError(f"{path}: pass the model directory ({path.parent}), not a single .safetensors file")
        raise WeightsError(f"{path}: not a model: expected a directory with config.json and *.safetensors, or a .gguf file")
    if looks_like_hub_id(text) and not text.startswith((".", "/", "~")):
        return SafetensorsDirSource(download_from_hub(text), show_progress=show_progress)
    raise WeightsError(
        f"model path '{text}' does not exist (expected a local directory, a .gguf file, "
        "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct')"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False
