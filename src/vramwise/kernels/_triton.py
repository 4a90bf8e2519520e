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
