"""Published shapes of common Llama-family models, for random-weight models of the exact real sizes.

Speed and memory do not depend on weight values, so benchmarks and budget checks build these where real
weights cannot be downloaded. Values are those of the models' config.json files.
"""

from __future__ import annotations

from vramwise.config import ModelConfig, RopeScaling


def _llama(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, ctx: int,
           theta: float = 10000.0, tied: bool = False, rope: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        max_position_embeddings=ctx, rms_norm_eps=1e-5, rope_theta=theta, rope_scaling=rope or RopeScaling(),
        tie_word_embeddings=tied, bos_token_id=1, eos_token_ids=(2,), torch_dtype="float16",
    )


MODEL_SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, theta=100000.0, tied=True),
    "tinyllama-1.1b": _llama("tinyllama-1.1b", 2048, 5632, 22, 32, 4, 32000, 2048),
    "llama-2-7b": _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-3-8b": _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, theta=500000.0),
    "codellama-34b": _llama("codellama-34b", 8192, 22016, 48, 64, 8, 32000, 16384, theta=1000000.0),
    "llama-2-70b": _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, 4096),
}


def shape_config(name: str) -> ModelConfig:
    key = name.lower()
    if key not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[key]
