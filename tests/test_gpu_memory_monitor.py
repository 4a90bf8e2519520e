"""NvmlMonitor: per-process figures once the process is listed, 0 before its CUDA context exists, device-wide
only where NVML cannot list processes (a fake pynvml; no GPU needed)."""

from __future__ import annotations

import os
import sys
import types


from vramwise.bench import gpu_memory
from vramwise.bench.gpu_memory import NvmlMonitor


def _fake_nvml(procs: list, listing: bool = True, used: int = 19 << 30) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: "h"

    def running(h):
        if not listing:
            raise RuntimeError("not supported")
        return procs

    m.nvmlDeviceGetComputeRunningProcesses = running
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used)
    return m


def test_monitor_started_before_the_context_is_not_fooled_by_other_processes(monkeypatch):
    procs = [types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=19 << 30)]  # another process, 19 GiB
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(procs))
    ctx = {"on": False}
    monkeypatch.setattr(NvmlMonitor, "_has_context", staticmethod(lambda: ctx["on"]))
    mon = NvmlMonitor()
    assert mon.available and not mon.per_process
    assert mon.used() == 0  # no context yet: nothing of ours on the GPU
    procs.append(types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=700 << 20))
    ctx["on"] = True
    assert mon.used() == 700 << 20 and mon.per_process


def test_device_wide_where_processes_cannot_be_listed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([], listing=False, used=5 << 30))
    mon = NvmlMonitor()
    assert mon.available and not mon.per_process and mon.used() == 5 << 30


def test_device_wide_when_not_listed_long_after_the_context_exists(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([], used=3 << 30))  # e.g. a PID namespace
    monkeypatch.setattr(NvmlMonitor, "_has_context", staticmethod(lambda: True))
    clock = [100.0]
    monkeypatch.setattr(gpu_memory.time, "monotonic", lambda: clock[0])
    mon = NvmlMonitor()
    assert mon.used() == 0  # a fresh context: NVML lists it after a short lag
    clock[0] += NvmlMonitor.LISTING_GRACE_S + 0.1
    assert mon.used() == 3 << 30 and not mon.per_process


def test_the_listing_lag_does_not_count_other_processes(monkeypatch):
    """The context exists, NVML does not list it yet, another process holds 13 GiB: the lag reads 0, not the
    device-wide 13 GiB (what a child engine under a parent pytest saw as its "load" peak)."""
    procs = [types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=13 << 30)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(procs, used=13 << 30))
    monkeypatch.setattr(NvmlMonitor, "_has_context", staticmethod(lambda: True))
    mon = NvmlMonitor()
    assert mon.used() == 0
    procs.append(types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=900 << 20))
    assert mon.used() == 900 << 20 and mon.per_process
    procs.pop()  # torn down: ours is gone from the list
    assert mon.used() == 0


def test_no_pynvml_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    mon = NvmlMonitor()
    assert not mon.available and mon.error and mon.used() == -1
    assert gpu_memory is not None
