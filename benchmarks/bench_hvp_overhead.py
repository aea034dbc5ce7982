"""HessianOperator matvec time versus a hand-written double-backward HVP and one gradient.

Same model, same data, same run. Reports medians and the ratios

    overhead = t(HessianOperator.matvec) / t(raw double-backward HVP) - 1
    hvp_over_grad = t(HessianOperator.matvec) / t(one gradient)

and appends JSON rows (machine, versions, configuration) to
benchmarks/results/hvp_overhead.json.

    python benchmarks/bench_hvp_overhead.py [--repeats 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_eigenthings import HessianOperator

F = nn.functional


def machine() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def problems() -> dict[str, tuple[nn.Module, list[Any]]]:
    """Small problems show the fixed per-matvec cost; research-sized ones the ratio."""
    torch.manual_seed(0)
    x64, x784 = torch.randn(256, 64), torch.randn(512, 784)
    img = torch.randn(64, 1, 28, 28)
    return {
        "mlp_64-256-256-10_b256": (
            nn.Sequential(
                nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
            ),
            [(x64, torch.randint(0, 10, (256,)))],
        ),
        "mlp_784-1024-1024-10_b512": (
            nn.Sequential(
                nn.Linear(784, 1024),
                nn.Tanh(),
                nn.Linear(1024, 1024),
                nn.Tanh(),
                nn.Linear(1024, 10),
            ),
            [(x784, torch.randint(0, 10, (512,)))],
        ),
        "cnn_28x28_b64": (
            nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 10),
            ),
            [(img, torch.randint(0, 10, (64,)))],
        ),
        "layernorm_gelu_784-1024_b512": (
            nn.Sequential(nn.Linear(784, 1024), nn.LayerNorm(1024), nn.GELU(), nn.Linear(1024, 10)),
            [(x784, torch.randint(0, 10, (512,)))],
        ),
    }


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def bench_problem(name: str, model: nn.Module, data: list[Any], repeats: int) -> dict[str, Any]:
    params = list(model.parameters())
    op = HessianOperator(model, data, loss_fn)
    v = torch.randn(op.size)
    vs = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    batch = data[0]

    def op_hvp() -> torch.Tensor:
        return op.matvec(v)

    def raw_hvp() -> torch.Tensor:
        g = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vs))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])

    def grad() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss_fn(model, batch), params)

    torch.testing.assert_close(op_hvp(), raw_hvp(), rtol=1e-4, atol=1e-6)
    # Interleave the three timings so they share machine noise; the ratio of each adjacent
    # pair is robust to other load on the machine, and the median of ratios more so.
    for fn in (op_hvp, raw_hvp, grad):
        fn()
    t_op, t_raw, t_grad, r_raw, r_grad = [], [], [], [], []
    for _ in range(repeats):
        a, b, c = timed(op_hvp), timed(raw_hvp), timed(grad)
        t_op.append(a)
        t_raw.append(b)
        t_grad.append(c)
        r_raw.append(a / b)
        r_grad.append(a / c)
    row = {
        "benchmark": "hvp_overhead",
        "problem": name,
        "params": op.size,
        "t_operator_ms": 1e3 * statistics.median(t_op),
        "t_raw_hvp_ms": 1e3 * statistics.median(t_raw),
        "t_grad_ms": 1e3 * statistics.median(t_grad),
        "overhead_vs_raw_hvp": statistics.median(r_raw) - 1,
        "overhead_ms": 1e3 * statistics.median([a - b for a, b in zip(t_op, t_raw)]),
        "hvp_over_grad": statistics.median(r_grad),
        "repeats": repeats,
        **machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(
        f"{name:28s} n={op.size:7d} op={row['t_operator_ms']:.2f}ms "
        f"raw={row['t_raw_hvp_ms']:.2f}ms grad={row['t_grad_ms']:.2f}ms "
        f"overhead={100 * row['overhead_vs_raw_hvp']:+.1f}% ({row['overhead_ms']:+.2f}ms) "
        f"hvp/grad={row['hvp_over_grad']:.2f}"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hvp_overhead.json"))
    args = ap.parse_args()
    rows = [bench_problem(n, m, d, args.repeats) for n, (m, d) in problems().items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(existing + rows, indent=1))


if __name__ == "__main__":
    main()
