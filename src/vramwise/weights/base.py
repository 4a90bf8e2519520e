"""The interface every checkpoint source implements.

A WeightSource turns a checkpoint on disk (safetensors directory, GGUF file, ...) into
- a ModelConfig (and the HF-style config dict it was built from), and
- a stream of (HF name, tensor) pairs in the plain Llama naming and HF layout, one tensor at a time,
so that the model loader never holds two copies of the model in memory and never needs to know
which format the weights came from.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from vramwise.config import ModelConfig

if TYPE_CHECKING:
    from vramwise.tokenizer import Tokenizer


class WeightsError(Exception):
    """A checkpoint could not be read. The message names the file and, where known, the tensor."""


class WeightSource(abc.ABC):
    path: str  # the file or directory the weights came from
    config: ModelConfig
    hf_config: dict[str, Any]  # HF config.json contents (for GGUF: synthesized from its metadata)

    @abc.abstractmethod
    def tensor_names(self) -> list[str]:
        """HF tensor names, e.g. "model.layers.0.self_attn.q_proj.weight", in the order iter_weights yields them."""

    @abc.abstractmethod
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor) one at a time; 2-D weights are (out_features, in_features).

        dtype is the checkpoint's (GGUF: dequantized to float32). Each tensor is a fresh CPU tensor the
        caller may keep or move; the source keeps no reference to it.
        """

    @abc.abstractmethod
    def disk_size_bytes(self) -> int:
        """Bytes the weights take on disk (what a loader has to read)."""

    @abc.abstractmethod
    def tensor_dtypes(self) -> dict[str, int]:
        """Tensor count per storage type, e.g. {"Q4_1": 210, "F32": 61} or {"bfloat16": 30}."""

    @abc.abstractmethod
    def load_tokenizer(self) -> "Tokenizer":
        """The tokenizer that came with the weights."""

    def close(self) -> None:
        """Release open files / memory maps. Sources stay usable for nothing after this."""

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, architecture={self.config.architecture!r})"
