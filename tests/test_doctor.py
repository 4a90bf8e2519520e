"""`vramwise doctor`: runs on a CPU-only machine, says so, measures the CPU quickly and caches the result."""

from __future__ import annotations

import json

import pytest

from vramwise.memory.bandwidth import (
    REPORT_VERSION,
    cache_path,
    load_report,
    measure_cpu,
    run_doctor,
    save_report,
)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_cache_path_respects_xdg(cache_home, monkeypatch):
    assert cache_path() == cache_home / "vramwise" / "doctor.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_path().parts[-3:] == (".cache", "vramwise", "doctor.json")


def test_save_and_load_round_trip(cache_home):
    assert load_report() is None
    path = save_report({"version": REPORT_VERSION, "cpu": {"cpu_bandwidth": 1.0}})
    assert path == cache_path() and load_report()["cpu"]["cpu_bandwidth"] == 1.0
    assert [p.name for p in path.parent.iterdir()] == ["doctor.json"]  # no temporary file left behind
    save_report({"version": REPORT_VERSION + 1})
    assert load_report() is None  # another version: ignored, not misread
    path.write_text("{not json")
    assert load_report() is None


def test_measure_cpu_small():
    m = measure_cpu(scale=0.05)
    assert m["host_memory_bandwidth"] > 0 and m["cpu_bandwidth"] > 0 and m["cpu_float_flops"] > 0
    assert m["host_memory"] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only report")
def test_doctor_on_cpu_reports_and_caches(cache_home, capsys):
    from vramwise.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU: vramwise runs on the CPU" in out
    assert "fp32 GEMV weight read" in out and "0 problem(s)" in out
    data = json.loads(cache_path().read_text())
    assert data["version"] == REPORT_VERSION and data["gpu"] is None
    assert data["cpu"]["cpu_bandwidth"] > 0 and data["cpu"]["cpu_float_flops"] > 0
    assert data["cpu"]["cpu_packed_bandwidth"] > 0 and data["cpu"]["cpu_quant_flops"] > 0  # torch's int4 kernel
    assert "int4 GEMV weight read" in out
    # plan --device-profile auto: no GPU in the cache, so it falls back to the built-in h100 and says so
    assert main(["plan", "--random-weights", "llama-2-7b", "--gpu-memory", "6GiB"]) == 0
    assert "the cached doctor report has no GPU" in capsys.readouterr().out


def test_doctor_no_measure_writes_nothing(cache_home, capsys):
    from vramwise.cli import main

    assert main(["doctor", "--no-measure", "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in data["checks"]} >= {"python", "torch", "GPU", "triton", "NVML"}
    assert data["cpu"] is None and not cache_path().exists()


@pytest.mark.gpu
def test_doctor_on_gpu_measures_the_card(cache_home):
    rep = run_doctor()
    assert not rep.errors, rep.errors
    g = rep.gpu
    assert g["hbm_bandwidth"] > 1e11 and g["h2d_pinned_bandwidth"] > 1e9 and g["h2d_pageable_bandwidth"] > 1e8
    assert 50 * (1 << 20) < g["cuda_context_bytes"] < 4 * (1 << 30)
    assert g["gpu_fp16_flops"] > 1e12 and g["h2d_pinned_bandwidth_concurrent"] > 0
    from vramwise.memory.costmodel import profile_from_doctor

    prof = profile_from_doctor(rep.to_dict())
    assert prof.has_gpu and prof.cuda_context_bytes == g["cuda_context_bytes"]
