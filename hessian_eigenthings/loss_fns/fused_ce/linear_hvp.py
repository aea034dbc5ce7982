r"""First and second derivatives of a linear LM head's cross entropy, chunked over tokens.

For hidden states :math:`h \in \mathbb{R}^{N \times D}`, the head
:math:`z = h W^\top + b` (:math:`W \in \mathbb{R}^{V \times D}`) and token weights
:math:`c_t` (``0`` at ignored targets), the loss is

.. math::

    \ell(h, W, b) = \sum_t c_t \, \mathrm{CE}(z_t, y_t), \qquad
    \nabla_{z_t} \ell = c_t (p_t - e_{y_t}) =: \rho_t, \quad p_t = \operatorname{softmax}(z_t),

(the mean over the :math:`n` counted tokens is :math:`c_t = 1/n`). Its gradient is
:math:`(\rho W, \rho^\top h, \sum_t \rho_t)` and, along a tangent
:math:`(\dot h, \dot W, \dot b)` with :math:`\dot z = \dot h W^\top + h \dot W^\top + \dot b`,
its Hessian-vector product is

.. math::

    \big(r W + \rho \dot W,\;\; r^\top h + \rho^\top \dot h,\;\; \textstyle\sum_t r_t\big),
    \qquad r_t = c_t \big(p_t \odot \dot z_t - p_t \langle p_t, \dot z_t \rangle\big):

the Gauss-Newton part (:func:`~hessian_eigenthings.loss_fns.fused_ce.linear.
linear_ce_ggn_product`) plus the two cross terms of the bilinear head. Every term is a sum
over tokens, so tokens are processed in chunks of ``chunk_size`` rows and only one chunk's
``(chunk_size, V)`` logits, probabilities and tangent exist at a time: the ``(N, V)``
tensors never do. Chunking changes only the order of the sums (the results equal the
unchunked ones to rounding). Probabilities are computed in float32 at least (float64 for
float64 inputs), as the library's losses do.

* :func:`linear_ce_grad`: the gradient, for token weights ``c``.
* :func:`linear_ce_token_slopes`: the per-token directional derivatives
  :math:`\langle p_t - e_{y_t}, \dot z_t \rangle` (the empirical Fisher needs them per
  sample before it can weight the gradients).
* :func:`linear_ce_hvp`: the Hessian-vector product of the mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import normaliser

__all__ = ["HeadDerivative", "linear_ce_grad", "linear_ce_hvp", "linear_ce_token_slopes"]


class HeadDerivative(NamedTuple):
    """A derivative of the head's loss with respect to each of its inputs."""

    hidden: torch.Tensor | None
    """Shaped like ``hidden`` (``None`` if not asked for)."""
    weight: torch.Tensor | None
    """Shaped like ``weight`` (``None`` if not asked for)."""
    bias: torch.Tensor | None
    """Shaped like ``bias`` (``None`` without a bias or if not asked for)."""


def _flat(
    hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``hidden`` as ``(N, D)`` rows, once the head's shapes and ``chunk_size`` are checked."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}."
        )
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
            f"{tuple(target.shape)}."
        )
    return hidden.reshape(-1, hidden.shape[-1])


def _acc(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is, else float32 (probabilities are never formed in bf16)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _chunk_logits(
    hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype
) -> torch.Tensor:
    z = (hc @ weight.T).to(acc)
    return z if bias is None else z.add_(bias.to(acc))


def _chunk_tangent(
    hc: torch.Tensor,
    dhc: torch.Tensor | None,
    weight: torch.Tensor,
    d_weight: torch.Tensor | None,
    d_bias: torch.Tensor | None,
    acc: torch.dtype,
) -> torch.Tensor:
    zdot = torch.zeros((hc.shape[0], weight.shape[0]), dtype=acc, device=hc.device)
    if dhc is not None:
        zdot += (dhc @ weight.T).to(acc)
    if d_weight is not None:
        zdot += (hc @ d_weight.T).to(acc)
    if d_bias is not None:
        zdot += d_bias.to(acc)
    return zdot


def _rho_(p: torch.Tensor, tc: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef_t (p_t - e_{y_t})`` in place of ``p`` (``coef`` is 0 at ignored rows)."""
    rows = torch.arange(p.shape[0], device=p.device)
    safe = tc.clamp_min(0)  # ignored targets (negative) index a column that coef zeroes
    p[rows, safe] -= 1
    return p.mul_(coef.unsqueeze(-1))


def _token_coef(
    t: torch.Tensor,
    ignore_index: int,
    n_valid: int | float | torch.Tensor | None,
    token_weight: torch.Tensor | None,
    acc: torch.dtype,
) -> torch.Tensor:
    valid = (t != ignore_index).to(acc)
    if token_weight is not None:
        return valid * token_weight.reshape(-1).to(acc)
    n = normaliser(n_valid, t, ignore_index, t.device).to(acc).clamp_min(1)
    return valid / n


def linear_ce_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    n_valid: int | float | torch.Tensor | None = None,
    want_hidden: bool = True,
    want_params: bool = True,
    chunk_size: int = 1024,
) -> HeadDerivative:
    r"""Gradient of :math:`\sum_t c_t \mathrm{CE}(h_t W^\top + b, y_t)` without ``(N, V)`` logits.

    Args:
        hidden: ``(..., D)`` inputs of the head.
        weight: ``(V, D)`` head weight.
        target: ``(...)`` targets, ``ignore_index`` for ignored tokens.
        bias: ``(V,)`` or ``None``.
        token_weight: ``(...)`` weights ``c_t``; default ``1 / n`` (the mean over the
            ``n`` non-ignored tokens). Ignored tokens weigh 0 either way.
        ignore_index: Target value of ignored tokens.
        n_valid: ``n`` for the default weights (default: the non-ignored count).
        want_hidden: Return the gradient with respect to ``hidden``.
        want_params: Return the gradients with respect to ``weight`` (and ``bias``).
        chunk_size: Tokens per chunk.

    Returns:
        :class:`HeadDerivative` in the inputs' dtypes (accumulated in float32 or float64).
    """
    h = _flat(hidden, target, weight, chunk_size)
    t = target.reshape(-1)
    acc = _acc(hidden, weight)
    coef = _token_coef(t, ignore_index, n_valid, token_weight, acc)
    w_acc = weight.to(acc)
    g_hidden = torch.empty_like(h) if want_hidden else None
    g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_params else None
    g_bias = (
        torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
        if want_params and bias is not None
        else None
    )
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc = h[rows]
            rho = _rho_(
                torch.softmax(_chunk_logits(hc, weight, bias, acc), -1), t[rows], coef[rows]
            )
            if g_hidden is not None:
                g_hidden[rows] = (rho @ w_acc).to(h.dtype)
            if g_weight is not None:
                g_weight += rho.T @ hc.to(acc)
            if g_bias is not None:
                g_bias += rho.sum(0)
    return HeadDerivative(
        hidden=None if g_hidden is None else g_hidden.reshape(hidden.shape),
        weight=None if g_weight is None else g_weight.to(weight.dtype),
        bias=None if g_bias is None or bias is None else g_bias.to(bias.dtype),
    )


def linear_ce_token_slopes(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    d_hidden: torch.Tensor | None = None,
    d_weight: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""Per token, :math:`\langle p_t - e_{y_t}, \dot z_t \rangle` (0 at ignored tokens).

    The derivative of each token's cross entropy along the tangent
    :math:`(\dot h, \dot W, \dot b)`; shaped like ``target``, in float32 (float64 for
    float64 inputs).
    """
    h = _flat(hidden, target, weight, chunk_size)
    dh = None if d_hidden is None else d_hidden.reshape(h.shape)
    t = target.reshape(-1)
    acc = _acc(hidden, weight, d_hidden, d_weight)
    ones = (t != ignore_index).to(acc)
    out = torch.empty(t.shape, dtype=acc, device=h.device)
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc = h[rows]
            rho = _rho_(
                torch.softmax(_chunk_logits(hc, weight, bias, acc), -1), t[rows], ones[rows]
            )
            zdot = _chunk_tangent(
                hc, None if dh is None else dh[rows], weight, d_weight, d_bias, acc
            )
            out[rows] = (rho * zdot).sum(-1)
    return out.reshape(target.shape)


def linear_ce_hvp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    d_hidden: torch.Tensor | None = None,
    d_weight: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    n_valid: int | float | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> HeadDerivative:
    r"""Hessian-vector product of the mean cross entropy of a linear head, chunked.

    See the module docstring: ``(r W + rho dW, r^T h + rho^T dh, sum r)`` for the tangent
    ``(d_hidden, d_weight, d_bias)`` (``None``: zero), with ``c_t = 1/n``.

    Returns:
        :class:`HeadDerivative` with all three parts (``bias`` ``None`` without a bias), in
        the inputs' dtypes.
    """
    h = _flat(hidden, target, weight, chunk_size)
    dh = None if d_hidden is None else d_hidden.reshape(h.shape)
    t = target.reshape(-1)
    acc = _acc(hidden, weight, d_hidden, d_weight)
    coef = _token_coef(t, ignore_index, n_valid, None, acc)
    w_acc = weight.to(acc)
    dw_acc = None if d_weight is None else d_weight.to(acc)
    out_hidden = torch.empty_like(h)
    out_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    out_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc = h[rows]
            dhc = None if dh is None else dh[rows]
            p = torch.softmax(_chunk_logits(hc, weight, bias, acc), -1)
            zdot = _chunk_tangent(hc, dhc, weight, d_weight, d_bias, acc)
            # r = c (p * zdot - p <p, zdot>), in place of zdot
            dot = (p * zdot).sum(-1, keepdim=True)
            r = zdot.sub_(dot).mul_(p).mul_(coef[rows].unsqueeze(-1))
            rho = _rho_(p, t[rows], coef[rows])
            a = r @ w_acc
            if dw_acc is not None:
                a += rho @ dw_acc
            out_hidden[rows] = a.to(h.dtype)
            out_weight += r.T @ hc.to(acc)
            if dhc is not None:
                out_weight += rho.T @ dhc.to(acc)
            if out_bias is not None:
                out_bias += r.sum(0)
    return HeadDerivative(
        hidden=out_hidden.reshape(hidden.shape),
        weight=out_weight.to(weight.dtype),
        bias=None if out_bias is None or bias is None else out_bias.to(bias.dtype),
    )
