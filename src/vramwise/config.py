"""Configuration dataclasses: what the model is (ModelConfig) and how the engine runs it (EngineConfig).

Small frozen dataclasses, no environment variables as a second configuration system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def parse_size(text: str | int | float) -> int:
    """Parse a memory size such as "6GiB", "512MiB", "1.5G" or 1024 into bytes.

    Decimal units (GB) are powers of 1000, binary ones (GiB) powers of 1024, as in the IEC convention;
    a bare "G" is taken as GiB because that is what users of GPU tools mean by it.
    """
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"size must be non-negative, got {text}")
        return int(text)
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: expected a number with an optional unit, e.g. 6GiB or 512MiB")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit in ("k", "m", "g", "t"):
        unit += "i"
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(number * _UNITS[unit])


def format_size(n: int | float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, read from an HF config.json or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a transformers config.json dictionary."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model family it is")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        rs = cfg.get("rope_scaling") or {}
        rope_theta = float(cfg.get("rope_theta", rs.get("rope_theta", 10000.0)) or 10000.0)
        if "rope_parameters" in cfg and isinstance(cfg["rope_parameters"], dict):  # transformers >= 5 spelling
            rp = cfg["rope_parameters"]
            rope_theta = float(rp.get("rope_theta", rope_theta))
            if rp.get("rope_type", "default") != "default":
                rs = rp
        kind = (rs.get("rope_type") or rs.get("type") or "default") if rs else "default"
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
        scaling = RopeScaling(
            kind=kind,
            factor=float(rs.get("factor", 1.0)) if rs else 1.0,
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)) if rs else 1.0,
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)) if rs else 4.0,
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)) if rs else 8192,
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        arch = archs[0]
        # Qwen2 puts a bias on q/k/v without saying so in its config.
        attention_bias = bool(cfg.get("attention_bias", False)) or arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    def with_overrides(self, **kw: Any) -> "ModelConfig":
        return replace(self, **kw)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: blocks of `block_size` token slots, shared by all sequences."""

    block_size: int = 16
    num_gpu_blocks: int | None = None  # None: sized from memory (see memory/)
    kv_cache_memory: int | None = None  # bytes for the KV pool when num_gpu_blocks is None
    cache_dtype: str = "auto"  # KV pages: "auto" follows the model dtype; fp16 | bf16 | fp32 | int8 | fp8 (kernels/kv_quant.py)
    # Bytes of host memory where preempted sequences' KV is swapped (engine/kv_swap.py); 0 = recompute only.
    swap_space: int = 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096  # tokens run in one step (prefill chunks + decodes)
    max_model_len: int = 2048


@dataclass(frozen=True)
class MemoryBudgetConfig:
    """The process's GPU-memory budget (memory/enforce.py). Neither size given = no budget (today's
    behaviour: everything the engine asks for, the KV pool from kv_cache_memory / num_gpu_blocks).

    gpu_memory              bytes the whole process may hold on the GPU as NVML sees it
    gpu_memory_utilization  the same as a fraction of the card's total memory, in (0, 1]
    device_profile          what the planner costs placements with: None / "auto" = `vramwise doctor`'s
                            cached measurements (else the built-in h100 figures) with the real card's memory;
                            a built-in name (h100, rtx2060), a JSON path, or a DeviceProfile object (tests
                            inject one with a fake capacity to plan on a CPU-only machine)
    check_nvml              after the warm-up, refuse to start when NVML's per-process peak exceeds the budget
    """

    gpu_memory: int | None = None
    gpu_memory_utilization: float | None = None
    device_profile: Any = None
    check_nvml: bool = True

    @property
    def enabled(self) -> bool:
        return self.gpu_memory is not None or self.gpu_memory_utilization is not None


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # path, .gguf file, hub id; None = the bundled SmolLM2
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = fp32 on CPU, fp16 (bf16 if checkpoint is bf16) on CUDA
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    show_progress: bool = True
    # Weight quantization plan (model_loader.py): None/"auto" = the checkpoint's own (packed on CUDA, dequantized
    # on CPU), "native" = keep it packed everywhere, "none" = float, "int8" / "int4-g128" / ... = RTN at load.
    quantization: str | None = None
    # lm_head format: None = as loaded; 8 / 4 = RTN int8 per channel / int4 g128 at load (llama.cpp's Q4_0
    # preset keeps its output matrix at Q6_K, so an int4 model with an int8 head is the like-for-like one);
    # 16 = float (a packed head in the checkpoint is dequantized). A head tied to the embedding stays float.
    lm_head_bits: int | None = None
    # Layer placement (memory/offload.py): None = all on the device; otherwise a spec such as "streamed",
    # "resident:20,streamed:20" or "r,s,c,..." (resident | streamed | cpu per decoder layer).
    offload: str | None = None
    num_stream_buffers: int = 2  # GPU slots in the streaming ring (prefetch depth is this minus one)
    # How CPU-computed layers hold their weights (--cpu-weights, the planner's DriverCaps.cpu_weights): "fp32"
    # (dequantized, fp32 compute), "bf16" (dequantized, bf16 compute and KV), "packed" (int4/int8 linears kept
    # packed for torch's CPU kernels, quant/cpu_packed.py; the rest in fp32). The planner costs the same choice.
    # "auto": packed under a --gpu-memory budget on a GPU, else fp32 (memory/offload.resolve_driver_options).
    cpu_weights: str = "auto"
    # Prefill offload (--prefill-offload; memory/offload.py "Prefill offload", the planner's
    # DriverCaps.prefill_offload): steps of at least prefill_offload_min_tokens tokens run the CPU-computed layers
    # on the GPU from a copy of their weights. The threshold is the planner's under a --gpu-memory budget unless
    # given; with --offload and no budget, DEFAULT_PREFILL_OFFLOAD_MIN_TOKENS unless given.
    prefill_offload: bool | None = None  # None: on under a --gpu-memory budget on a GPU, else off
    prefill_offload_min_tokens: int | None = None
    # Decode fast path (engine/cuda_graphs.py): all-decode steps replay CUDA graphs captured for a ladder of
    # batch sizes. enforce_eager turns that off. decode_graphs: "auto" (graphs on CUDA, none on CPU),
    # "emulate" (pad to the ladder and run the padded batch eagerly through the same static buffers: the
    # graph path's bookkeeping, testable on CPU; on CUDA the eager twin of the captured steps), "off".
    enforce_eager: bool = False
    decode_graphs: str = "auto"
    # Launch step N+1 before reading step N's sampled ids back (engine/llm_engine.py): the host's work between
    # two steps overlaps the GPU. Same greedy/seeded outputs either way; False runs one step at a time.
    async_scheduling: bool = True
    # Experimental, off by default: long prefills of a resident int4 model dequantize the next weight on a side
    # stream while the current GEMM runs (kernels/dequant_pipeline.py; two workspaces); never under a budget or
    # with offload. Off because on the H100 it moved the bundled fp16 model's greedy tokens away from
    # transformers' (6 matching instead of >= 16 in test_smollm2_fp16_matches_transformers) and its engine-level
    # TTFT gain was within noise (13B, 512 tokens: 60.0 / 58.5 ms against 67.0 / 61.6 ms).
    dequant_pipeline: bool = False
    # One matmul for q/k/v and one for gate/up (models/fuse.py), applied after loading; False keeps them apart.
    fuse_projections: bool = True
    memory: MemoryBudgetConfig = field(default_factory=MemoryBudgetConfig)  # --gpu-memory and friends
