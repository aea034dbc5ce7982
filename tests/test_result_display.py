"""Results display compactly in consoles (repr) and notebooks (``_repr_html_``).

A result of a large model holds ``k x n`` eigenvectors; displaying it must show the
numbers that matter (eigenvalues, residuals, convergence, cost, error bars) and never
the vectors.
"""

from __future__ import annotations

import json
import re

import torch

from hessian_eigenthings import (
    EigenResult,
    LambdaOperator,
    lanczos,
    spectral_density,
    stochastic_power_iteration,
    trace,
)

N = 3000
A = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
A[-3:] = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
OP = LambdaOperator(lambda v: A * v, N, dtype=torch.float64)


def _numbers(text: str) -> int:
    return len(re.findall(r"-?\d+\.\d+", text))


def test_eigen_result_repr_and_html_are_compact_and_complete():
    res = lanczos(OP, k=3, seed=0)
    text = repr(res)
    assert text.startswith("EigenResult(k=3, method='lanczos'")
    assert "7, 6, 5" in text and "converged=[True, True, True]" in text
    assert len(text) < 400 and _numbers(text) < 20  # no eigenvector entries
    page = res._repr_html_()
    assert page.count("<tr>") == 3 + 1 + 8  # 3 pairs, a header, 8 summary rows
    assert "3 of 3" in page and str(res.num_matvecs) in page and str(N) in page
    loaded = EigenResult.from_dict(json.loads(json.dumps(res.to_dict(include_eigenvectors=False))))
    assert "7, 6, 5" in repr(loaded) and "not stored" in loaded._repr_html_()


def test_stochastic_result_repr_has_its_spread_not_its_vectors():
    res = stochastic_power_iteration(OP, k=1, max_iter=40, seed=0)
    text = repr(res)
    assert text.startswith("StochasticEigenResult(k=1") and "eigenvalue_stderr=[" in text
    assert len(text) < 400


def test_trace_and_density_html():
    tr = trace(OP, 30, seed=1)
    page = tr._repr_html_()
    assert f"{tr.estimate:.8g}" in page and "3-sigma interval" in page and "hutch++" in page
    sd = spectral_density(OP, 3, 20, seed=2)
    page = sd._repr_html_()
    assert "3 x 20" in page and f"{sd.integral():.4f}" in page and ".plot()" in page
    assert "<script" not in page
