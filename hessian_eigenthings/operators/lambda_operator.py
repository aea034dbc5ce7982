"""An operator defined by a user-supplied matvec function."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from hessian_eigenthings._compat import lambda_operator_positional, legacy_keywords
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import canonical_device
from hessian_eigenthings.backends.single_device import SingleDeviceBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["LambdaOperator"]


class LambdaOperator(CurvatureOperator):
    """Wrap ``matvec_fn: v -> A v`` as a :class:`CurvatureOperator`.

    The function gets a private copy of each vector (scaled by a power of two, see
    :class:`CurvatureOperator`), so modifying it in place cannot corrupt the caller's
    vectors (a Lanczos basis). What it returns is checked on every product, at no
    host-read cost: a tensor of shape ``(size,)`` (``(size, b)`` for ``matmat_fn``), of a
    floating dtype at least as precise as ``dtype`` (a lower precision would hide its
    rounding error from the reported residuals). A result that requires grad is
    detached (with a warning, once), so no autograd graph outlives a product.

    Symmetry is declared, not checked, by default; ``check_symmetry=True`` tests
    ``<u, A v> = <A u, v>`` on two random vectors at construction (cost: two products)
    and raises if the relative difference exceeds ``sqrt(eps)`` of ``dtype``.

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
        check_symmetry: Test the declared symmetry at construction (two products).

    Raises:
        ValueError: ``check_symmetry=True`` and ``A`` is not symmetric; or (from a
            product) the function returned a tensor of the wrong shape.
        TypeError: (from a product) The function returned something other than a
            floating tensor of at least ``dtype``'s precision.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0))
        >>> op = LambdaOperator(lambda v: A @ v, 5, dtype=A.dtype, device=A.device)
        >>> op.matvec(torch.ones(5))
        tensor([1., 2., 3., 4., 5.])
    """

    @legacy_keywords({"matvec": "matvec_fn"}, lambda_operator_positional)
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
        check_symmetry: bool = False,
    ) -> None:
        if not callable(matvec_fn):
            raise TypeError(f"matvec_fn must be callable, got {type(matvec_fn).__name__}.")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
        if matmat_fn is not None and not callable(matmat_fn):
            raise TypeError(f"matmat_fn must be callable or None, got {type(matmat_fn).__name__}.")
        self._fn = matvec_fn
        self._mm = matmat_fn
        self._size = size
        self._dtype = dtype
        self._device = canonical_device(device)
        self._backend = backend or SingleDeviceBackend()
        self.symmetric = symmetric
        self.psd = psd
        self._warned_grad = False
        if check_symmetry:
            self._check_symmetry()

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

    def _checked(self, out: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """``out`` if it is a product this operator can return (no host read)."""
        expected = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"LambdaOperator's {what} must return a torch.Tensor of shape {expected}, got "
                f"{type(out).__name__}. Convert it with torch.as_tensor(..., dtype={self._dtype})."
            )
        if tuple(out.shape) != shape:
            raise ValueError(
                f"LambdaOperator's {what} must return a tensor of shape {expected}, got "
                f"{tuple(out.shape)}."
            )
        if not out.is_floating_point():
            raise TypeError(
                f"LambdaOperator's {what} returned a {out.dtype} tensor; A v must be floating "
                f"point ({self._dtype}): an integer result is truncated. Compute it in "
                f"{self._dtype}."
            )
        if torch.finfo(out.dtype).eps > torch.finfo(self._dtype).eps:
            raise TypeError(
                f"LambdaOperator's {what} returned {out.dtype}, less precise than the operator's "
                f"dtype {self._dtype}: its rounding error would be invisible in the residuals "
                f"the algorithms report. Return {self._dtype}, or build the operator with "
                f"dtype={out.dtype}."
            )
        if out.requires_grad:
            if not self._warned_grad:
                warnings.warn(
                    f"LambdaOperator's {what} returned a tensor that requires grad; it is "
                    "detached (an autograd graph kept across products grows memory without "
                    "bound). Compute A v under torch.no_grad(), or return out.detach().",
                    UserWarning,
                    stacklevel=5,
                )
                self._warned_grad = True
            out = out.detach()
        return out

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._checked(self._fn(v), (self._size,), "matvec_fn")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._mm is None:
            return super()._matmat(V)
        return self._checked(self._mm(V), tuple(V.shape), "matmat_fn")

    def _check_symmetry(self) -> None:
        """Raise unless ``<u, A v> = <A u, v>`` for two seeded random vectors."""
        gen = torch.Generator(device=self._device).manual_seed(0)
        u, v = (
            torch.randn(self._size, generator=gen, dtype=self._dtype, device=self._device)
            for _ in range(2)
        )
        u, v = u.double(), v.double()
        au, av = self.matvec(u.to(self._dtype)).double(), self.matvec(v.to(self._dtype)).double()
        uav, auv = float(u @ av), float(au @ v)
        scale = float(u.norm() * av.norm() + au.norm() * v.norm())
        tol = float(torch.finfo(self._dtype).eps) ** 0.5
        if abs(uav - auv) > tol * scale:
            raise ValueError(
                f"LambdaOperator(symmetric={self.symmetric}): <u, A v> = {uav:.6g} but "
                f"<A u, v> = {auv:.6g} for two random vectors (relative difference "
                f"{abs(uav - auv) / max(scale, 1e-300):.2g} > {tol:.2g}): matvec_fn is not "
                "symmetric. Eigensolvers would return eigenpairs of its symmetric part. Fix "
                "matvec_fn, or symmetrise it: v -> (A v + A^T v) / 2."
            )
