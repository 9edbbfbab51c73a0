"""Every method's selection loop compiles as one graph at the sizes users run (N = 576: LLaVA-1.5,
N = 2880: LLaVA-1.6's five crops), batch 1 and a ragged batch of 4, and gives eager's indices:
proof that it never syncs with the host. D is small (the claim is about N; D only scales the
products). The graphs are traced with the "eager" backend (dynamo's full-graph capture, the part
that fails on a host sync or an unsupported op); one test also runs CPU inductor end to end."""

import pytest
import torch

import otprune
from otprune.methods.base import valid_mask
from otprune.selection import compiled_select

D = 64


def padded_batch(n: int, bsz: int, seed: int = 0):
    """(features (B, N, D) with zero padding, lengths, k, k_max): one sample shorter than k_max."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, D, generator=gen)
    x[0, 7] = x[0, 2]  # an exact duplicate: OTPrune's duplicate check runs inside the graph
    x[0, 11] = -x[0, 3]  # an exact negation: it ties like a copy
    if bsz == 1:
        lengths, k = torch.tensor([n]), torch.tensor([16])
    else:
        lengths = torch.tensor([n, n - 37, n // 3, 5])[:bsz]
        k = torch.tensor([16, 12, 7, 3])[:bsz]  # k_max 16 > the last sample's 5 tokens
    x = x.masked_fill(~valid_mask(lengths, n)[..., None], 0.0)
    return x, lengths, k, int(k.max())


def assert_compiled_equals_eager(method, x, lengths, k, k_max, backend="eager"):
    torch._dynamo.reset()
    compiled = torch.compile(method.select, fullgraph=True, backend=backend, dynamic=False)
    expected = method.select(x, lengths, k, k_max)
    got = compiled(x, lengths, k, k_max)
    slots = torch.arange(k_max) < k[:, None]
    assert torch.equal(got[slots], expected[slots])
    assert bool((got[~slots] == -1).all()) and bool((expected[~slots] == -1).all())


@pytest.mark.parametrize("bsz", [1, 4])
@pytest.mark.parametrize("n", [576, 2880])
@pytest.mark.parametrize("name", list(otprune.METHODS))
def test_fullgraph_compile_gives_eager_indices_at_real_sizes(name, n, bsz):
    assert_compiled_equals_eager(otprune.get_method(name), *padded_batch(n, bsz))


def test_otprune_compiles_at_the_paper_budget():
    # K = round(0.098 * 576) = 56 steps of the loop, a ragged batch of 4
    x, lengths, _, _ = padded_batch(576, 4, seed=1)
    k = otprune.keep_counts(0.098, lengths)
    assert_compiled_equals_eager(otprune.get_method("otprune"), x, lengths, k, int(k.max()))


def test_otprune_compiles_with_cpu_inductor():
    x, lengths, _, _ = padded_batch(576, 4, seed=2)
    k = torch.tensor([6, 4, 3, 2])  # a short loop: inductor's compile time grows with the steps
    assert_compiled_equals_eager(otprune.get_method("otprune"), x, lengths, k, 6, backend="inductor")


def test_select_tokens_compiled_switch(monkeypatch):
    x, lengths, _, _ = padded_batch(576, 4, seed=3)
    eager = otprune.select_tokens(x, 0.05, lengths=lengths, compiled=False)
    calls = []
    import otprune.selection as selection

    def spy(selector, device):
        calls.append(selector.name)
        return lambda *args: torch.compile(selector.select, fullgraph=True, backend="eager", dynamic=False)(*args)

    monkeypatch.setattr(selection, "compiled_select", spy)
    torch._dynamo.reset()
    assert torch.equal(otprune.select_tokens(x, 0.05, lengths=lengths, compiled=True), eager)
    monkeypatch.setenv("OTPRUNE_COMPILE", "1")
    assert torch.equal(otprune.select_tokens(x, 0.05, lengths=lengths), eager)
    monkeypatch.setenv("OTPRUNE_COMPILE", "0")
    otprune.select_tokens(x, 0.05, lengths=lengths)
    assert calls == ["otprune", "otprune"]  # off by default / with 0: the eager (host) loop


def test_compiled_select_is_cached_per_method_and_device():
    a = compiled_select(otprune.get_method("otprune", gamma=0.02), torch.device("cpu"))
    assert compiled_select(otprune.get_method("otprune", gamma=0.02), torch.device("cpu")) is a
    assert compiled_select(otprune.get_method("otprune"), torch.device("cpu")) is not a


def test_compiled_run_still_refuses_nan():
    x = torch.randn(1, 40, 8)
    x[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        otprune.select_tokens(x, 0.2, compiled=True)
