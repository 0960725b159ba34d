"""Sampling inside the decode step: the distribution against Hugging Face's logits warpers,
the draws against that distribution, and GraphDecoder with it."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import deltatune as dt
from deltatune.kernels.graph_decode import GraphDecoder
from deltatune.kernels.sampling import Sampling
from tests.kernels.test_graph_decode import _model


def _hf_probabilities(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        warpers.append(TopPLogitsWarper(s.top_p))
    return warpers(None, logits.clone()).softmax(-1)


@pytest.mark.parametrize("s", [Sampling(), Sampling(temperature=0.7), Sampling(top_k=5),
                               Sampling(top_p=0.6), Sampling(temperature=1.3, top_k=20,
                                                             top_p=0.9)], ids=repr)
def test_probabilities_equal_hf_logits_warpers(s):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.allclose(s.probabilities(logits), _hf_probabilities(logits, s), atol=1e-6)


def test_draws_follow_the_probabilities():
    s = Sampling(temperature=0.8, top_k=6, top_p=0.95)
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(1)) * 2
    p = s.probabilities(logits)[0]
    torch.manual_seed(0)
    draws = s.draw(logits.expand(200_000, -1))
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert (freq[p == 0] == 0).all()  # filtered tokens are never drawn
    assert (freq - p.double()).abs().max() < 0.006  # ~5 standard errors at 200k draws


def test_settings_out_of_range_are_refused():
    for bad, field in [(dict(temperature=0), "temperature"), (dict(top_k=-1), "top_k"),
                       (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(dt.ConfigError, match=field):
            Sampling(**bad)


def test_decoder_samples_from_the_model_and_top_k_1_is_greedy():
    dm = _model()
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    greedy = GraphDecoder(dm, 2, 16).generate(prompt.repeat(2, 1), 6)
    assert torch.equal(GraphDecoder(dm, 2, 16, sampling=Sampling(top_k=1)).generate(
        prompt.repeat(2, 1), 6), greedy)
    # the first token of 400 identical rows against the model's own distribution
    s = Sampling(temperature=0.5, top_k=4)
    with torch.no_grad():
        p = s.probabilities(dm(input_ids=prompt).logits[:, -1])[0]
    torch.manual_seed(1)
    first = GraphDecoder(dm, 400, 8, sampling=s).generate(prompt.repeat(400, 1), 1)[:, 0]
    freq = torch.bincount(first, minlength=p.numel()).double() / first.numel()
    assert (freq[p == 0] == 0).all() and (freq - p.double()).abs().max() < 0.1
    # the same seed gives the same tokens; another seed other ones
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(GraphDecoder(dm, 8, 16, sampling=Sampling()).generate(
            prompt.repeat(8, 1), 6))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_sampling_draws_fresh_tokens_each_replay():
    dm = _model().cuda()
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3)).cuda()
    rows = prompt.repeat(64, 1)
    greedy = GraphDecoder(dm, 64, 16).generate(rows, 6)
    assert torch.equal(GraphDecoder(dm, 64, 16, sampling=Sampling(top_k=1)).generate(rows, 6),
                       greedy)
    s = Sampling(temperature=0.7, top_k=4)
    gd = GraphDecoder(dm, 64, 16, sampling=s)
    first, second = gd.generate(rows, 6), gd.generate(rows, 6)
    assert gd.captures == 2 and not torch.equal(first, second)  # new numbers per replay
    with torch.no_grad():
        p = s.probabilities(dm(input_ids=prompt).logits[:, -1])[0]
    assert p[first[:, 0]].min() > 0  # only tokens the filters keep
