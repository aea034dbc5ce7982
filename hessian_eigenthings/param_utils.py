"""Selecting parameters by name and moving between flat vectors and parameter lists.

A *parameter filter* decides which ``requires_grad`` parameters an operator acts on:
globs, regexes, a predicate ``(name, param) -> bool``, or a submodule (its parameters, by
identity: ``param_filter=model[0]``). Filters compose:
``match_names("h.*.attn.*") & ~match_regex(r"bias$")``.

A flat vector (an eigenvector, a gradient) splits back into per-parameter pieces with
``operator.layout.split(vec)`` (a dict name -> tensor) or ``unflatten(vec, operator)`` (a
list in the operator's parameter order).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessian_eigenthings._compat import deprecated

__all__ = [
    "ParamFilter",
    "ParamLayout",
    "flatten",
    "match_names",
    "match_params",
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


def match_params(*items: nn.Module | torch.Tensor) -> ParamFilter:
    """Select parameters by identity: those of the given submodules, or the given tensors.

    ``match_params(model[0])`` selects ``model[0].weight`` and ``model[0].bias`` (under
    whatever names the whole model gives them). Passing a module as ``param_filter`` is
    the same as wrapping it in ``match_params``.

    Example:
        >>> f = match_params(model.layers[3].attn, model.lm_head.weight)

    Raises:
        TypeError: An item is neither an ``nn.Module`` nor a tensor.
        ValueError: No items, or modules without parameters.
    """
    if not items:
        raise ValueError("match_params expects one or more modules or parameters, got none.")
    ids: set[int] = set()
    parts = []
    for item in items:
        if isinstance(item, nn.Module):
            ids.update(id(p) for p in item.parameters())
            parts.append(type(item).__name__)
        elif isinstance(item, torch.Tensor):
            ids.add(id(item))
            parts.append(f"tensor{tuple(item.shape)}")
        else:
            raise TypeError(
                f"match_params expects nn.Module or parameter tensors, got {type(item).__name__}."
            )
    if not ids:
        raise ValueError(
            f"match_params got modules without parameters ({', '.join(parts)}); pass a "
            "submodule that owns parameters, e.g. model[0] rather than an activation."
        )
    return _IdentityFilter(ids, f"parameters of {' + '.join(parts)}")


class _IdentityFilter(ParamFilter):
    """A filter that selects parameter objects by identity (see :func:`match_params`)."""

    def __init__(self, ids: set[int], description: str) -> None:
        super().__init__(lambda _, p: id(p) in ids, description)


ParamFilterLike = (
    ParamFilter
    | Callable[[str, nn.Parameter], bool]
    | nn.Module
    | str
    | Sequence[str]
    | Sequence[nn.Module | torch.Tensor]
    | None
)


def _check_predicate(spec: Callable[..., Any]) -> None:
    """Refuse callables that cannot be called as ``spec(name, param)``."""
    try:
        sig = inspect.signature(spec)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind("name", None)
    except TypeError as err:
        raise TypeError(
            f"param_filter {getattr(spec, '__name__', spec)!r} is callable but not a filter: "
            f"expected a predicate (name: str, param: nn.Parameter) -> bool, got signature "
            f"{sig} ({err}). Wrap it, e.g. param_filter=lambda name, p: ..."
        ) from None


def as_param_filter(spec: ParamFilterLike) -> ParamFilter:
    """Normalise the accepted filter specs into a :class:`ParamFilter`.

    ``None`` selects everything; a string or list of strings are globs (or exact names);
    an ``nn.Module`` (or a list of modules / parameter tensors) selects those parameters
    by identity (:func:`match_params`); a callable is ``(name, param) -> bool``.

    Raises:
        TypeError: Anything else, or a callable that does not take ``(name, param)``.
    """
    if spec is None:
        return ParamFilter(lambda n, p: True, "all parameters")
    if isinstance(spec, ParamFilter):
        return spec
    if isinstance(spec, nn.Module):  # before `callable`: modules are callable too
        return match_params(spec)
    if isinstance(spec, str):
        return match_names(spec)
    if isinstance(spec, (list, tuple)) and spec:
        if all(isinstance(s, str) for s in spec):
            return match_names(*spec)
        if all(isinstance(s, (nn.Module, torch.Tensor)) for s in spec):
            return match_params(*spec)
    if callable(spec) and not isinstance(spec, torch.Tensor):
        _check_predicate(spec)
        return ParamFilter(spec, getattr(spec, "__name__", "custom filter"))
    got = type(spec).__name__
    if isinstance(spec, (list, tuple)):
        kinds = sorted({type(s).__name__ for s in spec})
        got = f"{got} of {kinds}" if spec else f"empty {got}"
    raise TypeError(
        "param_filter must be None, a ParamFilter, a glob string, a list of globs, a "
        "submodule (or a list of submodules / parameters), or a callable (name, param) -> "
        f"bool; got {got}."
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
    if isinstance(filt, _IdentityFilter):
        raise ValueError(
            f"param_filter selected no trainable parameter of {type(model).__name__}: the "
            f"{probe} are not parameters of this model (or do not require grad). Pass a "
            "submodule of the model the operator is built on, e.g. param_filter=model[0]."
        )
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

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{name: piece}`` shaped like the parameters (views).

        The pieces keep ``vec``'s dtype and device (no cast), so an eigenvector from
        ``lanczos`` splits without rounding: ``operator.layout.split(result.eigenvectors[0])``.

        Raises:
            ValueError: ``vec`` is not 1-D of size :attr:`size`.
        """
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"split expects a flat torch.Tensor, got {type(vec).__name__}.")
        if vec.dim() != 1 or vec.numel() != self.size:
            raise ValueError(
                f"split expected a flat vector of size {self.size} (the layout's "
                f"{len(self.names)} parameters), got shape {tuple(vec.shape)}."
            )
        return {
            name: vec[start:end].view(shape)
            for name, shape, start, end in zip(
                self.names, self.shapes, self.offsets[:-1], self.offsets[1:]
            )
        }

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


def _reference_tensors(like: Any) -> list[torch.Tensor]:
    """The tensors ``unflatten`` shapes its pieces after: a sequence, or an operator's params."""
    if isinstance(like, torch.Tensor):
        raise TypeError(
            "unflatten expects a sequence of reference tensors or an operator, got a single "
            "tensor; pass [tensor] or the operator the vector belongs to."
        )
    if isinstance(like, nn.Module):
        raise TypeError(
            f"unflatten got a model ({type(like).__name__}); which of its parameters the "
            "vector covers depends on the operator's param_filter. Pass the operator "
            "(unflatten(vec, H)) or H.params, or use H.layout.split(vec) for a dict."
        )
    params = getattr(like, "params", None)
    named = getattr(like, "named_params", None)
    if params is not None and not callable(params):  # an operator: its selected parameters
        like = params
    elif named is not None and not callable(named):
        like = [p for _, p in named]
    try:
        tensors = list(like)
    except TypeError:
        raise TypeError(
            "unflatten expects a sequence of reference tensors or an operator with "
            f"`params` (HessianOperator, GGNOperator, ...), got {type(like).__name__}."
        ) from None
    bad = sorted({type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)})
    if bad:
        raise TypeError(f"unflatten's reference sequence must hold tensors, got {bad}.")
    return tensors


def unflatten(vec: torch.Tensor, like: Any, cast: bool = True) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views when no cast is needed).

    Args:
        vec: Flat vector of size ``sum(t.numel() for t in like)``.
        like: Reference tensors (shapes, and dtypes when ``cast``), or an operator with a
            ``params`` list (``HessianOperator``, ``GGNOperator``, ...): its selected
            parameters, in the order of the operator's flat vectors. For pieces keyed by
            parameter name use ``operator.layout.split(vec)``.
        cast: Cast each piece to the dtype of its reference tensor.

    Raises:
        TypeError: ``like`` is neither a sequence of tensors nor an operator with
            ``params`` (e.g. a model: pass the operator instead).
        ValueError: ``vec`` does not have the total size of the references.
    """
    like = _reference_tensors(like)
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
