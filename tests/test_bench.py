"""`vramwise bench` (offline): runs end to end on the bundled model, writes JSON with every field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vramwise.bench.offline import BatchResult, BenchReport
from vramwise.cli import main


def test_bench_bundled_model_writes_full_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--device", "cpu", "--batch", "1,3", "--prompt-len", "8", "--gen-len", "4",
               "--json", str(js), "--plot", str(png), "--no-progress"])
    assert rc == 0
    data = json.loads(js.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(BenchReport)}
    assert [r["batch"] for r in data["results"]] == [1, 3]
    for r in data["results"]:
        assert set(r) == {f.name for f in dataclasses.fields(BatchResult)}
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["prompt_len"] == 8 and r["gen_len"] == 4
    assert data["commit"] and data["device"].startswith("cpu") and data["placement"] == "all-resident"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 |" in capsys.readouterr().out


def test_bench_random_weights_shape(tmp_path):
    js = tmp_path / "r.json"
    assert main(["bench", "--random-weights", "smollm2-135m", "--device", "cpu", "--batch", "2", "--prompt-len", "4",
                 "--gen-len", "3", "--json", str(js), "--no-progress"]) == 0
    assert "random" in json.loads(js.read_text())["model"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["bench", "--batch", "0"], "every value must be an integer >= 1"),
        (["bench", "--batch", "1,x"], "comma-separated list of integers"),
        (["bench", "--prompt-len", "-3"], "must be >= 1"),
    ],
)
def test_bench_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_bench_unknown_shape_is_a_clear_error(capsys):
    assert main(["bench", "--random-weights", "llama-9000", "--no-progress"]) == 2
    assert "unknown shape 'llama-9000'" in capsys.readouterr().err


def test_bench_int4_reports_weight_bandwidth_and_decode_path(tmp_path, capsys):
    from fixtures import make_tiny_hf_model

    model = make_tiny_hf_model(tmp_path / "m", "llama_tied")
    js = tmp_path / "r.json"
    argv = ["bench", model, "--quantization", "int4-g32", "--device", "cpu", "--batch", "1", "--prompt-len", "4",
            "--gen-len", "3", "--enforce-eager", "--json", str(js), "--no-progress"]
    assert main(argv) == 0
    data = json.loads(js.read_text())
    assert data["decode_path"] == "eager (--enforce-eager), async scheduling"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    layer_weights = cfg["num_hidden_layers"] * (3 * h * h + 3 * h * cfg["intermediate_size"])  # q,o + k,v (half: GQA) + mlp
    # int4 layers (~0.6 byte per weight with scales and mins) plus the tied fp32 embedding the logits read in full.
    assert v * h * 4 + layer_weights // 2 < data["weight_bytes_per_step"] < v * h * 4 + layer_weights
    r = data["results"][0]
    assert r["weight_gb_s"] == pytest.approx(data["weight_bytes_per_step"] * r["decode_tok_s"] / 1e9, rel=0.01, abs=0.1)
    assert "weights GB/s" in capsys.readouterr().out


def test_decode_weight_bytes_skips_the_untied_embedding(tmp_path):
    from fixtures import make_tiny_hf_model

    from vramwise.bench.offline import decode_weight_bytes
    from vramwise.llm import LLM

    llm = LLM(make_tiny_hf_model(tmp_path / "m", "llama_gqa"), device="cpu", show_progress=False, enforce_eager=True)
    model = llm.engine.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert decode_weight_bytes(model) == params - embed.numel() * embed.element_size()


def test_bench_under_a_gpu_memory_budget_reports_plan_and_memory(tmp_path, capsys):
    """--gpu-memory through the shared engine flags, planned for a fake card (a profile JSON, so this runs on
    the CPU): the JSON carries the placement, the plan's predictions next to each measured row and the
    engine's memory terms."""
    from test_budget_engine import STREAM_CARD, offloading_budget
    from test_offload import make_deep_tiny_model

    from vramwise.memory.enforce import REPORT_TERMS

    model = make_deep_tiny_model(tmp_path / "deep")
    limit = offloading_budget(model, STREAM_CARD)
    card, js = tmp_path / "card.json", tmp_path / "r.json"
    card.write_text(json.dumps(STREAM_CARD.to_dict()))
    rc = main(["bench", model, "--device", "cpu", "--batch", "1,2", "--prompt-len", "8", "--gen-len", "4",
               "--max-model-len", "128", "--max-num-seqs", "4", "--gpu-memory", f"{limit}B",
               "--device-profile", str(card), "--json", str(js), "--no-progress"])
    assert rc == 0
    data = json.loads(js.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(BenchReport)}
    assert data["gpu_memory_budget_mib"] == round(limit / 2**20, 1)
    assert "streamed" in data["placement"] and data["planner_prediction"]["decode_tok_s_b1"] > 0
    for r in data["results"]:
        assert set(r) == {f.name for f in dataclasses.fields(BatchResult)}
        assert r["predicted_ttft_ms"] > 0 and r["predicted_prefill_tok_s"] > 0 and r["predicted_decode_tok_s"] > 0
    # a batch of 2 is predicted to decode faster in aggregate than a batch of 1 (weights read once per step)
    assert data["results"][1]["predicted_decode_tok_s"] > data["results"][0]["predicted_decode_tok_s"]
    mem = data["memory_report"]
    assert mem["budget"] == limit and mem["total_planned"] == sum(mem[t] for t in REPORT_TERMS) <= limit
    out = capsys.readouterr().out
    assert "predicted decode tok/s" in out and "resident_weights" in out and "stream_buffers" in out
