import torch

import otprune


def test_even_strides():
    assert otprune.select_tokens(torch.randn(10, 3), 5, "uniform").tolist() == [1, 3, 5, 7, 9]
    assert otprune.select_tokens(torch.randn(576, 3), 0.098, "uniform").tolist() == [
        (2 * t + 1) * 576 // 112 for t in range(56)
    ]


def test_all():
    assert otprune.select_tokens(torch.randn(7, 3), 1.0, "uniform").tolist() == list(range(7))
