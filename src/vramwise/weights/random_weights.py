"""Random weights of a real model's shape (`--random-weights llama-2-13b`): for speed and memory work.

Tensors are drawn on demand, one at a time, on `device` (set it to the GPU so that a 13B model is never
materialised on the CPU), scaled like a trained model's (std 0.02; norms at 1) so activations stay finite.
There is no tokenizer: prompts are token ids.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vramwise.models.shapes import shape_config
from vramwise.weights.base import WeightSource


class RandomWeightSource(WeightSource):
    def __init__(self, shape: str, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16):
        self.config = shape_config(shape)
        self.path = f"random:{shape.lower()}"
        self.hf_config = {"architectures": [self.config.architecture]}
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c.vocab_size, h))]
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (c.q_size, h)),
                (p + "self_attn.k_proj.weight", (c.kv_size, h)),
                (p + "self_attn.v_proj.weight", (c.kv_size, h)),
                (p + "self_attn.o_proj.weight", (h, c.q_size)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not c.tie_word_embeddings:
            out.append(("lm_head.weight", (c.vocab_size, h)))
        return out

    def tensor_names(self) -> list[str]:
        return [n for n, _ in self._shapes()]

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed)
        for name, shape in self._shapes():
            if len(shape) == 1:
                yield name, torch.ones(shape, dtype=self.dtype, device=self.device)
            else:
                t = torch.empty(shape, dtype=self.dtype, device=self.device)
                yield name, t.normal_(0.0, 0.02, generator=g)

    def disk_size_bytes(self) -> int:
        return 0

    def tensor_dtypes(self) -> dict[str, int]:
        return {str(self.dtype).removeprefix("torch."): len(self._shapes())}

    def load_tokenizer(self):
        return None
