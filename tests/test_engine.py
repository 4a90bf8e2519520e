"""Engine behaviour on the real bundled model: batching invariance, preemption, streaming, stops, errors."""

from __future__ import annotations

import pytest

from vramwise.llm import LLM
from vramwise.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "List three colours:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The boiling point of water is",
    "Translate to French: good morning",
    "2 + 2 =",
    "My favourite fruit is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(bundled_llm):
    return [bundled_llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def test_batch_of_8_equals_each_alone(bundled_llm, alone):
    outs = bundled_llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_batch_equals_alone_under_preemption(alone):
    # Each request needs 2 blocks of 16 tokens by its end; 8 of them cannot fit in 9 blocks.
    small = LLM(device="cpu", max_model_len=256, num_kv_blocks=9, show_progress=False)
    outs = small.generate(PROMPTS, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert small.engine.kv_blocks_used == 0


def test_streaming_deltas_add_up_and_chat_answers(bundled_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = bundled_llm.chat_prompt(msgs)
    pieces = []
    last = None
    for out in bundled_llm.stream(prompt, SamplingParams(temperature=0, max_tokens=32)):
        pieces.append(out.outputs[0].text_delta)
        last = out
    assert last.finished and last.outputs[0].finish_reason == "stop"  # <|im_end|> ends the turn
    assert "".join(pieces) == last.outputs[0].text
    assert "Paris" in last.outputs[0].text
    assert bundled_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text == last.outputs[0].text


def test_multibyte_characters_stream_intact(bundled_llm):
    prompt = "Écris une phrase en français avec des accents: é, è, à, ç. Puis un emoji 😀:"
    pieces = [o.outputs[0].text_delta for o in bundled_llm.stream(prompt, SamplingParams(temperature=0, max_tokens=24))]
    text = "".join(pieces)
    assert "\ufffd" not in text
    assert text == bundled_llm.tokenizer.decode(
        bundled_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].token_ids
    )


def test_stop_string_cuts_and_is_not_streamed(bundled_llm):
    base = bundled_llm.generate([PROMPTS[3]], GREEDY)[0].outputs[0].text
    words = base.split()
    assert len(words) > 3
    stop = words[2]
    out = bundled_llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=16, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == base[: base.index(stop)]
    streamed = "".join(o.outputs[0].text_delta for o in bundled_llm.stream(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16, stop=[stop])))
    assert streamed == out.outputs[0].text


def test_seed_repeats_and_n_choices(bundled_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=42, n=3)
    a = bundled_llm.generate([PROMPTS[0]], p)[0]
    b = bundled_llm.generate([PROMPTS[0]], p)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_max_tokens_and_length_finish(bundled_llm):
    out = bundled_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_prompt_logprobs_match_score(bundled_llm):
    import torch

    ids = bundled_llm.tokenizer.encode(PROMPTS[4])
    out = bundled_llm.generate([ids], SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=0))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    lp = torch.log_softmax(bundled_llm.engine.score(ids), dim=-1)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i][0] - lp[i - 1, ids[i]].item()) < 1e-4


def test_bad_input_clear_errors_and_engine_keeps_working(bundled_llm):
    with pytest.raises(ValueError, match="maximum context length is 1024.*in the prompt"):
        bundled_llm.generate(["word " * 1100], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        bundled_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bundled_llm.generate([[1, 2, 10**7]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        bundled_llm.generate([""], SamplingParams(max_tokens=2))
    assert bundled_llm.engine.kv_blocks_used == 0
    assert bundled_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids


def test_offload_placement_flag_gives_identical_outputs(alone):
    # Streamed layers run through a ring of 2 slots (CPU as both sides here), CPU layers in host memory.
    llm = LLM(device="cpu", max_model_len=256, offload="resident:10,streamed:10,cpu:10", show_progress=False)
    assert llm.engine.offload is not None and "streamed" in llm.engine.placement_name
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_bad_offload_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="placement"):
        LLM(device="cpu", offload="resident:99", show_progress=False)


def test_frozen_gc_freezes_and_restores(monkeypatch):
    import gc

    from vramwise.engine.llm_engine import frozen_gc

    gc.unfreeze()
    with frozen_gc():
        assert gc.get_freeze_count() > 0  # what was alive is out of the collector's walks
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv("VRAMWISE_GC_FREEZE", "0")
    with frozen_gc():
        assert gc.get_freeze_count() == 0


def test_failed_step_then_aborts_leave_a_healthy_engine(tmp_path, monkeypatch):
    from fixtures import make_tiny_hf_model

    from vramwise.config import EngineConfig, SchedulerConfig
    from vramwise.engine.llm_engine import LLMEngine
    from vramwise.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=make_tiny_hf_model(tmp_path / "m", "llama_gqa"), device="cpu",
                                 show_progress=False, scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=64)))
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(prompts):
        for i, ids in enumerate(prompts):
            eng.add_request(f"r{i}-{len(ids)}", ids, p)
        out = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        return out

    prompts = [[5, 17, 99, 3], [9, 9, 2]]
    want = run(prompts)
    assert eng.check_health() is None
    for i, ids in enumerate(prompts):
        eng.add_request(f"x{i}", ids, p)
    eng.step()  # both prefilled, blocks held
    real = eng.runner.run, eng.runner.launch

    def fail(*args):
        raise RuntimeError("simulated")

    monkeypatch.setattr(eng.runner, "run", fail)  # the synchronous path and the launched one (async scheduling)
    monkeypatch.setattr(eng.runner, "launch", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.step()
    assert "still in the engine" in eng.check_health()
    for i in range(len(prompts)):
        assert eng.abort_request(f"x{i}")
    assert eng.check_health() is None  # every block back, nothing scheduled
    monkeypatch.setattr(eng.runner, "run", real[0])
    monkeypatch.setattr(eng.runner, "launch", real[1])
    assert run(prompts) == want  # and it serves the same answers again
