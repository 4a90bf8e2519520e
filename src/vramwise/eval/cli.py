"""`vramwise eval perplexity [MODEL] --text FILE [--context 1024] [--max-tokens 32768]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vramwise.argtypes import positive_int


def read_text_arg(text: str) -> str:
    """--text: a file path, or the name of a reference text (hamlet, britannica, devil, ...; downloaded once)."""
    from vramwise.eval.perplexity import TEXTS, reference_text

    path = Path(text).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise FileNotFoundError(f"cannot read --text {path}: {e.strerror or e}") from e
    if text in TEXTS:
        return reference_text(text)
    raise FileNotFoundError(f"--text {text!r}: no such file (or use a reference text name: {', '.join(TEXTS)})")


def cmd_perplexity(args: argparse.Namespace) -> int:
    from vramwise.cli import make_llm
    from vramwise.eval.perplexity import perplexity

    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            raise ValueError(f"two models given: {args.model_pos!r} and --model {args.model!r}")
        args.model = args.model_pos
    if args.context < 2:
        raise ValueError(f"--context must be at least 2 tokens, got {args.context}")
    text = read_text_arg(args.text)
    args.max_model_len = max(args.max_model_len, args.context)
    args.max_num_batched_tokens = max(args.max_num_batched_tokens, args.context)  # one window per forward
    llm = make_llm(args, show_progress=not args.quiet)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    t0 = time.perf_counter()
    res = perplexity(llm.engine.score, ids, context=args.context, max_tokens=args.max_tokens,
                     progress=not args.quiet)
    dt = time.perf_counter() - t0
    print(f"model: {llm.engine.source.path}")
    print(f"text: {args.text} ({len(ids)} tokens, first {min(len(ids), args.max_tokens or len(ids))} used)")
    print(f"windows: {res.windows}")
    print(f"tokens: {res.tokens}")
    print(f"context: {res.context}")
    print(f"perplexity: {res.perplexity:.4f}")
    print(f"time: {dt:.1f} s ({res.windows * res.context / max(dt, 1e-9):.0f} tokens/s)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from vramwise.cli import add_engine_args

    ev = subparsers.add_parser("eval", help="quality evaluation (perplexity)")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("perplexity", help="perplexity over non-overlapping windows of a text",
                       description="Cuts the text's tokens into non-overlapping windows of --context tokens, scores "
                                   "each from an empty context and prints the window count, scored token count "
                                   "(windows x (context - 1)) and the perplexity.")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, .gguf file, quantized checkpoint or hub id (default: bundled SmolLM2)")
    p.add_argument("--text", required=True, help="text file, or a reference text name (hamlet, britannica, devil)")
    p.add_argument("--context", type=positive_int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--max-tokens", type=positive_int, default=32768, help="use the first N tokens (default: 32768)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(p)
    p.set_defaults(func=cmd_perplexity)
