"""Long-prefill int4 matmuls with the next weight's dequantize overlapped on a side stream.

At M >= DEQUANT_MIN_M rows a W4A16 matmul dequantizes W into an fp16/bf16 workspace (a memory-bound pass: 0.5 B
read and 2 B written per weight) and calls cuBLAS (compute-bound at M = 512). One after the other, the pass costs
60-77 % of the GEMM on the 13B shapes (H100: 64.6 vs 40.6 us for 5120 x 5120). The two need different resources,
so while cuBLAS multiplies by W_i a side stream can dequantize the weight that comes next into a second
workspace; in a run of back-to-back matmuls only the first pass is exposed (benchmarks/sweep_prefill_overlap.py:
0.98-1.09x dense per 13B shape, 1.05-1.08x for a decoder layer's four matrices).

DequantPipeline holds two workspaces and the order the model calls its linears in, learned from every call
(decode steps and graph captures included; module registration order is not the call order: fused qkv/gate_up
are registered after o/down).
A "job" is one column chunk of one linear: a weight larger than a workspace is done in chunks of whole 128
columns, each its own GEMM written into its columns of the output. Per job, on the compute stream:

    acquire   the job was prefetched: wait for its `ready` event; else dequantize it now (after the side
              stream's work, which may be writing the same workspace)
    prefetch  side stream: wait until the other workspace's last GEMM is done (`freed`), dequantize the next job
              (the next chunk, or the first chunk of the linear that followed this one last time) into it
    GEMM      cuBLAS reads the acquired workspace; `freed` recorded after it

A wrong guess costs one wasted dequantize on the side stream (the compute stream then dequantizes itself).
Experimental (EngineConfig.dequant_pipeline, --dequant-pipeline; off by default: see the config comment for
what was measured). Used only for weights that never move: the engine installs it on a resident model (no offload driver, whose
ring slots get refilled under the same addresses, and no GPU-memory budget, whose workspace term plans one
buffer: memory/budget.py). Not used while a CUDA graph is being captured (the learned order is host state).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..memory.budget import dequant_chunk_columns
from . import w4a16

__all__ = ["DequantPipeline", "install_dequant_pipeline"]


class DequantPipeline:
    """Two (workspace_bytes) workspaces, a side stream, and the learned call order of the linears installed."""

    def __init__(self, device: torch.device, workspace_bytes: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"the dequantize pipeline runs on CUDA devices, not {device}")
        self.device = device
        self.workspace_bytes = workspace_bytes
        self._ws: dict[torch.dtype, list[torch.Tensor]] = {}
        self._side = torch.cuda.Stream(device)
        self._ready = [torch.cuda.Event(), torch.cuda.Event()]
        self._freed = [torch.cuda.Event(), torch.cuda.Event()]
        self._freed_recorded = [False, False]
        self._next: dict[int, int] = {}  # id(module) -> id(module) called after it last time (long prefills)
        self._modules: dict[int, nn.Module] = {}
        self._job_cache: dict[tuple[int, torch.dtype], list[tuple[int, int]]] = {}
        self._last: int | None = None  # id(module) of the previous pipelined call
        self._pending: tuple[int, int, int, torch.dtype] | None = None  # (id(module), chunk, workspace, dtype)
        self.turn = 0  # workspace of the next job dequantized on the compute stream
        self.prefetch_hits = 0
        self.prefetch_misses = 0

    def add(self, module: nn.Module) -> None:
        self._modules[id(module)] = module

    # -- jobs ------------------------------------------------------------------------------------------------
    def _jobs(self, module: nn.Module, dtype: torch.dtype) -> list[tuple[int, int]]:
        """(n0, n_count) column chunks of the module's weight that fit a workspace (cached: host time counts)."""
        key = (id(module), dtype)
        jobs = self._job_cache.get(key)
        if jobs is None:
            n, k = module.out_features, module.in_features
            c = dequant_chunk_columns(k, dtype.itemsize, self.workspace_bytes)
            jobs = self._job_cache[key] = [(n0, min(c, n - n0)) for n0 in range(0, n, c)]
        return jobs

    def _workspace(self, b: int, k: int, nc: int, dtype: torch.dtype) -> torch.Tensor:
        ws = self._ws.get(dtype)
        if ws is None:
            ws = self._ws[dtype] = [torch.empty(self.workspace_bytes // dtype.itemsize, device=self.device,
                                                dtype=dtype) for _ in range(2)]
        return ws[b][: k * nc].view(k, nc)

    def _dequant(self, module: nn.Module, n0: int, nc: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        out = self._workspace(b, module.in_features, nc, dtype)
        return w4a16.w4a16_dequantize(module.qweight, module.scales, module.mins, module.group_size, dtype, n0, nc,
                                      version=2, out=out)

    # -- the matmul ------------------------------------------------------------------------------------------
    def matmul(self, module: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        """y (M, N) = x2 (M, K) @ dequant(W).T for an installed 4-bit linear (no bias), x2 contiguous fp16/bf16."""
        dtype = x2.dtype
        comp = torch.cuda.current_stream(self.device)
        key = self.note(module)
        jobs = self._jobs(module, dtype)
        # one job: the GEMM's own output (as the serial path calls it; out= costs more host time); several: each
        # chunk's product copied into its columns of y
        y = None if len(jobs) == 1 else torch.empty(x2.shape[0], module.out_features, device=x2.device, dtype=dtype)
        for c, (n0, nc) in enumerate(jobs):
            w, b = self._acquire(module, c, n0, nc, dtype, comp)
            if c + 1 < len(jobs):
                self._prefetch(module, c + 1, 1 - b, dtype, comp)
            else:  # the first job of the linear that followed this one last time
                nxt = self._modules.get(self._next.get(key, -1))
                if nxt is not None:
                    self._prefetch(nxt, 0, 1 - b, dtype, comp)
            part = torch.matmul(x2, w)  # (M, nc)
            if y is None:
                y = part
            else:
                y[:, n0:n0 + nc] = part
            self._freed[b].record(comp)
            self._freed_recorded[b] = True
            self.turn = 1 - b
        return y

    def note(self, module: nn.Module) -> int:
        """Record that `module` is called now (any number of rows, captures included): the call order the
        prefetches follow is learned from every call, so the first long prefill already has it (the decode
        graphs' capture or the warm-up ran the layers in order before). Returns id(module)."""
        key = id(module)
        if self._last is not None and self._last != key:
            self._next[self._last] = key
        self._last = key
        return key

    def _acquire(self, module: nn.Module, c: int, n0: int, nc: int, dtype: torch.dtype,
                 comp: torch.cuda.Stream) -> tuple[torch.Tensor, int]:
        p = self._pending
        self._pending = None
        if p is not None and p[0] == id(module) and p[1] == c and p[3] == dtype:
            b = p[2]
            comp.wait_event(self._ready[b])
            self.prefetch_hits += 1
            return self._workspace(b, module.in_features, nc, dtype), b
        if p is not None:
            self.prefetch_misses += 1
        comp.wait_stream(self._side)  # a prefetch may still be writing either workspace
        b = self.turn
        return self._dequant(module, n0, nc, b, dtype), b

    def _prefetch(self, module: nn.Module, c: int, b: int, dtype: torch.dtype, comp: torch.cuda.Stream) -> None:
        """Side stream: job c of `module` (an installed 4-bit linear) into workspace b, once b's last GEMM is done."""
        n0, nc = self._jobs(module, dtype)[c]
        side = self._side
        side.wait_stream(comp) if not self._freed_recorded[b] else side.wait_event(self._freed[b])
        with torch.cuda.stream(side):
            self._dequant(module, n0, nc, b, dtype)
            self._ready[b].record(side)
        self._pending = (id(module), c, b, dtype)

    def usable(self, x2: torch.Tensor) -> bool:
        """Whether a call with these activations goes through the pipeline."""
        return (x2.is_cuda and x2.shape[0] >= w4a16.DEQUANT_MIN_M and x2.dtype in (torch.float16, torch.bfloat16)
                and not torch.cuda.is_current_stream_capturing())


def install_dequant_pipeline(modules: Iterable[nn.Module], device: torch.device,
                             workspace_bytes: int | None = None) -> DequantPipeline | None:
    """Route the long-prefill matmuls of these 4-bit QuantLinears through one DequantPipeline (module doc).
    Returns it, or None when there is nothing to install (no 4-bit linear, or not a CUDA device)."""
    mods = [m for m in modules if getattr(getattr(m, "spec", None), "bits", None) == 4]
    if not mods or device.type != "cuda":
        return None
    pipe = DequantPipeline(device, workspace_bytes or w4a16.DEQUANT_WORKSPACE_BYTES)
    for m in mods:
        pipe.add(m)
        m.dequant_pipeline = pipe
    return pipe

