"""Adapter: PyHessian 0.1 (``pyhessian.hessian``).

Built in full-dataset mode (``dataloader=`` the same batches; it weights batches by
``inputs.size(0)``) with ``cuda=False``. Its products allocate vectors with torch's default
dtype, so every call runs with the default dtype set to the problem's. Eigenvalues: its
``eigenvalues(maxIter, tol, top_n)`` (power iteration with deflation; ``tol`` is the
relative change between iterates). Trace: ``trace(maxIter=m, tol=-1)`` (Hutchinson with
exactly ``m`` Rademacher probes; ``tol=-1`` disables its early stop so the budget is the
same as the others'). Density: ``density(iter, n_v)``. No GGN. Products are counted
through ``dataloader_hv_product``.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np
import problems as P
import torch
from peers.common import Matvec, MatvecCounter, Unsupported, default_dtype

NAME = "pyhessian"

_OPS: dict[int, tuple[Any, MatvecCounter]] = {}

# Power iteration converges at rate |lambda_{i+1} / lambda_i| per step; cap the steps per
# eigenvalue so a near-degenerate pair cannot run forever (the cap is reported).
MAX_ITER_PER_EIGENVALUE = 300


def version() -> str:
    return importlib.metadata.version("pyhessian")


def available() -> str | None:
    try:
        import pyhessian  # noqa: F401
    except ImportError as exc:
        return f"pyhessian not installed ({exc}); run benchmarks/setup_peers.sh"
    return None


def _op(problem: P.Problem) -> tuple[Any, MatvecCounter]:
    key = id(problem)
    if key not in _OPS:
        from pyhessian import hessian

        with default_dtype(problem.params[0].dtype):
            h = hessian(problem.model, problem.criterion, dataloader=problem.batches, cuda=False)
        counter = MatvecCounter()
        inner = h.dataloader_hv_product

        def counted(v: Any) -> Any:
            counter.count += 1
            return inner(v)

        h.dataloader_hv_product = counted
        _OPS[key] = (h, counter)
    return _OPS[key]


def _split(problem: P.Problem, v: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in problem.params:
        out.append(v[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def hessian_matvec(problem: P.Problem) -> Matvec:
    h, _ = _op(problem)
    dtype = problem.params[0].dtype

    def mv(v: torch.Tensor) -> torch.Tensor:
        with default_dtype(dtype):
            _, hv = h.dataloader_hv_product(_split(problem, v))
        return torch.cat([x.reshape(-1) for x in hv])

    return mv


def ggn_matvec(problem: P.Problem) -> Matvec:
    raise Unsupported("PyHessian has no GGN")


def top_eigs(problem: P.Problem, k: int, tol: float, seed: int) -> dict[str, Any]:
    h, counter = _op(problem)
    start = counter.count
    torch.manual_seed(seed)
    with default_dtype(problem.params[0].dtype):
        vals, _ = h.eigenvalues(maxIter=MAX_ITER_PER_EIGENVALUE, tol=tol, top_n=k)
    return {
        "eigenvalues": [float(x) for x in vals],
        "matvecs": counter.count - start,
        "config": f"eigenvalues(top_n={k}, tol={tol}, maxIter={MAX_ITER_PER_EIGENVALUE})",
    }


def trace_methods() -> list[str]:
    return ["hutchinson"]


def trace(problem: P.Problem, num_matvecs: int, method: str, seed: int) -> dict[str, Any]:
    if method != "hutchinson":
        raise Unsupported(f"no trace method {method!r}")
    h, counter = _op(problem)
    start = counter.count
    torch.manual_seed(seed)
    with default_dtype(problem.params[0].dtype):
        samples = h.trace(maxIter=num_matvecs, tol=-1.0)
    return {"estimate": float(np.mean(samples)), "matvecs": counter.count - start}


def slq(problem: P.Problem, num_runs: int, steps: int, seed: int) -> dict[str, Any]:
    h, counter = _op(problem)
    start = counter.count
    torch.manual_seed(seed)
    with default_dtype(problem.params[0].dtype):
        nodes, weights = h.density(iter=steps, n_v=num_runs)
    return {
        "nodes": [[float(x) for x in n] for n in nodes],
        "weights": [[float(x) for x in w] for w in weights],
        "matvecs": counter.count - start,
    }


def clear() -> None:
    _OPS.clear()
