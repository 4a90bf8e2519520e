"""GPTQ: Hessian accumulation, error compensation beating round-to-nearest, the layer-by-layer model driver."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tiny_hf_model

from vramwise.quant.formats import QuantSpec
from vramwise.quant.gptq import (
    GPTQConfig,
    HessianAccumulator,
    gptq_quantize_shared,
    gptq_quantize_weight,
    quantize_model_gptq,
)
from vramwise.quant.rtn import quantize_rtn


def _correlated_inputs(tokens: int, k: int, rank: int = 24, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's: a few strong shared directions, uneven channel scales, some noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, rank, generator=g)
    x = torch.randn(tokens, rank, generator=g) @ basis.t() + 0.1 * torch.randn(tokens, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)  # (tokens, K)


def _output_error(x: torch.Tensor, w: torch.Tensor, packed) -> float:
    return float(((x @ w.t() - x @ packed.dequantize().t()) ** 2).mean())


def test_hessian_accumulator_is_the_mean_of_2xxT():
    x = torch.randn(1000, 48)
    acc = HessianAccumulator(48)
    for chunk in x.split(137):  # uneven batches
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * x.t() @ x / 1000, rtol=1e-4, atol=1e-4)
    assert acc.n == 1000


@pytest.mark.parametrize("spec", [QuantSpec.int4(128), QuantSpec.int4(32), QuantSpec.int4(64, symmetric=True),
                                  QuantSpec.int8(), QuantSpec.int8(32)], ids=lambda s: s.name)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    k, n = 256, 64
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(x)
    packed = gptq_quantize_weight(w, acc.H, spec, GPTQConfig(act_order=act_order))
    packed.validate()
    assert packed.spec == spec
    rtn, gptq = _output_error(x, w, quantize_rtn(w, spec)), _output_error(x, w, packed)
    assert gptq < 0.5 * rtn, (rtn, gptq)


def test_gptq_block_size_does_not_change_the_math_much():
    """The lazy block update is an exact reordering of the same updates (up to float rounding)."""
    k, n = 256, 32
    x = _correlated_inputs(1024, k, seed=1)
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(x)
    a = gptq_quantize_weight(w, acc.H, QuantSpec.int4(32), GPTQConfig(block_size=128))
    b = gptq_quantize_weight(w, acc.H, QuantSpec.int4(32), GPTQConfig(block_size=32))
    differ = (a.dequantize() != b.dequantize()).float().mean()
    assert differ < 0.01  # a handful of ties may round the other way


def test_shared_input_weights_quantize_as_if_alone():
    """q/k/v (and gate/up) are quantized in one stacked run; the rows do not interact given H."""
    k = 128
    x = _correlated_inputs(1024, k, seed=2)
    acc = HessianAccumulator(k)
    acc.add(x)
    ws = [torch.randn(n, k) * 0.05 for n in (64, 32, 32)]
    together = gptq_quantize_shared(ws, acc.H, QuantSpec.int4(64))
    for w, packed in zip(ws, together):
        alone = gptq_quantize_weight(w, acc.H, QuantSpec.int4(64))
        assert packed.out_features == w.shape[0]
        assert (packed.dequantize() != alone.dequantize()).float().mean() < 0.01  # float-order ties only


def test_gptq_handles_dead_inputs_and_rejects_bad_shapes():
    k, n = 128, 16
    x = _correlated_inputs(512, k)
    x[:, 5] = 0.0  # an input that is never active
    acc = HessianAccumulator(k)
    acc.add(x)
    packed = gptq_quantize_weight(torch.randn(n, k), acc.H, QuantSpec.int4(32))
    assert torch.isfinite(packed.dequantize()).all()
    with pytest.raises(ValueError, match="Hessian must be"):
        gptq_quantize_weight(torch.randn(n, k), torch.eye(64), QuantSpec.int4(32))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize_weight(torch.randn(n, 96), torch.eye(96), QuantSpec.int4(64))
    with pytest.raises(ValueError):
        GPTQConfig(damp=1.5)


def _tiny_model(tmp_path):
    from vramwise.model_loader import load_model
    from vramwise.weights import open_weights

    src = open_weights(make_tiny_hf_model(tmp_path / "m", "llama_gqa"), show_progress=False)
    return src, lambda: load_model(src, torch.device("cpu"), torch.float32)


def _score(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states of independent sequences, through the same private-KV path the driver uses."""
    from vramwise.quant.gptq import _layer_meta

    cfg = model.config
    b, t = ids.shape
    kv = (b * t // 16, 16, cfg.num_key_value_heads, cfg.head_dim)
    for attn in model.attention_layers():
        attn.kv_cache = (torch.zeros(kv), torch.zeros(kv))
    with torch.no_grad():
        return model(ids.reshape(-1), torch.arange(t).repeat(b), _layer_meta(b, t, 16, torch.device("cpu")))


def test_quantize_model_gptq_swaps_every_layer_linear_and_beats_rtn(tmp_path):
    from vramwise.quant.apply import quantize_model
    from vramwise.quant.linear import QuantLinear

    _, load = _tiny_model(tmp_path)
    calib = torch.randint(3, 288, (8, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.int4(32)
    reference = _score(load(), calib)

    gptq_model = load()
    done = quantize_model_gptq(gptq_model, calib, lambda name, lin: spec,
                               lambda parent, child, packed, bias: setattr(parent, child, QuantLinear.from_packed(packed, bias)),
                               batch_seqs=3, progress=False)
    assert len(done) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    assert all(isinstance(m, QuantLinear) for n, m in gptq_model.named_modules() if n in done)
    assert isinstance(gptq_model.lm_head, torch.nn.Linear)  # lm_head / embedding untouched

    rtn_model = quantize_model(load(), lambda name, lin: spec if name.startswith("model.layers.") else None)
    err_gptq = float(((_score(gptq_model, calib) - reference) ** 2).mean())
    err_rtn = float(((_score(rtn_model, calib) - reference) ** 2).mean())
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_calibration_length_errors():
    from vramwise.quant.gptq import select_calibration

    assert select_calibration(list(range(100)), 3, 32).shape == (3, 32)
    with pytest.raises(ValueError, match="96 are needed"):
        select_calibration(list(range(50)), 3, 32)


@pytest.mark.parametrize("spec", [QuantSpec.int4(64), QuantSpec.int4(64, symmetric=True), QuantSpec.int8()],
                         ids=lambda s: s.name)
def test_refit_lowers_the_layer_objective(spec):
    """The least-squares refit of each group's (scale, min) for fixed codes can only lower tr(E H E^T)
    (the best of the rounds is kept); on correlated inputs it lowers it clearly for int4."""
    from vramwise.quant.gptq import _objective

    k, n = 256, 48
    x = _correlated_inputs(2048, k, seed=3)
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(x)
    plain = gptq_quantize_weight(w, acc.H, spec, GPTQConfig(refit=0))
    refit = gptq_quantize_weight(w, acc.H, spec, GPTQConfig(refit=2))
    refit.validate()
    e_plain, e_refit = _output_error(x, w, plain), _output_error(x, w, refit)
    assert e_refit <= e_plain * 1.0001, (e_plain, e_refit)
    if spec.bits == 4 and not spec.symmetric:
        assert e_refit < 0.9 * e_plain, (e_plain, e_refit)
    # The objective the refit minimises is the output error it stands for: tr(E^T H E) = 2 * N * mean((X E)^2)
    # with H = 2/T X^T X. Pass the dequantized values as "codes" on a grid of scale 1, min 0.
    g = spec.group_size_for(k)
    obj = _objective(w.t(), refit.dequantize().t(), torch.ones(k // g, n), torch.zeros(k // g, n), acc.H, g)
    assert obj == pytest.approx(2 * n * e_refit, rel=1e-3)


def test_refit_keeps_degenerate_groups_finite():
    """A group whose weights are all equal gets a single code: its (scale, min) system is singular."""
    k, n = 128, 16
    x = _correlated_inputs(512, k, seed=4)
    w = torch.randn(n, k) * 0.05
    w[:, :64] = 0.02  # the whole first group, every row
    acc = HessianAccumulator(k)
    acc.add(x)
    packed = gptq_quantize_weight(w, acc.H, QuantSpec.int4(64), GPTQConfig(refit=1, act_order=False))
    deq = packed.dequantize()
    assert torch.isfinite(deq).all()
    assert _output_error(x, w, packed) <= _output_error(x, w, gptq_quantize_weight(w, acc.H, QuantSpec.int4(64),
                                                                                    GPTQConfig(act_order=False)))


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_takes_o_proj_hessian_from_the_quantized_qkv(tmp_path, monkeypatch, true_sequential):
    """With true_sequential, o_proj's Hessian comes from attention over the already-quantized q/k/v; without,
    from the float layer."""
    import vramwise.quant.gptq as gptq_mod
    from vramwise.quant.gptq import HessianAccumulator
    from vramwise.quant.linear import QuantLinear

    _, load = _tiny_model(tmp_path)
    calib = torch.randint(3, 288, (4, 32), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    real = gptq_mod.gptq_quantize_shared
    monkeypatch.setattr(gptq_mod, "gptq_quantize_shared", lambda ws, H, *a: seen.append(H.clone()) or real(ws, H, *a))

    def hessian_of_o_proj(model) -> torch.Tensor:
        """o_proj input Hessian of layer 0 of `model` on the calibration embeddings."""
        acc = HessianAccumulator(model.model.layers[0].self_attn.o_proj.in_features)
        h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: acc.add(i[0]))
        _score(model, calib)
        h.remove()
        return acc.H

    float_H = hessian_of_o_proj(load())
    model = load()
    quantize_model_gptq(model, calib, lambda n, m: QuantSpec.int4(32),
                        lambda p, c, packed, b: setattr(p, c, QuantLinear.from_packed(packed, b)),
                        GPTQConfig(true_sequential=true_sequential), progress=False)
    assert len(seen) == 2 * 4  # per layer: q/k/v, o, gate/up, down
    quant_H = hessian_of_o_proj(model)  # layer 0 quantized: its o_proj sees the quantized q/k/v
    assert not torch.allclose(float_H, quant_H, rtol=1e-3, atol=1e-5)
    want = quant_H if true_sequential else float_H
    torch.testing.assert_close(seen[1], want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_awq_fold_keeps_the_float_function_and_search_never_loses(tmp_path, fused):
    from vramwise.models.fuse import fuse_projections
    from vramwise.quant.awq import fold_scale, scalable_inputs, search_scale

    _, load = _tiny_model(tmp_path)
    model = load()
    if fused:  # the engine's layout: qkv_proj, gate_up_proj = [gate | up]
        fuse_projections(model)
    calib = torch.randint(3, 288, (2, 32), generator=torch.Generator().manual_seed(2))
    ref = _score(model, calib)
    want = ([("self_attn.qkv_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)] if fused else
            [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
             ("mlp.down_proj",)])
    for layer in model.model.layers:
        items = scalable_inputs(layer)
        assert [it.names for it in items] == want
        for it in items:
            k = layer.get_submodule(it.names[0]).in_features
            fold_scale(layer, it, torch.rand(k, generator=torch.Generator().manual_seed(k)) * 3 + 0.2)
    torch.testing.assert_close(_score(model, calib), ref, rtol=1e-4, atol=1e-4)

    # The chosen scale's RTN objective is never above the unscaled one's (alpha = 0 is on the grid).
    k, n = 128, 32
    x = _correlated_inputs(1024, k, seed=5)
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(x)
    spec = QuantSpec.int4(32)
    s, alpha = search_scale([w], acc.H, spec)
    assert s.shape == (k,) and bool((s > 0).all())

    def err(scale: torch.Tensor) -> float:
        from vramwise.quant.awq import _fake_rtn

        e = w - _fake_rtn(w * scale, spec) / scale
        return float(((x @ e.t()) ** 2).mean())

    assert err(s) <= err(torch.ones(k)) * (1 + 1e-6)
    assert alpha > 0 and err(s) < err(torch.ones(k))  # uneven input scales (0.2 .. 3): scaling helps


def test_quantize_model_gptq_with_awq_and_refit_beats_rtn(tmp_path):
    from vramwise.quant.apply import quantize_model
    from vramwise.quant.linear import QuantLinear

    _, load = _tiny_model(tmp_path)
    calib = torch.randint(3, 288, (8, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.int4(32)
    reference = _score(load(), calib)
    model = load()
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    done = quantize_model_gptq(model, calib, lambda name, lin: spec,
                               lambda p, c, packed, b: setattr(p, c, QuantLinear.from_packed(packed, b)),
                               GPTQConfig(awq=True, refit=1), progress=False)
    assert len(done) == 2 * 7
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # scales were folded
    rtn_model = quantize_model(load(), lambda name, lin: spec if name.startswith("model.layers.") else None)
    err = float(((_score(model, calib) - reference) ** 2).mean())
    err_rtn = float(((_score(rtn_model, calib) - reference) ** 2).mean())
    assert err < err_rtn, (err, err_rtn)
