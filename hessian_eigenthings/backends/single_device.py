"""Backend for flat vectors that live whole on one device."""

from __future__ import annotations

import torch

from hessian_eigenthings.backends.base import LinAlgBackend, draw_probes

__all__ = ["SingleDeviceBackend", "draw_probes"]


class SingleDeviceBackend(LinAlgBackend[torch.Tensor]):
    """Plain ``torch`` arithmetic on whole flat vectors."""

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.dot(x, y)

    def gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return X.T @ Y

    def local_size(self, n: int) -> int:
        return n

    def __repr__(self) -> str:
        return "SingleDeviceBackend()"
