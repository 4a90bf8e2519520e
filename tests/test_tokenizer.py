"""Tokenizer wrapper, chat template, GGUF tokenizer cache and streaming detokenization."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from fixtures import CHATML_TEMPLATE, make_tiny_tokenizer
from vramwise.tokenizer import IncrementalDetokenizer, Tokenizer, tokenizer_cache_dir

# Multi-byte UTF-8 of every length: accents (2 bytes), CJK (3), emoji (4, and joined sequences).
MIXED_TEXT = "Crème brûlée, naïve façade — 日本語のテキスト 中文 한국어; emoji 🎉🚀 👩‍💻 and ÅÄÖ åäö ß. The end!"


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer(make_tiny_tokenizer(), source="tiny")


def stream(tok: Tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(t) for t in output]
    pieces.append(detok.finish())
    return pieces


# ---- tiny byte-level tokenizer (fast) -----------------------------------------------------------------


def test_encode_decode_round_trip(tiny_tok):
    ids = tiny_tok.encode(MIXED_TEXT)
    assert all(0 <= i < tiny_tok.vocab_size for i in ids)
    assert tiny_tok.decode(ids) == MIXED_TEXT
    assert tiny_tok.vocab_size == 288 and tiny_tok.bos_token_id == 1


def test_special_tokens_skipped_or_kept(tiny_tok):
    ids = tiny_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny_tok.decode(ids) == "user\nhi"
    assert tiny_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template_chatml(tiny_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tiny_tok.render_chat(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tok.apply_chat_template(messages)
    assert ids == tiny_tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3  # <|im_start|> encoded as the single special id, never split
    assert not tiny_tok.render_chat(messages, add_generation_prompt=False).endswith("assistant\n")


def test_eos_ids_include_end_of_turn_from_template():
    hf = make_tiny_tokenizer()
    hf.eos_token = "<|endoftext|>"  # like a base model whose chat template ends turns with <|im_end|>
    tok = Tokenizer(hf, extra_eos_token_ids=[7])
    assert tok.eos_token_ids == {0, 2, 7}
    hf.chat_template = None
    assert Tokenizer(hf).eos_token_ids == {0}


def test_no_chat_template_is_a_clear_value_error():
    hf = make_tiny_tokenizer()
    hf.chat_template = None
    tok = Tokenizer(hf, source="base-model")
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_error_is_a_value_error():
    hf = make_tiny_tokenizer()
    hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("prompt", ["", "Say something:", "日本"])
def test_incremental_detokenizer_equals_full_decode(tiny_tok, prompt):
    prompt_ids = tiny_tok.encode(prompt)
    output = tiny_tok.encode(MIXED_TEXT)
    pieces = stream(tiny_tok, prompt_ids, output)
    assert "".join(pieces) == tiny_tok.decode(output) == MIXED_TEXT
    # The tiny vocabulary has no multi-byte tokens, so every non-ASCII character spans several tokens;
    # none of them may leak out as a replacement character.
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 10  # held back while a character was incomplete


def test_incremental_detokenizer_with_special_tokens(tiny_tok):
    output = tiny_tok.encode("Hello<|im_end|> wörld<|im_start|>")
    assert "".join(stream(tiny_tok, [], output)) == tiny_tok.decode(output) == "Hello wörld"
    kept = stream(tiny_tok, [], output, skip_special_tokens=False)
    assert "".join(kept) == tiny_tok.decode(output, skip_special_tokens=False)


def test_incremental_detokenizer_random_bytes(tiny_tok):
    """Random token sequences, including invalid UTF-8: pieces + finish() still equal the full decode."""
    rng = random.Random(0)
    for _ in range(50):
        output = [rng.randrange(3, tiny_tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tiny_tok, [5, 6], output)) == tiny_tok.decode(output)


def test_incremental_detokenizer_window_stays_small(tiny_tok):
    detok = IncrementalDetokenizer(tiny_tok, list(range(3, 2000)))
    ids = tiny_tok.encode("The rain in Spain stays mainly in the plain. " * 100)
    text = "".join(detok.add(t) for t in ids)
    assert text == tiny_tok.decode(ids)
    assert len(detok._ids) < 100  # only the decode window is kept, not the whole sequence


def test_gguf_tokenizer_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tokenizer_cache_dir() == tmp_path / "vramwise" / "tokenizers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tokenizer_cache_dir() == Path.home() / ".cache" / "vramwise" / "tokenizers"


def test_gguf_tokenizer_second_load_uses_cache(tmp_path, monkeypatch):
    import transformers

    from fixtures import make_tiny_hf_model, write_tiny_gguf

    hf_dir = make_tiny_hf_model(tmp_path / "hf", "llama_tied")
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_dir)
    calls: list[dict] = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    first = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    second = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    assert [("gguf_file" in c) for c in calls] == [True, False]
    assert first.encode(MIXED_TEXT) == second.encode(MIXED_TEXT)
    assert second.chat_template == CHATML_TEMPLATE
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("m-")  # no temporary directories left behind

    # A damaged entry is rebuilt rather than breaking the model.
    for f in entries[0].iterdir():
        f.write_text("{ not json")
    third = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    assert third.encode(MIXED_TEXT) == first.encode(MIXED_TEXT)


# ---- the real SmolLM2 tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    from vramwise.weights import open_weights

    return open_weights(None, show_progress=False).load_tokenizer()


@pytest.mark.slow
def test_smollm2_chat_template(smol_tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = smol_tok.render_chat(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol_tok.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>=1, <|im_end|>=2
    assert smol_tok.decode(ids, skip_special_tokens=False) == text
    assert smol_tok.eos_token_ids == {2}
    assert smol_tok.bos_token_id == 1 and smol_tok.vocab_size == 49152


@pytest.mark.slow
def test_smollm2_matches_transformers_tokenizer(smol_tok):
    from transformers import AutoTokenizer

    from vramwise.weights import bundled_model_path

    path = Path(bundled_model_path())
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world", MIXED_TEXT, "  leading spaces\nand\ttabs", "def f(x):\n    return x**2"]:
        assert smol_tok.encode(text) == ref.encode(text)
        assert smol_tok.decode(smol_tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_incremental_detokenizer(smol_tok):
    prompt = smol_tok.apply_chat_template([{"role": "user", "content": "Write in many languages."}])
    output = smol_tok.encode(MIXED_TEXT) + [2]
    pieces = stream(smol_tok, prompt, output)
    assert "".join(pieces) == smol_tok.decode(output) == MIXED_TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_smollm2_tokenizer_loads_fast_from_cache():
    from vramwise.weights import bundled_model_path

    Tokenizer.from_gguf(bundled_model_path())  # converted by the fixture or an earlier run
    t0 = time.perf_counter()
    Tokenizer.from_gguf(bundled_model_path())
    assert time.perf_counter() - t0 < 5.0  # conversion takes ~8 s; the cached load ~0.4 s
