"""The planner: what lives on the GPU, what is streamed, what runs on the CPU, how big the KV pool is,
and how fast that will be, all before anything is loaded.

    plan(model, budget_bytes, device, quant, ...) -> Plan

Placements of one decoder layer (and of the lm_head):
    resident   weights live in GPU memory for the whole run
    streamed   weights live in pinned host memory (packed) and are copied into a ring of GPU layer
               buffers on a side stream, prefetched ahead so copies overlap compute; its KV is on the GPU
    cpu        the layer runs on the CPU (weights and KV in host memory); with DriverCaps.prefill_offload,
               long prefill chunks run it on the GPU through the ring buffers (prefill_offload_min_tokens)
Embeddings stay on the CPU unless everything is resident (a step reads only B rows of the table). The lm_head
stays resident unless DriverCaps.lm_head_offload.

The planner plans within what the offload driver can execute (DriverCaps): today's driver
(memory/offload.py) dequantizes CPU layers to fp32 (4 bytes per weight, fp32 KV) or, asked to
(--cpu-weights bf16 | packed: driver_caps), to bf16 or keeps their linears packed for torch's int4/int8 CPU
kernels, and with --prefill-offload runs long prefill steps' CPU layers on the GPU (both the default under
a budget on a GPU: offload.resolve_driver_options); it keeps the lm_head on the device and needs a ring of
>= 2 buffers; DRIVER_NEXT adds what it does not do yet (lm_head offload, CPU-layer KV in the pool dtype),
and plans list it as an alternative with its predicted speed.

Policies: resident (everything), streamed (R layers resident, spread among the streamed rest: see
_spread_resident), cpu (first R layers resident, the rest on the CPU), mixed (the rest split between streamed and CPU layers, interleaved so that each streamed
layer's copy overlaps the CPU compute of its neighbour). For each policy the planner takes the most
resident layers the budget allows after the fixed terms, the stream buffers and a KV pool of at least
max(max_model_len, planned_batch x (prompt_len + gen_len)) tokens, and predicts with the cost model:

    objective = generated tokens/s of the reference workload: B requests of prompt_len tokens that each
                generate gen_len tokens, = B G / (prefill time of the B prompts + G x decode step at B)

It picks the fastest (policy, planned batch <= expected_batch, buffers, chunk size); `force_policy` pins
the policy. Pure arithmetic on plain numbers: no torch, milliseconds per plan.

What the offload driver executes is `Plan.to_dict()`: per-layer placement, ring size and slot bytes, KV
blocks (GPU pool for resident + streamed layers, a host pool of the same block count for CPU layers, so
one block table serves both), the chunk size, the CUDA-graph batch sizes and the prefill-offload
threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vramwise.config import ModelConfig, format_size
from vramwise.memory.budget import (
    ACT_BYTES,
    DEQUANT_MIN_TOKENS,
    DEQUANT_WORKSPACE_BYTES,
    DEQUANT_WORKSPACE_CHOICES,
    FP16,
    FP32,
    KV_BLOCK_SIZE,
    Budget,
    BudgetTooSmallError,
    ModelWeights,
    QuantScheme,
    WeightFormat,
    activation_bytes,
    cuda_graph_bytes,
    cuda_graph_capture_sizes,
    kv_bytes_per_token_layer,
    model_weights,
    normalize_kv_dtype,
    resolve_quant,
    rotary_table_bytes,
    safety_margin_bytes,
    too_small_message,
    workspace_bytes,
)
from vramwise.memory.costmodel import (
    DeviceProfile,
    Op,
    attention_flops,
    copy_time,
    cpu_time,
    dram_shares,
    eager_prefill_launches,
    gpu_time,
    handover_time,
    prefill_dequant_time,
    linear_flops,
    simulate,
)

RESIDENT, STREAMED, CPU = "resident", "streamed", "cpu"
POLICIES = ("resident", "streamed", "cpu", "mixed")
#: max_model_len when the caller gives none: the engine's default, capped by the model's own.
DEFAULT_MAX_MODEL_LEN = 2048
#: Reference workload of the predictions (the issue's benchmark: 512-token prompt, 128 generated).
DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 128
#: Chunk sizes (max_num_batched_tokens) tried when the caller leaves it to the planner.
CHUNK_CANDIDATES = (512, 1024, 2048)
#: Ring buffer counts tried for streamed / mixed placements (at least DriverCaps.min_stream_buffers).
BUFFER_CANDIDATES = (1, 2, 3)


@dataclass(frozen=True)
class DriverCaps:
    """What the offload driver (memory/offload.py) can execute; the planner plans within it.

    cpu_weights         how CPU-computed layers hold their weights: "fp32" (dequantized once at apply time,
                        what the driver does today: 4 bytes per weight, the fp32 GEMM rate), "bf16" (hosts
                        with AMX / AVX512-BF16), or "packed" (as loaded, int4/int8, computed by torch's packed
                        CPU kernels, quant/cpu_packed.py; the cost model then uses cpu_quant_flops)
    cpu_kv_bytes        bytes per KV element of CPU layers (their compute dtype: 4 for fp32); 0 = the pool's
    prefill_offload     long prefill chunks may run CPU layers on the GPU through the ring (their past KV
                        copied in, the new KV copied back), as llama.cpp does for big batches (--prefill-offload;
                        memory/offload.py "Prefill offload"). Planned: Plan.prefill_offload_min_tokens (a step
                        simulated both ways, above max_num_seqs); one more layer of KV pages in the model dtype
                        in the KV term (the twins' device pages); a CPU placement gets one buffer (the twins' own
                        weight slot: nothing streams)
    lm_head_offload     the lm_head may be streamed or computed on the CPU (today it stays on the device)
    min_stream_buffers  smallest ring the driver accepts
    """

    cpu_weights: str = "fp32"
    cpu_kv_bytes: int = 4
    prefill_offload: bool = False
    lm_head_offload: bool = False
    min_stream_buffers: int = 2
    name: str = "today"

    def __post_init__(self) -> None:
        if self.cpu_weights not in ("fp32", "bf16", "packed"):
            raise ValueError(f"unknown CPU weight format {self.cpu_weights!r}; choose fp32, bf16 or packed")


#: The driver as it is (memory/offload.py: CPU layers dequantized to fp32, lm_head on the device, ring >= 2).
DRIVER_TODAY = DriverCaps()


def driver_caps(cpu_weights: str = "fp32", prefill_offload: bool = False) -> DriverCaps:
    """What the driver executes with --cpu-weights `cpu_weights` (fp32 | bf16 | packed) and --prefill-offload:
    the KV of CPU layers is in their compute dtype, fp32 for packed weights too (only the linears are packed;
    memory/offload.py CPU_WEIGHT_FORMATS)."""
    if cpu_weights == "fp32" and not prefill_offload:
        return DRIVER_TODAY
    name = "today" + (f", {cpu_weights} CPU weights" if cpu_weights != "fp32" else "") + (
        ", prefill offload" if prefill_offload else "")
    return DriverCaps(cpu_weights=cpu_weights, cpu_kv_bytes=2 if cpu_weights == "bf16" else 4,
                      prefill_offload=prefill_offload, name=name)


#: Beyond the driver: packed CPU layers and prefill offload (which it runs, the default under a budget on a GPU)
#: plus lm_head offload and CPU layers' KV in the pool's dtype, which it does not do yet (plans list it as an
#: alternative with its predicted speed).
DRIVER_NEXT = DriverCaps(cpu_weights="packed", cpu_kv_bytes=0, prefill_offload=True, lm_head_offload=True,
                         name="+ lm_head offload, CPU-layer KV in the pool dtype (not in the driver yet)")


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Predicted speed of a placement (seconds, tokens/s). Decode steps at a context of
    prompt_len + gen_len / 2 tokens per sequence; TTFT = prefill of one prompt_len prompt at batch 1.

    roofline_* are the same schedule with every fixed overhead (launches, syncs, the engine's step
    work) set to zero: bandwidth and flops alone."""

    prompt_len: int
    gen_len: int
    ttft_s: float
    roofline_ttft_s: float
    decode_step_s_b1: float
    roofline_step_s_b1: float
    batch: int
    decode_step_s: float  # at the planned batch
    roofline_step_s: float
    workload_tok_s: float  # the objective (see the module docstring)

    @property
    def decode_tok_s_b1(self) -> float:
        return 1.0 / self.decode_step_s_b1

    @property
    def decode_tok_s(self) -> float:
        """Aggregate decode tokens/s at the planned batch."""
        return self.batch / self.decode_step_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.ttft_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(decode_tok_s_b1=self.decode_tok_s_b1, decode_tok_s=self.decode_tok_s,
                 prefill_tok_s=self.prefill_tok_s)
        return d


@dataclass
class PolicyOutcome:
    """How one policy fared (for the 'considered' table)."""

    policy: str
    fits: bool
    reason: str = ""
    resident_layers: int = 0
    streamed_layers: int = 0
    cpu_layers: int = 0
    batch: int = 1
    decode_tok_s_b1: float = 0.0
    decode_tok_s: float = 0.0
    ttft_s: float = 0.0
    workload_tok_s: float = 0.0


@dataclass
class Alternative:
    """A change that would fit the model or make it faster, planned out (e.g. int8 KV)."""

    change: str  # in words: "int8 KV cache"
    cli: str  # the flags: "--kv-cache-dtype int8"
    args: dict[str, Any]  # plan() keyword changes
    fits: bool
    reason: str = ""
    policy: str = ""
    resident_share: float = 0.0
    kv_capacity_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s_b1: float = 0.0


@dataclass
class Plan:
    """Where everything lives and how fast it will run. Sizes in bytes, times in seconds.

    layers[l]                   placement of decoder layer l: "resident" | "streamed" | "cpu"
    lm_head                     placement of final norm + lm_head (same vocabulary)
    embeddings                  "gpu" or "cpu"
    num_stream_buffers          ring slots on the GPU (0: none); each holds stream_buffer_bytes, the
                                largest streamed (or prefill-offloaded CPU) piece
    prefill_offload_min_tokens  steps with at least this many prompt tokens run the CPU layers on the GPU
                                through the ring (their KV copied in and the new KV back); None = never
    kv_num_blocks               blocks of kv_block_size tokens in the GPU pool, for the GPU-side layers
                                (resident + streamed); CPU layers get a host pool of as many blocks
    kv_capacity_tokens          kv_num_blocks x kv_block_size
    kv_scratch_blocks           blocks the runner adds to the GPU pool past kv_num_blocks for the decode graphs'
                                padding rows (1 with CUDA graphs); the budget's kv_pool term counts them
    host_weight_bytes           pinned host memory for streamed and CPU pieces (+ embeddings on the CPU)
    max_num_batched_tokens      the prefill chunk the plan was made for
    dequant_workspace_bytes     the long-prefill dequantize workspace the budget's workspace term holds (the engine
                                sets kernels/w4a16.DEQUANT_WORKSPACE_BYTES to it)
    """

    model_name: str
    device: str
    policy: str
    weights: str
    layers: list[str]
    lm_head: str
    embeddings: str
    num_stream_buffers: int
    stream_buffer_bytes: int
    prefill_offload_min_tokens: int | None
    kv_dtype: str
    kv_block_size: int
    kv_num_blocks: int
    kv_capacity_tokens: int
    kv_bytes_per_token: int  # GPU pool bytes per token (GPU-side layers only)
    host_kv_bytes: int
    host_weight_bytes: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cuda_graph_sizes: list[int]
    budget: Budget
    prediction: Prediction
    resident_share: float  # of layer + lm_head weight bytes, on the GPU
    considered: list[PolicyOutcome] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kv_scratch_blocks: int = 0
    dequant_workspace_bytes: int = DEQUANT_WORKSPACE_BYTES

    def layer_indices(self, placement: str) -> list[int]:
        return [i for i, p in enumerate(self.layers) if p == placement]

    @property
    def num_resident(self) -> int:
        return len(self.layer_indices(RESIDENT))

    @property
    def num_streamed(self) -> int:
        return len(self.layer_indices(STREAMED))

    @property
    def num_cpu(self) -> int:
        return len(self.layer_indices(CPU))

    def describe_layers(self) -> str:
        """'layers 0-27 resident, 28-39 streamed'."""
        return describe_placement(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: what an offload driver needs to execute the plan."""
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        d["prediction"] = self.prediction.to_dict()
        return d

    def summary(self) -> str:
        """The text `vramwise plan` prints."""
        p = self.prediction
        lines = [f"model         {self.model_name}  ({self.weights}, {len(self.layers)} layers)",
                 f"device        {self.device}",
                 f"budget        {format_size(self.budget.limit) if self.budget.limit else 'none (no GPU)'}", ""]
        if self.budget.limit or self.budget.total:
            lines.append("GPU memory:")
            lines.append(self.budget.describe())
            lines.append("")
        lines.append(f"placement     {self.policy}: {self.describe_layers()}")
        head = {RESIDENT: "resident", STREAMED: "streamed", CPU: "on the CPU"}[self.lm_head]
        lines.append(f"              lm_head {head}, embeddings on the {self.embeddings.upper()}; "
                     f"{self.resident_share:.0%} of the weights resident")
        if self.num_stream_buffers:
            lines.append(f"              ring of {self.num_stream_buffers} x {format_size(self.stream_buffer_bytes)} "
                         f"stream buffers")
        if self.prefill_offload_min_tokens is not None and self.num_cpu:
            lines.append(f"              CPU layers run on the GPU (through a stream buffer) in steps of >= "
                         f"{self.prefill_offload_min_tokens} tokens (prefill offload)")
        if self.host_weight_bytes or self.host_kv_bytes:
            pinned = " (pinned)" if self.budget.limit else ""
            lines.append(f"host memory   {format_size(self.host_weight_bytes)} weights{pinned}"
                         + (f" + {format_size(self.host_kv_bytes)} KV of the CPU layers" if self.host_kv_bytes else ""))
        seqs = self.kv_capacity_tokens // max(1, p.prompt_len + p.gen_len)
        lines.append(f"KV cache      {self.kv_capacity_tokens:,} tokens ({self.kv_num_blocks} blocks of "
                     f"{self.kv_block_size}, {self.kv_dtype}, {format_size(self.kv_bytes_per_token)}/token on the GPU); "
                     f"max_model_len {self.max_model_len}")
        lines.append(f"              holds {seqs} sequence{'s' if seqs != 1 else ''} of {p.prompt_len}+{p.gen_len} tokens; chunk "
                     f"{self.max_num_batched_tokens} tokens")
        lines.append("")
        lines.append("predicted (roofline in brackets):")
        lines.append(f"  TTFT, {p.prompt_len}-token prompt   {p.ttft_s * 1e3:8.1f} ms  ({p.roofline_ttft_s * 1e3:.1f} ms)"
                     f"  = {p.prefill_tok_s:,.0f} tok/s prefill")
        lines.append(f"  decode, batch 1           {p.decode_tok_s_b1:8.1f} tok/s  ({1 / p.roofline_step_s_b1:.1f})"
                     f"  = {p.decode_step_s_b1 * 1e3:.2f} ms/token")
        if p.batch > 1:
            lines.append(f"  decode, batch {p.batch:<3} (plan) {p.decode_tok_s:8.1f} tok/s aggregate  "
                         f"({p.batch / p.roofline_step_s:.1f})  = {p.decode_step_s * 1e3:.2f} ms/step")
        if len(self.considered) > 1:
            lines.append("")
            lines.append("policies considered:")
            for c in self.considered:
                mark = "  <- chosen" if c.policy == self.policy else ""
                if not c.fits:
                    lines.append(f"  {c.policy:<9} does not fit: {c.reason}")
                    continue
                split = f"{c.resident_layers}/{c.streamed_layers}/{c.cpu_layers}"
                lines.append(f"  {c.policy:<9} res/str/cpu {split:<9} decode b1 {c.decode_tok_s_b1:7.1f} tok/s"
                             + (f", b{c.batch} {c.decode_tok_s:7.1f}" if c.batch > 1 else "")
                             + f", TTFT {c.ttft_s * 1e3:7.1f} ms{mark}")
        if self.alternatives:
            lines.append("")
            lines.append("alternatives:")
            lines.extend(format_alternatives(self.alternatives))
        if self.notes:
            lines.append("")
            lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def format_alternatives(alts: list[Alternative]) -> list[str]:
    out = []
    for a in alts:
        if not a.fits:
            out.append(f"  {a.change:<32} ({a.cli}): does not fit either ({a.reason})")
            continue
        out.append(f"  {a.change:<32} ({a.cli}): {a.policy}, {a.resident_share:.0%} resident, KV "
                   f"{a.kv_capacity_tokens:,} tokens, TTFT {a.ttft_s * 1e3:.0f} ms, decode "
                   f"{a.decode_tok_s_b1:.1f} tok/s")
    return out


def describe_placement(layers: list[str]) -> str:
    """Compact description: 'layers 0-27 resident, 28-39 streamed'; an interleaved tail reads
    'layers 0-19 resident, 20-39 interleaved: 11 streamed (20, 21, 23, ...), 9 cpu (22, 24, ...)'."""
    groups = {p: [i for i, q in enumerate(layers) if q == p] for p in (RESIDENT, STREAMED, CPU)}
    runs = {p: _runs(idx) for p, idx in groups.items()}
    parts = []
    if groups[STREAMED] and not groups[CPU] and len(runs[RESIDENT]) > 2:
        # resident layers spread among streamed ones (_spread_resident)
        return (f"layers 0-{len(layers) - 1} interleaved: {len(groups[RESIDENT])} resident "
                f"({_first(groups[RESIDENT])}), {len(groups[STREAMED])} streamed ({_first(groups[STREAMED])})")
    if groups[RESIDENT]:
        parts.append(f"{_fmt_runs(runs[RESIDENT])} resident")
    offloaded = sorted(groups[STREAMED] + groups[CPU])
    if groups[STREAMED] and groups[CPU] and (len(runs[STREAMED]) > 2 or len(runs[CPU]) > 2):
        span = _fmt_runs(_runs(offloaded))
        parts.append(f"{span} interleaved: {len(groups[STREAMED])} streamed ({_first(groups[STREAMED])}), "
                     f"{len(groups[CPU])} cpu ({_first(groups[CPU])})")
    else:
        for p in (STREAMED, CPU):
            if groups[p]:
                parts.append(f"{_fmt_runs(runs[p])} {p}")
    return "layers " + ", ".join(parts) if parts else "no layers"


def _runs(idx: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _fmt_runs(runs: list[list[int]]) -> str:
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _first(idx: list[int], k: int = 3) -> str:
    return ", ".join(map(str, idx[:k])) + (", ..." if len(idx) > k else "")


# --------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """Everything one plan() call holds fixed."""

    model: ModelConfig
    weights: ModelWeights
    scheme: QuantScheme
    device: DeviceProfile
    limit: int
    max_model_len: int
    max_num_seqs: int
    kv_dtype: str
    kv_layer: int  # KV bytes per token per layer
    prompt_len: int
    gen_len: int
    block_size: int
    cuda_graphs: bool
    caps: DriverCaps
    cpu_layer_bytes: tuple[int, ...]  # each layer as a CPU layer holds it (caps.cpu_weights)
    cpu_kv_layer: int  # KV bytes per token per layer of a CPU layer (host memory)

    @property
    def n(self) -> int:
        return self.model.num_hidden_layers

    @property
    def decode_context(self) -> float:
        return self.prompt_len + self.gen_len / 2

    @property
    def graph_sizes(self) -> list[int]:
        return cuda_graph_capture_sizes(self.max_num_seqs) if self.cuda_graphs else []

    @property
    def scratch_blocks(self) -> int:
        """KV blocks the runner adds past the plan's for the decode graphs' padding rows (ModelRunner: one
        scratch block, over every device-side layer, that the block manager never hands out)."""
        return 1 if self.cuda_graphs else 0

    @property
    def twin_kv_layer(self) -> int:
        """KV bytes per token of the one layer of device pages prefill offload uses (memory/offload.py: the
        twins' scratch, in the model's float dtype, with the pool's page geometry): 4-byte elements when the
        scheme's float parts are fp32 (a CPU run), else 2 (fp16 / bf16)."""
        elem = 4 if self.scheme.embed_tokens.bits == 32 else ACT_BYTES
        return 2 * self.model.num_key_value_heads * self.model.head_dim * elem

    def twin_kv(self, gpu_layers: int, buffers: int) -> int:
        """twin_kv_layer when a candidate with CPU layers (fewer GPU-side layers than layers) and a ring slot
        may offload prefills (the threshold is not known yet where this is summed: counted whenever allowed)."""
        return self.twin_kv_layer if (self.caps.prefill_offload and buffers and gpu_layers < self.n) else 0

    def graph_bytes(self, embeddings: str) -> int:
        """The CUDA-graph term for a candidate whose token embedding is on `embeddings` (gpu | cpu)."""
        return cuda_graph_bytes(self.model, self.graph_sizes, embeddings_on_host=embeddings == "cpu")


@dataclass(frozen=True)
class _Candidate:
    """One placement to evaluate."""

    policy: str
    layers: tuple[str, ...]
    lm_head: str
    embeddings: str
    num_buffers: int
    chunk: int  # max_num_batched_tokens
    batch: int  # planned batch
    kv_min_tokens: int
    dequant_ws: int = DEQUANT_WORKSPACE_BYTES  # the long-prefill dequantize workspace (budget.workspace_bytes)


def plan(
    model: ModelConfig,
    budget_bytes: int,
    device: DeviceProfile,
    quant: Any = None,
    *,
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    kv_dtype: str = "fp16",
    expected_batch: int = 1,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    gen_len: int = DEFAULT_GEN_LEN,
    max_num_batched_tokens: int | None = None,
    force_policy: str = "auto",
    cuda_graphs: bool = True,
    block_size: int = KV_BLOCK_SIZE,
    model_name: str = "",
    driver: DriverCaps = DRIVER_TODAY,
    alternatives: bool = True,
) -> Plan:
    """Plan `model` (quantized as `quant`: a QuantSpec, WeightFormat, QuantScheme or per-module mapping,
    see budget.resolve_quant) into `budget_bytes` of GPU memory on `device`.

    max_model_len          context the KV pool must hold for one sequence (default min(2048, the model's))
    max_num_seqs           sequences per step (sizes the logits and the CUDA graphs)
    kv_dtype               fp16 | bf16 | int8 | fp8
    expected_batch         the concurrency to plan for; the planner may pick a smaller planned batch when
                           its KV would cost more speed than the batch brings
    prompt_len, gen_len    the reference request of the predictions and the objective
    max_num_batched_tokens the prefill chunk; None lets the planner choose among 512/1024/2048
    force_policy           auto | resident | streamed | cpu | mixed
    driver                 what the offload driver supports (DRIVER_TODAY; DRIVER_NEXT for the planned one)
    Raises BudgetTooSmallError (a ValueError) with the numbers when nothing runnable fits, ValueError for
    bad arguments.
    """
    s = _setup(model, budget_bytes, device, quant, max_model_len, max_num_seqs, kv_dtype, prompt_len, gen_len,
               cuda_graphs, block_size, driver)
    call = dict(quant=s.scheme, max_model_len=s.max_model_len, max_num_seqs=max_num_seqs, kv_dtype=s.kv_dtype,
                expected_batch=expected_batch, prompt_len=prompt_len, gen_len=gen_len,
                max_num_batched_tokens=max_num_batched_tokens, force_policy=force_policy, cuda_graphs=cuda_graphs,
                block_size=block_size, driver=driver, model_name=model_name, alternatives=False)
    if force_policy not in ("auto", *POLICIES):
        raise ValueError(f"unknown policy {force_policy!r}; choose auto, {', '.join(POLICIES)}")
    if expected_batch < 1:
        raise ValueError(f"expected_batch must be >= 1, got {expected_batch}")
    if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    name = model_name or f"{model.architecture} {model.num_hidden_layers}L h{model.hidden_size}"
    batch_cap = min(expected_batch, max_num_seqs)

    if not device.has_gpu:
        result = _cpu_only_plan(s, batch_cap, max_num_batched_tokens, name)
        return result

    policies = POLICIES if force_policy == "auto" else (force_policy,)
    chunks = (max_num_batched_tokens,) if max_num_batched_tokens else CHUNK_CANDIDATES
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= batch_cap} | {batch_cap})

    scored: dict[str, list[tuple[float, _Candidate, Budget]]] = {}
    fail: dict[str, Budget] = {}
    for policy in policies:
        for chunk in chunks:
            for dq in _dequant_choices(s, chunk):
                for b in batches:
                    for cand, budget in _candidates(s, policy, chunk, b, fail, dq):
                        scored.setdefault(policy, []).append((_objective(s, cand), cand, budget))
    best = {p: _pick(options) for p, options in scored.items()}
    if not best:
        raise _too_small(model, budget_bytes, device, s, call, fail, alternatives)

    chosen_policy = _pick([(best[p][0], best[p][1], best[p][2]) for p in best])[1].policy
    _, cand, budget = best[chosen_policy]
    result = _finish(s, cand, budget, name)
    result.considered = _considered(s, policies, best, fail)
    if alternatives and (result.policy != "resident" or result.kv_capacity_tokens < s.max_model_len):
        result.alternatives = _alternatives(model, budget_bytes, device, s, call, baseline=result)
    return result


def plan_for_layers(
    model: ModelConfig,
    budget_bytes: int,
    device: DeviceProfile,
    quant: Any,
    layers: list[str],
    *,
    lm_head: str = RESIDENT,
    embeddings: str = "gpu",
    num_stream_buffers: int = 2,
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    kv_dtype: str = "fp16",
    prompt_len: int = DEFAULT_PROMPT_LEN,
    gen_len: int = DEFAULT_GEN_LEN,
    max_num_batched_tokens: int | None = None,
    cuda_graphs: bool = True,
    block_size: int = KV_BLOCK_SIZE,
    model_name: str = "",
    driver: DriverCaps = DRIVER_TODAY,
) -> Plan:
    """The budget of a placement chosen outside the planner (`--offload` with `--gpu-memory`): the same
    terms as plan() for these layers, the KV pool grown into what is left, the largest chunk of
    CHUNK_CANDIDATES (or max_num_batched_tokens) that fits. Raises BudgetTooSmallError with the numbers
    when the placement does not fit with a KV pool of max_model_len tokens."""
    s = _setup(model, budget_bytes, device, quant, max_model_len, max_num_seqs, kv_dtype, prompt_len, gen_len,
               cuda_graphs, block_size, driver)
    if len(layers) != s.n:
        raise ValueError(f"placement names {len(layers)} layer(s) but the model has {s.n}")
    bad = sorted({p for p in layers if p not in (RESIDENT, STREAMED, CPU)})
    if bad:
        raise ValueError(f"unknown placement(s) {', '.join(bad)}; choose resident, streamed or cpu")
    offloaded = any(p != RESIDENT for p in layers) or lm_head != RESIDENT
    policy = "resident" if not offloaded else (
        "streamed" if CPU not in layers else ("cpu" if STREAMED not in layers else "mixed"))
    buffers = num_stream_buffers if (STREAMED in layers or lm_head == STREAMED) else 0
    chunks = (max_num_batched_tokens,) if max_num_batched_tokens else tuple(sorted(CHUNK_CANDIDATES, reverse=True))
    kv_min = _round_up(s.max_model_len, s.block_size)
    smallest: Budget | None = None
    for chunk in chunks:
        cand = _Candidate(policy, tuple(layers), lm_head, embeddings, buffers, chunk, 1, kv_min)
        budget = _memory(s, cand, _fixed_budget(s, chunk))
        if budget.fits():
            name = model_name or f"{model.architecture} {model.num_hidden_layers}L h{model.hidden_size}"
            return _finish(s, cand, budget, name)
        if smallest is None or budget.total < smallest.total:
            smallest = budget
    assert smallest is not None
    raise BudgetTooSmallError(too_small_message(f"the forced placement ({describe_placement(list(layers))})",
                                                smallest), smallest)


def predict_workload(model: ModelConfig, budget_bytes: int, device: DeviceProfile, quant: Any, p: Plan, batch: int,
                     prompt_len: int, gen_len: int, *, cuda_graphs: bool = True,
                     driver: DriverCaps = DRIVER_TODAY) -> dict[str, float]:
    """What plan `p` predicts for a benchmark run: `batch` prompts of prompt_len tokens submitted together,
    each generating gen_len tokens (the offline benchmark's workload, bench/offline.py):

        ttft_s         mean over the requests of the time to their first token: prompts are prefilled in
                       chunks of p.max_num_batched_tokens, request i's first token comes with the chunk
                       holding its last prompt token
        prefill_tok_s  batch x prompt_len / (time of the last first token)
        decode_tok_s   aggregate decode rate at `batch` sequences, context prompt_len + gen_len / 2
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    s = _setup(model, budget_bytes, device, quant, p.max_model_len, p.max_num_seqs, p.kv_dtype, prompt_len, gen_len,
               cuda_graphs, p.kv_block_size, driver)
    cand = _Candidate(p.policy, tuple(p.layers), p.lm_head, p.embeddings, p.num_stream_buffers,
                      p.max_num_batched_tokens, batch, 0, p.dequant_workspace_bytes)
    steps, hand = _prefill_steps(s, cand, batch, True, _offload_threshold(s, cand))
    times = simulate(steps, cand.num_buffers, handover_s=hand, step_overhead_s=device.step_overhead_s)
    done, cum = 0.0, []
    for t in times:
        done += t
        cum.append(done)
    chunk = max(1, cand.chunk)
    firsts = [cum[min(len(cum) - 1, -(-((i + 1) * prompt_len) // chunk) - 1)] for i in range(batch)]
    return {"ttft_s": sum(firsts) / batch, "prefill_tok_s": batch * prompt_len / cum[-1],
            "decode_tok_s": batch / _step_time(s, cand, batch)}


#: Scores within this fraction of the best count as ties, broken by preference (see _pick).
TIE_TOLERANCE = 0.005


def _pick(options: list[tuple[float, "_Candidate", Budget]]) -> tuple[float, "_Candidate", Budget]:
    """The best-scoring option; near-ties (TIE_TOLERANCE) go to the simpler policy (resident, streamed,
    cpu, mixed), then the larger planned batch, then the larger chunk (better for long prompts), then the
    smaller dequantize workspace (more KV)."""
    top = max(o[0] for o in options)
    near = [o for o in options if o[0] >= top * (1 - TIE_TOLERANCE)]
    return max(near, key=lambda o: (-POLICIES.index(o[1].policy), o[1].batch, o[1].chunk, -o[1].dequant_ws, o[0]))


def _dequant_choices(s: "_Setup", chunk: int) -> tuple[int, ...]:
    """Dequantize workspaces worth weighing: all of DEQUANT_WORKSPACE_CHOICES when the chunk takes the long-prefill
    path of quantized weights on a GPU, else the default alone (the term is then 0)."""
    if s.scheme.any_linear_quantized and s.device.has_gpu and max(chunk, s.max_num_seqs) >= DEQUANT_MIN_TOKENS:
        return DEQUANT_WORKSPACE_CHOICES
    return (DEQUANT_WORKSPACE_BYTES,)


def _too_small(model: ModelConfig, budget_bytes: int, device: DeviceProfile, s: "_Setup", call: dict[str, Any],
               fail: dict[str, Budget], alternatives: bool) -> BudgetTooSmallError:
    """The error for a budget that holds no placement: the smallest misfit's terms, what the fixed terms
    alone take, and the alternatives that would fit."""
    smallest = min(fail.values(), key=lambda b: b.total) if fail else Budget(limit=s.limit)
    force_policy = call["force_policy"]
    what = ("this model, even with every layer on the CPU" if force_policy == "auto"
            else f"the '{force_policy}' placement")
    extra = f"the fixed terms alone take {format_size(smallest.fixed)}"
    if smallest.kv_pool:
        extra += (f"; max_model_len {s.max_model_len} costs {format_size(s.kv_layer * s.max_model_len)} of KV per "
                  f"GPU layer")
    msg = too_small_message(what, smallest, extra)
    alts: list[Alternative] = []
    if alternatives:
        alts = _alternatives(model, budget_bytes, device, s, call)
        fitting = [a for a in alts if a.fits]
        if fitting:
            msg += "\nthese would fit:\n" + "\n".join(format_alternatives(fitting))
        elif alts:
            msg += f"\nnone of these fits either: {', '.join(a.cli for a in alts)}"
        if smallest.fixed > s.limit:
            msg += "\nthe budget is below what any GPU placement needs: give a larger --gpu-memory, or run on the CPU"
    return BudgetTooSmallError(msg, smallest, alts)


def _setup(model: ModelConfig, budget_bytes: int, device: DeviceProfile, quant: Any, max_model_len: int | None,
           max_num_seqs: int, kv_dtype: str, prompt_len: int, gen_len: int, cuda_graphs: bool,
           block_size: int, caps: DriverCaps) -> _Setup:
    if budget_bytes < 0:
        raise ValueError(f"GPU memory budget must be non-negative, got {budget_bytes}")
    if device.has_gpu and budget_bytes > device.total_memory:
        raise ValueError(f"GPU memory budget {format_size(budget_bytes)} exceeds the {device.name} profile's "
                         f"{format_size(device.total_memory)}")
    model_max = model.max_position_embeddings
    length = max_model_len if max_model_len is not None else min(DEFAULT_MAX_MODEL_LEN, model_max)
    if length < 1:
        raise ValueError(f"max_model_len must be >= 1, got {length}")
    if length > model_max:
        raise ValueError(f"max_model_len {length} exceeds the model's context of {model_max} tokens")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if prompt_len < 1 or gen_len < 1:
        raise ValueError("prompt_len and gen_len must be >= 1")
    if prompt_len + gen_len > length:
        # No request is longer than the context: the reference request is fitted into it, keeping its
        # generated part (what decode speed is about) up to half the context. Otherwise the KV pool would be
        # sized for fewer, longer sequences than can exist (e.g. 8 x 640 tokens instead of 16 x 384).
        gen_len = max(1, min(gen_len, length // 2))
        prompt_len = max(1, length - gen_len)
    kv = normalize_kv_dtype(kv_dtype)
    scheme = resolve_quant(quant)
    weights = model_weights(model, scheme)
    if caps.cpu_weights == "packed":
        cpu_bytes = weights.layer_bytes
    else:
        fmt = FP32 if caps.cpu_weights == "fp32" else FP16
        cpu_bytes = model_weights(model, QuantScheme(fmt, (), fmt, fmt)).layer_bytes
    kv_layer = kv_bytes_per_token_layer(model, kv)
    cpu_kv = kv_layer if not caps.cpu_kv_bytes else 2 * model.num_key_value_heads * model.head_dim * caps.cpu_kv_bytes
    return _Setup(model=model, weights=weights, scheme=scheme, device=device, limit=int(budget_bytes),
                  max_model_len=length, max_num_seqs=max_num_seqs, kv_dtype=kv, kv_layer=kv_layer,
                  prompt_len=prompt_len, gen_len=gen_len, block_size=block_size, cuda_graphs=cuda_graphs, caps=caps,
                  cpu_layer_bytes=cpu_bytes, cpu_kv_layer=cpu_kv)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def _fixed_budget(s: _Setup, chunk: int, dequant_ws: int = DEQUANT_WORKSPACE_BYTES) -> Budget:
    """The placement-independent terms for a chunk size and dequantize workspace."""
    m, dev = s.model, s.device
    tokens = max(chunk, s.max_num_seqs)
    graphs = s.graph_sizes
    quantized = s.scheme.any_linear_quantized
    b = Budget(
        limit=s.limit,
        cuda_context=dev.cuda_context_bytes,
        activations=activation_bytes(m, tokens, s.max_num_seqs),
        workspace=workspace_bytes(m, tokens, s.max_model_len, quantized=quantized, num_sms=dev.num_sms or 132,
                                  library_workspace=dev.library_workspace_bytes, dequant_bytes=dequant_ws),
        cuda_graphs=s.graph_bytes("gpu"),  # _memory adds the staged embedding rows when the table is on the host
        margin=safety_margin_bytes(s.limit),
    )
    b.notes.update(
        cuda_context=f"{dev.name} profile",
        activations=f"{tokens} tokens x {ACT_BYTES * max(3 * m.hidden_size + 3 * m.intermediate_size, 3 * m.hidden_size + 3 * m.q_size + 3 * m.kv_size) // 1024} KiB + logits of {s.max_num_seqs} rows",
        workspace="attention gather + split-K partials and tickets"
                  + (f" + dequant ({format_size(dequant_ws)})" if quantized and tokens >= DEQUANT_MIN_TOKENS else "")
                  + " + cuBLAS",
        cuda_graphs=f"{len(graphs)} decode graphs (batch 1..{max(graphs)})" if graphs else "off",
        margin="2% + 32 MiB for fragmentation",
    )
    return b


def _spread_resident(num: int, resident: int) -> list[str]:
    """`resident` of `num` layers resident, spread evenly among the streamed ones, none first.

    Why not the first R: the host enqueues a step layer by layer and issues each streamed layer's copy from
    the hook of the layer two slots earlier. After the step-boundary sync it first walks the resident layers
    (eager launches, ~1-2 ms of host time each at batch 16), while the copy engine has only the ring's
    prefetched layers (one 3 ms copy per slot) to run: with 7 resident layers first it idled ~15 ms a step
    on an H200 (a profiler trace of 13B, 16 sequences, 6 GiB). Spread out, every resident layer's host time
    hides behind a copy already queued, and the step starts on a streamed layer whose copy is done."""
    if resident <= 0:
        return [STREAMED] * num
    if resident >= num:
        return [RESIDENT] * num
    out = [STREAMED] * num
    for i in range(resident):
        out[((2 * i + 1) * num) // (2 * resident)] = RESIDENT
    return out


def _interleave(num: int, streamed: int) -> list[str]:
    """`num` offloaded layers, `streamed` of them streamed, spread evenly (streamed first in each group).

    A mixed placement keeps its resident layers first and this pattern after them. Spreading the resident
    layers among the offloaded ones (as _spread_resident does for streamed placements) was measured worse on
    an H100 (13B, 6 GiB, batch 1, 26 resident / 9 streamed / 5 CPU, prefill offload): decode 25.4 against
    29.5 tok/s and a 512-token TTFT of 212 against 136 ms. Each piece between two CPU layers then ends on a
    resident layer, so the prefill's CPU-layer twins borrow ring slots still holding units ahead of them
    (a reload each) and a decode step's copies are issued later."""
    if streamed <= 0:
        return [CPU] * num
    if streamed >= num:
        return [STREAMED] * num
    out = [CPU] * num
    for j in range(streamed):
        out[(j * num) // streamed] = STREAMED
    return out


def _memory(s: _Setup, cand: _Candidate, fixed: Budget) -> Budget:
    """The budget of a candidate, its KV pool at the minimum (the leftover is added in _finish).

    resident  Σ resident layers + lm_head (+ final norm) if resident + embeddings if on the GPU (shared
              with a resident lm_head when tied) + the rotary table
    ring      buffers x the largest piece that may pass through it: streamed layers, CPU layers (for
              prefill offload) and a streamed lm_head; with prefill offload and nothing streamed, the one
              slot the driver's twins get of their own (the "cpu" policy plans 1 buffer)
    KV        (kv_min_tokens rounded to blocks + the graphs' scratch block) x (KV bytes/token/layer x
              GPU-side layers + with prefill offload, one layer of pages in the model dtype: the twins')
    graphs    the fixed term, plus the staged embedding rows when the table is on the host
    """
    w = s.weights
    b = replace(fixed, notes=dict(fixed.notes))
    b.cuda_graphs = s.graph_bytes(cand.embeddings)
    if b.cuda_graphs and cand.embeddings == "cpu":
        b.notes["cuda_graphs"] = b.notes.get("cuda_graphs", "") + " + embedding rows staged from the host"
    resident = rotary_table_bytes(s.model)
    resident += sum(wb for wb, p in zip(w.layer_bytes, cand.layers) if p == RESIDENT)
    if cand.lm_head == RESIDENT:
        resident += w.lm_head_bytes
    if cand.embeddings == "gpu" and not (s.model.tie_word_embeddings and cand.lm_head == RESIDENT):
        resident += w.embed_bytes
    b.resident_weights = resident
    if cand.num_buffers:
        ringed = [wb for wb, p in zip(w.layer_bytes, cand.layers) if p != RESIDENT]
        if cand.lm_head == STREAMED:
            ringed.append(w.lm_head_bytes)
        b.stream_buffers = cand.num_buffers * max(ringed, default=0)
    gpu_layers = sum(1 for p in cand.layers if p != CPU)
    kv_tokens = _round_up(cand.kv_min_tokens, s.block_size) + s.scratch_blocks * s.block_size
    b.kv_pool = kv_tokens * (s.kv_layer * gpu_layers + s.twin_kv(gpu_layers, cand.num_buffers))
    return b


class _Sizer:
    """Fast totals for 'first r layers resident, the tail offloaded' layouts (prefix sums), so the search
    does not build a Budget per probe. total(...) equals _memory(...).total for the same layout."""

    def __init__(self, s: _Setup, fixed: Budget, kv_min: int) -> None:
        w = s.weights
        self.s = s
        self.fixed = fixed.total
        self.prefix = [0]
        for wb in w.layer_bytes:
            self.prefix.append(self.prefix[-1] + wb)
        self.tail_max = [0] * (s.n + 1)  # largest layer in layers r..n-1
        for r in range(s.n - 1, -1, -1):
            self.tail_max[r] = max(self.tail_max[r + 1], w.layer_bytes[r])
        self.kv_per_layer = (kv_min + s.scratch_blocks * s.block_size) * s.kv_layer
        self.kv_tokens = kv_min + s.scratch_blocks * s.block_size
        self.fixed += rotary_table_bytes(s.model)
        self.host_emb_graphs = s.graph_bytes("cpu") - fixed.cuda_graphs  # staged rows (fixed: the "gpu" term)

    def total(self, r: int, gpu_layers: int, head: str, embeddings: str, buffers: int) -> int:
        s, w = self.s, self.s.weights
        t = self.fixed + self.prefix[r] + self.kv_per_layer * gpu_layers + self.kv_tokens * s.twin_kv(gpu_layers, buffers)
        if embeddings == "cpu":
            t += self.host_emb_graphs
        if head == RESIDENT:
            t += w.lm_head_bytes
        if embeddings == "gpu" and not (s.model.tie_word_embeddings and head == RESIDENT):
            t += w.embed_bytes
        if buffers:
            slot = self.tail_max[r]
            if head == STREAMED:
                slot = max(slot, w.lm_head_bytes)
            t += buffers * slot
        return t


def _candidates(s: _Setup, policy: str, chunk: int, batch: int, fail: dict[str, Budget],
                dequant_ws: int = DEQUANT_WORKSPACE_BYTES):
    """Yield (candidate, budget) pairs of `policy` that fit: for each ring size and lm_head placement the
    most resident layers the budget allows (mixed: the top few resident counts, each with the split that
    balances copy time against CPU time and its neighbours). Records the smallest misfit in `fail`."""
    fixed = _fixed_budget(s, chunk, dequant_ws)
    n = s.n
    kv_min = _round_up(max(s.max_model_len, batch * (s.prompt_len + s.gen_len)), s.block_size)
    size = _Sizer(s, fixed, kv_min)

    def emit(layers: list[str], head: str, emb: str, buffers: int) -> tuple[_Candidate, Budget]:
        c = _Candidate(policy, tuple(layers), head, emb, buffers, chunk, batch, kv_min, dequant_ws)
        return c, _memory(s, c, fixed)

    def miss(layers: list[str], head: str, emb: str, buffers: int) -> None:
        b = _memory(s, _Candidate(policy, tuple(layers), head, emb, buffers, chunk, batch, kv_min, dequant_ws), fixed)
        if policy not in fail or b.total < fail[policy].total:
            fail[policy] = b

    def max_r(lo: int, hi: int, fits) -> int | None:
        """Largest r in [lo, hi] with fits(r), fits monotone (true up to some r); None if none."""
        if hi < lo or not fits(lo):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    if policy == "resident":
        for emb in ("gpu", "cpu"):
            if size.total(n, n, RESIDENT, emb, 0) <= s.limit:
                yield emit([RESIDENT] * n, RESIDENT, emb, 0)
                return
        miss([RESIDENT] * n, RESIDENT, "cpu", 0)
        return

    ring_choices = [b for b in BUFFER_CANDIDATES if b >= s.caps.min_stream_buffers]
    heads = (RESIDENT, STREAMED, CPU) if s.caps.lm_head_offload else (RESIDENT,)
    if policy in ("streamed", "cpu"):
        off = STREAMED if policy == "streamed" else CPU
        # a CPU placement needs a slot only to run its layers on the GPU for long prefills: the driver's twins
        # get one of their own when nothing streams
        buffer_choices = ring_choices if policy == "streamed" else ((0, 1) if s.caps.prefill_offload else (0,))
        for buffers in buffer_choices:
            for head in [h for h in heads if h in (RESIDENT, off)]:
                if head == STREAMED and not buffers:
                    continue
                gpu = (lambda r: n) if off == STREAMED else (lambda r: r)
                r = max_r(0, n - 1, lambda r: size.total(r, gpu(r), head, "cpu", buffers) <= s.limit)
                if r is None:
                    miss([off] * n, head, "cpu", buffers)
                    continue
                if off == STREAMED:
                    spread = emit(_spread_resident(n, r), head, "cpu", buffers)
                    if spread[1].total <= s.limit:  # equal for equal-sized layers; checked for others
                        yield spread
                        continue
                yield emit([RESIDENT] * r + [off] * (n - r), head, "cpu", buffers)
        return

    # mixed: r resident, the tail of x = n - r split into `st` streamed layers and x - st CPU layers,
    # interleaved. Streamed layers need GPU KV, CPU ones do not, so at most s_max(r) can be streamed.
    dev = s.device
    wmax, pmax = max(s.weights.layer_bytes), max(s.weights.layer_params)
    per_copy = copy_time(dev, wmax)
    per_cpu = cpu_time(dev, max(s.cpu_layer_bytes), linear_flops(pmax, batch), quantized=_cpu_quantized(s))
    for buffers in ring_choices:
        for head in [h for h in heads if h in (RESIDENT, CPU)]:
            def s_max(r: int) -> int:
                spare = s.limit - size.total(r, r, head, "cpu", buffers)
                return min(n - r - 1, spare // size.kv_per_layer if size.kv_per_layer else n)

            top = max_r(0, n - 2, lambda r: s_max(r) >= 1)
            if top is None:
                miss([RESIDENT] * 0 + _interleave(n, 1), head, "cpu", buffers)
                continue
            for r in range(top, max(-1, top - 3), -1):
                x, cap = n - r, s_max(r)
                if cap < 1:
                    continue
                balanced = round(x * per_cpu / (per_cpu + per_copy))
                for st in sorted({min(max(v, 1), cap) for v in (balanced - 1, balanced, balanced + 1)}):
                    yield emit([RESIDENT] * r + _interleave(x, st), head, "cpu", buffers)


def _cpu_quantized(s: _Setup) -> bool:
    """Whether CPU layers compute on packed weights (cpu_quant_flops) or float ones (cpu_float_flops)."""
    return s.caps.cpu_weights == "packed" and s.scheme.linear.quantized


def _dram(s: _Setup, layers: tuple[str, ...] | list[str], lm_head: str) -> tuple[float, float]:
    places = set(layers) | {lm_head}
    return dram_shares(s.device, STREAMED in places, CPU in places, packed=_cpu_quantized(s))


def _decode_ops(s: _Setup, cand: _Candidate, batch: int, overheads: bool) -> tuple[list[Op], float]:
    """Ops of one decode step at `batch` sequences and the GPU<->CPU hand-over time.

    Per layer, B tokens at a context of c = decode_context tokens each:
        flops = 2 n B + 4 q B c          kv_read = B c x KV bytes/token/layer
        resident  gpu_time(w, flops, kv_read)
        streamed  the same, after copy_time(w) into a ring slot
        cpu       cpu_time(w, flops, kv_read)   (its KV is in host memory)
    """
    dev, w, m = s.device, s.weights, s.model
    ctx = s.decode_context
    copy_share, cpu_share = _dram(s, cand.layers, cand.lm_head)
    quant = _cpu_quantized(s)

    def cost(place: str, wb: int, cb: int, params: int) -> Op:
        flops = linear_flops(params, batch) + attention_flops(m.q_size, batch, ctx)
        kv_read = batch * ctx * s.kv_layer
        if place == CPU:
            return Op("cpu layer", "cpu", cpu_time(dev, cb, flops, batch * ctx * s.cpu_kv_layer, quantized=quant,
                                                   bandwidth_share=cpu_share, overheads=overheads))
        copy = copy_time(dev, wb, bandwidth_share=copy_share, overheads=overheads) if place == STREAMED else 0.0
        return Op(f"{place} layer", "gpu", gpu_time(dev, wb, flops, kv_read, overheads=overheads), copy)

    ops = _layer_ops(s, cand, cost)
    ops.append(_head_op(s, cand.lm_head, batch, overheads, copy_share, cpu_share))
    return ops, handover_time(dev, batch * m.hidden_size * ACT_BYTES, overheads)


def _head_op(s: _Setup, place: str, rows: int, overheads: bool, copy_share: float, cpu_share: float) -> Op:
    dev, w = s.device, s.weights
    flops = linear_flops(w.lm_head_params, rows)
    head_quant = (s.scheme.embed_tokens if s.model.tie_word_embeddings else s.scheme.lm_head).quantized
    if place == CPU:
        return Op("lm_head", "cpu", cpu_time(dev, w.lm_head_bytes, flops, quantized=head_quant,
                                             bandwidth_share=cpu_share, overheads=overheads))
    copy = copy_time(dev, w.lm_head_bytes, bandwidth_share=copy_share, overheads=overheads) if place == STREAMED else 0.0
    return Op("lm_head", "gpu", gpu_time(dev, w.lm_head_bytes, flops, overheads=overheads), copy)


def _prefill_steps(s: _Setup, cand: _Candidate, prompts: int, overheads: bool,
                   offload_min: int | None) -> tuple[list[list[Op]], float]:
    """Ops of each chunk that prefills `prompts` prompts of prompt_len tokens, packed into chunks of
    cand.chunk tokens (T tokens per chunk, mean attention context c, `past` earlier tokens of the prompt):

        flops = 2 n T + 4 q T c          KV traffic = (past + T) x KV bytes/token/layer
        resident / streamed  as in decode, with these flops
        cpu                  cpu_time, or, when T >= offload_min and the plan has a ring, run on the GPU:
                             copy_time(w + past KV) in, gpu_time, and the chunk's new KV back out
    The lm_head runs for the rows that end a prompt only."""
    dev, m = s.device, s.model
    total = prompts * s.prompt_len
    chunk = max(1, cand.chunk)
    copy_share, cpu_share = _dram(s, cand.layers, cand.lm_head)
    steps: list[list[Op]] = []
    done = 0
    while done < total:
        tokens = min(chunk, total - done)
        if tokens >= s.prompt_len:  # whole prompts: mean attention context prompt_len / 2, nothing before
            ctx, past = s.prompt_len / 2, 0
        else:  # a piece of one prompt, after `past` of its tokens
            past = done % s.prompt_len
            ctx = past + tokens / 2
        offload = offload_min is not None and cand.num_buffers > 0 and tokens >= offload_min
        ops = _prefill_step_ops(s, cand, tokens, past, ctx, offload, overheads, copy_share, cpu_share)
        last_rows = (done + tokens) // s.prompt_len - done // s.prompt_len  # prompts that end in this chunk
        if last_rows:
            ops.append(_head_op(s, cand.lm_head, last_rows, overheads, copy_share, cpu_share))
        steps.append(ops)
        done += tokens
    return steps, handover_time(dev, chunk * m.hidden_size * ACT_BYTES, overheads)


def _prefill_step_ops(s: _Setup, cand: _Candidate, tokens: int, past: float, ctx: float, offload: bool,
                      overheads: bool, copy_share: float, cpu_share: float) -> list[Op]:
    """Ops of the layers of one prefill step of `tokens` tokens after `past` earlier ones of the prompt, at a
    mean attention context `ctx` (see _prefill_steps), CPU layers offloaded or not."""
    dev, w, m = s.device, s.weights, s.model
    quant = _cpu_quantized(s)
    dequant = s.scheme.linear.quantized and tokens >= DEQUANT_MIN_TOKENS
    # An eager step's host issues each layer's launches: a GPU layer takes at least that long (costmodel
    # eager_prefill_launches). The prediction only: the roofline (overheads=False) has no host term.
    host = 0.0
    if overheads and dev.has_gpu:
        matrices = [(m.q_size + 2 * m.kv_size, m.hidden_size), (m.hidden_size, m.q_size),
                    (2 * m.intermediate_size, m.hidden_size), (m.hidden_size, m.intermediate_size)]
        host = eager_prefill_launches(matrices, cand.dequant_ws if dequant else None) * dev.eager_launch_s

    def cost(place: str, wb: int, cb: int, params: int) -> Op:
        flops = linear_flops(params, tokens) + attention_flops(m.q_size, tokens, ctx)
        kv_rw = (past + tokens) * s.kv_layer
        if place == CPU and not offload:
            return Op("cpu layer", "cpu", cpu_time(dev, cb, flops, (past + tokens) * s.cpu_kv_layer, quantized=quant,
                                                   bandwidth_share=cpu_share, overheads=overheads))
        copy = 0.0
        run = gpu_time(dev, wb, flops, kv_rw, overheads=overheads)
        if dequant:  # the long-prefill path's dequantize pass (costmodel.prefill_dequant_time)
            run += prefill_dequant_time(dev, wb, params, overheads=overheads)
        if place == STREAMED:
            copy = copy_time(dev, wb, bandwidth_share=copy_share, overheads=overheads)
        elif place == CPU:  # offloaded: weights + past KV in, the chunk's new KV back out
            copy = copy_time(dev, wb + past * s.cpu_kv_layer, bandwidth_share=copy_share, overheads=overheads)
            run += tokens * s.twin_kv_layer / dev.h2d_pinned_bandwidth
        return Op(f"{place} layer", "gpu", max(run, host), copy)

    return _layer_ops(s, cand, cost)


def _layer_ops(s: _Setup, cand: _Candidate, cost: Callable[[str, int, int, int], Op]) -> list[Op]:
    """The embedding lookup (when on the host) and one op per decoder layer, cost(placement, device-format
    bytes, CPU-format bytes, params) each; layers of one shape and placement are costed once."""
    w = s.weights
    memo: dict[tuple[str, int, int], Op] = {}
    ops: list[Op] = []
    if cand.embeddings == "cpu":
        ops.append(Op("embed", "cpu", 0.0))
    for place, wb, cb, params in zip(cand.layers, w.layer_bytes, s.cpu_layer_bytes, w.layer_params):
        key = (place, wb, params)
        op = memo.get(key)
        if op is None:
            op = memo[key] = cost(place, wb, cb, params)
        ops.append(op)
    return ops


def _offload_threshold(s: _Setup, cand: _Candidate) -> int | None:
    """Smallest step (tokens) that runs faster with its CPU layers on the GPU: a step of T fresh prompt tokens
    simulated both ways with the candidate's whole placement (the offloaded CPU layers' copies queue on the
    copy engine behind the streamed layers'), and T above max_num_seqs, so that decode steps, which the
    decode model costs with CPU layers on the CPU, stay there. None without CPU layers or a ring slot (the
    driver's twins borrow one, or have one of their own when nothing streams), or when the GPU never wins."""
    if not s.caps.prefill_offload or not cand.num_buffers or CPU not in cand.layers:
        return None
    return _gpu_beats_cpu_from(s, cand.layers, cand.lm_head, cand.embeddings, cand.num_buffers)


@functools.lru_cache(maxsize=1024)
def _gpu_beats_cpu_from(s: _Setup, layers: tuple[str, ...], lm_head: str, embeddings: str,
                        num_buffers: int) -> int | None:
    cand = _Candidate("probe", layers, lm_head, embeddings, num_buffers, 1, 1, 0)
    copy_share, cpu_share = _dram(s, layers, lm_head)

    def gpu_wins(t: int) -> bool:
        times = []
        for offload in (False, True):
            ops = _prefill_step_ops(s, cand, t, 0, t / 2, offload, True, copy_share, cpu_share)
            times.append(simulate([ops], num_buffers, handover_s=handover_time(
                s.device, t * s.model.hidden_size * ACT_BYTES, True))[-1])
        return times[1] < times[0]

    lo, hi = s.max_num_seqs + 1, 1 << 16
    if not gpu_wins(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if gpu_wins(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _step_time(s: _Setup, cand: _Candidate, batch: int, overheads: bool = True) -> float:
    ops, hand = _decode_ops(s, cand, batch, overheads)
    return simulate([ops] * 3, cand.num_buffers, handover_s=hand,
                    step_overhead_s=s.device.step_overhead_s if overheads else 0.0)[-1]


def _prefill_time(s: _Setup, cand: _Candidate, prompts: int, overheads: bool = True) -> float:
    steps, hand = _prefill_steps(s, cand, prompts, overheads, _offload_threshold(s, cand))
    return sum(simulate(steps, cand.num_buffers, handover_s=hand,
                        step_overhead_s=s.device.step_overhead_s if overheads else 0.0))


def _objective(s: _Setup, cand: _Candidate) -> float:
    """Generated tokens/s of the reference workload at the candidate's planned batch B:
    B G / (prefill of B prompts + G x decode step at B)."""
    b = cand.batch
    return b * s.gen_len / (_prefill_time(s, cand, b) + s.gen_len * _step_time(s, cand, b))


def _predict(s: _Setup, cand: _Candidate) -> Prediction:
    return Prediction(
        prompt_len=s.prompt_len,
        gen_len=s.gen_len,
        ttft_s=_prefill_time(s, cand, 1),
        roofline_ttft_s=_prefill_time(s, cand, 1, overheads=False),
        decode_step_s_b1=_step_time(s, cand, 1),
        roofline_step_s_b1=_step_time(s, cand, 1, overheads=False),
        batch=cand.batch,
        decode_step_s=_step_time(s, cand, cand.batch),
        roofline_step_s=_step_time(s, cand, cand.batch, overheads=False),
        workload_tok_s=_objective(s, cand),
    )


def _finish(s: _Setup, cand: _Candidate, budget: Budget, name: str) -> Plan:
    """Grow the KV pool into the leftover budget and assemble the Plan."""
    w = s.weights
    gpu_layers = sum(1 for p in cand.layers if p != CPU)
    twin_kv = s.twin_kv(gpu_layers, cand.num_buffers)
    block_bytes = s.block_size * (s.kv_layer * gpu_layers + twin_kv)
    if block_bytes:
        spare = budget.limit - budget.total
        budget.kv_pool += (spare // block_bytes) * block_bytes
        num_blocks = budget.kv_pool // block_bytes - s.scratch_blocks  # the pool as allocated holds the scratch
    else:
        num_blocks = cand.kv_min_tokens // s.block_size
    scratch = f" (+ {s.scratch_blocks} scratch for the decode graphs)" if s.scratch_blocks and block_bytes else ""
    budget.notes["kv_pool"] = (f"{num_blocks} blocks{scratch} x {s.block_size} tokens x {gpu_layers} GPU layers x "
                               f"{format_size(s.kv_layer)}/token/layer ({s.kv_dtype})"
                               + (f" + 1 layer x {format_size(twin_kv)}/token (prefill offload's device pages)"
                                  if twin_kv else ""))
    resident_layers = sum(1 for p in cand.layers if p == RESIDENT)
    budget.notes["resident_weights"] = (f"{resident_layers} layers ({s.scheme.linear.name})"
                                        + (", lm_head" if cand.lm_head == RESIDENT else "")
                                        + (", embeddings" if cand.embeddings == "gpu" else ""))
    slot = budget.stream_buffers // cand.num_buffers if cand.num_buffers else 0
    if cand.num_buffers:
        what = "largest offloaded layer" if STREAMED in cand.layers or cand.lm_head == STREAMED else \
            "prefill offload's weight slot: nothing streams"
        budget.notes["stream_buffers"] = f"{cand.num_buffers} x {format_size(slot)} ({what})"
    cpu_layers = sum(1 for p in cand.layers if p == CPU)
    host_weights = sum(wb for wb, p in zip(w.layer_bytes, cand.layers) if p == STREAMED)
    host_weights += sum(cb for cb, p in zip(s.cpu_layer_bytes, cand.layers) if p == CPU)
    if _offload_threshold(s, cand) is not None:  # prefill offload: CPU layers also kept as loaded, for the GPU
        host_weights += sum(wb for wb, p in zip(w.layer_bytes, cand.layers) if p == CPU)
    if cand.lm_head != RESIDENT:
        host_weights += w.lm_head_bytes
    if cand.embeddings == "cpu":
        host_weights += w.embed_bytes
    host_kv = num_blocks * s.block_size * s.cpu_kv_layer * cpu_layers
    on_gpu = sum(wb for wb, p in zip(w.layer_bytes, cand.layers) if p == RESIDENT) + (
        w.lm_head_bytes if cand.lm_head == RESIDENT else 0)
    share = on_gpu / (w.total_layer_bytes + w.lm_head_bytes)
    notes = []
    if cpu_layers:
        if s.caps.cpu_weights == "packed":
            rate = s.device.cpu_packed_bandwidth or s.device.cpu_bandwidth  # what cpu_time reads them at
            notes.append(f"CPU layers keep their int4/int8 weights packed (torch's packed CPU kernels), costed "
                         f"at {rate / 1e9:.0f} GB/s of packed weight read")
        else:
            notes.append(f"CPU layers hold {s.caps.cpu_weights} weights (the offload driver dequantizes them): "
                         f"{format_size(max(s.cpu_layer_bytes))} per layer read every step")
    if cand.embeddings == "cpu":
        notes.append("embeddings stay on the CPU: a step copies only its B rows to the GPU")
    if host_weights + host_kv > 0.8 * s.device.host_memory:
        notes.append(f"offloaded weights + host KV ({format_size(host_weights + host_kv)}) exceed 80% of the "
                     f"host's {format_size(s.device.host_memory)}: they would stream from an mmap of the checkpoint "
                     "(pageable, disk-bound) and the prediction is optimistic")
    notes.append(f"device profile: {s.device.summary()}")
    return Plan(
        model_name=name, device=s.device.name, policy=cand.policy, weights=s.scheme.name,
        layers=list(cand.layers), lm_head=cand.lm_head, embeddings=cand.embeddings,
        num_stream_buffers=cand.num_buffers, stream_buffer_bytes=slot,
        prefill_offload_min_tokens=_offload_threshold(s, cand), kv_dtype=s.kv_dtype,
        kv_block_size=s.block_size, kv_num_blocks=num_blocks, kv_capacity_tokens=num_blocks * s.block_size,
        kv_scratch_blocks=s.scratch_blocks if block_bytes else 0,
        kv_bytes_per_token=s.kv_layer * gpu_layers, host_kv_bytes=host_kv, host_weight_bytes=host_weights,
        max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=max(cand.chunk, s.max_num_seqs),
        cuda_graph_sizes=s.graph_sizes if s.device.has_gpu else [],
        budget=budget, prediction=_predict(s, cand), resident_share=share, notes=notes,
        dequant_workspace_bytes=cand.dequant_ws,
    )


def _considered(s: _Setup, policies: tuple[str, ...], best: dict, fail: dict[str, Budget]) -> list[PolicyOutcome]:
    out = []
    for p in policies:
        if p in best:
            _, cand, _ = best[p]
            pred = _predict(s, cand)
            out.append(PolicyOutcome(
                policy=p, fits=True, resident_layers=cand.layers.count(RESIDENT),
                streamed_layers=cand.layers.count(STREAMED), cpu_layers=cand.layers.count(CPU), batch=cand.batch,
                decode_tok_s_b1=pred.decode_tok_s_b1, decode_tok_s=pred.decode_tok_s, ttft_s=pred.ttft_s,
                workload_tok_s=pred.workload_tok_s))
        else:
            b = fail.get(p)
            reason = (f"needs {format_size(b.total)} (weights {format_size(b.resident_weights)}, KV "
                      f"{format_size(b.kv_pool)})" if b else "no placement")
            out.append(PolicyOutcome(policy=p, fits=False, reason=reason))
    return out


def _cpu_only_plan(s: _Setup, batch: int, chunk: int | None, name: str) -> Plan:
    """No GPU: every piece on the CPU; the GPU budget is empty and the KV lives in host memory.

    The engine's CPU path dequantizes quantized checkpoints to fp32 at load (model_loader.py: the packed
    CPU path is slower per byte), so the plan costs fp32 weights: 4 bytes per weight, the fp32 GEMM rate.
    """
    notes = ["no GPU: vramwise runs every layer on the CPU; the GPU budget does not apply"]
    if s.scheme.linear.bits != 32:
        notes.append(f"the CPU path holds weights in fp32 (dequantized at load), so {s.scheme.name} weights are "
                     "costed at 4 bytes per weight")
    fp32 = QuantScheme(FP32, (), FP32, FP32)
    weights = model_weights(s.model, fp32)
    s = replace(s, scheme=fp32, weights=weights, cpu_layer_bytes=weights.layer_bytes,
                cpu_kv_layer=2 * s.model.num_key_value_heads * s.model.head_dim * 4,
                caps=replace(s.caps, cpu_weights="fp32", prefill_offload=False))
    n = s.n
    kv_min = _round_up(max(s.max_model_len, batch * (s.prompt_len + s.gen_len)), s.block_size)
    cand = _Candidate("cpu", tuple([CPU] * n), CPU, "cpu", 0, chunk or CHUNK_CANDIDATES[0], batch, kv_min)
    num_blocks = kv_min // s.block_size
    notes.append(f"device profile: {s.device.summary()}")
    return Plan(
        model_name=name, device=s.device.name, policy="cpu", weights=s.scheme.name, layers=[CPU] * n,
        lm_head=CPU, embeddings="cpu", num_stream_buffers=0, stream_buffer_bytes=0,
        prefill_offload_min_tokens=None, kv_dtype=s.kv_dtype, kv_block_size=s.block_size,
        kv_num_blocks=num_blocks, kv_capacity_tokens=num_blocks * s.block_size, kv_bytes_per_token=0,
        host_kv_bytes=num_blocks * s.block_size * s.cpu_kv_layer * n, host_weight_bytes=s.weights.total_bytes,
        max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs, max_num_batched_tokens=cand.chunk,
        cuda_graph_sizes=[], budget=Budget(limit=0), prediction=_predict(s, cand), resident_share=0.0,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------
# Alternatives
# --------------------------------------------------------------------------------------------------------


def _alternatives(model: ModelConfig, budget_bytes: int, device: DeviceProfile, s: _Setup, call: dict[str, Any],
                  baseline: Plan | None = None) -> list[Alternative]:
    """Plans with one thing changed: int8 KV, half the context, fewer bits, an 8-bit lm_head, packed CPU
    weights, the offload driver's next capabilities. Kept when they fit and beat the baseline (all of them
    without one)."""
    scheme = s.scheme
    # (in words, CLI flags, plan() changes, JSON-able description of the change)
    changes: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    if s.kv_dtype not in ("int8", "fp8"):
        changes.append(("int8 KV cache", "--kv-cache-dtype int8", {"kv_dtype": "int8"}, {"kv_dtype": "int8"}))
    shorter = max(s.max_model_len // 2, 1)
    if shorter >= max(256, s.prompt_len + s.gen_len):  # still holds the reference request
        changes.append((f"context {shorter}", f"--max-model-len {shorter}", {"max_model_len": shorter},
                        {"max_model_len": shorter}))
    lin = scheme.linear
    if lin.bits >= 16:
        changes.append(("8-bit weights", "--bits 8", {"quant": replace(scheme, linear=WeightFormat.for_bits(8))},
                        {"bits": 8}))
    if lin.bits >= 8:
        changes.append(("4-bit weights (g128)", "--bits 4 --group-size 128",
                        {"quant": replace(scheme, linear=WeightFormat.for_bits(4))}, {"bits": 4, "group_size": 128}))
    elif lin.group_size is not None and lin.group_size < 128:
        changes.append(("4-bit, group 128", "--group-size 128",
                        {"quant": replace(scheme, linear=WeightFormat(4, 128, lin.symmetric))}, {"group_size": 128}))
    if not model.tie_word_embeddings and scheme.lm_head.bits >= 16:
        changes.append(("8-bit lm_head", "--lm-head-bits 8",
                        {"quant": replace(scheme, lm_head=WeightFormat.for_bits(8))}, {"lm_head_bits": 8}))
    if s.caps in (DRIVER_TODAY, driver_caps("bf16")) and lin.quantized:  # runnable today: --cpu-weights packed
        packed = driver_caps("packed")
        changes.append(("packed CPU weights", "--cpu-weights packed", {"driver": packed}, {"driver": packed.name}))
    if s.caps != DRIVER_NEXT:
        changes.append((f"driver: {DRIVER_NEXT.name}", "plan --lm-head-offload",
                        {"driver": DRIVER_NEXT}, {"driver": DRIVER_NEXT.name}))
    if baseline is None and s.max_num_seqs > 8:  # the logits and CUDA-graph terms shrink with fewer sequences
        changes.append(("8 sequences per step", "--max-num-seqs 8", {"max_num_seqs": 8}, {"max_num_seqs": 8}))
    out: list[Alternative] = []
    for change, cli, kw, desc in changes:
        args = {**call, **kw}
        try:
            p = plan(model, budget_bytes, device, **args)
        except BudgetTooSmallError as e:
            out.append(Alternative(change, cli, desc, fits=False, reason=str(e).split(" (")[0]))
            continue
        if baseline is not None and p.prediction.decode_tok_s_b1 <= baseline.prediction.decode_tok_s_b1 * 1.005 \
                and p.kv_capacity_tokens <= baseline.kv_capacity_tokens \
                and p.prediction.ttft_s >= baseline.prediction.ttft_s * 0.995:
            continue  # neither faster nor more KV: not worth listing
        out.append(Alternative(change, cli, desc, fits=True, policy=p.policy, resident_share=p.resident_share,
                               kv_capacity_tokens=p.kv_capacity_tokens, ttft_s=p.prediction.ttft_s,
                               decode_tok_s_b1=p.prediction.decode_tok_s_b1))
    return out


# --------------------------------------------------------------------------------------------------------
# The matrix (no model given)
# --------------------------------------------------------------------------------------------------------

#: Shapes of the `plan` matrix: (label, models/shapes.py key).
MATRIX_SHAPES = (("7B", "llama-2-7b"), ("8B", "llama-3-8b"), ("13B", "llama-2-13b"), ("34B", "codellama-34b"),
                 ("70B", "llama-2-70b"))


@dataclass
class MatrixRow:
    label: str
    shape: str
    bits: int
    fits: bool
    policy: str = ""
    resident_share: float = 0.0
    kv_capacity_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s_b1: float = 0.0
    reason: str = ""


def plan_matrix(budget_bytes: int, device: DeviceProfile, *, bits: tuple[int, ...] = (4, 8),
                group_size: int | None = 128, **kw: Any) -> list[MatrixRow]:
    """One plan per (common shape, bit width): what fits in `budget_bytes` and how fast."""
    from vramwise.models.shapes import shape_config

    rows: list[MatrixRow] = []
    for label, key in MATRIX_SHAPES:
        cfg = shape_config(key)
        for b in bits:
            fmt = WeightFormat.for_bits(b, group_size if b == 4 else -1)
            try:
                p = plan(cfg, budget_bytes, device, fmt, alternatives=False, model_name=key, **kw)
            except BudgetTooSmallError as e:
                rows.append(MatrixRow(label, key, b, False, reason=str(e).split(";")[0]))
                continue
            rows.append(MatrixRow(label, key, b, True, p.policy, p.resident_share, p.kv_capacity_tokens,
                                  p.prediction.ttft_s, p.prediction.decode_tok_s_b1))
    return rows


def format_matrix(rows: list[MatrixRow]) -> str:
    head = f"{'model':<5} {'shape':<14} {'bits':>4}  {'policy':<9} {'resident':>8}  {'KV tokens':>9}  " \
           f"{'TTFT 512':>9}  {'decode b1':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.fits:
            lines.append(f"{r.label:<5} {r.shape:<14} {r.bits:>4}  does not fit: {r.reason}")
            continue
        lines.append(f"{r.label:<5} {r.shape:<14} {r.bits:>4}  {r.policy:<9} {r.resident_share:>8.0%}  "
                     f"{r.kv_capacity_tokens:>9,}  {r.ttft_s * 1e3:>7.0f}ms  {r.decode_tok_s_b1:>6.1f} tok/s")
    return "\n".join(lines)
