r"""Precision defaults of the algorithms: vector dtypes and tolerances.

Algorithms keep their vectors (Lanczos bases, iterates, probes, sketches) in the
operator's dtype when it is float32 or float64 and in float32 for a bfloat16/float16
operator: the operator computes in its own dtype and returns the product in the vector's
(see :class:`~hessian_eigenthings.operators.CurvatureOperator`). Small dense problems
(tridiagonal and projected matrices, ``eigh``, QR of ``R``) are solved in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attainable_tol", "default_tol", "default_vector_dtype", "eps"]


def eps(dtype: torch.dtype) -> float:
    """Unit roundoff (machine epsilon) of a floating dtype."""
    return float(torch.finfo(dtype).eps)


def default_vector_dtype(operator_dtype: torch.dtype) -> torch.dtype:
    """Dtype of an algorithm's vectors: the operator's, or float32 for bf16/fp16 ones."""
    if operator_dtype in (torch.float32, torch.float64):
        return operator_dtype
    return torch.float32


def default_tol(operator_dtype: torch.dtype, vector_dtype: torch.dtype | None = None) -> float:
    r"""Default relative-residual tolerance of the eigensolvers for an operator dtype.

    ``max(sqrt(eps_vec), 4 eps_op)``: the square root of the vector dtype's unit roundoff
    (float64: 1.5e-8, float32: 3.5e-4), raised to four roundoffs of the operator's dtype
    for reduced-precision operators (bfloat16: 3.1e-2, float16: 3.9e-3), below which a
    residual says nothing about the operator the model actually computes.
    """
    vdtype = vector_dtype or default_vector_dtype(operator_dtype)
    return max(math.sqrt(eps(vdtype)), 4.0 * eps(operator_dtype))


def attainable_tol(
    operator_dtype: torch.dtype, vector_dtype: torch.dtype, basis_size: int
) -> float:
    r"""Smallest relative-residual tolerance a Lanczos run can be expected to certify.

    ``max(4 eps_op, eps_vec sqrt(m))``: the operator's products carry rounding errors of a
    few unit roundoffs of its dtype relative to ``||A||`` (see :func:`default_tol`), and
    the residual bounds of :func:`~hessian_eigenthings.algorithms.lanczos.lanczos`
    include an allowance ``eps_vec sqrt(p) max|theta|`` for the vector arithmetic over a
    basis of ``p <= m + 2`` vectors. A ``tol`` below this is not met by the pair of the
    largest magnitude, whatever the number of products (float32: about ``6.5e-7`` for
    ``m = 30``; float64: ``1.2e-15``).
    """
    return max(4.0 * eps(operator_dtype), eps(vector_dtype) * math.sqrt(basis_size))
