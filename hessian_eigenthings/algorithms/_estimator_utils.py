"""Shared plumbing of the stochastic estimators: validation, probes, blocked products.

Conventions: sketches are stored as column blocks ``(n, s)`` (as in the papers); the
operator is applied to at most ``block_size`` columns at a time through
``operator.matmat`` so operators with a fast block product use it.
"""

from __future__ import annotations

import torch

from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = [
    "DISTRIBUTIONS",
    "agree_seed",
    "apply_columns",
    "check_block_size",
    "check_distribution",
    "check_num_matvecs",
    "check_operator",
    "check_single_device",
    "check_sketch_options",
    "draw_columns",
    "first_non_finite",
    "loo_directions",
    "non_finite_error",
    "paired_dots",
    "resolve_seed",
    "working_dtype",
]

DISTRIBUTIONS = ("rademacher", "gaussian")


def check_operator(operator: object, who: str) -> CurvatureOperator:
    """Return ``operator`` if it is a symmetric :class:`CurvatureOperator`, else raise."""
    if not isinstance(operator, CurvatureOperator):
        raise TypeError(
            f"{who} expected a CurvatureOperator, got {type(operator).__name__}. "
            "Wrap a matvec function with hessian_eigenthings.LambdaOperator."
        )
    if not operator.symmetric:
        raise ValueError(
            f"{who} assumes a symmetric operator (operator.symmetric is False): the "
            "estimators use A^T = A. Symmetrise the operator or set symmetric=True if it is."
        )
    return operator


def check_distribution(distribution: object) -> str:
    """Validate the probe distribution name."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}."
        )
    return str(distribution)


def check_num_matvecs(num_matvecs: object, minimum: int, method: str) -> int:
    """Validate a matvec budget against the method's minimum."""
    if not isinstance(num_matvecs, int) or isinstance(num_matvecs, bool):
        raise TypeError(f"num_matvecs must be an int, got {type(num_matvecs).__name__}.")
    if num_matvecs < minimum:
        raise ValueError(
            f"method {method!r} needs num_matvecs >= {minimum} (to estimate the trace and "
            f"its standard error), got {num_matvecs}."
        )
    return num_matvecs


def check_block_size(block_size: object) -> int:
    """Validate the number of probe columns per ``matmat`` call."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
    return block_size


def check_single_device(backend: LinAlgBackend, operator: CurvatureOperator, who: str) -> None:
    """Sketching estimators orthonormalise whole vectors with a local QR."""
    if backend.local_size(operator.size) != operator.size:
        raise ValueError(
            f"{who} orthonormalises its sketch with a local QR and needs whole vectors on "
            f"one process, but the backend {backend!r} holds "
            f"{backend.local_size(operator.size)} of {operator.size} entries. Use "
            "method='hutchinson' for sharded operators."
        )


def resolve_seed(seed: object) -> int:
    """``None`` -> a fresh OS-entropy seed; an int -> itself; anything else raises."""
    if seed is None:
        return fresh_seed()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    return seed


def agree_seed(seed: int, backend: LinAlgBackend, device: torch.device) -> int:
    """The seed every process of a distributed backend uses: rank 0's (``seed`` alone).

    With ``seed=None`` each process draws its own fresh seed; passing it through
    ``backend.all_agree`` (a broadcast for distributed backends, the identity otherwise)
    makes every rank draw the same probes and record the same ``result.seed``.
    """
    return int(backend.all_agree(torch.tensor(seed, dtype=torch.int64, device=device)))


def first_non_finite(values: torch.Tensor) -> int | None:
    """Index of the first column (last dim) with a non-finite entry, or ``None`` (one sync)."""
    bad = ~torch.isfinite(values)
    if values.dim() > 1:
        bad = bad.reshape(-1, values.shape[-1]).any(dim=0)
    hits = bad.nonzero()
    return None if hits.numel() == 0 else int(hits[0, 0])


def non_finite_error(
    who: str,
    operator: CurvatureOperator,
    first_bad: int,
    cause: Exception | None,
    partial: object,
    partial_note: str,
) -> Exception:
    """The :class:`NonFiniteError` an estimator raises for product number ``first_bad``."""
    from hessian_eigenthings.errors import NonFiniteError

    what = (
        f"a product (number {first_bad} or one after it in the same block) of this {who} "
        f"run failed: {cause}"
        if cause is not None
        else f"{type(operator).__name__}.matvec returned non-finite values (inf/nan) at "
        f"product {first_bad} of this {who} run"
    )
    return NonFiniteError(
        f"{what}; {partial_note}. Check the model's loss and parameters for overflow (e.g. "
        "a bf16 model) or a bad batch.",
        partial=partial,
        matvec=first_bad,
        batch_index=getattr(cause, "batch_index", None),
        param_names=getattr(cause, "param_names", ()),
    )


def working_dtype(operator: CurvatureOperator) -> torch.dtype:
    """Probe dtype: the operator's if float32/float64, else float32 (never bf16/fp16)."""
    if operator.dtype in (torch.float32, torch.float64):
        return operator.dtype
    return torch.float32


def draw_columns(
    backend: LinAlgBackend,
    operator: CurvatureOperator,
    num: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    distribution: str,
) -> torch.Tensor:
    """``num`` probes on the operator's device as the columns of an ``(n_local, num)`` block."""
    rows = backend.random(
        operator.size,
        num=num,
        generator=generator,
        dtype=dtype,
        device=operator.device,
        distribution=distribution,
    )
    return rows.T


def apply_columns(
    operator: CurvatureOperator,
    X: torch.Tensor,
    block_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A X`` for a column block ``X``, ``block_size`` columns per ``matmat`` call.

    ``X`` may live on another device than the operator (a sketch kept on the CPU): each
    block is moved to the operator's device and the product moved back to ``X``'s.
    """
    if out is None:
        out = torch.empty_like(X)
    for start in range(0, X.shape[1], block_size):
        block = X[:, start : start + block_size]
        prod = operator.matmat(block.to(operator.device))
        out[:, start : start + block_size] = prod.to(X.device)
    return out


def loo_directions(R: torch.Tensor) -> torch.Tensor:
    r"""Columns ``s_i = R^{-T} e_i / ||R^{-T} e_i||`` for an invertible upper-triangular ``R``.

    If ``Y = Q R`` with ``Q`` orthonormal, ``Q s_i`` is the unit vector of ``range(Y)``
    orthogonal to every column of ``Y`` except the ``i``-th, so the projector onto the span
    of ``Y`` without column ``i`` is ``Q (I - s_i s_i^T) Q^T`` (Epperly, Tropp & Webber
    2024, Sec. 2). Computed in float64.
    """
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return S / torch.linalg.vector_norm(S, dim=0, keepdim=True)


def paired_dots(backend: LinAlgBackend, n: int, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``(x_j^T y_j)_j`` for the columns of two ``(n_local, b)`` blocks (global size n), float64.

    Whole vectors are reduced locally; a sharded backend goes through ``block_gram``
    (whose reduction spans the shards) and keeps the diagonal.
    """
    if backend.local_size(n) == n:
        return torch.einsum("ij,ij->j", X, Y).to(torch.float64)
    return torch.diagonal(backend.block_gram(X.T, Y.T)).to(torch.float64)


def check_sketch_options(
    max_sketch_size: object, sketch_device: object, operator: CurvatureOperator
) -> tuple[int | None, torch.device]:
    """Validate the memory options of the sketching estimators.

    Returns:
        ``(max_sketch_size, device)``: the cap (or ``None``) and the device that holds the
        sketch (default the operator's).
    """
    if max_sketch_size is not None and (
        not isinstance(max_sketch_size, int)
        or isinstance(max_sketch_size, bool)
        or max_sketch_size < 2
    ):
        raise ValueError(f"max_sketch_size must be None or an int >= 2, got {max_sketch_size!r}.")
    if sketch_device is None:
        return max_sketch_size, operator.device
    if not isinstance(sketch_device, (str, torch.device)):
        raise TypeError(
            f"sketch_device must be a torch.device or str, got {type(sketch_device).__name__}."
        )
    return max_sketch_size, torch.device(sketch_device)
