"""Estimator error versus matvec budget: trace (Hutchinson, Hutch++, XTrace) and diagonal
(Hutchinson, XDiag), over seeds, on synthetic spectra and a small real Hessian.

Operators (all with a known float64 ground truth):

- ``outliers+bulk``: PSD, 10 outliers from 30 to 1000 over a flat bulk of ones (n=1000).
- ``power-law``: PSD, lambda_i = i^(-1.5) (n=1000), a decaying spectrum.
- ``indefinite``: +-outliers over a Gaussian bulk N(0, 1) (n=1000).
- ``mlp-hessian``: the exact Hessian of a trained tanh MLP (1002 parameters, cross-entropy),
  materialised once with torch.autograd.functional.hessian and applied as a dense
  LambdaOperator (so the benchmark measures the estimators, not HVP speed).

Synthetic operators are A = U diag(lambda) U^T with a Haar-random orthogonal U.

Metrics per (operator, method, budget), over ``--seeds`` seeds:

- trace: mean and median of |estimate - tr(A)| / sum_i |lambda_i|; coverage of the
  3-sigma interval; mean stderr / sum |lambda_i|.
- diagonal: mean of ||d_hat - diag(A)||_2 / ||diag(A)||_2; per-entry 3-sigma coverage.

Writes benchmarks/results/estimators.json (rows with machine and versions),
docs/img/estimator_error.png and docs/benchmarks/estimators.md.

    python benchmarks/bench_estimators.py [--seeds 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
from torch import nn

import hessian_eigenthings
from hessian_eigenthings import LambdaOperator, diagonal, trace

ROOT = Path(__file__).resolve().parent.parent
DT = torch.float64
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
DIAG_METHODS = ("hutchinson", "xdiag")
BUDGETS = (10, 20, 50, 100, 200, 500, 1000)


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "hessian_eigenthings": hessian_eigenthings.__version__,
        "git_commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dense_operator(A: torch.Tensor) -> LambdaOperator:
    return LambdaOperator(lambda v: A @ v, A.shape[0], dtype=A.dtype, matmat_fn=lambda V: A @ V)


def synthetic(eigs: np.ndarray, seed: int) -> torch.Tensor:
    n = eigs.size
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, n, generator=g, dtype=DT)
    Q, R = torch.linalg.qr(Z)
    Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed
    A = (Q * torch.as_tensor(eigs, dtype=DT)) @ Q.T
    return 0.5 * (A + A.T)


def mlp_hessian() -> torch.Tensor:
    """Exact Hessian of a briefly trained tanh MLP (20 -> 32 -> 10, 1002 parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)
    X = torch.randn(512, 20, dtype=DT)
    y = (X[:, :10] + 0.5 * torch.randn(512, 10, dtype=DT)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}
        out = torch.func.functional_call(model, params, (X,))
        return nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, flat)
    return 0.5 * (H + H.T)


def operators() -> dict[str, torch.Tensor]:
    n = 1000
    rng = np.random.default_rng(0)
    outliers = np.array([1000.0, 500.0, 300.0, 200.0, 100.0, 80.0, 60.0, 50.0, 40.0, 30.0])
    return {
        "outliers+bulk": synthetic(np.concatenate([outliers, np.ones(n - 10)]), 1),
        "power-law": synthetic(np.arange(1, n + 1, dtype=float) ** -1.5, 2),
        "indefinite": synthetic(
            np.concatenate([[400.0, -300.0, 200.0, -100.0, 50.0], rng.normal(0.0, 1.0, n - 5)]),
            3,
        ),
        "mlp-hessian": mlp_hessian(),
    }


def run(seeds: int, budgets: tuple[int, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, A in operators().items():
        op = dense_operator(A)
        eigs = torch.linalg.eigvalsh(A).numpy()
        tr, scale = float(np.sum(eigs)), float(np.sum(np.abs(eigs)))
        d = torch.diagonal(A)
        base = {"operator": name, "n": A.shape[0], "trace": tr, "sum_abs_eig": scale}
        for m in budgets:
            for method in TRACE_METHODS:
                t0 = time.perf_counter()
                res = [trace(op, m, method=method, seed=s) for s in range(seeds)]
                err = np.array([abs(r.estimate - tr) / scale for r in res])
                z = np.array([abs(r.estimate - tr) / max(r.stderr, 1e-300) for r in res])
                rows.append(
                    base
                    | {
                        "kind": "trace",
                        "method": method,
                        "num_matvecs": m,
                        "matvecs_used": int(np.mean([r.num_matvecs for r in res])),
                        "seeds": seeds,
                        "mean_rel_error": float(err.mean()),
                        "median_rel_error": float(np.median(err)),
                        "coverage_3sigma": float(np.mean(z <= 3.0)),
                        "mean_rel_stderr": float(np.mean([r.stderr for r in res]) / scale),
                        "seconds_per_call": (time.perf_counter() - t0) / seeds,
                    }
                )
            for method in DIAG_METHODS:
                t0 = time.perf_counter()
                res_d = [diagonal(op, m, method=method, seed=s) for s in range(seeds)]
                err = np.array([float((r.estimate - d).norm() / d.norm()) for r in res_d])
                cov = [
                    float(((r.estimate - d).abs() <= 3 * r.stderr).double().mean()) for r in res_d
                ]
                rows.append(
                    base
                    | {
                        "kind": "diagonal",
                        "method": method,
                        "num_matvecs": m,
                        "matvecs_used": int(np.mean([r.num_matvecs for r in res_d])),
                        "seeds": seeds,
                        "mean_rel_error": float(err.mean()),
                        "median_rel_error": float(np.median(err)),
                        "coverage_3sigma": float(np.mean(cov)),
                        "seconds_per_call": (time.perf_counter() - t0) / seeds,
                    }
                )
            print(f"{name:14s} m={m:5d} done", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["operator"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(4.0 * len(names), 7.0), squeeze=False)
    for col, name in enumerate(names):
        for row, (kind, methods) in enumerate(
            (("trace", TRACE_METHODS), ("diagonal", DIAG_METHODS))
        ):
            ax = axes[row][col]
            for method in methods:
                sel = [
                    r
                    for r in rows
                    if r["operator"] == name and r["kind"] == kind and r["method"] == method
                ]
                ms = [r["num_matvecs"] for r in sel]
                ax.loglog(
                    ms, [max(r["mean_rel_error"], 1e-17) for r in sel], "o-", label=method, ms=3
                )
            ms_all = np.array(sorted({r["num_matvecs"] for r in rows}), dtype=float)
            first = next(r for r in rows if r["operator"] == name and r["kind"] == kind)
            ref = first["mean_rel_error"]
            ax.loglog(ms_all, ref * (ms_all[0] / ms_all) ** 0.5, "k:", lw=0.8, label="~ m^-1/2")
            ax.loglog(ms_all, ref * (ms_all[0] / ms_all), "k--", lw=0.8, label="~ m^-1")
            ax.set_title(f"{kind}: {name}")
            ax.set_xlabel("matvecs m")
            if col == 0:
                ax.set_ylabel(
                    "mean |err| / sum|lambda|" if kind == "trace" else "mean ||err|| / ||diag||"
                )
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"Estimator error vs matvec budget (mean over {rows[0]['seeds']} seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    names = list(dict.fromkeys(r["operator"] for r in rows))
    budgets = sorted({r["num_matvecs"] for r in rows})
    seeds = rows[0]["seeds"]
    lines = [
        "# Stochastic estimators: error versus matvec budget",
        "",
        "Mean relative error over "
        f"{seeds} seeds of `trace` (Hutchinson, Hutch++, XTrace) and `diagonal` (Hutchinson, "
        "XDiag) at budgets of 10 to 1000 operator products, and how often the reported "
        "`estimate ± 3·stderr` covers the truth. Trace errors are relative to "
        "`sum |lambda_i|` (the trace itself for PSD operators); diagonal errors are "
        "`||d_hat - diag(A)|| / ||diag(A)||`, coverage is per entry.",
        "",
        "Operators: `outliers+bulk` (PSD, 10 outliers 30-1000 over 990 ones), `power-law` "
        "(PSD, `lambda_i = i^-1.5`), `indefinite` (±outliers over a N(0,1) bulk), each "
        "`U diag(lambda) U^T` with Haar-random `U`, n=1000; `mlp-hessian`: the exact Hessian of "
        "a trained tanh MLP with 1002 parameters (materialised once, applied densely).",
        "",
        f"Machine: {meta['processor'] or meta['machine']} ({meta['platform']}), torch "
        f"{meta['torch']}, numpy {meta['numpy']}, scipy {meta['scipy']}, commit "
        f"{meta['git_commit']}. Reproduce with `python benchmarks/bench_estimators.py`; "
        "raw rows in `benchmarks/results/estimators.json`.",
        "",
        "![estimator error](../img/estimator_error.png)",
        "",
        "The same comparison on your own operator (any `CurvatureOperator`: a "
        "`HessianOperator`, `GGNOperator`, ...):",
        "",
        "```python",
        "import torch",
        "from hessian_eigenthings import LambdaOperator, diagonal, trace",
        "",
        "n = 500",
        "Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))",
        "eigs = torch.cat([torch.tensor([300.0, 100.0, 50.0]), torch.ones(n - 3)]).double()",
        "A = (Q * eigs) @ Q.T",
        "op = LambdaOperator(lambda v: A @ v, n, dtype=A.dtype, matmat_fn=lambda V: A @ V)",
        'for method in ("hutchinson", "hutch++", "xtrace"):',
        "    res = trace(op, 100, method=method, seed=0)",
        '    print(f"{method:10s} {res.estimate:9.3f} +- {res.stderr:.3f}")',
        'print("true trace", float(eigs.sum()))',
        'd = diagonal(op, 100, method="xdiag", seed=0)',
        'print("max diag error", float((d.estimate - A.diagonal()).abs().max()))',
        "```",
        "",
        "Reading the results:",
        "",
        "- Hutchinson's error falls like `m^-1/2` everywhere.",
        "- With a few large eigenvalues (`outliers+bulk`, `power-law`, `indefinite`) the "
        "sketching methods remove them exactly: at 100 matvecs Hutch++ and XTrace are 10x to "
        "450x more accurate than Hutchinson, and XTrace is at or below Hutch++.",
        "- On a flat bulk of equal eigenvalues (`outliers+bulk`) Hutch++ stops improving once "
        "the outliers are deflated: its residual `P A P` is then close to the projector `P`, "
        "whose Rademacher-Hutchinson variance grows with the sketch size. XTrace's normalised "
        "probes do not have this problem and keep falling (1.7e-6 at m=1000).",
        "- The MLP Hessian here has no dominant eigenvalues (its top eigenvalue is 0.17 of a "
        "trace of 12.7 spread over ~750 non-negligible eigenvalues) and a heavy diagonal, "
        "the regime where Rademacher Hutchinson is strong: below ~200 matvecs it is as good as "
        "or better than the sketching methods, which spend budget on a sketch that captures "
        "little. Prefer Hutch++/XTrace when a spectral density or top eigenvalues show "
        "outliers; Hutchinson otherwise (it also needs the least memory).",
        "- Diagonal: XDiag beats Hutchinson by 10x to 300x when there are outliers; on the "
        "flat MLP Hessian it only wins above ~200 matvecs.",
        "- Coverage columns are over only "
        f"{seeds} seeds (steps of {1 / seeds:.2f}); the test suite checks 3-sigma coverage "
        ">= 90% over 200 seeds. With very few residual probes (Hutch++ at m=10 has 4) the "
        "standard error is itself noisy; results carry `details['dof']` for Student-t "
        "intervals.",
        "",
    ]
    for kind, methods in (("trace", TRACE_METHODS), ("diagonal", DIAG_METHODS)):
        lines += [f"## {kind.capitalize()}", ""]
        header = (
            "| operator | m | "
            + " | ".join(f"{meth} err | {meth} cover" for meth in methods)
            + " |"
        )
        lines += [header, "|" + "---|" * (2 + 2 * len(methods))]
        for name in names:
            for m in budgets:
                cells = []
                for meth in methods:
                    r = next(
                        r
                        for r in rows
                        if r["operator"] == name
                        and r["kind"] == kind
                        and r["method"] == meth
                        and r["num_matvecs"] == m
                    )
                    cells += [f"{r['mean_rel_error']:.2e}", f"{r['coverage_3sigma']:.2f}"]
                lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Ratios at about 100 matvecs",
        "",
        "| operator | Hutchinson / Hutch++ | Hutchinson / XTrace | Hutch++ / XTrace |",
        "|---|---|---|---|",
    ]
    for name in names:
        e = {
            r["method"]: r["mean_rel_error"]
            for r in rows
            if r["operator"] == name and r["kind"] == "trace" and r["num_matvecs"] == 100
        }
        if len(e) == 3:
            lines.append(
                f"| {name} | {e['hutchinson'] / e['hutch++']:.3g} | "
                f"{e['hutchinson'] / max(e['xtrace'], 1e-300):.3g} | "
                f"{e['hutch++'] / max(e['xtrace'], 1e-300):.3g} |"
            )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="budgets 10, 100 and 2 seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/estimators.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs/img/estimator_error.png")
    parser.add_argument("--md", type=Path, default=ROOT / "docs/benchmarks/estimators.md")
    parser.add_argument(
        "--from-json", action="store_true", help="only re-render the plot and page from --out"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        plot(saved["rows"], args.png)
        markdown(saved["rows"], saved["meta"], args.md)
        return
    torch.set_num_threads(1)
    seeds, budgets = (2, (10, 100)) if args.quick else (args.seeds, BUDGETS)
    meta = machine()
    rows = [meta_row | row for row in run(seeds, budgets) for meta_row in [{"machine": meta}]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    plot(rows, args.png)
    markdown(rows, meta, args.md)
    for r in rows:
        if r["num_matvecs"] == 100:
            print(
                f"{r['operator']:14s} {r['kind']:8s} {r['method']:10s} "
                f"err={r['mean_rel_error']:.2e} cover={r['coverage_3sigma']:.2f}"
            )
    print(f"wrote {args.out}, {args.png}, {args.md}")


if __name__ == "__main__":
    main()
