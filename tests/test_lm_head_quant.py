"""--lm-head-bits: the output matrix quantized at load (int8 per channel / int4), kept float, or left as loaded."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tiny_hf_model

from vramwise.cli import build_parser, make_engine_config
from vramwise.model_loader import load_model
from vramwise.quant.linear import QuantLinear
from vramwise.weights import open_weights


@pytest.fixture(scope="module")
def gqa_source(tmp_path_factory):
    return open_weights(make_tiny_hf_model(tmp_path_factory.mktemp("gqa"), "llama_gqa"), show_progress=False)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return model.compute_logits(hidden)  # (5, vocab) fp32


@pytest.mark.parametrize("bits, group, tol", [(8, None, 1e-2), (4, 64, 0.15)])
def test_lm_head_quantized_at_load(gqa_source, bits, group, tol):
    ref = load_model(gqa_source, torch.device("cpu"), torch.float32)
    q = load_model(gqa_source, torch.device("cpu"), torch.float32, lm_head_bits=bits)
    assert isinstance(q.lm_head, QuantLinear) and not isinstance(ref.lm_head, QuantLinear)
    assert q.lm_head.spec.bits == bits and q.lm_head.spec.group_size == group  # int4: 128 does not divide 64
    assert isinstance(q.model.layers[0].mlp.down_proj, torch.nn.Linear)  # only the head changed
    want, got = _logits(ref), _logits(q)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < tol  # rounded, and close to the float head


def test_lm_head_16_and_none_keep_float(gqa_source):
    for bits in (None, 16):
        m = load_model(gqa_source, torch.device("cpu"), torch.float32, quantization="int8", lm_head_bits=bits)
        assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear) and not isinstance(m.lm_head, QuantLinear)


def test_tied_head_stays_float(tmp_path):
    src = open_weights(make_tiny_hf_model(tmp_path / "tied", "llama_tied"), show_progress=False)
    m = load_model(src, torch.device("cpu"), torch.float32, lm_head_bits=8)
    assert not isinstance(m.lm_head, QuantLinear) and m.lm_head.weight is m.model.embed_tokens.weight


def test_planning_scheme_counts_the_head(gqa_source):
    from vramwise.memory.budget import WeightFormat
    from vramwise.memory.enforce import planning_scheme

    plain = planning_scheme("int4", gqa_source, torch.device("cuda"), torch.float16)
    int8 = planning_scheme("int4", gqa_source, torch.device("cuda"), torch.float16, lm_head_bits=8)
    assert int8.lm_head == WeightFormat.for_bits(8) and plain.lm_head != int8.lm_head
    assert int8.linear == plain.linear


def test_cli_flag(capsys):
    p = build_parser()
    args = p.parse_args(["generate", "hi", "--lm-head-bits", "8"])
    assert make_engine_config(args).lm_head_bits == 8
    assert make_engine_config(p.parse_args(["generate", "hi"])).lm_head_bits is None
    with pytest.raises(SystemExit) as e:
        p.parse_args(["generate", "hi", "--lm-head-bits", "3"])
    assert e.value.code == 2 and "--lm-head-bits" in capsys.readouterr().err
