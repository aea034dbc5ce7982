"""Benchmark the fused cross-entropy HVP backends: time and peak memory across N and V.

For each backend (one child process per backend, so compilation and allocator state do
not leak between them) and each problem ``(N tokens, V vocabulary, dtype)``:

* time: median wall time of ``fused_ce_hvp`` over ``--repeats`` calls after warm-up,
  and the ratio to a copy of the logits measured in the same process (the memory-bound
  floor: the two-pass kernel reads logits and direction twice and writes once, so about
  2.5 copies' worth of traffic at best);
* peak memory: extra resident memory of one call, measured with the process RSS
  high-water mark (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``)
  minus the RSS before the call; glibc is told to return large blocks to the OS
  (``MALLOC_MMAP_THRESHOLD_``) so freed memory cannot hide a peak. Never tracemalloc.

On CPU the Triton backend only runs through the interpreter (not a performance path), so
it is skipped here; GPU bandwidth numbers need a CUDA machine. Rows (with machine and
versions) are appended to ``benchmarks/results/fused_ce_hvp.json``.

    python scripts/bench_fused_ce_hvp.py            # default grid, ~2 min on 2 cores
    python scripts/bench_fused_ce_hvp.py --quick    # smaller grid
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fused_ce_hvp.json"

GRID = [(256, 1000), (1024, 1000), (64, 32000), (256, 32000), (128, 50257), (32, 131072)]
QUICK = [(256, 1000), (64, 32000), (32, 131072)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(backend: str, grid: list[tuple[int, int]], dtype_name: str, repeats: int) -> None:
    import torch

    from hessian_eigenthings.loss_fns.fused_ce import fused_ce_hvp

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    rows = []
    for n, v in grid:
        z = torch.randn(n, v).to(dtype)
        u = torch.randn(n, v).to(dtype)
        t = torch.randint(0, v, (n,))
        t[::7] = -100
        for _ in range(2):  # warm-up (compilation for "compile")
            out = fused_ce_hvp(z, t, u, backend=backend)
        del out
        times, copies = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fused_ce_hvp(z, t, u, backend=backend)
            times.append(time.perf_counter() - t0)
            del out
            t0 = time.perf_counter()
            c = z.clone()
            copies.append(time.perf_counter() - t0)
            del c
        before = _rss_kib("VmRSS")
        _reset_peak()
        out = fused_ce_hvp(z, t, u, backend=backend)
        peak = _rss_kib("VmHWM")
        del out
        elem = z.element_size()
        rows.append(
            {
                "backend": backend,
                "N": n,
                "V": v,
                "dtype": dtype_name,
                "median_s": statistics.median(times),
                "copy_median_s": statistics.median(copies),
                "time_over_copy": statistics.median(times) / statistics.median(copies),
                "peak_extra_MiB": (peak - before) / 1024,
                "logits_MiB": n * v * elem / 2**20,
                "peak_over_logits": (peak - before) * 1024 / (n * v * elem),
            }
        )
    print(json.dumps(rows))


def machine() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.cuda.is_available(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "DTYPE", "GRID"))
    args = parser.parse_args()
    if args.child:
        backend, dtype_name, grid = args.child
        child(backend, json.loads(grid), dtype_name, args.repeats)
        return
    grid = QUICK if args.quick else GRID
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for backend in ("eager", "compile"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--repeats",
                    str(args.repeats),
                    "--child",
                    backend,
                    dtype_name,
                    json.dumps(grid),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"child {backend}/{dtype_name} failed")
            rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    eager = {(r["N"], r["V"], r["dtype"]): r for r in rows if r["backend"] == "eager"}
    print(
        f"{'backend':8} {'dtype':9} {'N':>5} {'V':>7} {'ms':>9} {'x copy':>7} "
        f"{'speedup':>8} {'peak MiB':>9} {'x logits':>8}"
    )
    for r in rows:
        base = eager[(r["N"], r["V"], r["dtype"])]
        r["speedup_vs_eager"] = base["median_s"] / r["median_s"]
        print(
            f"{r['backend']:8} {r['dtype']:9} {r['N']:5d} {r['V']:7d} "
            f"{1e3 * r['median_s']:9.3f} {r['time_over_copy']:7.2f} "
            f"{r['speedup_vs_eager']:8.2f} {r['peak_extra_MiB']:9.1f} "
            f"{r['peak_over_logits']:8.2f}"
        )
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    old.extend({**meta, **r} for r in rows)
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
