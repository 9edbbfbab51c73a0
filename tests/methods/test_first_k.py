import torch

import otprune


def test_first_k():
    assert otprune.select_tokens(torch.randn(10, 3), 4, "FIRSTK").tolist() == [0, 1, 2, 3]
    batch = otprune.select_tokens(torch.randn(2, 10, 3), 0.5, "first_k", lengths=[10, 4])
    assert batch.tolist() == [[0, 1, 2, 3, 4], [0, 1, -1, -1, -1]]
