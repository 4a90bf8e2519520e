"""Experiment: tune a quantized checkpoint's int4 group scales/mins end to end, against the imported model.

GPTQ (quant/gptq.py) and block tuning (quant/blocktune.py) fit one linear, then one decoder layer, at a time.
This tries the next step up (EfficientQAT's "E2E-QP" idea): every group's scale and min in the whole model
learned together, the codes kept, with the loss the one that perplexity measures: the KL divergence from the
imported (float, dequantized GGUF) model's next-token distribution to the quantized model's, on calibration
windows of a text other than the evaluation text. The learnable parametrisation is blocktune's (scale0 *
exp(a), min0 + b * scale0 per group; Adam, linearly decayed learning rate); the model runs in plain fp32 torch
(blocktune.layer_forward per layer), so autograd goes through it. Held-out calibration windows pick the step
kept (early stopping). The tuned values are written back into the checkpoint's packed modules and scored with
the engine's own `score`.

    python benchmarks/quality_e2e.py --ckpt QUANTIZED_DIR [--steps 60] [--lr 1e-4] [--max-tokens 8192]

Prints the held-out KL every --eval-every steps, then one JSON line: perplexity of the imported model, of
the checkpoint as saved and after tuning, on the first --max-tokens tokens of the evaluation text. Nothing is
written to disk. Results and the verdict: benchmarks/QUALITY.md ("End-to-end tuning").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a `vramwise quantize` output directory (int4)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train", type=int, default=48, help="calibration windows stepped on")
    p.add_argument("--held", type=int, default=8, help="calibration windows held out for early stopping")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--calib-text", default="britannica")
    p.add_argument("--text", default="hamlet")
    p.add_argument("--max-tokens", type=int, default=8192)
    args = p.parse_args(argv)

    from vramwise.config import EngineConfig, SchedulerConfig
    from vramwise.engine.llm_engine import LLMEngine
    from vramwise.eval.perplexity import perplexity, reference_text
    from vramwise.quant.blocktune import _Quantized, layer_forward
    from vramwise.quant.cli import calibration_tokens
    from vramwise.quant.linear import QuantLinear
    from vramwise.weights import open_weights

    torch.manual_seed(0)
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048)
    teacher = LLMEngine(EngineConfig(model=None, device="cpu", show_progress=False, scheduler=sched))
    student = LLMEngine(EngineConfig(model=args.ckpt, device="cpu", quantization="native", show_progress=False,
                                     scheduler=sched))
    tok = open_weights(None, show_progress=False).load_tokenizer()
    calib = torch.as_tensor(calibration_tokens(tok, args.calib_text, args.train + args.held, args.seq_len))
    ids = tok.encode(reference_text(args.text), add_special_tokens=False)

    def score(eng: LLMEngine) -> float:
        return perplexity(eng.score, ids, context=1024, max_tokens=args.max_tokens, progress=False).perplexity

    ppl_imported, ppl_before = score(teacher), score(student)

    def forward(model: torch.nn.Module, x_ids: torch.Tensor, weights: list[dict] | None = None) -> torch.Tensor:
        """Logits (b * s, V) in fp32 through blocktune.layer_forward: differentiable in `weights`."""
        b, s = x_ids.shape
        x = model.model.embed_tokens(x_ids.reshape(-1)).float()
        for i, layer in enumerate(model.model.layers):
            x = layer_forward(layer, x, s, None if weights is None else weights[i])
        norm, head = model.model.norm, model.lm_head
        x = F.rms_norm(x, (x.shape[-1],), norm.weight.float(), norm.eps)
        w = head.packed().dequantize(torch.float32) if hasattr(head, "packed") else head.weight.float()
        return F.linear(x, w)

    # one learnable (scale, min) set per quantized linear of each decoder layer (lm_head stays as imported)
    learn = [{n: _Quantized(m.packed(), torch.device("cpu"), rounding=False)
              for n, m in layer.named_modules() if isinstance(m, QuantLinear)} for layer in student.model.model.layers]

    def student_logits(x_ids: torch.Tensor, final: bool = False) -> torch.Tensor:
        return forward(student.model, x_ids, [{n: q.weight(final=final) for n, q in d.items()} for d in learn])

    with torch.no_grad():  # the teacher's log-probs, once per window (bf16: ~50 MB a 512-token window)
        teacher_lp = [F.log_softmax(forward(teacher.model, calib[i : i + 1]), -1).to(torch.bfloat16)
                      for i in range(calib.shape[0])]

    def kl(logits: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        t = t_lp.float()
        return (t.exp() * (t - F.log_softmax(logits, -1))).sum(-1).mean()

    held = range(args.train, args.train + args.held)

    @torch.no_grad()
    def held_kl() -> float:
        return sum(float(kl(student_logits(calib[i : i + 1], final=True), teacher_lp[i])) for i in held) / len(held)

    params = [t for d in learn for q in d.values() for t in q.adam_params()]
    opt = torch.optim.Adam(params, lr=args.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    kl_before = best = held_kl()
    best_state = [t.detach().clone() for t in params]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = int(torch.randint(args.train, (1,), generator=gen))
        loss = kl(student_logits(calib[i : i + 1]), teacher_lp[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            h = held_kl()
            print(f"step {step + 1}: held-out KL {h:.5f} (before {kl_before:.5f})", flush=True)
            if h < best:
                best, best_state = h, [t.detach().clone() for t in params]
    tune_s = time.perf_counter() - t0
    with torch.no_grad():
        for t, b in zip(params, best_state):
            t.copy_(b)
        for layer, d in zip(student.model.model.layers, learn):
            for n, q in d.items():
                mod, pw = layer.get_submodule(n), q.pack()
                mod.qweight.copy_(pw.qweight)
                mod.scales.copy_(pw.scales)
                if pw.mins is not None:
                    mod.mins.copy_(pw.mins)
    ppl_after = score(student)
    print(json.dumps({
        "ppl_imported": round(ppl_imported, 4), "ppl_before": round(ppl_before, 4), "ppl_after": round(ppl_after, 4),
        "before_vs_imported_pct": round((ppl_before / ppl_imported - 1) * 100, 2),
        "after_vs_imported_pct": round((ppl_after / ppl_imported - 1) * 100, 2),
        "held_kl_before": round(kl_before, 5), "held_kl_after": round(best, 5), "tune_s": round(tune_s, 1),
        "steps": args.steps, "lr": args.lr, "tokens": args.max_tokens,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
