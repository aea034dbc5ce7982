r"""GGN product of a linear LM head with cross entropy, chunked over tokens.

For hidden states :math:`h \in \mathbb{R}^{N \times D}`, the head :math:`z = h W^\top + b`
(:math:`W \in \mathbb{R}^{V \times D}`) and the mean cross entropy over the :math:`n`
non-ignored tokens, the Generalized Gauss-Newton product for a tangent
:math:`(\dot h, \dot W, \dot b)` is

.. math::

    \dot z = \dot h W^\top + h \dot W^\top + \dot b, \qquad
    r = H_{\text{loss}} \dot z, \qquad
    G(\dot h, \dot W, \dot b) = J^\top r = \big(r W,\; r^\top h,\; \textstyle\sum_i r_i\big),

with :math:`H_{\text{loss}}` the block-diagonal cross-entropy Hessian of
:mod:`~hessian_eigenthings.loss_fns.fused_ce.reference`. Every quantity is a sum over
tokens, so the tokens are processed in chunks of ``chunk_size`` rows: only one chunk's
``(chunk_size, V)`` logits, tangent and product exist at a time, never the full
``(N, V)`` tensors (peak extra memory ``~ 3 * chunk_size * V`` elements plus the
``V x D`` weight product). The normaliser ``n`` is the global token count, so the chunked
result equals the un-chunked one exactly up to summation order (the idea of fused
linear cross-entropy layers, e.g. Wijmans et al., "Cut your losses in large-vocabulary
language models", 2024, applied to the GGN product instead of the gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import normaliser
from hessian_eigenthings.loss_fns.fused_ce.dispatch import fused_ce_hvp
from hessian_eigenthings.loss_fns.fused_ce.linear_hvp import _flat

__all__ = ["LinearCEGGNProduct", "linear_ce_ggn_product"]


class LinearCEGGNProduct(NamedTuple):
    """``J^T H J`` applied to a tangent of the head, per input of the head."""

    hidden: torch.Tensor | None
    """``r W``, shaped like ``hidden`` (``None`` if no hidden tangent was asked for)."""
    weight: torch.Tensor
    """``r^T h``, shaped like ``weight``."""
    bias: torch.Tensor | None
    """``sum_i r_i``, shaped like ``bias`` (``None`` without a bias)."""


def _check(name: str, t: torch.Tensor | None, like: torch.Tensor | None) -> None:
    if t is not None and (like is None or t.shape != like.shape):
        want = None if like is None else tuple(like.shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}.")


def linear_ce_ggn_product(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    d_hidden: torch.Tensor | None = None,
    d_weight: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    want_hidden: bool = False,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> LinearCEGGNProduct:
    """GGN product of ``mean CE(hidden @ weight.T + bias, target)`` without ``(N, V)`` logits.

    Args:
        hidden: ``(..., D)`` inputs of the head (fixed; the point of linearisation).
        weight: ``(V, D)`` head weight.
        target: ``(...)`` next-token targets, ``ignore_index`` for ignored tokens.
        bias: ``(V,)`` head bias or ``None``.
        d_hidden: Tangent of ``hidden`` (e.g. the JVP of the trunk), or ``None`` (zero).
        d_weight: Tangent of ``weight`` or ``None`` (zero).
        d_bias: Tangent of ``bias`` or ``None`` (zero).
        want_hidden: Also return the product with respect to ``hidden`` (``r W``).
        ignore_index: Target value of ignored tokens.
        n_valid: Normaliser (default: the number of non-ignored targets).
        chunk_size: Tokens per chunk; memory is bounded by one chunk's ``(chunk, V)``.
        backend: Cross-entropy HVP backend (see
            :func:`~hessian_eigenthings.loss_fns.fused_ce.dispatch.fused_ce_hvp`).

    Returns:
        :class:`LinearCEGGNProduct` ``(hidden, weight, bias)`` in the dtype of ``weight``
        (products of low-precision inputs are accumulated in float32).

    Raises:
        ValueError: Inconsistent shapes, or ``chunk_size < 1``.
    """
    h = _flat(hidden, target, weight, chunk_size)
    _check("d_hidden", d_hidden, hidden)
    _check("d_weight", d_weight, weight)
    _check("d_bias", d_bias, bias)
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    dh = None if d_hidden is None else d_hidden.reshape(h.shape)
    t = target.reshape(-1)
    n = normaliser(n_valid, t, ignore_index, t.device)
    acc = torch.promote_types(weight.dtype, torch.float32)
    g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    g_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=weight.device)
    g_hidden = (
        torch.empty(h.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
    )
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc = h[rows]
            logits = hc @ weight.T
            tangent = torch.zeros_like(logits)
            if bias is not None:
                logits += bias
            if dh is not None:
                tangent += dh[rows] @ weight.T
            if d_weight is not None:
                tangent += hc @ d_weight.T
            if d_bias is not None:
                tangent += d_bias
            r = fused_ce_hvp(
                logits, t[rows], tangent, ignore_index=ignore_index, n_valid=n, backend=backend
            )
            del logits, tangent
            g_weight += (r.T @ hc.to(r.dtype)).to(acc)
            if g_bias is not None:
                g_bias += r.sum(0).to(acc)
            if g_hidden is not None:
                g_hidden[rows] = (r @ weight.to(r.dtype)).to(hidden.dtype)
    return LinearCEGGNProduct(
        hidden=None if g_hidden is None else g_hidden.reshape(hidden.shape),
        weight=g_weight.to(weight.dtype),
        bias=None if g_bias is None else g_bias.to(bias.dtype if bias is not None else acc),
    )
