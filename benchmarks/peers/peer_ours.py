"""Adapter: this library (hessian_eigenthings 2.x, imported from the working tree).

Operators: ``HessianOperator`` (autograd double backward) and ``GGNOperator`` (analytical
cross-entropy Hessian, forward-mode JVP). Algorithms: ``lanczos`` (thick restart, full
reorthogonalisation), ``trace`` (Hutch++ / Hutchinson / XTrace) and ``spectral_density``
(SLQ). Every product goes through the operator's public ``matvec``/``matmat``, which are
counted. A module that has not landed yet raises ``Unsupported`` naming it.
"""

from __future__ import annotations

import importlib
from typing import Any

import problems as P
from peers.common import Matvec, MatvecCounter, Unsupported

NAME = "ours"

_OPS: dict[tuple[int, str], tuple[Any, MatvecCounter]] = {}


def version() -> str:
    import hessian_eigenthings

    return str(hessian_eigenthings.__version__)


def available() -> str | None:
    try:
        import hessian_eigenthings  # noqa: F401
    except ImportError as exc:
        return f"hessian_eigenthings not importable: {exc}"
    return None


def _need(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise Unsupported(f"{module}.{name} has not landed ({exc})") from exc


def _counted(problem: P.Problem, which: str) -> tuple[Any, MatvecCounter]:
    key = (id(problem), which)
    if key not in _OPS:
        if which == "hessian":
            cls = _need("hessian_eigenthings.operators.hessian", "HessianOperator")
            op = cls(problem.model, problem.batches, problem.loss, weight_fn=problem.batch_weight)
        else:
            cls = _need("hessian_eigenthings.operators.ggn", "GGNOperator")
            ce = _need("hessian_eigenthings.loss_fns.standard", "cross_entropy_loss_of_output")
            op = cls(
                problem.model,
                problem.batches,
                lambda model, batch: model(batch[0]),
                ce(ignore_index=problem.criterion.ignore_index),
            )
        counter = MatvecCounter()
        op.matvec = counter.wrap_vec(op.matvec)
        op.matmat = counter.wrap_vec(op.matmat)
        _OPS[key] = (op, counter)
    return _OPS[key]


def hessian_operator(problem: P.Problem) -> tuple[Any, MatvecCounter]:
    """The (cached) counted ``HessianOperator`` of ``problem`` (used by the scipy adapter)."""
    return _counted(problem, "hessian")


def hessian_matvec(problem: P.Problem) -> Matvec:
    op, _ = _counted(problem, "hessian")
    return op.matvec


def ggn_matvec(problem: P.Problem) -> Matvec:
    op, _ = _counted(problem, "ggn")
    return op.matvec


def top_eigs(problem: P.Problem, k: int, tol: float, seed: int) -> dict[str, Any]:
    lanczos = _need("hessian_eigenthings.algorithms.lanczos", "lanczos")
    op, counter = _counted(problem, "hessian")
    start = counter.count
    res = lanczos(op, k, which="LM", tol=tol, seed=seed)
    return {
        "eigenvalues": [float(x) for x in res.eigenvalues.tolist()],
        "matvecs": counter.count - start,
        "reported_matvecs": int(res.num_matvecs),
        "converged": [bool(c) for c in res.converged.tolist()],
        "config": f"lanczos(k={k}, which='LM', tol={tol})",
    }


def trace_methods() -> list[str]:
    return ["hutch++", "hutchinson", "xtrace"]


def trace(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    trace_fn = _need("hessian_eigenthings.algorithms.trace", "trace")
    op, counter = _counted(problem, "hessian")
    start = counter.count
    res = trace_fn(op, num_matvecs, method=method, seed=seed)
    return {"estimate": float(res.estimate), "matvecs": counter.count - start}


def diagonal(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    diagonal_fn = _need("hessian_eigenthings.algorithms.diagonal", "diagonal")
    op, counter = _counted(problem, "hessian")
    start = counter.count
    res = diagonal_fn(op, num_matvecs, method=method, seed=seed)
    return {"estimate": [float(x) for x in res.estimate.tolist()], "matvecs": counter.count - start}


def slq(problem: P.Problem, num_runs: int, steps: int, seed: int) -> dict[str, Any]:
    density = _need("hessian_eigenthings.algorithms.spectral_density", "spectral_density")
    op, counter = _counted(problem, "hessian")
    start = counter.count
    res = density(op, num_runs, steps, seed=seed)
    return {
        "nodes": [[float(x) for x in n] for n in res.nodes],
        "weights": [[float(x) for x in w] for w in res.weights],
        "matvecs": counter.count - start,
    }


def clear() -> None:
    """Drop cached operators (between problems)."""
    _OPS.clear()
