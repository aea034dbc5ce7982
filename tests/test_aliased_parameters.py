"""Finite differences refuse parameters that overlap in memory; exact paths accept them.

A model whose parameters are views of one buffer (as TransformerLens' TransformerBridge
keeps GPT-2's fused qkv weight beside q, k and v views) is differentiated correctly by
autograd, which treats every parameter as an independent leaf; a finite difference moves
parameters in place, so overlapping ones would silently corrupt the step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    cross_entropy_loss_of_output,
    match_names,
    supervised_forward,
    supervised_loss,
)
from hessian_eigenthings.operators._aliasing import overlapping_parameters
from tests.helpers import dense_hessian, rel_err


class Aliased(nn.Module):
    """``fused`` is a (2, 6) parameter; ``first`` and ``second`` are views of its rows."""

    def __init__(self, overlap: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        buf = torch.randn(2, 6, dtype=torch.float64)
        self.fused = nn.Parameter(buf)
        self.first = nn.Parameter(buf[0].view(2, 3))
        self.second = nn.Parameter(buf[1].view(2, 3))
        if not overlap:  # the fused copy gets its own memory
            self.fused = nn.Parameter(buf.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.first.T) @ self.second + 0 * self.fused.sum()


def _data():
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(5, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen),
        )
    ]


LOSS = supervised_loss(nn.CrossEntropyLoss())


def test_overlap_detection():
    named = list(Aliased(overlap=True).named_parameters())
    assert sorted(map(sorted, overlapping_parameters(named))) == [
        ["first", "fused"],
        ["fused", "second"],
    ]
    assert overlapping_parameters(list(Aliased(overlap=False).named_parameters())) == []
    buf = torch.zeros(10)
    assert overlapping_parameters([("a", buf[:5]), ("b", buf[5:])]) == []  # same storage, disjoint
    assert overlapping_parameters([("a", buf[::2]), ("b", buf[1::2])]) == []  # interleaved
    assert overlapping_parameters([("a", buf[::2]), ("b", buf[2:5])]) == [("a", "b")]
    mat = torch.zeros(4, 6)  # column blocks of one matrix, transposed (as the bridge's q, k, v)
    cols = [("q", mat[:, :2].T), ("k", mat[:, 2:4].T), ("v", mat[:, 4:].T)]
    assert overlapping_parameters(cols) == []
    assert overlapping_parameters([*cols, ("qkv", mat)]) == [("q", "qkv")]


def test_finite_differences_refuse_overlapping_parameters():
    model, data = Aliased(overlap=True), _data()
    with pytest.raises(ValueError, match="share memory.*fused"):
        HessianOperator(model, data, LOSS, method="finite_difference")
    lo = cross_entropy_loss_of_output()
    with pytest.raises(ValueError, match="share memory"):
        GGNOperator(model, data, supervised_forward, lo, jvp="finite_difference")
    per_sample = supervised_loss(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="share memory"):
        EmpiricalFisherOperator(model, data, per_sample, jvp="finite_difference")


def test_exact_path_and_disjoint_selection_are_correct():
    model, data = Aliased(overlap=True), _data()
    names = [n for n, _ in model.named_parameters()]
    dense = dense_hessian(model, data, LOSS, names)
    H = HessianOperator(model, data, LOSS)  # autograd: every parameter an independent leaf
    v = torch.randn(H.size, dtype=torch.float64)
    assert rel_err(H @ v, dense @ v) < 1e-12
    keep = ~match_names("fused")
    fd = HessianOperator(model, data, LOSS, method="finite_difference", param_filter=keep)
    exact = HessianOperator(model, data, LOSS, param_filter=keep)
    w = torch.randn(fd.size, dtype=torch.float64)
    assert rel_err(fd @ w, exact @ w) < 1e-8
