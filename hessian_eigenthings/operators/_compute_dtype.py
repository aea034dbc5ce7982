r"""The precision a model computes in, and the finite-difference step it calls for.

A central difference along a unit direction has error

.. math::

    O(h^2) \;+\; O(\varepsilon_c / h), \qquad h_\star = \varepsilon_c^{1/3},

where :math:`\varepsilon_c` is the unit roundoff of the arithmetic the model *computes*
in, not of the dtype its parameters are *stored* in. Mixed precision separates the two:
parameters stored in float32 run in bfloat16 under ``torch.autocast`` or FSDP2's
``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``. A step taken from the storage
dtype (float32: :math:`h = 4.9 \cdot 10^{-3}`) is below bfloat16's resolution
(:math:`\varepsilon = 7.8 \cdot 10^{-3}`): the perturbation is rounded away and the
difference quotient is noise (153% off on a small MLP). The step is therefore taken from
the least precise of the storage dtype and the compute dtype, which is

* given (``fd_compute_dtype=``), or
* observed: one forward of the loss on the first microbatch, at construction, records
  the dtypes of the matrix products, convolutions, attention and embedding lookups it
  runs (a ``TorchDispatchMode``, so ``torch.autocast`` inside the loss function and
  FSDP2's casts are seen alike); and
* at every product, lowered to the dtype of an enclosing ``torch.autocast`` region (a
  user who wraps the algorithm, not the loss, in autocast).

An explicit ``fd_eps`` below :math:`2 \varepsilon_c` (rounding noise of at least 50%)
is refused with the remedy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hessian_eigenthings.operators._finite_difference import default_fd_eps

__all__ = ["FDStep", "autocast_dtype", "least_precise", "observed_compute_dtype"]

_COMPUTE_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "mv",
        "dot",
        "convolution",
        "_convolution",
        "embedding",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)


def _bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def least_precise(*dtypes: torch.dtype | None) -> torch.dtype:
    """The floating dtype with the fewest mantissa bits among ``dtypes`` (``None`` skipped)."""
    present = [d for d in dtypes if d is not None]
    return functools.reduce(lambda a, b: a if _bits(a) <= _bits(b) else b, present)


class _ComputeDtypes(TorchDispatchMode):
    """Records the floating output dtypes of the compute ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _COMPUTE_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                self.seen.add(first.dtype)
        return out


def observed_compute_dtype(run: Callable[[], Any]) -> torch.dtype | None:
    """The least precise dtype of the matrix products (etc.) that ``run()`` executes.

    ``None`` if it runs none (the caller then keeps the storage dtype).
    """
    with _ComputeDtypes() as mode:
        run()
    return least_precise(*mode.seen) if mode.seen else None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the enclosing ``torch.autocast`` region for ``device``'s type, if any."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type autocast does not know
        return None
    return None


class FDStep:
    """The central-difference step of an operator, from the dtype its model computes in.

    Args:
        storage: Dtype of the parameters (the operator's dtype).
        fd_eps: The step the user asked for, or ``None`` for ``eps_c ** (1/3)``.
        compute: The compute dtype (given or observed; ``None``: the storage dtype).
        owner: Operator name for messages.
    """

    def __init__(
        self,
        storage: torch.dtype,
        *,
        fd_eps: float | None,
        compute: torch.dtype | None,
        owner: str,
    ) -> None:
        self.storage = storage
        self.explicit = fd_eps
        self.owner = owner
        self.compute = least_precise(storage, compute)
        self.eps = self._for(self.compute)

    def _for(self, dtype: torch.dtype) -> float:
        if self.explicit is None:
            return default_fd_eps(dtype)
        roundoff = float(torch.finfo(dtype).eps)
        if self.explicit < 2 * roundoff:
            raise ValueError(
                f"{self.owner}: fd_eps={self.explicit:g} is below the resolution of {dtype}, "
                f"the dtype the model computes in (unit roundoff {roundoff:.2g}): the "
                "perturbation would be rounded away and the finite-difference product would "
                f"be rounding noise (relative error ~ eps/h >= 50%). Omit fd_eps (default "
                f"eps ** (1/3) = {default_fd_eps(dtype):.2g} for {dtype}) or pass fd_eps >= "
                f"{2 * roundoff:.2g}; for an exact product use method='autograd' / "
                "jvp='forward'."
            )
        return self.explicit

    def at_product(self, device: torch.device) -> float:
        """The step for a product now: lowered to an enclosing autocast dtype, if any."""
        region = autocast_dtype(device)
        if region is None or _bits(region) >= _bits(self.compute):
            return self.eps
        return self._for(region)
