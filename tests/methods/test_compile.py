"""Every method's selection loop compiles as one graph: proof that it never syncs with the host."""

import pytest
import torch

import otprune
from otprune.methods.base import valid_mask


@pytest.mark.parametrize("name", list(otprune.METHODS))
def test_fullgraph_compile_gives_same_indices(name):
    torch._dynamo.reset()
    method = otprune.get_method(name)
    x = torch.randn(3, 24, 16)
    x[0, 7] = x[0, 2]  # an exact duplicate: OTPrune's duplicate check runs inside the graph
    lengths = torch.tensor([24, 17, 9])
    k = otprune.keep_counts(0.25, lengths)
    x = x.masked_fill(~valid_mask(lengths, 24)[..., None], 0.0)
    compiled = torch.compile(method.select, fullgraph=True, backend="eager", dynamic=False)
    expected = method.select(x, lengths, k, 6)
    got = compiled(x, lengths, k, 6)
    slots = torch.arange(6) < k[:, None]
    assert torch.equal(got[slots], expected[slots])
