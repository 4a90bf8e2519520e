"""The GPU-memory budget, enforced by the engine (`--gpu-memory SIZE`, `--gpu-memory-utilization F`).

    setup = prepare_budget(config, source, model_config, device, dtype, max_model_len)   # before loading
    model = load_model(..., load_device=setup.load_device)    # on the CPU when layers will be offloaded
    driver = apply_budget_placement(setup, model, device)      # the plan's placement (or the forced one)
    ... scheduler bounded by setup.plan.max_num_batched_tokens, KV pool of setup.plan.kv_num_blocks ...
    check_budget(setup, engine)     # warm-up of the largest prefill chunk and decode batch, then NVML

Before anything is loaded the planner (memory/planner.py) lays the model out in the budget: which layers
are resident, streamed or CPU-computed, the prefill chunk and the KV pool that fill what is left. A budget
that holds no runnable layout is refused there, with the terms (BudgetTooSmallError). On CUDA:
  * the CUDA context is created first and measured (NVML, per process); the plan uses the larger of that
    and the device profile's figure (kernels load lazily, so the context grows after start-up);
  * torch's caching allocator is capped at budget - context (set_per_process_memory_fraction), so an
    under-estimated term fails as an out-of-memory error at start-up rather than exceeding the budget;
  * an NVML monitor samples the process's memory through load and warm-up; a peak above the budget
    refuses to start (BudgetExceededError listing each term and the measured figure).
`memory_report(engine)` is the engine's accounting: the terms it allocated (weights, ring, KV pool: exact),
those it planned (context, activations, workspace, margin), the CUDA-graph pool when the runner has one,
and NVML's figures.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from vramwise.config import EngineConfig, MemoryBudgetConfig, ModelConfig, format_size

log = logging.getLogger(__name__)

MiB = 1 << 20

#: The terms of memory_report, in order; total_planned is their sum.
REPORT_TERMS = ("cuda_context", "resident_weights", "stream_buffers", "kv_pool", "activations", "workspace",
                "graph_pool", "margin")

#: Request ids of the warm-up (never visible to users: the engine runs them before it takes requests).
PROFILE_PREFIX = "vramwise-profile-"


class BudgetExceededError(ValueError):
    """The process's GPU memory (NVML, per process) went above the budget at start-up. `report` holds the
    engine's accounting (memory_report) with the measured figure."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class BudgetSetup:
    """What prepare_budget decided before loading, and what the start-up check measures."""

    limit: int  # bytes
    profile: Any  # DeviceProfile the plan was costed with
    plan: Any  # planner.Plan
    context_bytes: int  # the CUDA-context term of the plan (measured or the profile's)
    context_measured: int | None  # NVML per process minus torch's reserved bytes at start-up, if known
    load_device: torch.device  # where load_model materializes the tensors
    forced: bool  # the placement came from --offload, not the planner
    monitor: Any = None  # bench.gpu_memory.NvmlMonitor sampling through load and warm-up (CUDA only)
    nvml_peak: int | None = None  # filled by check_budget
    context_after_warmup: int | None = None  # NVML per process minus torch's reserved bytes after the warm-up
    nvml_per_process: bool = False
    notes: list[str] = field(default_factory=list)
    model_config: Any = None  # what the plan was made from, for predict()
    quant: Any = None
    cuda_graphs: bool = True
    cpu_weights: str = "fp32"  # --cpu-weights: how CPU layers hold weights, as planned (planner.driver_caps)
    prefill_offload: bool = False  # --prefill-offload: long prefills run CPU layers on the GPU, as planned

    def predict(self, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
        """The plan's predicted TTFT, prefill and decode rates for a benchmark run (planner.predict_workload)."""
        from vramwise.memory.planner import driver_caps, predict_workload

        # the caps the plan was made with: CPU layers costed as the driver holds their weights
        return predict_workload(self.model_config, self.limit, self.profile, self.quant, self.plan, batch,
                                prompt_len, gen_len, cuda_graphs=self.cuda_graphs,
                                driver=driver_caps(self.cpu_weights, self.prefill_offload))

    @property
    def needs_driver(self) -> bool:
        return _offloads(self.plan)


# ------------------------------------------------------------------------------------------------------------
# Before loading
# ------------------------------------------------------------------------------------------------------------


def resolve_profile(cfg: MemoryBudgetConfig, device: torch.device) -> Any:
    """The DeviceProfile to plan with: an injected one as is; else a named / JSON / doctor-cached profile
    with the real card's total memory (CUDA)."""
    from vramwise.memory.costmodel import DeviceProfile

    if isinstance(cfg.device_profile, DeviceProfile):
        return cfg.device_profile
    from vramwise.memory.cli import resolve_profile as _named

    profile, note = _named(cfg.device_profile or "auto")
    if note:
        log.info("%s", note)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        profile = profile.with_overrides(total_memory=int(total), name=f"{profile.name} ({torch.cuda.get_device_name(device)})")
    return profile


def resolve_limit(cfg: MemoryBudgetConfig, total_memory: int) -> int:
    """Budget bytes from --gpu-memory or --gpu-memory-utilization x the card's memory."""
    if cfg.gpu_memory is not None and cfg.gpu_memory_utilization is not None:
        raise ValueError("give either --gpu-memory or --gpu-memory-utilization, not both")
    if cfg.gpu_memory is not None:
        if cfg.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory must be positive, got {cfg.gpu_memory}")
        if total_memory and cfg.gpu_memory > total_memory:
            raise ValueError(f"--gpu-memory {format_size(cfg.gpu_memory)} exceeds the GPU's "
                             f"{format_size(total_memory)}")
        return int(cfg.gpu_memory)
    frac = float(cfg.gpu_memory_utilization)  # type: ignore[arg-type]
    if not 0 < frac <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {frac}")
    if not total_memory:
        raise ValueError("--gpu-memory-utilization needs a GPU (the device profile has no GPU memory)")
    return int(frac * total_memory)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def planning_scheme(quantization: str | None, source: Any, device: torch.device, dtype: torch.dtype,
                    lm_head_bits: int | None = None) -> Any:
    """The QuantScheme (memory/budget.py) of the weights as load_model will hold them on `device`."""
    from dataclasses import replace

    from vramwise.memory.budget import FP16, FP32, QuantScheme, WeightFormat, resolve_quant
    from vramwise.model_loader import parse_quantization

    float_fmt = FP32 if dtype == torch.float32 else FP16
    floats = QuantScheme(float_fmt, (), float_fmt, float_fmt)
    request = parse_quantization(quantization)
    if request.mode == "rtn":
        scheme = QuantScheme(resolve_quant(request.spec).linear, (), float_fmt, float_fmt)
    elif request.mode == "none" or (request.mode == "auto" and device.type == "cpu"):
        scheme = floats
    else:
        from vramwise.memory.cli import checkpoint_quant

        own = checkpoint_quant(source)
        scheme = own[0] if own is not None else floats
    if lm_head_bits is not None and not getattr(source.config, "tie_word_embeddings", False):
        scheme = replace(scheme, lm_head=float_fmt if lm_head_bits == 16 else WeightFormat.for_bits(lm_head_bits))
    return scheme


def _kv_dtype(cache_dtype: str, dtype: torch.dtype) -> str:
    return _dtype_name(dtype) if cache_dtype in (None, "auto") else cache_dtype


def prepare_budget(config: EngineConfig, source: Any, model_config: ModelConfig, device: torch.device,
                   dtype: torch.dtype, max_model_len: int) -> BudgetSetup | None:
    """Plan the model into the budget before loading; None when no budget is set (or it cannot apply).

    Raises BudgetTooSmallError (a ValueError, with the terms) when nothing runnable fits."""
    from vramwise.memory.budget import BudgetTooSmallError
    from vramwise.memory.offload import parse_placements
    from vramwise.memory.planner import CHUNK_CANDIDATES, driver_caps, plan, plan_for_layers

    mem = config.memory
    if not mem.enabled:
        return None
    # Off CUDA the budget applies only to a profile given explicitly (tests and dry runs plan for a fake card).
    explicit = mem.device_profile is not None and mem.device_profile != "auto"
    if device.type != "cuda" and not explicit:
        log.warning("--gpu-memory applies to a CUDA device; running on %s without a budget", device)
        return None
    profile = resolve_profile(mem, device)
    if not profile.has_gpu:
        log.warning("device profile %s has no GPU; running without a budget", profile.name)
        return None
    limit = resolve_limit(mem, profile.total_memory)

    monitor, measured = None, None
    if device.type == "cuda":
        from vramwise.bench.gpu_memory import NvmlMonitor

        _expandable_segments()

        # Create the context and the cuBLAS handle now (a tiny fp16 GEMM loads cuBLAS's kernels), so that
        # NVML shows them: the context term is what the process holds beyond torch's allocator, whose
        # blocks (cuBLAS's workspace among them) the other terms cover.
        x = torch.ones(64, 64, dtype=torch.float16, device=device)
        (x @ x).sum().item()  # (64, 64) product: only the library initialisation matters
        del x
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # what an earlier engine of this process cached is not ours to count
        monitor = NvmlMonitor(device.index or 0)
        if monitor.available and monitor.per_process:
            measured = monitor.used() - torch.cuda.memory_reserved(device)
        monitor.start()
    context = max(profile.cuda_context_bytes, measured or 0)
    if device.type == "cuda":
        # The context keeps growing after this measurement, outside torch's allocator: with lazy module
        # loading, every Triton kernel and cuBLAS kernel family used for the first time maps its code into
        # the context, and the driver grows its local-memory (register spill) reservation for the hungriest
        # kernel across all SMs. The plan reserves an allowance for it (MODULE_LOADING_ALLOWANCE).
        context += module_loading_allowance()
    profile = profile.with_overrides(cuda_context_bytes=context)

    sc = config.scheduler
    # The planner picks the prefill chunk among CHUNK_CANDIDATES up to the configured bound.
    chunk = None if sc.max_num_batched_tokens >= max(CHUNK_CANDIDATES) else sc.max_num_batched_tokens
    quant = planning_scheme(config.quantization, source, device, dtype, getattr(config, "lm_head_bits", None))
    kw: dict[str, Any] = dict(
        max_model_len=max_model_len, max_num_seqs=sc.max_num_seqs,
        kv_dtype=_kv_dtype(config.cache.cache_dtype, dtype), max_num_batched_tokens=chunk,
        cuda_graphs=not getattr(config, "enforce_eager", False), block_size=config.cache.block_size,
        model_name=str(getattr(source, "path", "") or model_config.architecture),
        # CPU layers costed as the driver holds them, long prefills as it runs them
        driver=driver_caps(getattr(config, "cpu_weights", "fp32"), bool(getattr(config, "prefill_offload", False))),
    )
    forced = config.offload is not None
    try:
        if forced:
            layers = parse_placements(config.offload, model_config.num_hidden_layers)
            result = plan_for_layers(model_config, limit, profile, quant, layers,
                                     num_stream_buffers=config.num_stream_buffers, embeddings="gpu", **kw)
        else:
            try:
                result = plan(model_config, limit, profile, quant, expected_batch=sc.max_num_seqs,
                              alternatives=False, **kw)
            except BudgetTooSmallError:  # plan again, for the message's alternatives
                result = plan(model_config, limit, profile, quant, expected_batch=sc.max_num_seqs, **kw)
    except BudgetTooSmallError:
        if monitor is not None:
            monitor.stop()
        raise
    if device.type == "cuda":
        _kernels_within_plan(result.dequant_workspace_bytes)
        # Hard cap for torch's allocator: what the plan gives everything but the context.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (limit - context) / total)), device)
    load_device = torch.device("cpu") if (device.type == "cuda" and (forced or _offloads(result))) else device
    setup = BudgetSetup(limit=limit, profile=profile, plan=result, context_bytes=context,
                        context_measured=measured, load_device=load_device, forced=forced, monitor=monitor,
                        model_config=model_config, quant=quant, cuda_graphs=kw["cuda_graphs"],
                        cpu_weights=getattr(config, "cpu_weights", "fp32"),
                        prefill_offload=bool(getattr(config, "prefill_offload", False)))
    if monitor is not None:  # an engine that fails to build after this point must not leave the poller running
        weakref.finalize(setup, _stop_quietly, monitor)
    log.info("GPU-memory budget %s: %s, KV %d blocks, chunk %d tokens", format_size(limit),
             result.describe_layers(), result.kv_num_blocks, result.max_num_batched_tokens)
    return setup


def _expandable_segments() -> None:
    """Under a budget, torch's allocator maps memory in growable segments (PYTORCH_CUDA_ALLOC_CONF
    expandable_segments:True) unless the user configured the allocator: with fixed-size segments the allocator
    reached the budget's cap through fragmentation (13B int4 under 6 GiB on an H200, 24 layers resident: reserved
    = the cap, NVML peak 5,960 MiB, and the 512-token prefill took 121 ms instead of 51-64 ms as the allocator
    freed its cache and retried); with growable ones the peak was 5,872 MiB and the prefill 64 ms."""
    import os

    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # another torch: keep its default segments
        log.info("could not switch the CUDA allocator to expandable segments: %s", e)


def _kernels_within_plan(dequant_workspace_bytes: int | None = None) -> None:
    """Make the quantized-matmul kernels use only what the plan counts for them: the long-prefill dequant
    workspace the plan's workspace term holds (Plan.dequant_workspace_bytes, which the planner picks among
    budget.DEQUANT_WORKSPACE_CHOICES; budget.DEQUANT_WORKSPACE_BYTES when not given), and no first-use tuning,
    which times a dozen candidate configs (each a module loaded into the CUDA context, outside torch's
    allocator) with scratch outputs and an L2-flush buffer the plan does not hold. The fixed default
    configs run instead. Process-wide, like the allocator cap."""
    from vramwise.kernels import w4a16
    from vramwise.memory.budget import DEQUANT_WORKSPACE_BYTES

    w4a16.AUTOTUNE = False
    w4a16.DEQUANT_WORKSPACE_BYTES = dequant_workspace_bytes or DEQUANT_WORKSPACE_BYTES


#: GPU memory the CUDA context gains after start-up as kernels are first used (lazy module loading).
#: Measured on an H200 (torch 2.11, CUDA 13; 13B int4 under 6 GiB, memory_report's context_after_warmup minus
#: context_measured): 72 MiB at batch 1 and 104 MiB with 16 sequences (676 MiB at start-up). Under a budget the
#: kernels run their fixed configs (_kernels_within_plan): first-use tuning, which loads a dozen candidate
#: modules per shape, had made the context grow by 558-702 MiB, the figure an earlier 768 MiB allowance covered.
#: 160 MiB is 1.5x the largest growth measured since (it was 256 MiB until session 7: the NVML peaks of both
#: 13B runs then stayed 250-260 MiB under the 6 GiB cap, i.e. the safety margin plus ~100-180 MiB of this
#: allowance went unused, and 16 sequences lacked ~150 MiB for one more resident layer). The warm-up's NVML
#: check (check_budget) still refuses a run whose context outgrew the plan.
MODULE_LOADING_ALLOWANCE = 160 << 20


def module_loading_allowance() -> int:
    """MODULE_LOADING_ALLOWANCE, or VRAMWISE_CONTEXT_ALLOWANCE (a size, e.g. 256MiB) when set: the figure is
    measured per machine (memory_report's context_after_warmup shows what the warm-up really added)."""
    import os

    from vramwise.config import parse_size

    text = os.environ.get("VRAMWISE_CONTEXT_ALLOWANCE")
    if not text:
        return MODULE_LOADING_ALLOWANCE
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"VRAMWISE_CONTEXT_ALLOWANCE: {e}") from None


def _stop_quietly(monitor: Any) -> None:
    try:
        monitor.stop()
    except Exception:  # at interpreter exit NVML may already be gone; nothing to report then
        pass


def _offloads(p: Any) -> bool:
    return any(x != "resident" for x in p.layers) or p.lm_head != "resident" or p.embeddings != "gpu"


def apply_budget_placement(setup: BudgetSetup, model: torch.nn.Module, device: torch.device,
                           num_stream_buffers: int, prefill_offload_min_tokens: int | None = None) -> Any:
    """Lay the loaded model out as the plan says (None when everything is resident: no driver, no hooks).
    A placement forced by --offload keeps its own ring size. CPU layers hold their weights as
    --cpu-weights says (the format the plan was costed with); with --prefill-offload, steps of the plan's
    prefill_offload_min_tokens (or the one given) run them on the device."""
    from vramwise.memory.offload import apply_placement, apply_plan, cpu_weight_options

    if device.type == "cuda":
        torch.cuda.empty_cache()  # load-time temporaries (RTN on the GPU) go back before the weights move in
    if not setup.needs_driver:
        if setup.load_device != device:
            model.to(device)
        return None
    cpu_dtype, cpu_weights = cpu_weight_options(setup.cpu_weights)
    prefill_min = None
    if setup.prefill_offload:
        prefill_min = prefill_offload_min_tokens or setup.plan.prefill_offload_min_tokens
        if prefill_min is None and "cpu" in setup.plan.layers:
            log.info("--prefill-offload: the planner found no prefill chunk that the GPU runs faster than the CPU "
                     "for this placement; CPU layers always run on the CPU")
    if setup.forced:
        return apply_placement(model, list(setup.plan.layers), device, num_stream_buffers, cpu_dtype=cpu_dtype,
                               cpu_weights=cpu_weights, prefill_offload_min_tokens=prefill_min)
    return apply_plan(model, setup.plan, device, cpu_dtype=cpu_dtype, cpu_weights=cpu_weights,
                      prefill_offload_min_tokens=prefill_min)


def kv_num_blocks(setup: BudgetSetup, requested_blocks: int | None) -> int:
    """The plan's KV blocks; an explicit --num-kv-blocks may ask for fewer, not more."""
    blocks = setup.plan.kv_num_blocks
    if requested_blocks is not None:
        if requested_blocks > blocks:
            raise ValueError(f"--num-kv-blocks {requested_blocks} does not fit the GPU-memory budget "
                             f"{format_size(setup.limit)}: it leaves room for {blocks} blocks "
                             f"({blocks * setup.plan.kv_block_size} tokens)")
        return requested_blocks
    return blocks


# ------------------------------------------------------------------------------------------------------------
# After loading: warm-up, NVML, the report
# ------------------------------------------------------------------------------------------------------------


def profile_run(engine: Any) -> None:
    """Run the largest steps the engine will run, through its own step(): one prefill chunk of
    max_num_batched_tokens tokens, then max_num_seqs sequences decoding together. Their activations,
    workspace and lazily loaded kernels are then part of what NVML has seen."""
    from vramwise.sampling_params import SamplingParams

    sc = engine.scheduler_config
    bm = engine.block_manager
    vocab = engine.model_config.vocab_size
    capacity = bm.num_blocks * bm.block_size
    n = max(1, min(sc.max_num_batched_tokens, sc.max_model_len - 1, capacity - 1))
    ids = [1 + i % (vocab - 1) for i in range(n)]  # (n,) token ids; values do not matter for memory
    engine.add_request(PROFILE_PREFIX + "prefill", ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    _drain(engine)
    seqs = max(1, min(sc.max_num_seqs, bm.num_blocks))  # one block each: 1-token prompts, 2 tokens out
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(f"{PROFILE_PREFIX}decode-{i}", [1 + i % (vocab - 1)], params)
    _drain(engine)


def _drain(engine: Any) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def check_budget(setup: BudgetSetup, engine: Any) -> None:
    """Warm up, then compare NVML's per-process peak (load + warm-up) with the budget; refuse above it."""
    device = engine.device
    try:
        profile_run(engine)
    except torch.OutOfMemoryError as e:
        report = memory_report(engine)
        raise BudgetExceededError(
            f"GPU memory budget {format_size(setup.limit)} exceeded during the warm-up (torch's allocator is "
            f"capped at budget - CUDA context): {str(e).splitlines()[0]}\n{format_report(report)}\n"
            f"{_HINT}", report) from None
    finally:
        for rid in list(getattr(engine, "_requests", {})):
            if rid.startswith(PROFILE_PREFIX):
                engine.abort_request(rid)
    if device.type != "cuda" or setup.monitor is None:
        return
    torch.cuda.synchronize(device)
    mon = setup.monitor
    if mon.available and mon.per_process:
        setup.context_after_warmup = mon.used() - torch.cuda.memory_reserved(device)
    setup.nvml_peak = mon.stop() if mon.available else None
    setup.nvml_per_process = bool(mon.available and mon.per_process)
    if setup.nvml_peak is None:  # no NVML: the driver's device-wide figure now (no peak), checked like NVML's
        free, total = torch.cuda.mem_get_info(device)
        setup.nvml_peak = int(total - free)
        setup.notes.append(f"NVML unavailable ({mon.error}): the figure is torch.cuda.mem_get_info's device-wide "
                           "use after the warm-up, not a peak")
    error = budget_verdict(setup, memory_report(engine), engine.config.memory.check_nvml)
    if error is not None:
        raise error


def budget_verdict(setup: BudgetSetup, report: dict[str, Any], check: bool = True) -> BudgetExceededError | None:
    """The refusal when the measured figure (setup.nvml_peak) is above the budget, else None. A device-wide
    figure (other processes count too) or check=False only warns."""
    if setup.nvml_peak is None or setup.nvml_peak <= setup.limit:
        return None
    if not setup.nvml_per_process or not check:
        scope = "per process" if setup.nvml_per_process else "device-wide: other processes count too"
        log.warning("GPU memory (%s) peaked at %s at start-up, above the %s budget", scope,
                    format_size(setup.nvml_peak), format_size(setup.limit))
        return None
    return BudgetExceededError(
        f"GPU memory budget {format_size(setup.limit)} exceeded: NVML measured {format_size(setup.nvml_peak)} "
        f"for this process (peak through load and warm-up), {format_size(setup.nvml_peak - setup.limit)} "
        f"over\n{format_report(report)}\n{_HINT}", report)


_HINT = ("lower --max-num-seqs or --max-num-batched-tokens, give a larger --gpu-memory, or measure this "
         "machine with `vramwise doctor` (its CUDA context and workspace figures feed the plan)")


def _unique_bytes(tensors: Any, device: torch.device) -> int:
    """Bytes of the distinct storages among `tensors` that live on `device` (ties counted once)."""
    if device.type == "cuda" and device.index is None:  # tensors report cuda:N, never bare cuda
        device = torch.device("cuda", torch.cuda.current_device())
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device != device:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _device_kv_bytes(engine: Any) -> int:
    """Bytes of the KV pages of the layers computed on the device (CPU layers keep theirs on the host), and,
    with prefill offload, the one layer of device pages the CPU layers' twins use (allocated at the first
    offloaded step; counted from the pool's geometry, so the figure does not depend on whether one ran)."""
    kv = engine.runner.kv_cache
    driver = getattr(engine, "offload", None)
    scales = getattr(kv, "scales", None)  # an int8 cache keeps per-(token, head) scales beside its pages
    total = 0
    for i in range(len(kv.layer_placement)):
        if driver is not None and driver.placements[i] == "cpu":
            continue
        parts = list(kv.layer(i)) + list((scales(i) if callable(scales) else None) or ())
        total += sum(t.numel() * t.element_size() for t in parts)
    return total + _prefill_offload_bytes(engine)[0]


def _prefill_offload_bytes(engine: Any) -> tuple[int, int]:
    """(device KV pages, own weight slot) of the offload driver's prefill offload; (0, 0) without it."""
    driver = getattr(engine, "offload", None)
    if driver is None or not hasattr(driver, "prefill_offload_bytes") or "cpu" not in driver.placements:
        return 0, 0
    kv = engine.runner.kv_cache
    return driver.prefill_offload_bytes(tuple(kv.layer(driver.placements.index("cpu"))[0].shape))


def memory_report(engine: Any) -> dict[str, Any]:
    """The engine's GPU-memory accounting (bytes):

        cuda_context       the plan's context term (NVML at start-up, or the device profile's)
        resident_weights   device tensors of the model (resident layers, lm_head, norms, embeddings there)
        stream_buffers     the offload ring (slots x slot bytes), or prefill offload's own weight slot
        kv_pool            KV pages of the device-side layers (+ prefill offload's one layer of pages)
        activations, workspace, margin   as planned (they live in torch's cache once the warm-up ran)
        graph_pool         the runner's CUDA-graph pool (0 without graphs)
        total_planned      the sum of the above
        budget             the limit (None without one)
        nvml_measured      NVML's per-process peak through load and warm-up (None when not measured)
        nvml_now           NVML's per-process figure now
        context_measured   NVML minus torch's reserved bytes at start-up; context_after_warmup: the same after
                           the warm-up (what lazily loaded kernels added shows as the difference)
        planned            the planner's own terms (Budget.to_dict()), for comparison
    """
    setup: BudgetSetup | None = getattr(engine, "budget_setup", None)
    device = engine.device
    driver = getattr(engine, "offload", None)
    planned = setup.plan.budget if setup is not None else None
    on_gpu = device.type == "cuda"
    if driver is not None:
        resident, ring = driver.bytes_resident, driver.bytes_slots + _prefill_offload_bytes(engine)[1]
    else:
        model = engine.model
        resident = _unique_bytes([*model.parameters(), *model.buffers()], device) if (on_gpu or setup) else 0
        ring = 0
    report: dict[str, Any] = {
        "cuda_context": setup.context_bytes if setup is not None else 0,
        "resident_weights": resident,
        "stream_buffers": ring,
        "kv_pool": _device_kv_bytes(engine) if (on_gpu or setup) else 0,
        "activations": planned.activations if planned is not None else 0,
        "workspace": planned.workspace if planned is not None else 0,
        "graph_pool": int(getattr(engine.runner, "graph_pool_bytes", 0) or 0),
        "margin": planned.margin if planned is not None else 0,
    }
    report["total_planned"] = sum(report[t] for t in REPORT_TERMS)
    report["budget"] = setup.limit if setup is not None else None
    report["placement"] = getattr(engine, "placement_name", "all-resident")
    report["nvml_measured"] = setup.nvml_peak if setup is not None else None
    report["nvml_per_process"] = setup.nvml_per_process if setup is not None else False
    report["nvml_now"] = _nvml_now(device) if on_gpu else None
    report["context_measured"] = setup.context_measured if setup is not None else None
    report["context_after_warmup"] = setup.context_after_warmup if setup is not None else None
    report["torch_reserved"] = torch.cuda.memory_reserved(device) if on_gpu else None
    report["planned"] = planned.to_dict() if planned is not None else None
    return report


def _nvml_now(device: torch.device) -> int | None:
    from vramwise.bench.gpu_memory import NvmlMonitor

    mon = NvmlMonitor(device.index or 0)
    return mon.used() if mon.available and mon.per_process else None


def format_report(report: dict[str, Any]) -> str:
    """One line per term, planned next to allocated where they differ, then the total and NVML."""
    planned = report.get("planned") or {}
    plan_key = {"graph_pool": "cuda_graphs"}
    lines = []
    for t in REPORT_TERMS:
        p = planned.get(plan_key.get(t, t))
        extra = f"  (planned {format_size(p)})" if p is not None and p != report[t] else ""
        lines.append(f"  {t:<17} {format_size(report[t]):>11}{extra}")
    lines.append(f"  {'total':<17} {format_size(report['total_planned']):>11}"
                 + (f"  of a {format_size(report['budget'])} budget" if report.get("budget") else ""))
    if report.get("nvml_measured") is not None:
        scope = "per process" if report.get("nvml_per_process") else "device-wide"
        lines.append(f"  {'NVML measured':<17} {format_size(report['nvml_measured']):>11}  ({scope}, peak)")
    if report.get("context_after_warmup") is not None:
        lines.append(f"  {'context measured':<17} {format_size(report['context_after_warmup']):>11}  (after the "
                     f"warm-up; {format_size(report.get('context_measured') or 0)} at start-up)")
    return "\n".join(lines)
