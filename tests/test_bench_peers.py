"""benchmarks/peers: table.py (records, parsing of each peer's output, merging, ratios), the argument handling
of table.py / hf_peers.py / side_by_side.sh, and `vramwise bench --json DIR/`. No GPU: the peers' outputs are
fixtures in tests/data/peers (shaped like the real tools' output), and side_by_side.sh runs against fake
nvidia-smi / llama.cpp tools that report a memory peak growing with -ngl."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vramwise.bench.offline import BatchResult, BenchReport, default_json_name

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
DATA = Path(__file__).parent / "data" / "peers"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


table = _load("table")


def ours_report(batch: int, prompt: int, decode: float, prefill: float, peak: float, gpu_memory=None) -> dict:
    r = BatchResult(batch=batch, prompt_len=prompt, gen_len=128, ttft_ms=100.0, prefill_tok_s=prefill,
                    decode_tok_s=decode, decode_tok_s_per_seq=decode / batch, total_s=5.0, throughput_tok_s=decode,
                    nvml_peak_mib=peak - 10, torch_max_allocated_mib=peak - 500)
    rep = BenchReport(model="llama-2-13b (random weights)", device="cuda: NVIDIA H100 80GB HBM3", dtype="float16",
                      date="2026-11-26 00:00 UTC", commit="abc1234", torch_version="2.11.0", host="h", placement="r30,s10",
                      planner_prediction=None, load_s=10.0, nvml_available=True, nvml_per_process=True,
                      nvml_peak_load_mib=peak - 100, nvml_peak_mib=peak, torch_max_allocated_mib=peak - 500,
                      torch_max_reserved_mib=peak - 400, results=[r],
                      settings={"random_weights": "llama-2-13b", "quantization": "int4", "gpu_memory": gpu_memory})
    return rep.to_dict()


def record(d: Path, step: str, engine: str, fmt: str, shape: str, cap: int, batch: int, prompt: int, gen: int,
           result: str | None, rc: int = 0, peak: float | None = None, extra: list[str] = ()) -> None:
    argv = ["record", str(d), "--step", step, "--engine", engine, "--format", fmt, "--shape", shape, "--cap-mib",
            str(cap), "--batch", str(batch), "--prompt-len", str(prompt), "--gen-len", str(gen), "--rc", str(rc),
            "--setup", f"setup of {step}", *extra]
    if result:
        argv += ["--result", result]
    if peak is not None:
        argv += ["--peak-mib", str(peak)]
    assert table.main(argv) == 0
    assert (d / f"{step}.step.json").is_file()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "peers"
    d.mkdir()
    for f in DATA.iterdir():
        shutil.copy(f, d / f.name)
    (d / "ours_cap_13b_b1.json").write_text(json.dumps(ours_report(1, 512, decode=39.15, prefill=2828.7, peak=5900)))
    (d / "ours_cap_13b_b16.json").write_text(json.dumps(ours_report(16, 256, decode=52.0, prefill=1388.0, peak=6000)))
    (d / "env.txt").write_text("gpu=NVIDIA H100 80GB HBM3\ndriver=580.1\ncpus=16\ndate=2026-11-26 00:10 UTC\n"
                               "commit=unknown\ntorch=2.11.0+cu130\ncap_mib=6144\n")
    record(d, "ours_cap_13b_b1", "vramwise", "vramwise", "13b", 6144, 1, 512, 128, "ours_cap_13b_b1.json", peak=5950)
    record(d, "ours_cap_13b_b16", "vramwise", "vramwise", "13b", 6144, 16, 256, 128, "ours_cap_13b_b16.json", peak=5990)
    record(d, "llama_cap_13b_b1", "llama.cpp", "llama-bench", "13b", 6144, 1, 512, 128, "llama_cap_13b_b1.out", peak=6097)
    record(d, "llama_cap_13b_b16", "llama.cpp", "llama-batched-bench", "13b", 6144, 16, 256, 128,
           "llama_cap_13b_b16.out", peak=5919)
    record(d, "hf_offload_13b_cap", "transformers+accelerate", "hf-peers", "13b", 6144, 1, 512, 6,
           "hf_offload_13b_cap.json", peak=5580)
    record(d, "bnb_nf4_13b_cap", "bitsandbytes", "hf-peers", "13b", 6144, 1, 512, 128, "bnb_nf4_13b_cap.json",
           rc=1, peak=6140)
    record(d, "llama_ref_7b_b1", "llama.cpp", "llama-bench", "7b", 0, 1, 512, 128, "llama_ref_7b_b1.out", peak=4531)
    return d


def test_table_parses_every_format_and_prints_ratios(run_dir: Path, capsys):
    rows, env = table.load_rows([str(run_dir)])
    by = {r.step: r for r in rows}
    # llama-bench: pp and tg tests; TTFT from the prefill rate (512 / 1414.36 tok/s)
    assert by["llama_cap_13b_b1"].decode_tok_s == 26.1 and by["llama_cap_13b_b1"].prefill_tok_s == 1414.36
    assert by["llama_cap_13b_b1"].ttft_ms == pytest.approx(1000 * 512 / 1414.36)
    # llama-batched-bench: the -npl 16 object among log lines
    assert by["llama_cap_13b_b16"].decode_tok_s == 26.0 and by["llama_cap_13b_b16"].prefill_tok_s == 694.0
    # hf-peers: the tool's own NVML peak (5599) beats the poller's (5580)
    assert by["hf_offload_13b_cap"].peak_mib == 5599 and by["hf_offload_13b_cap"].decode_tok_s == 0.31
    assert by["bnb_nf4_13b_cap"].status == "out of memory while loading (31 of the layers quantized)"
    # ours: the report's whole-run peak (5900) against the poller's 5950
    assert by["ours_cap_13b_b1"].peak_mib == 5950 and by["ours_cap_13b_b1"].decode_tok_s == 39.15
    assert env["gpu"] == "NVIDIA H100 80GB HBM3"

    assert table.main([str(run_dir), "--commit", "f00ba44"]) == 0
    out = capsys.readouterr().out
    assert "commit f00ba44" in out and "transformers 4.99.0" in out and "bitsandbytes 0.50.2" in out
    line = next(x for x in out.splitlines() if "setup of llama_cap_13b_b1" in x)
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[0] == "Llama-2-13B, 6 GiB cap, batch 1, 512 + 128"
    assert cells[7] == f"{39.15 / 26.1:.2f}x"  # decode ours/peer
    assert cells[8] == f"{2828.7 / 1414.36:.2f}x"  # prefill ours/peer
    assert cells[9] == f"{5950 / 6097:.2f}x"  # peak ours/peer
    b16 = next(x for x in out.splitlines() if "setup of llama_cap_13b_b16" in x)
    assert f"{52.0 / 26.0:.2f}x" in b16
    # the 7B scenario has no ours row: figures without ratios
    r7 = next(x for x in out.splitlines() if "setup of llama_ref_7b_b1" in x)
    assert "334.1" in r7 and "x |" not in r7


def test_plot_is_a_png(run_dir: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sbs.png"
    assert table.main([str(run_dir), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headline_takes_the_fastest_peer_within_the_cap(run_dir: Path, capsys):
    fast = run_dir / "fast_but_over.out"
    fast.write_text((DATA / "llama_cap_13b_b1.out").read_text().replace('"avg_ts": 26.1', '"avg_ts": 99.0'))
    record(run_dir, "llama_over", "llama.cpp", "llama-bench", "13b", 6144, 1, 512, 128, fast.name, peak=6500)
    rows, _ = table.load_rows([str(run_dir)])
    assert next(r for r in rows if r.step == "llama_over").over_cap
    assert table.main([str(run_dir), "--headline"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "6 GiB cap, batch 1" in x)
    assert "setup of llama_cap_13b_b1" in line and f"{39.15 / 26.1:.2f}x" in line  # not the 99 tok/s run over the cap


def test_a_run_beats_a_skip_and_the_later_run_wins(tmp_path: Path):
    part1, part2 = tmp_path / "p1", tmp_path / "p2"
    part1.mkdir(), part2.mkdir()
    shutil.copy(DATA / "llama_ref_7b_b1.out", part2 / "llama_ref_7b_b1.out")
    record(part1, "llama_ref_7b_b1", "llama.cpp", "llama-bench", "7b", 0, 1, 512, 128, None, extra=["--skipped"])
    record(part2, "llama_ref_7b_b1", "llama.cpp", "llama-bench", "7b", 0, 1, 512, 128, "llama_ref_7b_b1.out")
    for order in ([part1, part2], [part2, part1]):
        rows, _ = table.load_rows([str(p) for p in order])
        assert [(r.step, r.status, r.decode_tok_s) for r in rows] == [("llama_ref_7b_b1", "ok", 334.1)]
    # a failed run without output shows the last stderr line the script passed as --note
    record(part1, "ours_7b_b1", "vramwise", "vramwise", "7b", 0, 1, 512, 128, "missing.json", rc=2,
           extra=["--note", "vramwise: error: unrecognized arguments: --gpu-memory"])
    rows, _ = table.load_rows([str(part1)])
    failed = next(r for r in rows if r.step == "ours_7b_b1")
    assert failed.status == "failed (exit 2): vramwise: error: unrecognized arguments: --gpu-memory"


@pytest.mark.parametrize(
    "change,msg",
    [
        (("--shape", "70b"), "invalid choice: '70b'"),
        (("--format", "csv"), "invalid choice: 'csv'"),
        (("--batch", "0"), "must be >= 1"),
        (("--cap-mib", "-1"), "must be >= 0"),
        (("--step", "a/b"), "use letters, digits"),
    ],
)
def test_record_rejects_bad_arguments(tmp_path: Path, capsys, change, msg):
    argv = ["record", str(tmp_path), "--step", "s", "--engine", "e", "--format", "llama-bench", "--shape", "13b",
            "--batch", "1", "--prompt-len", "512", "--gen-len", "128", "--cap-mib", "0"]
    i = argv.index(change[0])
    argv[i + 1] = change[1]
    with pytest.raises(SystemExit) as e:
        table.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_show_names_a_missing_folder(tmp_path: Path, capsys):
    assert table.main([str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_standalone_report_gets_its_scenario_from_its_settings(tmp_path: Path):
    rep = ours_report(1, 512, decode=40.0, prefill=3000.0, peak=5800, gpu_memory=6 * 2**30)
    name = default_json_name(rep["settings"], [1], 512, 128)
    assert name == "bench-llama-2-13b-int4-6GiB-b1-p512-g128.json"
    (tmp_path / name).write_text(json.dumps(rep))
    rows, _ = table.load_rows([str(tmp_path)])
    assert len(rows) == 1 and rows[0].engine == "vramwise" and rows[0].decode_tok_s == 40.0
    assert rows[0].scenario == table.Scenario("13b", 6144, 1, 512) and rows[0].gen_len == 128
    assert table._mib_of("6GiB") == 6144 and table._mib_of("6144MiB") == 6144
    with pytest.raises(table.ParseError, match="unreadable GPU memory size"):
        table._mib_of("six gigs")


def test_bench_json_into_a_directory_names_the_scenario(tmp_path: Path):
    # parser + path resolution only: the end-to-end run with --json FILE is in test_bench.py
    from vramwise.bench.cli import bench_settings, json_path
    from vramwise.cli import build_parser

    args = build_parser().parse_args(["bench", "--random-weights", "llama-2-7b", "--quantization", "int8",
                                      "--batch", "2", "--prompt-len", "4", "--gen-len", "3"])
    settings = bench_settings(args)
    assert settings["random_weights"] == "llama-2-7b" and settings["quantization"] == "int8"
    json.dumps(settings)  # stored in the report as it is
    out = tmp_path / "peers"
    path = json_path(f"{out}/", settings, args.batch, args.prompt_len, args.gen_len)
    assert out.is_dir() and path == str(out / "bench-llama-2-7b-int8-uncapped-b2-p4-g3.json")
    assert json_path(str(out), settings, [1], 8, 8).endswith("-b1-p8-g8.json")  # an existing directory, no slash
    assert json_path(str(tmp_path / "r.json"), settings, [1], 8, 8) == str(tmp_path / "r.json")


def test_bench_json_in_a_missing_directory_fails_before_running(tmp_path: Path, capsys):
    from vramwise.cli import main

    # the path is checked before the model loads, not after a long run
    assert main(["bench", "--device", "cpu", "--json", str(tmp_path / "no" / "r.json"), "--no-progress"]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_hf_peers_arguments():
    hf = _load("hf_peers")
    a = hf.parse_args(["nf4", "--shape", "7b", "--json", "x.json"])
    assert (a.cap_mib, a.batch, a.prompt_len, a.gen_len) == (0, 1, 512, 128)
    with pytest.raises(SystemExit):
        hf.parse_args(["offload", "--shape", "13b", "--json", "x.json"])  # offload needs a cap
    with pytest.raises(SystemExit):
        hf.parse_args(["nf4", "--shape", "13b", "--gen-len", "0", "--json", "x.json"])
    with pytest.raises(SystemExit):
        hf.parse_args(["nf4", "--shape", "7b", "--device", "cpu", "--json", "x.json"])  # cpu: fp16 dry run only


def test_hf_peers_fp16_dry_run_on_cpu(tmp_path: Path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = _load("hf_peers")
    out = tmp_path / "hf.json"
    assert hf.main(["fp16", "--shape", "tiny", "--device", "cpu", "--batch", "2", "--prompt-len", "8", "--gen-len", "4",
                    "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["status"] == "ok" and d["generated"] == 4 and d["decode_steps_timed"] == 3
    assert d["prefill_tok_s"] > 0 and d["decode_tok_s"] > 0
    rows = table.parse_hf(str(out), 2)
    assert rows["status"] == "ok" and rows["decode_tok_s"] == d["decode_tok_s"]


FAKE_SMI = """#!/usr/bin/env bash
val() { cat "$FAKE_MEM" 2>/dev/null || echo 0; }
case "$*" in
  *memory.used*-lms*) while true; do val; sleep 0.02; done ;;
  *memory.used*) val ;;
  *memory.free*) echo 80000 ;;
  *driver_version*) echo 1.0 ;;
  *name*) echo "Fake GPU" ;;
esac
"""
# peak = 1000 + 180 * ngl: 28 is the largest -ngl under 6144 MiB (29 -> 6220)
FAKE_LLAMA_BENCH = """#!/usr/bin/env bash
ngl=0; while [ $# -gt 0 ]; do [ "$1" = -ngl ] && ngl=$2; shift; done
echo $(( 1000 + 180 * ngl )) > "$FAKE_MEM"; sleep 0.2; echo 0 > "$FAKE_MEM"
echo "{\\"n_gpu_layers\\": $ngl, \\"n_prompt\\": 512, \\"n_gen\\": 0, \\"avg_ts\\": 1400.0}"
echo "{\\"n_gpu_layers\\": $ngl, \\"n_prompt\\": 0, \\"n_gen\\": 128, \\"avg_ts\\": 26.0}"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_side_by_side_searches_the_largest_ngl_under_the_cap(tmp_path: Path):
    fake, work, out = tmp_path / "bin", tmp_path / "work", tmp_path / "out"
    bin_dir = work / "llama.cpp" / "build" / "bin"
    for d in (fake, bin_dir, work / "models"):
        d.mkdir(parents=True)
    (fake / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "llama-bench").write_text(FAKE_LLAMA_BENCH)
    (bin_dir / "llama-batched-bench").write_text("#!/bin/sh\nexit 1\n")
    for f in (fake / "nvidia-smi", bin_dir / "llama-bench", bin_dir / "llama-batched-bench"):
        f.chmod(0o755)
    (work / "models" / "13b.gguf").write_text("x")  # stands in for the GGUF (the fake tool does not read it)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_MEM=str(tmp_path / "mem"), SBS_WORK=str(work), SBS_KEEP_OUT="1",
               OUT=str(out), STEPS="llama_cap_13b_b1", VW_COMMIT="c0ffee0")
    script = str(PEERS / "side_by_side.sh")
    bad = subprocess.run(["bash", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr
    run = subprocess.run(["bash", script, "part1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rec = json.loads((out / "peers" / "llama_cap_13b_b1.step.json").read_text())
    assert rec["cap_mib"] == 6144 and rec["rc"] == 0 and rec["peak_mib"] == 1000 + 180 * 28
    assert "-ngl 28 of 41" in rec["setup"] and "29 peaked at 6220 MiB" in rec["setup"]
    assert "commit c0ffee0" in (out / "peers" / "table.md").read_text()
