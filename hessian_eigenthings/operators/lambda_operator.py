"""An operator defined by a user-supplied matvec function."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import canonical_device
from hessian_eigenthings.backends.single_device import SingleDeviceBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["LambdaOperator"]


class LambdaOperator(CurvatureOperator):
    """Wrap ``matvec_fn: v -> A v`` as a :class:`CurvatureOperator`.

    Args:
        matvec_fn: Maps a flat vector of shape ``(size,)`` and dtype ``dtype`` to ``A v``.
        size: Dimension ``n``.
        dtype: Dtype in which ``matvec_fn`` computes.
        device: Device of the vectors (``"cuda"`` means the current GPU, stored with its
            index as tensors report it; ``"cpu:0"`` is ``"cpu"``).
        symmetric: Whether ``A`` is symmetric (eigensolvers require it).
        psd: Whether ``A`` is positive semi-definite.
        matmat_fn: Optional block product ``V (n, b) -> A V``; defaults to a column loop.
        backend: Vector backend for algorithms (default single device).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0))
        >>> op = LambdaOperator(lambda v: A @ v, 5, dtype=A.dtype, device=A.device)
        >>> op.matvec(torch.ones(5))
        tensor([1., 2., 3., 4., 5.])
    """

    def __init__(
        self,
        matvec_fn: Callable[[torch.Tensor], torch.Tensor],
        size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        symmetric: bool = True,
        psd: bool = False,
        matmat_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: LinAlgBackend | None = None,
    ) -> None:
        if not callable(matvec_fn):
            raise TypeError(f"matvec_fn must be callable, got {type(matvec_fn).__name__}.")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}.")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}.")
        self._fn = matvec_fn
        self._mm = matmat_fn
        self._size = size
        self._dtype = dtype
        self._device = canonical_device(device)
        self._backend = backend or SingleDeviceBackend()
        self.symmetric = symmetric
        self.psd = psd

    @property
    def size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> LinAlgBackend:
        return self._backend

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._fn(v)
        if not isinstance(out, torch.Tensor) or out.shape != (self._size,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"LambdaOperator's matvec_fn must return a tensor of shape ({self._size},), "
                f"got {got}."
            )
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._mm is None:
            return super()._matmat(V)
        return self._mm(V)
