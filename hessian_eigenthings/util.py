"""Backwards-compatible alias of :mod:`hessian_eigenthings.param_utils`."""

from hessian_eigenthings.param_utils import (
    ParamFilter,
    ParamLayout,
    flatten,
    match_names,
    match_regex,
    select_params,
    unflatten,
)

__all__ = [
    "ParamFilter",
    "ParamLayout",
    "flatten",
    "match_names",
    "match_regex",
    "select_params",
    "unflatten",
]
