"""GPU-memory budget terms, computed from the model's shape before anything is loaded.

    process GPU memory = CUDA context + resident weights + streaming buffers + KV pool
                         + activations + workspace + CUDA-graph pools + safety margin

Every function here is plain arithmetic on a ModelConfig (no torch), so the planner and its tests run in
milliseconds. All sizes are in bytes. Notation used in the docstrings:

    h  hidden_size          i  intermediate_size       V  vocab_size        n_l  num_hidden_layers
    q  num_heads*head_dim   kv num_kv_heads*head_dim   d  head_dim          H_kv num_key_value_heads
    T  tokens in one step (max_num_batched_tokens)     S  sequences in one step (max_num_seqs)
    a  bytes per activation element (2: fp16/bf16)

Weight bytes follow the packed layouts of ``vramwise.quant.formats`` exactly (int32 codes 8 per word, one
fp16 scale and one fp16 min per group for 4-bit; int8 codes and one fp16 scale per group or channel for
8-bit), so `WeightFormat.bytes_for` equals `QuantSpec.weight_bytes` for the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vramwise.config import ModelConfig, format_size

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Tokens per KV block (engine/block_manager.py and KVCache use 16).
KV_BLOCK_SIZE = 16
#: Bytes per element of an activation tensor on the GPU (fp16 / bf16).
ACT_BYTES = 2
#: Bytes per (row, vocab entry) of the logits path: fp16 lm_head output (2) + its fp32 copy for the sampler
#: (4) + a softmax / top-p temporary (4) + a sort's values and int64 indices (4 + 8)... the sampler's peak,
#: rounded: 2 + 4 + 4 + 8 = 18.
LOGITS_BYTES_PER_ENTRY = 18
#: The W4A16/W8A16 long-prefill path dequantizes weights into a bounded workspace
#: (kernels/w4a16.py DEQUANT_WORKSPACE_BYTES) from this many rows on (DEQUANT_MIN_M).
DEQUANT_WORKSPACE_BYTES = 64 * MiB
#: Workspace sizes the planner weighs for that pass: a larger one dequantizes each weight in fewer column chunks,
#: so an eager prefill launches fewer kernels (costmodel.eager_prefill_launches: 42 a 13B layer at 64 MiB, 30 at
#: 96 MiB), but leaves less of the budget to the KV pool, the ring and resident layers.
DEQUANT_WORKSPACE_CHOICES = (64 * MiB, 96 * MiB, 128 * MiB, 160 * MiB)
DEQUANT_MIN_TOKENS = 256
#: That pass dequantizes a weight in column chunks of whole multiples of this many output channels.
DEQUANT_CHUNK_ALIGN = 128
#: Split-K decode attention: about this many programs per SM, each with (head_dim + 2) fp32 partials per
#: query head of its group (kernels/paged_attention_triton.py _PROGRAMS_PER_SM).
ATTN_PROGRAMS_PER_SM = 4
#: The decode kernel's fused split-K merge keeps one int32 ticket counter per (sequence, kv head) it splits
#: for, in one buffer per device that lives as long as the process (CUDA graphs capture its address). The
#: kernel splits only while sequences x kv heads < ATTN_PROGRAMS_PER_SM x SMs, and the buffer's capacity is
#: that rounded up to a power of two (kernels/paged_attention_triton.py ticket_capacity): 4 KiB on an H100.
ATTN_TICKET_BYTES = 4
#: Device memory of one instantiated CUDA graph beyond its pool (kernel parameters, exec object); measured
#: sizes are ~0.2-1 MiB for a 40-layer decode graph, rounded up.
CUDA_GRAPH_OVERHEAD_BYTES = 1 * MiB
#: The caching allocator's segment granularity for small blocks (<= 1 MiB: every tensor of a decode step at
#: 32 sequences): the CUDA-graph pool, measured as torch's reserved bytes around capture, grows in these.
ALLOCATOR_SEGMENT_BYTES = 2 * MiB
#: Allocator fragmentation and whatever the accounting misses (NCCL-free, but cuBLASLt, Triton launchers,
#: caching-allocator rounding to 2 MiB segments): margin = fraction * budget + floor.
MARGIN_FRACTION = 0.02
MARGIN_FLOOR_BYTES = 32 * MiB


# --------------------------------------------------------------------------------------------------------
# Weight formats
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFormat:
    """How one weight matrix is stored: a torch-free mirror of QuantSpec that also covers fp16.

    bits        32 (fp32: what the CPU path holds after dequantizing at load), 16 (fp16/bf16, unquantized),
                8 (int8 codes + fp16 scale per group or output channel) or 4 (int4 codes + fp16 scale and
                fp16 min per group of `group_size` inputs).
    group_size  inputs per scale; None = per output channel (8-bit only). Ignored for 16 bits.
    symmetric   4-bit Q4_0-style codes (mins are still stored, as -8 * scale; same bytes).

    Bytes of an (out N, in K) matrix with G = group_size (K for per-channel):
        32-bit: 4 N K
        16-bit: 2 N K
         8-bit: N K + 2 N (K / G)           (one fp16 scale per group)
         4-bit: N K / 2 + 4 N (K / G)       (fp16 scale + fp16 min per group)
    so int4 g128 costs 4 + 32/128 = 4.25 bits per weight, int8 per-channel 8 + 16/K.
    """

    bits: int = 16
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"unsupported weight bits {self.bits!r}: choose 4, 8, 16 (or 32 for fp32)")
        if self.bits == 4 and (self.group_size is None or self.group_size <= 0):
            raise ValueError("4-bit weights are group-wise: give a group size (32, 64 or 128)")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group size must be positive, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def name(self) -> str:
        """'fp16', 'fp32', 'w8', 'w8g32', 'w4g128', 'w4g32s' (QuantSpec's spelling for quantized formats)."""
        if self.bits >= 16:
            return f"fp{self.bits}"
        g = "" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}{'s' if self.bits == 4 and self.symmetric else ''}"

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def bytes_for(self, out_features: int, in_features: int) -> int:
        """Bytes of an (out_features, in_features) weight in this format (codes + scales + mins)."""
        if self.bits >= 16:
            return self.bits // 8 * out_features * in_features
        groups = math.ceil(in_features / self.group_size_for(in_features))
        codes = out_features * in_features * self.bits // 8
        per_group = 2 if self.bits == 4 else 1  # fp16 scale (+ fp16 min for int4)
        return codes + groups * out_features * per_group * 2

    def bits_per_weight(self, in_features: int) -> float:
        return 8 * self.bytes_for(1, in_features) / in_features

    @classmethod
    def from_spec(cls, spec: Any) -> "WeightFormat":
        """From a WeightFormat, a vramwise.quant.formats.QuantSpec (duck-typed: .bits, .group_size,
        .symmetric; importing it would pull in torch), None (fp16), or an int number of bits."""
        if spec is None:
            return FP16
        if isinstance(spec, WeightFormat):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls.for_bits(spec)
        bits = getattr(spec, "bits", None)
        if bits is None:
            raise TypeError(f"cannot read a weight format from {spec!r}: expected a QuantSpec or WeightFormat")
        return cls(int(bits), getattr(spec, "group_size", None), bool(getattr(spec, "symmetric", False) or False))

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = -1) -> "WeightFormat":
        """The project's default format for a bit width: w4g128, w8 (per channel), fp16, fp32.
        group_size=-1 means that default; None means per channel."""
        if bits >= 16:
            return cls(bits)
        if group_size == -1:
            group_size = 128 if bits == 4 else None
        return cls(bits, group_size)


FP16 = WeightFormat(16)
FP32 = WeightFormat(32)

#: Linear modules of one Llama-family decoder layer: (name, out_features, in_features) as functions of the
#: config. Names are those of models/llama.py (and of the HF checkpoints).
_LAYER_LINEARS = (
    ("self_attn.q_proj", lambda c: (c.q_size, c.hidden_size)),
    ("self_attn.k_proj", lambda c: (c.kv_size, c.hidden_size)),
    ("self_attn.v_proj", lambda c: (c.kv_size, c.hidden_size)),
    ("self_attn.o_proj", lambda c: (c.hidden_size, c.q_size)),
    ("mlp.gate_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    ("mlp.up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    ("mlp.down_proj", lambda c: (c.hidden_size, c.intermediate_size)),
)


@dataclass(frozen=True)
class QuantScheme:
    """Weight format of every module: a default for decoder-layer linears, per-module overrides, and the
    embedding and lm_head formats.

    overrides maps a module name to a format. A name matches a module when it equals the module's full
    name ("model.layers.3.mlp.down_proj") or is a dotted suffix of it ("mlp.down_proj", "down_proj"); the
    longest matching name wins. This is the shape of the loader's quantization plan (model_loader.py),
    so a GGUF file with Q4_1 attention and Q8_0 MLP is described exactly.
    """

    linear: WeightFormat = FP16
    overrides: tuple[tuple[str, WeightFormat], ...] = ()
    embed_tokens: WeightFormat = FP16
    lm_head: WeightFormat = FP16

    def for_module(self, name: str) -> WeightFormat:
        best: tuple[int, WeightFormat] | None = None
        for pattern, fmt in self.overrides:
            if name == pattern or name.endswith("." + pattern):
                if best is None or len(pattern) > best[0]:
                    best = (len(pattern), fmt)
        return best[1] if best is not None else self.linear

    @property
    def any_linear_quantized(self) -> bool:
        """Whether some decoder-layer linear is quantized (the default format or an override): the long-prefill
        dequantize workspace is then needed."""
        return self.linear.quantized or any(f.quantized for _, f in self.overrides)

    @property
    def name(self) -> str:
        """Short description: 'w4g128' or 'w4g128 (+3 overrides), lm_head w8'."""
        s = self.linear.name
        if self.overrides:
            kinds = sorted({f.name for _, f in self.overrides})
            s += f" (+{len(self.overrides)} modules: {', '.join(kinds)})"
        if self.lm_head not in (FP16, self.linear):
            s += f", lm_head {self.lm_head.name}"
        if self.embed_tokens not in (FP16, self.linear):
            s += f", embeddings {self.embed_tokens.name}"
        return s


def resolve_quant(quant: Any) -> QuantScheme:
    """A QuantScheme from what callers have at hand:

    - None: fp16 everywhere;
    - a QuantSpec / WeightFormat / bit count: every decoder-layer linear in that format, embeddings and
      lm_head fp16 (what `--quantization int4` does at load);
    - a QuantScheme: as is;
    - a mapping of module name -> QuantSpec/WeightFormat/None (the loader's per-module plan): those
      modules in those formats, everything else fp16. The keys "lm_head" and "model.embed_tokens" (or
      "embed_tokens") set those two; a key "default" sets the decoder-layer default.
    """
    if quant is None:
        return QuantScheme()
    if isinstance(quant, QuantScheme):
        return quant
    if isinstance(quant, Mapping):
        linear, embed, lm_head = FP16, FP16, FP16
        overrides: list[tuple[str, WeightFormat]] = []
        for name, spec in quant.items():
            fmt = WeightFormat.from_spec(spec)
            if name == "default":
                linear = fmt
            elif name in ("lm_head", "output"):
                lm_head = fmt
            elif name in ("embed_tokens", "model.embed_tokens"):
                embed = fmt
            else:
                overrides.append((name, fmt))
        return QuantScheme(linear, tuple(overrides), embed, lm_head)
    return QuantScheme(linear=WeightFormat.from_spec(quant))


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelWeights:
    """Bytes and parameter counts of each placeable piece of a model, in the formats of a QuantScheme.

    layer_bytes[l]   decoder layer l: its 7 linears in their formats + 2 RMSNorm weights (2 h a)
                     + q/k/v biases where the config has them
    layer_params[l]  multiply-accumulate weights of layer l's linears (flops per token = 2 x this)
    embed_bytes      V x h embedding table in its format (only B rows are read per step)
    lm_head_bytes    V x h output projection (a GPU copy of the embedding when tied) + final norm (2 h)
    lm_head_params   V x h
    """

    layer_bytes: tuple[int, ...]
    layer_params: tuple[int, ...]
    embed_bytes: int
    lm_head_bytes: int
    lm_head_params: int

    @property
    def total_layer_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        """Everything, embeddings included (an upper bound for 'all on the GPU')."""
        return self.total_layer_bytes + self.embed_bytes + self.lm_head_bytes


def _float_bytes(scheme: QuantScheme) -> int:
    """Bytes per element of the float tensors beside the linears (norms, biases): fp32 in an fp32 scheme
    (the CPU path), else the GPU's fp16."""
    return 4 if scheme.linear.bits == 32 else ACT_BYTES


def layer_weight_bytes(model: ModelConfig, scheme: QuantScheme, layer: int = 0) -> int:
    """Bytes of decoder layer `layer`: Σ linears in their formats + 2 norm vectors (+ q/k/v biases)."""
    elem = _float_bytes(scheme)
    total = 2 * model.hidden_size * elem  # input_layernorm + post_attention_layernorm weights
    if model.attention_bias:
        total += (model.q_size + 2 * model.kv_size) * elem
    for name, shape in _LAYER_LINEARS:
        out_f, in_f = shape(model)
        total += scheme.for_module(f"model.layers.{layer}.{name}").bytes_for(out_f, in_f)
    return total


def layer_params(model: ModelConfig) -> int:
    """Linear weights of one decoder layer: h (q + 2 kv) + q h + 3 h i."""
    h = model.hidden_size
    return h * (model.q_size + 2 * model.kv_size) + model.q_size * h + 3 * h * model.intermediate_size


def model_weights(model: ModelConfig, quant: Any = None) -> ModelWeights:
    """Per-piece bytes of `model` quantized as `quant` (anything resolve_quant takes)."""
    scheme = resolve_quant(quant)
    n = model.num_hidden_layers
    v, h = model.vocab_size, model.hidden_size
    embed = scheme.embed_tokens.bytes_for(v, h)
    head_fmt = scheme.embed_tokens if model.tie_word_embeddings else scheme.lm_head
    lm_head = head_fmt.bytes_for(v, h) + h * _float_bytes(scheme)  # + final RMSNorm weight
    return ModelWeights(
        layer_bytes=tuple(layer_weight_bytes(model, scheme, l) for l in range(n)),
        layer_params=tuple(layer_params(model) for _ in range(n)),
        embed_bytes=embed,
        lm_head_bytes=lm_head,
        lm_head_params=v * h,
    )


# --------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------

#: KV cache dtypes: name -> (bytes per element, bytes of scale per (token, kv head) for K and for V).
#: int8 and fp8 (e4m3 codes) store one fp16 scale per token and kv head (per-token-head scaling,
#: kernels/kv_quant.py).
KV_DTYPES: dict[str, tuple[int, int]] = {
    "fp16": (2, 0), "bf16": (2, 0), "fp32": (4, 0), "int8": (1, 2), "fp8": (1, 2),
}
_KV_ALIASES = {"auto": "fp16", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
               "fp8_e4m3": "fp8", "float8": "fp8"}


def normalize_kv_dtype(kv_dtype: str) -> str:
    key = _KV_ALIASES.get(kv_dtype.lower(), kv_dtype.lower())
    if key not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return key


def kv_bytes_per_token_layer(model: ModelConfig, kv_dtype: str = "fp16") -> int:
    """KV bytes one token adds to one layer: 2 (K and V) x H_kv x (d x elem + scale bytes).

    Llama-2-13B fp16: 2 x 40 x 128 x 2 = 20,480 B; int8: 2 x 40 x (128 + 2) = 10,400 B.
    """
    elem, scale = KV_DTYPES[normalize_kv_dtype(kv_dtype)]
    return 2 * model.num_key_value_heads * (model.head_dim * elem + scale)


def kv_bytes_per_token(model: ModelConfig, kv_dtype: str = "fp16", num_layers: int | None = None) -> int:
    """KV bytes per token over `num_layers` layers (default all): 2 x n_l x H_kv x d x elem (+ scales).

    Llama-2-13B fp16: 2 x 40 x 40 x 128 x 2 = 819,200 B = 0.8 MiB per token.
    """
    n = model.num_hidden_layers if num_layers is None else num_layers
    return n * kv_bytes_per_token_layer(model, kv_dtype)


def kv_pool_bytes(model: ModelConfig, num_tokens: int, num_layers: int, kv_dtype: str = "fp16",
                  block_size: int = KV_BLOCK_SIZE) -> int:
    """Bytes of a paged pool holding `num_tokens` tokens (rounded up to whole blocks) for `num_layers`."""
    blocks = math.ceil(num_tokens / block_size)
    return blocks * block_size * kv_bytes_per_token(model, kv_dtype, num_layers)


# --------------------------------------------------------------------------------------------------------
# Activations, workspace, CUDA graphs, margin
# --------------------------------------------------------------------------------------------------------


def activation_bytes(model: ModelConfig, num_tokens: int, num_seqs: int, act_bytes: int = ACT_BYTES) -> int:
    """Peak live activations of one forward step over T = num_tokens tokens and S = num_seqs sampled rows.

        T a max(3h + 3i, 3h + 3q + 3kv) + S V 18

    The first term is the larger of the two sublayers' live tensors: in the MLP the residual, the normed
    input, gate and up (2i), silu(gate)*up (i) and the output (h); in attention the residual, the normed
    input, q/k/v (q + 2kv), the rotated q and k (q + kv), the attention output (q) and o_proj's output (h).
    The second is the logits path for one row per sequence (LOGITS_BYTES_PER_ENTRY). Prompt logprobs, which
    need logits for every prompt row, are not counted.
    """
    h, i, q, kv = model.hidden_size, model.intermediate_size, model.q_size, model.kv_size
    per_token = act_bytes * max(3 * h + 3 * i, 3 * h + 3 * q + 3 * kv)
    return num_tokens * per_token + num_seqs * model.vocab_size * LOGITS_BYTES_PER_ENTRY


def dequant_chunk_columns(in_features: int, elem_bytes: int, workspace_bytes: int,
                          minimum: int = DEQUANT_CHUNK_ALIGN) -> int:
    """Output channels per column chunk when the long-prefill path dequantizes a (K = in_features, N) weight
    into a workspace of workspace_bytes, elem_bytes per value: as many whole multiples of DEQUANT_CHUNK_ALIGN as
    fit, at least `minimum`. The kernels (w4a16, w8a16, dequant_pipeline) and the planner's launch count
    (costmodel.eager_prefill_launches) chunk alike through this."""
    return max(minimum, workspace_bytes // (in_features * elem_bytes) // DEQUANT_CHUNK_ALIGN * DEQUANT_CHUNK_ALIGN)


def workspace_bytes(model: ModelConfig, num_tokens: int, max_model_len: int, *, quantized: bool,
                    num_sms: int = 132, library_workspace: int = 32 * MiB, act_bytes: int = ACT_BYTES,
                    dequant_bytes: int | None = None) -> int:
    """Scratch memory that is not an activation:

        attention   L x 2 x q x a            K/V of one max-length sequence gathered (and repeated over
                                             the query groups) by the SDPA prefill path
                  + 4 x SMs x (q / kv) x (d + 2) x 4    split-K decode partials (fp32)
                  + pow2(4 x SMs) x 4                    ticket counters of the fused split-K merge
        dequant     dequant_bytes (default DEQUANT_WORKSPACE_BYTES; the planner picks one of
                    DEQUANT_WORKSPACE_CHOICES) when weights are quantized and a step has >= 256 tokens
        library     cuBLAS/cuBLASLt workspace (32 MiB on Hopper)
    """
    gathered = max_model_len * 2 * model.q_size * act_bytes
    group = max(1, model.num_attention_heads // max(1, model.num_key_value_heads))
    partials = ATTN_PROGRAMS_PER_SM * num_sms * group * (model.head_dim + 2) * 4
    partials += attention_ticket_bytes(num_sms)
    dq = DEQUANT_WORKSPACE_BYTES if dequant_bytes is None else dequant_bytes
    dequant = dq if quantized and num_tokens >= DEQUANT_MIN_TOKENS else 0
    return gathered + partials + dequant + library_workspace


def attention_ticket_bytes(num_sms: int) -> int:
    """The decode kernel's ticket-counter buffer on a device of num_sms SMs (see ATTN_TICKET_BYTES)."""
    return (1 << max(0, ATTN_PROGRAMS_PER_SM * num_sms - 1).bit_length()) * ATTN_TICKET_BYTES


def cuda_graph_capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs: powers of two below max_num_seqs, then max_num_seqs itself.
    The engine captures exactly these (engine/cuda_graphs.graph_ladder), so the plan counts what is captured."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = []
    b = 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return sizes


def cuda_graph_bytes(model: ModelConfig, capture_sizes: list[int], *, embeddings_on_host: bool = False) -> int:
    """An upper bound of the CUDA-graph pool the engine measures (torch's reserved bytes before and after
    capture, engine/cuda_graphs.py): graphs captured largest first share one private pool, which holds the
    activations of the largest captured batch B (its logits rows counted too, although the logits stay
    eager); with the token embedding on the host, the device rows a captured step reads (B, hidden), which
    are allocated inside the measured window (OffloadDriver.prepare_step_capture). The pool grows in the
    allocator's segments, so the sum is rounded up to them; each graph adds its own small exec state:

        round_up(activation_bytes(B tokens, B seqs) [+ B hidden 2], 2 MiB) + n_graphs x 1 MiB
    """
    if not capture_sizes:
        return 0
    top = max(capture_sizes)
    pool = activation_bytes(model, top, top)
    if embeddings_on_host:
        pool += top * model.hidden_size * ACT_BYTES  # the staged embedding rows, in the table's (16-bit) dtype
    pool = -(-pool // ALLOCATOR_SEGMENT_BYTES) * ALLOCATOR_SEGMENT_BYTES
    return pool + len(capture_sizes) * CUDA_GRAPH_OVERHEAD_BYTES


def rotary_table_bytes(model: ModelConfig) -> int:
    """The rotary cos/sin table on the device (models/layers.py RotaryEmbedding): (max positions, head_dim)
    fp32, built for the model's whole context (2 MiB for Llama-2: 4096 x 128 x 4)."""
    return model.max_position_embeddings * model.head_dim * 4


def safety_margin_bytes(budget_bytes: int) -> int:
    """Fragmentation and unaccounted allocations: 2% of the budget + 32 MiB."""
    return int(MARGIN_FRACTION * budget_bytes) + MARGIN_FLOOR_BYTES


# --------------------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """Every term of the process's GPU memory, in bytes, as planned. total <= limit for a valid plan."""

    limit: int
    cuda_context: int = 0
    resident_weights: int = 0
    stream_buffers: int = 0
    kv_pool: int = 0
    activations: int = 0
    workspace: int = 0
    cuda_graphs: int = 0
    margin: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # term name -> how it was computed

    TERMS = ("cuda_context", "resident_weights", "stream_buffers", "kv_pool", "activations", "workspace",
             "cuda_graphs", "margin")

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in self.TERMS)

    @property
    def fixed(self) -> int:
        """The terms that do not depend on placement: context, activations, workspace, graphs, margin."""
        return self.cuda_context + self.activations + self.workspace + self.cuda_graphs + self.margin

    @property
    def free(self) -> int:
        return self.limit - self.total

    def fits(self) -> bool:
        return self.total <= self.limit

    def rows(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) per term, for printing."""
        labels = {
            "cuda_context": "CUDA context", "resident_weights": "resident weights",
            "stream_buffers": "streaming buffers", "kv_pool": "KV pool", "activations": "activations",
            "workspace": "workspace", "cuda_graphs": "CUDA graphs", "margin": "safety margin",
        }
        return [(labels[t], getattr(self, t), self.notes.get(t, "")) for t in self.TERMS]

    def describe(self) -> str:
        w = max(len(label) for label, _, _ in self.rows())
        lines = [f"  {label:<{w}}  {format_size(b):>11}  {note}".rstrip() for label, b, note in self.rows()]
        lines.append(f"  {'total':<{w}}  {format_size(self.total):>11}  of {format_size(self.limit)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {t: getattr(self, t) for t in self.TERMS}
        d.update(limit=self.limit, total=self.total, notes=dict(self.notes))
        return d


class BudgetTooSmallError(ValueError):
    """The budget cannot hold even the smallest runnable configuration. The message gives the numbers.

    budget:       the terms of that smallest configuration (its total exceeds budget.limit)
    alternatives: suggestions (planner.Alternative) that would fit, when any were found
    """

    def __init__(self, message: str, budget: Budget | None = None, alternatives: list[Any] | None = None):
        super().__init__(message)
        self.budget = budget
        self.alternatives = list(alternatives or [])


def too_small_message(what: str, budget: Budget, extra: str = "") -> str:
    """'budget 1.00 GiB is too small for <what>: it needs 1.52 GiB (CUDA context 500 MiB + ...)'."""
    parts = " + ".join(f"{label} {format_size(b)}" for label, b, _ in budget.rows() if b)
    msg = (f"GPU memory budget {format_size(budget.limit)} is too small for {what}: it needs at least "
           f"{format_size(budget.total)} ({parts}), {format_size(budget.total - budget.limit)} more than the "
           f"budget")
    return msg + (f"; {extra}" if extra else "")
