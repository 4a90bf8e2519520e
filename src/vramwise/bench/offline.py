"""Offline benchmark: TTFT, prefill and decode speed per batch size, and the real GPU memory peak.

For each batch size B: B prompts of prompt_len random token ids, each generating exactly gen_len tokens
(greedy, eos ignored), submitted together. Speed does not depend on token values, so random ids serve for
real and random-weight models alike.
  ttft          mean over requests of (first token time - submit time)
  prefill tok/s B * prompt_len / (time the last request got its first token - submit time)
  decode tok/s  B * (gen_len - 1) / (end - time the last request got its first token), aggregate
  weights GB/s  bytes of weights one decode step reads (decode_weight_bytes) x decode steps per second
                (decode tok/s / B); at batch 1 this is the achieved weight-read bandwidth, reported also as a
                fraction of the device's measured device-to-device copy bandwidth (the practical ceiling)
Under a GPU-memory budget (--gpu-memory) each row also carries the plan's prediction for the same workload
(planner.predict_workload) and the report the engine's memory accounting (LLMEngine.memory_report).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vramwise.bench.gpu_memory import NvmlMonitor
from vramwise.engine.llm_engine import LLMEngine
from vramwise.sampling_params import SamplingParams


@dataclass
class BatchResult:
    batch: int
    prompt_len: int
    gen_len: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float  # aggregate over the batch
    decode_tok_s_per_seq: float
    total_s: float
    throughput_tok_s: float  # generated tokens / total time
    weight_gb_s: float | None = None  # weights read per decode step x decode steps per second
    nvml_peak_mib: float | None = None
    torch_max_allocated_mib: float | None = None
    torch_max_reserved_mib: float | None = None
    # the plan's prediction for this row's workload (None without --gpu-memory)
    predicted_ttft_ms: float | None = None
    predicted_prefill_tok_s: float | None = None
    predicted_decode_tok_s: float | None = None


@dataclass
class BenchReport:
    model: str
    device: str
    dtype: str
    date: str
    commit: str
    torch_version: str
    host: str
    placement: str
    planner_prediction: dict[str, Any] | None
    load_s: float
    nvml_available: bool
    nvml_per_process: bool
    nvml_peak_load_mib: float | None
    nvml_peak_mib: float | None
    torch_max_allocated_mib: float | None
    torch_max_reserved_mib: float | None
    results: list[BatchResult] = field(default_factory=list)
    # the command's own settings (shape, quantization, GPU cap, ...), so that a report read later, e.g. by
    # benchmarks/peers/table.py, can tell which scenario it measured
    settings: dict[str, Any] = field(default_factory=dict)
    decode_path: str = "eager"  # graph path or why eager, then ", async scheduling" or ", one step at a time"
    graph_pool_mib: float | None = None
    weight_bytes_per_step: int | None = None
    d2d_copy_gb_s: float | None = None  # measured device-to-device copy bandwidth (CUDA only)
    weight_read_fraction_b1: float | None = None  # batch-1 weight GB/s / d2d_copy_gb_s
    gpu_memory_budget_mib: float | None = None  # --gpu-memory (None: no budget)
    memory_report: dict[str, Any] | None = None  # LLMEngine.memory_report(), bytes, after the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def git_commit() -> str:
    if os.environ.get("VW_COMMIT"):  # a copy of the tree without its .git (the GPU machine) names it here
        return os.environ["VW_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _mib(b: int | float | None) -> float | None:
    return None if b is None or b < 0 else round(b / 2**20, 1)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (packed weights, scales, norms) except
    the rotary table and the input embedding, which a step reads B rows of; the embedding counts when it is
    tied to the lm_head (the logits read all of it)."""
    embed = model.model.embed_tokens.weight
    tied = getattr(model.lm_head, "weight", None) is embed
    total = 0
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or name.endswith("cos_sin") or (t is embed and not tied):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def d2d_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of `reps`."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def decode_path(engine: LLMEngine) -> str:
    """How decode steps ran: the graph path (or why eager), and whether steps were launched ahead."""
    sched = "async scheduling" if getattr(engine, "async_scheduling", False) else "one step at a time"
    return f"{_graph_path(engine)}, {sched}"


def _graph_path(engine: LLMEngine) -> str:
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is not None:
        kind = "cuda graphs" if graphs.mode == "cuda" else "emulated graphs"
        return f"{kind} (batch sizes {','.join(map(str, graphs.sizes))})"
    why = getattr(engine, "graph_bypass_reason", None)
    if getattr(engine.config, "enforce_eager", False):
        why = "--enforce-eager"
    return f"eager ({why})" if why else "eager"


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> BatchResult:
    rng = random.Random(seed + batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    ids = [f"bench-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    first: dict[str, float] = {}
    done = 0
    while done < batch:
        for out in engine.step():
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = time.perf_counter()
            if out.finished:
                done += 1
    end = time.perf_counter()
    last_first = max(first.values())
    decode_s = max(end - last_first, 1e-9)
    decode = batch * (gen_len - 1) / decode_s if gen_len > 1 else 0.0
    return BatchResult(
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        ttft_ms=round(1000 * sum(t - t0 for t in first.values()) / batch, 2),
        prefill_tok_s=round(batch * prompt_len / (last_first - t0), 1),
        decode_tok_s=round(decode, 2),
        decode_tok_s_per_seq=round(decode / batch, 2),
        total_s=round(end - t0, 3),
        throughput_tok_s=round(batch * gen_len / (end - t0), 2),
        weight_gb_s=round(decode_weight_bytes(engine.model) * decode / batch / 1e9, 1),
    )


def run_offline_bench(
    engine_factory,
    batch_sizes: list[int],
    prompt_len: int,
    gen_len: int,
    model_name: str,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> BenchReport:
    """engine_factory() builds the engine (timed, with the NVML monitor already running)."""
    mon = NvmlMonitor().start()
    t = time.perf_counter()
    engine: LLMEngine = engine_factory()
    load_s = time.perf_counter() - t
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    load_peak = mon.peak if mon.available else None

    # Warm-up: first-call costs (allocator growth, Triton compilation per shape bucket) are not what users see
    # per token, so each batch size first runs once with the measured prompt length and a short generation.
    warm_gen = min(gen_len, 4)
    setup = getattr(engine, "budget_setup", None)  # the GPU-memory budget's plan, None without --gpu-memory

    from rich.progress import Progress

    from vramwise.engine.llm_engine import frozen_gc

    results: list[BatchResult] = []
    with frozen_gc(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("bench", total=len(batch_sizes))
        for b in batch_sizes:
            bar.update(task, description=f"batch {b}")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            run_batch(engine, b, prompt_len, warm_gen, seed=12345)
            mon.reset_peak()
            r = run_batch(engine, b, prompt_len, gen_len)
            if cuda:
                torch.cuda.synchronize()
                r.torch_max_allocated_mib = _mib(torch.cuda.max_memory_allocated())
                r.torch_max_reserved_mib = _mib(torch.cuda.max_memory_reserved())
            if mon.available:
                r.nvml_peak_mib = _mib(max(mon.peak, mon.used()))
            if setup is not None:
                pred = setup.predict(b, prompt_len, gen_len)
                r.predicted_ttft_ms = round(1000 * pred["ttft_s"], 2)
                r.predicted_prefill_tok_s = round(pred["prefill_tok_s"], 1)
                r.predicted_decode_tok_s = round(pred["decode_tok_s"], 2)
            results.append(r)
            bar.advance(task)
    mon.stop()
    # The copy-ceiling probe moves 2 x 1 GiB: not inside a GPU-memory budget (it would be the peak).
    d2d = round(d2d_copy_bandwidth(engine.device) / 1e9, 1) if cuda and setup is None else None
    b1 = next((r for r in results if r.batch == 1), None)
    report_fn = getattr(engine, "memory_report", None)
    dev_name = torch.cuda.get_device_name(engine.device) if cuda else (platform.processor() or "cpu")
    return BenchReport(
        model=model_name,
        device=f"{engine.device.type}: {dev_name}",
        dtype=str(engine.dtype).removeprefix("torch."),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        torch_version=torch.__version__,
        host=f"{platform.node()} ({torch.get_num_threads()} torch threads)",
        placement=getattr(engine, "placement_name", "all-resident"),
        planner_prediction=getattr(engine, "planner_prediction", None),
        load_s=round(load_s, 2),
        nvml_available=mon.available,
        nvml_per_process=mon.per_process,
        nvml_peak_load_mib=_mib(load_peak),
        nvml_peak_mib=_mib(mon.peak) if mon.available else None,
        torch_max_allocated_mib=_mib(torch.cuda.max_memory_allocated()) if cuda else None,
        torch_max_reserved_mib=_mib(torch.cuda.max_memory_reserved()) if cuda else None,
        results=results,
        settings=dict(settings or {}),
        decode_path=decode_path(engine),
        graph_pool_mib=_mib(engine.runner.graph_pool_bytes) if cuda else None,
        weight_bytes_per_step=decode_weight_bytes(engine.model),
        d2d_copy_gb_s=d2d,
        weight_read_fraction_b1=round(b1.weight_gb_s / d2d, 3) if d2d and b1 and b1.weight_gb_s else None,
        gpu_memory_budget_mib=_mib(setup.limit) if setup is not None else None,
        memory_report=report_fn() if callable(report_fn) else None,
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-") or "model"


def default_json_name(settings: dict[str, Any], batch_sizes: list[int], prompt_len: int, gen_len: int) -> str:
    """File name for `--json DIR/`: the scenario in the name, e.g.
    bench-llama-2-13b-int4-6GiB-b1-p512-g128.json (benchmarks/peers/table.py reads any such report)."""
    model = settings.get("random_weights") or Path(str(settings.get("model") or "bundled")).name
    cap = settings.get("gpu_memory")
    if isinstance(cap, (int, float)) and cap > 0:  # bytes
        cap = f"{cap / 2**30:g}GiB" if cap % 2**30 == 0 else f"{cap / 2**20:g}MiB"
    parts = [
        "bench",
        _slug(str(model)),
        _slug(str(settings.get("quantization") or "default")),
        _slug(str(cap)) if cap else "uncapped",
        "b" + "-".join(str(b) for b in batch_sizes),
        f"p{prompt_len}",
        f"g{gen_len}",
    ]
    return "-".join(parts) + ".json"


def format_table(report: BenchReport) -> str:
    predicted = any(r.predicted_decode_tok_s is not None for r in report.results)
    head = ("| batch | TTFT ms | prefill tok/s | decode tok/s (agg) | per seq | throughput tok/s | weights GB/s | "
            "NVML peak MiB | torch alloc MiB |")
    sep = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if predicted:
        head += " predicted TTFT ms | predicted prefill tok/s | predicted decode tok/s |"
        sep += "---:|---:|---:|"
    rows = []
    for r in report.results:
        row = (f"| {r.batch} | {r.ttft_ms:.1f} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | {r.decode_tok_s_per_seq:.1f} | "
               f"{r.throughput_tok_s:.1f} | {r.weight_gb_s if r.weight_gb_s is not None else '-'} | "
               f"{r.nvml_peak_mib if r.nvml_peak_mib is not None else '-'} | "
               f"{r.torch_max_allocated_mib if r.torch_max_allocated_mib is not None else '-'} |")
        if predicted:
            row += (f" {_fmt(r.predicted_ttft_ms, '.1f')} | {_fmt(r.predicted_prefill_tok_s, '.0f')} | "
                    f"{_fmt(r.predicted_decode_tok_s, '.1f')} |")
        rows.append(row)
    budget = f", budget {report.gpu_memory_budget_mib:.0f} MiB" if report.gpu_memory_budget_mib is not None else ""
    title = (
        f"{report.model} on {report.device}, {report.dtype}, placement {report.placement}{budget}, "
        f"prompt {report.results[0].prompt_len if report.results else '?'} + gen "
        f"{report.results[0].gen_len if report.results else '?'}, commit {report.commit}, {report.date}"
    )
    wb = report.weight_bytes_per_step
    path = f"decode: {report.decode_path}"
    if report.graph_pool_mib:
        path += f", graph pool {report.graph_pool_mib} MiB"
    if wb:
        path += f"; weights read per decode step {wb / 1e9:.2f} GB"
    if report.d2d_copy_gb_s:
        path += f"; d2d copy {report.d2d_copy_gb_s} GB/s"
    if report.weight_read_fraction_b1 is not None:
        path += f"; batch-1 weight read = {report.weight_read_fraction_b1:.2f} of d2d"
    lines = [title, path, "", head, sep, *rows]
    if report.memory_report is not None and report.gpu_memory_budget_mib is not None:
        from vramwise.memory.enforce import format_report

        lines += ["", "GPU memory (engine accounting; NVML at start-up):", format_report(report.memory_report)]
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_plot(report: BenchReport, path: str | Path) -> None:
    """tokens/s and memory against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [r.batch for r in report.results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [r.decode_tok_s for r in report.results], "o-", label="decode tok/s (aggregate)")
    ax.plot(bs, [r.throughput_tok_s for r in report.results], "s--", label="end-to-end tok/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{report.model} — {report.device}", fontsize=9)
    mem = [r.nvml_peak_mib for r in report.results]
    if any(m is not None for m in mem):
        ax2 = ax.twinx()
        ax2.plot(bs, [m or 0 for m in mem], "r^:", label="NVML peak MiB")
        ax2.set_ylabel("GPU memory (MiB)")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
