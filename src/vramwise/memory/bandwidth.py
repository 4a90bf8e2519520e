"""`vramwise doctor`'s checks and measurements, and their cache (the planner's measured device profile).

Checks: Python, torch (and the CUDA it was built with), the NVIDIA driver, the GPU (name, memory, compute
capability), Triton, NVML (pynvml) and whether NVML can see per-process memory. Each check is ok, info,
warn or problem; problems are things that stop vramwise from using the GPU.

Measurements (bytes/s, FLOP/s, bytes):
  CPU  host memory copy rate (bytes read + written), the rate an fp32 GEMV reads its matrix (the CPU
       weight-read rate the cost model uses), the fp32 GEMM rate
  GPU  device-memory copy rate (bytes read + written, as the peers' figures), pinned and pageable
       host-to-device and pinned device-to-host copy rates, an fp16 GEMM of prefill shape, the CUDA
       context (NVML per-process bytes after torch.cuda.init() and a first cuBLAS call, minus what
       torch's allocator holds), and pinned copies running while the CPU runs a GEMV (how much the two
       slow each other down through the shared DRAM)
The report is cached as JSON in $XDG_CACHE_HOME/vramwise/doctor.json (default ~/.cache/vramwise/), written
atomically; `vramwise plan --device-profile auto` reads it (costmodel.profile_from_doctor).

torch is imported inside the functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPORT_VERSION = 1
MiB = 1 << 20


# --------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """$XDG_CACHE_HOME/vramwise/doctor.json, or ~/.cache/vramwise/doctor.json (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramwise" / "doctor.json"


def load_report(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The cached doctor report, or None when there is none (or it is unreadable / another version)."""
    p = Path(path) if path is not None else cache_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != REPORT_VERSION:
        return None
    return data


def save_report(report: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
    """Write the report as JSON atomically (a temporary file renamed over the target)."""
    p = Path(path) if path is not None else cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".doctor-", suffix=".json", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "ok" | "info" | "warn" | "problem"
    detail: str


def _driver_version(nvml: Any | None) -> str | None:
    """The NVIDIA driver version: from NVML, else nvidia-smi, else /proc/driver/nvidia/version."""
    if nvml is not None:
        try:
            v = nvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for tok in text.split():
            if tok.count(".") >= 1 and tok.replace(".", "").isdigit():
                return tok
    except OSError:
        pass
    return None


def _import_nvml() -> tuple[Any | None, str]:
    try:
        import pynvml  # the nvidia-ml-py package
    except ImportError:
        return None, "pynvml not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver / no GPU
        return None, f"pynvml installed but NVML did not start: {type(e).__name__}: {e}"
    return pynvml, "ok"


def _nvml_process_bytes(nvml: Any, handle: Any) -> int | None:
    """This process's device memory per NVML, or None when NVML does not list processes (containers)."""
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    for p in procs:
        if p.pid == os.getpid() and p.usedGpuMemory is not None:
            return int(p.usedGpuMemory)
    return None


def environment_checks() -> tuple[list[Check], dict[str, Any]]:
    """(checks, facts) without touching CUDA yet (so the context can be measured afterwards)."""
    checks: list[Check] = []
    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    checks.append(Check("python", "ok", f"{platform.python_version()} ({sys.executable})"))
    try:
        import torch
    except ImportError:
        checks.append(Check("torch", "problem", "torch is not installed: pip install torch"))
        return checks, facts
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    if torch.version.cuda:
        checks.append(Check("torch", "ok", f"{torch.__version__}, built for CUDA {torch.version.cuda}"))
    else:
        checks.append(Check("torch", "info", f"{torch.__version__}, a CPU-only build (no CUDA)"))

    nvml, nvml_status = _import_nvml()
    facts["nvml"] = nvml is not None
    driver = _driver_version(nvml)
    facts["driver"] = driver
    if driver:
        checks.append(Check("NVIDIA driver", "ok", driver))
    else:
        checks.append(Check("NVIDIA driver", "info", "none found (no nvidia-smi, no /proc/driver/nvidia)"))

    # torch.cuda.is_available() does not create a context (it asks the driver for the device count).
    cuda_ok = bool(torch.version.cuda) and torch.cuda.is_available()
    facts["cuda_available"] = cuda_ok
    if cuda_ok:
        n = torch.cuda.device_count()
        for i in range(n):
            prop = torch.cuda.get_device_properties(i)
            cc = f"{prop.major}.{prop.minor}"
            status = "ok" if (prop.major, prop.minor) >= (7, 0) else "problem"
            extra = "" if status == "ok" else " (vramwise's Triton kernels need compute capability >= 7.0)"
            checks.append(Check(f"GPU {i}", status, f"{prop.name}, {prop.total_memory / (1 << 30):.1f} GiB, "
                                                    f"compute capability {cc}, {prop.multi_processor_count} SMs{extra}"))
    elif driver and not torch.version.cuda:
        checks.append(Check("GPU", "problem", f"an NVIDIA driver ({driver}) is installed but torch {torch.__version__} "
                                              "is a CPU-only build: install a CUDA build of torch"))
    elif driver:
        checks.append(Check("GPU", "problem", f"driver {driver} and torch built for CUDA {torch.version.cuda}, but "
                                              "torch sees no GPU: check CUDA_VISIBLE_DEVICES, that the driver supports "
                                              f"CUDA {torch.version.cuda}, and `nvidia-smi`"))
    else:
        checks.append(Check("GPU", "info", "none: torch sees no CUDA device"))

    try:
        import triton

        facts["triton"] = triton.__version__
        detail = triton.__version__ + ("" if cuda_ok else " (on the CPU only its interpreter runs, for tests)")
        checks.append(Check("triton", "ok", detail))
    except ImportError:
        facts["triton"] = None
        checks.append(Check("triton", "warn" if cuda_ok else "info",
                            "not installed: the torch reference kernels run instead (slow on the GPU); "
                            "pip install triton" if cuda_ok else "not installed (not needed on the CPU)"))

    if nvml is not None:
        checks.append(Check("NVML", "ok", "pynvml works: the engine can check its budget against the driver"))
    else:
        checks.append(Check("NVML", "warn" if cuda_ok else "info", nvml_status + (
            ": the budget cannot be checked against the driver's view" if cuda_ok else "")))
    return checks, facts


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------


def _best_time(fn: Callable[[], Any], reps: int, sync: Callable[[], None] = lambda: None,
               budget_s: float = 2.0) -> float:
    """Fastest of `reps` timed calls (after one warm-up), stopping early once `budget_s` has passed."""
    fn()
    sync()
    best = float("inf")
    t_end = time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return best


def host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def measure_cpu(scale: float = 1.0) -> dict[str, Any]:
    """CPU figures (all threads torch uses). scale shrinks the buffers (tests use a small one).

    host_memory_bandwidth  copy of a 128 MiB fp32 buffer: (bytes read + written) / time
    cpu_bandwidth          fp32 GEMV y = W x over a 128 MiB W: bytes of W / time
    cpu_float_flops        fp32 GEMM (256 x 2048) @ (2048 x 2048): 2 M N K / time
    cpu_packed_bandwidth, cpu_quant_flops   torch's packed int4 kernel (measure_cpu_packed)
    """
    import torch

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cores": os.cpu_count(),
                           "host_memory": host_memory_bytes()}
    n = max(1 << 20, int((128 * MiB // 4) * scale))
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), 5)
    out["host_memory_bandwidth"] = 2 * src.numel() * 4 / t
    del src, dst

    rows = max(256, int(8192 * scale))
    w = torch.randn(rows, 4096, dtype=torch.float32)
    x = torch.randn(4096, dtype=torch.float32)
    t = _best_time(lambda: torch.mv(w, x), 8)
    out["cpu_bandwidth"] = w.numel() * 4 / t
    del w, x

    m, k, nn = max(64, int(256 * scale)), 2048, 2048
    a = torch.randn(m, k)
    b = torch.randn(k, nn)
    t = _best_time(lambda: a @ b, 3)
    out["cpu_float_flops"] = 2.0 * m * k * nn / t
    out.update(measure_cpu_packed(scale))
    return out


def measure_cpu_packed(scale: float = 1.0) -> dict[str, float]:
    """Rates of torch's packed int4 CPU kernel, the one CPU layers run with --cpu-weights packed
    (quant/cpu_packed.py), on an int4 g128 weight of 4096 x 4096 (scaled), bf16 activations:

    cpu_packed_bandwidth   one token: packed bytes (codes + bf16 scale/zero pairs) / time
    cpu_quant_flops        16 tokens: 2 x 16 x N x K / time (the kernel is compute-bound there)

    Each timed call starts with the weight out of the caches (a buffer, scaled, is read between
    calls, untimed; 384 MiB, above a 300 MiB L3): a decode step reads every CPU layer's weights once. On the H100 machine's 16-core host
    (torch 2.11) the kernel read 41 GB/s at one token where an fp32 GEMV reads 120-180: it is compute-bound
    even there. Empty when this torch has no such kernel."""
    import torch

    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None or convert is None:
        return {}
    n, k, g = max(1024, int(4096 * scale) // 1024 * 1024), 4096, 128
    try:
        w = convert(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)  # (N, K / 2) uint8
        sz = torch.stack([torch.rand(k // g, n) * 0.01 + 1e-3, torch.randn(k // g, n) * 0.01],
                         dim=-1).to(torch.bfloat16)  # (K / G, N, 2): scale, zero
        flush = torch.ones(max(4 << 20, int((384 << 20) * scale)) // 4)  # fp32: read between calls
        nbytes = w.numel() * w.element_size() + sz.numel() * sz.element_size()
        res: dict[str, float] = {}
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            op(x, w, g, sz)  # warm-up
            best = float("inf")
            for _ in range(3):
                flush.sum()
                t0 = time.perf_counter()
                op(x, w, g, sz)
                best = min(best, time.perf_counter() - t0)
            if m == 1:
                res["cpu_packed_bandwidth"] = nbytes / best
            else:
                res["cpu_quant_flops"] = 2.0 * m * n * k / best
        return res
    except RuntimeError:  # a build without the kernel for this CPU
        return {}


def measure_context(device_index: int = 0) -> dict[str, Any]:
    """CUDA-context bytes of this process: NVML's per-process figure after torch.cuda.init(), a first
    kernel and a first cuBLAS GEMM, minus torch's reserved bytes. Valid only in a process that has not
    touched CUDA before (run_doctor calls it in a fresh subprocess, see context_in_subprocess). Falls back
    to NVML's device-wide used memory before/after, then to torch.cuda.mem_get_info (which counts other
    processes too)."""
    import torch

    res: dict[str, Any] = {}
    nvml, _ = _import_nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(device_index) if nvml is not None else None
    dev_before = int(nvml.nvmlDeviceGetMemoryInfo(handle).used) if handle is not None else None
    torch.cuda.init()
    torch.cuda.set_device(device_index)
    x = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    after_init = _nvml_process_bytes(nvml, handle) if handle is not None else None
    reserved_init = torch.cuda.memory_reserved()
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()  # loads cuBLAS(Lt) and its workspace
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    proc = _nvml_process_bytes(nvml, handle) if handle is not None else None
    if proc is not None:
        res["cuda_context_bytes"] = proc - reserved
        res["cuda_context_method"] = "NVML per process"
        if after_init is not None:
            res["cuda_context_init_only_bytes"] = after_init - reserved_init
    elif handle is not None and dev_before is not None:
        res["cuda_context_bytes"] = int(nvml.nvmlDeviceGetMemoryInfo(handle).used) - dev_before - reserved
        res["cuda_context_method"] = "NVML device-wide used, before/after (no per-process data here)"
    else:
        free, total = torch.cuda.mem_get_info()
        res["cuda_context_bytes"] = total - free - reserved
        res["cuda_context_method"] = "torch.cuda.mem_get_info (device-wide: includes other processes)"
    res["nvml_per_process"] = proc is not None
    del x, a
    return res


def context_in_subprocess(device_index: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
    """measure_context() in a fresh Python process, so that nothing this process did to CUDA (the checks
    query device properties) is counted, and the context is measured from before torch.cuda.init()."""
    src = str(Path(__file__).resolve().parents[2])  # the directory that holds the vramwise package
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = ("import json, sys; from vramwise.memory.bandwidth import measure_context; "
            f"sys.stdout.write('VRAMWISE-CTX ' + json.dumps(measure_context({int(device_index)})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("VRAMWISE-CTX "):
            return json.loads(line.removeprefix("VRAMWISE-CTX "))
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"context measurement subprocess failed (exit {out.returncode}): {tail[0]}")


def measure_gpu(device_index: int = 0) -> dict[str, Any]:
    """GPU figures (see the module docstring)."""
    import torch

    dev = torch.device("cuda", device_index)
    prop = torch.cuda.get_device_properties(device_index)
    out: dict[str, Any] = {"name": prop.name, "total_memory": int(prop.total_memory),
                           "compute_capability": f"{prop.major}.{prop.minor}",
                           "num_sms": prop.multi_processor_count}
    sync = torch.cuda.synchronize

    def timed(fn: Callable[[], Any], reps: int) -> float:
        return _best_time(fn, reps, sync)

    n = 1 << 30  # 1 GiB device copy
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    out["hbm_bandwidth"] = 2 * n / timed(lambda: b.copy_(a), 10)
    del a, b

    size = 256 * MiB
    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable.fill_(1)
    d = torch.empty(size, dtype=torch.uint8, device=dev)
    out["h2d_pinned_bandwidth"] = size / timed(lambda: d.copy_(pinned, non_blocking=True), 10)
    out["h2d_pageable_bandwidth"] = size / timed(lambda: d.copy_(pageable), 4)
    out["d2h_pinned_bandwidth"] = size / timed(lambda: pinned.copy_(d, non_blocking=True), 10)

    m, k, nn = 2048, 5120, 13824  # a 13B MLP projection over a 2048-token prefill chunk
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    w = torch.randn(k, nn, device=dev, dtype=torch.float16)
    out["gpu_fp16_flops"] = 2.0 * m * k * nn / timed(lambda: x @ w, 10)
    del x, w

    out.update(_measure_contention(d, pinned))
    del d, pinned, pageable
    torch.cuda.empty_cache()
    return out


def _measure_contention(d: Any, pinned: Any, seconds: float = 0.6) -> dict[str, Any]:
    """Pinned H2D copies on a side stream (a thread) while the CPU runs fp32 GEMVs: both rates, as
    h2d_pinned_bandwidth_concurrent and cpu_bandwidth_concurrent (see combine_contention)."""
    import torch

    w = torch.randn(8192, 4096, dtype=torch.float32)
    xv = torch.randn(4096, dtype=torch.float32)
    stream = torch.cuda.Stream()
    stop = threading.Event()
    copied = [0]  # bytes copied so far (the copier thread adds, the main thread reads)

    def copier() -> None:
        with torch.cuda.stream(stream):
            while not stop.is_set():
                d.copy_(pinned, non_blocking=True)
                stream.synchronize()
                copied[0] += pinned.numel()

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    time.sleep(0.05)  # let the copies get going
    reads, c0, t0 = 0, copied[0], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mv(w, xv)
        reads += w.numel() * 4
    elapsed, c1 = time.perf_counter() - t0, copied[0]
    stop.set()
    th.join()
    return {"h2d_pinned_bandwidth_concurrent": (c1 - c0) / elapsed, "cpu_bandwidth_concurrent": reads / elapsed}


def combine_contention(cpu: dict[str, Any], gpu: dict[str, Any]) -> None:
    """host_memory_bandwidth for the cost model: what copies + CPU achieved together if either slowed by
    more than 5%, else leave the copy-rate estimate (no contention seen)."""
    h2d, h2d_c = gpu.get("h2d_pinned_bandwidth", 0.0), gpu.get("h2d_pinned_bandwidth_concurrent", 0.0)
    cbw, cbw_c = cpu.get("cpu_bandwidth", 0.0), gpu.get("cpu_bandwidth_concurrent", 0.0)
    if h2d and cbw and (h2d_c < 0.95 * h2d or cbw_c < 0.95 * cbw):
        cpu["host_memory_bandwidth"] = h2d_c + cbw_c
    elif h2d and cbw:
        cpu["host_memory_bandwidth"] = max(cpu.get("host_memory_bandwidth", 0.0), h2d + cbw)


# --------------------------------------------------------------------------------------------------------
# The doctor
# --------------------------------------------------------------------------------------------------------


@dataclass
class DoctorReport:
    checks: list[Check]
    facts: dict[str, Any]
    gpu: dict[str, Any] | None
    cpu: dict[str, Any] | None
    time: str
    errors: list[str]

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    def to_dict(self) -> dict[str, Any]:
        return {"version": REPORT_VERSION, "time": self.time, "host": platform.node(), "facts": self.facts,
                "checks": [asdict(c) for c in self.checks], "gpu": self.gpu, "cpu": self.cpu,
                "errors": self.errors}


def run_doctor(measure: bool = True, device_index: int = 0, cpu_scale: float = 1.0) -> DoctorReport:
    """Checks, then (measure=True) the CPU and, where torch sees a GPU, the GPU measurements."""
    checks, facts = environment_checks()
    gpu: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None
    errors: list[str] = []
    if measure and "torch" in facts:
        if facts.get("cuda_available"):
            try:
                gpu = context_in_subprocess(device_index)
            except Exception as e:  # report, don't crash: the rest of the report is still useful
                errors.append(f"CUDA context measurement failed: {type(e).__name__}: {e}")
                gpu = {}
        try:
            cpu = measure_cpu(cpu_scale)
        except Exception as e:
            errors.append(f"CPU measurement failed: {type(e).__name__}: {e}")
        if gpu is not None:
            try:
                gpu.update(measure_gpu(device_index))
                if cpu:
                    combine_contention(cpu, gpu)
            except Exception as e:
                errors.append(f"GPU measurement failed: {type(e).__name__}: {e}")
            if gpu.get("nvml_per_process") is False:
                checks.append(Check("NVML per process", "warn",
                                    "NVML lists no per-process memory here (a container?): budget checks fall "
                                    "back to device-wide used memory"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return DoctorReport(checks, facts, gpu, cpu, now, errors)


def _gbs(x: float | None) -> str:
    return f"{x / 1e9:,.1f} GB/s" if x else "-"


def format_report(rep: DoctorReport) -> str:
    marks = {"ok": "ok     ", "info": "info   ", "warn": "WARNING", "problem": "PROBLEM"}
    w = max(len(c.name) for c in rep.checks)
    lines = [f"{marks[c.status]}  {c.name:<{w}}  {c.detail}" for c in rep.checks]
    if not rep.facts.get("cuda_available"):
        lines.append("")
        lines.append("no CUDA GPU: vramwise runs on the CPU")
    if rep.cpu:
        c = rep.cpu
        lines.append("")
        lines.append(f"CPU ({c.get('threads')} threads of {c.get('cores')} cores, "
                     f"{c.get('host_memory', 0) / (1 << 30):.1f} GiB RAM):")
        lines.append(f"  memory copy (read + write)   {_gbs(c.get('host_memory_bandwidth'))}")
        lines.append(f"  fp32 GEMV weight read        {_gbs(c.get('cpu_bandwidth'))}")
        lines.append(f"  fp32 GEMM                    {c.get('cpu_float_flops', 0) / 1e9:,.1f} GFLOP/s")
        if c.get("cpu_packed_bandwidth"):
            lines.append(f"  int4 GEMV weight read        {_gbs(c.get('cpu_packed_bandwidth'))} (torch's packed kernel, "
                         f"--cpu-weights packed; 16 tokens {c.get('cpu_quant_flops', 0) / 1e9:,.1f} GFLOP/s)")
    if rep.gpu:
        g = rep.gpu
        lines.append("")
        lines.append(f"GPU {g.get('name', '?')} ({g.get('total_memory', 0) / (1 << 30):.1f} GiB, "
                     f"cc {g.get('compute_capability', '?')}):")
        if "cuda_context_bytes" in g:
            lines.append(f"  CUDA context                 {g['cuda_context_bytes'] / MiB:,.0f} MiB "
                         f"({g.get('cuda_context_method', '')})")
        lines.append(f"  device copy (read + write)   {_gbs(g.get('hbm_bandwidth'))}")
        lines.append(f"  host-to-device pinned        {_gbs(g.get('h2d_pinned_bandwidth'))}")
        lines.append(f"  host-to-device pageable      {_gbs(g.get('h2d_pageable_bandwidth'))}")
        lines.append(f"  device-to-host pinned        {_gbs(g.get('d2h_pinned_bandwidth'))}")
        lines.append(f"  fp16 GEMM 2048x5120x13824    {g.get('gpu_fp16_flops', 0) / 1e12:,.0f} TFLOP/s")
        if g.get("h2d_pinned_bandwidth_concurrent"):
            lines.append(f"  pinned H2D during CPU GEMV   {_gbs(g.get('h2d_pinned_bandwidth_concurrent'))}, "
                         f"CPU GEMV during copies {_gbs(g.get('cpu_bandwidth_concurrent'))}")
    for e in rep.errors:
        lines.append(f"error: {e}")
    problems = rep.problems
    lines.append("")
    lines.append(f"{len(problems)} problem(s)" + (": " + "; ".join(p.name for p in problems) if problems else ""))
    return "\n".join(lines)
