"""Peak memory and time of one GGN matvec versus one gradient step (large output layer).

Model: token features (B, T, d) -> Linear(d, h) -> GELU -> Linear(h, V) logits, mean
cross-entropy over all B*T tokens, vocabulary V in the thousands (the regime where the
(B*T, V) logits dominate activation memory).

Memory: every measurement runs in a FRESH subprocess. The child first runs the same
operation once on a tiny problem (imports and one-time autodiff probes are then not
counted), builds the model, the data, the operator (check_determinism=False, so
construction runs no forward) and the input vector, records its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) as the baseline, runs ONE operation,
and reports ``peak RSS - baseline``: the extra memory that operation needed at its
high-water mark (tracemalloc would not see torch's allocations). On CUDA the same is
done with ``torch.cuda.max_memory_allocated``.

Operations:
    grad          forward + CE + backward (torch.autograd.grad): one training step
    ggn           GGNOperator.matvec, default path (forward-mode JVP, closed-form CE
                  Hessian, one VJP)
    ggn_autograd  GGNOperator(loss_hvp="autograd"): H u by double backward w.r.t. logits
    hvp           HessianOperator.matvec (double backward through the whole model)

Time: one separate child times every operation (after one warm-up call each),
interleaved, ``--repeats`` times, and reports the median time and its ratio to the
median gradient step of the same run.

Usage:
    python benchmarks/bench_ggn_memory.py                     # CPU, V = 8192 and 32768
    python benchmarks/bench_ggn_memory.py --vocab 4096 --tokens 128 --repeats 3

Appends one JSON row per (vocabulary, operation) to benchmarks/results/ggn_memory.json.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

OPS = ("grad", "ggn", "ggn_autograd", "hvp")
RESULTS = Path(__file__).resolve().parent / "results" / "ggn_memory.json"


def _build(cfg: dict[str, Any], op_name: str) -> tuple[Any, Any]:
    """Model, data and a zero-argument callable running ``op_name`` once."""
    import torch
    from torch import nn

    from hessian_eigenthings import GGNOperator, HessianOperator
    from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    d, h, v = cfg["d_model"], cfg["hidden"], cfg["vocab"]
    model = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, v)).to(device, dtype)
    b, t = cfg["batch"], cfg["tokens"] // cfg["batch"]
    x = torch.randn(b, t, d, device=device, dtype=dtype)
    y = torch.randint(0, v, (b, t), device=device)
    y[:, -1] = -100  # some ignored positions, as in padded LM batches
    data = [(x, y)]
    loss_of_output = cross_entropy_loss_of_output(target=lambda batch: batch[1].reshape(-1))

    def forward(m: nn.Module, batch: Any) -> torch.Tensor:
        return m(batch[0]).reshape(-1, v)

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        return loss_of_output(forward(m, batch), batch)

    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    vec = torch.randn(n, device=device, dtype=dtype)

    if op_name == "grad":

        def run() -> Any:
            return torch.autograd.grad(loss_fn(model, data[0]), params)

    elif op_name in ("ggn", "ggn_autograd"):
        op = GGNOperator(
            model,
            data,
            forward,
            loss_of_output,
            loss_hvp="autograd" if op_name == "ggn_autograd" else "analytical",
            check_determinism=False,
        )

        def run() -> Any:
            return op.matvec(vec)

    elif op_name == "hvp":
        hop = HessianOperator(model, data, loss_fn, check_determinism=False)

        def run() -> Any:
            return hop.matvec(vec)

    else:
        raise ValueError(f"unknown op {op_name!r}; expected one of {OPS}")
    return model, run


def _child_memory(cfg: dict[str, Any], op_name: str) -> dict[str, float]:
    import resource

    import torch

    torch.set_num_threads(cfg["threads"])
    # warm-up on a tiny problem: imports, autodiff probes and thread pools are one-time
    # costs that would otherwise count as the operation's memory
    tiny = {**cfg, "vocab": 8, "tokens": cfg["batch"] * 2, "d_model": 4, "hidden": 4}
    _build(tiny, op_name)[1]()
    _, run = _build(cfg, op_name)
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return {"peak_extra_mib": (peak - base) / 2**20}
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return {"peak_extra_mib": (peak_kib - base_kib) / 1024, "baseline_mib": base_kib / 1024}


def _child_time(cfg: dict[str, Any]) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(cfg["threads"])
    runs = {name: _build(cfg, name)[1] for name in OPS}
    sync = torch.cuda.synchronize if cfg["device"].startswith("cuda") else (lambda: None)
    for run in runs.values():  # warm-up (probes, allocator, thread pools)
        run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in OPS}
    for _ in range(cfg["repeats"]):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _spawn(cfg: dict[str, Any], mode: str, op_name: str = "") -> Any:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    cmd = [sys.executable, __file__, "--child", mode, "--op", op_name, "--cfg", json.dumps(cfg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} {op_name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version

        info["hessian_eigenthings"] = version("hessian-eigenthings")
    except Exception:  # not installed as a distribution: record nothing rather than guess
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--tokens", type=int, default=256, help="B*T tokens per batch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-repeats", type=int, default=2, help="fresh children per op")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--op", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        cfg = json.loads(args.cfg)
        res = _child_memory(cfg, args.op) if args.child == "memory" else _child_time(cfg)
        print(json.dumps(res))
        return

    machine = _machine()
    rows = []
    header = f"{'V':>6} {'op':>13} {'peak MiB':>9} {'x grad':>7} {'time ms':>8} {'x grad':>7}"
    print(header)
    for vocab in args.vocab:
        cfg = {
            "vocab": vocab,
            "tokens": args.tokens,
            "batch": args.batch,
            "d_model": args.d_model,
            "hidden": args.hidden,
            "dtype": args.dtype,
            "device": args.device,
            "threads": args.threads,
            "repeats": args.repeats,
        }
        mem = {
            name: [
                _spawn(cfg, "memory", name)["peak_extra_mib"] for _ in range(args.memory_repeats)
            ]
            for name in OPS
        }
        times = _spawn(cfg, "time")
        mem_med = {k: statistics.median(v) for k, v in mem.items()}
        t_med = {k: statistics.median(v) for k, v in times.items()}
        n_params = args.d_model * args.hidden + args.hidden + args.hidden * vocab + vocab
        for name in OPS:
            row = {
                "benchmark": "ggn_memory",
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "op": name,
                "config": {**cfg, "num_params": n_params},
                "peak_extra_mib": mem_med[name],
                "peak_extra_mib_runs": mem[name],
                "memory_ratio_to_grad": mem_med[name] / mem_med["grad"],
                "time_median_s": t_med[name],
                "time_runs_s": times[name],
                "time_ratio_to_grad": t_med[name] / t_med["grad"],
                "memory_method": (
                    "torch.cuda.max_memory_allocated - memory_allocated"
                    if args.device.startswith("cuda")
                    else "fresh subprocess: ru_maxrss after op - ru_maxrss after construction"
                ),
                "machine": machine,
            }
            rows.append(row)
            print(
                f"{vocab:>6} {name:>13} {mem_med[name]:>9.1f} {row['memory_ratio_to_grad']:>7.2f} "
                f"{1e3 * t_med[name]:>8.1f} {row['time_ratio_to_grad']:>7.2f}"
            )
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
