"""Benchmark this library against its peers, side by side, in one run.

    python benchmarks/compare_peers.py [--smoke] [--out FILE.json] [--markdown FILE.md]
    python benchmarks/compare_peers.py --render FILE.json --markdown FILE.md

Peers (install with ``bash benchmarks/setup_peers.sh``; any that is missing is reported as
such, never faked): curvlinops, PyHessian, scipy's ARPACK ``eigsh`` over our operator, and the
original hessian-eigenthings 1.0.0a5 (in ``benchmarks/.venv-original``, run in a subprocess).

Every library gets the same problem (``problems.py``: same weights, batches and loss, built
deterministically), the same dtype and, where comparable, the same tolerance and matvec
budget. Accuracy is measured in float64 against dense float64 ground truth (Hessian by double
backward against unit vectors, GGN from dense Jacobians, HVP by a 4-point finite difference of
exact gradients); speed in float32, as a ratio to one gradient of the same loss timed
alternately in the same process; memory as the peak RSS added by one cold product in a fresh
subprocess, next to that of one cold gradient.

Output: a JSON file with the machine, versions, configuration and every number, and a
Markdown table (``docs/benchmarks/peers.md`` for the full run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import problems as P  # noqa: E402

ORIGINAL_PYTHON = os.path.join(HERE, ".venv-original", "bin", "python")
DRIVER = os.path.join(HERE, "peers", "original_driver.py")
# Lanczos steps given to the original release in a second eigenvalue run (its default is 2k).
ORIGINAL_MAX_ITER = 100
IN_PROCESS = ("peer_ours", "peer_scipy", "peer_curvlinops", "peer_pyhessian")
ALL_PEERS = (*IN_PROCESS, "peer_original")
LABELS = {
    "peer_ours": "ours",
    "peer_scipy": "scipy eigsh (our op)",
    "peer_curvlinops": "curvlinops",
    "peer_pyhessian": "PyHessian",
    "peer_original": "original 1.0.0a5",
}

# What each mode measures. Budgets are matrix-vector products of the full-data operator.
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "problems": ["mlp_digits", "cnn_digits", "gpt2_tiny", "mlp_wide"],
        "dense": ["mlp_digits", "cnn_digits", "gpt2_tiny"],
        "dense_ggn": ["mlp_digits", "cnn_digits", "gpt2_tiny"],
        "eig": {"problems": ["mlp_digits", "cnn_digits", "gpt2_tiny"], "k": 5, "tol": 1e-6},
        # The CNN's double backward is ~4x slower than the others on CPU: no trace there.
        "trace": {
            "problems": ["mlp_digits", "gpt2_tiny"],
            "budgets": [30, 100],
            "seeds": list(range(10)),
            "methods": ["hutch++", "hutchinson"],
        },
        "diagonal": {
            "problems": ["mlp_digits", "gpt2_tiny"],
            "budgets": [100],
            "seeds": list(range(5)),
            "methods": ["hutchinson", "xdiag"],
        },
        "slq": {
            "problems": ["mlp_digits", "cnn_digits", "gpt2_tiny"],
            "num_runs": 10,
            "steps": 80,
            "seed": 0,
        },
        "time": {
            "problems": ["mlp_digits", "cnn_digits", "gpt2_tiny", "mlp_wide"],
            "repeats": 15,
        },
        "memory": ["mlp_digits", "cnn_digits", "gpt2_tiny", "mlp_wide"],
        "ragged": True,
    },
    "smoke": {
        "problems": ["mlp_digits", "gpt2_tiny"],
        "dense": ["mlp_digits"],
        "dense_ggn": ["mlp_digits"],
        "eig": {"problems": ["mlp_digits"], "k": 5, "tol": 1e-6},
        "trace": {
            "problems": ["mlp_digits"],
            "budgets": [30],
            "seeds": [0, 1, 2],
            "methods": ["hutch++", "hutchinson"],
        },
        "diagonal": {
            "problems": ["mlp_digits"],
            "budgets": [30],
            "seeds": [0, 1],
            "methods": ["hutchinson", "xdiag"],
        },
        "slq": {"problems": ["mlp_digits"], "num_runs": 3, "steps": 20, "seed": 0},
        "time": {"problems": ["mlp_digits", "gpt2_tiny"], "repeats": 5},
        "memory": ["mlp_digits"],
        "ragged": True,
    },
}


# --------------------------------------------------------------------------- metrics


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (``b`` is the reference)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def wasserstein1(x_a: np.ndarray, w_a: np.ndarray, x_b: np.ndarray, w_b: np.ndarray) -> float:
    r"""Wasserstein-1 distance between two discrete measures on the real line.

    .. math:: W_1(\mu, \nu) = \int_{-\infty}^{\infty} |F_\mu(x) - F_\nu(x)| \, dx,

    exact for atoms ``x_a`` with weights ``w_a`` and ``x_b`` with ``w_b`` (each normalised to
    total mass 1 first): the difference of the CDFs is piecewise constant between the sorted
    support points.
    """
    x_a, x_b = np.asarray(x_a, dtype=np.float64), np.asarray(x_b, dtype=np.float64)
    w_a, w_b = np.asarray(w_a, dtype=np.float64), np.asarray(w_b, dtype=np.float64)
    if w_a.sum() <= 0 or w_b.sum() <= 0:
        raise ValueError("both measures need positive total mass")
    xs = np.concatenate([x_a, x_b])
    ws = np.concatenate([w_a / w_a.sum(), -w_b / w_b.sum()])
    order = np.argsort(xs, kind="stable")
    xs, cdf_diff = xs[order], np.cumsum(ws[order])
    return float(np.sum(np.abs(cdf_diff[:-1]) * np.diff(xs)))


def measure_of(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The spectral measure an SLQ result describes: averaged quadrature nodes, or a grid.

    Quadrature (nodes and weights per run): each run's weights are normalised to 1 and the
    runs averaged. Grid density: the density times the grid spacing, as atoms on the grid.
    """
    if "nodes" in result:
        runs = len(result["nodes"])
        xs = np.concatenate([np.asarray(n, dtype=np.float64) for n in result["nodes"]])
        ws = np.concatenate(
            [np.asarray(w, dtype=np.float64) / np.sum(w) / runs for w in result["weights"]]
        )
        return xs, ws
    grid = np.asarray(result["grid"], dtype=np.float64)
    dens = np.clip(np.asarray(result["density"], dtype=np.float64), 0.0, None)
    return grid, dens * np.gradient(grid)


def top_k_by_magnitude(eigvals: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` eigenvalues of largest magnitude, in decreasing magnitude."""
    ev = np.asarray(eigvals, dtype=np.float64)
    return ev[np.argsort(-np.abs(ev), kind="stable")[:k]]


def eig_error(found: list[float], truth: np.ndarray) -> float:
    """Max over the top-k of ``|lambda_i - lambda_i^*| / |lambda_i^*|`` (both by magnitude).

    A short result (fewer than k values) is infinitely wrong.
    """
    k = len(truth)
    if len(found) < k:
        return math.inf
    got = top_k_by_magnitude(np.asarray(found), k)
    return float(np.max(np.abs(got - truth) / np.abs(truth)))


def trace_error(estimates: list[float], truth: float) -> dict[str, float]:
    """Relative RMS error and relative bias of trace estimates over seeds."""
    est = np.asarray(estimates, dtype=np.float64)
    return {
        "rel_rmse": float(np.sqrt(np.mean((est - truth) ** 2)) / abs(truth)),
        "rel_bias": float(np.mean(est - truth) / abs(truth)),
    }


# --------------------------------------------------------------------------- environment


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for dist in ("torch", "numpy", "scipy", "scikit-learn", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_library_files": _git(
            "status", "--porcelain", "hessian_eigenthings"
        ).splitlines(),
    }


# --------------------------------------------------------------------------- running peers


def _load(adapter: str) -> ModuleType:
    return importlib.import_module(f"peers.{adapter}")


Job = tuple[str, torch.dtype, list[dict[str, Any]]]  # (problem name, dtype, tasks)


def run_subprocess(python: str, adapter: str, smoke: bool, jobs: list[Job]) -> dict[str, Any]:
    """Run ``jobs`` for ``adapter`` in one fresh process through ``original_driver.py``."""
    spec = {
        "adapter": adapter,
        "smoke": smoke,
        "threads": 1,
        "jobs": [
            {"problem": name, "dtype": str(dtype).removeprefix("torch."), "tasks": tasks}
            for name, dtype, tasks in jobs
        ],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [python, DRIVER],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd="/tmp",
        env=env,
        timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"available": f"driver failed (exit {proc.returncode}): {' | '.join(tail)}"}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def peer_ready(adapter: str) -> tuple[str | None, str]:
    """``(None, version)`` if the peer can run here, else ``(reason, "")``."""
    if adapter == "peer_original":
        if not os.path.exists(ORIGINAL_PYTHON):
            return "benchmarks/.venv-original missing; run benchmarks/setup_peers.sh", ""
        probe = run_subprocess(ORIGINAL_PYTHON, adapter, True, [])
        return probe.get("available"), probe.get("version", "")
    mod = _load(adapter)
    reason = mod.available()
    return (reason, "") if reason else (None, mod.version())


def run_peer(adapter: str, smoke: bool, jobs: list[Job]) -> dict[str, Any]:
    """Run each job on a freshly built problem: in-process, or in the original's venv.

    Returns ``{"available", "version", "jobs": [{"param_checksum", "results"}, ...]}``.
    """
    if adapter == "peer_original":
        return run_subprocess(ORIGINAL_PYTHON, adapter, smoke, jobs)
    from peers.common import run_tasks

    mod = _load(adapter)
    out: dict[str, Any] = {"available": None, "version": mod.version(), "jobs": []}
    for name, dtype, tasks in jobs:
        problem = P.build(name, smoke=smoke, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run_tasks(mod, problem, tasks)
        mod.clear()
        out["jobs"].append(
            {
                "param_checksum": float(P.flat_params(problem).double().abs().sum()),
                "results": results,
            }
        )
    return out


# --------------------------------------------------------------------------- ground truth


def ground_truth(name: str, smoke: bool, cfg: dict[str, Any]) -> dict[str, Any]:
    problem = P.build(name, smoke=smoke, dtype=torch.float64)
    truth: dict[str, Any] = {
        "description": problem.description,
        "config": problem.config,
        "num_params": problem.num_params,
        "param_checksum": float(P.flat_params(problem).double().abs().sum()),
    }
    v = P.probe_vector(problem)
    t0 = time.perf_counter()
    truth["hv_fd"] = P.fd_hvp(problem, v).numpy()
    truth["v"] = v
    if name in cfg["dense"]:
        hess = P.dense_hessian(problem)
        evals = np.linalg.eigvalsh(hess.numpy())
        truth["eigenvalues"] = evals
        truth["trace"] = float(np.trace(hess.numpy()))
        truth["diagonal"] = np.diag(hess.numpy()).copy()
        truth["hv_dense"] = (hess @ v).numpy()
        truth["fd_vs_dense_rel_err"] = rel_err(truth["hv_fd"], truth["hv_dense"])
    if name in cfg["dense_ggn"]:
        ggn = P.dense_ggn(problem)
        truth["gv_dense"] = (ggn @ v).numpy()
        truth["ggn_trace"] = float(torch.trace(ggn))
    truth["seconds"] = time.perf_counter() - t0
    return truth


# --------------------------------------------------------------------------- one problem


def tasks_for(name: str, cfg: dict[str, Any], adapter: str, truth: dict[str, Any]) -> list[dict]:
    """Float64 accuracy tasks of one peer on one problem (timing and memory run apart)."""
    v = truth["v"].tolist()
    tasks: list[dict[str, Any]] = [
        {"kind": "hvp", "op": "hessian", "v": v},
        {"kind": "hvp", "op": "ggn", "v": v},
    ]
    if name in cfg["eig"]["problems"] and "eigenvalues" in truth:
        eig = {"kind": "eig", "k": cfg["eig"]["k"], "tol": cfg["eig"]["tol"], "seed": 0}
        tasks.append(eig)
        if adapter == "peer_original":  # its default is 2k Lanczos steps; also a real budget
            tasks.append({**eig, "max_iter": ORIGINAL_MAX_ITER})
    if name in cfg["trace"]["problems"] and "trace" in truth:
        for method in cfg["trace"]["methods"]:
            for budget in cfg["trace"]["budgets"]:
                tasks.append(
                    {
                        "kind": "trace",
                        "method": method,
                        "num_matvecs": budget,
                        "seeds": cfg["trace"]["seeds"],
                    }
                )
    diag_cfg = cfg.get("diagonal", {"problems": []})
    if name in diag_cfg["problems"] and "diagonal" in truth:
        for method in diag_cfg["methods"]:
            for budget in diag_cfg["budgets"]:
                tasks.append(
                    {
                        "kind": "diagonal",
                        "method": method,
                        "num_matvecs": budget,
                        "seeds": diag_cfg["seeds"],
                    }
                )
    if name in cfg["slq"]["problems"] and "eigenvalues" in truth:
        s = cfg["slq"]
        tasks.append(
            {"kind": "slq", "num_runs": s["num_runs"], "steps": s["steps"], "seed": s["seed"]}
        )
    if adapter == "peer_scipy":
        tasks = [t for t in tasks if t["kind"] == "eig"]
    return tasks


def score(task: dict[str, Any], res: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Attach the error metric of one task result against the ground truth."""
    out = {k: v for k, v in task.items() if k != "v"}
    out["status"] = res.get("status", "error")
    for key in ("error", "reason", "default_attention_error", "math_attention_error"):
        if key in res:
            out[key] = res[key]
    if out["status"] != "ok":
        return out
    kind = task["kind"]
    if kind == "hvp" and task["op"] == "hessian":
        hv = np.asarray(res["hv"])
        out["rel_err_vs_fd"] = rel_err(hv, truth["hv_fd"])
        if "hv_dense" in truth:
            out["rel_err_vs_dense"] = rel_err(hv, truth["hv_dense"])
    elif kind == "hvp":
        if "gv_dense" in truth:
            out["rel_err_vs_dense"] = rel_err(np.asarray(res["hv"]), truth["gv_dense"])
    elif kind == "eig":
        want = top_k_by_magnitude(truth["eigenvalues"], task["k"])
        out.update({k: res[k] for k in ("eigenvalues", "matvecs", "config", "seconds") if k in res})
        out["true_eigenvalues"] = want.tolist()
        out["max_rel_err"] = eig_error(res["eigenvalues"], want)
        if "converged" in res:
            out["converged"] = res["converged"]
    elif kind == "trace":
        out.update(trace_error(res["estimates"], truth["trace"]))
        out["estimates"] = res["estimates"]
        out["mean_matvecs"] = float(np.mean(res["matvecs"]))
        out["seconds"] = res["seconds"]
        out["seconds_per_call"] = res["seconds"] / len(task["seeds"])
    elif kind == "diagonal":
        errs = [rel_err(np.asarray(d), truth["diagonal"]) for d in res["estimates"]]
        out["mean_rel_err"] = float(np.mean(errs))
        out["mean_matvecs"] = float(np.mean(res["matvecs"]))
        out["seconds"] = res["seconds"]
        out["seconds_per_call"] = res["seconds"] / len(task["seeds"])
    elif kind == "slq":
        xs, ws = measure_of(res)
        ev = truth["eigenvalues"]
        width = float(ev.max() - ev.min())
        w1 = wasserstein1(xs, ws, ev, np.full(ev.shape, 1.0 / ev.size))
        out.update(
            {
                "w1": w1,
                "w1_over_width": w1 / width,
                "matvecs": res["matvecs"],
                "seconds": res["seconds"],
                "representation": "quadrature nodes" if "nodes" in res else "grid density",
            }
        )
    return out


def bench_problem(
    name: str, smoke: bool, cfg: dict[str, Any], peers: list[str], unavailable: dict[str, str]
) -> dict:
    print(f"[{name}] ground truth ...", flush=True)
    truth = ground_truth(name, smoke, cfg)
    record: dict[str, Any] = {
        "description": truth["description"],
        "config": truth["config"],
        "num_params": truth["num_params"],
        "truth": {
            k: truth[k]
            for k in ("trace", "ggn_trace", "fd_vs_dense_rel_err", "seconds")
            if k in truth
        },
        "peers": {},
    }
    if "eigenvalues" in truth:
        record["truth"]["top5"] = top_k_by_magnitude(truth["eigenvalues"], 5).tolist()
        record["truth"]["spectrum_range"] = [
            float(truth["eigenvalues"].min()),
            float(truth["eigenvalues"].max()),
        ]
    for adapter in peers:
        if adapter in unavailable:
            record["peers"][adapter] = {"available": unavailable[adapter]}
            continue
        t0 = time.perf_counter()
        tasks = tasks_for(name, cfg, adapter, truth)
        perf: list[dict[str, Any]] = []
        if adapter != "peer_scipy":
            if name in cfg["memory"]:
                perf += [{"kind": "memory", "op": op} for op in ("gradient", "hessian", "ggn")]
            if name in cfg["time"]["problems"]:
                reps = cfg["time"]["repeats"]
                perf += [{"kind": "time", "op": op, "repeats": reps} for op in ("hessian", "ggn")]
        # Accuracy in float64; time and memory in float32 (memory probes fork before any
        # product has run in that process).
        jobs: list[Job] = [(name, torch.float64, tasks), (name, torch.float32, perf)]
        jobs = [j for j in jobs if j[2]]
        if not jobs:
            continue
        run = run_peer(adapter, smoke, jobs)
        entry: dict[str, Any] = {"available": run.get("available"), "version": run.get("version")}
        if run.get("available") is None:
            entry["tasks"] = []
            for (_, dtype, job_tasks), job in zip(jobs, run["jobs"]):
                if dtype == torch.float64:
                    if not math.isclose(
                        job["param_checksum"], truth["param_checksum"], rel_tol=1e-9
                    ):
                        entry["warning"] = "problem built with other weights than the truth"
                    entry["tasks"] += [
                        score(t, r, truth) for t, r in zip(job_tasks, job["results"])
                    ]
                else:
                    entry["tasks"] += [{**t, **r} for t, r in zip(job_tasks, job["results"])]
        entry["seconds"] = time.perf_counter() - t0
        record["peers"][adapter] = entry
        print(f"[{name}] {LABELS[adapter]}: {entry['seconds']:.1f}s", flush=True)
    return record


def bench_ragged(smoke: bool, peers: list[str], unavailable: dict[str, str]) -> dict[str, Any]:
    """HVP correctness with a short last batch (exposes unweighted batch averaging)."""
    name = "mlp_digits_ragged"
    problem = P.build(name, smoke=smoke, dtype=torch.float64)
    v = P.probe_vector(problem)
    ref = P.fd_hvp(problem, v).numpy()
    out: dict[str, Any] = {"description": problem.description, "peers": {}}
    for adapter in peers:
        if adapter == "peer_scipy" or adapter in unavailable:
            continue
        task = {"kind": "hvp", "op": "hessian", "v": v.tolist()}
        run = run_peer(adapter, smoke, [(name, torch.float64, [task])])
        if run.get("available") is not None:
            out["peers"][adapter] = {"status": "error", "error": run["available"]}
            continue
        res = run["jobs"][0]["results"][0]
        entry = {"status": res.get("status")}
        if res.get("status") == "ok":
            entry["rel_err_vs_fd"] = rel_err(np.asarray(res["hv"]), ref)
        else:
            entry["error"] = res.get("error", res.get("reason"))
        out["peers"][adapter] = entry
    return out


# --------------------------------------------------------------------------- report


def _fmt(x: Any, style: str = "e") -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.1e}" if style == "e" else f"{x:.2f}"


def _find(entry: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    for t in entry.get("tasks", []):
        if all(t.get(k) == v for k, v in match.items()):
            return t
    return None


def _cell(entry: dict[str, Any] | None, key: str, style: str = "e", **match: Any) -> str:
    if entry is None:
        return "—"
    if entry.get("available"):
        return "not installed"
    t = _find(entry, **match)
    if t is None:
        return "—"
    if t.get("status") == "n/a":
        return "n/a"
    if t.get("status") != "ok":
        return "fails"
    val = t.get(key)
    cell = _fmt(val, style) if val is not None else "—"
    if t.get("default_attention_error") and val is not None:
        cell += "†"
    return cell


def render_markdown(data: dict[str, Any]) -> str:
    peers = [
        p for p in ALL_PEERS if any(p in r.get("peers", {}) for r in data["problems"].values())
    ]
    heads = " | ".join(LABELS[p] for p in peers)
    sep = "|".join(["---"] * (len(peers) + 1))
    m = data["machine"]
    lines = [
        "# Benchmarks against the peers",
        "",
        f"Generated by `python benchmarks/compare_peers.py{' --smoke' if data['smoke'] else ''}`"
        f" on {data['date']} (git {m['git_commit'][:10]}). Machine: {m['cpu']}, "
        f"{m['cpu_count']} cores, torch {m['versions']['torch']} with 1 thread. Raw numbers: "
        f"`{data['json_path']}`.",
        "",
        "Peer versions: "
        + ", ".join(f"{LABELS[p]} {v}" for p, v in sorted(data["peer_versions"].items()) if v)
        + ".",
        "",
        "Legend: `n/a` the peer has no such feature; `fails` it raised (message in the JSON); "
        "`—` not measured in this mode; † works only under the math SDPA kernel "
        "(`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`); with the default kernel it "
        "raised (message in the JSON).",
        "",
    ]
    probs = data["problems"]
    lines += ["## Problems", ""]
    for name, r in probs.items():
        lines.append(
            f"- `{name}`: {r.get('description', r.get('skipped', ''))}, "
            f"{r.get('num_params', '?')} parameters."
        )
    lines.append("")

    def table(title: str, note: str, rows: list[tuple[str, list[str]]]) -> None:
        lines.extend([f"## {title}", "", note, "", f"| problem | {heads} |", f"|{sep}|"])
        for label, cells in rows:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    def per_problem(key: str, style: str = "e", **match: Any) -> list[tuple[str, list[str]]]:
        rows = []
        for name, r in probs.items():
            if "peers" not in r:
                continue
            rows.append((name, [_cell(r["peers"].get(p), key, style, **match) for p in peers]))
        return rows

    hvp_rows = per_problem("rel_err_vs_fd", kind="hvp", op="hessian")
    if "ragged" in data:
        rag = data["ragged"]["peers"]
        hvp_rows.append(
            (
                "mlp_digits, ragged batches",
                [
                    _fmt(rag[p].get("rel_err_vs_fd"))
                    if p in rag and rag[p].get("status") == "ok"
                    else ("fails" if p in rag else "—")
                    for p in peers
                ],
            )
        )
    table(
        "Hessian-vector product: relative error against finite differences",
        "`||Hv - Hv_fd|| / ||Hv_fd||` in float64; `Hv_fd` is a 4-point central difference of "
        "exact gradients (error ~1e-10). The ragged row: "
        + data.get("ragged", {}).get("description", "not run")
        + "; a library that averages batch losses without weights is wrong there.",
        hvp_rows,
    )
    table(
        "GGN-vector product: relative error against the dense GGN",
        "`||Gv - G v|| / ||G v||` in float64, `G = sum_b (w_b/W) J_b^T H_b J_b` from dense "
        "Jacobians.",
        per_problem("rel_err_vs_dense", kind="hvp", op="ggn"),
    )

    def time_rows(op: str) -> list[tuple[str, list[str]]]:
        rows = []
        for name, r in probs.items():
            if "peers" not in r:
                continue
            cells = []
            for p in peers:
                cell = _cell(r["peers"].get(p), "ratio", "f", kind="time", op=op)
                t = _find(r["peers"].get(p) or {}, kind="time", op=op)
                if t is not None and t.get("status") == "ok" and "seconds" in t:
                    cell += f" ({t['seconds'] * 1e3:.1f} ms)"
                cells.append(cell)
            rows.append((name, cells))
        return rows

    table(
        "Time per Hessian-vector product / time per gradient",
        "float32, one thread; products and gradients of the same full-data loss timed in "
        "alternating samples in the same process, minimum over samples (lower is better; a "
        "double-backward product costs ~2-4 gradients). In brackets: milliseconds per product.",
        time_rows("hessian"),
    )
    table(
        "Time per GGN-vector product / time per gradient",
        "As above for the GGN.",
        time_rows("ggn"),
    )
    mem_rows = []
    for name, r in probs.items():
        for op in ("hessian", "ggn"):
            cells, seen = [], False
            for p in peers:
                e = r.get("peers", {}).get(p)
                t = _find(e, kind="memory", op=op) if e else None
                g = _find(e, kind="memory", op="gradient") if e else None
                if t is None:
                    cells.append("—")
                    continue
                seen = True
                if t.get("status") != "ok":
                    cells.append("n/a" if t.get("status") == "n/a" else "fails")
                elif g is None or g.get("status") != "ok":
                    cells.append(f"{t['peak_rss_delta_mib']:.1f}")
                else:
                    cells.append(
                        f"{t['peak_rss_delta_mib']:.1f} (grad {g['peak_rss_delta_mib']:.1f})"
                    )
            if seen:
                mem_rows.append((f"{name} {op}", cells))
    table(
        "Peak memory of one product (MiB of RSS added)",
        "float32; each measurement in a forked child of a process that has built the model, "
        "data and operator but run no product yet: peak RSS added by one product, next to "
        "that of one gradient in the same setting (one unmeasured gradient runs first so "
        "autograd's one-time setup is not counted, and `malloc_trim` returns freed heap to the "
        "OS before each probe). The small problems sit on a ~20 MiB floor of per-process "
        "overhead; `mlp_wide` is the meaningful row.",
        mem_rows,
    )
    eig_rows = []
    for name, r in probs.items():
        if "peers" not in r:
            continue
        cells = []
        for p in peers:
            e = r["peers"].get(p)
            found = [t for t in (e or {}).get("tasks", []) if t.get("kind") == "eig"]
            if e is not None and e.get("available"):
                cells.append("not installed")
            elif not found:
                cells.append("—")
            else:
                parts = []
                for t in found:
                    if t.get("status") != "ok":
                        part = "n/a" if t.get("status") == "n/a" else "fails"
                    else:
                        part = f"{_fmt(t['max_rel_err'])} / {t['matvecs']}"
                    if "max_iter" in t:
                        part += f" (max_iter={t['max_iter']})"
                    parts.append(part)
                cells.append("; ".join(parts))
        eig_rows.append((name, cells))
    table(
        "Top-5 eigenvalues (largest magnitude): max relative error / matvecs",
        "Against `numpy.linalg.eigvalsh` of the dense float64 Hessian; tolerance 1e-6 for "
        "every solver that takes one (PyHessian: relative change between power iterates, "
        "at most 300 iterations per eigenvalue; the original release: its default of 2k Lanczos "
        f"steps, then {ORIGINAL_MAX_ITER} steps with reorthogonalisation).",
        eig_rows,
    )
    cfg = data["config"]

    def timed_cell(entry: dict[str, Any] | None, key: str, **match: Any) -> str:
        cell = _cell(entry, key, **match)
        t = _find(entry or {}, **match) if entry is not None else None
        if t is not None and t.get("status") == "ok" and "seconds_per_call" in t:
            cell += f" ({t['seconds_per_call']:.2f} s)"
        return cell

    trows = []
    for name, r in probs.items():
        if "peers" not in r:
            continue
        for method in cfg["trace"]["methods"]:
            for budget in cfg["trace"]["budgets"]:
                trows.append(
                    (
                        f"{name} {method} @{budget}",
                        [
                            timed_cell(
                                r["peers"].get(p),
                                "rel_rmse",
                                kind="trace",
                                method=method,
                                num_matvecs=budget,
                            )
                            for p in peers
                        ],
                    )
                )
    table(
        "Trace: relative RMS error over seeds (wall-clock per estimate)",
        f"`sqrt(mean((est - tr H)^2)) / |tr H|` over {len(cfg['trace']['seeds'])} seeds at a "
        "budget of 30 and 100 matvecs (Rademacher probes; curvlinops' Hutch++ needs a multiple "
        "of 3 and gets 99). With 10 seeds an RMS error is itself uncertain by about +-25% "
        "(relative standard error ~1/sqrt(2 x seeds)): differences below ~1.5x are noise. In "
        "brackets: seconds per estimate (float64, one thread, the mean over the seeds).",
        [row for row in trows if not all(c in ("—", "n/a") for c in row[1])],
    )
    dcfg = cfg.get("diagonal")
    if dcfg:
        drows = []
        for name, r in probs.items():
            if "peers" not in r:
                continue
            for method in dcfg["methods"]:
                for budget in dcfg["budgets"]:
                    drows.append(
                        (
                            f"{name} {method} @{budget}",
                            [
                                timed_cell(
                                    r["peers"].get(p),
                                    "mean_rel_err",
                                    kind="diagonal",
                                    method=method,
                                    num_matvecs=budget,
                                )
                                for p in peers
                            ],
                        )
                    )
        table(
            "Diagonal: mean relative error over seeds (wall-clock per estimate)",
            f"`||d_est - diag H|| / ||diag H||` averaged over {len(dcfg['seeds'])} seeds, "
            "Rademacher probes. In brackets: seconds per estimate (float64, one thread).",
            [row for row in drows if not all(c in ("—", "n/a") for c in row[1])],
        )
    srows = []
    for name, r in probs.items():
        if "peers" not in r:
            continue
        cells = []
        for p in peers:
            e = r["peers"].get(p)
            t = _find(e, kind="slq") if e else None
            if e is not None and e.get("available"):
                cells.append("not installed")
            elif t is None:
                cells.append("—")
            elif t.get("status") != "ok":
                cells.append("n/a" if t.get("status") == "n/a" else "fails")
            else:
                cells.append(f"{_fmt(t['w1_over_width'])} / {t['matvecs']} ({t['seconds']:.2f} s)")
        srows.append((name, cells))
    s = cfg["slq"]
    table(
        "Spectral density (SLQ): Wasserstein-1 to the true spectrum / matvecs (wall-clock)",
        f"`W1(estimate, true eigenvalue distribution) / (lambda_max - lambda_min)`, "
        f"{s['num_runs']} runs x {s['steps']} Lanczos steps. Quadrature nodes and weights "
        "where the library returns them, else its smoothed grid density. In brackets: "
        "seconds for the whole estimate (float64, one thread).",
        srows,
    )
    slower = not_fastest(data, peers)
    lines += ["## Where this library is not the fastest", ""]
    if slower:
        lines += (
            [
                "Every timed row where a peer took less time than this library (its accuracy "
                "next to ours; a faster peer with a clearly larger error is not at equal "
                "accuracy):",
                "",
            ]
            + [f"- {line}" for line in slower]
            + [""]
        )
    else:
        lines += ["No timed row has a faster peer.", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "bash benchmarks/setup_peers.sh          # peers; torch is held at its version",
        f"python benchmarks/compare_peers.py{' --smoke' if data['smoke'] else ''}",
        "python benchmarks/compare_peers.py --render benchmarks/results/peers.json "
        "--markdown docs/benchmarks/peers.md",
        "```",
        "",
    ]
    return "\n".join(lines)


def not_fastest(data: dict[str, Any], peers: list[str]) -> list[str]:
    """Timed rows (product time, trace, diagonal, SLQ) where a peer beat this library."""
    out = []
    for name, r in data["problems"].items():
        entries = r.get("peers", {})
        ours = entries.get("peer_ours")
        if ours is None or ours.get("available"):
            continue
        for t in ours.get("tasks", []):
            kind = t.get("kind")
            if t.get("status") != "ok" or kind not in ("time", "trace", "diagonal", "slq"):
                continue
            match = {k: t[k] for k in ("kind", "op", "method", "num_matvecs") if k in t}
            time_key = {"time": "ratio", "slq": "seconds"}.get(kind, "seconds_per_call")
            err_key = {"trace": "rel_rmse", "diagonal": "mean_rel_err", "slq": "w1_over_width"}
            for p in peers:
                if p == "peer_ours" or p not in entries or entries[p].get("available"):
                    continue
                other = _find(entries[p], **match)
                if other is None or other.get("status") != "ok" or time_key not in other:
                    continue
                if other[time_key] < t[time_key]:
                    what = " ".join(str(match[k]) for k in match if k != "kind")
                    acc = ""
                    if kind in err_key:
                        key = err_key[kind]
                        acc = f"; error {_fmt(other.get(key))} vs ours {_fmt(t.get(key))}"
                    unit = "x a gradient" if kind == "time" else "s"
                    out.append(
                        f"`{name}` {kind} {what}: {LABELS[p]} {other[time_key]:.3g} {unit} "
                        f"vs ours {t[time_key]:.3g} {unit}{acc}"
                    )
    return out


# --------------------------------------------------------------------------- self check

# Bounds our own numbers must meet (float64 problems), checked after every run so that CI's
# smoke run fails when this library regresses. Peers' numbers are reported, never checked.
OUR_BOUNDS = {
    ("hvp", "rel_err_vs_fd"): 1e-8,  # the 4-point FD reference itself is ~1e-11
    ("hvp", "rel_err_vs_dense"): 1e-10,
    ("eig", "max_rel_err"): 1e-5,  # tol 1e-6 on the relative residual
    ("slq", "w1_over_width"): 0.05,
}


def self_check(data: dict[str, Any]) -> list[str]:
    """Failures of this library's own tasks: errors, or numbers outside ``OUR_BOUNDS``."""
    problems = []
    for name, r in data["problems"].items():
        entry = r.get("peers", {}).get("peer_ours")
        if entry is None:
            continue
        if entry.get("available"):
            problems.append(f"{name}: ours unavailable: {entry['available']}")
            continue
        for t in entry.get("tasks", []):
            label = f"{name} {t['kind']} {t.get('op', t.get('method', ''))}".strip()
            if t.get("status") == "error":
                problems.append(f"{label}: {t.get('error')}")
                continue
            for (kind, key), bound in OUR_BOUNDS.items():
                if t.get("kind") == kind and key in t and not t[key] <= bound:
                    problems.append(f"{label}: {key} = {t[key]:.2e} > {bound:.0e}")
    for adapter, res in data.get("ragged", {}).get("peers", {}).items():
        if adapter == "peer_ours" and not res.get("rel_err_vs_fd", math.inf) <= 1e-8:
            problems.append(f"ragged batches: ours HVP error {res}")
    return problems


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced run for CI (< 3 min)")
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--markdown", help="Markdown output path")
    parser.add_argument("--render", help="only render --markdown from this JSON file")
    parser.add_argument("--peers", nargs="*", default=list(ALL_PEERS), choices=ALL_PEERS)
    args = parser.parse_args(argv)

    if args.render:
        with open(args.render) as fh:
            data = json.load(fh)
        target = args.markdown or os.path.join(REPO, "docs", "benchmarks", "peers.md")
        with open(target, "w") as fh:
            fh.write(render_markdown(data))
        print(f"wrote {target}")
        return 0

    mode = "smoke" if args.smoke else "full"
    cfg = CONFIGS[mode]
    out_path = args.out or os.path.join(
        HERE, "results", "peers_smoke.json" if args.smoke else "peers.json"
    )
    P.set_threads(1)
    t_start = time.perf_counter()
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "machine": machine_info(),
        "config": cfg,
        "json_path": os.path.relpath(out_path, REPO),
        "peer_versions": {},
        "problems": {},
        "notes": [],
    }
    unavailable: dict[str, str] = {}
    for adapter in args.peers:
        reason, version = peer_ready(adapter)
        data["peer_versions"][adapter] = version if reason is None else f"unavailable: {reason}"
        if reason is not None:
            unavailable[adapter] = reason
            data["notes"].append(f"{LABELS[adapter]} not measured: {reason}")
    for name in cfg["problems"]:
        if name.startswith("gpt2") and not P.transformers_available():
            data["problems"][name] = {"skipped": "transformers is not installed"}
            data["notes"].append(f"{name} skipped: transformers is not installed.")
            continue
        data["problems"][name] = bench_problem(name, args.smoke, cfg, args.peers, unavailable)
    if cfg["ragged"]:
        data["ragged"] = bench_ragged(args.smoke, args.peers, unavailable)
    data["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(data, fh, indent=1, default=float)
    print(f"wrote {out_path} ({data['total_seconds']:.0f}s)")
    md = args.markdown or (
        None if args.smoke else os.path.join(REPO, "docs", "benchmarks", "peers.md")
    )
    if md:
        with open(md, "w") as fh:
            fh.write(render_markdown(data))
        print(f"wrote {md}")
    else:
        print(render_markdown(data))
    failures = self_check(data)
    for line in failures:
        print(f"SELF-CHECK FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
