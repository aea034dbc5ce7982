"""Backend for flat vectors that live whole on one device."""

from __future__ import annotations

import torch

from hessian_eigenthings.backends.base import LinAlgBackend

__all__ = ["SingleDeviceBackend", "draw_probes"]


def draw_probes(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    distribution: str,
) -> torch.Tensor:
    """Draw Gaussian or Rademacher probes directly on ``device`` (no host copy).

    Reduced-precision dtypes are drawn in float32 and rounded, so Rademacher entries
    stay exactly +-1 and Gaussian tails are not clipped by bfloat16 sampling.
    """
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if distribution == "gaussian":
        out = torch.randn(shape, generator=generator, dtype=draw_dtype, device=device)
    elif distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        out = bits.to(draw_dtype).mul_(2).sub_(1)
    else:
        raise ValueError(
            f"Unknown probe distribution {distribution!r}; expected 'gaussian' or 'rademacher'."
        )
    return out.to(dtype)


class SingleDeviceBackend(LinAlgBackend[torch.Tensor]):
    """Plain ``torch`` arithmetic on whole flat vectors."""

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.dot(x, y)

    def gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return X.T @ Y

    def local_size(self, n: int) -> int:
        return n

    def probes(
        self,
        n: int,
        num: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device,
        distribution: str = "gaussian",
    ) -> torch.Tensor:
        rows = draw_probes(
            (num, n), generator=generator, dtype=dtype, device=device, distribution=distribution
        )
        return rows.T

    def __repr__(self) -> str:
        return "SingleDeviceBackend()"
