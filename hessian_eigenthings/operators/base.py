"""The curvature-operator contract: a symmetric linear map given only by its matvec.

Every algorithm in the library consumes a :class:`CurvatureOperator`. The public
:meth:`CurvatureOperator.matvec` validates its argument (shape, dtype, device) and
normalises precision; subclasses implement the private :meth:`_matvec` only.

Because the operator is linear, ``matvec`` also normalises the *scale* of tiny or huge
vectors: ``A v = 2^e A (2^{-e} v)`` with ``2^e`` the power of two nearest above
``max |v_i|`` (per column for a block), when that lies outside ``[2^-b, 2^b]`` for a
quarter ``b`` of the exponent range of the operator's dtype (31 for float32 and
bfloat16, 255 for float64, 3 for float16); other vectors are passed as they are. It is
computed on the device without a host read, and multiplying by a power of two is
exact, so subnormal or huge vectors (``|v| ~ 1e-42`` in float32) no longer underflow or
overflow inside the product. The subclass always gets a private copy of the vector.
Operators whose vectors are split across ranks skip the scaling (it would need a
collective).
"""

from __future__ import annotations

import contextlib
import functools
import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from hessian_eigenthings._compat import deprecated
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import same_device
from hessian_eigenthings.backends.single_device import SingleDeviceBackend
from hessian_eigenthings.errors import NonFiniteError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = ["CurvatureOperator"]


@functools.cache
def _precision_rank(dtype: torch.dtype) -> int:
    """Number of mantissa bits, used to order floating dtypes by precision."""
    return round(-math.log2(torch.finfo(dtype).eps))


@functools.cache
def _exponent_bound(dtype: torch.dtype) -> int:
    """A quarter of the binary exponent range of ``dtype`` (31 for float32, 255 for float64)."""
    return int(math.log2(torch.finfo(dtype).max)) // 4


def _pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** k`` exactly, built from the exponent bits (``k`` within the normal range)."""
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32).to(dtype)


def _scale_exponents(v: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h1, h2)`` with ``2^(h1 + h2)`` just above ``max |v|`` (per column).

    Zero where ``max |v|`` is within ``[2^-bound, 2^bound]`` or not finite. The exponent
    is split in two halves so that each power of two is a normal number of ``v``'s
    dtype even for the extreme exponents of subnormal or huge vectors.
    """
    amax = v.abs().amax(dim=0)
    e = torch.frexp(amax).exponent
    scale = torch.isfinite(amax) & (amax > 0) & ((e > bound) | (e < -bound))
    e = torch.where(scale, e, torch.zeros_like(e))
    h1 = torch.div(e, 2, rounding_mode="floor")
    return h1, e - h1


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

    def _product_mode(self) -> AbstractContextManager[Any]:
        """Global mode a product runs in (data operators switch autograd on)."""
        return contextlib.nullcontext()

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
            NonFiniteError: The product is not finite (data operators); if ``v`` itself
                holds inf/nan the error says so.
        """
        self._check_vector(v, ndim=1)
        return self._product(v, self._matvec)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for a block of column vectors ``V`` of shape ``(size, b)``."""
        self._check_vector(V, ndim=2)
        if V.shape[1] == 0:
            return torch.zeros_like(V)
        return self._product(V, self._matmat)

    def _product(self, v: torch.Tensor, fn: Any) -> torch.Tensor:
        """``fn`` on ``v`` scaled to ``max |v| ~ 1`` in the operator's dtype, scaled back."""
        with self._product_mode():
            whole = self.local_size == self.size
            x = v.detach()  # products are not differentiated with respect to the vector
            if whole:
                h1, h2 = _scale_exponents(x, _exponent_bound(self.dtype))
                x = x * _pow2(-h1, v.dtype) * _pow2(-h2, v.dtype)
            elif x.is_inference():
                x = x.clone()
            try:
                out = fn(x.to(self.dtype) if x.dtype != self.dtype else x)
            except NonFiniteError as err:
                self._blame_vector(v, err)
                raise
            out = out.to(v.dtype) if out.dtype != v.dtype else out
            if whole:
                out = out * _pow2(h1, v.dtype) * _pow2(h2, v.dtype)
            return out

    def _blame_vector(self, v: torch.Tensor, err: NonFiniteError) -> None:
        """Raise an error that blames ``v`` if it holds inf/nan (a host read, on error only)."""
        bad = ~torch.isfinite(v)
        if not bool(bad.any()):
            return
        first = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]
        raise NonFiniteError(
            f"{type(self).__name__}: the input {'vector' if v.dim() == 1 else 'block'} holds "
            f"{int(bad.sum())} non-finite entries (inf/nan), the first at index {int(first)}: "
            "the vector is to blame, not the model or the data. Check where it was computed.",
            param_names=(),
        ) from err

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

    # -- 1.0.0a5 call styles -------------------------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Accept 1.0.0a5 subclasses, which overrode ``matvec`` instead of ``_matvec``."""
        super().__init_subclass__(**kwargs)
        if "matvec" in cls.__dict__ and cls._matvec is CurvatureOperator.__dict__["_matvec"]:
            cls._matvec = cls.__dict__["matvec"]  # type: ignore[method-assign]
            deprecated(
                f"{cls.__name__} overriding CurvatureOperator.matvec",
                "an override of _matvec (the public matvec validates the vector, then calls it)",
                stacklevel=4,  # deprecated <- __init_subclass__ <- ABCMeta.__new__ <- class
            )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` (1.0.0a5 call style ``op(v)``)."""
        deprecated(
            f"{type(self).__name__}(v) (calling an operator)",
            "op.matvec(v) or op @ v",
            stacklevel=3,
        )
        return self.matvec(v)

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A^T v`` of a symmetric operator, i.e. ``A v`` (1.0.0a5)."""
        deprecated(
            f"{type(self).__name__}.rmatvec(v)",
            "op.matvec(v) (the operator is symmetric)",
            stacklevel=3,
        )
        if not self.symmetric:
            raise ValueError(
                f"{type(self).__name__} is not symmetric, so rmatvec(v) is not matvec(v); this "
                "library defines only A v for such operators."
            )
        return self.matvec(v)
