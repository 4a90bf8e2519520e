"""Offload driver: per-layer placement policies executed over the plain model, from outside it.

Each decoder layer gets one of three placements (the planner, memory/planner.py, chooses them; a flag can
force them):

    resident   weights live on the GPU for good.
    streamed   weights live in host memory (pinned, quantized as loaded), packed into one contiguous byte
               buffer per layer, and are copied host-to-device (H2D) into a ring of GPU "slots" just before
               the layer runs, on a side CUDA stream, prefetching ahead so that copies overlap compute.
    cpu        weights, and the layer's KV pages, live in host memory and the layer runs on the CPU
               (llama.cpp's split); hidden states go device -> CPU -> device around it.

The model file knows none of this (DESIGN.md principles 1 and 7): the driver moves and re-points each
layer's parameters and buffers (memory/placement.py) and installs forward pre/post hooks on the layer
modules; module names, state_dict keys and the model's own forward stay as they are.

Streaming, step by step (S streamed layers in model order j = 0..S-1, N slots, prefetch depth N - 1):
  * Slot assignment is fixed: streamed layer j always runs from slot j % N. Its parameters and buffers are
    re-pointed ONCE, at apply time, at views into that slot (same byte layout as its host buffer), so a
    layer's tensor addresses never change between steps: a captured CUDA graph replays the same kernels
    and the same in-place H2D copies into the same slots (see "Captured decode steps" below).
  * Two CUDA events per slot: `loaded[s]`, recorded on the copy stream after the copy into s, and `freed[s]`,
    recorded on the compute stream after the layer that read s returned (its kernels are queued by then, so
    the event completes exactly when they have finished reading the slot).
  * Pre-hook of layer j: if slot j % N does not already hold (or is not already loading) layer j, issue
    the copy now (a "miss": first use, or an out-of-order call); then the compute stream waits on
    `loaded[j % N]`. The host never blocks: the wait is a GPU-side dependency. The first streamed unit's
    pre-hook first reloads any slot not in the step-start state (slot s holds unit s), which only a forward
    that skipped a streamed lm_head leaves (no logits wanted): so that copy is queued ahead of the step's own.
  * Post-hook of layer j: record `freed[j % N]`, then issue the copy of the slot's next user on the copy
    stream, which first waits on `freed[j % N]`: the next user is layer j + N, or, past the last streamed
    layer, layer j % N of the NEXT step (the ring wraps, so the first streamed layers of the next step are
    prefetched at the end of this one, overlapping the lm_head, sampling and the scheduler's host work).
    Resident and CPU layers interleaved with streamed ones just run in between; copies in flight go on.
  * When S <= N every streamed layer keeps its own slot: after the first load no copy is ever issued.
  * When N does not divide S, the last streamed layer of a step and the first of the next share a slot, so
    that one copy cannot start before the last streamed layer finishes (it still overlaps the end of the
    step). The planner can pick N dividing S when the budget allows.
On the CPU (no GPU, tests) the very same code runs with CPU slots and synchronous copies; events are no-ops.

Captured decode steps (engine/cuda_graphs.py replays the all-decode step as a CUDA graph; the ring's copies
are nodes of that graph). A graph must be self-contained: inside a capture a stream may wait only on events
recorded in the same capture, a side stream takes part only once it waited on such an event (the fork), and
the capture may end only after the capture stream waited on every forked stream's last work (the join).
Host decisions (which slot to fill) are frozen at capture, so every replay must start from the same ring
state. The schedule a captured step follows:
  * Step-start state: slot s holds unit s (s < N), the state the wrap-around prefetch leaves after every
    step. ensure_step_start(), eager, before each capture and each replay: loads any slot not in that state
    (a miss; none in normal running), then the compute stream waits on an event recorded on the copy stream
    after its last copy (join_copies). So the graph may read slots 0..N-1 without waiting inside, and no copy
    issued before the replay (the previous step's wrap-around, an eager prefill's copies) races the graph's.
  * Inside the capture (begin_step_capture / end_step_capture, called by DecodeGraphs around the model's
    forward): the hooks run as in an eager step but on a separate set of events (cap_freed / cap_loaded):
    the post-hook of unit j records cap_freed[s] on the capture stream and, when unit j + N exists, issues
    its copy on the copy stream after waiting on that event (that wait forks the copy stream into the graph);
    the pre-hook of unit j >= N waits on cap_loaded[s]; units j < N wait on nothing inside (ordered by the
    join before the replay). A miss inside a capture records cap_freed[s] first, at that point of the capture
    stream. The wrap-around copy (the next step's first units) is NOT issued: its copy would outlive the
    graph. end_step_capture() makes the capture stream wait on an event recorded after the copy stream's last
    captured copy, so the replay ends with no copy in flight; it returns a StepSchedule: the slots' owners at
    the end of the step, the slots whose wrap-around was deferred, the copies per replay; and restores the
    host state (owner, stats) to the step start, since the capture executed nothing.
  * after_replay(schedule), eager, right after graph.replay(): owner becomes the schedule's end state, every
    slot's `freed` is re-recorded on the compute stream (after the whole graph: a later copy into any slot,
    eager or deferred, waits for it), the stats count the replayed copies, and the deferred wrap-around
    copies are issued, overlapping the logits, sampling and the host's work between steps, as in an eager step.
  * A streamed lm_head is the ring's last unit but runs after the graph (the logits stay eager): its copy is
    issued inside the graph by unit S-1-N (and joined at its end), its own wrap-around by its eager post-hook;
    after_replay never touches its slot.
  * Eager steps (prefill) between replays keep working unchanged: they start from the step-start state and
    leave it; the `freed` events after_replay re-records order their copies after the last replay.
  * S <= N: every unit keeps its slot, the graph has no copy and the stream is never forked.
  Cost against an eager step: the graph starts only once all N wrap-around copies landed (one join before
  the replay), not just the first slot's; at most one layer's compute of copy-engine idle time per step.
  The copies are cudaMemcpyAsync nodes from host-registered memory (PinnedHostMemory uses cudaHostRegister,
  not torch's caching host allocator, so a captured non_blocking copy records no host-allocator event).
  CUDA refuses a copy from pageable memory inside a capture: with pageable host buffers (file_backed_allocator,
  pageable_allocator) capture_blocker() says so and decode steps stay eager, as with CPU-computed layers.
  Embeddings on the host (embed_on_cpu): the lookup needs the ids on the host (a sync), which a graph
  cannot do. Inside a captured step the embedding's hooks feed it dummy host ids and replace its output by a
  static device buffer (prepare_step_capture(max_tokens): (max_tokens, hidden) in the table's dtype, counted
  with the graph pool); before each replay stage_embeddings(ids) gathers the step's rows on the host into one
  of two pinned staging buffers and copies them into that buffer with one non_blocking H2D copy on the
  compute stream (a staging buffer is reused only after its previous copy finished: an event per buffer).
  begin_step_capture(live=True) runs the same schedule eagerly (emulate mode, CPU tests): copies really run,
  so a schedule that left a slot holding the wrong unit changes the output there too.

Segmented steps (placements with CPU-computed decoder layers; engine/cuda_graphs.py "CPU layers"). A graph cannot
hold host compute, so a decode step is captured in pieces: segment_plan() splits the layers before each CPU layer,
and before a streamed unit whose slot a unit of the same piece reads (its copy would have to run inside the piece).
  * Capture: one forward of the model on a side stream. begin_segmented_capture() begins piece 0's graph; a CPU
    unit's pre-hook ends the current piece's capture (its input, the piece's output, is kept alive), the CPU unit
    then runs eagerly on the capture's dummy batch (K/V to the scratch block), its post-hook copies the output
    into a static device buffer and begins the next piece's capture, which reads that buffer;
    end_segmented_capture() ends the last piece. Streamed units' hooks do nothing in a piece: no copy and no
    event is captured.
  * Replay (replay_segmented): for each piece, eagerly, _seg_begin (each streamed unit it reads is loaded or a
    miss loads it now; the compute stream waits for its copy), the piece's graph, _seg_end (its slots are marked
    free and their next users' copies issued: later units of the step or, past the last, the next step's first
    ones), then its CPU layer on this step's batch (the runner's HostStep from the graphs' pinned twin) and the
    copy of its output into the next piece's input buffer. The copies of later streamed units thus run while
    the CPU layers compute; the copy engine runs at most num_slots units ahead.
  * begin_segmented_capture(live=True) runs the same schedule eagerly at the same points (emulate mode, CPU
    tests). Steps with prefill tokens stay eager and never enter a segmented step (prefill offload's twins are
    not used inside one).

CPU-computed layers: weights in `cpu_dtype` (default float32, see DEFAULT_CPU_DTYPE for the measurement),
quantized linears dequantized once at apply time (QuantLinear's CPU path dequantizes on every call), or,
with cpu_weights="packed", kept packed as quant/cpu_packed.CpuPackedLinear (torch's int4/int8 CPU kernels,
bf16 activations; norms, rotary and KV stay in cpu_dtype); the KV pages of these layers live in host
memory, and the runner gives them the torch attention path there (ModelRunner(kv_layers=
driver.kv_layers(...)) picks each layer's backend by where its pages are); the attention metadata is
copied to the host once per step (the runner builds it from its Python lists; HostStep); the shared rotary
table is cloned onto the host (copied, so its values are bit-identical).
While the CPU computes, H2D copies already queued for streamed layers go on (the copy engine and the CPU
work side by side; the D2H of the hidden states syncs the compute stream only).

Prefill offload (prefill_offload_min_tokens = M; the planner's DriverCaps.prefill_offload and its threshold): a
512-token prefill of a 13B layer takes ~0.3-0.6 s on the CPU (issue 5), against ~3 ms to copy its int4 weights
to the GPU, so a forward whose step has at least M tokens (T of the flat batch, all sequences together: read
from the AttentionMetadata's slot_mapping) runs every CPU decoder layer on the device instead:
  * Weights: at apply time, before a CPU layer is converted to its CPU form, its tensors as loaded (device
    format: packed int4/int8 linears stay packed, floats in the model dtype) are packed into a host buffer
    (ByteLayout / pack, pinned on CUDA) exactly as a streamed unit's, and a twin is kept: a structural copy of
    the layer (placement.structural_copy: its own parameter objects, no hooks, the shared rotary table of the
    device layers) whose tensors point at that buffer. The CPU unit's forward is replaced by a dispatcher
    (an instance attribute; release() removes it): its pre-hook decides, from T, whether the twin runs.
  * The twin borrows a ring slot (eager steps only: offloaded steps are prefills, never captured). A streamed
    unit whose next decoder layer is a CPU layer hands its slot over in its post-hook instead of loading the
    slot's next user (the unit needed last); otherwise the twin takes the slot whose unit is needed last and
    marks it as holding nothing. Its weights are copied in on the copy stream (the ring's events: the copy
    waits for the slot's last reader, the twin for the copy), its tensors re-pointed at the slot. After the
    last CPU layer of a run, every displaced unit is reloaded as a prefetch (it runs later in the step or in
    the next one): a CPU layer right after a streamed one costs no extra copy, others one reload per run, and
    the step ends in the step-start state (slot s holds unit s) that captured decode steps expect. With 3+
    slots and a run of 3+ CPU layers, twins alternate between two slots so one's copy overlaps the other's
    compute. With no ring (nothing streams) or slots smaller than the twin, the twins get one slot of their own
    (a second device buffer of the largest CPU layer, allocated at the first offloaded step, with its own copy
    stream): the planner plans 1 buffer for such a placement and memory_report counts it in stream_buffers.
  * KV: one scratch device KV cache (K and V of the host layer's page shape (num_blocks, block_size, Hkv, D)
    in the model dtype, so block tables and slot mappings index it unchanged), shared by all twins (they run
    one at a time), allocated at the first offloaded step. Before a twin runs, the pages holding each
    sequence's past tokens (context minus this step's new ones: earlier chunks of a chunked prompt, the
    history of a decode row in the step) are copied host -> device through pinned staging and cast; the twin's
    attention (the device backend) writes the step's rows there and attends over them; its new rows
    (slot_mapping) are copied device -> pinned host without waiting, and scattered into the host pages (cast
    back to cpu_dtype) when the model's forward returns (a forward hook), so that a CPU-computed decode step,
    a later chunk's twin or a KV swap reads them. The scratch is one more layer of device KV: the planner adds
    it to its KV term, memory_report to kv_pool.
  * StreamStats counts the twin runs (offloaded_layers), their weight bytes, the slots borrowed and the KV
    bytes both ways; the reloads of displaced units are ordinary prefetches in loads.
Host memory: each CPU layer is held twice (CPU form and device format, the latter pinned).

The lm_head (final projection, as large as a layer or larger) can be placed too: streamed (the last unit
of the ring) or on the CPU. Embeddings can stay on the CPU (the lookup is a gather; rows go to the GPU).

Engine integration (the lead wires `--offload-policy`):
    model = load_model(source, device, dtype, ...)   # or on the CPU first when the model exceeds the GPU
    driver = setup_offload(model, OffloadConfig(placements=...), device)   # or apply_plan(model, plan, device)
    runner = ModelRunner(model, cfg, device, dtype, num_blocks, block_size, seed,
                         kv_layers=driver.kv_layers(kv_dtype) if driver else None)
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from vramwise.config import format_size
from vramwise.kernels.attention_backend import select_attention_backend
from vramwise.memory import placement as pl
from vramwise.models.attention import Attention, AttentionMetadata
from vramwise.quant.apply import set_submodule
from vramwise.quant.cpu_packed import CpuPackedLinear

log = logging.getLogger(__name__)

RESIDENT, STREAMED, CPU = "resident", "streamed", "cpu"
PLACEMENTS = (RESIDENT, STREAMED, CPU)
_ALIASES = {"resident": RESIDENT, "r": RESIDENT, "gpu": RESIDENT, "streamed": STREAMED, "stream": STREAMED,
            "s": STREAMED, "cpu": CPU, "c": CPU}
HOST = torch.device("cpu")

#: Compute dtype of CPU layers when none is asked for. Measured on an AVX2 host (torch 2.13, 2 cores),
#: F.linear of a (1, 2048) activation with a (5504, 2048) weight: float32 2.05 ms (22 GB/s of weight read),
#: bfloat16 8.2 ms, float16 7.4 ms: half precision reads half the bytes yet runs 3.6-4x slower without native
#: bf16/fp16 instructions (and 1.5-5x slower at 16-128 tokens). QuantLinear's own CPU path is the torch
#: reference that dequantizes on every call, 10-30x slower than a float32 GEMM at decode (model_loader's
#: note). So CPU layers are dequantized and computed in float32 by default; hosts with AMX / AVX512-BF16 can
#: pass cpu_dtype=torch.bfloat16 to halve their memory, or cpu_weights="packed" to keep the linears packed for
#: torch's int4/int8 CPU kernels (quant/cpu_packed.py; on a 2-core AVX2 host, torch 2.13, a (1, 4096) x
#: (4096, 4096) int4 g128 product took 1.2 ms against 2.7 ms for float32; benchmarks/bench_cpu_linear.py).
DEFAULT_CPU_DTYPE = torch.float32

#: How CPU units hold their packed linears: dequantized once to cpu_dtype, or packed (CpuPackedLinear).
DEQUANTIZED, PACKED = "dequantized", "packed"
CPU_WEIGHTS = (DEQUANTIZED, PACKED)

#: The user-facing --cpu-weights choices (the planner's DriverCaps.cpu_weights vocabulary, so that `vramwise plan
#: --cpu-weights X` and `serve --cpu-weights X` mean the same) -> (cpu_dtype, cpu_weights) of the driver.
CPU_WEIGHT_FORMATS = {"fp32": ("float32", DEQUANTIZED), "bf16": ("bfloat16", DEQUANTIZED),
                      "packed": ("float32", PACKED)}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------


def parse_placements(spec: str | Sequence[str], num_layers: int) -> list[str]:
    """Per-layer placements from a list, or from text:
        "streamed"                       every layer so (resident | streamed | cpu; r / s / c for short)
        "resident:10,streamed:20,cpu:10" runs, in layer order; counts must add up to the layer count
        "r,r,s,c"                        one entry per layer
    Raises ValueError naming the bad part."""
    if isinstance(spec, str):
        parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty placement; use resident, streamed, cpu or runs like resident:10,streamed:22")
        if len(parts) == 1 and ":" not in parts[0] and "*" not in parts[0]:
            name = _ALIASES.get(parts[0])
            if name is None:
                raise ValueError(f"unknown placement {parts[0]!r}; choose from {', '.join(PLACEMENTS)}")
            return [name] * num_layers
        out: list[str] = []
        for part in parts:
            m = re.fullmatch(r"([a-z]+)\s*(?:[:*]\s*(\d+))?", part)
            name = _ALIASES.get(m.group(1)) if m else None
            if name is None:
                raise ValueError(f"bad placement entry {part!r}: expected NAME or NAME:COUNT with NAME one of "
                                 f"{', '.join(PLACEMENTS)}")
            out.extend([name] * (int(m.group(2)) if m.group(2) else 1))  # type: ignore[union-attr]
    else:
        out = []
        for p in spec:
            name = _ALIASES.get(str(p).strip().lower())
            if name is None:
                raise ValueError(f"unknown placement {p!r}; choose from {', '.join(PLACEMENTS)}")
            out.append(name)
    if len(out) != num_layers:
        raise ValueError(f"placement names {len(out)} layer(s) but the model has {num_layers}")
    return out


#: Prefill offload's threshold (tokens in a step) when no planner gives one (--offload without --gpu-memory).
#: The planner's own threshold (a whole step simulated both ways) for 13B int4 under 6 GiB on its built-in
#: H100 profile is 4 tokens with 1 sequence and 17 with 16: the GPU wins from small steps on, and the planner
#: keeps the threshold above max_num_seqs so that decode steps, which it costs with CPU layers on the CPU, stay
#: there. 128 is above the CLI's default max_num_seqs (64), so no decode step is offloaded, while every
#: prefill chunk of a real prompt is.
DEFAULT_PREFILL_OFFLOAD_MIN_TOKENS = 128


def resolve_driver_options(cpu_weights: str, prefill_offload: bool | None, planned_on_gpu: bool) -> tuple[str, bool]:
    """The "auto" defaults of --cpu-weights and --prefill-offload: under a GPU-memory budget on a GPU (the
    planner places the layers) CPU layers keep their int4/int8 weights packed and long prefills run them on the
    GPU, the fastest driver measured there (13B in 6 GiB at batch 1 on an H100: 29.5 tok/s and a 136 ms TTFT
    with a mixed placement, against 21.9 tok/s streamed; benchmarks/RESULTS.md, session 8); the planner still
    picks the placement, and a CPU-free one when that is faster. Elsewhere (a forced --offload, CPU runs)
    fp32 and no offload: CPU layers then compute exactly what the all-resident model does."""
    if cpu_weights == "auto":
        cpu_weights = "packed" if planned_on_gpu else "fp32"
    if prefill_offload is None:
        prefill_offload = planned_on_gpu
    return cpu_weights, bool(prefill_offload)


def prefill_offload_threshold(config: Any) -> int | None:
    """The engine's prefill-offload threshold without a planner: EngineConfig.prefill_offload_min_tokens,
    DEFAULT_PREFILL_OFFLOAD_MIN_TOKENS, or None when prefill offload is off. Bad values are named."""
    given = getattr(config, "prefill_offload_min_tokens", None)
    if not getattr(config, "prefill_offload", False):
        if given is not None:
            raise ValueError("prefill_offload_min_tokens is set but prefill offload is off; pass --prefill-offload")
        return None
    return DEFAULT_PREFILL_OFFLOAD_MIN_TOKENS if given is None else _min_tokens(given)


def _min_tokens(value: Any) -> int | None:
    """A prefill-offload threshold as an int (None: never), refused below 1."""
    if value is None:
        return None
    if int(value) < 1:
        raise ValueError(f"prefill_offload_min_tokens must be >= 1 (or None for never), got {value}")
    return int(value)


def cpu_weight_options(fmt: str) -> tuple[str, str]:
    """--cpu-weights fp32 | bf16 | packed -> (cpu_dtype, cpu_weights) for apply_placement / OffloadConfig."""
    if fmt not in CPU_WEIGHT_FORMATS:
        raise ValueError(f"unknown CPU weight format {fmt!r}; choose {', '.join(CPU_WEIGHT_FORMATS)}")
    return CPU_WEIGHT_FORMATS[fmt]


def parse_cpu_weights(name: str) -> str:
    value = str(name).strip().lower()
    if value not in CPU_WEIGHTS:
        raise ValueError(f"unknown cpu_weights {name!r}; choose {' or '.join(CPU_WEIGHTS)}")
    return value


def parse_cpu_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return DEFAULT_CPU_DTYPE
    if name not in _DTYPES:
        raise ValueError(f"unknown CPU compute dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


@dataclass(frozen=True)
class OffloadConfig:
    """Engine-level offload settings (EngineConfig.offload once the lead wires it).

    placements: per-layer list or text (parse_placements); None = no offload (all resident, no hooks).
    num_stream_buffers: GPU slots in the streaming ring (>= 2; prefetch depth is this minus one).
    embed_on_cpu: keep the token embedding table on the CPU (lookup there, rows copied to the GPU).
    lm_head: resident | streamed | cpu (final projection; not for a head tied to the embedding).
    cpu_dtype: compute dtype of CPU layers: auto (float32, see DEFAULT_CPU_DTYPE) | float32 | bfloat16 | float16.
    cpu_weights: how CPU layers hold packed (int4/int8) linears: dequantized (once, to cpu_dtype) | packed
                 (CpuPackedLinear: torch's packed CPU kernels; int8 a quarter, int4 about an eighth of the
                 fp32 bytes; group-wise int8 such as GGUF Q8_0 is held in bf16, half of fp32).
    prefill_offload_min_tokens: steps of at least this many tokens run the CPU decoder layers on the device
                 (module doc, "Prefill offload"); None = never.
    """

    placements: tuple[str, ...] | str | None = None
    num_stream_buffers: int = 2
    embed_on_cpu: bool = False
    lm_head: str = RESIDENT
    cpu_dtype: str = "auto"
    cpu_weights: str = DEQUANTIZED
    prefill_offload_min_tokens: int | None = None


# ------------------------------------------------------------------------------------------------------------
# Per-step host copies of the batch description (for CPU layers)
# ------------------------------------------------------------------------------------------------------------

#: Key in AttentionMetadata.prepared (the per-step scratch every layer sees) under which the host copy lives.
HOST_STEP_KEY = "vramwise.offload.host_step"


@dataclass
class HostStep:
    """This step's batch description on the host: built once per step (by the runner from its Python lists,
    or lazily from the device tensors by the first CPU layer), shared by every CPU layer of the step."""

    meta: AttentionMetadata  # slot_mapping / block_tables / context_lens_t on the host; its own `prepared`
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # id(dev) -> (dev, host)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Host copy of an integer batch tensor (positions), copied once per step."""
        hit = self.tensors.get(id(t))
        if hit is not None and hit[0] is t:  # `is`: the id of a freed tensor can be reused
            return hit[1]
        host = t.to(HOST)
        self.tensors[id(t)] = (t, host)
        return host


def host_metadata(meta: AttentionMetadata, **host_tensors: torch.Tensor) -> AttentionMetadata:
    """A copy of `meta` whose tensors are on the host, with a fresh `prepared` scratch (index tensors built
    there are host tensors, so they must not mix with the device layers' ones). `host_tensors` supplies
    fields already built on the host (the runner builds them from its lists); the others are copied D2H."""
    changes: dict[str, Any] = {}
    for f in fields(meta):
        value = getattr(meta, f.name)
        if f.name in host_tensors:
            changes[f.name] = host_tensors[f.name]
        elif isinstance(value, torch.Tensor):
            changes[f.name] = value.to(HOST)
    changes["prepared"] = {}
    return replace(meta, **changes)


def _step_tokens(args: tuple, kwargs: dict) -> int:
    """Tokens T of the step a layer call belongs to: from its AttentionMetadata (slot_mapping (T,)), else from
    its hidden states (T, hidden)."""
    meta = next((a for a in (*args, *kwargs.values()) if isinstance(a, AttentionMetadata)), None)
    if meta is not None:
        return int(meta.slot_mapping.shape[0])
    x = _hidden_arg(args, kwargs)
    return 0 if x is None else int(x.shape[0])


def attach_host_step(meta: AttentionMetadata, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     context_lens_t: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Give `meta` this step's batch on the host, built by the caller from host data it already has (no
    device-to-host copy): the batch tensors, and positions as (the device tensor the layers are called with,
    its host copy). CPU layers find it through host_step()."""
    step = HostStep(host_metadata(meta, slot_mapping=slot_mapping, block_tables=block_tables,
                                  context_lens_t=context_lens_t))
    if positions is not None:
        step.tensors[id(positions[0])] = positions
    meta.prepared[HOST_STEP_KEY] = step


def host_step(meta: AttentionMetadata) -> HostStep:
    step = meta.prepared.get(HOST_STEP_KEY)
    if step is None:
        step = HostStep(host_metadata(meta))
        meta.prepared[HOST_STEP_KEY] = step
    return step


# ------------------------------------------------------------------------------------------------------------
# The ring of device slots
# ------------------------------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    loads: int = 0  # whole-layer H2D copies issued into a slot (a replayed graph's copies included)
    prefetches: int = 0  # of which issued ahead, by the post-hook of the slot's previous user
    misses: int = 0  # of which issued by the layer that needed it (first use, out-of-order call)
    bytes_copied: int = 0
    replays: int = 0  # captured steps replayed (their copies are counted in loads from the step's schedule)
    replayed_loads: int = 0  # of loads, those a graph replay performed
    # Prefill offload (module doc): CPU decoder layers run on the device by their twins.
    offloaded_layers: int = 0  # twin runs (one per CPU layer per offloaded step)
    offload_bytes: int = 0  # twin weights copied H2D (not in bytes_copied, which is the streamed units')
    slots_borrowed: int = 0  # ring slots a twin took from a streamed unit (each reloaded, counted in prefetches)
    kv_bytes_in: int = 0  # past KV pages copied host -> device scratch (as held on the host)
    kv_bytes_out: int = 0  # new KV rows copied device -> host (in the device dtype)


@dataclass
class StepSchedule:
    """What one captured step does to the ring, recorded at capture (module doc, "Captured decode steps").

    end_owner: the streamed unit each slot holds when the step ends (the graph's copies, replayed);
    deferred: slots whose wrap-around copy (the next step's first units) after_replay() issues eagerly;
    loads / prefetches / misses / bytes: the copies inside the graph, counted into StreamStats per replay;
    live: the step ran eagerly (emulate mode, CPU tests): its copies really ran and counted themselves."""

    end_owner: list[int | None]
    deferred: list[int]
    loads: int = 0
    prefetches: int = 0
    misses: int = 0
    bytes: int = 0
    live: bool = False


@dataclass
class _StepRecorder:
    live: bool
    start_owner: list[int | None]
    start_stats: StreamStats
    deferred: list[int] = field(default_factory=list)  # slots whose wrap-around copy was held back


@dataclass
class _Segment:
    """One piece of a segmented decode step (module doc, "Segmented steps"): the device units between two
    breaks, captured as one CUDA graph.

    streamed: ring indices of the streamed units it reads; cpu_layer: the decoder layer computed on the CPU
    right after it (None: the last piece, or a piece that ends because its next streamed unit shares a slot
    with one of its own: slot_break_at, set on the piece that starts there, is that unit)."""

    streamed: list[int] = field(default_factory=list)
    cpu_layer: int | None = None
    slot_break_at: int | None = None
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    x_out: torch.Tensor | None = None  # (T, hidden) the piece ends with: the CPU unit's input (kept alive)
    x_in: torch.Tensor | None = None  # (T, hidden) static device buffer the next piece starts from
    cpu_call: tuple[nn.Module, tuple, dict] | None = None  # the CPU unit's call as captured: (module, args, kwargs)


@dataclass
class SegmentedStep:
    """A decode step captured in pieces around its CPU-computed layers (OffloadDriver.end_segmented_capture);
    replay_segmented() runs it."""

    segments: list[_Segment]

    @property
    def num_graphs(self) -> int:
        return len(self.segments)


@dataclass
class _SegRecorder:
    live: bool  # the step runs eagerly (emulate mode) with the pieces' ring schedule; else a CUDA capture
    segments: list[_Segment]
    pool: Any = None  # the graphs' memory pool (torch.cuda.graph_pool_handle())
    k: int = 0  # the piece being captured / run


class _SlotRing:
    """N equal device buffers (uint8, slot_bytes each) and, on CUDA, the copy stream and per-slot events.

    On the CPU the copies are plain synchronous copy_() calls and the event methods do nothing: the same
    driver code runs with the CPU as both sides."""

    def __init__(self, device: torch.device, num_slots: int, slot_bytes: int) -> None:
        self.device = device
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.owner: list[int | None] = [None] * num_slots  # streamed index each slot holds or is loading
        self.is_async = device.type == "cuda"
        self.copy_stream: torch.cuda.Stream | None = None
        if self.is_async:
            compute = torch.cuda.current_stream(device)
            self.copy_stream = torch.cuda.Stream(device=device)
            self.loaded = [torch.cuda.Event() for _ in range(num_slots)]
            self.freed = [torch.cuda.Event() for _ in range(num_slots)]
            for slot, ev in zip(self.slots, self.freed):
                # The slot was allocated on the compute stream and is written on the copy stream: tell the
                # caching allocator, so that when the slot is freed its block is not handed out again
                # before the copy stream's work on it is done.
                slot.record_stream(self.copy_stream)
                # The block may have been freed by the compute stream a moment ago with kernels still
                # reading it: the first copy into the slot must wait for those.
                ev.record(compute)
            # A second set of events for graph capture (see "Captured decode steps" in the module doc): the
            # graph's fork/join edges. Kept apart from the eager ones so that an event recorded inside a
            # capture is never waited on outside it, and the reverse.
            self.cap_loaded = [torch.cuda.Event() for _ in range(num_slots)]
            self.cap_freed = [torch.cuda.Event() for _ in range(num_slots)]
            self.cap_join = torch.cuda.Event()
            self.eager_join = torch.cuda.Event()
        # Capture state: None outside a captured step; else the slots whose cap_freed / cap_loaded event was
        # recorded in this capture (an event may be waited on only after it was recorded in the same capture).
        self._cap_freed: set[int] | None = None
        self._cap_loaded: set[int] = set()

    @property
    def capturing(self) -> bool:
        return self._cap_freed is not None

    def copy_in(self, s: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (a view of slot s) <- src (host bytes), after the slot's last reader finished."""
        if self.copy_stream is None:
            dst.copy_(src)
            return
        if self._cap_freed is not None:  # inside a graph capture: fork the copy stream off the capture stream
            if s not in self._cap_freed:  # a miss: the slot's readers so far are all behind this point
                self.mark_free(s)
            self.copy_stream.wait_event(self.cap_freed[s])
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)  # host-registered source: a memcpy node, no host-allocator event
            self.cap_loaded[s].record(self.copy_stream)
            self._cap_loaded.add(s)
            return
        self.copy_stream.wait_event(self.freed[s])
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)  # pinned source: a DMA on the copy engine, host not blocked
        self.loaded[s].record(self.copy_stream)

    def wait_loaded(self, s: int) -> None:
        if not self.is_async:
            return
        if self._cap_freed is not None:
            # Loaded in this capture: wait on that copy. Otherwise the slot was loaded before the step began
            # and join_copies() ordered that copy before the replay (an eager event cannot be waited on here).
            if s in self._cap_loaded:
                torch.cuda.current_stream(self.device).wait_event(self.cap_loaded[s])
            return
        torch.cuda.current_stream(self.device).wait_event(self.loaded[s])

    def mark_free(self, s: int) -> None:
        if not self.is_async:
            return
        if self._cap_freed is not None:
            self.cap_freed[s].record(torch.cuda.current_stream(self.device))
            self._cap_freed.add(s)
            return
        self.freed[s].record(torch.cuda.current_stream(self.device))

    # -- captured steps (module doc, "Captured decode steps") -------------------------------------------
    def join_copies(self) -> None:
        """Eager, before a replay: the compute stream waits for every copy issued so far (the previous step's
        wrap-around prefetch), so the graph's reads of the slots it does not load itself are ordered."""
        if self.is_async and self.copy_stream is not None:
            self.eager_join.record(self.copy_stream)
            torch.cuda.current_stream(self.device).wait_event(self.eager_join)

    def begin_capture(self) -> None:
        self._cap_freed = set()
        self._cap_loaded = set()

    def end_capture(self, join: bool) -> None:
        """Leave capture mode; with join (inside the capture still), the capture stream waits for the copy
        stream's last captured copy, so the graph ends with no copy in flight (CUDA refuses to end a capture
        with a forked stream left unjoined)."""
        if join and self.is_async and self._cap_loaded:
            self.cap_join.record(self.copy_stream)
            torch.cuda.current_stream(self.device).wait_event(self.cap_join)
        self._cap_freed = None
        self._cap_loaded = set()

    def after_replay(self) -> None:
        """Eager, after a replay: every slot's readers are in the graph just launched, so a later copy into
        any slot must wait for the whole graph (re-record each `freed` past it)."""
        for s in range(len(self.slots)):
            self.mark_free(s)

    def close(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still be writing a slot or reading a host buffer
        self.slots = []
        self.owner = []


# ------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers ModuleList; the offload driver needs the "
                        "decoder layers of a Llama-family model")
    return layers


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden state among a unit's call arguments: its first floating-point tensor ((T, hidden))."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def _embedding(model: nn.Module) -> nn.Embedding:
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(emb, nn.Module):
        raise TypeError(f"{type(model).__name__} has no model.embed_tokens")
    return emb  # type: ignore[return-value]


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of the model: that of its token embedding (QuantLinear's float parts follow it)."""
    return _embedding(model).weight.dtype


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class _Streamed:
    name: str  # module path: model.layers.7, lm_head
    module: nn.Module
    refs: list[pl.TensorRef]
    layout: pl.ByteLayout
    host: torch.Tensor  # uint8 (layout.nbytes,), pinned when the device is CUDA
    dst: torch.Tensor | None = None  # uint8 view of its slot, (layout.nbytes,)


@dataclass
class _Twin:
    """The device twin of a CPU decoder layer (module doc, "Prefill offload")."""

    index: int  # decoder layer index
    layer: nn.Module  # the CPU unit (computes on the host)
    module: nn.Module  # its structural copy, device format; tensors point at `host` views or a slot's
    refs: list[pl.TensorRef]  # the twin's tensors, in `layout` order
    layout: pl.ByteLayout
    host: torch.Tensor  # uint8 (layout.nbytes,): the layer's tensors as loaded (pinned when the device is CUDA)
    attn_path: str  # where the Attention module sits in the layer (and in the twin)


@dataclass
class _KVWriteBack:
    """New KV rows a twin wrote, on their way to the host pages (flushed by _flush_kv)."""

    pages: tuple[torch.Tensor, torch.Tensor]  # the CPU layer's host K, V pages (num_blocks, block_size, Hkv, D)
    slots: torch.Tensor  # (T,) int64 host: page row of each row below
    rows: tuple[torch.Tensor, torch.Tensor]  # (T, Hkv, D) K, V in the device dtype, host (pinned on CUDA)
    done: torch.cuda.Event | None  # recorded after the D2H copies (None on the CPU: already there)


class OffloadDriver:
    """Runs `placements` over `model`. Build it with apply_placement(); undo it with release().

    The units it places are the decoder layers and, optionally, the lm_head (a vocabulary-sized matrix:
    as large as a layer or larger); streamed units share one ring in execution order (layers, then lm_head).
    """

    def __init__(self, model: nn.Module, placements: list[str], device: torch.device, num_stream_buffers: int,
                 embed_on_cpu: bool, cpu_dtype: torch.dtype, dtype: torch.dtype,
                 host_allocator: pl.HostAllocator | None, lm_head: str, cpu_weights: str = DEQUANTIZED,
                 prefill_offload_min_tokens: int | None = None) -> None:
        self.model = model
        self.placements = placements
        self.lm_head = lm_head
        self.device = device
        self.dtype = dtype  # compute dtype of device layers
        self.cpu_dtype = cpu_dtype  # compute dtype (and KV dtype) of CPU layers
        self.cpu_weights = cpu_weights  # their packed linears: dequantized to cpu_dtype, or CpuPackedLinear
        self.stats = StreamStats()
        self.released = False
        # Captured decode steps (module doc): the in-step schedule's state while one is captured or emulated.
        self._step: _StepRecorder | None = None
        self._seg: _SegRecorder | None = None  # a segmented step (module doc) being captured or run live
        self._emb: nn.Module | None = None
        self._emb_rows: torch.Tensor | None = None  # (max_tokens, hidden) device rows a captured step reads
        self._emb_stage: list[torch.Tensor] = []  # two (max_tokens, hidden) pinned host buffers, used in turn
        self._emb_stage_done: list[torch.cuda.Event | None] = []  # H2D copy out of each buffer finished
        self._emb_turn = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._host_clones: dict[int, nn.Module] = {}  # id(shared module) -> its host clone for CPU units
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original module)
        self._shared = shared = pl.shared_modules(model)
        layers = _decoder_layers(model)
        # (module path, placement) of every unit, in execution order.
        units = [(f"model.layers.{i}", p) for i, p in enumerate(placements)]
        if lm_head != RESIDENT:
            units.append(("lm_head", lm_head))

        # Prefill offload (module doc): the device twins of CPU decoder layers and their state.
        self.prefill_offload_min_tokens = prefill_offload_min_tokens
        self._twins: dict[int, _Twin] = {}  # id(CPU decoder layer) -> its twin
        self._twin_pending: _Twin | None = None  # set by the CPU pre-hook for the forward that follows it
        self._twin_ring: _SlotRing | None = None  # one slot of its own, when the ring cannot lend one
        self._twin_last_slot: int | None = None  # ring slot the previous twin of a run of CPU layers used
        self._borrowed: dict[int, int] = {}  # ring slot -> the streamed unit a twin displaced from it
        self._kv_scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # device K, V pages, one layer's
        self._kv_pending: list[_KVWriteBack] = []
        self._patched: list[nn.Module] = []  # CPU units whose forward dispatches to their twin
        if host_allocator is None:
            host_allocator = pl.PinnedHostMemory() if device.type == "cuda" else pl.pageable_allocator
        self._allocator = host_allocator

        # 1. CPU units first and streamed units next: both free device memory when the model was loaded on
        #    the GPU, before resident layers and the slots take theirs. A CPU decoder layer's twin is packed
        #    from its tensors as loaded, before they are converted to the CPU form.
        self.bytes_cpu = 0
        for name, p in units:
            if p == CPU:
                if prefill_offload_min_tokens is not None and name != "lm_head":
                    self._make_twin(int(name.rsplit(".", 1)[1]), dtype)
                self.bytes_cpu += self._setup_cpu_unit(name)
        self.bytes_twins = sum(t.layout.nbytes for t in self._twins.values())  # host bytes
        self.twin_slot_bytes = pl.align(max((t.layout.nbytes for t in self._twins.values()), default=0))
        for twin in self._twins.values():
            self._dispatch_to_twin(twin.layer)
        # length of the run of consecutive twin layers each decoder layer is in (0: not a twin)
        self._twin_run: list[int] = []
        for is_twin, run in itertools.groupby(id(layer) in self._twins for layer in layers):
            k = len(list(run))
            self._twin_run += [k if is_twin else 0] * k
        if self._twins:  # the step's new KV rows reach the host pages by the end of the forward
            self._hooks.append(model.model.register_forward_hook(self._flush_kv_hook, always_call=True))
        self._streamed: list[_Streamed] = []
        for name, p in units:
            if p != STREAMED:
                continue
            module = model.get_submodule(name)
            pl.warn_unregistered_tensors(module, shared)
            self._cast_floats(module, dtype)
            refs = pl.owned_tensors(module, shared)
            layout = pl.ByteLayout.of(refs)
            host = pl.pack(refs, layout, host_allocator)
            pl.point_at(refs, layout.views(host))  # drops the unit's old (device) tensors
            self._streamed.append(_Streamed(name, module, refs, layout, host))
        self.bytes_streamed = sum(s.layout.nbytes for s in self._streamed)

        # 2. Resident layers and everything outside the units (embedding, final norm, a resident lm_head,
        #    the rotary table) go to the device.
        self.bytes_resident = 0
        for i in self.layers_with(RESIDENT):
            self._cast_floats(layers[i], dtype)
            refs = pl.owned_tensors(layers[i], shared)
            pl.move(refs, device)
            self.bytes_resident += pl.tensor_bytes(refs)
        self.embed_on_cpu = embed_on_cpu and self._can_embed_on_cpu(model)
        emb = _embedding(model)
        placed = {id(m) for name, _ in units for m in model.get_submodule(name).modules()} - shared
        if self.embed_on_cpu:
            placed |= {id(m) for m in emb.modules()}
        outside = pl.owned_tensors(model, placed)
        pl.move(outside, device)
        self.bytes_resident += pl.tensor_bytes(outside)
        if self.embed_on_cpu:
            emb_refs = pl.owned_tensors(emb)
            pl.move(emb_refs, HOST)
            self.bytes_cpu += pl.tensor_bytes(emb_refs)
            # Token ids (T,) to the host for the lookup, the rows (T, hidden) back to the device; inside a
            # captured step the rows come from the staging buffer instead (stage_embeddings).
            self._emb = emb
            self._hooks.append(emb.register_forward_pre_hook(self._emb_pre))
            self._hooks.append(emb.register_forward_hook(self._emb_post))

        # 3. The ring: N slots (fewer when fewer units stream), each unit re-pointed at its slot for good.
        n = min(num_stream_buffers, len(self._streamed))
        self.num_slots = n
        self.slot_bytes = pl.align(max((s.layout.nbytes for s in self._streamed), default=0))
        self._ring = _SlotRing(device, n, self.slot_bytes) if n else None
        for j, s in enumerate(self._streamed):
            slot = self._ring.slots[j % n]  # type: ignore[union-attr]
            s.dst = slot[: s.layout.nbytes]
            pl.point_at(s.refs, s.layout.views(slot))
            self._hooks.append(s.module.register_forward_pre_hook(self._make_streamed_pre(j)))
            self._hooks.append(s.module.register_forward_hook(self._make_streamed_post(j), always_call=True))
        for j in range(n):  # prime the ring: the first step starts with its first N streamed units loaded
            self._load(j, prefetch=True)
        # streamed units that run before decoder layer i in a step (where a twin sits in the ring's order)
        self._streamed_before = [sum(p == STREAMED for p in placements[:i]) for i in range(len(placements))]

    # -- bookkeeping ------------------------------------------------------------------------------------
    def layers_with(self, placement: str) -> list[int]:
        return [i for i, p in enumerate(self.placements) if p == placement]

    @property
    def bytes_slots(self) -> int:
        """Device bytes of the streaming ring (num_slots x slot_bytes)."""
        return self.num_slots * self.slot_bytes

    @property
    def device_bytes(self) -> int:
        """Weight bytes this placement keeps on the device: resident tensors plus the ring."""
        return self.bytes_resident + self.bytes_slots

    def kv_layers(self, kv_dtype: torch.dtype) -> list[tuple[torch.device, torch.dtype]]:
        """(device, dtype) of each layer's KV pages: CPU layers keep theirs on the host in their compute
        dtype; the others on the device in `kv_dtype`. Pass to ModelRunner(kv_layers=...), which also
        gives each layer the attention backend of its pages' device."""
        return [(HOST, self.cpu_dtype) if p == CPU else (self.device, kv_dtype) for p in self.placements]

    def summary(self) -> str:
        counts = {p: self.placements.count(p) for p in PLACEMENTS}
        head = "" if self.lm_head == RESIDENT else f", lm_head {self.lm_head}"
        return (f"{counts[RESIDENT]} layer(s) resident ({format_size(self.bytes_resident)} on {self.device} with "
                f"embeddings and head), {counts[STREAMED]} streamed ({format_size(self.bytes_streamed)} in host "
                f"memory, {self.num_slots} slot(s) of {format_size(self.slot_bytes)}), {counts[CPU]} on the CPU "
                f"({format_size(self.bytes_cpu)} in {str(self.cpu_dtype).removeprefix('torch.')}"
                f"{', linears packed' if self.cpu_weights == PACKED else ''}){head}"
                f"{', embeddings on the CPU' if self.embed_on_cpu else ''}"
                f"{self._prefill_summary()}")

    def _prefill_summary(self) -> str:
        if not self._twins:
            return ""
        return (f", prefill offload from {self.prefill_offload_min_tokens} tokens "
                f"({format_size(self.bytes_twins)} of device-format CPU layers in host memory)")

    # -- setup helpers ----------------------------------------------------------------------------------
    def _quantized_ids(self, module: nn.Module) -> set[int]:
        """Modules whose float tensors keep their dtype: packed linears (fp16 scales) and CPU-packed ones
        (bf16 scales, the dtype their kernels take)."""
        return {id(sub) for m in module.modules() if pl.is_quantized(m) or isinstance(m, CpuPackedLinear)
                for sub in m.modules()}

    def _cast_floats(self, module: nn.Module, dtype: torch.dtype) -> None:
        """Float tensors of the unit's plain modules to `dtype` (packed modules keep their scales' dtype)."""
        for r in pl.owned_tensors(module, self._shared | self._quantized_ids(module)):
            t = r.get()
            if t.is_floating_point() and t.dtype != dtype:
                r.set(t.to(dtype))

    def _cpu_linear(self, packed: nn.Module) -> nn.Module:
        """What a CPU unit computes a packed linear with: CpuPackedLinear (cpu_weights="packed"), or a float
        nn.Linear in cpu_dtype dequantized once."""
        if self.cpu_weights == PACKED:
            return CpuPackedLinear.from_module(packed)
        return pl.dequantized_linear(packed, HOST, self.cpu_dtype)

    def _setup_cpu_unit(self, name: str) -> int:
        """Weights to the host in cpu_dtype (packed linears dequantized once, or converted for the packed
        CPU kernels with cpu_weights="packed"), shared submodules cloned there, hooks that carry activations
        across. Returns the unit's host bytes."""
        module = self.model.get_submodule(name)
        if pl.is_quantized(module):  # the unit is itself a packed linear (a quantized lm_head)
            module = self._cpu_linear(module)
            set_submodule(self.model, name, module)
        pl.replace_packed_linears(module, self._cpu_linear)
        pl.warn_unregistered_tensors(module, self._shared)
        refs = pl.owned_tensors(module, self._shared)
        pl.move(refs, HOST)  # first, so that an up-cast to cpu_dtype allocates host memory, not device memory
        self._cast_floats(module, self.cpu_dtype)
        if self.device.type != "cpu":
            self._clone_shared_to_host(module)
        self._hooks.append(module.register_forward_pre_hook(self._cpu_pre, with_kwargs=True))
        self._hooks.append(module.register_forward_hook(self._cpu_post, always_call=True))
        return pl.tensor_bytes(refs)

    def _clone_shared_to_host(self, module: nn.Module) -> None:
        """Give a CPU unit host clones of the submodules it shares with device units (the rotary table), so
        it never pulls their tensors across PCIe (RotaryEmbedding rebuilds its table for whatever device it
        sees). One clone per shared module, for all CPU units; values copied, so bit-identical."""
        clones = self._host_clones
        for name, m in list(module.named_modules()):
            if not name or id(m) not in self._shared:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if id(parent) in self._shared:
                continue  # cloned along with its parent
            if id(m) not in clones:
                clones[id(m)] = pl.host_clone(m, HOST)
            self._restore.append((parent, child, m))
            setattr(parent, child, clones[id(m)])

    def _can_embed_on_cpu(self, model: nn.Module) -> bool:
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and getattr(lm_head, "weight", None) is _embedding(model).weight:
            log.warning("embed_on_cpu ignored: the embedding is tied to lm_head, which needs it on the device")
            return False
        return True

    # -- streaming hooks --------------------------------------------------------------------------------
    def _load(self, j: int, prefetch: bool) -> None:
        """Issue the H2D copy of streamed unit j into its slot (queued behind the slot's last reader)."""
        s = j % self.num_slots
        st = self._streamed[j]
        self._ring.copy_in(s, st.dst, st.host)  # type: ignore[union-attr,arg-type]
        self._ring.owner[s] = j  # type: ignore[union-attr]
        self.stats.loads += 1
        self.stats.bytes_copied += st.layout.nbytes
        if prefetch:
            self.stats.prefetches += 1
        else:
            self.stats.misses += 1

    def _make_streamed_pre(self, j: int):
        def pre(module: nn.Module, args: tuple) -> None:
            if self._seg is not None:  # a segmented step: the ring is driven between its pieces
                self._seg_streamed_pre(j, args)
                return
            if j == 0 and self._step is None:
                self._restore_step_start()
            s = j % self.num_slots
            if self._ring.owner[s] != j:  # type: ignore[union-attr]
                self._load(j, prefetch=False)
            self._ring.wait_loaded(s)  # type: ignore[union-attr]

        return pre

    def _restore_step_start(self) -> None:
        """At the first streamed unit of an eager step: load every slot that does not hold its step-start
        unit now, before this unit's own copies queue on the copy stream. Normally every slot does (the
        previous step's wrap-around); not after a forward that skipped the streamed lm_head (a prefill chunk
        that samples nothing runs no logits), whose slot still holds the head. Loaded here, the copy overlaps
        the units before the slot's first reader; loaded by that reader's pre-hook, it would queue behind the
        copies the earlier units' post-hooks issued and stall the step for two copies."""
        ring = self._ring
        for s in range(self.num_slots):  # in slot order: unit 0's slot first, it is read first
            if ring.owner[s] != s:  # type: ignore[union-attr]
                self._load(s, prefetch=False)

    def _make_streamed_post(self, j: int):
        n, count = self.num_slots, len(self._streamed)
        name = self._streamed[j].name
        layers = _decoder_layers(self.model)
        # the decoder layer after this unit is a CPU layer whose twin runs from a ring slot (prefill offload)
        after = int(name.rsplit(".", 1)[1]) + 1 if name.startswith("model.layers.") else len(layers)
        twin = self._twins.get(id(layers[after])) if after < len(layers) else None
        twin_follows = twin is not None and twin.layout.nbytes <= self.slot_bytes

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if self._seg is not None:
                return
            s = j % n
            self._ring.mark_free(s)  # type: ignore[union-attr]
            nxt = j + n if j + n < count else s  # the slot's next user: later this step, or next step's
            if self._ring.owner[s] == nxt:  # type: ignore[union-attr]
                return
            if twin_follows and self._offloads(args, {}):
                # An offloaded step: the CPU layer's twin runs next, from this slot (the one needed last);
                # the slot's next user is loaded after it (_give_back_slots), one copy as in any step.
                self._ring.owner[s] = None  # type: ignore[union-attr]
                self._borrowed[s] = nxt
                self.stats.slots_borrowed += 1
                return
            if nxt == s and self._step is not None:
                # A captured step issues no wrap-around copy (it would outlive the graph): after_replay()
                # issues it eagerly once the replay is queued.
                self._step.deferred.append(s)
                return
            self._load(nxt, prefetch=True)

        return post

    # -- embeddings on the host -------------------------------------------------------------------------
    def _emb_pre(self, module: nn.Module, args: tuple) -> tuple:
        if (self._step is not None and not self._step.live) or (self._seg is not None and not self._seg.live):
            # Capturing: the lookup must not read device ids (a sync). It runs once, now, on dummy host ids;
            # its rows are discarded for the staging buffer's (_emb_post), which the graph reads by address.
            return (torch.zeros(args[0].shape[0], dtype=torch.long), *args[1:])
        return tuple(a.to(HOST) if isinstance(a, torch.Tensor) else a for a in args)

    def _emb_post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._step is not None or self._seg is not None:
            # A captured (or emulated) step reads the rows stage_embeddings() put on the device: (T, hidden).
            if self._emb_rows is None or out.shape[0] > self._emb_rows.shape[0]:
                raise RuntimeError(f"a captured step of {out.shape[0]} tokens has no embedding staging buffer that "
                                   "large; call prepare_step_capture(max_tokens) first")
            return self._emb_rows[: out.shape[0]]
        return out.to(self.device)

    # -- captured decode steps (module doc, "Captured decode steps") --------------------------------------
    def capture_blocker(self) -> str | None:
        """Why this placement's decode steps cannot be captured as CUDA graphs (None: they can): streamed
        units whose host buffers are pageable (file-backed, or a pageable allocator): CUDA refuses a copy from
        pageable memory inside a capture. (Layers computed on the CPU split the step into pieces instead:
        segmented(), module doc "Segmented steps".)"""
        if self.device.type == "cuda" and not all(st.host.is_pinned() for st in self._streamed):
            return "streamed layers' host buffers are not pinned (a pageable copy cannot be captured)"
        return None

    def prepare_step_capture(self, max_tokens: int) -> int:
        """Allocate what captured steps of up to max_tokens tokens need beyond the ring: with embeddings on
        the host, the device rows the graph reads (max_tokens, hidden) and two pinned host staging buffers.
        Returns the device bytes allocated (the caller counts them with its graphs)."""
        if not self.embed_on_cpu or (self._emb_rows is not None and self._emb_rows.shape[0] >= max_tokens):
            return 0
        weight = self._emb.weight  # type: ignore[union-attr]  # (vocab, hidden) on the host
        # In the table's dtype: the eager path's out.to(device) keeps it too.
        self._emb_rows = torch.zeros(max_tokens, weight.shape[1], dtype=weight.dtype, device=self.device)
        pin = self.device.type == "cuda"
        self._emb_stage = [torch.empty(max_tokens, weight.shape[1], dtype=weight.dtype, pin_memory=pin)
                           for _ in range(2)]
        self._emb_stage_done = [None, None]
        return self._emb_rows.numel() * self._emb_rows.element_size()

    def stage_embeddings(self, ids: torch.Tensor) -> None:
        """Before a replay: look up the step's token ids (T,) (a host tensor) on the host and copy the rows
        into the device buffer the captured step reads, on the compute stream (so ordered before the replay).
        Two host buffers are used in turn: a buffer is reused only after its previous copy finished."""
        if not self.embed_on_cpu:
            return
        t = ids.shape[0]
        if self._emb_rows is None or t > self._emb_rows.shape[0]:
            raise RuntimeError(f"no embedding staging buffer for {t} tokens; call prepare_step_capture first")
        k = self._emb_turn = 1 - self._emb_turn
        stage = self._emb_stage[k][:t]
        done = self._emb_stage_done[k]
        if done is not None:
            done.synchronize()  # recorded two steps ago: normally complete, no wait
        with torch.no_grad():
            torch.index_select(self._emb.weight, 0, ids.to(HOST, torch.long), out=stage)  # type: ignore[union-attr]
            rows = self._emb_rows[:t]
            if self.device.type == "cuda":
                rows.copy_(stage, non_blocking=True)  # same values as the eager path's out.to(device)
                done = self._emb_stage_done[k] = done or torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
            else:
                rows.copy_(stage)

    def begin_step_capture(self, live: bool = False) -> None:
        """Hooks switch to the in-step schedule for one forward of the model: copies for units loaded by
        earlier units of the step, none for the next step (deferred to after_replay), embedding rows from the
        staging buffer. live=False: inside a CUDA-graph capture (nothing executes; the host-side state is
        restored by end_step_capture); live=True: the step runs eagerly (emulate mode) with the same schedule.
        The ring must be in the state every step starts from (ensure_step_start)."""
        if self._step is not None:
            raise RuntimeError("a captured step is already being recorded")
        if self._ring is not None:
            if any(self._ring.owner[s] != s for s in range(self.num_slots)):
                raise RuntimeError("the ring is not in its step-start state; call ensure_step_start() first")
            if not live:
                self._ring.begin_capture()
        self._step = _StepRecorder(live, list(self._ring.owner) if self._ring else [], replace(self.stats))

    def end_step_capture(self) -> StepSchedule:
        """Close begin_step_capture; inside a CUDA capture, call it before the capture ends (it joins the copy
        stream into the capture stream). Returns the step's schedule for after_replay()."""
        rec = self._step
        if rec is None:
            raise RuntimeError("end_step_capture without begin_step_capture")
        self._step = None
        ring = self._ring
        st, st0 = self.stats, rec.start_stats
        sched = StepSchedule(list(ring.owner) if ring else [], sorted(set(rec.deferred)), st.loads - st0.loads,
                             st.prefetches - st0.prefetches, st.misses - st0.misses,
                             st.bytes_copied - st0.bytes_copied, rec.live)
        self._leave_capture(rec, join=True)
        return sched

    def abort_step_capture(self) -> None:
        """Leave capture mode after a failed capture (no join: the capture is being thrown away)."""
        rec, self._step = self._step, None
        if rec is not None:
            self._leave_capture(rec, join=False)

    def _leave_capture(self, rec: _StepRecorder, join: bool) -> None:
        """After a recorded (not live) step, the ring leaves capture mode (join: see _SlotRing.end_capture).
        Nothing ran: the slots still hold what they held at the start, and the stats count only copies that
        ran (a replay adds the schedule's)."""
        if self._ring is None or rec.live:
            return
        self._ring.end_capture(join=join)
        self._ring.owner = list(rec.start_owner)
        for f in fields(StreamStats):  # in place: callers may hold the stats object
            setattr(self.stats, f.name, getattr(rec.start_stats, f.name))

    def ensure_step_start(self) -> None:
        """Eager, before a captured step (its capture or a replay): slot s holds unit s for every slot (the
        state the wrap-around prefetch leaves; a miss loads it otherwise), and the compute stream waits for
        all copies issued so far, so that the graph may read the slots it does not load itself."""
        ring = self._ring
        if ring is None:
            return
        self._restore_step_start()
        ring.join_copies()

    def after_replay(self, sched: StepSchedule) -> None:
        """Eager, right after a replay (or an emulated step): the ring's state becomes the schedule's end
        state, later copies wait for the graph, and the deferred wrap-around copies are issued."""
        ring = self._ring
        self.stats.replays += 1
        if ring is None:
            return
        if not sched.live:
            ring.owner = list(sched.end_owner)
            st = self.stats
            st.loads += sched.loads
            st.prefetches += sched.prefetches
            st.misses += sched.misses
            st.bytes_copied += sched.bytes
            st.replayed_loads += sched.loads
        ring.after_replay()
        for s in sched.deferred:
            if ring.owner[s] != s:
                self._load(s, prefetch=True)

    # -- segmented steps: captured pieces around CPU layers (module doc, "Segmented steps") -----------------
    @property
    def segmented(self) -> bool:
        """Whether a captured decode step of this placement is split into pieces (it has CPU-computed decoder
        layers), rather than captured whole with the ring's copies inside."""
        return CPU in self.placements

    def segment_plan(self) -> list[_Segment]:
        """The pieces of a decode step, from the placements: a piece ends before each CPU decoder layer, and
        before a streamed unit whose slot an earlier unit of the same piece reads (its copy must wait for that
        reader, so it cannot be issued between pieces ahead of it). Fresh objects on every call."""
        n = self.num_slots
        segs = [_Segment()]
        j = 0
        for i, p in enumerate(self.placements):
            if p == CPU:
                segs[-1].cpu_layer = i
                segs.append(_Segment())
            elif p == STREAMED:
                if any(u % n == j % n for u in segs[-1].streamed):
                    segs.append(_Segment(slot_break_at=j))
                segs[-1].streamed.append(j)
                j += 1
        return segs

    def _seg_begin(self, seg: _Segment) -> None:
        """Eager, before a piece runs: each streamed unit it reads is loaded (or loading; a miss issues it
        now) and the compute stream waits for its copy."""
        ring = self._ring
        for j in seg.streamed:
            s = j % self.num_slots
            if ring.owner[s] != j:  # type: ignore[union-attr]
                self._load(j, prefetch=False)
            ring.wait_loaded(s)  # type: ignore[union-attr]

    def _seg_end(self, seg: _Segment) -> None:
        """Eager, after a piece was queued: its slots are free once it has run, and each one's next user (a
        later unit of this step, or the next step's) is copied in on the copy stream, overlapping the CPU
        layer that follows the piece."""
        ring, n, count = self._ring, self.num_slots, len(self._streamed)
        for j in seg.streamed:
            s = j % n
            ring.mark_free(s)  # type: ignore[union-attr]
            nxt = j + n if j + n < count else s
            if ring.owner[s] != nxt:  # type: ignore[union-attr]
                self._load(nxt, prefetch=True)

    def begin_segmented_capture(self, pool: Any = None, live: bool = False) -> None:
        """Start a segmented step for one forward of the model (called on the capture stream). live=False:
        CUDA-graph capture, the first piece's capture begins now and the hooks break it at each piece's end;
        live=True: the forward runs eagerly (emulate mode, CPU tests) with the same ring schedule at the same
        points. Close with end_segmented_capture()."""
        if self._seg is not None or self._step is not None:
            raise RuntimeError("a captured step is already being recorded")
        segs = self.segment_plan()
        self._seg = rec = _SegRecorder(live, segs, pool)
        if live:
            self._seg_begin(segs[0])
        else:
            self._seg_graph_begin(rec)

    def _seg_graph_begin(self, rec: _SegRecorder) -> None:
        g = torch.cuda.CUDAGraph()
        rec.segments[rec.k].graph = g
        g.capture_begin(pool=rec.pool)

    def _seg_advance(self, x: torch.Tensor | None) -> None:
        """Close the current piece (its output `x` kept alive: the next piece, or the CPU unit, reads it)."""
        rec = self._seg
        seg = rec.segments[rec.k]  # type: ignore[union-attr]
        seg.x_out = x
        if rec.live:  # type: ignore[union-attr]
            self._seg_end(seg)
        else:
            seg.graph.capture_end()

    def _seg_open_next(self) -> None:
        rec = self._seg
        rec.k += 1  # type: ignore[union-attr]
        if rec.k >= len(rec.segments):  # type: ignore[union-attr]
            raise RuntimeError("the forward ran past the segment plan (units called out of order?)")
        if rec.live:  # type: ignore[union-attr]
            self._seg_begin(rec.segments[rec.k])  # type: ignore[union-attr]
        else:
            self._seg_graph_begin(rec)  # type: ignore[arg-type]

    def _seg_streamed_pre(self, j: int, args: tuple) -> None:
        rec = self._seg
        nxt = rec.k + 1  # type: ignore[union-attr]
        if nxt < len(rec.segments) and rec.segments[nxt].slot_break_at == j:  # type: ignore[union-attr]
            self._seg_advance(_hidden_arg(args, {}))
            self._seg_open_next()

    def _seg_cpu_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        rec = self._seg
        seg = rec.segments[rec.k]  # type: ignore[union-attr]
        seg.cpu_call = (module, args, kwargs)
        self._seg_advance(_hidden_arg(args, kwargs))

    def _seg_cpu_post(self, out: torch.Tensor) -> torch.Tensor:
        rec = self._seg
        if rec.live:  # type: ignore[union-attr]
            self._seg_open_next()
            return out
        seg = rec.segments[rec.k]  # type: ignore[union-attr]
        seg.x_in = x_in = torch.empty_like(out)  # static: the replay copies the CPU unit's output here
        x_in.copy_(out)
        self._seg_open_next()
        return x_in

    def end_segmented_capture(self) -> SegmentedStep:
        """Close the last piece (inside the model's forward it must be the plan's last) and return the step."""
        rec, self._seg = self._seg, None
        if rec is None:
            raise RuntimeError("end_segmented_capture without begin_segmented_capture")
        if rec.k != len(rec.segments) - 1:
            self._abort_seg(rec)
            raise RuntimeError(f"the forward ended in piece {rec.k} of {len(rec.segments)}: the model did not run "
                               "every placed unit in order")
        last = rec.segments[-1]
        if rec.live:
            self._seg_end(last)
        else:
            last.graph.capture_end()
        return SegmentedStep(rec.segments)

    def segmented_forward(self, forward: Any, pool: Any = None, live: bool = False) -> tuple[Any, SegmentedStep]:
        """forward() (one forward of the model) as a segmented step: begin_segmented_capture, the forward,
        end_segmented_capture (abort_segmented_capture if the forward raises). Returns (its output, the step)."""
        self.begin_segmented_capture(pool, live)
        try:
            out = forward()
        except BaseException:
            self.abort_segmented_capture()
            raise
        return out, self.end_segmented_capture()

    def abort_segmented_capture(self) -> None:
        rec, self._seg = self._seg, None
        if rec is not None:
            self._abort_seg(rec)

    def _abort_seg(self, rec: _SegRecorder) -> None:
        g = rec.segments[rec.k].graph
        if not rec.live and g is not None:
            try:
                g.capture_end()
            except RuntimeError:
                pass  # the capture was already invalidated; the graph is thrown away

    def replay_segmented(self, step: SegmentedStep, meta: AttentionMetadata) -> None:
        """Run a captured segmented step: each piece's graph, the ring's copies between them, and the CPU
        layers eagerly on `meta` (this step's batch: real context lengths, its HostStep prepared)."""
        for seg in step.segments:
            self._seg_begin(seg)
            seg.graph.replay()
            self._seg_end(seg)
            if seg.cpu_call is None:
                continue
            module, args, kwargs = seg.cpu_call
            x = seg.x_out

            def sub(a: Any) -> Any:
                if isinstance(a, AttentionMetadata):
                    return meta
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    return x
                return a

            out = module(*(sub(a) for a in args), **{k: sub(v) for k, v in kwargs.items()})
            seg.x_in.copy_(out)  # type: ignore[union-attr]
        self.stats.replays += 1

    # -- CPU-unit hooks ---------------------------------------------------------------------------------
    def _cpu_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._seg is not None:  # a segmented decode step (never offloaded: _offloads)
            self._seg_cpu_pre(module, args, kwargs)
        # Before a twin too: a1bb72e skipped this flush for twins (it waits for the earlier twins' kernels, ~25 ms
        # of a capped 13B TTFT), and the GPU test of prefill offload under decode graphs
        # (test_cuda_graphs_with_cpu_layers_equal_eager, prefill_offload_min_tokens=2) then gave other tokens
        # than the emulated graphs: bisected to that commit on an H100; the race it exposed is not found yet.
        self._flush_kv()  # a CPU layer reads its host pages: earlier twins' rows must be in them (normally are)
        twin = self._twins.get(id(module))
        if twin is not None and self._offloads(args, kwargs):
            self._twin_pending = twin  # the forward runs the twin, on the device tensors as they are
            return None
        step = next((host_step(a) for a in (*args, *kwargs.values()) if isinstance(a, AttentionMetadata)), None)

        def to_host(a: Any) -> Any:
            if isinstance(a, AttentionMetadata):
                return step.meta  # type: ignore[union-attr]
            if isinstance(a, torch.Tensor):
                if a.is_floating_point():  # hidden states (T, hidden): D2H, in the CPU compute dtype
                    return a.to(HOST, self.cpu_dtype)
                return step.tensor(a) if step is not None else a.to(HOST)  # positions: once per step
            return a

        return tuple(to_host(a) for a in args), {k: to_host(v) for k, v in kwargs.items()}

    def _cpu_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            # (T, hidden) back for the next device layer, in the device layers' dtype. Pageable H2D: small
            # (a decode step moves T x hidden x 2 bytes), so not staged through pinned memory.
            out = output.to(self.device, self.dtype)
            return self._seg_cpu_post(out) if self._seg is not None else out
        return output

    # -- prefill offload (module doc, "Prefill offload") -----------------------------------------------
    def _make_twin(self, index: int, dtype: torch.dtype) -> None:
        """Pack CPU decoder layer `index` as loaded (floats of its plain modules in `dtype`, packed linears as
        they are: what a streamed unit would hold) into a host buffer, and keep a structural copy of the layer
        pointing at it: the twin, re-pointed at a device slot when it runs."""
        layer = _decoder_layers(self.model)[index]
        attn_path = next((n for n, m in layer.named_modules() if isinstance(m, Attention)), None)
        if attn_path is None:
            raise TypeError(f"decoder layer {index} ({type(layer).__name__}) has no Attention module; prefill "
                            "offload needs one to give the twin device KV pages")
        twin = pl.structural_copy(layer, self._shared)  # (_setup_cpu_unit warns of unregistered tensors)
        refs = pl.owned_tensors(twin, self._shared)
        keep = self._quantized_ids(twin)  # packed modules keep their dtypes (scales), as _cast_floats does
        values = [r.get() for r in refs]
        layout = pl.ByteLayout.of_shapes(
            (tuple(t.shape), dtype if t.is_floating_point() and id(r.module) not in keep else t.dtype)
            for r, t in zip(refs, values))
        host = pl.pack_values(values, layout, self._allocator)  # cast while copying; the layer is untouched
        del values
        pl.point_at(refs, layout.views(host))  # the twin holds no device memory between runs
        self._twins[id(layer)] = _Twin(index, layer, twin, refs, layout, host, attn_path)

    def _offloads(self, args: tuple, kwargs: dict) -> bool:
        """Whether the step of this layer call runs its CPU layers on the device: eager (not recorded for a
        captured step, nor inside any CUDA-graph capture) and at least prefill_offload_min_tokens tokens."""
        if self._step is not None or self._seg is not None or self.prefill_offload_min_tokens is None:
            return False
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        return _step_tokens(args, kwargs) >= self.prefill_offload_min_tokens

    def _dispatch_to_twin(self, layer: nn.Module) -> None:
        """The CPU unit's forward runs its twin when its pre-hook chose to (_cpu_pre), else its own."""
        own = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            twin, self._twin_pending = self._twin_pending, None
            if twin is None:
                return own(*args, **kwargs)
            if twin.layer is not layer:
                raise RuntimeError(f"prefill offload: a twin of layer {twin.index} was pending at another layer")
            return self._run_twin(twin, args, kwargs)

        layer.forward = forward  # an instance attribute; release() deletes it
        self._patched.append(layer)

    def _run_twin(self, twin: _Twin, args: tuple, kwargs: dict) -> Any:
        """Run CPU layer twin.index on the device: its weights into a slot, the step's past KV into the
        scratch pages, the twin's forward on the device tensors, the new KV rows back to the host pages."""
        meta = next(a for a in (*args, *kwargs.values()) if isinstance(a, AttentionMetadata))
        host_meta = host_step(meta).meta
        ring, s = self._borrow_slot(twin)
        slot = ring.slots[s]
        ring.copy_in(s, slot[: twin.layout.nbytes], twin.host)
        ring.wait_loaded(s)
        pl.point_at(twin.refs, twin.layout.views(slot))
        host_attn: Attention = twin.layer.get_submodule(twin.attn_path)  # type: ignore[assignment]
        if host_attn.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound; the runner binds one before running")
        if host_attn.kv_scales is not None:
            raise NotImplementedError("prefill offload of a CPU layer whose host KV pages are quantized")
        pages = host_attn.kv_cache
        scratch = self._scratch_for(pages[0])
        self._upload_past_kv(pages, scratch, host_meta)
        attn: Attention = twin.module.get_submodule(twin.attn_path)  # type: ignore[assignment]
        attn.kv_cache, attn.kv_scales = scratch, None
        attn.backend = select_attention_backend(self.device)
        out = twin.module(*args, **kwargs)
        ring.mark_free(s)  # the slot's readers are queued: a later copy into it waits for them
        self._write_back_kv(pages, scratch, meta.slot_mapping, host_meta.slot_mapping)
        self.stats.offloaded_layers += 1
        self.stats.offload_bytes += twin.layout.nbytes
        layers = _decoder_layers(self.model)
        nxt = twin.index + 1
        if nxt >= len(layers) or id(layers[nxt]) not in self._twins:
            self._give_back_slots()  # the run of CPU layers ends: the displaced streamed units reload now
        return out

    def _borrow_slot(self, twin: _Twin) -> tuple[_SlotRing, int]:
        """A device slot for the twin: a ring slot when the ring's slots are large enough, the one whose
        streamed unit is needed last (that unit is reloaded, as a prefetch, when the run of CPU layers
        ends: no miss). A streamed unit just before the run already handed over its slot without loading its
        next user (_make_streamed_post): no extra copy then. With 3+ slots and a run of 3+ CPU layers,
        consecutive twins alternate between two slots so that one's copy overlaps the other's compute (for one
        extra reload per run). Without a ring (nothing streams), one slot of the twins' own."""
        ring = self._ring
        if ring is None or self.slot_bytes < twin.layout.nbytes:
            if self._twin_ring is None:
                self._twin_ring = _SlotRing(self.device, 1, self.twin_slot_bytes)
                log.info("prefill offload: %s of device memory for the twins' weight slot",
                         format_size(self.twin_slot_bytes))
            return self._twin_ring, 0
        n, count, first = self.num_slots, len(self._streamed), self._streamed_before[twin.index]

        def later(s: int) -> tuple[bool, int]:  # borrowed slots first, then the unit needed last
            u = ring.owner[s]
            return (u is None, 0 if u is None else (u - first) % count)

        alternate = n >= 3 and self._twin_run[twin.index] >= 3
        choices = [s for s in range(n) if not alternate or s != self._twin_last_slot]
        s = max(choices, key=later)
        u = ring.owner[s]
        if u is not None:
            self._borrowed[s] = u
            ring.owner[s] = None
            self.stats.slots_borrowed += 1
        self._twin_last_slot = s
        return ring, s

    def _give_back_slots(self) -> None:
        """Reload the streamed units the twins displaced (prefetches: their layers are still ahead)."""
        for s, u in sorted(self._borrowed.items()):
            if self._ring is not None and self._ring.owner[s] is None:
                self._load(u, prefetch=True)
        self._borrowed.clear()
        self._twin_last_slot = None

    def _scratch_for(self, host_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The twins' device K, V pages: the host layer's page geometry (num_blocks, block_size, Hkv, D), so
        block tables and slot mappings index them unchanged; in the device layers' dtype. Allocated at the
        first offloaded step (zeros: pages no step wrote hold finite values), again if the pool changes."""
        cur = self._kv_scratch
        if cur is None or cur[0].shape != host_k.shape:
            self._kv_scratch = None
            cur = self._kv_scratch = (torch.zeros(host_k.shape, dtype=self.dtype, device=self.device),
                                      torch.zeros(host_k.shape, dtype=self.dtype, device=self.device))
            log.info("prefill offload: %s of device memory for one layer's KV pages",
                     format_size(self.bytes_kv_scratch))
        return cur

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a stream sync (through pinned memory on CUDA)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _upload_past_kv(self, pages: tuple[torch.Tensor, torch.Tensor], scratch: tuple[torch.Tensor, torch.Tensor],
                        host_meta: AttentionMetadata) -> None:
        """Copy the pages holding each sequence's past tokens (its context before this step's new ones) from
        the host pages into the scratch, cast to the device dtype. Whole pages: the tail of a sequence's last
        page is then overwritten by the step's own rows."""
        block = pages[0].shape[1]
        qsl, ctx, tables = host_meta.query_start_loc, host_meta.context_lens, host_meta.block_tables
        ids = []
        for b in range(len(ctx)):
            past = ctx[b] - (qsl[b + 1] - qsl[b])
            if past > 0:
                ids.append(tables[b, : math.ceil(past / block)])
        if not ids:
            return
        idx = torch.unique(torch.cat(ids)).to(torch.long)  # (P,) block ids; shared blocks copied once
        idx_dev = self._to_device(idx)
        pin = self.device.type == "cuda"
        for src, dst in zip(pages, scratch):
            stage = torch.empty((idx.numel(), *src.shape[1:]), dtype=src.dtype, pin_memory=pin)
            torch.index_select(src, 0, idx, out=stage)  # (P, block, Hkv, D) in the host dtype
            moved = stage.to(self.device, non_blocking=True) if pin else stage
            dst.index_copy_(0, idx_dev, moved.to(self.dtype))
            self.stats.kv_bytes_in += stage.numel() * stage.element_size()

    def _write_back_kv(self, pages: tuple[torch.Tensor, torch.Tensor], scratch: tuple[torch.Tensor, torch.Tensor],
                       slots_dev: torch.Tensor, slots_host: torch.Tensor) -> None:
        """Queue the copy of the rows this step wrote (slot_mapping) from the scratch to the host; the host
        pages get them at _flush_kv (the end of the forward), so the host does not wait for the twin here."""
        pin = self.device.type == "cuda"
        rows = []
        for src in scratch:
            r = src.flatten(0, 1).index_select(0, slots_dev)  # (T, Hkv, D) on the device
            if pin:
                host = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
                host.copy_(r, non_blocking=True)
                r = host
            rows.append(r)
            self.stats.kv_bytes_out += r.numel() * r.element_size()
        done = None
        if pin:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        self._kv_pending.append(_KVWriteBack(pages, slots_host, (rows[0], rows[1]), done))

    def _flush_kv(self) -> None:
        """Scatter the queued KV rows into the host pages (cast to their dtype), after their copies landed."""
        if not self._kv_pending:
            return
        pending, self._kv_pending = self._kv_pending, []
        with torch.no_grad():
            for wb in pending:
                if wb.done is not None:
                    wb.done.synchronize()
                for page, rows in zip(wb.pages, wb.rows):
                    page.flatten(0, 1).index_copy_(0, wb.slots, rows.to(page.dtype))

    def _flush_kv_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._flush_kv()

    @property
    def bytes_kv_scratch(self) -> int:
        """Device bytes of the twins' KV pages (0 until the first offloaded step)."""
        return sum(t.numel() * t.element_size() for t in self._kv_scratch) if self._kv_scratch else 0

    @property
    def bytes_twin_slot(self) -> int:
        """Device bytes of the twins' own weight slot (only when the ring cannot lend one; 0 until used)."""
        return sum(t.numel() for t in self._twin_ring.slots) if self._twin_ring is not None else 0

    def prefill_offload_bytes(self, kv_pages: Sequence[int] | None = None) -> tuple[int, int]:
        """Device bytes prefill offload takes beyond the ring, allocated at the first offloaded step:
        (the twins' K and V pages, of `kv_pages` = a CPU layer's page shape (num_blocks, block_size, Hkv, D)
        when given, else as allocated; the twins' own weight slot, when the ring cannot lend one)."""
        if not self._twins:
            return 0, 0
        kv = self.bytes_kv_scratch
        if kv_pages is not None:
            kv = 2 * math.prod(kv_pages) * torch.empty((), dtype=self.dtype).element_size()
        ring_lends = self._ring is not None and self.slot_bytes >= self.twin_slot_bytes
        return kv, 0 if ring_lends else self.twin_slot_bytes

    # -- undo -------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the hooks and free the device slots. Streamed units are left computing from their host
        buffers (unpinned), CPU units stay on the CPU (dequantized in cpu_dtype, or CpuPackedLinear; the
        shared rotary table is theirs again), resident ones on the device: the model is a plain module again, and
        apply_placement can lay it out anew (build a new ModelRunner after that, for the KV placement)."""
        if self.released:
            return
        self.released = True
        self._flush_kv()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in self._patched:
            layer.__dict__.pop("forward", None)  # the class's forward again
        self._patched.clear()
        if self._twin_ring is not None:
            self._twin_ring.close()
            self._twin_ring = None
        self._twins.clear()
        self._kv_scratch = None
        self._borrowed.clear()
        for parent, attr, original in reversed(self._restore):
            setattr(parent, attr, original)
        self._restore.clear()
        self._host_clones.clear()
        if self._ring is not None:
            self._ring.close()  # waits for copies in flight
            self._ring = None
        for s in self._streamed:
            pl.point_at(s.refs, s.layout.views(s.host))
            s.dst = None
        close = getattr(self._allocator, "close", None)
        if callable(close):
            close()  # unpin: the buffers stay valid as ordinary host memory
        self.num_slots = 0


#: The driver currently laid over each model, so that a second placement is not stacked on the first.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, OffloadDriver] = weakref.WeakKeyDictionary()


def driver_of(model: nn.Module) -> OffloadDriver | None:
    """The offload driver laid over `model` (None when it has none, or it was released): what the decode
    graphs (engine/cuda_graphs.py) consult to capture streamed steps."""
    driver = _ACTIVE.get(model)
    return driver if driver is not None and not driver.released else None


def apply_placement(
    model: nn.Module,
    placements: str | Sequence[str],
    device: torch.device | str,
    num_stream_buffers: int = 2,
    *,
    embed_on_cpu: bool = False,
    lm_head: str = RESIDENT,
    cpu_dtype: torch.dtype | str | None = None,
    cpu_weights: str = DEQUANTIZED,
    dtype: torch.dtype | None = None,
    host_allocator: pl.HostAllocator | None = None,
    prefill_offload_min_tokens: int | None = None,
) -> OffloadDriver:
    """Lay `model` out as `placements` says (one of resident | streamed | cpu per decoder layer) for running
    on `device`, and return the driver that executes it. The model may start anywhere (all on the CPU is
    the way for models larger than the GPU); its tensors are moved, packed and re-pointed in place. Build
    the ModelRunner afterwards with kv_layers=driver.kv_layers(kv_dtype).

    num_stream_buffers: slots in the GPU ring (>= 2). embed_on_cpu: token embedding table on the host.
    lm_head: resident | streamed (through the same ring, after the last layer) | cpu; not for a tied head.
    cpu_dtype: compute dtype of CPU units (default DEFAULT_CPU_DTYPE). cpu_weights: their packed linears
    dequantized to cpu_dtype (default) or "packed" (quant/cpu_packed.CpuPackedLinear; float linears stay
    float, in cpu_dtype). dtype: compute dtype of the device
    units (default: the embedding's). host_allocator: where streamed units' host buffers come from
    (default: pinned memory when `device` is CUDA, else pageable; placement.file_backed_allocator for
    models larger than RAM). prefill_offload_min_tokens: steps of at least this many tokens (all sequences
    together) run the CPU decoder layers on the device (module doc, "Prefill offload"); None = never.
    """
    layers = _decoder_layers(model)
    names = parse_placements(placements, len(layers))
    head = _ALIASES.get(str(lm_head).strip().lower())
    if head is None:
        raise ValueError(f"unknown lm_head placement {lm_head!r}; choose from {', '.join(PLACEMENTS)}")
    if head != RESIDENT:
        lm = getattr(model, "lm_head", None)
        if not isinstance(lm, nn.Module):
            raise TypeError(f"{type(model).__name__} has no lm_head module to place")
        if getattr(lm, "weight", None) is _embedding(model).weight:
            raise ValueError(f"lm_head placement {head!r}: this model ties lm_head to the token embedding, "
                             "which the first step reads on the device; keep lm_head resident")
    min_tokens = _min_tokens(prefill_offload_min_tokens)
    if num_stream_buffers < 2:
        raise ValueError(f"num_stream_buffers must be >= 2 (one slot computing while the next loads), "
                         f"got {num_stream_buffers}")
    current = _ACTIVE.get(model)
    if current is not None and not current.released:
        raise RuntimeError("this model already has an offload placement; release() it before applying another")
    cpu_compute = parse_cpu_dtype(cpu_dtype)
    cpu_linears = parse_cpu_weights(cpu_weights)
    dev = _normalize(device)
    with torch.inference_mode(False), torch.no_grad():  # the views must be ordinary tensors, not inference ones
        driver = OffloadDriver(model, names, dev, num_stream_buffers, embed_on_cpu, cpu_compute,
                               dtype or _model_dtype(model), host_allocator, head, cpu_linears, min_tokens)
    _ACTIVE[model] = driver
    log.info("offload: %s", driver.summary())
    return driver


def setup_offload(model: nn.Module, config: OffloadConfig, device: torch.device | str) -> OffloadDriver | None:
    """What the engine calls after loading: None when the config asks for no offload (no hooks at all)."""
    if config.placements is None and not config.embed_on_cpu and config.lm_head == RESIDENT:
        return None
    placements = config.placements if config.placements is not None else RESIDENT
    return apply_placement(model, placements, device, config.num_stream_buffers, embed_on_cpu=config.embed_on_cpu,
                           lm_head=config.lm_head, cpu_dtype=config.cpu_dtype, cpu_weights=config.cpu_weights,
                           prefill_offload_min_tokens=config.prefill_offload_min_tokens)


def apply_plan(model: nn.Module, plan: Any, device: torch.device | str, **kw: Any) -> OffloadDriver:
    """Execute a planner Plan (memory/planner.py): its per-layer placements, ring size, lm_head, embeddings
    placement and prefill_offload_min_tokens (long prefill steps run the CPU layers on the device; kw:
    apply_placement's cpu_dtype, cpu_weights, host_allocator, dtype, or a prefill_offload_min_tokens of
    the caller's)."""
    kw.setdefault("prefill_offload_min_tokens", getattr(plan, "prefill_offload_min_tokens", None))
    return apply_placement(model, list(plan.layers), device, max(2, int(plan.num_stream_buffers)),
                           embed_on_cpu=plan.embeddings == "cpu", lm_head=plan.lm_head, **kw)
