"""Soak test: memory of long runs (1,000 matvecs, a 300-product Lanczos) must not grow.

Model: an MLP ``d -> h -> h -> c`` (tanh) with mean cross-entropy on ``--batches`` batches
of ``--batch-size`` samples; operator: ``HessianOperator`` (autograd HVP, full dataset).

Phases, each sampling the process's current resident set size (``VmRSS`` from
``/proc/self/status``; tracemalloc does not see torch's allocations) and, on CUDA,
``torch.cuda.memory_allocated``:

1. ``matvec``: ``--warmup`` matvecs, then ``--matvecs`` more, RSS sampled every 10.
2. ``lanczos``: ``lanczos(op, k=10, max_iter=300, tol=1e-14)`` (the tolerance is below
   what float32 reaches, so all 300 products are made; restarts included), RSS sampled at
   every convergence check through ``callback``.
3. ``lanczos_checkpoint``: the same with ``checkpoint=`` written every 25 products
   (temporary directory) and, on CUDA, ``basis_device="cpu"``.

Growth is reported as ``max(samples after warm-up) - first sample after warm-up`` (MiB),
and the drift as the last sample minus the first after warm-up. Warm-up for the Lanczos
phases lasts until the first restart (the basis buffer is allocated at the start; the
first full-size Rayleigh-Ritz and QR allocate their LAPACK workspaces once).

Usage:
    python benchmarks/soak_memory.py                 # CPU, float32
    python benchmarks/soak_memory.py --device cuda

Writes benchmarks/results/soak_memory.json (one row per phase, with machine and versions)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hessian_eigenthings
from hessian_eigenthings import HessianOperator, lanczos

RESULTS = Path(__file__).resolve().parent / "results" / "soak_memory.json"
MIB = 1024.0 * 1024.0


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only).")


def machine(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hessian_eigenthings": hessian_eigenthings.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


class Sampler:
    """Collects (products, RSS MiB, CUDA MiB) samples."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[tuple[int, float, float]] = []
        self.restarts: list[int] = []

    def __call__(self, products: int, restart: int = 0) -> None:
        cuda = 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            cuda = torch.cuda.memory_allocated(self.device) / MIB
        self.rows.append((products, rss_mib(), cuda))
        self.restarts.append(restart)

    def summary(self, warm: int) -> dict[str, Any]:
        after = [r for r in self.rows if r[0] >= warm]
        rss = [r[1] for r in after]
        cuda = [r[2] for r in after]
        return {
            "samples": len(after),
            "rss_start_mib": rss[0],
            "rss_end_mib": rss[-1],
            "rss_growth_mib": max(rss) - rss[0],
            "rss_drift_mib": rss[-1] - rss[0],
            "cuda_growth_mib": max(cuda) - cuda[0],
            "cuda_drift_mib": cuda[-1] - cuda[0],
            "trace": [[p, round(r, 3), round(c, 3)] for p, r, c in self.rows],
        }


def build(args: argparse.Namespace, device: torch.device) -> HessianOperator:
    torch.manual_seed(0)
    d, h, c = args.inputs, args.hidden, args.classes
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c))
    model = model.to(device)
    data = [
        (torch.randn(args.batch_size, d), torch.randint(0, c, (args.batch_size,)))
        for _ in range(args.batches)
    ]
    ce = nn.CrossEntropyLoss()
    return HessianOperator(model, data, lambda m, b: ce(m(b[0]), b[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--matvecs", type=int, default=1000)
    parser.add_argument("--lanczos-steps", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    op = build(args, device)
    config = {**vars(args), "num_params": op.size, "dtype": str(op.dtype)}
    config.pop("no_write")
    rows = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # 1. repeated matvecs
    sampler = Sampler(device)
    v = torch.randn(op.size, device=device)
    t0 = time.perf_counter()
    for i in range(args.warmup + args.matvecs + 1):
        w = op.matvec(v)
        v = w / torch.linalg.vector_norm(w)
        if i % 10 == 0:
            sampler(i)
    phases = {"matvec": (sampler, args.warmup, time.perf_counter() - t0, args.matvecs)}

    # 2. and 3. a 300-product Lanczos, without and with checkpoints
    for name in ("lanczos", "lanczos_checkpoint"):
        sampler = Sampler(device)
        kwargs: dict[str, Any] = {}
        tmp = tempfile.TemporaryDirectory()
        if name == "lanczos_checkpoint":
            kwargs = {"checkpoint": Path(tmp.name) / "run.ckpt", "checkpoint_every": 25}
            if device.type == "cuda":
                kwargs["basis_device"] = "cpu"
        sampler(0)
        t0 = time.perf_counter()
        res = lanczos(
            op,
            k=10,
            max_iter=args.lanczos_steps,
            tol=1e-14,
            seed=0,
            callback=lambda p, s=sampler: s(p.num_matvecs, p.restart),
            **kwargs,
        )
        elapsed = time.perf_counter() - t0
        tmp.cleanup()
        # Warm-up: until the first restart (the first Rayleigh-Ritz/QR of full size
        # allocates LAPACK workspaces once).
        warm = next(r[0] for r, t in zip(sampler.rows, sampler.restarts) if t >= 1)
        phases[name] = (sampler, warm, elapsed, res.num_matvecs)
        config[f"{name}_restarts"] = res.iterations - 1

    for name, (sampler, warm, elapsed, products) in phases.items():
        rows.append(
            {
                "benchmark": "soak_memory",
                "timestamp": stamp,
                "phase": name,
                "device": str(device),
                "products": products,
                "warmup_products": warm,
                "seconds": elapsed,
                **sampler.summary(warm),
                "config": config,
                "machine": machine(device),
            }
        )

    print(f"{'phase':20s} {'products':>8s} {'RSS start':>10s} {'growth':>8s} {'drift':>8s}")
    for r in rows:
        print(
            f"{r['phase']:20s} {r['products']:8d} {r['rss_start_mib']:9.1f}M "
            f"{r['rss_growth_mib']:7.2f}M {r['rss_drift_mib']:7.2f}M"
            + (f"  cuda growth {r['cuda_growth_mib']:.2f}M" if device.type == "cuda" else "")
        )
    if not args.no_write:
        existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        existing = [e for e in existing if e.get("device") != str(device)]
        RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
