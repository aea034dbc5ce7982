"""The curvature-operator contract: a symmetric linear map given only by its matvec.

Every algorithm in the library consumes a :class:`CurvatureOperator`. The public
:meth:`CurvatureOperator.matvec` validates its argument (shape, dtype, device) and
normalises precision; subclasses implement the private :meth:`_matvec` only.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import same_device
from hessian_eigenthings.backends.single_device import SingleDeviceBackend

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = ["CurvatureOperator"]


@functools.cache
def _precision_rank(dtype: torch.dtype) -> int:
    """Number of mantissa bits, used to order floating dtypes by precision."""
    return round(-math.log2(torch.finfo(dtype).eps))


class CurvatureOperator(ABC):
    """A square linear operator ``A`` of size ``n`` known through ``v -> A v``.

    Subclasses define :attr:`size`, :attr:`dtype`, :attr:`device` and :meth:`_matvec`;
    they may override :meth:`_matmat` with a faster block product.

    Vector precision: ``matvec`` accepts vectors of the operator's dtype or of a *higher*
    floating precision (for example float32 Lanczos vectors for a bfloat16 model). The
    operator computes in its own dtype and returns the product in the vector's dtype.

    Attributes:
        symmetric: ``A == A^T``. Eigensolvers check this flag at entry.
        psd: ``A`` is positive semi-definite (GGN, Fisher).
    """

    symmetric: bool = True
    psd: bool = False

    @property
    @abstractmethod
    def size(self) -> int:
        """Dimension ``n`` of the operator (number of selected parameters)."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Dtype in which the operator computes."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device on which vectors must live."""

    @property
    def backend(self) -> LinAlgBackend:
        """Vector arithmetic that algorithms use with this operator.

        Sharded (distributed) operators return a backend whose reductions all-reduce.
        """
        return SingleDeviceBackend()

    @property
    def local_size(self) -> int:
        """Entries of a vector this process passes to :meth:`matvec`.

        :attr:`size`, unless the operator's vectors are split across ranks (see
        :attr:`backend`).
        """
        return self.size

    @property
    def shape(self) -> tuple[int, int]:
        """``(size, size)``."""
        return (self.size, self.size)

    @abstractmethod
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Compute ``A v`` for a validated flat vector of dtype :attr:`dtype`."""

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Compute ``A V`` for a validated block ``(size, b)``; default: column loop."""
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v``.

        Args:
            v: Flat vector of shape ``(size,)`` on :attr:`device`, of dtype :attr:`dtype`
                or a higher floating precision.

        Returns:
            ``A v`` with the shape, dtype and device of ``v``.

        Raises:
            ValueError: ``v`` is not of shape ``(size,)`` or is on another device.
            TypeError: ``v`` is not a tensor, not floating point, or of lower precision.
        """
        self._check_vector(v, ndim=1)
        out = self._matvec(v.to(self.dtype) if v.dtype != self.dtype else v)
        return out.to(v.dtype) if out.dtype != v.dtype else out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for a block of column vectors ``V`` of shape ``(size, b)``."""
        self._check_vector(V, ndim=2)
        out = self._matmat(V.to(self.dtype) if V.dtype != self.dtype else V)
        return out.to(V.dtype) if out.dtype != V.dtype else out

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def _check_vector(self, v: Any, *, ndim: int) -> None:
        what = "vector" if ndim == 1 else "block"
        n = self.local_size
        expected = f"({n},)" if ndim == 1 else f"({n}, b)"
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.{'matvec' if ndim == 1 else 'matmat'} expected a "
                f"torch.Tensor of shape {expected}, got {type(v).__name__}."
            )
        if v.dim() != ndim or v.shape[0] != n:
            if n != self.size:
                hint = (
                    f" This rank holds a shard of every {what} (global size {self.size}); "
                    "convert a global vector with operator.backend.shard(v)."
                )
            elif ndim == 1 and v.dim() == 2:
                hint = " Use matmat for a block of vectors (columns)."
            else:
                hint = " Flatten per-parameter tensors with param_utils.flatten."
            raise ValueError(
                f"{type(self).__name__} expected a {what} of shape {expected}, got shape "
                f"{tuple(v.shape)}.{hint}"
            )
        if not v.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expected a floating {what} of dtype {self.dtype}, "
                f"got {v.dtype}. Convert it with v.to({self.dtype})."
            )
        if v.dtype != self.dtype and _precision_rank(v.dtype) < _precision_rank(self.dtype):
            raise TypeError(
                f"{type(self).__name__} computes in {self.dtype} but got a {what} of lower "
                f"precision {v.dtype}. Pass v.to({self.dtype}) (or a higher precision)."
            )
        if not same_device(v.device, self.device):
            raise ValueError(
                f"{type(self).__name__} expected a {what} on device {self.device}, got "
                f"{v.device}. Move it with v.to({str(self.device)!r})."
            )

    def to_scipy(self) -> LinearOperator:
        """Wrap as a :class:`scipy.sparse.linalg.LinearOperator` over NumPy arrays.

        Reduced-precision operators are exposed in float32 (NumPy has no bfloat16).
        Requires the ``scipy`` extra.

        Raises:
            TypeError: The operator's vectors are split across ranks.
        """
        if self.local_size != self.size:
            raise TypeError(
                f"{type(self).__name__} holds only a shard of every vector on this rank; SciPy "
                "needs whole vectors. Gather them with operator.backend.gather, or use the "
                "library's algorithms, which run on shards."
            )
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - depends on environment
            raise ImportError(
                "to_scipy() needs SciPy: pip install 'hessian-eigenthings[scipy]'"
            ) from err
        vec_dtype = self.dtype if _precision_rank(self.dtype) >= 23 else torch.float32
        np_dtype = torch.empty((), dtype=vec_dtype).numpy().dtype

        def mv(x: Any) -> Any:
            t = torch.as_tensor(x.reshape(-1), dtype=vec_dtype).to(self.device)
            return self.matvec(t).detach().cpu().numpy()

        def mm(X: Any) -> Any:
            t = torch.as_tensor(X, dtype=vec_dtype).to(self.device)
            return self.matmat(t).detach().cpu().numpy()

        return LinearOperator(
            shape=self.shape,
            matvec=mv,
            rmatvec=mv if self.symmetric else None,
            matmat=mm,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, "
            f"device={self.device}, symmetric={self.symmetric}, psd={self.psd})"
        )
