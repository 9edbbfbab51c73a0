"""CDPruner against independent oracles: the relevance from its formula (numpy, fp64), the greedy
MAP of the conditional kernel by explicit determinants (`oracles.greedy_by_logdet`)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import cosine_kernel, greedy_by_logdet

import otprune
from otprune import PruneConfig
from otprune.methods.cdpruner import CDPruner, instruction_text, relevance_scores


def oracle_relevance(img: np.ndarray, txt: np.ndarray, theta: float = 0.0) -> np.ndarray:
    """r_i = -mean_m cos(e_i, t_m), min-max normalised with the 1e-6 offset; exp(theta/(2(1-theta)) r)."""
    r = np.array([-np.mean([e @ t / (np.linalg.norm(e) * np.linalg.norm(t)) for t in txt]) for e in img])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    return np.exp(theta / (2 * (1 - theta)) * r) if theta else r


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 0.9])
def test_relevance_matches_its_formula(theta):
    rng = np.random.default_rng(int(theta * 10))
    img, txt = rng.normal(size=(40, 12)), rng.normal(size=(3, 12))
    got = relevance_scores(torch.from_numpy(img), torch.from_numpy(txt), theta)
    np.testing.assert_allclose(got.numpy(), oracle_relevance(img, txt, theta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, d, k, seed", [(12, 20, 5, 0), (25, 64, 10, 1), (30, 6, 6, 2), (16, 16, 16, 3)])
def test_matches_explicit_logdet_greedy_of_the_conditional_kernel(n, d, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + rng.normal(size=(1, d))
    r = oracle_relevance(rng.normal(size=(n, 8)), rng.normal(size=(2, 8)))
    kernel = r[:, None] * cosine_kernel(x) * r[None, :]
    got = otprune.select_tokens(torch.from_numpy(x), k, "cdpruner", order="greedy", relevance=torch.from_numpy(r)[None])
    assert got.tolist() == greedy_by_logdet(kernel, k, min_gain=0.0)


def test_without_relevance_it_is_the_dpp_on_cosine():
    x = torch.randn(50, 16, dtype=torch.float64)
    assert torch.equal(otprune.select_tokens(x, 12, "cdpruner", order="greedy"),
                       otprune.select_tokens(x, 12, "dpp", order="greedy", eps=0.0))


def test_relevance_changes_the_picks_toward_relevant_tokens():
    x = torch.randn(60, 16, dtype=torch.float64)
    r = torch.full((1, 60), 1e-3, dtype=torch.float64)
    r[0, 40:] = 1.0  # only the last 20 tokens are relevant
    got = otprune.select_tokens(x, 10, "cdpruner", relevance=r)
    assert (got >= 40).all()


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
       ratio=st.floats(0.05, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batch_with_relevance_equals_alone(seed, lengths, ratio, dtype):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, 10, generator=g).to(dtype)
    r = torch.rand(len(lengths), n, generator=g).to(dtype) + 1e-3
    batch = otprune.select_tokens(x, ratio, "cdpruner", lengths=lengths, relevance=r)
    for b, length in enumerate(lengths):
        alone = otprune.select_tokens(x[b, :length], ratio, "cdpruner", relevance=r[b : b + 1, :length])
        assert batch[b, : alone.numel()].tolist() == alone.tolist()
        assert (batch[b, alone.numel():] == -1).all()


def test_paper_sizes_batched():
    g = torch.Generator().manual_seed(0)
    for n in (576, 2880):
        x = torch.randn(2, n, 64, generator=g)
        r = torch.rand(2, n, generator=g)
        picks = otprune.select_tokens(x, 0.111, "cdpruner", relevance=r)
        k = round(0.111 * n)
        assert picks.shape == (2, k)
        for b in range(2):
            assert len(set(picks[b].tolist())) == k
            assert picks[b].tolist() == otprune.select_tokens(x[b], 0.111, "cdpruner", relevance=r[b : b + 1]).tolist()


@pytest.mark.parametrize("theta", [-0.1, 1.0, 2, float("nan"), True, "x"])
def test_bad_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        CDPruner(theta=theta)


def test_bad_relevance():
    with pytest.raises(ValueError, match="relevance"):
        otprune.select_tokens(torch.randn(10, 4), 3, "cdpruner", relevance=torch.rand(1, 5))
    with pytest.raises(ValueError, match="relevance"):
        otprune.select_tokens(torch.randn(10, 4), 3, "cdpruner", relevance=-torch.rand(1, 10))
    with pytest.raises(ValueError, match="relevance"):
        CDPruner(relevance=torch.rand(10))


def test_switches():
    config = PruneConfig.from_env({"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.111", "CDPRUNER_THETA": "0.5"})
    assert (config.method, config.layer, config.theta) == ("cdpruner", 0, 0.5)
    with pytest.raises(ValueError, match="LAYER_INDEX=2.*only layer 0"):
        PruneConfig.from_env({"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "2"})
    with pytest.raises(ValueError, match="CDPRUNER_THETA"):
        PruneConfig.from_env({"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.1", "CDPRUNER_THETA": "1.5"})


def test_instruction_drops_the_short_answer_suffix():
    assert instruction_text("What is it?\nAnswer the question using a single word or phrase.") == "What is it?"


@pytest.mark.parametrize("tail, expected", [
    ("\nWhat is this? ASSISTANT:", "What is this?"),
    ("\nWhat is this?\nAnswer the question using a single word or phrase. ASSISTANT: A cat", "What is this?"),  # loglikelihood
    ("\nDescribe it. [/INST]", "Describe it."),
    ("  no tag at all  ", "no tag at all"),
])
def test_prompt_instruction_is_the_question_before_the_assistant_turn(tail, expected):
    from otprune.methods.cdpruner import prompt_instruction

    assert prompt_instruction(tail) == expected
