"""Ablations of int4 quantization on the bundled SmolLM2: one float model in memory, many variants.

    python benchmarks/quality_ablate.py --variants rtn,gptq --max-tokens 8192

Each variant restores the imported (dequantized) weights, quantizes them in place (the layers keep float
nn.Linear modules holding the dequantized quantized values: the same numbers the packed kernels multiply by)
and scores the evaluation text with the engine's own `score`. Faster than benchmarks/quality.py, which goes
through `vramwise quantize` and a checkpoint per row; the headline table comes from that script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="rtn,gptq", help="comma-separated keys of VARIANTS (see below)")
    p.add_argument("--text", default="hamlet")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--calib-text", default="britannica")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--ref", type=float, default=None, help="the imported model's perplexity, if known")
    p.add_argument("--json", default=None, help="append one JSON line per variant here")
    p.add_argument("--progress", action="store_true", help="GPTQ's per-layer progress bar")
    args = p.parse_args(argv)

    from vramwise.config import EngineConfig, SchedulerConfig
    from vramwise.engine.llm_engine import LLMEngine
    from vramwise.eval.perplexity import perplexity, reference_text
    from vramwise.model_loader import spec_for_layer
    from vramwise.quant.blocktune import TuneConfig
    from vramwise.quant.cli import calibration_tokens
    from vramwise.quant.formats import QuantSpec
    from vramwise.quant.gptq import GPTQConfig, quantize_model_gptq
    from vramwise.quant.rtn import dequantize, quantize_rtn
    from vramwise.weights import open_weights

    eng = LLMEngine(EngineConfig(model=None, device="cpu", show_progress=False, scheduler=SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=args.context, max_model_len=max(args.context, 2048))))
    model = eng.model  # the engine's layout: q/k/v fused into qkv_proj, gate/up into gate_up_proj
    tok = open_weights(None, show_progress=False).load_tokenizer()
    ids = tok.encode(reference_text(args.text), add_special_tokens=False)
    calib = calibration_tokens(tok, args.calib_text, args.calib_samples, args.calib_seq_len)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = QuantSpec.int4(128)

    def spec_for(name: str, lin: torch.nn.Linear, only: str | None = None):
        if only is not None and not any(name.endswith("." + o) for o in only.split("+")):
            return None
        return spec_for_layer(base, name, lin.out_features, lin.in_features, True)

    def restore() -> None:
        model.load_state_dict(saved)

    def rtn(only: str | None = None) -> None:
        for n, lin in linears.items():
            s = spec_for(n, lin, only)
            if s is not None:
                lin.weight.data.copy_(dequantize(quantize_rtn(lin.weight.data, s), lin.weight.dtype))

    def gptq(only: str | None = None, **kw) -> None:
        tune = {k[len("tune_"):]: v for k, v in kw.items() if k.startswith("tune_")}
        kw = {k: v for k, v in kw.items() if not k.startswith("tune_")}
        if tune:
            kw["tune"] = TuneConfig(**tune)
        quantize_model_gptq(model, calib, lambda n, m: spec_for(n, m, only), lambda *a: None, GPTQConfig(**kw),
                            progress=args.progress)

    variants = {
        "imported": lambda: None,
        "rtn": rtn,
        "gptq": gptq,
        "gptq-noclip": lambda: gptq(clip_search=False),
        "gptq-natural": lambda: gptq(act_order=False),
        # Block-wise output reconstruction after each layer (quant/blocktune.py), TuneConfig's defaults:
        "gptq-tune": lambda: gptq(tune_steps=100),  # scale/min only (OmniQuant-style)
        "gptq-tune-round": lambda: gptq(tune_steps=100, tune_rounding=True),  # + rounding offsets (AutoRound)
    }
    for m in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        variants[f"rtn-only-{m}"] = lambda m=m: rtn(m)
        variants[f"gptq-only-{m}"] = lambda m=m: gptq(m)
    for d in ("0.001", "0.003", "0.03", "0.1"):
        variants[f"gptq-damp{d}"] = lambda d=d: gptq(damp=float(d))

    def variant(key: str):
        """A key of `variants`, or gptq/FIELD=VALUE/... with GPTQConfig fields (ints; damp a float) and
        TuneConfig fields prefixed tune_ (tune_steps=100/tune_rounding=1/tune_target=quant/tune_lr=0.01 ...;
        any tune_ field turns block tuning on). Plain `gptq` is GPTQConfig's defaults (AWQ, true-sequential,
        one refit, no block tuning)."""
        if key in variants:
            return variants[key]
        name, *kvs = key.split("/")
        if name != "gptq":
            raise SystemExit(f"unknown variant {key!r}")

        def value(k: str, v: str):
            if k in ("damp", "tune_lr", "tune_round_lr"):
                return float(v)
            return v if k == "tune_target" else int(v)

        kw = {k: value(k, v) for k, v in (kv.split("=") for kv in kvs)}
        return lambda: gptq(**kw)

    ref = args.ref
    for key in args.variants.split(","):
        restore()
        t0 = time.perf_counter()
        variant(key)()
        tq = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = perplexity(eng.score, ids, context=args.context, max_tokens=args.max_tokens, progress=False)
        te = time.perf_counter() - t0
        if key == "imported":
            ref = res.perplexity
        folded = sum(not torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k.endswith("norm.weight"))
        row = {"variant": key, "norms_changed": folded, "ppl": round(res.perplexity, 4), "quant_s": round(tq, 1), "eval_s": round(te, 1),
               "windows": res.windows}
        if ref:
            row["vs_imported_pct"] = round((res.perplexity / ref - 1) * 100, 2)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
