"""Maps the HF `architectures` string onto a model family class."""

from __future__ import annotations

from torch import nn

from vramwise.config import ModelConfig
from vramwise.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,  # Llama 2/3, SmolLM2, TinyLlama
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def resolve_model_class(cfg: ModelConfig) -> type[nn.Module]:
    cls = MODEL_REGISTRY.get(cfg.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    return cls
