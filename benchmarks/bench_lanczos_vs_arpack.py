"""Our thick-restart Lanczos versus ARPACK (scipy.sparse.linalg.eigsh) at the same tolerance.

Operators (float64, ground truth from numpy.linalg.eigvalsh of the dense matrix):

- ``hessian-like``: n=2000, outliers 120, 70, 45, a triple eigenvalue 30, more outliers,
  a decaying signed tail and a signed bulk in [-3, 3] concentrated near zero.
- ``clustered``: n=2000, 40 eigenvalues 10.00, 10.01, ..., 10.39 over a bulk in [0, 5].
- ``mlp-hessian``: the exact Hessian (autograd HVPs through ``HessianOperator``) of a
  float64 tanh MLP 20-32-32-5 (1893 parameters) on 256 samples, cross-entropy.

For each operator and k in {1, 5, 10, 30}, both solvers run from a Gaussian start vector
of the same seed (seeds 0..S-1) with ``which="LM"`` and ``tol`` (ARPACK's criterion
``||r|| <= tol |theta|``; ours is the same above a tiny floor). Metrics: matvecs (counted
by a wrapper around the operator), wall time, and the largest relative eigenvalue error
against eigvalsh. Both use their default basis sizes (ARPACK: ncv = max(2k + 1, 20);
ours: max(2k + 1, 30)).

Writes rows (machine, versions, configuration) to benchmarks/results/lanczos_vs_arpack.json
and the table to docs/benchmarks/lanczos_vs_arpack.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_vs_arpack.py [--seeds 3] [--tol 1e-8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from hessian_eigenthings import HessianOperator, LambdaOperator
from hessian_eigenthings.algorithms.lanczos import default_basis_size, lanczos
from hessian_eigenthings.operators.base import CurvatureOperator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lanczos_vs_arpack.json"
PAGE = ROOT / "docs" / "benchmarks" / "lanczos_vs_arpack.md"
F64 = torch.float64


class Counting:
    """Wraps an operator and counts the products applied through it."""

    def __init__(self, op: CurvatureOperator) -> None:
        self.op = op
        self.count = 0
        self.wrapped = LambdaOperator(self._mv, op.size, dtype=op.dtype, device=op.device)

    def _mv(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.op.matvec(v)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _dense_op(lam: torch.Tensor, seed: int) -> tuple[CurvatureOperator, np.ndarray]:
    q = _orthogonal(lam.numel(), seed)
    a = (q * lam) @ q.T
    a = (a + a.T) / 2
    return LambdaOperator(lambda v: a @ v, lam.numel(), dtype=F64), np.linalg.eigvalsh(a.numpy())


def hessian_like(n: int = 2000) -> tuple[CurvatureOperator, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(n, generator=g, dtype=F64) < 0.3, -1.0, 1.0)
    lam = sign * 3.0 * torch.rand(n, generator=g, dtype=F64) ** 4
    outliers = torch.tensor(
        [120.0, 70.0, 45.0, 30.0, 30.0, 30.0, 22.0, 18.0, 15.0, 12.0, -11.0, 9.0], dtype=F64
    )
    lam[: outliers.numel()] = outliers
    tail = 8.0 * 0.9 ** torch.arange(30, dtype=F64)
    lam[outliers.numel() : outliers.numel() + 30] = tail * torch.where(
        torch.arange(30) % 4 == 3, -1.0, 1.0
    )
    return _dense_op(lam, seed=1)


def clustered(n: int = 2000) -> tuple[CurvatureOperator, np.ndarray]:
    g = torch.Generator().manual_seed(4)
    lam = torch.cat(
        [
            10.0 + 0.01 * torch.arange(40, dtype=F64),
            5.0 * torch.rand(n - 40, generator=g, dtype=F64),
        ]
    )
    return _dense_op(lam, seed=5)


def mlp_hessian() -> tuple[CurvatureOperator, np.ndarray]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    ).double()
    x = torch.randn(256, 20, dtype=F64)
    y = torch.randint(0, 5, (256,))
    data = [(x[:128], y[:128]), (x[128:], y[128:])]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, data, loss)
    dense = op.matmat(torch.eye(op.size, dtype=F64))
    dense = (dense + dense.T) / 2
    return op, np.linalg.eigvalsh(dense.numpy())


def _top(evals: np.ndarray, k: int) -> np.ndarray:
    return evals[np.argsort(-np.abs(evals), kind="stable")][:k]


def _rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    got = got[np.argsort(-np.abs(got), kind="stable")]
    return float(np.max(np.abs(got - expected) / np.abs(expected)))


def run(seeds: int, tol: float, ks: list[int]) -> list[dict[str, Any]]:
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    for name, build in (
        ("hessian-like", hessian_like),
        ("clustered", clustered),
        ("mlp-hessian", mlp_hessian),
    ):
        op, evals = build()
        n = op.size
        for k in ks:
            expected = _top(evals, k)
            for seed in range(seeds):
                counted = Counting(op)
                t0 = time.perf_counter()
                res = lanczos(counted.wrapped, k=k, which="LM", tol=tol, seed=seed)
                t_ours = time.perf_counter() - t0
                assert counted.count == res.num_matvecs
                ours = {
                    "solver": "hessian_eigenthings.lanczos",
                    "matvecs": counted.count,
                    "wall_s": t_ours,
                    "max_rel_err": _rel_err(res.eigenvalues.numpy(), expected),
                    "all_converged": res.all_converged,
                    "basis_size": default_basis_size(k, n),
                }
                counted = Counting(op)
                v0 = np.random.default_rng(seed).standard_normal(n)
                t0 = time.perf_counter()
                w = eigsh(
                    counted.wrapped.to_scipy(),
                    k=k,
                    which="LM",
                    tol=tol,
                    v0=v0,
                    return_eigenvectors=True,
                )[0]
                t_arpack = time.perf_counter() - t0
                arpack = {
                    "solver": "scipy.sparse.linalg.eigsh (ARPACK)",
                    "matvecs": counted.count,
                    "wall_s": t_arpack,
                    "max_rel_err": _rel_err(np.asarray(w), expected),
                    "all_converged": True,  # eigsh raises ArpackNoConvergence otherwise
                    "basis_size": min(n, max(2 * k + 1, 20)),
                }
                for r in (ours, arpack):
                    rows.append(
                        {
                            "benchmark": "lanczos_vs_arpack",
                            "time": stamp,
                            **machine,
                            "operator": name,
                            "n": n,
                            "k": k,
                            "which": "LM",
                            "tol": tol,
                            "seed": seed,
                            **r,
                        }
                    )
                print(
                    f"{name:12s} k={k:2d} seed={seed}  ours {ours['matvecs']:4d} mv "
                    f"{t_ours:6.2f}s err {ours['max_rel_err']:.1e} | ARPACK "
                    f"{arpack['matvecs']:4d} mv {t_arpack:6.2f}s err {arpack['max_rel_err']:.1e}",
                    flush=True,
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| operator | k | matvecs ours | matvecs ARPACK | ratio | time ours (s) | "
        "time ARPACK (s) | max rel. err ours | max rel. err ARPACK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["operator"], r["k"]) for r in rows}, key=lambda t: (t[0], t[1]))
    order = {"hessian-like": 0, "clustered": 1, "mlp-hessian": 2}
    keys.sort(key=lambda t: (order.get(t[0], 9), t[1]))
    for name, k in keys:
        sel = [r for r in rows if r["operator"] == name and r["k"] == k]
        ours = [r for r in sel if r["solver"].startswith("hessian")]
        arp = [r for r in sel if not r["solver"].startswith("hessian")]
        mo = float(np.mean([r["matvecs"] for r in ours]))
        ma = float(np.mean([r["matvecs"] for r in arp]))
        out.append(
            f"| {name} | {k} | {mo:.0f} | {ma:.0f} | {mo / ma:.2f} | "
            f"{np.median([r['wall_s'] for r in ours]):.2f} | "
            f"{np.median([r['wall_s'] for r in arp]):.2f} | "
            f"{max(r['max_rel_err'] for r in ours):.1e} | "
            f"{max(r['max_rel_err'] for r in arp):.1e} |"
        )
    return "\n".join(out)


def _missed(rows: list[dict[str, Any]]) -> str:
    worst: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if not r["solver"].startswith("hessian") and r["max_rel_err"] > 1e-6:
            worst.setdefault((r["operator"], r["k"]), []).append(r["max_rel_err"])
    if not worst:
        return "in this run it found every copy."
    seeds = len({r["seed"] for r in rows})
    cases = ", ".join(
        f"`{o}` k={k} ({len(e)} of {seeds} seeds, error up to {max(e):.1e})"
        for (o, k), e in sorted(worst.items())
    )
    return (
        f"in this run it returned wrong eigenvalues while reporting success in {cases}. "
        "On `hessian-like` with k=10 it returns 30 twice instead of three times and "
        "takes -11 (the 11th eigenvalue by magnitude) instead."
    )


def _verdict(rows: list[dict[str, Any]]) -> str:
    ratios = []
    for name, k in sorted({(r["operator"], r["k"]) for r in rows}):
        sel = [r for r in rows if r["operator"] == name and r["k"] == k]
        ours = np.mean([r["matvecs"] for r in sel if r["solver"].startswith("hessian")])
        arp = np.mean([r["matvecs"] for r in sel if not r["solver"].startswith("hessian")])
        ratios.append(float(ours / arp))
    above = sum(r > 1.0 for r in ratios)
    return (
        f"Goal: no more matvecs than ARPACK, at most 2x in any case. Result: the largest "
        f"ratio is {max(ratios):.2f} (so the 2x bound holds everywhere); {above} of "
        f"{len(ratios)} rows need more matvecs than ARPACK, by the verification cycle "
        "described below, so the first goal is not met in those rows."
    )


def write_json(rows: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(previous + rows, indent=1) + "\n")


def write_page(rows: list[dict[str, Any]], seeds: int, tol: float) -> None:
    m = rows[0]
    missed = _missed(rows)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(
        f"""# Lanczos versus ARPACK

`hessian_eigenthings.lanczos` (thick restart, full reorthogonalisation, multiplicity
verification) against `scipy.sparse.linalg.eigsh` (ARPACK's implicitly restarted
Lanczos) on the same operators, `which="LM"`, `tol={tol:g}` for both (ARPACK:
`||r|| <= tol |theta|`; ours: the same, with a floor for eigenvalues near zero),
matching Gaussian start vectors, seeds 0..{seeds - 1}. Matvecs are means over seeds, times
medians, errors the worst case over seeds of `max_i |theta_i - lambda_i| / |lambda_i|`
against `numpy.linalg.eigvalsh` of the dense matrix.

Produced by `OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_vs_arpack.py --seeds {seeds}`
on {m["platform"]} ({m["processor"]}), Python {m["python"]}, torch {m["torch"]},
NumPy {m["numpy"]}, SciPy {m["scipy"]}, {m["torch_threads"]} torch thread(s), {m["time"]}.
Rows: `benchmarks/results/lanczos_vs_arpack.json`.

{table(rows)}

{_verdict(rows)}

Reading the table:

- Operators: `hessian-like` (n=2000: outliers 120, 70, 45, a triple eigenvalue 30, a
  decaying signed tail, a signed bulk concentrated near zero), `clustered` (n=2000: 40
  eigenvalues 10.00 ... 10.39 over a bulk in [0, 5]), `mlp-hessian` (exact Hessian of a
  float64 tanh MLP 20-32-32-5, 1893 parameters, 256 samples; products are real
  autograd HVPs).
- Our count includes the verification cycle that confirms no copy of a repeated
  eigenvalue is missing (one cycle of `m - l` products after convergence; halving it
  made our solver miss copies of the triple eigenvalue on `hessian-like`, so it stays).
  ARPACK does not verify: {missed}
- Wall times on these cheap dense operators are dominated by per-iteration overhead
  (Python, Gram-Schmidt); for a real model's Hessian the matvec count is what matters.
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 30])
    parser.add_argument(
        "--page-only", action="store_true", help="rewrite the page from the latest JSON run"
    )
    args = parser.parse_args()
    if args.page_only:
        stored = json.loads(RESULTS.read_text())
        latest = max(r["time"] for r in stored)
        rows = [r for r in stored if r["time"] == latest]
        seeds = len({r["seed"] for r in rows})
        write_page(rows, seeds, rows[0]["tol"])
        print(table(rows))
        return
    rows = run(args.seeds, args.tol, args.ks)
    print(table(rows))
    write_json(rows)
    write_page(rows, args.seeds, args.tol)


if __name__ == "__main__":
    main()
