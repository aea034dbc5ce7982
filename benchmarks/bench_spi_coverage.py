"""Stochastic power iteration: bias and error-bar coverage of the eigenvalue estimate.

Every operator here draws a fresh noisy product ``A_t`` with ``E[A_t] = A`` exactly, and
the top eigenvalue of ``A`` is known in float64:

- ``sign-noise``: ``A_t v = A v + sigma D_t v`` with ``D_t`` a fresh diagonal of random
  signs, ``sigma = 2``; ``A = Q diag(lambda) Q^T`` (n = 100, lambda_1 = 10, lambda_2 = 7,
  the rest uniform on [0, 5]).
- ``minibatch-covariance``: ``A = X^T X / N`` for N = 4000 rows of a Gaussian design with
  that spectrum; ``A_t`` is the same average over 64 rows drawn uniformly with replacement
  (a mini-batch Gauss-Newton matrix; much noisier than the first).
- ``cnn-digits``: the Hessian of the mean cross-entropy of a small CNN on scikit-learn's
  digits (``benchmarks/problems.py``, smoke size, float64); ``A_t`` is the Hessian of a
  batch of 64 samples drawn uniformly with replacement (``HessianOperator`` with
  ``full_dataset=False``); the truth is the eigenvalue of largest magnitude of the dense
  Hessian.

Each is run with ``momentum=0`` and with De Sa et al.'s ``lambda_2^2 / 4``, for ``--seeds``
seeds, ``max_iter=200`` and the default averaging window. Per configuration the script
records the mean relative error, the fraction of seeds within 2% of the truth, the coverage
``|estimate - truth| <= 3 stderr`` and the ratio of the mean reported stderr to the spread
of the estimates across seeds; it appends one JSON row per configuration to
``benchmarks/results/spi_coverage.json`` under ``--label`` (e.g. ``before`` / ``after`` a
change, run from the corresponding checkout).

    python benchmarks/bench_spi_coverage.py --seeds 50 --label after
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_estimators import machine
from problems import build, dense_hessian

from hessian_eigenthings import HessianOperator, LambdaOperator, stochastic_power_iteration

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "spi_coverage.json"
F64 = torch.float64
N = 100
MAX_ITER = 200


def _spectrum_and_basis() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.tensor([10.0, 7.0]), 5 * torch.rand(N - 2, generator=g)]).to(F64)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    return lam, q


def sign_noise() -> tuple[Any, float, float]:
    lam, q = _spectrum_and_basis()
    a = (q * lam) @ q.T
    a = (a + a.T) / 2

    def make(seed: int) -> LambdaOperator:
        gen = torch.Generator().manual_seed(10_000 + seed)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            signs = torch.randint(0, 2, (N,), generator=gen).to(F64) * 2 - 1
            return a @ v + 2.0 * signs * v

        return LambdaOperator(matvec, N, dtype=F64)

    evals = torch.linalg.eigvalsh(a)
    return make, float(evals[-1]), float(evals[-2])


def minibatch_covariance(batch: int = 64, rows: int = 4000) -> tuple[Any, float, float]:
    lam, q = _spectrum_and_basis()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, N, generator=g, dtype=F64) * lam.sqrt() @ q.T
    evals = torch.linalg.eigvalsh(x.T @ x / rows)

    def make(seed: int) -> LambdaOperator:
        gen = torch.Generator().manual_seed(20_000 + seed)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            xb = x[torch.randint(0, rows, (batch,), generator=gen)]
            return xb.T @ (xb @ v) / batch

        return LambdaOperator(matvec, N, dtype=F64)

    return make, float(evals[-1]), float(evals[-2])


def cnn_digits(batch: int = 64) -> tuple[Any, float, float]:
    problem = build("cnn_digits", smoke=True, dtype=F64)
    evals = torch.linalg.eigvalsh(dense_hessian(problem))
    by_magnitude = evals[torch.argsort(evals.abs(), descending=True)]
    xs = torch.cat([b[0] for b in problem.batches])
    ys = torch.cat([b[1] for b in problem.batches])
    data = TensorDataset(xs, ys)

    def make(seed: int) -> HessianOperator:
        gen = torch.Generator().manual_seed(30_000 + seed)
        sampler = RandomSampler(data, replacement=True, num_samples=len(data), generator=gen)
        loader = DataLoader(data, batch_size=batch, sampler=sampler)
        return HessianOperator(problem.model, loader, problem.loss, full_dataset=False)

    return make, float(by_magnitude[0]), float(by_magnitude[1])


MODELS = {
    "sign-noise": sign_noise,
    "minibatch-covariance": minibatch_covariance,
    "cnn-digits": cnn_digits,
}


def run(name: str, seeds: int) -> list[dict[str, Any]]:
    make, top, second = MODELS[name]()
    rows = []
    for momentum in (0.0, second**2 / 4):
        est, err = [], []
        start = time.perf_counter()
        for seed in range(seeds):
            res = stochastic_power_iteration(
                make(seed), max_iter=MAX_ITER, momentum=momentum, seed=seed
            )
            est.append(float(res.eigenvalues[0]))
            err.append(float(res.eigenvalue_stderr[0]))  # type: ignore[index]
        e, s = np.array(est), np.array(err)
        rel = (e - top) / abs(top)
        row = {
            "operator": name,
            "momentum": momentum,
            "max_iter": MAX_ITER,
            "seeds": seeds,
            "truth": top,
            "mean_estimate": float(e.mean()),
            "mean_relative_error": float(rel.mean()),
            "relative_error_range": [float(rel.min()), float(rel.max())],
            "within_2pct": float(np.mean(np.abs(rel) <= 0.02)),
            "coverage_3se": float(np.mean(np.abs(e - top) <= 3 * s)),
            "mean_stderr": float(s.mean()),
            "spread": float(e.std(ddof=1)),
            "stderr_over_spread": float(s.mean() / e.std(ddof=1)) if seeds > 1 else math.nan,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"{name:22s} beta={momentum:6.3f}  truth {top:8.4f}  mean {e.mean():8.4f} "
            f"({rel.mean():+.2%}, range {rel.min():+.2%}..{rel.max():+.2%})  "
            f"within 2%: {row['within_2pct']:.2f}  3-se coverage: {row['coverage_3se']:.2f}  "
            f"stderr/spread: {row['stderr_over_spread']:.2f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--label", default="current")
    parser.add_argument("--operators", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    rows = []
    for name in args.operators:
        rows += [{**r, "label": args.label, **info} for r in run(name, args.seeds)]
    previous = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.write_text(json.dumps(previous + rows, indent=1) + "\n")
    print(f"appended {len(rows)} rows to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
