"""Re-export of :mod:`hessian_eigenthings.errors` (the errors' home since 2.0; this path stays)."""

from hessian_eigenthings import errors as _errors
from hessian_eigenthings.errors import *  # noqa: F403

__all__ = list(_errors.__all__)
