"""Fused projections (models/fuse.py): QKV and gate+up in one matmul, float and quantized; outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures import make_tiny_hf_model
from vramwise.llm import LLM
from vramwise.models.fuse import fuse_linears, fuse_projections
from vramwise.quant.formats import QuantSpec
from vramwise.quant.linear import QuantLinear
from vramwise.sampling_params import SamplingParams


def _linears(n_out: list[int], k: int = 64, bias: bool = False) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(k, n, bias=bias) for n in n_out]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_is_the_concatenation(bias):
    parts = _linears([32, 16, 16], bias=bias)
    fused = fuse_linears(parts)
    x = torch.randn(5, 64)
    assert fused.out_features == 64
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=64, symmetric=True),
                                  QuantSpec(bits=8), QuantSpec(bits=8, group_size=32)])
def test_fused_quant_linear_is_the_concatenation(spec):
    parts = [QuantLinear.from_linear(lin, spec) for lin in _linears([32, 16, 24], k=128, bias=True)]
    fused = fuse_linears(parts)
    assert isinstance(fused, QuantLinear) and fused.out_features == 72 and fused.spec == spec
    x = torch.randn(3, 128)
    # Same packed codes and scales, so the dequantized weight is the concatenation exactly.
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-5, atol=1e-5)


def test_mismatched_parts_are_left_unfused():
    lins = _linears([32, 16], k=128)
    mixed = [QuantLinear.from_linear(lins[0], QuantSpec(bits=4, group_size=32)), QuantLinear.from_linear(lins[1], QuantSpec(bits=8))]
    with pytest.raises(ValueError, match="quantized differently"):
        fuse_linears(mixed)
    with pytest.raises(ValueError, match="different or unsupported module types"):
        fuse_linears([lins[0], mixed[1]])
    with pytest.raises(ValueError, match="bias"):
        fuse_linears([nn.Linear(8, 8, bias=True), nn.Linear(8, 8, bias=False)])


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("fuse") / "m", "qwen2_bias")  # q/k/v carry biases


@pytest.mark.parametrize("quantization", ["none", "int8", "int4-g32"])
def test_fused_model_matches_unfused(tiny_qwen, quantization):
    kw = dict(device="cpu", max_model_len=64, show_progress=False, quantization=quantization, enforce_eager=True)
    plain = LLM(tiny_qwen, fuse_projections=False, **kw)
    fused = LLM(tiny_qwen, **kw)
    report = fused.engine.fuse_report
    n_layers = fused.engine.model_config.num_hidden_layers
    assert len(report.fused) == 2 * n_layers and not report.skipped
    layer = fused.engine.model.model.layers[0]
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up_proj is not None and not hasattr(layer.mlp, "gate_proj")
    assert plain.engine.model.model.layers[0].self_attn.qkv_proj is None

    ids = [5, 17, 99, 230, 4, 61, 8]
    torch.testing.assert_close(fused.engine.score(ids), plain.engine.score(ids), rtol=1e-4, atol=1e-4)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [ids, ids[:3], [200, 1, 7, 7]]
    assert [o.outputs[0].token_ids for o in fused.generate(prompts, p)] == [
        o.outputs[0].token_ids for o in plain.generate(prompts, p)
    ]


def test_fuse_projections_is_idempotent(tiny_qwen):
    llm = LLM(tiny_qwen, device="cpu", max_model_len=64, show_progress=False, enforce_eager=True)
    again = fuse_projections(llm.engine.model)
    assert again.fused == [] and again.skipped == {}


_INTERPRETED_MODEL = """
import sys, torch
from fixtures import make_tiny_hf_model
from vramwise.kernels import fused
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

llm = LLM(make_tiny_hf_model(sys.argv[1], "qwen2_bias"), device="cpu", max_model_len=64, show_progress=False,
          decode_graphs="emulate", max_num_seqs=4)
ids, p = [5, 17, 99, 230, 4, 61, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
ref = llm.engine.score(ids)
ref_tokens = [o.outputs[0].token_ids for o in llm.generate([ids, ids[:3], [9, 9]], p)]
fused._use_triton = lambda x: True  # the CUDA dispatch, kernels run by Triton's interpreter on CPU tensors
got = llm.engine.score(ids)
got_tokens = [o.outputs[0].token_ids for o in llm.generate([ids, ids[:3], [9, 9]], p)]
torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
assert got_tokens == ref_tokens, (got_tokens, ref_tokens)
print("OK")
"""


def test_triton_kernels_wired_into_fused_model_under_interpreter(tmp_path):
    """The model's Triton path (fused RMSNorm+residual, RoPE+KV write on views of the fused QKV output,
    SwiGLU on the fused gate_up output) equals its torch path; run in a TRITON_INTERPRET=1 subprocess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent / "src"), str(tests), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _INTERPRETED_MODEL, str(tmp_path / "m")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
