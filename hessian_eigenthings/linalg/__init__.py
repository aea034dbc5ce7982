"""Deprecated 1.0.0a5 module path of the vector backends; use :mod:`hessian_eigenthings.backends`.

``from hessian_eigenthings.linalg import SingleDeviceBackend`` keeps working and returns
the class of :mod:`hessian_eigenthings.backends`, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

from typing import Any

from hessian_eigenthings import backends as _backends
from hessian_eigenthings._compat import deprecated

# resolved lazily by __getattr__, which warns
_MOVED = ("LinAlgBackend", "SingleDeviceBackend")
__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        deprecated(f"hessian_eigenthings.linalg.{name}", f"hessian_eigenthings.backends.{name}")
        return getattr(_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
