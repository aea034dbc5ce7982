"""Selecting parameters by name and moving between flat vectors and parameter lists.

A *parameter filter* decides which ``requires_grad`` parameters an operator acts on.
Filters compose: ``match_names("h.*.attn.*") & ~match_regex(r"bias$")``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hessian_eigenthings._compat import deprecated

__all__ = [
    "ParamFilter",
    "ParamLayout",
    "flatten",
    "match_names",
    "match_regex",
    "select_params",
    "unflatten",
    # 1.0.0a5 names (deprecated aliases)
    "params_to_vector",
    "select_parameters",
    "total_size",
    "vector_to_params",
]


class ParamFilter:
    """A predicate on ``(name, parameter)`` pairs; combine with ``&``, ``|`` and ``~``.

    Args:
        predicate: ``(name, param) -> bool``.
        description: Human-readable description, used in error messages.
    """

    def __init__(
        self, predicate: Callable[[str, nn.Parameter], bool], description: str = "custom filter"
    ) -> None:
        self._predicate = predicate
        self.description = description

    def __call__(self, name: str, param: nn.Parameter) -> bool:
        return bool(self._predicate(name, param))

    def __and__(self, other: ParamFilter) -> ParamFilter:
        other = as_param_filter(other)
        return ParamFilter(
            lambda n, p: self(n, p) and other(n, p), f"({self.description} & {other.description})"
        )

    def __or__(self, other: ParamFilter) -> ParamFilter:
        other = as_param_filter(other)
        return ParamFilter(
            lambda n, p: self(n, p) or other(n, p), f"({self.description} | {other.description})"
        )

    def __invert__(self) -> ParamFilter:
        return ParamFilter(lambda n, p: not self(n, p), f"~{self.description}")

    def __repr__(self) -> str:
        return f"ParamFilter({self.description})"


def match_names(*patterns: str) -> ParamFilter:
    """Select parameters whose full name matches any of the shell-style globs.

    ``*`` matches any run of characters including dots, so ``"h.*.attn.*"`` selects
    ``h.0.attn.c_attn.weight``.

    Example:
        >>> f = match_names("blocks.*.attn.*")
    """
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"match_names expects one or more glob strings, got {patterns!r}.")
    pats = tuple(patterns)
    return ParamFilter(
        lambda n, _: any(fnmatch.fnmatchcase(n, p) for p in pats), f"match_names{pats!r}"
    )


def match_regex(*patterns: str) -> ParamFilter:
    """Select parameters whose full name matches any regex (``re.search`` semantics)."""
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"match_regex expects one or more regex strings, got {patterns!r}.")
    compiled = [re.compile(p) for p in patterns]
    return ParamFilter(
        lambda n, _: any(c.search(n) for c in compiled), f"match_regex{tuple(patterns)!r}"
    )


ParamFilterLike = ParamFilter | Callable[[str, nn.Parameter], bool] | str | Sequence[str] | None


def as_param_filter(spec: ParamFilterLike) -> ParamFilter:
    """Normalise the accepted filter specs into a :class:`ParamFilter`.

    ``None`` selects everything; a string or list of strings are globs (or exact names);
    a callable is ``(name, param) -> bool``.
    """
    if spec is None:
        return ParamFilter(lambda n, p: True, "all parameters")
    if isinstance(spec, ParamFilter):
        return spec
    if isinstance(spec, str):
        return match_names(spec)
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        return match_names(*spec)
    if callable(spec):
        return ParamFilter(spec, getattr(spec, "__name__", "custom filter"))
    raise TypeError(
        "param_filter must be None, a ParamFilter, a glob string, a list of globs, or a "
        f"callable (name, param) -> bool; got {type(spec).__name__}."
    )


def select_params(
    model: nn.Module, param_filter: ParamFilterLike = None
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, param)`` pairs of ``model`` that require grad and pass the filter.

    Raises:
        ValueError: The filter selects nothing; the message lists close parameter names.
    """
    filt = as_param_filter(param_filter)
    named = list(model.named_parameters())
    chosen = [(n, p) for n, p in named if p.requires_grad and filt(n, p)]
    if chosen:
        return chosen
    trainable = [n for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no parameters with requires_grad=True; curvature "
            "needs at least one trainable parameter (set p.requires_grad_(True))."
        )
    probe = filt.description
    close = difflib.get_close_matches(probe, trainable, n=5, cutoff=0.0)
    raise ValueError(
        f"param_filter {probe} selected no parameters with requires_grad=True out of "
        f"{len(trainable)}. Close names: {close}. Names look like {trainable[:3]}."
    )


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter lives inside a flat vector.

    Attributes:
        names: Parameter names in order.
        shapes: Their shapes.
        offsets: Start index of each parameter in the flat vector (length ``len+1``).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> ParamLayout:
        names, shapes, offsets = [], [], [0]
        for n, t in named:
            names.append(n)
            shapes.append(t.shape)
            offsets.append(offsets[-1] + t.numel())
        return cls(tuple(names), tuple(shapes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def block_of(self, index: int) -> str:
        """Name of the parameter that flat entry ``index`` belongs to."""
        for name, end in zip(self.names, self.offsets[1:]):
            if index < end:
                return name
        raise IndexError(f"index {index} outside a vector of size {self.size}")


def flatten(
    tensors: Iterable[torch.Tensor | None],
    like: Sequence[torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Concatenate tensors into one flat vector (``None`` entries become zeros of ``like``).

    Args:
        tensors: Per-parameter tensors, possibly ``None`` for parameters that did not
            reach the loss.
        like: Reference tensors giving the shape of ``None`` entries.
        dtype: Output dtype; default: promoted dtype of the inputs.
    """
    parts = []
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError("flatten got None without `like` to size its zeros.")
            ref = like[i]
            parts.append(torch.zeros(ref.numel(), dtype=dtype or ref.dtype, device=ref.device))
        else:
            parts.append(t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype))
    if not parts:
        raise ValueError("flatten got no tensors.")
    if dtype is None:
        out_dtype = parts[0].dtype
        for p in parts[1:]:
            out_dtype = torch.promote_types(out_dtype, p.dtype)
        parts = [p.to(out_dtype) for p in parts]
    return torch.cat(parts)


def unflatten(
    vec: torch.Tensor, like: Sequence[torch.Tensor], cast: bool = True
) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views when no cast is needed).

    Args:
        vec: Flat vector of size ``sum(t.numel() for t in like)``.
        like: Reference tensors (shapes, and dtypes when ``cast``).
        cast: Cast each piece to the dtype of its reference tensor.
    """
    total = sum(t.numel() for t in like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"unflatten expected a flat vector of size {total}, got shape {tuple(vec.shape)}."
        )
    out, start = [], 0
    for t in like:
        piece = vec[start : start + t.numel()].view(t.shape)
        out.append(piece.to(t.dtype) if cast and piece.dtype != t.dtype else piece)
        start += t.numel()
    return out


# -- 1.0.0a5 names (deprecated aliases) ------------------------------------------------------
def select_parameters(
    model: nn.Module, param_filter: ParamFilterLike = None
) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the selected parameters (1.0.0a5; use :func:`select_params`)."""
    deprecated("select_parameters(model, param_filter)", "dict(select_params(model, param_filter))")
    return dict(select_params(model, param_filter))


def total_size(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Number of entries of a parameter collection (1.0.0a5; use :class:`ParamLayout`)."""
    deprecated("total_size(params)", "ParamLayout.of(named_params).size")
    items = params.values() if isinstance(params, Mapping) else params
    return sum(int(p.numel()) for p in items)


def params_to_vector(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate ``{name: tensor}`` into one flat vector (1.0.0a5; use :func:`flatten`)."""
    deprecated("params_to_vector(params)", "flatten(params.values())")
    return flatten(params.values())


def vector_to_params(
    vec: torch.Tensor, reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split a flat vector into ``{name: view shaped like reference[name]}``.

    1.0.0a5 name; use :func:`unflatten` (``dict(zip(ref, unflatten(vec, ref.values(),
    cast=False)))``). The pieces are views of ``vec`` in its dtype, as before.
    """
    deprecated(
        "vector_to_params(vec, reference)",
        "dict(zip(reference, unflatten(vec, list(reference.values()), cast=False)))",
    )
    return dict(zip(reference, unflatten(vec, list(reference.values()), cast=False)))
