"""Problems shared by the long-run tests and the child process they kill.

Run as a script (``python tests/_long_run_problems.py ALGO CHECKPOINT THREADS``), it runs
one algorithm with a checkpoint and prints ``mv <count>`` after every product (flushed),
sleeping a little per product so that the parent can kill it mid-run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hessian_eigenthings import LambdaOperator, lanczos, spectral_density, trace

N = 60


def matrix() -> torch.Tensor:
    """A fixed symmetric float64 matrix with spread and clustered eigenvalues."""
    gen = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    ev = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) ** 3
    ev[:3] = torch.tensor([9.0, 8.5, 8.4], dtype=torch.float64)
    return (q * ev) @ q.T


def operator(on_product: Callable[[int], None] | None = None) -> LambdaOperator:
    """LambdaOperator of :func:`matrix`; ``on_product(count)`` runs after each column."""
    a = matrix()
    count = [0]

    def mm(x: torch.Tensor) -> torch.Tensor:
        out = a @ x
        cols = 1 if x.dim() == 1 else x.shape[1]
        for _ in range(cols):
            count[0] += 1
            if on_product is not None:
                on_product(count[0])
        return out

    return LambdaOperator(mm, N, dtype=torch.float64, matmat_fn=mm)


def low_rank(op: LambdaOperator, rank: int = 5) -> LambdaOperator:
    """``P A P`` with ``P`` a fixed rank-``rank`` projector; every product goes through ``op``.

    Its sketches are numerically rank deficient, so XTrace and XDiag take their fallback.
    """
    gen = torch.Generator().manual_seed(99)
    basis, _ = torch.linalg.qr(torch.randn(N, rank, generator=gen, dtype=torch.float64))
    proj = basis @ basis.T

    def mm(x: torch.Tensor) -> torch.Tensor:
        return proj @ (op.matvec(proj @ x) if x.dim() == 1 else op.matmat(proj @ x))

    return LambdaOperator(mm, N, dtype=torch.float64, matmat_fn=mm)


# name -> (function(op, **checkpoint_kwargs) -> result, total products of a full run)
RUNS: dict[str, Callable[..., Any]] = {
    "lanczos": lambda op, **kw: lanczos(op, k=4, seed=3, basis_size=14, tol=1e-12, **kw),
    "slq": lambda op, **kw: spectral_density(op, num_runs=6, lanczos_steps=12, seed=5, **kw),
    "hutch++": lambda op, **kw: trace(op, 90, method="hutch++", seed=7, block_size=3, **kw),
    "xtrace": lambda op, **kw: trace(op, 80, method="xtrace", seed=7, block_size=3, **kw),
}


def main() -> None:
    name, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)

    def report(count: int) -> None:
        print(f"mv {count}", flush=True)
        time.sleep(0.02)

    RUNS[name](operator(report), checkpoint=path, checkpoint_every=3)
    print("done", flush=True)


if __name__ == "__main__":
    main()
