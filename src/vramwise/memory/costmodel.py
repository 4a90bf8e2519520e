"""Cost model: how long a step takes for a placement, from measured bandwidths and throughputs.

The roofline, per decode step at batch B (time per token = step / B):

    step >= Σ over memory tiers of (bytes read from that tier / the tier's bandwidth)

    resident layers   (w + kv_read) / HBM               or  2 n B / GPU_flops when compute-bound
    streamed layers   w / H2D_pinned  (the copy)  overlapped with GPU compute when buffers allow
    CPU layers        w / CPU_bw                         or  2 n B / CPU_flops when compute-bound
                      + the activations' round trip (2 x B h a / H2D + 2 sync latencies)

where w is a layer's weight bytes, n its linear weights (2 n FLOPs per token), kv_read the KV bytes its
attention reads. A weight read from any tier serves all B tokens of the step, so streaming amortizes over
B, while the CPU's flops grow with B: that is what decides streaming against CPU compute. Copies and CPU
compute use different engines (the DMA engine, the cores), so a mixed placement overlaps them.

Overlap is not a formula but a schedule, so `simulate` plays the step out: ops run one after another in
layer order (each needs the previous one's output), streamed ops also wait for their weights' copy, and
copies run back to back on one copy engine into a ring of N GPU buffers, the j-th streamed op of a step
always in slot j mod N (the offload driver's fixed slot assignment, so tensor addresses never change),
once the op that used that slot last has finished, across step boundaries too (the next step's first
streamed layers are prefetched while this step's last layers and the sampler run; when N does not divide
the number of streamed layers, the first of the next step waits for the last of this one). The steady-state step
is the last of a few simulated steps. With N >= 2 and streamed layers in a block this gives

    step ≈ max(Σ copies, Σ GPU compute) + Σ CPU compute (+ fill)        (streamed, CPU, no overlap)
    step ≈ Σ over (streamed, CPU) pairs of max(copy, CPU compute)       (mixed, interleaved)

The profile's bandwidths are achievable rates (measured copies), not datasheet peaks; fixed per-op
overheads (kernel launches, host syncs, the engine's Python step) are separate fields so the roofline
(`overheads=False`) and the prediction can both be reported. Pure arithmetic: no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from vramwise.memory.budget import GiB, MiB, dequant_chunk_columns

# --------------------------------------------------------------------------------------------------------
# Device profiles
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """Measured (or datasheet) speeds of one GPU + host pair. Bandwidths in bytes/s, throughputs in FLOP/s,
    sizes in bytes, latencies in seconds. total_memory = 0 means no GPU (everything runs on the CPU).

    hbm_bandwidth           device-memory rate a memory-bound kernel achieves (a D2D copy, bytes read +
                            written per second)
    h2d_pinned_bandwidth    host-to-device copy from pinned (page-locked) memory: the streaming rate
    h2d_pageable_bandwidth  host-to-device copy from ordinary memory (mmap'd checkpoints)
    gpu_fp16_flops          fp16 tensor-core GEMM rate on LLM-shaped matrices (prefill)
    cuda_context_bytes      device memory the CUDA context, cuBLAS handle and loaded kernels take before
                            any tensor (NVML, per process)
    cpu_bandwidth           rate at which a CPU GEMV reads its weights (all cores)
    cpu_packed_bandwidth    the same for packed int4/int8 weights when that differs (torch's packed CPU kernel
                            is compute-bound at one token); 0 = as cpu_bandwidth
    cpu_quant_flops         CPU matmul rate on int4/int8 weights when compute-bound (batches)
    cpu_float_flops         CPU matmul rate on fp32/fp16 weights
    host_memory_bandwidth   DRAM bandwidth that CPU compute and DMA copies share
    host_memory             host RAM (for pinned streamed weights and CPU layers' KV)
    num_sms                 streaming multiprocessors (sizes split-K attention partials)
    gpu_op_overhead_s       per decoder layer on the GPU: ~10 kernel launches inside a CUDA graph
    cpu_op_overhead_s       per decoder layer on the CPU: thread-pool fork/join of ~7 matmuls
    sync_latency_s          one GPU<->CPU hand-over (event wait + tiny copy)
    copy_latency_s          fixed cost of one async copy
    step_overhead_s         the engine's per-step host work (scheduler, sampling, Python)
    eager_launch_s          host time per kernel an eager step issues (Python module code, torch dispatch,
                            Triton launch): prefills run eagerly, and a layer's ~10-45 launches can take longer
                            on the host than its kernels on the GPU (eager_prefill_launches)
    """

    name: str
    description: str
    total_memory: int
    hbm_bandwidth: float
    h2d_pinned_bandwidth: float
    h2d_pageable_bandwidth: float
    gpu_fp16_flops: float
    cuda_context_bytes: int
    cpu_bandwidth: float
    cpu_quant_flops: float
    cpu_float_flops: float
    host_memory_bandwidth: float
    host_memory: int
    num_sms: int = 0
    cpu_packed_bandwidth: float = 0.0
    library_workspace_bytes: int = 32 * MiB
    gpu_op_overhead_s: float = 25e-6
    cpu_op_overhead_s: float = 30e-6
    sync_latency_s: float = 20e-6
    copy_latency_s: float = 10e-6
    step_overhead_s: float = 0.6e-3
    # H100 host, session 9 (benchmarks/profile_prefill.py, unprofiled): 2.43 ms of host time per resident 13B
    # int4 layer of a 512-token prefill under a 6 GiB budget, which launches 42.75 kernels a layer = 57 us each
    # (41.7 us uncapped, where the layer has no offload hooks and fewer, larger chunks: 1.18 ms for 28.3).
    eager_launch_s: float = 57e-6
    source: str = "built-in"

    @property
    def has_gpu(self) -> bool:
        return self.total_memory > 0

    def with_overrides(self, **kw: Any) -> "DeviceProfile":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "DeviceProfile | None" = None) -> "DeviceProfile":
        """Fields from `d` over those of `base` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if base is None:
            return cls(**kw)
        return replace(base, **kw)

    def summary(self) -> str:
        if not self.has_gpu:
            return (f"{self.name}: no GPU; CPU weights {self.cpu_bandwidth / 1e9:.0f} GB/s, "
                    f"{self.cpu_quant_flops / 1e12:.2f} TFLOP/s quantized ({self.source})")
        return (f"{self.name}: HBM {self.hbm_bandwidth / 1e9:.0f} GB/s, pinned H2D "
                f"{self.h2d_pinned_bandwidth / 1e9:.1f} GB/s, CPU {self.cpu_bandwidth / 1e9:.0f} GB/s, "
                f"context {self.cuda_context_bytes / MiB:.0f} MiB ({self.source})")


#: The reference rig of the issues: one H100 80GB HBM3, 16 host cores, 125 GiB (shared/peers/README.md).
#: Measured there: D2D copy 2979 GB/s (bytes read + written), pinned H2D 54.5 GB/s, pageable H2D 8.06 GB/s.
#: Derived from the peers' llama.cpp runs on that host (Q4_0 13B, 4.5 bits per weight):
#:  - cpu_bandwidth: -ngl 30 decodes at 26.1 tok/s = 38.3 ms per token; its 30 GPU layers take ~3.7 ms
#:    (all-GPU: 5.07 ms per 41 layers), so 10 CPU layers + the Q6_K output (1.92 GB) take ~34.6 ms:
#:    ~55 GB/s.
#:  - cpu_quant_flops: llama-batched-bench at 16 sequences, -ngl 22, decodes 26.0 tok/s aggregate = 615 ms
#:    per step for 18 CPU layers + output (5.87 G weights x 2 x 16 tokens = 188 GFLOP): ~0.3 TFLOP/s.
#: cpu_packed_bandwidth: torch's packed int4 CPU kernel (our --cpu-weights packed path) on the H100 machine's host,
#:    one token, 13B layer shapes, weights out of the caches: 41 GB/s (benchmarks/bench_cpu_linear.py, session 7);
#:    compute-bound there, unlike llama.cpp's 55 GB/s above. At 16 tokens the same kernel ran at 0.48-0.57 TFLOP/s
#:    (cpu_quant_flops is llama.cpp's 0.3 above: kept, as the lower of the two).
#: gpu_fp16_flops: 600 TFLOP/s on LLM-shaped GEMMs (an 8192^3 bf16 product ran at ~790 on such a machine).
#: cpu_float_flops, host_memory_bandwidth and cuda_context_bytes: from `vramwise doctor` on that machine
#: type (see H100_DOCTOR_NOTE); refine them with `vramwise doctor` on the machine you run on.
H100 = DeviceProfile(
    name="h100",
    description="NVIDIA H100 80GB HBM3 + 16-core host (the peers' benchmark rig)",
    total_memory=81559 * MiB,
    hbm_bandwidth=2979e9,
    h2d_pinned_bandwidth=54.5e9,
    h2d_pageable_bandwidth=8.06e9,
    gpu_fp16_flops=600e12,
    cuda_context_bytes=500 * MiB,
    cpu_bandwidth=55e9,
    cpu_quant_flops=0.3e12,
    cpu_float_flops=1.0e12,
    host_memory_bandwidth=120e9,
    host_memory=125 * GiB,
    num_sms=132,
    cpu_packed_bandwidth=41e9,
    source="built-in: peers' H100 measurements",
)

#: The card of the promise, for illustration (datasheet figures, not measured here): RTX 2060 6 GB,
#: 336 GB/s GDDR6 (copies reach ~90%: 300 GB/s), PCIe 3.0 x16 (~12 GB/s pinned), ~20 TFLOP/s fp16 with
#: fp32 accumulation; a 6-core desktop with dual-channel DDR4-3200 (51 GB/s peak).
RTX2060 = DeviceProfile(
    name="rtx2060",
    description="RTX 2060-class 6 GB card, PCIe 3.0 x16, 6-core desktop (datasheet figures)",
    total_memory=6144 * MiB,
    hbm_bandwidth=300e9,
    h2d_pinned_bandwidth=12e9,
    h2d_pageable_bandwidth=6e9,
    gpu_fp16_flops=20e12,
    cuda_context_bytes=300 * MiB,
    cpu_bandwidth=25e9,
    cpu_quant_flops=0.15e12,
    cpu_float_flops=0.4e12,
    host_memory_bandwidth=40e9,
    host_memory=32 * GiB,
    num_sms=30,
    library_workspace_bytes=8 * MiB,
    source="built-in: datasheet (illustrative)",
)

#: No GPU: every layer runs on the CPU (a laptop-class machine; `doctor` measures the real one).
CPU_GENERIC = DeviceProfile(
    name="cpu",
    description="CPU only (generic 8-core, dual-channel DDR4)",
    total_memory=0,
    hbm_bandwidth=0.0,
    h2d_pinned_bandwidth=0.0,
    h2d_pageable_bandwidth=0.0,
    gpu_fp16_flops=0.0,
    cuda_context_bytes=0,
    cpu_bandwidth=20e9,
    cpu_quant_flops=0.1e12,
    cpu_float_flops=0.3e12,
    host_memory_bandwidth=30e9,
    host_memory=16 * GiB,
    source="built-in: generic",
)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (H100, RTX2060, CPU_GENERIC)}

#: Ratio of a packed (int4/int8) CPU matmul's compute-bound rate to the fp32 GEMM rate: dequantizing in
#: the inner loop costs about as much as the multiply-adds (llama.cpp's q4 GEMM reaches ~0.3 TFLOP/s on
#: the H100 host). Used where doctor measured the fp32 rate only.
CPU_QUANT_TO_FLOAT = 0.3


def builtin_profile(name: str) -> DeviceProfile:
    key = name.lower()
    if key not in BUILTIN_PROFILES:
        raise ValueError(f"unknown device profile {name!r}; built-in: {', '.join(BUILTIN_PROFILES)} (or 'auto')")
    return BUILTIN_PROFILES[key]


def profile_from_doctor(report: dict[str, Any]) -> DeviceProfile:
    """A DeviceProfile from `vramwise doctor`'s cached report (memory/bandwidth.py writes it).

    Measured fields replace those of the closest built-in profile (h100 for an H100, else rtx2060 as a
    generic GPU, cpu without a GPU); what doctor does not measure (e.g. fp16 GEMM rate on LLM shapes,
    overheads) comes from that base.
    """
    gpu = report.get("gpu") or None
    cpu = report.get("cpu") or {}
    if gpu:
        gname = str(gpu.get("name", ""))
        base = H100 if "H100" in gname.upper() else RTX2060
    else:
        base = CPU_GENERIC
    kw: dict[str, Any] = {}
    for key in ("cpu_bandwidth", "cpu_packed_bandwidth", "cpu_float_flops", "host_memory_bandwidth", "host_memory"):
        value = cpu.get(key)
        if isinstance(value, (int, float)) and value > 0:
            kw[key] = int(value) if key == "host_memory" else float(value)
    if cpu.get("cpu_float_flops") and not cpu.get("cpu_quant_flops"):
        kw["cpu_quant_flops"] = CPU_QUANT_TO_FLOAT * cpu["cpu_float_flops"]
    elif cpu.get("cpu_quant_flops"):
        kw["cpu_quant_flops"] = cpu["cpu_quant_flops"]
    if gpu:
        for key in ("total_memory", "hbm_bandwidth", "h2d_pinned_bandwidth", "h2d_pageable_bandwidth",
                    "gpu_fp16_flops", "cuda_context_bytes", "num_sms"):
            value = gpu.get(key)
            if isinstance(value, (int, float)) and value > 0:  # a failed or odd measurement keeps the base's
                kw[key] = int(value) if key in ("total_memory", "cuda_context_bytes", "num_sms") else float(value)
        kw["name"] = "doctor:" + "".join(ch for ch in gname.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")
        kw["description"] = f"{gname} (measured by vramwise doctor {report.get('time', '')})".strip()
    else:
        kw["name"] = "doctor:cpu"
        kw["description"] = f"CPU only (measured by vramwise doctor {report.get('time', '')})".strip()
        kw["total_memory"] = 0
    kw["source"] = "vramwise doctor " + str(report.get("time", ""))
    return replace(base, **kw)


def load_profile_json(path: str) -> DeviceProfile:
    """A profile from JSON: either a doctor report or a DeviceProfile.to_dict() (fields over the h100's)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "hbm_bandwidth" in data:
        return DeviceProfile.from_dict(data, base=H100)
    return profile_from_doctor(data)


# --------------------------------------------------------------------------------------------------------
# Time of one piece of work
# --------------------------------------------------------------------------------------------------------


def linear_flops(params: int, tokens: int) -> float:
    """2 FLOPs (a multiply and an add) per weight per token."""
    return 2.0 * params * tokens


def attention_flops(q_size: int, tokens: int, context: float) -> float:
    """QK^T and PV: 2 x 2 x q_size FLOPs per (query token, context token) pair."""
    return 4.0 * q_size * tokens * context


def gpu_time(dev: DeviceProfile, weight_bytes: float, flops: float, other_bytes: float = 0.0,
             overheads: bool = True) -> float:
    """One layer on the GPU: max((w + other) / HBM, flops / GPU_flops) (+ launch overhead).
    other_bytes: KV read by attention, activations."""
    t = max((weight_bytes + other_bytes) / dev.hbm_bandwidth, flops / dev.gpu_fp16_flops)
    return t + (dev.gpu_op_overhead_s if overheads else 0.0)


def prefill_dequant_time(dev: DeviceProfile, weight_bytes: float, params: int, overheads: bool = True) -> float:
    """What a long prefill (>= budget.DEQUANT_MIN_TOKENS rows) adds to a quantized layer on the GPU: the kernels
    dequantize its packed weights into an fp16 workspace for cuBLAS (kernels/w4a16.py _dequant_matmul), a pass
    that reads the packed bytes and writes 2 bytes per weight, which cuBLAS then reads back (gpu_time counts
    the flops only). Measured on an H100 (benchmarks/bench_kernels.py, M = 512, 13B shapes, CUDA graphs):
    65-72 us over the dense fp16 matmul per 13824 x 5120 matrix, against the (packed + 2 x params) / HBM =
    60 us this gives; the model's whole layer: ~0.27 ms of its ~0.8 ms."""
    t = (weight_bytes + 2.0 * params) / dev.hbm_bandwidth
    return t + (dev.gpu_op_overhead_s if overheads else 0.0)


#: Kernels of an eager decoder layer besides its matmuls: 2 RMSNorms, rotary + KV write, attention, SwiGLU, the
#: residual adds and a split-K reduce (H100 prefill trace, session 9: 7 a layer).
EAGER_LAYER_BASE_LAUNCHES = 7


def eager_prefill_launches(matrices: list[tuple[int, int]], dequant_workspace_bytes: int | None,
                           act_bytes: int = 2) -> int:
    """Kernels one eager prefill step launches for a decoder layer whose matmuls are `matrices` ((N, K) each).
    dequant_workspace_bytes: the long-prefill path's workspace (kernels/w4a16.py _dequant_matmul), None when
    the matmuls are single kernels. That path dequantizes each weight in column chunks of at most the
    workspace (whole multiples of 128 columns) and runs one cuBLAS call a chunk, and with more than one chunk
    copies each chunk's product into its columns: 2 launches for one chunk, 3 a chunk otherwise. (The H100
    trace of a capped 13B prefill, 64 MiB workspace: 12 chunks, 43 kernels a layer; this gives 42.)"""
    n = EAGER_LAYER_BASE_LAUNCHES
    for rows, k in matrices:
        if dequant_workspace_bytes is None:
            n += 1
            continue
        cols = dequant_chunk_columns(k, act_bytes, dequant_workspace_bytes)
        chunks = -(-rows // cols)
        n += 2 * chunks + (chunks if chunks > 1 else 0)
    return n


def cpu_time(dev: DeviceProfile, weight_bytes: float, flops: float, other_bytes: float = 0.0, *,
             quantized: bool = True, bandwidth_share: float = 1.0, overheads: bool = True) -> float:
    """One layer on the CPU: max(w / (CPU_bw x share), flops / CPU_flops) + other / CPU_bw (+ fork/join).

    CPU_flops is cpu_quant_flops for packed weights, cpu_float_flops for float ones. bandwidth_share < 1
    when DMA copies compete for the same DRAM (mixed placements)."""
    rate = dev.cpu_quant_flops if quantized else dev.cpu_float_flops
    bw = dev.cpu_bandwidth * bandwidth_share
    wbw = (dev.cpu_packed_bandwidth or dev.cpu_bandwidth) * bandwidth_share if quantized else bw
    t = max(weight_bytes / wbw, flops / rate) + other_bytes / bw
    return t + (dev.cpu_op_overhead_s if overheads else 0.0)


def copy_time(dev: DeviceProfile, nbytes: float, *, pinned: bool = True, bandwidth_share: float = 1.0,
              overheads: bool = True) -> float:
    """Host-to-device copy: bytes / (H2D bandwidth x share) (+ the copy's fixed latency)."""
    bw = (dev.h2d_pinned_bandwidth if pinned else dev.h2d_pageable_bandwidth) * bandwidth_share
    return nbytes / bw + (dev.copy_latency_s if overheads else 0.0)


def handover_time(dev: DeviceProfile, nbytes: float, overheads: bool = True) -> float:
    """Activations crossing between GPU and CPU: bytes / pinned H2D + one sync latency."""
    if not dev.has_gpu:
        return 0.0
    return nbytes / dev.h2d_pinned_bandwidth + (dev.sync_latency_s if overheads else 0.0)


def dram_shares(dev: DeviceProfile, copies: bool, cpu_compute: bool, packed: bool = False) -> tuple[float, float]:
    """(copy share, CPU share) of their bandwidths when DMA copies and CPU compute both read host DRAM:
    if H2D + the CPU layers' read rate exceeds the DRAM bandwidth, both slow down in proportion (an
    approximation that assumes they run at the same time, which the mixed schedule arranges). packed: the CPU
    layers hold packed weights, read at cpu_packed_bandwidth (a compute-bound kernel asks less of DRAM)."""
    if not (copies and cpu_compute) or dev.host_memory_bandwidth <= 0:
        return 1.0, 1.0
    demand = dev.h2d_pinned_bandwidth + ((dev.cpu_packed_bandwidth or dev.cpu_bandwidth) if packed
                                         else dev.cpu_bandwidth)
    f = min(1.0, dev.host_memory_bandwidth / demand)
    return f, f


# --------------------------------------------------------------------------------------------------------
# The schedule of one step
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One piece of a forward step, in execution order.

    device   "gpu" or "cpu"
    run_s    time on its device once its input (and its weights) are there
    copy_s   H2D copy of its weights into a ring buffer slot before it can run (streamed ops), else 0
    """

    name: str
    device: str
    run_s: float
    copy_s: float = 0.0


def simulate(steps: list[list[Op]], num_buffers: int, *, handover_s: float = 0.0,
             step_overhead_s: float = 0.0) -> list[float]:
    """Durations of consecutive steps, each a list of ops (see the module docstring for the schedule).

    num_buffers  ring slots for streamed weights (>= 1 when any op has copy_s > 0)
    handover_s   added whenever consecutive ops run on different devices (activation copy + sync)
    The copy engine starts idle with empty slots at t = 0 (the first step is cold, as a prefill after
    an idle period); copies for step k+1 may start during step k. Returns one duration per step.
    """
    if num_buffers < 1 and any(op.copy_s > 0 for ops in steps for op in ops):
        raise ValueError("streamed ops need at least one ring buffer")
    t = 0.0  # when the previous op finished
    copy_free = 0.0  # when the copy engine is next idle
    slot_free = [0.0] * max(1, num_buffers)  # when each ring slot may be overwritten
    prev_device = steps[0][0].device if steps and steps[0] else "gpu"
    out: list[float] = []
    for ops in steps:
        start_of_step = t
        j = 0  # streamed ops so far in this step
        for op in ops:
            if op.device != prev_device:
                t += handover_s
                prev_device = op.device
            if op.copy_s > 0:
                slot = j % num_buffers
                c_end = (copy_free if copy_free > slot_free[slot] else slot_free[slot]) + op.copy_s
                copy_free = c_end
                t = (t if t > c_end else c_end) + op.run_s
                slot_free[slot] = t
                j += 1
            else:
                t += op.run_s
        t += step_overhead_s
        out.append(t - start_of_step)
    return out


def steady_step_time(ops: list[Op], num_buffers: int, *, handover_s: float = 0.0,
                     step_overhead_s: float = 0.0) -> float:
    """Seconds per step once the copy pipeline is in steady state (the 3rd simulated step)."""
    return simulate([ops] * 3, num_buffers, handover_s=handover_s, step_overhead_s=step_overhead_s)[-1]
