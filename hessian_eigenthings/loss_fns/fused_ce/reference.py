r"""Eager reference of the cross-entropy Hessian-vector product.

For logits :math:`z \in \mathbb{R}^{N \times V}` (any leading shape, vocabulary last),
targets :math:`y` and the mean cross entropy over the :math:`n` non-ignored rows,

.. math::

    L(z) = \frac{1}{n} \sum_{r:\, y_r \ne \text{ignore}} \big(\operatorname{logsumexp}(z_r)
    - z_{r, y_r}\big),

the Hessian with respect to :math:`z` is block diagonal over rows with blocks
:math:`\frac{1}{n}(\operatorname{diag}(p_r) - p_r p_r^\top)`, :math:`p_r = \operatorname{softmax}
(z_r)`, independent of the target value. Hence, per row,

.. math::

    (H u)_r = \frac{m_r}{n} \big(p_r \odot u_r - p_r \langle p_r, u_r \rangle\big),
    \qquad m_r = [y_r \ne \text{ignore}].

This is the closed form used by the Generalized Gauss-Newton of softmax cross entropy
(Martens, "New insights and perspectives on the natural gradient method", JMLR 2020,
section 8; Schraudolph, "Fast curvature matrix-vector products", Neural Comput. 2002).
The reference upcasts to float32 (float64 if any input is float64) and materialises
``p``; the fused backends must agree with it.
"""

from __future__ import annotations

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import check_inputs, normaliser, result_dtype

__all__ = ["ce_hvp_eager"]


def ce_hvp_eager(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``H u`` for the mean cross entropy over non-ignored rows, in eager PyTorch.

    Args:
        logits: ``(..., V)`` logits.
        target: ``(...)`` integer targets; rows equal to ``ignore_index`` contribute zero.
        u: ``(..., V)`` direction in logit space.
        ignore_index: Target value of ignored rows.
        n_valid: Normaliser ``n`` (int or 0-d tensor); default: the number of non-ignored
            rows of ``target``. Pass a larger count when these rows are one chunk of a
            bigger mean. ``n = 0`` (all rows ignored) gives zeros.

    Returns:
        ``H u`` with the shape of ``logits`` and dtype ``promote(logits.dtype, u.dtype)``.
    """
    check_inputs(logits, target, u)
    acc = torch.float64 if torch.float64 in (logits.dtype, u.dtype) else torch.float32
    n_t = normaliser(n_valid, target, ignore_index, logits.device).to(acc).clamp_min(1)
    p = torch.softmax(logits.to(acc), dim=-1)
    uu = u.to(acc)
    pu = p * uu
    dot = pu.sum(-1, keepdim=True)
    weight = (target != ignore_index).to(acc).unsqueeze(-1) / n_t
    return ((pu - p * dot) * weight).to(result_dtype(logits, u))
