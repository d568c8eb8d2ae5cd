"""The transformers engine's sampling rule, `sample_token`, on hand-made logits (no model, no threads)."""

from __future__ import annotations

import math

import pytest
import torch

from sp2dpo.serve.protocol import SamplingOptions
from sp2dpo.serve.transformers_engine import sample_token

# Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _options(**kw) -> SamplingOptions:
    return SamplingOptions(max_tokens=None, **kw)


def _draws(n: int, seed: int = 0, **kw) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample_token(LOGITS, _options(**kw), generator).token_id for _ in range(n)]


def test_greedy_takes_the_argmax_and_reports_no_logprobs_unless_asked():
    step = sample_token(torch.tensor([0.1, 2.0, -1.0]), _options(temperature=0))
    assert (step.token_id, step.logprob, step.top) == (1, None, None)


def test_logprobs_are_the_raw_log_softmax_best_first_whatever_the_temperature():
    logits = torch.tensor([0.3, 1.5, -2.0, 0.9])
    expected = torch.log_softmax(logits, dim=-1)
    for temperature in (0, 0.5, 2.0):
        step = sample_token(logits, _options(temperature=temperature, top_logprobs=2), torch.Generator().manual_seed(1))
        assert step.logprob == pytest.approx(float(expected[step.token_id]))
        assert [t for t, _ in step.top] == [1, 3]
        assert [v for _, v in step.top] == pytest.approx([float(expected[1]), float(expected[3])])
    only_sampled = sample_token(logits, _options(temperature=0, top_logprobs=0))
    assert only_sampled.top == [] and only_sampled.logprob == pytest.approx(float(expected[1]))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # Mass before each token: 0, 0.5, 0.8, 0.95 → top_p=0.7 keeps tokens 0 and 1 only.
    assert set(_draws(300, top_p=0.7)) == {0, 1}
    # A top_p below the best token's probability still keeps the best token.
    assert set(_draws(50, top_p=0.1)) == {0}


def test_temperature_sampling_follows_the_distribution_and_the_seed():
    draws = _draws(4000, seed=3)
    assert draws == _draws(4000, seed=3)
    assert draws != _draws(4000, seed=4)
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert draws.count(token) / len(draws) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(draws)))
    # A low temperature sharpens towards the best token.
    assert _draws(500, seed=3, temperature=0.1).count(0) > 480
