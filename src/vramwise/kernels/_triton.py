"""Whether, and how, the Triton kernels can run here.

Triton is optional: without it (or without a GPU) every kernel falls back to its torch reference.
Under Triton's CPU interpreter (TRITON_INTERPRET=1, read by Triton itself when a kernel is decorated) the
kernels also run on CPU tensors; the tests use that. We read the variable only to skip autotuning there,
because the interpreter would execute every candidate config.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # pragma: no cover - exercised implicitly by every import
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install (missing compiler) that fails at import
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tensors allowed, no autotuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_supports(device: torch.device) -> bool:
    """Can a Triton kernel be launched on tensors living on `device`?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def use_fixed_config(device: torch.device) -> bool:
    """Skip autotuning: under the interpreter, or for CPU tensors (also interpreter-only)."""
    return interpreting() or device.type != "cuda"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors on a CUDA device (used to size grids and split-K)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Programmatic dependent launch (sm_90+): the decode-path kernels are launched with launch_pdl, so each may
#: start (and fetch what it does not depend on: its first weight tile) while the kernel before it finishes;
#: pdl_wait() inside them waits for that kernel's writes. VRAMWISE_PDL=0 turns it off.
PDL_ENV = os.environ.get("VRAMWISE_PDL", "1") != "0"
HAS_PDL = False
if HAS_TRITON:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
        from triton.language.extra.cuda import gdc_wait as _gdc_wait

        HAS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
    except Exception:  # an older Triton, or no NVIDIA backend
        HAS_PDL = False


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch decode-path kernels with programmatic dependent launch on this device?"""
    if not (HAS_PDL and PDL_ENV) or device.type != "cuda" or interpreting():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch that has a PDL constexpr: {"PDL": bool[, "launch_pdl": True]}."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device) else {"PDL": False}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a small, fixed number keeps split-K exercised on small test shapes
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


if HAS_TRITON:

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of program `pid` over the (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) output tiles in grouped
        order: GROUP_M row-blocks walk the same band of weight tiles while it is in L2."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
        pid_n = (pid % num_pid_in_group) // group_rows
        return pid_m, pid_n

    if HAS_PDL:

        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            """With PDL: wait until the kernel before this one has finished and its writes are visible, then let
            the next kernel launch (it will wait in turn). A no-op when PDL is False."""
            if PDL:
                _gdc_wait()
                _gdc_launch_dependents()

    else:

        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            """No programmatic dependent launch in this Triton: nothing to wait for."""
            pass
