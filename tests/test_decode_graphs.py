"""Decode fast path (engine/cuda_graphs.py): outputs with graphs equal outputs with --enforce-eager.

On CPU the graph path runs in "emulate" mode: same ladder, padding rows, scratch block and static buffers,
the padded batch run eagerly instead of replayed. The CUDA test replays real graphs.
"""

from __future__ import annotations

import pytest

from fixtures import make_tiny_hf_model
from vramwise.engine.cuda_graphs import graph_ladder
from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

# Prompts of different lengths (token ids) and different max_tokens, so that sequences finish mid-run and
# the decode batch shrinks through non-ladder sizes (5 -> 4 -> 3 -> ...).
PROMPTS = [[5 + i, 40 + 3 * i, 77, 100 + i, 9][: 2 + i % 4] for i in range(5)]
MAX_TOKENS = [3, 12, 7, 20, 9]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS[: len(prompts)]]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_ladder():
    assert graph_ladder(1) == [1]
    assert graph_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert graph_ladder(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_ladder(0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("graphs") / "m", "llama_gqa")


@pytest.mark.parametrize("n_prompts", [1, 3, 5])
def test_emulated_graphs_equal_eager(tiny_model, n_prompts):
    kw = dict(device="cpu", max_model_len=64, max_num_seqs=6, num_kv_blocks=40, show_progress=False)
    eager = LLM(tiny_model, enforce_eager=True, **kw)
    graphs = LLM(tiny_model, decode_graphs="emulate", **kw)
    assert eager.engine.runner.graphs is None
    g = graphs.engine.runner.graphs
    assert g is not None and g.sizes == [1, 2, 4, 6]
    prompts = PROMPTS[:n_prompts]
    want = _generate(eager, prompts)
    got = _generate(graphs, prompts)
    assert got == want
    assert [len(t) for t in got] == MAX_TOKENS[:n_prompts]
    assert g.num_replays > 0  # the decode steps did take the padded path
    # The scratch block (past the block manager's range) is where padding rows wrote; batches of 3 and 5
    # pad to 4 and 6. A batch of 1 never pads, and its scratch page stays untouched.
    scratch = graphs.engine.runner.kv_cache.tensor[:, :, g.scratch_block]
    assert g.scratch_block == graphs.engine.block_manager.num_blocks
    assert bool(scratch.abs().sum() > 0) == (n_prompts in (3, 5))
    assert graphs.engine.kv_blocks_used == 0


def test_prompt_logprobs_and_prefill_steps_run_eagerly(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=64, max_num_seqs=4, decode_graphs="emulate", show_progress=False)
    eager = LLM(tiny_model, device="cpu", max_model_len=64, max_num_seqs=4, enforce_eager=True, show_progress=False)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    a = llm.generate([[7]], p)[0]  # a one-token prompt with prompt logprobs: its first step stays eager
    b = eager.generate([[7]], p)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.prompt_logprobs == b.prompt_logprobs
    assert llm.engine.runner.graphs.num_replays == 3  # the 3 decode steps after the prompt


def test_enforce_eager_flag_reaches_the_engine_config():
    import argparse

    from vramwise.cli import add_engine_args, make_engine_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert make_engine_config(p.parse_args(["--enforce-eager"])).enforce_eager is True
    assert make_engine_config(p.parse_args([])).enforce_eager is False


@pytest.mark.gpu
@pytest.mark.parametrize("quantization,dtype", [("none", "float32"), ("int4", "float16")])
def test_cuda_graphs_equal_emulated_replay(quantization, dtype):
    """The bundled model's shape with random weights: replayed graphs give the very tokens of the same padded
    steps run eagerly (same kernels, same shapes), including int4 and non-ladder batches. Random weights give
    flat logits, so the float case runs in fp32, where no near-tie can hide in rounding."""
    kw = dict(device="cuda", dtype=dtype, max_model_len=256, max_num_seqs=6, show_progress=False,
              quantization=quantization)
    emulated = LLM("random:smollm2-135m", decode_graphs="emulate", **kw)
    graphs = LLM("random:smollm2-135m", **kw)
    g = graphs.engine.runner.graphs
    assert g is not None and g.mode == "cuda" and set(g.graphs) == {1, 2, 4, 6}
    assert graphs.engine.runner.graph_pool_bytes > 0
    prompts = [[(17 * i + j) % 1000 + 3 for j in range(5 + 7 * i)] for i in range(5)]
    assert _generate(graphs, prompts) == _generate(emulated, prompts)
    assert g.num_replays > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_graphs_equal_enforce_eager_on_the_bundled_model(dtype):
    """Real weights (peaked logits), several batch sizes incl. non-ladder ones, sequences finishing mid-run."""
    kw = dict(device="cuda", dtype=dtype, max_model_len=256, max_num_seqs=6, show_progress=False)
    eager = LLM(enforce_eager=True, **kw)
    graphs = LLM(**kw)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    texts = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Once upon a time,", "2 + 2 ="]
    prompts = [graphs.tokenizer.encode(t) for t in texts]
    for n in (1, 3, 5):
        assert _generate(graphs, prompts[:n]) == _generate(eager, prompts[:n])
    assert graphs.engine.runner.graphs.num_replays > 0


@pytest.mark.gpu
def test_fused_kernels_in_the_model_match_torch_references_on_cuda(monkeypatch):
    """The model's Triton path (fused RMSNorm+residual, RoPE+KV write, SwiGLU) against the torch references
    of the same ops on the same GPU: logits close, greedy tokens equal on the real bundled model."""
    from vramwise.kernels import fused

    kw = dict(device="cuda", dtype="float16", max_model_len=256, show_progress=False, enforce_eager=True)
    llm = LLM(**kw)
    ids = llm.tokenizer.encode("The boiling point of water is 100 degrees Celsius, and")
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    triton_logits = llm.engine.score(ids)
    triton_tokens = llm.generate([ids], p)[0].outputs[0].token_ids
    monkeypatch.setattr(fused, "_use_triton", lambda x: False)
    torch_logits = llm.engine.score(ids)
    torch_tokens = llm.generate([ids], p)[0].outputs[0].token_ids
    # fp16 through 30 layers: the two paths round differently (fused adds, fp32 vs fp16 intermediates), so
    # single logits drift by a few 1e-2 (0.066 seen on an H200); the whole tensor stays within the fp16
    # golden tolerance used against transformers (relative Frobenius error), and greedy tokens agree.
    rel = ((triton_logits.float() - torch_logits.float()).norm() / torch_logits.float().norm()).item()
    assert rel < 5e-3, rel
    assert triton_tokens == torch_tokens
