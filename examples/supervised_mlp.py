"""Top Hessian eigenvalues of a small MLP classifier, checked against the dense Hessian.

Trains an MLP on a synthetic 3-class problem (ragged batches), then computes the top-k
Hessian eigenpairs of the mean training loss with restarted Lanczos and the Hessian trace
with Hutch++, and, because the model is small, compares both with the exact answer from
the dense float64 Hessian.

    python examples/supervised_mlp.py            # about 20 s on a laptop CPU
    python examples/supervised_mlp.py --fast     # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from hessian_eigenthings import HessianOperator, lanczos, trace


def make_data(num_samples: int, dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 3-class problem labelled by a random teacher, in ragged batches of at most 64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=gen)
    teacher = torch.randn(dim, 3, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(num_samples, 3, generator=gen)).argmax(-1)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, num_samples, 64)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dense_hessian(model: nn.Module, data: list, loss_fn) -> torch.Tensor:
    """The exact Hessian of the sample-weighted mean loss, in float64 (small models only)."""
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    params = [p.detach() for p in model64.parameters()]
    total = sum(len(b[1]) for b in data)

    def mean_loss(*flat_params: torch.Tensor) -> torch.Tensor:
        state = dict(zip(names, flat_params))
        out = 0.0
        for x, y in data:
            logits = torch.func.functional_call(model64, state, (x.double(),))
            out = out + nn.functional.cross_entropy(logits, y) * len(y) / total
        return out

    blocks = torch.autograd.functional.hessian(mean_loss, tuple(params))
    sizes = [p.numel() for p in params]
    rows = [
        torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
        for i in range(len(params))
    ]
    return torch.cat(rows, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small problem for CI")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dim, hidden, n, epochs = (8, 8, 300, 100) if args.fast else (20, 24, 2000, 20)
    torch.manual_seed(args.seed)
    data = make_data(n, dim, args.seed)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for batch in data:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    model.eval()

    H = HessianOperator(model, data, loss_fn)
    print(f"{H.size} parameters, {len(data)} batches of sizes {[len(b[1]) for b in data]}")

    result = lanczos(H, k=args.k, which="LA", seed=args.seed)
    tr = trace(H, num_matvecs=90, seed=args.seed)

    exact = torch.linalg.eigvalsh(dense_hessian(model, data, loss_fn))
    exact_top = exact.flip(0)[: args.k]
    print(f"{'i':>2} {'Lanczos':>12} {'residual':>10} {'dense eigh':>12}")
    for i in range(args.k):
        print(
            f"{i + 1:>2} {float(result.eigenvalues[i]):>12.6f} {float(result.residuals[i]):>10.2e}"
            f" {float(exact_top[i]):>12.6f}"
        )
    print(
        f"trace: Hutch++ {float(tr.estimate):.4f} +/- {float(tr.stderr):.4f}, "
        f"exact {float(exact.sum()):.4f}"
    )

    # Each Lanczos eigenvalue is within its residual of a true eigenvalue (symmetric
    # Bauer-Fike); the float32 products add rounding of order 1e-6 relative.
    err = (result.eigenvalues.double().cpu() - exact_top).abs()
    bound = result.residuals + 1e-5 * exact.abs().max()
    if not (err <= bound).all():
        raise SystemExit(f"Lanczos disagrees with the dense Hessian: errors {err}, bounds {bound}")
    print(f"max |Lanczos - dense| = {float(err.max()):.2e}, within the residual bounds: OK")


if __name__ == "__main__":
    main()
