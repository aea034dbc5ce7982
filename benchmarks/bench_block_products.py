"""Block products: per-vector cost of a block, algorithms before/after, Lanczos vs ARPACK.

    python benchmarks/bench_block_products.py [--rounds 15] [--problems mlp_digits,...]
        [--sections products,algorithms,lanczos,ggn_passes] [--update] [--out FILE.json]
        [--md FILE.md]
    python benchmarks/bench_block_products.py --from-json [--out FILE.json] [--md FILE.md]

Problems (``problems.py``, float32, one intra-op thread): the digits MLP with LayerNorm, the
digits CNN and the tiny GPT-2. Every number is a ratio to a baseline timed in the same run,
interleaved with it call by call, and the median over ``--rounds`` rounds (each round
times every variant once, in the same order, so machine noise hits all alike).

``products``: for the Hessian, the GGN (``ggn``: the default ``one_pass=False``, a
forward-mode pass without graph, then the forward with graph, per batch and block: the
peak memory of a training step; ``ggn_one_pass``: ``one_pass=True``, the tangents carried
along the forward with graph, one call of the forward per batch and block) and the
empirical Fisher (its default ``one_pass=True``), in both block modes (``loop``: one
reverse pass per vector over the retained graph; ``vmap``: batched with
``is_grads_batched``), the per-vector time of ``matmat`` on a block of 1, 4, 16 and 32
vectors over the time of one ``matvec`` (the block of 1), and the time of one product over
that of one gradient of the same loss.

``ggn_passes``: one GGN product with ``one_pass=True`` against the default
``one_pass=False``, each over one gradient, their paired ratio and their agreement.

``algorithms``: wall-clock of ``trace`` (each method) and ``diagonal`` (each method) at
64 products and of ``spectral_density(num_runs=8, lanczos_steps=20)`` on the Hessian,
before (the same operator multiplying a block column by column, each column a pass over
the data: the behaviour before block products; for SLQ, ``block_size=1``) and after.
Results agree to rounding (recorded).

``lanczos``: ``lanczos(k=5)`` against scipy's ``eigsh`` (ARPACK) on ``operator.to_scipy()``
at the same relative tolerance, and a block Lanczos prototype (block Krylov with
Rayleigh-Ritz and explicit residuals, blocks of 4 and 8 vectors through ``matmat``) to
decide whether a block Lanczos option beats the single-vector solver on wall-clock at equal
tolerance: products, wall-clock and the largest relative eigenvalue difference.

Results: JSON rows with machine and versions in ``benchmarks/results/block_products.json``
and the page ``docs/benchmarks/block_products.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import problems as P  # noqa: E402

import hessian_eigenthings  # noqa: E402
from hessian_eigenthings import (  # noqa: E402
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    diagonal,
    lanczos,
    spectral_density,
    trace,
)
from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output  # noqa: E402

F = nn.functional
BLOCKS = (1, 4, 16, 32)
KINDS = ("hessian", "ggn", "ggn_one_pass", "empirical_fisher")
MODES = ("loop", "vmap")


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
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "hessian_eigenthings": hessian_eigenthings.__version__,
        "git_commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _forward(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


def _rows(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _rows_weight(batch: Any) -> int:
    return int(batch[1].shape[0])


def make_operator(problem: P.Problem, kind: str, **options: Any) -> Any:
    model, data = problem.model, problem.batches
    if kind == "hessian":
        return HessianOperator(model, data, problem.loss, **options)
    if kind == "ggn":  # the default: one_pass=False (two calls of the forward)
        return GGNOperator(model, data, _forward, cross_entropy_loss_of_output(), **options)
    if kind == "ggn_one_pass":
        return GGNOperator(
            model, data, _forward, cross_entropy_loss_of_output(), one_pass=True, **options
        )
    # every label row is a sample (padding rows included: their loss is 0)
    return EmpiricalFisherOperator(model, data, _rows, weight_fn=_rows_weight, **options)


# -- products ----------------------------------------------------------------------------------


def bench_products(problem: P.Problem, rounds: int) -> list[dict[str, Any]]:
    ops = {(k, m): make_operator(problem, k, block_mode=m) for k in KINDS for m in MODES}
    n = problem.num_params
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(n, max(BLOCKS), generator=gen, dtype=torch.float32)
    checks: dict[tuple[str, str], float] = {}
    for key, op in ops.items():  # warm up, and block == columns
        cols = torch.stack([op.matvec(V[:, j]) for j in range(4)], dim=1)
        checks[key] = rel(op.matmat(V[:, :4]), cols)
    problem.flat_grad()
    times: dict[tuple[str, str, int], list[float]] = {}
    ratios: dict[tuple[str, str, int], list[float]] = {}
    over_grad: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        t_grad = timed(problem.flat_grad)
        for (kind, mode), op in ops.items():
            op.matvec(V[:, 1])  # untimed: the first call after another operator's runs slower
            t_one = timed(lambda op=op: op.matvec(V[:, 0]))
            over_grad.setdefault((kind, mode), []).append(t_one / t_grad)
            for b in BLOCKS:
                t_b = timed(lambda op=op, b=b: op.matmat(V[:, :b]))
                times.setdefault((kind, mode, b), []).append(t_b / b)
                ratios.setdefault((kind, mode, b), []).append(t_b / b / t_one)
    rows = []
    for (kind, mode), vals in over_grad.items():
        rows.append(
            {
                "section": "products",
                "problem": problem.name,
                "params": n,
                "operator": kind,
                "mode": mode,
                "block": 1,
                "product_over_gradient": statistics.median(vals),
                "block_vs_columns_rel": checks[(kind, mode)],
                "rounds": rounds,
            }
        )
    for (kind, mode, b), vals in ratios.items():
        rows.append(
            {
                "section": "products",
                "problem": problem.name,
                "params": n,
                "operator": kind,
                "mode": mode,
                "block": b,
                "per_vector_over_product": statistics.median(vals),
                "per_vector_over_product_spread": [min(vals), max(vals)],
                "per_vector_ms": 1e3 * statistics.median(times[(kind, mode, b)]),
                "rounds": rounds,
            }
        )
    return rows


def bench_ggn_passes(problem: P.Problem, rounds: int) -> list[dict[str, Any]]:
    """One GGN product with ``one_pass=True`` against the default ``one_pass=False``, paired
    (each also over one gradient, timed alternately with them)."""
    one = make_operator(problem, "ggn_one_pass")
    two = make_operator(problem, "ggn")
    assert one.one_pass and not two.one_pass
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        one.matvec(v), two.matvec(v), problem.flat_grad()
    r_one, r_two, paired = [], [], []
    for _ in range(rounds):
        g = timed(problem.flat_grad)
        a = timed(lambda: one.matvec(v))
        b = timed(lambda: two.matvec(v))
        r_one.append(a / g)
        r_two.append(b / g)
        paired.append(a / b)
    return [
        {
            "section": "ggn_passes",
            "problem": problem.name,
            "params": problem.num_params,
            "one_pass_over_gradient": statistics.median(r_one),
            "two_pass_over_gradient": statistics.median(r_two),
            "one_pass_over_two_pass": statistics.median(paired),
            "one_pass_over_two_pass_quartiles": statistics.quantiles(paired, n=4),
            "agreement_rel": rel(one.matvec(v), two.matvec(v)),
            "rounds": rounds,
        }
    ]


# -- algorithms --------------------------------------------------------------------------------


def column_loop(op: Any) -> LambdaOperator:
    """``op`` with the column-by-column block product (one pass over the data per column)."""
    return LambdaOperator(op.matvec, op.size, dtype=op.dtype, device=op.device)


def _value(res: Any) -> torch.Tensor:
    if hasattr(res, "nodes"):
        return torch.as_tensor(np.concatenate(res.nodes))
    est = res.estimate
    return est if isinstance(est, torch.Tensor) else torch.tensor([est])


def bench_algorithms(problem: P.Problem, rounds: int) -> list[dict[str, Any]]:
    op = make_operator(problem, "hessian")
    before = column_loop(op)
    calls: dict[str, Callable[[Any, bool], Any]] = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        calls[f"trace {method}"] = lambda o, _b, m=method: trace(o, 64, method=m, seed=0)
    for method in ("hutchinson", "xdiag"):
        calls[f"diagonal {method}"] = lambda o, _b, m=method: diagonal(o, 64, method=m, seed=0)
    calls["spectral_density 8x20"] = lambda o, b: spectral_density(
        o, num_runs=8, lanczos_steps=20, seed=0, block_size=1 if b else 16
    )
    rows = []
    for name, call in calls.items():
        after_res, before_res = call(op, False), call(before, True)  # warm, and agreement
        t_after, t_before, ratio = [], [], []
        for _ in range(rounds):
            a = timed(lambda call=call: call(op, False))
            b = timed(lambda call=call: call(before, True))
            t_after.append(a)
            t_before.append(b)
            ratio.append(b / a)
        rows.append(
            {
                "section": "algorithms",
                "problem": problem.name,
                "params": problem.num_params,
                "algorithm": name,
                "num_matvecs": after_res.num_matvecs,
                "before_s": statistics.median(t_before),
                "after_s": statistics.median(t_after),
                "speedup": statistics.median(ratio),
                "speedup_spread": [min(ratio), max(ratio)],
                "result_rel_diff": rel(_value(after_res), _value(before_res)),
                "rounds": rounds,
            }
        )
    return rows


# -- lanczos -----------------------------------------------------------------------------------


def block_krylov(
    op: Any, k: int, block: int, tol: float, seed: int, max_dim: int = 600
) -> tuple[torch.Tensor, int]:
    """Block Lanczos prototype: block Krylov space, Rayleigh-Ritz after every block product,
    explicit residuals ``||A y - theta y||`` from the stored products; stops when the top-k
    (by magnitude) meet ``||r|| <= tol |theta|``. Returns the eigenvalues and products."""
    n = op.size
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, block, generator=gen, dtype=op.dtype))[0]
    basis, images = Q, op.matmat(Q)
    products = block
    while True:
        H = basis.T @ images
        theta, S = torch.linalg.eigh(((H + H.T) / 2).double())
        order = torch.argsort(theta.abs(), descending=True)[:k]
        theta, S = theta[order], S[:, order].to(op.dtype)
        resid = torch.linalg.vector_norm(images @ S - (basis @ S) * theta.to(op.dtype), dim=0)
        if bool((resid <= tol * theta.abs().to(op.dtype)).all()) or basis.shape[1] >= max_dim:
            return theta, products
        W = images[:, -block:]
        for _ in range(2):
            W = W - basis @ (basis.T @ W)
        Q = torch.linalg.qr(W)[0]
        basis = torch.cat([basis, Q], dim=1)
        images = torch.cat([images, op.matmat(Q)], dim=1)
        products += block


def bench_lanczos(problem: P.Problem, rounds: int, tol: float = 1e-4) -> list[dict[str, Any]]:
    from scipy.sparse.linalg import eigsh

    op = make_operator(problem, "hessian")
    lin = op.to_scipy()
    counter = {"n": 0}
    inner_mv, inner_mm = op.matvec, op.matmat

    def mv(v: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return inner_mv(v)

    def mm(V: torch.Tensor) -> torch.Tensor:
        counter["n"] += V.shape[1]
        return inner_mm(V)

    op.matvec, op.matmat = mv, mm
    solvers: dict[str, Callable[[], torch.Tensor]] = {
        "lanczos (ours)": lambda: lanczos(op, k=5, tol=tol, seed=0).eigenvalues,
        "scipy eigsh": lambda: torch.as_tensor(
            eigsh(lin, k=5, which="LM", tol=tol, v0=np.ones(op.size, dtype=np.float32))[0]
        ),
        "block Krylov b=4 (prototype)": lambda: block_krylov(op, 5, 4, tol, 0)[0],
        "block Krylov b=8 (prototype)": lambda: block_krylov(op, 5, 8, tol, 0)[0],
    }
    reference = None
    rows = []
    results: dict[str, tuple[torch.Tensor, int]] = {}
    for name, solve in solvers.items():
        counter["n"] = 0
        vals = solve()
        results[name] = (torch.sort(vals.double().abs(), descending=True)[0], counter["n"])
    reference = results["lanczos (ours)"][0]
    t: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(rounds):
        for name, solve in solvers.items():
            t[name].append(timed(solve))
    base = statistics.median(t["lanczos (ours)"])
    for name in solvers:
        vals, products = results[name]
        rows.append(
            {
                "section": "lanczos",
                "problem": problem.name,
                "params": problem.num_params,
                "solver": name,
                "tol": tol,
                "products": products,
                "wall_s": statistics.median(t[name]),
                "over_ours": statistics.median(t[name]) / base,
                "max_rel_eig_diff_vs_ours": float(((vals - reference).abs() / reference).max()),
                "rounds": rounds,
            }
        )
    return rows


# -- report ------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "# Block products: one pass over the data per block",
        "",
        "`python benchmarks/bench_block_products.py` (rows in "
        "`benchmarks/results/block_products.json`). Every number is a ratio to a baseline timed "
        "in the same run, interleaved call by call, median over rounds (the spread is the "
        "min-max over rounds).",
        "",
        f"Machine: {meta['platform']}, {meta['cpu_count']} cores shared with other jobs "
        f"(load average {meta.get('load_average') or 0:.1f} at the start), torch "
        f"{meta['torch']}, {meta['threads']} thread, commit {meta['git_commit']} (the last "
        "run; `--update` keeps the sections it did not redo). By section: "
        + provenance(rows)
        + ".",
        "",
        "## Per-vector cost of a block",
        "",
        "Time per vector of `matmat` on a block of `b` vectors over the time of one `matvec` "
        "(`b = 1`); the goal on CPU is at most 0.6 at `b = 16`. `loop`: one reverse pass per "
        "vector over the retained graph (the CPU default); `vmap`: batched with "
        "`is_grads_batched` (the CUDA default). The `b=1` column times the matvec's own "
        "work again: its distance from 1.00 is the noise of this run.",
        "",
        "| problem | params | operator | mode | b=1 | b=4 | b=16 | b=32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    prod = [r for r in rows if r["section"] == "products" and "per_vector_over_product" in r]
    keys = sorted({(r["problem"], r["operator"], r["mode"]) for r in prod})
    for problem, kind, mode in keys:
        cells = {
            r["block"]: r
            for r in prod
            if (r["problem"], r["operator"], r["mode"]) == (problem, kind, mode)
        }
        params = next(iter(cells.values()))["params"]
        vals = [f"{cells[b]['per_vector_over_product']:.2f}" if b in cells else "-" for b in BLOCKS]
        out.append(f"| {problem} | {params:,} | {kind} | {mode} | " + " | ".join(vals) + " |")
    out += [
        "",
        "## One product against one gradient",
        "",
        "Time of one `matvec` over one gradient of the same mean loss (all batches). The "
        "empirical Fisher defaults to `one_pass=True`: one call of the forward per batch "
        "and block, the forward-mode tangents carried along the forward that records the "
        "graph. The GGN (`ggn`) and the MC Fisher default to `one_pass=False`: a "
        "forward-mode pass without graph, then the forward with graph (two calls per batch "
        "and block), for the peak memory of a training step; `ggn_one_pass` is the GGN "
        "with the opt-in `one_pass=True`. Goal: the GGN product at most 1.5x a gradient. "
        "The last column is the largest relative difference between a block of 4 and its "
        "columns.",
        "",
        "| problem | operator | mode | product / gradient | block vs columns |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r["section"] == "products" and "product_over_gradient" in r),
        key=lambda r: (r["problem"], r["operator"], r["mode"]),
    ):
        out.append(
            f"| {r['problem']} | {r['operator']} | {r['mode']} | "
            f"{r['product_over_gradient']:.2f} | {r['block_vs_columns_rel']:.1e} |"
        )
    algo = [r for r in rows if r["section"] == "algorithms"]
    if algo:
        out += [
            "",
            "## Algorithms before and after, at equal products",
            "",
            "Hessian operator. Before: the same operator multiplying blocks column by column "
            "(one pass over the data per column, as before block products; SLQ with "
            "`block_size=1`). Goal: at least 1.6x faster.",
            "",
            "| problem | algorithm | products | before (s) | after (s) | speed-up | spread "
            "| result rel. diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in algo:
            lo, hi = r["speedup_spread"]
            out.append(
                f"| {r['problem']} | {r['algorithm']} | {r['num_matvecs']} | {r['before_s']:.3f} "
                f"| {r['after_s']:.3f} | {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f} "
                f"| {r['result_rel_diff']:.1e} |"
            )
    lz = [r for r in rows if r["section"] == "lanczos"]
    if lz:
        out += [
            "",
            "## Top-5 eigenvalues: Lanczos, ARPACK and block Krylov",
            "",
            "Hessian operator, relative tolerance `tol` for each solver (ARPACK's `tol`, our "
            "`tol`, the prototype's `||r|| <= tol |theta|`). The block Krylov prototype "
            "multiplies blocks of 4 or 8 vectors (one pass over the data per block) and "
            "keeps the whole basis; it decides whether a block Lanczos option is worth "
            "adding.",
            "",
            "| problem | solver | products | wall (s) | / ours | max rel. eig. diff vs ours |",
            "|---|---|---|---|---|---|",
        ]
        for r in lz:
            out.append(
                f"| {r['problem']} | {r['solver']} | {r['products']} | {r['wall_s']:.3f} | "
                f"{r['over_ours']:.2f} | {r['max_rel_eig_diff_vs_ours']:.1e} |"
            )
        faster = [r for r in lz if r["solver"].startswith("block") and r["over_ours"] < 1.0]
        ours = {r["problem"]: r["products"] for r in lz if r["solver"] == "lanczos (ours)"}
        more = [r["products"] / ours[r["problem"]] for r in lz if r["solver"].startswith("block")]
        out += [
            "",
            "Block Krylov beat the single-vector solver in "
            + (
                ", ".join(f"{r['problem']} ({r['solver']}, {r['over_ours']:.2f}x)" for r in faster)
                if faster
                else "no row"
            )
            + f" of {len(more)}: it needs {min(more):.1f}-{max(more):.1f}x the products for the "
            "same tolerance, which the cheaper per-vector cost of a block did not make up "
            "on these problems, so `lanczos` has no block option. It "
            "multiplies blocks where they come for free: the two pending vectors of its "
            "verification band go through one block product.",
        ]
    passes = [r for r in rows if r["section"] == "ggn_passes"]
    if passes:
        out += [
            "",
            "## GGN product: `one_pass=True` against the default `one_pass=False`",
            "",
            "One GGN product of one vector (CPU default block mode) through "
            "`GGNOperator(..., one_pass=True)` (one call of the forward per batch: the "
            "forward that records the graph carries the tangent) and through the default "
            "`GGNOperator(...)` (`one_pass=False`: a forward-mode pass without graph, then "
            "the forward with graph; a training step's peak memory), timed alternately with "
            "a gradient; `one pass / two passes` is the median of the paired ratios "
            "(quartiles in brackets), `agreement` the relative difference of the two "
            "products. `mlp_wide` (1.1M parameters, one batch) is compute-bound; the others "
            "are dominated by per-call overheads.",
            "",
            "| problem | params | one pass / gradient | two passes (default) / gradient "
            "| one pass / two passes | agreement |",
            "|---|---|---|---|---|---|",
        ]
        for r in passes:
            q = r["one_pass_over_two_pass_quartiles"]
            out.append(
                f"| {r['problem']} | {r['params']:,} | {r['one_pass_over_gradient']:.2f} | "
                f"{r['two_pass_over_gradient']:.2f} | {r['one_pass_over_two_pass']:.2f} "
                f"({q[0]:.2f}-{q[2]:.2f}) | {r['agreement_rel']:.1e} |"
            )
    out += ["", "## Against the goals", ""] + [f"- {line}" for line in goals(rows)]
    return "\n".join(out) + "\n"


def provenance(rows: list[dict[str, Any]]) -> str:
    """Commit, date and rounds of each section's rows (they may come from several runs)."""
    parts = []
    for section in dict.fromkeys(r["section"] for r in rows):
        mine = [r for r in rows if r["section"] == section]
        commits = sorted({r.get("git_commit", "?") for r in mine})
        days = sorted({str(r.get("time", "?"))[:10] for r in mine})
        rounds = sorted({r.get("rounds") for r in mine})
        loads = [r["load_average"] for r in mine if r.get("load_average") is not None]
        load = f", load average up to {max(loads):.1f} at the start" if loads else ""
        parts.append(
            f"`{section}` commit {', '.join(commits)} ({', '.join(days)}, "
            f"{'/'.join(str(n) for n in rounds)} rounds{load})"
        )
    return "; ".join(parts)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, checked against this run's medians (CPU default: ``loop``)."""
    lines = []
    per = {
        (r["problem"], r["operator"], r["mode"], r["block"]): r["per_vector_over_product"]
        for r in rows
        if r["section"] == "products" and "per_vector_over_product" in r
    }
    grad = {
        (r["problem"], r["operator"], r["mode"]): r["product_over_gradient"]
        for r in rows
        if r["section"] == "products" and "product_over_gradient" in r
    }
    miss = [
        f"{p} {k} {m} {v:.2f}" for (p, k, m, b), v in sorted(per.items()) if b == 16 and v > 0.6
    ]
    over = [
        f"{p} {k} {m} {v:.2f}" for (p, k, m, b), v in sorted(per.items()) if b == 16 and v > 0.75
    ]
    lines.append(
        "Per-vector cost at `b = 16` at most 0.6x a product (0.75x the floor): "
        + ("met everywhere" if not miss else f"above 0.6 in {', '.join(miss)}")
        + ("" if not over else f"; above the 0.75 floor in {', '.join(over)}")
        + "."
    )
    for (p, k, m), g in sorted(grad.items()):
        if k != "ggn":
            continue

        def verdict(x: float) -> str:
            return f"{x:.2f}x ({'met' if x <= 1.5 else 'not met'})"

        blocked = per.get((p, k, m, 16))
        tail = "" if blocked is None else f", {verdict(g * blocked)} per vector in a block of 16"
        one = grad.get((p, "ggn_one_pass", m))
        one_blocked = per.get((p, "ggn_one_pass", m, 16))
        opt = (
            ""
            if one is None
            else f"; with `one_pass=True` {verdict(one)} for one product"
            + ("" if one_blocked is None else f", {verdict(one * one_blocked)} per vector")
        )
        lines.append(
            f"GGN product at most 1.5x a gradient, {p} ({m}), default `one_pass=False`: "
            f"{verdict(g)} for one product{tail}{opt}."
        )
    lines.append(
        "Why one GGN product stays above 1.5x a gradient: in matrix products, a dense layer's "
        "forward is 1 unit and its backward 2 (a gradient: 3); its forward-mode tangent "
        "x' W^T + x W'^T adds 2 to the primal's 1, and the reverse pass J^T u costs 2. So a "
        "JVP-then-VJP product needs 3 + 2 = 5 units in one pass (1.67x a gradient) and "
        "3 + 1 + 2 = 6 in two (2x); the compute-bound `mlp_wide` row of `ggn_passes` "
        "measures how close the products come to these counts. Only a block, which shares "
        "the forward, gets below 1.5x per vector."
    )
    for r in rows:
        if r["section"] == "algorithms" and r["speedup"] < 1.6:
            lines.append(
                f"Algorithms at least 1.6x faster: {r['problem']} {r['algorithm']} "
                f"{r['speedup']:.2f}x (spread {r['speedup_spread'][0]:.2f}-"
                f"{r['speedup_spread'][1]:.2f})."
            )
    if not any(r["section"] == "algorithms" and r["speedup"] < 1.6 for r in rows):
        lines.append("Algorithms at least 1.6x faster: met on every row.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--algorithm-rounds", type=int, default=5)
    parser.add_argument("--problems", default=",".join(P.PROBLEMS))
    parser.add_argument("--sections", default="products,algorithms,lanczos,ggn_passes")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "block_products.json")
    parser.add_argument(
        "--md", type=Path, default=ROOT / "docs" / "benchmarks" / "block_products.md"
    )
    parser.add_argument("--from-json", action="store_true", help="only re-render the page")
    parser.add_argument(
        "--update", action="store_true", help="keep the rows of --out that this run does not redo"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        args.md.write_text(markdown(saved["rows"], saved["meta"]), encoding="utf-8")
        return
    P.set_threads(1)
    meta = machine()
    sections = args.sections.split(",")
    names = args.problems.split(",")
    rows: list[dict[str, Any]] = []
    if args.update and args.out.exists():
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        rows = [
            r for r in saved["rows"] if r["problem"] not in names or r["section"] not in sections
        ]
    for name in names:
        problem = P.build(name, smoke=False, dtype=torch.float32)
        print(f"== {name}: {problem.num_params} parameters", flush=True)
        runs: dict[str, Callable[[P.Problem, int], list[dict[str, Any]]]] = {
            "products": bench_products,
            "algorithms": bench_algorithms,
            "lanczos": bench_lanczos,
            "ggn_passes": bench_ggn_passes,
        }
        for section, run in runs.items():
            if section in sections:
                many = section in ("products", "ggn_passes")
                new = run(problem, args.rounds if many else args.algorithm_rounds)
                for r in new:
                    print(json.dumps({k: v for k, v in r.items() if k != "params"}), flush=True)
                rows += [{**r, **meta} for r in new]
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every problem
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    meta["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    args.md.write_text(markdown(rows, meta), encoding="utf-8")


if __name__ == "__main__":
    main()
