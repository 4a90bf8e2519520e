"""Block-wise output reconstruction after GPTQ (quant/blocktune.py): the plain-torch layer matches the engine's,
tuning lowers the layer-output objective it optimises, and the model driver / checkpoint path carry it."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tiny_hf_model

from vramwise.quant.blocktune import TuneConfig, layer_forward, tune_layer
from vramwise.quant.formats import QuantSpec
from vramwise.quant.gptq import (
    GPTQConfig,
    _layer_meta,
    _run_layer,
    gptq_quantize_shared,
    quantize_model_gptq,
)

SEQ = 32


def _load(tmp_path, fuse: bool = False):
    from vramwise.model_loader import load_model
    from vramwise.models.fuse import fuse_projections
    from vramwise.weights import open_weights

    src = open_weights(make_tiny_hf_model(tmp_path / "m", "llama_gqa"), show_progress=False)
    model = load_model(src, torch.device("cpu"), torch.float32)
    if fuse:
        fuse_projections(model)
    return model


def _bind_kv(model, seqs: int) -> None:
    cfg = model.config
    kv = (seqs * SEQ // 16, 16, cfg.num_key_value_heads, cfg.head_dim)
    for attn in model.attention_layers():
        attn.kv_cache = (torch.zeros(kv), torch.zeros(kv))


def _hidden(model, seqs: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 288, (seqs * SEQ,), generator=torch.Generator().manual_seed(seed))
    return model.model.embed_tokens(ids).detach()  # (seqs * SEQ, hidden)


@pytest.mark.parametrize("fuse", [False, True])
def test_layer_forward_matches_the_engine_layer(tmp_path, fuse):
    model = _load(tmp_path, fuse)
    _bind_kv(model, 3)
    layer = model.model.layers[1]
    x = _hidden(model, 3)
    with torch.no_grad():
        engine = _run_layer(layer, [x], SEQ, 16)[0]
        mine = layer_forward(layer, x, SEQ)
    assert torch.allclose(mine, engine, atol=1e-5, rtol=1e-4), float((mine - engine).abs().max())


def _gptq_layer(layer, x: torch.Tensor, spec: QuantSpec) -> dict:
    """GPTQ of each linear of one (unfused) layer from its float inputs, as the driver would (no AWQ)."""
    from vramwise.quant.gptq import _collect

    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = _collect(layer, [x], SEQ, 16, linears, torch.device("cpu"))
    return {n: gptq_quantize_shared([m.weight.data], hooks.hessian(n), spec)[0] for n, m in linears.items()}


@pytest.mark.parametrize("rounding", [False, True])
def test_tuning_lowers_the_layer_output_error_it_optimises(tmp_path, rounding):
    model = _load(tmp_path)
    _bind_kv(model, 16)
    layer = model.model.layers[0]
    x = _hidden(model, 16)  # 12 windows to tune on, 4 held out
    with torch.no_grad():
        y = layer_forward(layer, x, SEQ)  # teacher: the float layer on the same inputs
    packed = _gptq_layer(layer, x, QuantSpec.int4(32))
    tuned, res = tune_layer(layer, packed, x, y, SEQ, TuneConfig(steps=30, batch=2, lr=1e-3, rounding=rounding,
                                                                round_lr=0.05))
    assert res.tuned and res.after < res.before, res

    def engine_mse(weights: dict) -> float:
        # The same objective through the engine's own layer with the stored (packed, dequantized) weights.
        for n, p in weights.items():
            layer.get_submodule(n).weight.data.copy_(p.dequantize())
        with torch.no_grad():
            return float(((_run_layer(layer, [x], SEQ, 16)[0] - y) ** 2).mean())

    assert engine_mse(packed) == pytest.approx(res.before, rel=1e-3)
    assert engine_mse(tuned) == pytest.approx(res.after, rel=1e-3)
    assert engine_mse(tuned) < engine_mse(packed)
    if not rounding:  # scale/min tuning keeps GPTQ's codes
        assert all(torch.equal(tuned[n].qweight, packed[n].qweight) for n in packed)
    assert all(not torch.equal(tuned[n].scales, packed[n].scales) for n in packed)


def test_tuning_keeps_gptq_when_it_cannot_help(tmp_path):
    model = _load(tmp_path)
    _bind_kv(model, 2)
    layer = model.model.layers[0]
    x = _hidden(model, 2)
    packed = _gptq_layer(layer, x, QuantSpec.int4(32))
    weights = {n: p.dequantize() for n, p in packed.items()}
    with torch.no_grad():
        y = layer_forward(layer, x, SEQ, weights)  # the quantized layer itself is the teacher: loss 0
    kept, res = tune_layer(layer, packed, x, y, SEQ, TuneConfig(steps=3, lr=0.1))
    assert not res.tuned and kept is packed and res.after == res.before < 1e-10


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "steps >= 1"),
    (dict(samples=0), "samples >= 1"),
    (dict(lr=0.0), "learning rates must be positive"),
    (dict(round_lr=float("nan")), "learning rates must be positive"),
    (dict(target="teacher"), "target must be one of float, quant"),
])
def test_bad_tune_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        TuneConfig(**kw)


def _score(model, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    cfg = model.config
    kv = (b * t // 16, 16, cfg.num_key_value_heads, cfg.head_dim)
    for attn in model.attention_layers():
        attn.kv_cache = (torch.zeros(kv), torch.zeros(kv))
    with torch.no_grad():
        return model(ids.reshape(-1), torch.arange(t).repeat(b), _layer_meta(b, t, 16, torch.device("cpu")))


@pytest.mark.parametrize("target", ["float", "quant"])
def test_driver_with_tuning_beats_plain_gptq_on_the_model_output(tmp_path, target):
    from vramwise.quant.linear import QuantLinear

    calib = torch.randint(3, 288, (16, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.int4(32)
    reference = _score(_load(tmp_path), calib)

    def run(tune: TuneConfig | None) -> float:
        model = _load(tmp_path)
        done = quantize_model_gptq(model, calib, lambda n, m: spec,
                                   lambda p, c, packed, b: setattr(p, c, QuantLinear.from_packed(packed, b)),
                                   GPTQConfig(tune=tune), progress=False)
        assert len(done) == 14
        return float(((_score(model, calib) - reference) ** 2).mean())

    plain = run(None)
    tuned = run(TuneConfig(steps=20, samples=16, batch=2, lr=1e-3, target=target))
    assert tuned < plain, (tuned, plain)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "m", "llama_gqa")


def test_tuned_checkpoint_saves_and_loads(tiny, tmp_path):
    import json

    from vramwise.config import EngineConfig
    from vramwise.engine.llm_engine import LLMEngine
    from vramwise.quant.cli import quantize_checkpoint
    from vramwise.quant.formats import unpack_int4
    from vramwise.quant.linear import QuantLinear

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    kw = dict(bits=4, group_size=32, method="gptq", calib_text=str(text), calib_samples=4, calib_seq_len=64,
              progress=False)
    plain = quantize_checkpoint(tiny, str(tmp_path / "plain"), **kw)
    tuned = quantize_checkpoint(tiny, str(tmp_path / "tuned"), tune_steps=5, tune_samples=2, tune_lr=1e-2, **kw)
    qc = json.loads((tuned / "config.json").read_text())["quantization_config"]["calibration"]
    assert qc["block_tuning"] == {"steps": 5, "samples": 2, "batch": 2, "lr": 1e-2, "rounding": False,
                                  "round_lr": TuneConfig().round_lr, "target": "float"}

    def linears(path) -> dict[str, QuantLinear]:
        eng = LLMEngine(EngineConfig(model=str(path), device="cpu", show_progress=False, quantization="native",
                                     fuse_projections=False))
        assert torch.isfinite(eng.score(list(range(3, 40)))).all()
        return {n: m for n, m in eng.model.named_modules() if isinstance(m, QuantLinear)}

    a, b = linears(plain), linears(tuned)
    assert set(a) == set(b) and len(a) == 14
    for n in a:  # new fp16 scales in the same packed format
        assert b[n].scales.dtype == torch.float16 and not torch.equal(a[n].scales, b[n].scales), n
        if n.startswith("model.layers.0."):  # scale/min tuning keeps GPTQ's codes (layer 1's GPTQ already
            # saw the tuned layer 0's outputs, so its codes differ)
            assert torch.equal(unpack_int4(a[n].qweight), unpack_int4(b[n].qweight)), n


@pytest.mark.parametrize("kw,message", [
    (dict(tune_steps=-1), "--tune-steps must be >= 0"),
    (dict(tune_steps=5), "it needs --method gptq"),
    (dict(method="gptq", tune_steps=5, tune_target="teacher"), "target must be one of float, quant"),
    (dict(method="gptq", tune_steps=5, tune_samples=0), "samples >= 1"),
])
def test_quantize_rejects_bad_tune_options(tiny, tmp_path, kw, message):
    from vramwise.quant.cli import quantize_checkpoint

    with pytest.raises(ValueError, match=message):
        quantize_checkpoint(tiny, str(tmp_path / "bad"), bits=4, group_size=32, progress=False, **kw)
    assert not (tmp_path / "bad").exists()


def test_quantize_cli_tune_flags(tiny, tmp_path, capsys):
    from vramwise.cli import main

    assert main(["quantize", tiny, "--group-size", "32", "--tune-steps", "3", "-o", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "it needs --method gptq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", tiny, "--method", "gptq", "--tune-steps", "3", "--tune-target", "x", "-o",
              str(tmp_path / "y")])
    assert "invalid choice: 'x'" in capsys.readouterr().err
