"""`vramwise quantize MODEL --bits 4 --group-size 128 [--method rtn|gptq] -o OUT`.

Writes a checkpoint of ours (quant/checkpoint.py) that every command loads with `--model OUT`.
RTN streams the source one tensor at a time (no float copy of the model); GPTQ loads the float model, runs
calibration text through it layer by layer and quantizes each layer against its real inputs; with
--tune-steps N it then tunes each quantized layer's scales/mins (and with --tune-rounding its rounding) against
the whole layer's output (quant/blocktune.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Calibration defaults: 128 windows of 512 tokens from the Britannica article (a different text from the
#: Hamlet used for the quality table, so the calibration does not see the evaluation text).
DEFAULT_CALIB_TEXT = "britannica"
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_CALIB_SEQ_LEN = 512


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float_dtype_of(torch_dtype: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(torch_dtype, torch.float32)


def make_spec(bits: int, group_size: int | None, symmetric: bool):
    """QuantSpec from CLI values; ValueError naming the problem (unsupported bits / group size)."""
    from vramwise.quant.formats import QuantSpec

    if bits not in (4, 8):
        raise ValueError(f"--bits {bits} is not supported: choose 4 or 8")
    if group_size is not None and group_size <= 0:  # -1 / 0: per channel
        group_size = None
    if bits == 4:
        if group_size is None:
            raise ValueError("4-bit quantization is group-wise: --group-size must be 32, 64 or 128")
        return QuantSpec(bits=4, group_size=group_size, symmetric=symmetric)
    if symmetric:
        log.info("int8 is always symmetric; --sym changes nothing")
    return QuantSpec(bits=8, group_size=group_size)


def calibration_tokens(tokenizer, text_arg: str, samples: int, seq_len: int):
    """(samples, seq_len) int64 calibration windows from a text file or reference text name."""
    from vramwise.eval.cli import read_text_arg
    from vramwise.quant.gptq import select_calibration

    text = read_text_arg(text_arg)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < samples * seq_len:
        usable = len(ids) // seq_len
        if usable < 1:
            raise ValueError(f"calibration text {text_arg!r} has {len(ids)} tokens, fewer than one window of "
                             f"{seq_len}")
        log.warning("calibration text %r has %d tokens: using %d windows of %d instead of %d", text_arg, len(ids),
                    usable, seq_len, samples)
        samples = usable
    return select_calibration(ids, samples, seq_len)


def quantize_checkpoint(
    model_path: str | None,
    out: str,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    method: str = "rtn",
    device: str = "auto",
    dtype: str = "auto",
    calib_text: str = DEFAULT_CALIB_TEXT,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    act_order: bool = True,
    clip_search: bool = True,
    damp: float = 0.01,
    refit: int = 1,
    awq: bool = True,
    true_sequential: bool = True,
    tune_steps: int = 0,
    tune_samples: int = 32,
    tune_rounding: bool = False,
    tune_target: str = "float",
    tune_lr: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Quantize a model and save it as a checkpoint of ours; returns the output path. The API behind the CLI."""
    import torch

    from vramwise.model_loader import (
        QuantRequest,
        load_model,
        resolve_device,
        resolve_dtype,
        spec_for_layer,
    )
    from vramwise.quant.checkpoint import save_quantized
    from vramwise.weights import open_weights

    fit_groups = bits == 4 and group_size is None  # no explicit group size: 128, smaller where it must
    spec = make_spec(bits, 128 if fit_groups else group_size, symmetric)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"--method {method!r} is not supported: choose rtn or gptq")
    tune = None
    if tune_steps < 0:
        raise ValueError(f"--tune-steps must be >= 0 (0: no block tuning), got {tune_steps}")
    if tune_steps:
        from vramwise.quant.blocktune import TuneConfig

        if method != "gptq":
            raise ValueError("--tune-steps tunes GPTQ's result: it needs --method gptq")
        tune = TuneConfig(steps=tune_steps, samples=tune_samples, rounding=tune_rounding, target=tune_target,
                          **({} if tune_lr is None else {"lr": tune_lr}))
    if Path(out).expanduser().exists() and not overwrite:
        raise ValueError(f"output {out} already exists; choose another -o or pass --overwrite")
    source = open_weights(model_path, show_progress=progress)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, source.config)
    tokenizer = source.load_tokenizer()
    extra: dict = {"source": str(source.path)}
    t0 = time.perf_counter()
    if method == "rtn":
        # Streamed: each float weight is quantized as it is read, nothing float is kept for it.
        model = load_model(source, dev, dt, QuantRequest("rtn", spec, fit_groups=fit_groups))
    else:
        from vramwise.quant.gptq import GPTQConfig, quantize_model_gptq
        from vramwise.quant.linear import QuantLinear

        model = load_model(source, dev, dt, QuantRequest("none"))

        def spec_for(name: str, lin: torch.nn.Linear):
            return spec_for_layer(spec, name, lin.out_features, lin.in_features, fit_groups)

        for name, mod in model.named_modules():  # refuse a bad spec before the long calibration starts
            if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                spec_for(name, mod)
        calib = calibration_tokens(tokenizer, calib_text, calib_samples, calib_seq_len)

        def swap(parent: torch.nn.Module, child: str, packed, bias) -> None:
            setattr(parent, child, QuantLinear.from_packed(packed, bias))

        cfg = GPTQConfig(damp=damp, act_order=act_order, clip_search=clip_search, refit=refit, awq=awq,
                         true_sequential=true_sequential, tune=tune)
        quantize_model_gptq(model, calib, spec_for, swap, cfg, progress=progress)
        extra["calibration"] = {"text": calib_text, "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                                "damp": damp, "act_order": act_order, "clip_search": clip_search,
                                "refit": refit, "awq": awq, "true_sequential": true_sequential,
                                "block_size": cfg.block_size}
        if tune is not None:
            extra["calibration"]["block_tuning"] = {
                "steps": tune.steps, "samples": min(tune.samples, int(calib.shape[0])), "batch": tune.batch,
                "lr": tune.lr, "rounding": tune.rounding, "round_lr": tune.round_lr, "target": tune.target}
    extra["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        path = save_quantized(model, out, source.hf_config, tokenizer, method,
                              float_dtype=_float_dtype_of(source.config.torch_dtype), overwrite=overwrite, **extra)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    return path


def cmd_quantize(args: argparse.Namespace) -> int:
    path = quantize_checkpoint(
        args.model, args.output, bits=args.bits, group_size=args.group_size, symmetric=args.sym,
        method=args.method, device=args.device, dtype=args.dtype, calib_text=args.calib_text,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, act_order=not args.no_act_order,
        clip_search=not args.no_clip_search, damp=args.damp, refit=args.refit, awq=not args.no_awq,
        true_sequential=not args.no_true_sequential, tune_steps=args.tune_steps, tune_samples=args.tune_samples,
        tune_rounding=args.tune_rounding, tune_target=args.tune_target, tune_lr=args.tune_lr,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model (RTN or GPTQ) into a checkpoint that --model loads",
        description="Quantize every decoder-layer linear of MODEL to int4 (group-wise) or int8 and write a "
                    "safetensors checkpoint with its own config to OUT (embedding and lm_head stay float).",
    )
    p.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: bundled SmolLM2)")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    p.add_argument("--bits", type=_int, default=4, help="4 or 8 (default: 4)")
    p.add_argument("--group-size", type=_int, default=None,
                   help="inputs per scale: 32, 64 or 128 for 4-bit (default: 128, or 64 / 32 in layers whose "
                        "width 128 does not divide; an explicit value is strict); for 8-bit a multiple of 32 "
                        "(default: per output channel)")
    p.add_argument("--sym", action="store_true", help="4-bit: symmetric codes (scale only, zero point 8)")
    p.add_argument("--method", default="rtn", help="rtn (round to nearest) or gptq (calibrated; default: rtn)")
    p.add_argument("--calib-text", default=DEFAULT_CALIB_TEXT,
                   help=f"GPTQ calibration text: a file or a reference text name (default: {DEFAULT_CALIB_TEXT})")
    p.add_argument("--calib-samples", type=_int, default=DEFAULT_CALIB_SAMPLES,
                   help=f"GPTQ calibration windows (default: {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-seq-len", type=_int, default=DEFAULT_CALIB_SEQ_LEN,
                   help=f"tokens per calibration window, a multiple of 16 (default: {DEFAULT_CALIB_SEQ_LEN})")
    p.add_argument("--no-act-order", action="store_true",
                   help="GPTQ: visit columns in their natural order instead of by decreasing Hessian diagonal "
                        "(act-order costs nothing at run time here: groups stay contiguous)")
    p.add_argument("--no-clip-search", action="store_true",
                   help="GPTQ: take each group's full [min, max] instead of searching a clipped range")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H) (default 0.01)")
    p.add_argument("--refit", type=_int, default=1,
                   help="GPTQ: rounds of least-squares refit of each group's scale/min to the calibration "
                        "objective after the sweep (0: the sweep's own; default 1)")
    p.add_argument("--no-awq", action="store_true",
                   help="GPTQ: no activation-aware per-input scaling folded into the norms / up_proj first")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="GPTQ: take every Hessian of a layer from its float inputs, instead of quantizing q/k/v, "
                        "o, gate/up, down in turn, each against the outputs of those already quantized")
    p.add_argument("--tune-steps", type=_int, default=0,
                   help="GPTQ: after each decoder layer is quantized, tune its scales/mins against the whole "
                        "layer's output for this many Adam steps (block-wise output reconstruction, "
                        "quant/blocktune.py; 0: off, the default; 100 measured +8.1 %% -> +7.6 %% perplexity on "
                        "SmolLM2 int4 g128 at 1.8x the quantization time, benchmarks/QUALITY.md)")
    p.add_argument("--tune-samples", type=_int, default=32,
                   help="block tuning: calibration windows it uses (the first ones, a quarter held out for early "
                        "stopping; default 32)")
    p.add_argument("--tune-rounding", action="store_true",
                   help="block tuning: also learn each weight's rounding (AutoRound-style signed gradient "
                        "descent; a code may move one step from GPTQ's)")
    p.add_argument("--tune-target", default="float", choices=("float", "quant"),
                   help="block tuning teacher: the float layer on the float model's inputs (float, default) "
                        "or on the quantized model's inputs (quant)")
    p.add_argument("--tune-lr", type=float, default=None, help="block tuning: Adam learning rate (default 5e-3)")
    p.add_argument("--device", default="auto", help="where to run: auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="compute dtype for GPTQ's forward passes (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_resolve_defaults)


def _resolve_defaults(args: argparse.Namespace) -> int:
    return cmd_quantize(args)
