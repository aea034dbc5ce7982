"""What every peer adapter shares: the task runner, timing, memory and matvec counting.

An adapter is a module in this folder exposing:

    NAME: str                               label in the report
    version() -> str                        installed version of the peer
    available() -> str | None               None if usable, else why not
    hessian_matvec(problem) -> Matvec       flat vector in -> flat H v out (problem dtype)
    ggn_matvec(problem) -> Matvec           same for the GGN (raise Unsupported if none)
    top_eigs(problem, k, tol, seed) -> dict  {"eigenvalues": [...], "matvecs": int, ...}
    trace(problem, num_matvecs, method, seed) -> dict  {"estimate": float, "matvecs": int}
    trace_methods() -> list[str]            methods that ``trace`` accepts
    slq(problem, num_runs, steps, seed) -> dict  a measure: {"nodes", "weights"} or
                                            {"grid", "density"}, plus "matvecs"

:func:`run_tasks` executes a list of JSON task dicts against an adapter and returns JSON
results; the original 1.0.0a5 release runs the same function in its own virtual
environment through ``original_driver.py``, and memory is always measured that way, in a
fresh subprocess per measurement (peak RSS of one cold product versus one cold gradient).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import statistics
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

import problems as P
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The peer has no such capability (reported as 'n/a', not as a failure)."""


class MatvecCounter:
    """Counts operator products (columns of a block product count one each)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap_vec(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(v: Any, *args: Any, **kwargs: Any) -> Any:
            shape = getattr(v, "shape", None)
            self.count += 1 if shape is None or len(shape) < 2 else int(shape[1])
            return fn(v, *args, **kwargs)

        return counted

    def wrap_list(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """For list-of-tensors block products whose trailing dim is the column count."""

        def counted(vs: Any, *args: Any, **kwargs: Any) -> Any:
            first = vs[0]
            self.count += int(first.shape[-1]) if first.dim() > 0 else 1
            return fn(vs, *args, **kwargs)

        return counted


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        text = fh.read()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field")
    return int(match.group(1))


def peak_rss_delta_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory added by ``fn()`` over the RSS just before it, in MiB.

    Runs ``fn`` in a forked child, so every measurement starts from the same cold state (no
    allocator caches or lazily built buffers left by an earlier product) without paying for
    a new interpreter. The child returns freed heap memory to the OS (``malloc_trim``) and
    resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), so the model and
    data built before do not count; RSS sees torch's CPU allocations, which ``tracemalloc``
    does not. Linux only.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            # OpenMP's thread pool does not survive fork(): a parallel region in the child of
            # a process that already used it can deadlock. Measure single-threaded.
            import torch

            torch.set_num_threads(1)
            # Hand freed heap memory back to the OS first: otherwise an allocation served
            # from memory that earlier work (building, training) left resident adds no RSS.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            before = _status_kib("VmRSS")
            fn()
            msg = str((_status_kib("VmHWM") - before) / 1024.0)
        except BaseException as exc:
            msg, code = f"error {type(exc).__name__}: {exc}", 1
        os.write(write_fd, msg.encode())
        os.close(write_fd)
        os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    msg = b"".join(chunks).decode()
    if msg.startswith("error"):
        raise RuntimeError(f"memory probe failed in the child: {msg[6:]}")
    return float(msg)


def time_interleaved(
    op: Callable[[], Any],
    baseline: Callable[[], Any],
    repeats: int,
    warmup: int = 2,
    min_sample_seconds: float = 0.05,
) -> dict[str, float]:
    """Seconds per call of ``op`` and of ``baseline``, alternated call by call.

    A sample is ``inner`` pairs ``baseline(); op()``, each call timed on its own, with
    ``inner`` chosen so a sample's baselines last at least ``min_sample_seconds``;
    alternating every call makes load from other processes hit both alike. Reported: the
    minimum over ``repeats`` samples of the mean per-call time of each (the least disturbed
    sample, as ``timeit`` advises), the medians, and the ratio of the minima.
    """
    for _ in range(warmup):
        baseline()
        op()
    t0 = time.perf_counter()
    baseline()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, math.ceil(min_sample_seconds / once))
    t_op, t_base = [], []
    for _ in range(repeats):
        s_op = s_base = 0.0
        for _ in range(inner):
            t0 = time.perf_counter()
            baseline()
            t1 = time.perf_counter()
            op()
            t2 = time.perf_counter()
            s_base += t1 - t0
            s_op += t2 - t1
        t_base.append(s_base / inner)
        t_op.append(s_op / inner)
    return {
        "seconds": min(t_op),
        "baseline_seconds": min(t_base),
        "median_seconds": statistics.median(t_op),
        "median_baseline_seconds": statistics.median(t_base),
        "ratio": min(t_op) / min(t_base),
        "repeats": repeats,
        "inner": inner,
    }


def _to_list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.detach().double().reshape(-1).tolist()]


def _matvec_for(adapter: ModuleType, problem: P.Problem, op: str) -> Matvec:
    if op == "hessian":
        return adapter.hessian_matvec(problem)
    if op == "ggn":
        return adapter.ggn_matvec(problem)
    raise ValueError(f"Unknown operator {op!r}; expected 'hessian' or 'ggn'.")


def _run_one(adapter: ModuleType, problem: P.Problem, task: dict[str, Any]) -> dict[str, Any]:
    kind = task["kind"]
    if kind == "hvp":
        mv = _matvec_for(adapter, problem, task["op"])
        v = torch.tensor(task["v"], dtype=torch.float64).to(problem.params[0].dtype)
        return {"hv": _to_list(mv(v))}
    if kind == "time":
        mv = _matvec_for(adapter, problem, task["op"])
        v = P.probe_vector(problem).to(problem.params[0].dtype)
        return time_interleaved(lambda: mv(v), problem.flat_grad, task["repeats"])
    if kind == "memory":
        # One gradient first (not measured) so autograd's one-time setup is not counted
        # against whichever probe happens to run first.
        problem.flat_grad()
        if task["op"] == "gradient":
            return {"peak_rss_delta_mib": peak_rss_delta_mib(problem.flat_grad)}
        # The operator is built (and any construction-time checks run) before the probe.
        mv = _matvec_for(adapter, problem, task["op"])
        v = P.probe_vector(problem).to(problem.params[0].dtype)
        return {"peak_rss_delta_mib": peak_rss_delta_mib(lambda: mv(v))}
    if kind == "eig":
        t0 = time.perf_counter()
        extra = {"max_iter": task["max_iter"]} if "max_iter" in task else {}
        out = adapter.top_eigs(problem, task["k"], task["tol"], task["seed"], **extra)
        out["seconds"] = time.perf_counter() - t0
        return out
    if kind == "trace":
        estimates, matvecs = [], []
        t0 = time.perf_counter()
        for seed in task["seeds"]:
            res = adapter.trace(problem, task["num_matvecs"], task["method"], seed)
            estimates.append(res["estimate"])
            matvecs.append(res["matvecs"])
        return {
            "estimates": estimates,
            "matvecs": matvecs,
            "seconds": time.perf_counter() - t0,
        }
    if kind == "diagonal":
        estimate_diagonal = getattr(adapter, "diagonal", None)
        if estimate_diagonal is None:
            raise Unsupported("no diagonal estimator")
        diagonals, matvecs = [], []
        t0 = time.perf_counter()
        for seed in task["seeds"]:
            res = estimate_diagonal(problem, task["num_matvecs"], task["method"], seed)
            diagonals.append(res["estimate"])
            matvecs.append(res["matvecs"])
        return {
            "estimates": diagonals,
            "matvecs": matvecs,
            "seconds": time.perf_counter() - t0,
        }
    if kind == "slq":
        t0 = time.perf_counter()
        out = adapter.slq(problem, task["num_runs"], task["steps"], task["seed"])
        out["seconds"] = time.perf_counter() - t0
        return out
    raise ValueError(f"Unknown task kind {kind!r}.")


def run_tasks(
    adapter: ModuleType, problem: P.Problem, tasks: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run ``tasks`` against ``adapter`` on ``problem``; one JSON-able result per task.

    A task that raises :class:`Unsupported` yields ``{"status": "n/a", "reason": ...}``; any
    other exception ``{"status": "error", "error": ...}``. On the GPT-2 problem a task that
    fails with the default attention kernels is retried under the math SDPA kernel (a
    one-line user workaround); the first failure is kept in ``default_attention_error``.
    """
    results = []
    for task in tasks:
        t0 = time.perf_counter()
        try:
            res = _run_one(adapter, problem, task)
            res["status"] = "ok"
        except Unsupported as exc:
            res = {"status": "n/a", "reason": str(exc)}
        except Exception as exc:
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            res = {"status": "error", "error": first, "traceback": traceback.format_exc(-3)}
            if problem.name.startswith("gpt2"):
                try:
                    with P.math_attention():
                        res = _run_one(adapter, problem, task)
                    res["status"] = "ok"
                    res["default_attention_error"] = first
                except Exception as exc2:
                    res["math_attention_error"] = f"{type(exc2).__name__}: {exc2}"
        res["wall_seconds"] = time.perf_counter() - t0
        results.append(res)
    return results


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Any:
    """Temporarily set torch's default dtype (for peers that allocate with the default)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
