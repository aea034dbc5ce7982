"""Backwards-compatible alias of :mod:`hessian_eigenthings.param_utils`."""

from hessian_eigenthings import param_utils as _param_utils
from hessian_eigenthings.param_utils import *  # noqa: F403

__all__ = list(_param_utils.__all__)
