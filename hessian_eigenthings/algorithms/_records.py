"""What every result shares: the ``stop_reason`` vocabulary and one JSON serialiser.

A result dataclass inherits :class:`ResultRecord` and gets ``to_dict`` / ``from_dict``
from its field annotations: tensors become nested lists (with their dtype recorded as
``<field>_dtype``), NumPy arrays and tuples of arrays become lists of floats, nested
results become dicts, and plain values stay as they are; ``from_dict`` reads them back by
the same annotations.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

import numpy as np
import torch

__all__ = ["ResultRecord", "StopReason"]

StopReason = Literal[
    "converged",
    "max_iter",
    "exhausted",
    "stagnated",
    "completed",
    "time_limit",
    "non_finite",
    "checkpoint_failed",
    "",
]
"""Why a run stopped, the same words for every algorithm:

===================== ==========================================================
``converged``         an eigensolver stopped because every pair met its tolerance
``max_iter``          an eigensolver spent its matvec budget (``converged`` says
                      which pairs met the tolerance anyway)
``exhausted``         Lanczos: the basis spans the whole space (the pairs are exact)
``stagnated``         Lanczos: the residuals stopped decreasing above a ``tol``
                      tighter than the dtype's default (the precision the operator
                      delivers); the best pairs seen, with honest ``converged`` flags
``completed``         an estimator spent its planned budget (trace, diagonal, SLQ)
``time_limit``        ``time_limit=`` stopped the call: a partial result
``non_finite``        the partial result carried by a ``NonFiniteError``
``checkpoint_failed`` the partial result carried by a ``CheckpointWriteError``
``""``                not recorded (results built by hand or derived from others)
===================== ==========================================================
"""

R = TypeVar("R", bound="ResultRecord")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown torch dtype name {name!r} in serialised {where}.")
    return dtype


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float64).tolist()
    if isinstance(value, ResultRecord):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


class ResultRecord:
    """Mixin of the result dataclasses: JSON round trip by field annotations.

    Class attributes:
        _default_dtypes: Dtypes of tensor fields for payloads that did not record them
            (float64 otherwise).
    """

    _default_dtypes: ClassVar[dict[str, torch.dtype]] = {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain lists, floats, ints, strings)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(typing.cast(Any, self)):
            value = getattr(self, f.name)
            out[f.name] = _encode(value)
            if isinstance(value, torch.Tensor):
                out[f"{f.name}_dtype"] = _dtype_name(value.dtype)
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """Rebuild a result written by ``to_dict`` (tensors on the CPU).

        Raises:
            ValueError: ``data`` describes another result type, or a required field is
                missing.
        """
        name = cls.__name__
        if not isinstance(data, dict) or data.get("type", name) != name:
            got = data.get("type") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"Expected a dict produced by {name}.to_dict(), got type {got!r}"
                + (f"; use {got}.from_dict." if isinstance(got, str) else ".")
            )
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(typing.cast(Any, cls)):
            if f.name not in data:
                has_default = f.default is not dataclasses.MISSING
                if has_default or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ValueError(f"Serialised {name} lacks the field {f.name!r}.")
            kwargs[f.name] = cls._decode_field(f.name, hints[f.name], data)
        return cls(**kwargs)

    @classmethod
    def _decode_field(cls, name: str, hint: Any, data: dict[str, Any]) -> Any:
        value = data[name]
        hint = _strip_optional(hint)
        if value is None:
            return None
        if hint is torch.Tensor:
            recorded = data.get(f"{name}_dtype")
            dtype = (
                _dtype_from_name(recorded, cls.__name__)
                if recorded is not None
                else cls._default_dtypes.get(name, torch.float64)
            )
            exact = torch.float64 if dtype.is_floating_point else dtype
            return torch.tensor(value, dtype=exact).to(dtype)
        if hint is np.ndarray:
            return np.asarray(value, dtype=np.float64)
        if typing.get_origin(hint) is tuple:
            return tuple(np.asarray(v, dtype=np.float64) for v in value)
        if isinstance(hint, type) and issubclass(hint, ResultRecord):
            return hint.from_dict(value)
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise ValueError(
                    f"Serialised {cls.__name__} has {name}={value!r}; expected one of "
                    f"{typing.get_args(hint)}."
                )
            return value
        if hint in (int, float, str):
            return hint(value)
        if typing.get_origin(hint) is dict:
            return dict(value)
        return value
