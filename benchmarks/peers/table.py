#!/usr/bin/env python3
"""Side-by-side table of ours and the peers, from the files side_by_side.sh leaves in $OUT/peers.

Two subcommands (stdlib only, so it runs anywhere python3 does):
  table.py record DIR --step S --engine E --format F --shape 13b [--cap-mib 6144] --batch 1 --prompt-len 512
           --gen-len 128 [--setup TEXT] [--result FILE] [--rc N] [--peak-mib P] [--idle-mib I] [--wall-s W]
           [--note TEXT] [--skipped]
      writes DIR/S.step.json: which scenario a run belongs to, its exit status, the device-wide NVML peak the
      script's poller saw, and the file holding the tool's own output (parsed here, not in the shell).
  table.py [show] DIR [DIR ...] [--headline] [--commit C] [--plot FILE.png]
      prints one markdown table: each scenario's rows with TTFT, prefill and decode tokens/s, peak NVML MiB
      and the ratios ours/peer. Several DIRs (part 1 and part 2 of a cold run) merge by step; for a step seen
      twice, a run beats a skip, then the later run wins. `vramwise bench --json DIR/` reports lying in DIR
      without a step record are read too (their scenario comes from their own settings).

Output formats understood (--format): llama-bench (`-o jsonl`), llama-batched-bench (`--output-format jsonl`),
hf-peers (hf_peers.py), vramwise (`vramwise bench --json`).
Figures, for every engine alike (B sequences of P prompt tokens, G generated):
  prefill tok/s = B*P / time until every sequence has its first token;  TTFT ms = B*P / prefill tok/s
  decode tok/s  = generated tokens per second after the prompts, summed over the sequences
  (llama-bench: pp and tg tests; its tg test decodes from an empty context, the others after the prompt.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("llama-bench", "llama-batched-bench", "hf-peers", "vramwise")
SHAPES = {"7b": "Llama-2-7B", "13b": "Llama-2-13B"}
OURS = "vramwise"
STEP_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------------------------- records
def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _step(text: str) -> str:
    if not STEP_RE.match(text):
        raise argparse.ArgumentTypeError(f"step name {text!r}: use letters, digits, '_', '.', '-' only")
    return text


def _float_or_none(text: str) -> float | None:
    try:  # the poller may have seen nothing, or nvidia-smi may print "[N/A]": no figure, not an error
        return float(text)
    except ValueError:
        return None


def add_record_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="write DIR/STEP.step.json for one run")
    p.add_argument("dir")
    p.add_argument("--step", required=True, type=_step)
    p.add_argument("--engine", required=True, help="e.g. vramwise, llama.cpp, transformers+accelerate, bitsandbytes")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--cap-mib", type=_non_negative, default=0, help="the scenario's GPU cap (0 = uncapped)")
    p.add_argument("--batch", required=True, type=_positive)
    p.add_argument("--prompt-len", required=True, type=_positive)
    p.add_argument("--gen-len", required=True, type=_positive)
    p.add_argument("--setup", default="", help="how the engine was set up (shown in the table)")
    p.add_argument("--result", default=None, help="the tool's own output, a file name inside DIR")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--peak-mib", type=_float_or_none, default=None, help="device-wide NVML peak seen by the poller")
    p.add_argument("--idle-mib", type=_float_or_none, default=None, help="device-wide NVML used before the run")
    p.add_argument("--wall-s", type=_float_or_none, default=None)
    p.add_argument("--note", default="", help="e.g. the last line of stderr of a failed run")
    p.add_argument("--skipped", action="store_true", help="not run (--note says why; default: time ran out)")


def write_record(a: argparse.Namespace) -> str:
    os.makedirs(a.dir, exist_ok=True)
    rec = {
        "format": "sbs-step", "step": a.step, "engine": a.engine, "result_format": a.fmt, "shape": a.shape,
        "cap_mib": a.cap_mib or None, "batch": a.batch, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
        "setup": a.setup, "result": a.result, "rc": a.rc, "peak_mib": a.peak_mib, "idle_mib": a.idle_mib,
        "wall_s": a.wall_s, "note": a.note.strip()[:300], "skipped": a.skipped, "finished": time.time(),
    }
    path = os.path.join(a.dir, f"{a.step}.step.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------ parsing
class ParseError(ValueError):
    pass


def _jsonl(path: str) -> list[dict[str, Any]]:
    """JSON objects of a file that may interleave log lines (llama.cpp prints to the same stream)."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def parse_llama_bench(path: str, batch: int) -> dict[str, Any]:
    """llama-bench -o jsonl: one object per test; pp has n_gen 0, tg has n_prompt 0; avg_ts is tokens/s."""
    pp = tg = None
    for d in _jsonl(path):
        if "avg_ts" not in d:
            continue
        if d.get("n_gen") == 0 and d.get("n_prompt", 0) > 0:
            pp = d
        elif d.get("n_prompt") == 0 and d.get("n_gen", 0) > 0:
            tg = d
    if pp is None and tg is None:
        raise ParseError(f"{path}: no llama-bench test results")
    out: dict[str, Any] = {"prefill_tok_s": pp["avg_ts"] if pp else None, "decode_tok_s": tg["avg_ts"] if tg else None}
    d = pp or tg
    out["detail"] = f"-ngl {d.get('n_gpu_layers')}"
    return out


def parse_batched_bench(path: str, batch: int) -> dict[str, Any]:
    """llama-batched-bench --output-format jsonl: one object per -npl value; speed_pp/speed_tg aggregate."""
    rows = [d for d in _jsonl(path) if "speed_tg" in d]
    match = [d for d in rows if d.get("pl") == batch]
    if not match:
        raise ParseError(f"{path}: no llama-batched-bench result for {batch} sequences (have {[d.get('pl') for d in rows]})")
    d = match[-1]
    return {"prefill_tok_s": d["speed_pp"], "decode_tok_s": d["speed_tg"], "detail": f"-ngl {d.get('n_gpu_layers')}"}


def parse_hf(path: str, batch: int) -> dict[str, Any]:
    with open(path) as f:
        d = json.load(f)
    out: dict[str, Any] = {"status": d.get("status", "error"), "own_peak_mib": d.get("nvml_peak_mib"),
                           "versions": {k: d[k] for k in ("transformers", "accelerate", "bitsandbytes") if k in d}}
    if out["status"] != "ok":
        what = {"oom-load": "out of memory while loading", "oom-generate": "out of memory while generating"}
        extra = f" ({d['layers_quantized']} of the layers quantized)" if "layers_quantized" in d and out["status"] == "oom-load" else ""
        out["status"] = what.get(out["status"], f"error: {d.get('error', '?')}") + extra
        return out
    out.update(prefill_tok_s=d.get("prefill_tok_s"), decode_tok_s=d.get("decode_tok_s"))
    if d.get("gpu_layers") is not None:
        out["detail"] = f"{d['gpu_layers']} layers on GPU, {d['cpu_layers']} on CPU"
    return out


def parse_vramwise(path: str, batch: int) -> dict[str, Any]:
    with open(path) as f:
        d = json.load(f)
    match = [r for r in d.get("results", []) if r.get("batch") == batch]
    if not match:
        raise ParseError(f"{path}: no batch {batch} in the report (have {[r.get('batch') for r in d.get('results', [])]})")
    r = match[-1]
    peaks = [p for p in (d.get("nvml_peak_mib"), r.get("nvml_peak_mib")) if p is not None]
    return {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
            "own_peak_mib": max(peaks) if peaks else None, "detail": f"placement {d.get('placement', '?')}",
            "commit": d.get("commit")}


PARSERS = {"llama-bench": parse_llama_bench, "llama-batched-bench": parse_batched_bench, "hf-peers": parse_hf,
           "vramwise": parse_vramwise}


# --------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True, order=True)
class Scenario:
    """What is compared. The generated length is not part of it: decode tok/s is a steady rate, and a peer
    as slow as accelerate offload (0.3 tok/s) is timed over a few tokens only (its row says so)."""

    shape: str
    cap_mib: int  # 0 = uncapped
    batch: int
    prompt_len: int

    def label(self, gen_len: int | None = None) -> str:
        cap = f"{self.cap_mib / 1024:g} GiB cap" if self.cap_mib else "uncapped"
        seqs = "batch 1" if self.batch == 1 else f"{self.batch} sequences"
        gen = f" + {gen_len}" if gen_len else ""
        return f"{SHAPES.get(self.shape, self.shape)}, {cap}, {seqs}, {self.prompt_len}{gen}"


@dataclass
class Row:
    scenario: Scenario
    engine: str
    setup: str
    gen_len: int = 0
    status: str = "ok"
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_mib: float | None = None
    step: str = ""
    finished: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def over_cap(self) -> bool:
        return bool(self.scenario.cap_mib and self.peak_mib is not None and self.peak_mib > self.scenario.cap_mib)


def row_from_record(rec: dict[str, Any], folder: str) -> Row:
    sc = Scenario(rec["shape"], rec.get("cap_mib") or 0, rec["batch"], rec["prompt_len"])
    row = Row(sc, rec["engine"], rec.get("setup", ""), gen_len=rec["gen_len"], step=rec["step"],
              finished=rec.get("finished", 0.0), peak_mib=rec.get("peak_mib"))
    if rec.get("skipped"):
        row.status = f"not run ({rec.get('note') or 'time'})"
        return row
    res = os.path.join(folder, rec["result"]) if rec.get("result") else None
    rc = rec.get("rc", 0)
    if res and os.path.isfile(res) and os.path.getsize(res) > 0:
        try:
            parsed: dict[str, Any] = PARSERS[rec["result_format"]](res, sc.batch)
        except (ParseError, KeyError, TypeError, json.JSONDecodeError) as e:
            parsed = {"status": f"unreadable output: {e}"[:200]}
    else:
        parsed = {"status": f"failed (exit {rc})" if rc else "no output"}
    # a crash after some output (e.g. llama-bench's pp test done, tg not): no decode figure means failed
    if rc != 0 and parsed.get("status", "ok") == "ok" and parsed.get("decode_tok_s") is None:
        parsed["status"] = f"failed (exit {rc})"
    row.status = parsed.get("status", "ok")
    if not row.ok and rec.get("note") and "failed" in row.status:
        row.status += f": {rec['note']}"
    row.prefill_tok_s = parsed.get("prefill_tok_s")
    row.decode_tok_s = parsed.get("decode_tok_s")
    if row.prefill_tok_s:
        row.ttft_ms = 1000.0 * sc.batch * sc.prompt_len / row.prefill_tok_s
    peaks = [p for p in (rec.get("peak_mib"), parsed.get("own_peak_mib")) if p is not None]
    row.peak_mib = max(peaks) if peaks else None
    if parsed.get("detail") and parsed["detail"] not in row.setup:
        row.info["detail"] = parsed["detail"]
    for k in ("versions", "commit"):
        if parsed.get(k):
            row.info[k] = parsed[k]
    return row


def _shape_of_model(text: str) -> str | None:
    m = re.search(r"llama-2-(7b|13b)", text.lower())
    return m.group(1) if m else None


def _mib_of(value: Any) -> int:
    """A --gpu-memory setting as MiB: bytes (int) or a size string such as 6GiB / 6144MiB / 6.5G."""
    if value in (None, "", 0):
        return 0
    if isinstance(value, (int, float)):
        return round(value / 2**20)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(value), re.I)
    if not m:
        raise ParseError(f"unreadable GPU memory size {value!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return round(float(m.group(1)) * scale / 2**20)


def rows_from_standalone(path: str) -> list[Row]:
    """A `vramwise bench --json` report without a step record: one row per batch size of a known shape."""
    with open(path) as f:
        d = json.load(f)
    settings = d.get("settings") or {}
    shape = _shape_of_model(str(settings.get("random_weights") or d.get("model", "")))
    if shape is None:
        return []
    cap = _mib_of(settings.get("gpu_memory"))
    quant = settings.get("quantization") or "default"
    rows = []
    for r in d.get("results", []):
        rec = {"step": os.path.basename(path)[:-5], "engine": OURS, "result_format": "vramwise", "shape": shape,
               "cap_mib": cap, "batch": r["batch"], "prompt_len": r["prompt_len"], "gen_len": r["gen_len"],
               "setup": f"{quant}", "result": os.path.basename(path), "rc": 0,
               "finished": os.path.getmtime(path)}
        rows.append(row_from_record(rec, os.path.dirname(path)))
    return rows


def _is_vramwise_report(d: Any) -> bool:
    return isinstance(d, dict) and "results" in d and "planner_prediction" in d


def load_rows(dirs: list[str]) -> tuple[list[Row], dict[str, str]]:
    by_step: dict[str, Row] = {}
    env: dict[str, str] = {}
    for folder in dirs:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such directory (pass the peers/ folder of a side_by_side.sh run)")
        env_path = os.path.join(folder, "env.txt")
        if os.path.isfile(env_path):
            with open(env_path) as f:
                for line in f:
                    if "=" in line:
                        k, v = line.rstrip("\n").split("=", 1)
                        env[k.strip()] = v.strip()
        referenced = set()
        candidates: list[Row] = []
        for path in sorted(glob.glob(os.path.join(folder, "*.step.json"))):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("result"):
                referenced.add(rec["result"])
            candidates.append(row_from_record(rec, folder))
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            if path.endswith(".step.json") or os.path.basename(path) in referenced:
                continue
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if _is_vramwise_report(d):
                candidates += rows_from_standalone(path)
        for row in candidates:
            key = f"{row.step}@{row.scenario}"
            old = by_step.get(key)
            ran, old_ran = not row.status.startswith("not run"), old is not None and not old.status.startswith("not run")
            if old is None or (ran and not old_ran) or (ran == old_ran and row.finished >= old.finished):
                by_step[key] = row
    return list(by_step.values()), env


# ------------------------------------------------------------------------------------------------- render
def _cell(text: str) -> str:
    """Table cells must not contain '|' or line breaks (they would split the markdown row)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _f(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _rate(v: float | None) -> str:
    """tokens/s: two decimals below 10 (accelerate offload runs at ~0.3), one above."""
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:,.1f}")


def _ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "—"
    return f"{ours / peer:.2f}x"


def ours_row(rows: list[Row]) -> Row | None:
    mine = [r for r in rows if r.engine == OURS and r.ok]
    # the default configuration is the reference; an --enforce-eager row, or an int8-KV variant of a batch-1
    # step (its peers keep f16 KV), is an ablation beside it
    return max(mine, key=lambda r: ("--enforce-eager" not in (r.setup or ""), not r.step.endswith("_kv8"),
                                    r.finished)) if mine else None


def render_table(rows: list[Row]) -> str:
    head = ("| scenario | engine | setup | TTFT ms | prefill tok/s | decode tok/s | peak MiB (NVML) | "
            "decode ours/peer | prefill ours/peer | peak MiB ours/peer |")
    out = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sc in sorted({r.scenario for r in rows}, key=lambda s: (s.cap_mib == 0, s.shape != "13b", s.shape, s.batch)):
        group = [r for r in rows if r.scenario == sc]
        group.sort(key=lambda r: (r.engine != OURS, r.engine, r.step))
        ours = ours_row(group)
        label = sc.label(max(r.gen_len for r in group))
        for r in group:
            setup = _cell(r.setup + (f" ({r.info['detail']})" if r.info.get("detail") else ""))
            if not r.ok:
                out.append(f"| {label} | {r.engine} | {setup} | {_cell(r.status)} | | | {_f(r.peak_mib, 0)} | | | |")
                continue
            peak = _f(r.peak_mib, 0) + (" **over cap**" if r.over_cap else "")
            is_ref = ours is not None and r is ours
            ratios = ["—"] * 3 if (ours is None or is_ref or r.engine == OURS) else [
                _ratio(ours.decode_tok_s, r.decode_tok_s), _ratio(ours.prefill_tok_s, r.prefill_tok_s),
                _ratio(ours.peak_mib, r.peak_mib)]
            out.append(f"| {label} | {r.engine} | {setup} | {_f(r.ttft_ms)} | {_f(r.prefill_tok_s, 0)} | "
                       f"{_rate(r.decode_tok_s)} | {peak} | {' | '.join(ratios)} |")
    return "\n".join(out)


def render_headline(rows: list[Row]) -> str:
    """Per scenario: ours against the fastest peer run that stayed within the scenario's cap."""
    out = ["| scenario | ours decode tok/s | ours peak MiB | best peer (within cap) | peer decode tok/s | peer peak MiB | decode ours/peer |",
           "|---|---:|---:|---|---:|---:|---:|"]
    for sc in sorted({r.scenario for r in rows}, key=lambda s: (s.cap_mib == 0, s.shape != "13b", s.shape, s.batch)):
        group = [r for r in rows if r.scenario == sc]
        ours = ours_row(group)
        label = sc.label(max(r.gen_len for r in group))
        peers = [r for r in group if r.engine != OURS and r.ok and r.decode_tok_s and not r.over_cap]
        best = max(peers, key=lambda r: r.decode_tok_s or 0) if peers else None
        o_dec = _rate(ours.decode_tok_s) if ours else "not measured"
        o_pk = _f(ours.peak_mib, 0) if ours else "—"
        b_name = _cell(f"{best.engine} {best.setup}".strip()) if best else "none fits"
        out.append(f"| {label} | {o_dec} | {o_pk} | {b_name} | {_rate(best.decode_tok_s) if best else '—'} | "
                   f"{_f(best.peak_mib, 0) if best else '—'} | "
                   f"{_ratio(ours.decode_tok_s if ours else None, best.decode_tok_s if best else None)} |")
    return "\n".join(out)


def render_header(env: dict[str, str], rows: list[Row], commit: str | None) -> str:
    commits = sorted({r.info["commit"] for r in rows if r.info.get("commit") and r.info["commit"] != "unknown"})
    commit = commit or env.get("commit") or (", ".join(commits) if commits else "unknown")
    versions: dict[str, str] = {}
    for r in rows:
        versions.update(r.info.get("versions", {}))
    peers = [env["peers"]] if env.get("peers") else []
    peers += [f"{k} {v}" for k, v in sorted(versions.items())]
    lines = [
        f"Card: {env.get('gpu', 'unknown')} (driver {env.get('driver', '?')}), host {env.get('cpus', '?')} cores; "
        f"date {env.get('date', '?')}; commit {commit}; torch {env.get('torch', '?')}.",
        f"Peers: {'; '.join(peers) if peers else 'versions not recorded'}.",
        f"GPU cap {env.get('cap_mib', '6144')} MiB; peak = max of a device-wide NVML poller (50 ms) around each "
        "process and the tool's own NVML reading, CUDA context included. Ratios are ours / peer (above 1: ours "
        "is faster / uses more memory).",
    ]
    return "\n".join(lines)


def write_plot(rows: list[Row], path: str, env: dict[str, str]) -> None:
    """Decode tokens/s of each successful run, one panel per scenario, log scale (0.3 to ~1000 tok/s);
    each bar labelled with its peak MiB. Needs matplotlib (only this option does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r.scenario for r in rows if r.ok and r.decode_tok_s},
                       key=lambda s: (s.cap_mib == 0, s.shape != "13b", s.shape, s.batch))
    if not scenarios:
        raise ValueError("nothing to plot: no run with a decode figure")
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(8, 1.2 + 0.45 * len(rows)), squeeze=False)
    for ax, sc in zip(axes[:, 0], scenarios):
        group = sorted((r for r in rows if r.scenario == sc and r.ok and r.decode_tok_s),
                       key=lambda r: (r.engine != OURS, r.engine, r.step))
        names = [f"{r.engine}: {r.setup.split(' (')[0][:38]}" for r in group]
        vals = [r.decode_tok_s for r in group]
        colors = ["tab:green" if r.engine == OURS else ("tab:red" if r.over_cap else "tab:gray") for r in group]
        ax.barh(names, vals, color=colors)
        for i, r in enumerate(group):
            ax.text(vals[i], i, f" {_rate(vals[i])} tok/s, {_f(r.peak_mib, 0)} MiB", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(min(vals) / 2, max(vals) * 8)  # room for the labels right of the bars
        ax.invert_yaxis()
        ax.set_title(sc.label(max(r.gen_len for r in group)), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[-1, 0].set_xlabel(f"decode tokens/s (log), {env.get('gpu', 'GPU')}; red: peak over the cap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show(a: argparse.Namespace) -> int:
    rows, env = load_rows(a.dirs)
    if not rows:
        print(f"no results in {', '.join(a.dirs)}", file=sys.stderr)
        return 1
    print(render_header(env, rows, a.commit))
    print()
    print(render_headline(rows) if a.headline else render_table(rows))
    if a.plot:
        try:
            write_plot(rows, a.plot, env)
        except ImportError:
            print("table.py: --plot needs matplotlib (pip install matplotlib); the table above is complete", file=sys.stderr)
            return 1
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="table.py", description="side-by-side table of ours and the peers")
    sub = ap.add_subparsers(dest="cmd")
    add_record_parser(sub)
    s = sub.add_parser("show", help="print the markdown table (default)")
    s.add_argument("dirs", nargs="+", help="peers/ folders written by side_by_side.sh (part 1, part 2, ...)")
    s.add_argument("--headline", action="store_true", help="one line per scenario: ours vs the best peer within the cap")
    s.add_argument("--commit", default=None, help="commit to name in the header (the device copy has no .git)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of decode tok/s (needs matplotlib)")
    if not argv or argv[0] not in ("record", "show", "-h", "--help"):
        argv = ["show", *argv]
    a = ap.parse_args(argv)
    if a.cmd == "record":
        print(write_record(a))
        return 0
    try:
        return show(a)
    except (FileNotFoundError, json.JSONDecodeError, ValueError) as e:
        print(f"table.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
