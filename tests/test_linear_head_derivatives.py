"""Chunked derivatives of a linear head's cross entropy against autograd, in float64.

``linear_ce_grad`` (gradient for token weights), ``linear_ce_token_slopes`` (per-token
directional derivatives) and ``linear_ce_hvp`` (Hessian-vector product of the mean,
Gauss-Newton part plus the bilinear head's cross terms) on odd shapes, ignored tokens,
chunks smaller than, dividing and exceeding the number of tokens. Oracle:
``torch.autograd`` of ``F.cross_entropy(h @ W.T + b, y)`` materialised whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hessian_eigenthings.loss_fns.fused_ce import (
    linear_ce_grad,
    linear_ce_hvp,
    linear_ce_token_slopes,
)

DT = torch.float64
CHUNKS = [1, 4, 13, 1000]


def _problem(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 13, 5, generator=g, dtype=DT)  # 26 tokens, (B, T, D)
    w = torch.randn(11, 5, generator=g, dtype=DT)
    b = torch.randn(11, generator=g, dtype=DT) if bias else None
    y = torch.randint(0, 11, (2, 13), generator=g)
    y[0, 3:7] = -100
    y[1, -1] = -100
    tangent = (torch.randn_like(h), torch.randn_like(w), None if b is None else torch.randn_like(b))
    return h, w, b, y, tangent


def _mean_ce(h, w, b, y):
    z = h @ w.T + (0 if b is None else b)
    return F.cross_entropy(z.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
def test_grad_matches_autograd(chunk: int, bias: bool) -> None:
    h, w, b, y, _ = _problem(bias)
    inputs = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    want = torch.autograd.grad(_mean_ce(*inputs[:2], inputs[2] if bias else None, y), inputs)
    got = linear_ce_grad(h, w, y, bias=b, chunk_size=chunk)
    for a, e in zip((got.hidden, got.weight, got.bias), want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_grad_with_token_weights_is_the_weighted_sum() -> None:
    h, w, b, y, _ = _problem(True)
    c = torch.rand(y.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, b))
    z = hh @ ww.T + bb
    per = F.cross_entropy(z.reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="none")
    want = torch.autograd.grad((per * c.reshape(-1)).sum(), (hh, ww, bb))
    got = linear_ce_grad(h, w, y, bias=b, token_weight=c, chunk_size=5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_slopes_are_per_token_jvps(chunk: int) -> None:
    h, w, b, y, (dh, dw, db) = _problem(True)

    def per_token(h_, w_, b_):
        z = h_ @ w_.T + b_
        return F.cross_entropy(
            z.reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(y.shape)

    _, want = torch.autograd.functional.jvp(per_token, (h, w, b), (dh, dw, db))
    got = linear_ce_token_slopes(
        h, w, y, bias=b, d_hidden=dh, d_weight=dw, d_bias=db, chunk_size=chunk
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("which", ["all", "hidden_only", "weight_only"])
def test_hvp_matches_autograd(chunk: int, bias: bool, which: str) -> None:
    h, w, b, y, (dh, dw, db) = _problem(bias)
    if which == "hidden_only":
        dw, db = torch.zeros_like(dw), None if db is None else torch.zeros_like(db)
    if which == "weight_only":
        dh = torch.zeros_like(dh)
    primals = (h, w) + ((b,) if bias else ())
    tangents = (dh, dw) + ((db,) if bias else ())
    _, want = torch.autograd.functional.hvp(
        lambda *p: _mean_ce(p[0], p[1], p[2] if bias else None, y), primals, tangents
    )
    got = linear_ce_hvp(
        h,
        w,
        y,
        bias=b,
        d_hidden=None if which == "weight_only" else dh,
        d_weight=None if which == "hidden_only" else dw,
        d_bias=None if which == "hidden_only" else db,
        chunk_size=chunk,
    )
    parts = (got.hidden, got.weight) + ((got.bias,) if bias else ())
    for a, e in zip(parts, want):
        assert float((a - e).norm() / e.norm()) <= 1e-12


def test_low_precision_inputs_accumulate_in_float32() -> None:
    h, w, b, y, (dh, dw, db) = _problem(True)
    exact = linear_ce_hvp(h, w, y, bias=b, d_hidden=dh, d_weight=dw, d_bias=db, chunk_size=4)
    low = linear_ce_hvp(
        *(t.to(torch.bfloat16) for t in (h, w)),
        y,
        bias=b.to(torch.bfloat16),
        d_hidden=dh.to(torch.bfloat16),
        d_weight=dw.to(torch.bfloat16),
        d_bias=db.to(torch.bfloat16),
        chunk_size=4,
    )
    assert low.weight.dtype == torch.bfloat16
    # inputs rounded to bf16 (eps 7.8e-3): the product is bf16-accurate, not worse
    assert float((low.weight.double() - exact.weight).norm() / exact.weight.norm()) <= 0.05


def test_bad_arguments() -> None:
    h, w, _, y, _ = _problem(True)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_ce_hvp(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="weight must be"):
        linear_ce_grad(h, w.T, y)
    with pytest.raises(ValueError, match="target must have shape"):
        linear_ce_token_slopes(h, w, y[:, :3])
