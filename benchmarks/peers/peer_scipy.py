"""Adapter: scipy's ARPACK ``eigsh`` over this library's ``HessianOperator.to_scipy()``.

Isolates the eigensolver: the products are ours (counted the same way), the Krylov method
is ARPACK's implicitly restarted Lanczos. Only the eigenvalue task applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import problems as P
from peers import peer_ours
from peers.common import Matvec, Unsupported

NAME = "scipy-eigsh(ours)"


def version() -> str:
    import scipy

    return f"scipy {scipy.__version__}"


def available() -> str | None:
    try:
        import scipy.sparse.linalg  # noqa: F401
    except ImportError as exc:
        return f"scipy not importable: {exc}"
    return peer_ours.available()


def hessian_matvec(problem: P.Problem) -> Matvec:
    raise Unsupported("same products as 'ours'")


def ggn_matvec(problem: P.Problem) -> Matvec:
    raise Unsupported("same products as 'ours'")


def top_eigs(problem: P.Problem, k: int, tol: float, seed: int) -> dict[str, Any]:
    from scipy.sparse.linalg import eigsh

    op, counter = peer_ours.hessian_operator(problem)
    start = counter.count
    v0 = np.random.default_rng(seed).standard_normal(op.size)
    vals = eigsh(op.to_scipy(), k=k, which="LM", tol=tol, v0=v0, return_eigenvectors=False)
    vals = sorted((float(x) for x in vals), key=abs, reverse=True)
    return {
        "eigenvalues": vals,
        "matvecs": counter.count - start,
        "config": f"eigsh(k={k}, which='LM', tol={tol})",
    }


def trace_methods() -> list[str]:
    return []


def trace(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    raise Unsupported("scipy has no trace estimator")


def slq(problem: P.Problem, num_runs: int, steps: int, seed: int) -> dict[str, Any]:
    raise Unsupported("scipy has no spectral density estimator")


def clear() -> None:
    peer_ours.clear()
