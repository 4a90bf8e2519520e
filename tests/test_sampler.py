"""Sampler: truncation keeps exactly the right token sets; seeds repeat; penalties do what they say."""

import math

import pytest
import torch

from vramwise.sampler import Sampler, SampleRow, apply_penalties, top_k_top_p_min_p_mask
from vramwise.sampling_params import SamplingParams


def logits_from_probs(p: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(x) for x in p])


PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # order by prob: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)


def kept(**kw) -> set[int]:
    mask = top_k_top_p_min_p_mask(logits_from_probs(PROBS), kw.get("k", 0), kw.get("p", 1.0), kw.get("min_p", 0.0))
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.parametrize("k,expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (0, {0, 1, 2, 3, 4})])
def test_top_k(k, expected):
    assert kept(k=k) == expected


@pytest.mark.parametrize(
    "p,expected",
    [(0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (0.96, {0, 1, 2, 3, 4}), (0.01, {1})],
)
def test_top_p_smallest_set_reaching_mass(p, expected):
    assert kept(p=p) == expected


@pytest.mark.parametrize("m,expected", [(0.5, {1, 3}), (0.75, {1, 3}), (0.76, {1}), (0.25, {1, 3, 4, 2}), (0.1, {0, 1, 2, 3, 4})])
def test_min_p_relative_to_max(m, expected):
    assert kept(min_p=m) == expected


def test_top_k_then_top_p_renormalises():
    # after top-k=3 the kept mass is .85: .4/.85 = .47 < .5, so top-p .5 needs tokens 1 and 3
    assert kept(k=3, p=0.5) == {1, 3}


def row(params: SamplingParams, gen=None, out=None) -> SampleRow:
    return SampleRow(params, [9], out or [], gen)


def test_seeded_sampling_repeats_and_ignores_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=123)

    def draw(batch: torch.Tensor, idx: int, n: int = 20) -> list[int]:
        g = torch.Generator().manual_seed(123)
        s = Sampler(seed=7)
        toks = []
        for _ in range(n):
            rows = [row(SamplingParams(temperature=1.0)) for _ in range(batch.shape[0])]
            rows[idx] = row(p, g)
            toks.append(s(batch.clone(), rows).token_ids[idx])
        return toks

    a = draw(logits[:1], 0)
    b = draw(logits[[3, 1, 0]], 2)  # same row, other neighbours
    c = draw(logits[:1], 0)
    assert a == b == c
    assert len(set(a)) > 1  # it really samples


def test_sampling_follows_distribution():
    g = torch.Generator().manual_seed(0)
    logits = logits_from_probs([0.7, 0.2, 0.1]).unsqueeze(0)
    s = Sampler()
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[s(logits.clone(), [row(SamplingParams(temperature=1.0), g)]).token_ids[0]] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.04 and abs(counts[2] / 2000 - 0.1) < 0.03


def test_greedy_and_truncated_sampling_never_leave_the_kept_set():
    g = torch.Generator().manual_seed(1)
    logits = logits_from_probs(PROBS).unsqueeze(0)
    s = Sampler()
    assert s(logits.clone(), [row(SamplingParams(temperature=0))]).token_ids == [1]
    seen = {s(logits.clone(), [row(SamplingParams(temperature=1.0, top_k=2), g)]).token_ids[0] for _ in range(200)}
    assert seen == {1, 3}


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits.clone(), [SampleRow(SamplingParams(repetition_penalty=2.0), [0], [1], None)])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    out = apply_penalties(
        logits.clone(), [SampleRow(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [2, 2, 3], None)]
    )
    assert out.tolist() == [[2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]]


def test_logprobs_are_of_the_raw_distribution():
    logits = logits_from_probs(PROBS).unsqueeze(0)
    o = Sampler()(logits.clone(), [row(SamplingParams(temperature=0, logprobs=2))])
    chosen, top = o.logprobs[0]
    assert math.isclose(chosen, math.log(0.4), rel_tol=1e-5)
    assert [t for t, _ in top] == [1, 3]


@pytest.mark.parametrize(
    "kw,param",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"min_p": 2}, "min_p"), ({"n": 0}, "n"), ({"logprobs": 30}, "logprobs")],
)
def test_bad_params_name_the_param(kw, param):
    with pytest.raises(ValueError, match=param) as e:
        SamplingParams(**kw)
    assert e.value.param == param
