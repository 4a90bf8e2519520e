"""The process's real GPU memory as NVML sees it (CUDA context included), sampled for its peak.

torch's counters only see the caching allocator; the budget promise is about what the driver reports, so
benchmarks poll NVML in a background thread and report the peak next to torch's own numbers.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class NvmlMonitor:
    """Polls this process's GPU memory (falls back to device-wide used memory where NVML cannot tell
    processes apart, e.g. inside some containers) every `interval_s` and keeps the peak in bytes.

    A process appears in NVML's list only once it has a CUDA context, so a monitor started before the context
    cannot tell yet: while NVML lists processes and this one has no context (torch's CUDA not initialised) it
    holds nothing and reads 0; once listed it reads its own figure (per_process becomes True). Device-wide
    figures are used only where NVML cannot list processes, or still does not list this one LISTING_GRACE_S
    after its context appeared (a PID namespace: other processes then count too, per_process stays False).
    NVML lists a new context only after a short lag: reading device-wide figures in that window counted a
    parent pytest's 13 GiB as a child engine's "load" peak."""

    #: Seconds after this process's CUDA context appeared during which "not listed yet" reads 0.
    LISTING_GRACE_S = 5.0

    def __init__(self, device_index: int = 0, interval_s: float = 0.005) -> None:
        self.available = False
        self.per_process = False
        self.error: str | None = None
        self.peak = 0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context_seen: float | None = None  # monotonic time the CUDA context was first seen unlisted
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.available = True
            self._listing = self._list_ok()
            self.per_process = self._process_bytes() is not None
        except Exception as e:  # no driver, no pynvml, no GPU: report, don't fail
            self.error = f"{type(e).__name__}: {e}"

    def _list_ok(self) -> bool:
        try:
            self._nv.nvmlDeviceGetComputeRunningProcesses(self._h)
            return True
        except Exception:
            return False

    @staticmethod
    def _has_context() -> bool:
        torch = sys.modules.get("torch")  # not imported: no CUDA context from torch either
        return bool(torch is not None and torch.cuda.is_initialized())

    def _process_bytes(self) -> int | None:
        pid = os.getpid()
        try:
            procs = self._nv.nvmlDeviceGetComputeRunningProcesses(self._h)
        except Exception:
            return None
        for p in procs:
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def used(self) -> int:
        """Bytes this process holds now (device-wide used memory if per-process is unavailable)."""
        if not self.available:
            return -1
        b = self._process_bytes()
        if b is not None:
            self.per_process = True
            return b
        if self._listing:
            if not self._has_context():
                return 0  # no CUDA context yet: this process holds no GPU memory
            if self._context_seen is None:
                self._context_seen = time.monotonic()
            if not self.per_process and time.monotonic() - self._context_seen < self.LISTING_GRACE_S:
                return 0  # a fresh context NVML does not list yet (its memory shows once it is listed)
            if self.per_process:
                return 0  # listed before and gone now: the context was torn down
        return int(self._nv.nvmlDeviceGetMemoryInfo(self._h).used)

    def total(self) -> int:
        return int(self._nv.nvmlDeviceGetMemoryInfo(self._h).total) if self.available else -1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except Exception:
                pass
            time.sleep(self._interval)

    def start(self) -> "NvmlMonitor":
        if self.available and self._thread is None:
            self.peak = max(self.peak, self.used())
            self._thread = threading.Thread(target=self._run, name="nvml-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._stop.clear()
        if self.available:
            self.peak = max(self.peak, self.used())
        return self.peak

    def reset_peak(self) -> None:
        self.peak = self.used() if self.available else 0
