"""Top Hessian eigenvalues of a DDP-trained MLP, with the data split over ranks.

Run on CPU (gloo) with two processes::

    torchrun --nproc_per_node=2 examples/torchrun_ddp_hessian.py [--fast]

Every rank holds its own, unevenly sized shard of the data (samples ``r::world``).
``DDPHessianOperator`` is the Hessian of the mean loss over the union of the shards, at
the cost of one all-reduce per matvec; ``lanczos`` runs unchanged and returns the same
eigenvalues on every rank. Rank 0 then recomputes them with the single-process
``HessianOperator`` on the full data set and prints both.

Shard the data yourself (as here) or with ``DistributedSampler(..., drop_last=False)``
only if you accept that it *pads* shards by repeating samples, which changes the mean.
On GPUs use ``init_process_group("nccl")`` and move the model and batches to the device.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hessian_eigenthings import DDPHessianOperator, HessianOperator
from hessian_eigenthings.algorithms.lanczos import lanczos


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 10 dimensions (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.randn(3, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 10, generator=g, dtype=torch.float64)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="small data, few steps")
    parser.add_argument("--k", type=int, default=5, help="number of eigenvalues")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, steps = (301, 30) if args.fast else (2001, 300)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    ddp_model = DistributedDataParallel(model)

    x, y = make_data(n)
    x_shard, y_shard = x[rank::world], y[rank::world]  # uneven when world does not divide n
    shard = batches(x_shard, y_shard, batch_size=64)

    # A few DDP training steps (DDP averages gradients over ranks as usual).
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    for step in range(steps):
        xb, yb = shard[step % len(shard)]
        opt.zero_grad()
        nn.functional.cross_entropy(ddp_model(xb), yb).backward()
        opt.step()

    # The DDP operator: pass the wrapped model and this rank's shard.
    H = DDPHessianOperator(ddp_model, shard, loss_fn)
    result = lanczos(H, k=args.k, seed=0)
    print(
        f"[rank {rank}] {len(x_shard)} samples, top-{args.k} Hessian eigenvalues (DDP): "
        f"{[round(float(e), 8) for e in result.eigenvalues]}",
        flush=True,
    )

    dist.barrier()
    if rank == 0:
        single = HessianOperator(model, batches(x, y, batch_size=64), loss_fn)
        ref = lanczos(single, k=args.k, seed=0)
        rel = float(
            (result.eigenvalues - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max()
        )
        print(f"single process, all {n} samples:               {ref.eigenvalues.tolist()}")
        print(f"DDP on {world} ranks:                               {result.eigenvalues.tolist()}")
        print(f"max relative difference: {rel:.2e}")
        if rel > 1e-8:
            raise SystemExit(f"DDP and single-process eigenvalues differ by {rel:.2e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
