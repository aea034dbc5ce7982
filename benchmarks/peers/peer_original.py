"""Adapter: the original ``hessian-eigenthings`` 1.0.0a5 from PyPI.

It has the same import name as this library, so this module only ever runs inside
``benchmarks/.venv-original`` through ``original_driver.py`` (a subprocess), never in the
harness's own process. Release 1.0.0a5 no longer has the 0.x ``compute_hessian_eigenthings``
function; its API is the operator/algorithm one this library grew from: ``HessianOperator``
(unweighted mean over batches), ``GGNOperator``, ``lanczos`` (default ``max_iter = 2k``
steps, no restarts), ``trace`` (Hutch++ / Hutchinson) and ``spectral_density`` (SLQ).
Products are counted through the operator's ``matvec``.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import problems as P
from peers.common import Matvec, MatvecCounter, Unsupported

NAME = "original-1.0.0a5"

_OPS: dict[tuple[int, str], tuple[Any, MatvecCounter]] = {}


def version() -> str:
    return importlib.metadata.version("hessian-eigenthings")


def available() -> str | None:
    try:
        import hessian_eigenthings
    except ImportError as exc:
        return f"original hessian-eigenthings not importable: {exc}"
    if hessian_eigenthings.__version__ != "1.0.0a5":
        return (
            f"expected hessian_eigenthings 1.0.0a5, got {hessian_eigenthings.__version__} "
            f"from {hessian_eigenthings.__file__}"
        )
    return None


def _op(problem: P.Problem, which: str) -> tuple[Any, MatvecCounter]:
    key = (id(problem), which)
    if key not in _OPS:
        import hessian_eigenthings as he

        if which == "hessian":
            op = he.HessianOperator(problem.model, problem.batches, problem.loss)
        else:
            criterion = problem.criterion
            op = he.GGNOperator(
                problem.model,
                problem.batches,
                lambda model, batch: model(batch[0]),
                lambda output, batch: criterion(output, batch[1]),
            )
        counter = MatvecCounter()
        op.matvec = counter.wrap_vec(op.matvec)
        _OPS[key] = (op, counter)
    return _OPS[key]


def hessian_matvec(problem: P.Problem) -> Matvec:
    op, _ = _op(problem, "hessian")
    return op.matvec


def ggn_matvec(problem: P.Problem) -> Matvec:
    op, _ = _op(problem, "ggn")
    return op.matvec


def top_eigs(
    problem: P.Problem, k: int, tol: float, seed: int, max_iter: int | None = None
) -> dict[str, Any]:
    import hessian_eigenthings as he

    op, counter = _op(problem, "hessian")
    start = counter.count
    kwargs: dict[str, Any] = {"k": k, "tol": tol, "which": "LM", "seed": seed}
    if max_iter is not None:
        kwargs["max_iter"] = min(max_iter, op.size - 1)
        kwargs["reorthogonalize"] = True
    res = he.lanczos(op, **kwargs)
    return {
        "eigenvalues": [float(x) for x in res.eigenvalues.tolist()],
        "matvecs": counter.count - start,
        "converged": [bool(c) for c in res.converged.tolist()],
        "config": "lanczos(" + ", ".join(f"{a}={b!r}" for a, b in kwargs.items()) + ")",
    }


def trace_methods() -> list[str]:
    return ["hutch++", "hutchinson"]


def trace(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    import hessian_eigenthings as he

    if method not in trace_methods():
        raise Unsupported(f"no trace method {method!r}")
    op, counter = _op(problem, "hessian")
    start = counter.count
    res = he.trace(op, num_matvecs=num_matvecs, method=method, seed=seed)
    return {"estimate": float(res.estimate), "matvecs": counter.count - start}


def slq(problem: P.Problem, num_runs: int, steps: int, seed: int) -> dict[str, Any]:
    import math

    import hessian_eigenthings as he

    op, counter = _op(problem, "hessian")
    start = counter.count
    res = he.spectral_density(op, num_runs=num_runs, lanczos_steps=steps, seed=seed)
    nodes, weights = [], []
    for n_row, w_row in zip(res.raw_eigenvalues.tolist(), res.raw_weights.tolist()):
        keep = [i for i, x in enumerate(n_row) if not math.isnan(x)]
        nodes.append([float(n_row[i]) for i in keep])
        weights.append([float(w_row[i]) for i in keep])
    return {"nodes": nodes, "weights": weights, "matvecs": counter.count - start}


def clear() -> None:
    _OPS.clear()
