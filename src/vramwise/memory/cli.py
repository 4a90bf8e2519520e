"""`vramwise plan` (will it fit, and how fast) and `vramwise doctor` (what is this machine, how fast is it).

    vramwise plan [MODEL | --random-weights SHAPE] --gpu-memory 6GiB [--max-model-len N] [--max-num-seqs N]
                  [--batch N] [--bits 4|8|16] [--group-size G] [--kv-cache-dtype fp16|int8]
                  [--policy auto|resident|streamed|cpu|mixed] [--device-profile h100|rtx2060|cpu|auto]
    vramwise plan --gpu-memory 6GiB            the matrix for the 7B, 8B, 13B, 34B and 70B shapes
    vramwise doctor [--no-measure]             checks + measurements, cached for --device-profile auto

`plan` reads the model's config only (nothing is loaded); with --random-weights and with no model it does
not import torch at all.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vramwise.config import ModelConfig, format_size

_KV_CHOICES = ("fp16", "bf16", "int8", "fp8")


def register(subparsers: Any) -> None:
    """Add `plan` and `doctor` to the top-level parser (vramwise.cli discovers this)."""
    from vramwise.argtypes import positive_int
    from vramwise.argtypes import size
    from vramwise.memory.planner import POLICIES

    p = subparsers.add_parser(
        "plan", help="what fits in a GPU-memory budget, where each layer goes, and how fast it will run",
        description="Plans a model into a GPU-memory budget before anything is loaded: each budget term, "
                    "which layers are resident, streamed or computed on the CPU, the KV capacity, predicted "
                    "TTFT and decode speed, and alternatives. Without a model: the matrix for common shapes.")
    p.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (config only)")
    p.add_argument("--random-weights", default=None, metavar="SHAPE",
                   help="a model shape instead of a checkpoint, e.g. llama-2-13b")
    p.add_argument("--gpu-memory", type=size, default=None, metavar="SIZE",
                   help="the process's GPU-memory budget, e.g. 6GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="the budget as a fraction of the card's memory (from the device profile)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length the KV pool must hold (default: min(2048, the model's))")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences per step (default: 64)")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="concurrent requests to plan for (default: 1, latency)")
    p.add_argument("--prompt-len", type=positive_int, default=512, help="reference prompt (default: 512)")
    p.add_argument("--gen-len", type=positive_int, default=128, help="reference generation (default: 128)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="prefill chunk (default: chosen by the planner)")
    p.add_argument("--bits", type=int, default=None, choices=(4, 8, 16),
                   help="weight bits (default: the checkpoint's own quantization, else 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale: 32, 64 or 128 for 4-bit (default 128); -1 = per channel (8-bit default)")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8, 16),
                   help="lm_head bits (default: as the checkpoint has it, else 16)")
    p.add_argument("--kv-cache-dtype", default="fp16", choices=_KV_CHOICES)
    p.add_argument("--policy", default="auto", choices=("auto", *POLICIES))
    p.add_argument("--no-cuda-graphs", action="store_true", help="plan without CUDA-graph pools")
    g = p.add_argument_group("offload driver capabilities (default: what memory/offload.py does today)")
    g.add_argument("--cpu-weights", default="auto", choices=("auto", "fp32", "bf16", "packed"),
                   help="how CPU-computed layers hold weights (as `serve --cpu-weights`): fp32 / bf16 "
                        "(dequantized), or packed int4/int8 (torch's packed CPU kernels); auto (default): packed, "
                        "what `serve --gpu-memory` runs on a GPU")
    g.add_argument("--prefill-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="long prefill chunks run CPU layers on the GPU through the stream buffers "
                        "(as `serve --prefill-offload`; default: on, what `serve --gpu-memory` runs on a GPU)")
    g.add_argument("--lm-head-offload", action="store_true", help="the lm_head may be streamed or CPU-computed")
    p.add_argument("--device-profile", default="auto",
                   help="h100 | rtx2060 | cpu | auto (doctor's cached measurements, else h100) | PATH.json")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON ('-' = stdout)")
    p.set_defaults(func=cmd_plan)

    d = subparsers.add_parser(
        "doctor", help="check driver, CUDA, torch, GPU; measure bandwidths for the planner",
        description="Checks the driver, CUDA, torch, the GPU, Triton and NVML and says plainly what is wrong; "
                    "measures copy bandwidths, the CUDA context and CPU speed, and caches them for "
                    "`vramwise plan --device-profile auto`.")
    d.add_argument("--no-measure", action="store_true", help="checks only")
    d.add_argument("--cache-file", default=None, metavar="PATH",
                   help="where to write the measurements (default: $XDG_CACHE_HOME/vramwise/doctor.json)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--device-index", type=int, default=0)
    d.set_defaults(func=cmd_doctor)


# --------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------


def resolve_profile(name: str) -> tuple[Any, str | None]:
    """(DeviceProfile, note or None) for --device-profile."""
    from vramwise.memory.bandwidth import load_report
    from vramwise.memory.costmodel import H100, builtin_profile, load_profile_json, profile_from_doctor

    if name.lower().endswith(".json"):
        try:
            return load_profile_json(name), None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read device profile {name}: {e}") from None
    if name.lower() != "auto":
        return builtin_profile(name), None
    report = load_report()
    if report and report.get("gpu"):
        return profile_from_doctor(report), None
    why = "no doctor measurements cached" if not report else "the cached doctor report has no GPU"
    return H100, (f"{why}: using the built-in h100 profile (the peers' H100 rig); run `vramwise doctor` on "
                  "the GPU machine to plan with its own figures")


def _gguf_format(type_name: str):
    """The packed format a GGUF tensor type loads as (quant/importers.py gguf_packed_spec); None = float."""
    from vramwise.memory.budget import WeightFormat

    return {
        "Q4_0": WeightFormat(4, 32, True), "Q4_1": WeightFormat(4, 32), "Q4_K": WeightFormat(4, 32),
        "Q8_0": WeightFormat(8, 32), "Q5_0": WeightFormat(8, 32),
    }.get(type_name)


def checkpoint_quant(source: Any) -> tuple[Any, str] | None:
    """(per-module formats, description) of a checkpoint's own quantization, or None for a float one.
    Reads metadata only."""
    from vramwise.memory.budget import FP16, QuantScheme, WeightFormat

    qtypes = getattr(source, "tensor_qtypes", None)
    if callable(qtypes):  # GGUF
        mapping: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for name, qt in qtypes().items():
            if not name.endswith(".weight") or "norm" in name or "embed_tokens" in name:
                continue
            tname = getattr(qt, "name", str(qt))
            counts[tname] = counts.get(tname, 0) + 1
            mapping[name.removesuffix(".weight")] = _gguf_format(tname) or FP16
        if not any(f.quantized for f in mapping.values()):
            return None
        layer_fmts = [f for k, f in mapping.items() if k != "lm_head"]
        common = max(set(layer_fmts), key=layer_fmts.count) if layer_fmts else FP16
        scheme = QuantScheme(linear=common,
                             overrides=tuple((k, v) for k, v in mapping.items() if k != "lm_head" and v != common),
                             lm_head=mapping.get("lm_head", FP16))
        desc = "GGUF " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        return scheme, desc
    hf = getattr(source, "hf_config", None) or {}
    qc = hf.get("quantization_config") if isinstance(hf, dict) else None
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "")).lower()
        if method in ("gptq", "awq"):
            g = int(qc.get("group_size", qc.get("q_group_size", 128)))
            if g in (-1, 0):  # per channel: one scale per output, counted as group 128 (a slight overcount)
                return QuantScheme(linear=WeightFormat(4, 128)), f"{method.upper()} 4-bit, per channel"
            return QuantScheme(linear=WeightFormat(4, g)), f"{method.upper()} 4-bit, group {g}"
        try:  # our own quantized checkpoints (quant/checkpoint.py)
            from vramwise.quant.checkpoint import parse_quant_config

            specs = parse_quant_config(qc, str(getattr(source, "path", "")))
        except Exception:
            return None
        mapping = {name: spec for name, (spec, _) in specs.items()}
        if mapping:
            from vramwise.memory.budget import resolve_quant

            return resolve_quant(mapping), f"vramwise {qc.get('quant_method', 'quantized')}"
    return None


def _scheme_from_args(args: argparse.Namespace, checkpoint: tuple[Any, str] | None) -> tuple[Any, str | None]:
    from dataclasses import replace

    from vramwise.memory.budget import QuantScheme, WeightFormat

    note = None
    if args.bits is None and checkpoint is not None and args.group_size is None:
        scheme = checkpoint[0]
        note = f"weights as the checkpoint has them: {checkpoint[1]}"
    else:
        bits = args.bits if args.bits is not None else 4
        g = args.group_size
        if bits == 4:
            g = 128 if g is None else g
            if g not in (32, 64, 128):
                raise ValueError(f"--group-size {g} is not supported for 4-bit weights: choose 32, 64 or 128")
        elif bits == 8:
            if g is not None and g > 0 and g % 32:
                raise ValueError(f"--group-size {g} is not supported for 8-bit weights: use -1 (per channel) "
                                 "or a multiple of 32")
            g = None if g is None or g <= 0 else g
        scheme = QuantScheme(linear=WeightFormat(bits, g if bits != 16 else None))
        if args.bits is None:
            note = ("a float checkpoint, planned as int4 g128 (quantized at load: --quantization int4); "
                    "--bits 16 plans it unquantized") if args.model else None
    if args.lm_head_bits is not None:
        scheme = replace(scheme, lm_head=WeightFormat.for_bits(args.lm_head_bits))
    return scheme, note


def _model_config(args: argparse.Namespace) -> tuple[ModelConfig, str, tuple[Any, str] | None]:
    if args.random_weights is not None:
        if args.model is not None:
            raise ValueError("give either a model or --random-weights, not both")
        from vramwise.models.shapes import shape_config

        return shape_config(args.random_weights), f"{args.random_weights.lower()} (shape)", None
    from vramwise.weights import open_weights

    from pathlib import Path

    src = open_weights(args.model, show_progress=False)
    return src.config, Path(str(src.path)).name or str(src.path), checkpoint_quant(src)


def _budget(args: argparse.Namespace, profile: Any) -> int:
    if args.gpu_memory is not None and args.gpu_memory_utilization is not None:
        raise ValueError("give either --gpu-memory or --gpu-memory-utilization, not both")
    if args.gpu_memory is not None:
        return args.gpu_memory
    frac = args.gpu_memory_utilization
    if frac is None:
        frac = 0.9
    if not 0 < frac <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {frac}")
    if not profile.has_gpu:
        return 0
    return int(frac * profile.total_memory)


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vramwise.memory.planner import DRIVER_NEXT, DRIVER_TODAY, BudgetTooSmallError, driver_caps, format_matrix, \
        plan, plan_matrix

    profile, profile_note = resolve_profile(args.device_profile)
    budget = _budget(args, profile)
    from vramwise.memory.offload import resolve_driver_options

    # what `serve --gpu-memory --cpu-weights --prefill-offload` runs on a GPU
    caps = driver_caps(*resolve_driver_options(args.cpu_weights, args.prefill_offload, planned_on_gpu=True))
    if args.lm_head_offload:  # a capability the driver does not have yet
        caps = replace(caps, lm_head_offload=True, name="custom")
    for known in (DRIVER_TODAY, DRIVER_NEXT):
        if (caps.cpu_weights, caps.prefill_offload, caps.lm_head_offload) == (
                known.cpu_weights, known.prefill_offload, known.lm_head_offload):
            caps = known
    kw: dict[str, Any] = dict(driver=caps,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, kv_dtype=args.kv_cache_dtype,
        expected_batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
        max_num_batched_tokens=args.max_num_batched_tokens, force_policy=args.policy,
        cuda_graphs=not args.no_cuda_graphs)
    if args.model is None and args.random_weights is None:
        if args.max_model_len is None:
            kw.pop("max_model_len")
        bits = (args.bits,) if args.bits is not None else (4, 8)
        g = args.group_size if args.group_size not in (None, -1) else 128
        rows = plan_matrix(budget, profile, bits=bits, group_size=g, **kw)
        print(f"GPU budget {format_size(budget)} on {profile.name} ({profile.description}); "
              f"KV {args.kv_cache_dtype}, max_model_len {args.max_model_len or 'min(2048, model)'}, "
              f"batch {args.batch}")
        print()
        print(format_matrix(rows))
        if profile_note:
            print(f"\nnote: {profile_note}")
        if args.json:
            from dataclasses import asdict

            _write_json(args.json, {"budget": budget, "device": profile.to_dict(), "rows": [asdict(r) for r in rows]})
        return 0

    cfg, name, checkpoint = _model_config(args)
    scheme, quant_note = _scheme_from_args(args, checkpoint)
    try:
        result = plan(cfg, budget, profile, scheme, model_name=name, **kw)
    except BudgetTooSmallError as e:
        if profile_note:
            raise ValueError(f"{e}\nnote: {profile_note}") from None
        raise
    if quant_note:
        result.notes.insert(0, quant_note)
    if profile_note:
        result.notes.append(profile_note)
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _write_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        print(text)
        return
    with open(path, "w") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------------------------------------
# doctor
# --------------------------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from vramwise.memory.bandwidth import format_report, run_doctor, save_report

    rep = run_doctor(measure=not args.no_measure, device_index=args.device_index)
    data = rep.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_report(rep))
    if not args.no_measure and (rep.cpu or rep.gpu):
        path = save_report(data, args.cache_file)
        if not args.json:
            print(f"measurements cached in {path} (used by `vramwise plan --device-profile auto`)")
    return 1 if rep.problems else 0

