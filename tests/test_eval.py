"""Perplexity: the window arithmetic, the CLI on a tiny model, and the cached reference texts."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import TINY_VOCAB_SIZE, make_tiny_hf_model

from vramwise.eval.perplexity import perplexity, perplexity_from_logits, reference_text


def test_perplexity_from_logits_is_the_mean_next_token_nll():
    logits = torch.randn(6, 10)
    window = [1, 4, 2, 9, 0, 3]
    total, count = perplexity_from_logits(logits, window)
    expect = -sum(torch.log_softmax(logits[i], -1)[window[i + 1]].item() for i in range(5))
    assert count == 5 and total == pytest.approx(expect, rel=1e-6)


def test_non_overlapping_windows_and_counts():
    seen: list[list[int]] = []

    def uniform(window: list[int]) -> torch.Tensor:
        seen.append(window)
        return torch.zeros(len(window), 50)  # every token has probability 1/50

    ids = [i % 50 for i in range(1000)]
    res = perplexity(uniform, ids, context=128, max_tokens=700)
    assert res.windows == 5 and res.tokens == 5 * 127  # 700 // 128 windows; the first token of each is not scored
    assert seen == [ids[i * 128 : (i + 1) * 128] for i in range(5)]  # consecutive, no overlap
    assert res.perplexity == pytest.approx(50.0)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(uniform, ids[:100], context=128)


def test_eval_perplexity_cli_on_a_tiny_model(tmp_path, capsys):
    from vramwise.cli import main

    model = make_tiny_hf_model(tmp_path / "m", "llama_gqa")
    text = tmp_path / "t.txt"
    text.write_text("it is the east, and juliet is the sun. arise, fair sun, and kill the envious moon. " * 30)
    assert main(["eval", "perplexity", model, "--text", str(text), "--context", "64", "--max-tokens", "500",
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert fields["windows"] == "7" and fields["tokens"] == str(7 * 63) and fields["context"] == "64"
    ppl = float(fields["perplexity"])
    assert 1.0 < ppl < 10 * TINY_VOCAB_SIZE and math.isfinite(ppl)
    # The same with RTN at load: a different (but close) number from the same windows.
    assert main(["eval", "perplexity", model, "--text", str(text), "--context", "64", "--max-tokens", "500",
                 "--quiet", "--device", "cpu", "--quantization", "int8"]) == 0
    ppl8 = float(dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())["perplexity"])
    assert ppl8 == pytest.approx(ppl, rel=0.05)


def test_eval_cli_errors(tmp_path, capsys):
    from vramwise.cli import main

    assert main(["eval", "perplexity", "--text", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_reference_text_uses_its_cache(tmp_path):
    (tmp_path / "hamlet.txt").write_text("To be, or not to be", encoding="utf-8")
    assert reference_text("hamlet", cache_dir=tmp_path) == "To be, or not to be"
    with pytest.raises(ValueError, match="unknown text"):
        reference_text("ulysses", cache_dir=tmp_path)
