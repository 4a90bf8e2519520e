"""Llama-family decoder: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (qkv bias), SmolLM2, TinyLlama.

A plain nn.Module over flattened tokens: forward(input_ids (T,), positions (T,), meta) -> hidden (T, hidden).
It knows nothing of quantization, offload or LoRA: those replace or wrap its nn.Linear / layer modules from
outside. Parameter names follow transformers, so checkpoints map one to one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vramwise.config import ModelConfig
from vramwise.models.attention import Attention, AttentionMetadata
from vramwise.models.layers import RMSNorm, RotaryEmbedding, gate_up_silu, linear_add, silu_and_mul


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        h = cfg.hidden_size
        # Set (and q/k/v_proj removed) by models/fuse.py after loading: one matmul for the three projections.
        self.qkv_proj: nn.Module | None = None
        self.q_proj = nn.Linear(h, cfg.q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:  # (T, q_size + 2 kv_size) -> column views, no copies
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, meta, positions, self.rotary)  # rotary + KV write + attention; (T, Hq, D)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module | None = None  # set (gate/up_proj removed) by models/fuse.py
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, hidden) -> (T, hidden); + residual (T, hidden) when given (the layer's residual connection,
        which linear_add can fold into the down projection)."""
        if self.gate_up_proj is not None:
            act = gate_up_silu(self.gate_up_proj, x)  # silu(gate) * up of the fused (T, 2I) output: (T, I)
        else:
            act = silu_and_mul(self.gate_proj(x), self.up_proj(x))
        if residual is None:
            return self.down_proj(act)
        return linear_add(self.down_proj, act, residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # The residual add after attention is fused into the next norm: h, x = norm(h + x), h + x; the one after
        # the MLP into its down projection where the module can (x + down(act)). The layer keeps its
        # tensor-in, tensor-out contract (offload hooks and GPTQ run layers one at a time).
        h = self.self_attn(positions, self.input_layernorm(x), meta)
        h, x = self.post_attention_layernorm(h, x)
        return self.mlp(h, x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One rotary table shared by all layers (not a submodule of each, so it is built once).
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states (T, hidden); call compute_logits on the rows that need them."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab), fp32 for the sampler

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def expected_weight_names(self) -> set[str]:
        names = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        if self.config.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters, one at a time. Returns the names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            param = params.get(name)
            if param is None:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Same graph as Llama; its sliding window is honoured by capping the context length (see loader)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama graph with biases on q/k/v (ModelConfig.attention_bias is True for this family)."""
