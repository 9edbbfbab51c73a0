import torch

import otprune


def test_last_k():
    assert otprune.select_tokens(torch.randn(10, 3), 4, "LASTK").tolist() == [6, 7, 8, 9]
    batch = otprune.select_tokens(torch.randn(2, 10, 3), 0.5, "last_k", lengths=[10, 4])
    assert batch.tolist() == [[5, 6, 7, 8, 9], [2, 3, -1, -1, -1]]
