"""GGUF file (llama.cpp's format): metadata -> HF config, tensors -> HF names and layout.

Three things differ from an HF checkpoint and are undone here:
- names: "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight";
- storage: block-quantized types (Q4_1, Q8_0, Q4_K, ...) are dequantized to float32 with gguf.quants;
- layout of q/k in llama-arch files: llama.cpp's converter reorders the rows of each attention head
  from HF's "first half / second half" rotary layout to interleaved pairs; we put them back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys
from gguf.quants import dequantize
from tqdm.auto import tqdm

from vramwise.config import ModelConfig
from vramwise.weights.base import WeightsError, WeightSource

if TYPE_CHECKING:
    from vramwise.tokenizer import Tokenizer


# general.architecture -> (HF architectures string, HF model_type, q/k rows permuted by the converter).
# llama.cpp writes Mistral (and most Llama derivatives) as "llama"; a few newer files say "mistral".
GGUF_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

# Per-block tensor kinds: GGUF "blk.N.<kind>.<suffix>" -> HF "model.layers.N.<module>.<suffix>".
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Tensors that are configuration, not weights: llama 3 rope frequency divisors, folded into rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"

# Types gguf.quants can dequantize that we vouch for (tested); others are tried and reported if they fail.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices its map once per metadata item (~150k times for a 49k-token vocabulary), and each
    slice of an np.memmap pays for memmap's __array_finalize__; a plain view of the same mapping makes
    opening SmolLM2's GGUF about 3x faster (7 s -> 2 s here). The view keeps the map alive.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def gguf_to_hf_name(name: str) -> str:
    """GGUF tensor name -> HF name; unknown names come back unchanged (the model loader reports them)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order for a q or k projection (weight or bias, or raw byte rows).

    Per head, HF orders the head_dim rows as [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] (rotate_half pairs
    row i with row i+d/2); the converter interleaves them as [x_0, y_0, x_1, y_1, ...]:
        gguf = hf.reshape(n_head, 2, d/2, *rest).swapaxes(1, 2).reshape(hf.shape)
    so the inverse reads the rows as (n_head, d/2, 2) and swaps back. Only dim 0 moves, so this works
    on quantized byte rows too (each row's blocks stay intact).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(WeightSource):
    """A memory-mapped GGUF file. Tensors are dequantized one at a time as iter_weights yields them."""

    def __init__(self, path: str | os.PathLike[str], *, show_progress: bool = True) -> None:
        self.path = str(path)
        self._show_progress = show_progress
        self._tokenizer: Tokenizer | None = None
        try:
            file_size = os.path.getsize(self.path)
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot open GGUF file ({e.strerror or e})") from e
        try:
            self._reader = _Reader(self.path)
        except Exception as e:  # ValueError on bad magic / reshape past the end, IndexError, ...
            raise WeightsError(f"{self.path}: not a readable GGUF file ({e}); it is truncated or corrupt") from e
        # GGUFReader maps the file but does not check tensors against its size; reading past the end
        # of a memory map would crash the process, so check every data range up front.
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > file_size or t.data.nbytes != t.n_bytes:
                raise WeightsError(
                    f"{self.path}: tensor {t.name!r} needs bytes up to {end} but the file has {file_size}; "
                    "the file is truncated"
                )

        self.arch = str(self._field("general.architecture", "unknown"))
        hf_arch, _, self._permuted = GGUF_ARCHITECTURES.get(self.arch, (f"gguf:{self.arch}", self.arch, False))
        # HF name -> reader tensor, in file order; config-only tensors left out.
        self._tensors = {gguf_to_hf_name(t.name): t for t in self._reader.tensors if t.name != _ROPE_FREQS}
        self.hf_config = self._build_hf_config(hf_arch)
        try:
            self.config = ModelConfig.from_hf_dict(self.hf_config)
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
            raise WeightsError(f"{self.path}: cannot build the model config from GGUF metadata: {e}") from e

    # ---- metadata --------------------------------------------------------------------------------

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key.format(arch=self.arch) if "{arch}" in key else key)
        if field is None:
            return default
        value = field.contents()
        return value if value is not None else default

    def _require(self, key: str) -> Any:
        value = self._field(key)
        if value is None:
            raise WeightsError(f"{self.path}: GGUF metadata key {key.format(arch=self.arch)!r} is missing")
        return value

    def metadata(self) -> dict[str, Any]:
        """Scalar and short-array metadata (long arrays such as the vocabulary are summarized by length)."""
        out: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 16:
                out[key] = f"<array of {len(field.data)}>"
            else:
                out[key] = field.contents()
        return out

    def _build_hf_config(self, hf_arch: str) -> dict[str, Any]:
        known = self.arch in GGUF_ARCHITECTURES
        # For an unknown architecture the config only has to get as far as the model registry, which
        # refuses it by name; so fill what is missing instead of failing on a missing key.
        get = self._require if known else (lambda key: self._field(key, 1))

        n_heads = int(get(Keys.Attention.HEAD_COUNT))
        hidden = int(get(Keys.LLM.EMBEDDING_LENGTH))
        ffn = get(Keys.LLM.FEED_FORWARD_LENGTH)
        ffn = int(max(ffn)) if isinstance(ffn, list) else int(ffn)  # some archs store one value per layer
        head_dim = int(self._field(Keys.Attention.KEY_LENGTH, hidden // max(n_heads, 1)))
        rope_theta = float(self._field(Keys.Rope.FREQ_BASE, 10000.0))

        n_tokens = self._array_len("tokenizer.ggml.tokens")
        embd = self._tensors.get("model.embed_tokens.weight")
        embd_rows = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else None  # GGUF dims: (in, out)
        vocab = n_tokens or self._field(Keys.LLM.VOCAB_SIZE) or embd_rows or 0
        if embd_rows is not None and embd_rows != vocab:
            vocab = embd_rows  # the model's shapes win; the tokenizer may cover fewer ids than it has rows

        eos_ids = [self._field(k) for k in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)]
        eos_ids = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))
        bos = self._field(Keys.Tokenizer.BOS_ID)

        cfg: dict[str, Any] = {
            "architectures": [hf_arch],
            "model_type": GGUF_ARCHITECTURES.get(self.arch, (None, self.arch))[1],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": int(get(Keys.LLM.BLOCK_COUNT)),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._field(Keys.Attention.HEAD_COUNT_KV, n_heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self._field(Keys.LLM.CONTEXT_LENGTH, 2048)),
            "rms_norm_eps": float(self._field(Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
            "rope_theta": rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "bos_token_id": int(bos) if bos is not None else None,
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
            "torch_dtype": "float32",  # what iter_weights yields after dequantization
        }
        rotary_dim = self._field(Keys.Rope.DIMENSION_COUNT)
        if rotary_dim is not None and int(rotary_dim) != head_dim:
            cfg["partial_rotary_factor"] = int(rotary_dim) / head_dim
        window = self._field(Keys.Attention.SLIDING_WINDOW)
        if window:
            cfg["sliding_window"] = int(window)
        rope_scaling = self._rope_scaling(rotary_dim or head_dim, rope_theta)
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
        return cfg

    def _array_len(self, key: str) -> int:
        field = self._reader.get_field(key)
        return len(field.data) if field is not None else 0

    def _rope_scaling(self, rotary_dim: int, rope_theta: float) -> dict[str, Any] | None:
        kind = self._field(Keys.Rope.SCALING_TYPE)
        factor = self._field(Keys.Rope.SCALING_FACTOR) or self._field("{arch}.rope.scale_linear")
        if kind in (None, "none") and factor and not kind:
            kind = "linear"  # older files: only {arch}.rope.scale_linear
        if kind not in (None, "none"):
            rs: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor or 1.0)}
            orig = self._field(Keys.Rope.SCALING_ORIG_CTX_LEN)
            if orig:
                rs["original_max_position_embeddings"] = int(orig)
            return rs
        freqs = next((t for t in self._reader.tensors if t.name == _ROPE_FREQS), None)
        if freqs is None:
            return None
        return self._llama3_from_rope_freqs(np.asarray(freqs.data, dtype=np.float32).reshape(-1), rotary_dim, rope_theta)

    def _llama3_from_rope_freqs(self, divisors: np.ndarray, rotary_dim: int, rope_theta: float) -> dict[str, Any]:
        """Llama 3.1+ GGUFs carry the llama3 rope scaling as a tensor of per-frequency divisors instead
        of config numbers. Every Llama 3.x release uses low/high_freq_factor 1/4 and an original context
        of 8192, with the largest divisor as the factor; rebuild those and check they reproduce the tensor."""
        rs = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        expected = llama3_rope_divisors(rotary_dim, rope_theta, rs)
        if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-4):
            raise WeightsError(
                f"{self.path}: tensor {_ROPE_FREQS!r} does not match llama3 rope scaling "
                f"(factor {rs['factor']}, low/high 1/4, original context 8192); this rope variant is not supported"
            )
        return rs

    # ---- tensors ---------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_qtypes(self) -> dict[str, GGMLQuantizationType]:
        """HF name -> GGML storage type, without reading any data."""
        return {name: t.tensor_type for name, t in self._tensors.items()}

    def tensor_dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def disk_size_bytes(self) -> int:
        return os.path.getsize(self.path)

    def _heads_for(self, name: str) -> int | None:
        """Number of heads whose rows llama.cpp permuted in this tensor, or None if not permuted."""
        if not self._permuted:
            return None
        if ".self_attn.q_proj." in name:
            return self.config.num_attention_heads
        if ".self_attn.k_proj." in name:
            return self.config.num_key_value_heads
        return None

    def _lookup(self, name: str) -> tuple[str, Any]:
        t = self._tensors.get(name)
        if t is None:  # accept the GGUF spelling too
            hf = gguf_to_hf_name(name)
            t = self._tensors.get(hf)
            name = hf
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return name, t

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by HF (or GGUF) name, dequantized to float32, HF layout."""
        name, t = self._lookup(name)
        return self._load(name, t)

    def raw_tensor(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
        """A tensor's stored bytes without dequantizing: (uint8 array, GGML type, HF shape).

        The array is (out_features, bytes_per_row) for 2-D tensors, (n_bytes,) for 1-D; each row is a
        run of whole quantization blocks along in_features. Rows of q/k are already put back into HF
        order (a row permutation, so still lossless). It may be a read-only view of the memory map.
        """
        name, t = self._lookup(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = np.asarray(t.data).view(np.uint8)
        raw = raw.reshape(shape[0], -1) if len(shape) == 2 else raw.reshape(-1)
        n_head = self._heads_for(name)
        if n_head is not None:
            raw = unpermute_rows(raw, n_head)
        return raw, t.tensor_type, shape

    def _load(self, name: str, t: Any) -> torch.Tensor:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise WeightsError(
                f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which cannot be "
                f"dequantized (supported: {', '.join(SUPPORTED_TYPES)})"
            ) from e
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot decode tensor {t.name!r} ({t.tensor_type.name}): {e}") from e
        if arr.shape != shape:
            raise WeightsError(f"{self.path}: tensor {t.name!r} decoded to shape {arr.shape}, expected {shape}")
        n_head = self._heads_for(name)
        if n_head is not None:
            try:
                arr = unpermute_rows(arr, n_head)
            except ValueError as e:
                raise WeightsError(f"{self.path}: tensor {t.name!r}: {e}") from e
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # an F32 view into the read-only map
            arr = np.ascontiguousarray(arr).copy()
        return torch.from_numpy(arr.astype(np.float32, copy=False))

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        bar = tqdm(self._tensors.items(), total=len(self._tensors), desc=f"Loading {os.path.basename(self.path)}",
                   unit="tensor", disable=not self._show_progress, leave=False)
        for name, t in bar:
            yield name, self._load(name, t)

    # ---- tokenizer -------------------------------------------------------------------------------

    def load_tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            from vramwise.tokenizer import Tokenizer

            if self._reader.get_field(Keys.Tokenizer.LIST) is None:
                raise WeightsError(f"{self.path}: the GGUF file carries no tokenizer (no tokenizer.ggml.tokens)")
            try:
                self._tokenizer = Tokenizer.from_gguf(self.path, extra_eos_token_ids=self.config.eos_token_ids)
            except Exception as e:
                raise WeightsError(f"{self.path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
        return self._tokenizer

    def close(self) -> None:
        # Dropping the reader (and the tensors' views) unmaps the file.
        self._tensors = {}
        self._reader = None  # type: ignore[assignment]


def llama3_rope_divisors(rotary_dim: int, rope_theta: float, rs: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, (rotary_dim // 2,): 1 for short wavelengths,
    `factor` for long ones, a smooth blend between (what llama.cpp stores as rope_freqs.weight)."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    return divisors.astype(np.float32)
