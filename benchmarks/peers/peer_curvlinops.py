"""Adapter: curvlinops (``curvlinops-for-pytorch``).

Operators: ``HessianLinearOperator`` and ``GGNLinearOperator`` on the same ``(X, y)`` batches
and ``nn.CrossEntropyLoss`` (curvlinops weights batches by ``X.shape[0] / N``). Eigenvalues:
curvlinops has no eigensolver of its own and documents scipy's ``eigsh`` over
``op.to_scipy()``, which is what runs here. Trace: ``hutchpp_trace``, ``hutchinson_trace``,
``xtrace`` (seeded through torch's global RNG). Diagonal: ``hutchinson_diag``, ``xdiag``.
Density: ``lanczos_approximate_spectrum`` (Papyan 2020, no reorthogonalisation, boundaries by
``eigsh``), a smoothed density on a grid. Products are counted through the operator's
``_matmat`` (columns).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np
import problems as P
import torch
from peers.common import Matvec, MatvecCounter, Unsupported

NAME = "curvlinops"

_OPS: dict[tuple[int, str], tuple[Any, MatvecCounter]] = {}


def version() -> str:
    return importlib.metadata.version("curvlinops-for-pytorch")


def available() -> str | None:
    try:
        import curvlinops  # noqa: F401
    except ImportError as exc:
        return f"curvlinops not installed ({exc}); run benchmarks/setup_peers.sh"
    return None


def _op(problem: P.Problem, which: str) -> tuple[Any, MatvecCounter]:
    key = (id(problem), which)
    if key not in _OPS:
        import curvlinops

        cls = (
            curvlinops.HessianLinearOperator if which == "hessian" else curvlinops.GGNLinearOperator
        )
        op = cls(problem.model, problem.criterion, problem.params, problem.batches)
        counter = MatvecCounter()
        op._matmat = counter.wrap_list(op._matmat)
        _OPS[key] = (op, counter)
    return _OPS[key]


def hessian_matvec(problem: P.Problem) -> Matvec:
    op, _ = _op(problem, "hessian")
    return lambda v: op @ v


def ggn_matvec(problem: P.Problem) -> Matvec:
    op, _ = _op(problem, "ggn")
    return lambda v: op @ v


def top_eigs(problem: P.Problem, k: int, tol: float, seed: int) -> dict[str, Any]:
    from scipy.sparse.linalg import eigsh

    op, counter = _op(problem, "hessian")
    start = counter.count
    v0 = np.random.default_rng(seed).standard_normal(problem.num_params)
    vals = eigsh(op.to_scipy(), k=k, which="LM", tol=tol, v0=v0, return_eigenvectors=False)
    return {
        "eigenvalues": sorted((float(x) for x in vals), key=abs, reverse=True),
        "matvecs": counter.count - start,
        "config": f"scipy eigsh(op.to_scipy(), k={k}, which='LM', tol={tol})",
    }


def trace_methods() -> list[str]:
    return ["hutch++", "hutchinson", "xtrace"]


def trace(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    import curvlinops

    fns = {
        "hutch++": curvlinops.hutchpp_trace,
        "hutchinson": curvlinops.hutchinson_trace,
        "xtrace": curvlinops.xtrace,
    }
    if method not in fns:
        raise Unsupported(f"no trace method {method!r}")
    if method != "hutchinson":
        # curvlinops' Hutch++ and XTrace need a multiple of 3 (resp. 2): round down, the
        # count actually used is reported.
        num_matvecs -= num_matvecs % (3 if method == "hutch++" else 2)
    op, counter = _op(problem, "hessian")
    start = counter.count
    torch.manual_seed(seed)
    est = fns[method](op, num_matvecs)
    return {"estimate": float(est), "matvecs": counter.count - start}


def diagonal(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    import curvlinops

    fns = {"hutchinson": curvlinops.hutchinson_diag, "xdiag": curvlinops.xdiag}
    if method not in fns:
        raise Unsupported(f"no diagonal method {method!r}")
    if method == "xdiag":
        num_matvecs -= num_matvecs % 2  # curvlinops' XDiag needs an even count
    op, counter = _op(problem, "hessian")
    start = counter.count
    torch.manual_seed(seed)
    est = fns[method](op, num_matvecs)
    return {"estimate": [float(x) for x in est.tolist()], "matvecs": counter.count - start}


def slq(problem: P.Problem, num_runs: int, steps: int, seed: int) -> dict[str, Any]:
    from curvlinops import lanczos_approximate_spectrum

    op, counter = _op(problem, "hessian")
    start = counter.count
    torch.manual_seed(seed)
    np.random.seed(seed)
    grid, density = lanczos_approximate_spectrum(
        op, ncv=steps, num_repeats=num_runs, num_points=2048
    )
    return {
        "grid": [float(x) for x in grid.tolist()],
        "density": [float(x) for x in density.tolist()],
        "matvecs": counter.count - start,
    }


def clear() -> None:
    _OPS.clear()
