"""GPU timing shared by the kernels' first-use tuner and the benchmarks: one way to time, so a tuned choice and a
benchmark figure mean the same thing."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

__all__ = ["graph_time_per_call"]


def graph_time_per_call(fns: Sequence[Callable[[], object]], replays: int) -> float:
    """Median milliseconds per call of a CUDA graph that runs every fn once, back to back.

    This is how a decode step runs its kernels: captured, without launch gaps, each reading weights that are not
    in L2 (callers pass fns over distinct weight copies whose total exceeds the L2). Each fn first runs once on a
    side stream outside the capture (compiles, lazy allocations, caches); the median is over `replays` replays
    timed with CUDA events, divided by len(fns)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / len(fns)
