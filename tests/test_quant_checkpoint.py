"""Our quantized checkpoint: quantize -> save -> load round trip, mixed formats, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_hf_model

from vramwise.config import EngineConfig
from vramwise.engine.llm_engine import LLMEngine
from vramwise.quant.formats import QuantSpec
from vramwise.quant.linear import QuantLinear
from vramwise.weights.base import WeightsError

PROMPT = list(range(3, 45))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "m", "llama_gqa")


def _engine(model: str, quantization: str | None = None) -> LLMEngine:
    # Unfused projections: these tests compare the modules as loaded, by name (models/fuse.py runs after loading).
    return LLMEngine(EngineConfig(model=model, device="cpu", show_progress=False, quantization=quantization,
                                  fuse_projections=False))


def _quantize(src: str, out: Path, **kw) -> Path:
    from vramwise.quant.cli import quantize_checkpoint

    return quantize_checkpoint(src, str(out), progress=False, **kw)


def _specs(model: torch.nn.Module) -> dict[str, QuantSpec]:
    return {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_rtn_round_trip_gives_the_in_memory_logits(tiny, tmp_path, bits, group):
    """RTN at load (in memory) and quantize -> save -> load run the very same packed weights."""
    q = f"int{bits}" + (f"-g{group}" if group else "")
    in_memory = _engine(tiny, q)
    out = _quantize(tiny, tmp_path / "q", bits=bits, group_size=group)
    loaded = _engine(str(out), "native")  # keep packed on CPU too: compare the QuantLinear paths exactly
    assert _specs(loaded.model) == _specs(in_memory.model) and len(_specs(loaded.model)) == 14
    for name, mod in loaded.model.named_modules():
        if isinstance(mod, QuantLinear):
            ref = in_memory.model.get_submodule(name)
            assert torch.equal(mod.qweight, ref.qweight) and torch.equal(mod.scales, ref.scales), name
    assert torch.equal(loaded.score(PROMPT), in_memory.score(PROMPT))
    # The CPU default dequantizes at load: the same weights in float, the same logits up to matmul order.
    auto = _engine(str(out))
    assert not _specs(auto.model)
    torch.testing.assert_close(auto.score(PROMPT), in_memory.score(PROMPT), rtol=1e-5, atol=1e-5)


def test_mixed_formats_per_module_survive_the_round_trip(tiny, tmp_path):
    """Attention int8, MLP int4 g32 (symmetric in layer 1): the checkpoint records a spec per module."""
    from vramwise.model_loader import load_model
    from vramwise.quant.apply import quantize_model
    from vramwise.quant.checkpoint import save_quantized
    from vramwise.weights import open_weights

    def spec_for(name: str, lin) -> QuantSpec | None:
        if ".self_attn." in name:
            return QuantSpec.int8()
        if ".mlp." in name:
            return QuantSpec.int4(32, symmetric=name.startswith("model.layers.1."))
        return None

    src = open_weights(tiny, show_progress=False)
    model = quantize_model(load_model(src, torch.device("cpu"), torch.float32), spec_for)
    out = save_quantized(model, tmp_path / "mixed", src.hf_config, src.load_tokenizer(), "rtn")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.self_attn.q_proj"] == {"bits": 8, "group_size": None, "symmetric": True,
                                                                "perm": False}
    loaded = _engine(str(out), "native")
    assert _specs(loaded.model) == _specs(model)
    eng = _engine(tiny)
    eng.model = model  # the in-memory quantized model behind the same engine plumbing
    for i, attn in enumerate(model.attention_layers()):
        attn.kv_cache = eng.runner.kv_cache.layer(i)
    assert torch.equal(loaded.score(PROMPT), eng.score(PROMPT))


def test_gptq_quantize_writes_a_loadable_checkpoint(tiny, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = _quantize(tiny, tmp_path / "g", bits=4, group_size=32, method="gptq", calib_text=str(text),
                    calib_samples=4, calib_seq_len=64)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["calibration"]["samples"] == 4
    assert {k: qc["calibration"][k] for k in ("refit", "awq", "true_sequential")} == {
        "refit": 1, "awq": True, "true_sequential": True}
    eng = _engine(str(out), "native")
    assert len(_specs(eng.model)) == 14
    assert torch.isfinite(eng.score(PROMPT)).all()
    # AWQ folded its input scales into the RMSNorm weights: the checkpoint must carry the folded norms.
    src_norm = _engine(tiny).model.model.layers[0].input_layernorm.weight
    assert not torch.equal(eng.model.model.layers[0].input_layernorm.weight, src_norm)


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary directory left behind"


def test_interrupted_quantize_leaves_nothing_that_loads(tiny, tmp_path, monkeypatch):
    import vramwise.quant.checkpoint as ckpt
    import vramwise.quant.gptq as gptq

    calls = {"n": 0}
    real = gptq.gptq_quantize_shared

    def dies_midway(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of layer 1 (4 groups a layer: qkv, o, gate+up, down)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize_shared", dies_midway)
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model. " * 100)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny, tmp_path / "out", method="gptq", group_size=32, calib_text=str(text), calib_samples=2,
                  calib_seq_len=64)
    assert calls["n"] == 6
    _no_leftovers(tmp_path, "out")

    # Interrupted while writing: after the weights and tokenizer, before config.json.
    def dies_before_config(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "quant_config", dies_before_config)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny, tmp_path / "out", group_size=32)
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("kw,message", [
    (dict(bits=3), "--bits 3 is not supported"),
    (dict(bits=4, group_size=48), "unsupported group_size=48"),
    (dict(bits=4, group_size=-1), "must be 32, 64 or 128"),
    (dict(bits=8, group_size=48), "multiple of 32"),
    (dict(bits=4, group_size=128), r"cannot quantize model.layers.0.self_attn.q_proj \(64x64\) to w4g128"),
    (dict(method="awq"), "--method 'awq' is not supported"),
])
def test_quantize_bad_input_errors(tiny, tmp_path, kw, message):
    with pytest.raises((ValueError, WeightsError), match=message):
        _quantize(tiny, tmp_path / "bad", **kw)
    _no_leftovers(tmp_path, "bad")


def test_quantize_refuses_to_overwrite(tiny, tmp_path):
    out = _quantize(tiny, tmp_path / "q", group_size=32)
    with pytest.raises(ValueError, match="already exists"):
        _quantize(tiny, out, group_size=32)
    before = (out / "model.safetensors").stat().st_mtime_ns
    _quantize(tiny, out, bits=8, overwrite=True)
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules"][
        "model.layers.0.mlp.up_proj"]["bits"] == 8


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    return _quantize(tiny, tmp_path_factory.mktemp("saved") / "q", group_size=32)


def _copy(saved: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(saved, dest)
    return dest


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_corrupt_checkpoints_give_clear_errors(saved, tmp_path):
    m = "model.layers.0.self_attn.q_proj"
    # A packed tensor of the wrong shape.
    bad = _copy(saved, tmp_path / "shape")
    _rewrite(bad, lambda t: t.__setitem__(f"{m}.qweight", t[f"{m}.qweight"][:, :4].contiguous()))
    with pytest.raises(WeightsError, match=rf"corrupt quantized checkpoint: module {m}: qweight"):
        _engine(str(bad), "native")
    # A missing tensor.
    bad = _copy(saved, tmp_path / "missing")
    _rewrite(bad, lambda t: t.pop(f"{m}.mins"))
    with pytest.raises(WeightsError, match=rf"module {m} lacks {m}.mins"):
        _engine(str(bad))
    # Config damage: unsupported bits, unknown version, a module the model does not have.
    for name, change, message in [
        ("bits", lambda qc: qc["modules"][m].update(bits=3), rf"module '{m}': unsupported quantization bits=3"),
        ("version", lambda qc: qc.update(format_version=99), "format_version 99 is not supported"),
        ("module", lambda qc: qc["modules"].update({"model.layers.9.mlp.up_proj": qc["modules"][m]}),
         "not a linear layer of this model"),
    ]:
        bad = _copy(saved, tmp_path / name)
        cfg = json.loads((bad / "config.json").read_text())
        change(cfg["quantization_config"])
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(WeightsError, match=message):
            _engine(str(bad), "native")
    # A truncated weights file.
    bad = _copy(saved, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        _engine(str(bad))


def test_quantize_cli(tiny, tmp_path, capsys):
    from vramwise.cli import main

    assert main(["quantize", tiny, "--bits", "8", "-o", str(tmp_path / "cli"), "--quiet"]) == 0
    assert (tmp_path / "cli" / "config.json").is_file()
    assert main(["quantize", tiny, "--bits", "4", "--group-size", "100", "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unsupported group_size=100" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tmp_path / "cli"), "--max-tokens", "3", "--quantization",
                 "native"]) == 0
