"""Scripts written for hessian-eigenthings 1.0.0a5 keep running: its call styles, translated.

Release 1.0.0a5 used other keyword names in a few places (``hutchinson(num_samples=)``,
``deflated_power_iteration(num_eigs=)``, ``power_iteration_one(init=)``,
``LambdaOperator(matvec=)``, ...). :func:`legacy_keywords` lets a function or constructor
accept them: the old keyword is mapped to the new one and a :class:`DeprecationWarning`
names the replacement. Where an old option has no exact counterpart the translation says
so (and refuses values whose meaning would change) instead of ignoring it.

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "deprecated",
    "lambda_operator_positional",
    "lanczos_reorthogonalize_none",
    "legacy_keywords",
    "microbatch_unsafe_flag",
    "power_iteration_momentum",
    "spectral_density_grid_padding",
]

F = TypeVar("F", bound=Callable[..., Any])

# What a translator returns: the (possibly rewritten) positional arguments, and a function
# applied to the result (or None).
Translation = tuple[tuple[Any, ...], Callable[[Any], Any] | None]
Translator = Callable[[str, tuple[Any, ...], dict[str, Any]], Translation]

# Frames between ``deprecated`` and the user's call: warn -> deprecated -> translator ->
# wrapper -> user.
_TRANSLATOR_DEPTH = 4


def deprecated(what: str, instead: str, *, stacklevel: int = 3) -> None:
    """Emit the :class:`DeprecationWarning` of a 1.0.0a5 name or call style.

    Args:
        what: The old name or call, e.g. ``"hutchinson(num_samples=...)"``.
        instead: What to use instead (the message names it).
        stacklevel: Passed to :func:`warnings.warn` (3: the caller of the caller).
    """
    warnings.warn(
        f"{what} is the hessian-eigenthings 1.0.0a5 API and is deprecated; use {instead}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def legacy_keywords(
    renames: Mapping[str, str] | None = None, translate: Translator | None = None
) -> Callable[[F], F]:
    """Decorator: accept 1.0.0a5 keywords (and call styles) of a function or ``__init__``.

    Args:
        renames: ``{old keyword: new keyword}``. An old keyword is moved to the new one
            with a :class:`DeprecationWarning`; passing both raises :class:`TypeError`.
        translate: ``(owner, args, kwargs) -> (args, post)`` for anything that is not a
            plain rename. It edits ``kwargs`` in place, warns, and may return a function
            ``post`` applied to the result.

    Returns:
        The decorator. The wrapped function's signature and docstring are unchanged.
    """
    renames = dict(renames or {})

    def decorate(fn: F) -> F:
        owner = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{owner}() got both {old!r} (its 1.0.0a5 name) and {new!r}; pass only "
                        f"{new}=..."
                    )
                kwargs[new] = kwargs.pop(old)
                deprecated(f"{owner}({old}=...)", f"{owner}({new}=...)")
            post = None
            if translate is not None:
                args, post = translate(owner, args, kwargs)
            out = fn(*args, **kwargs)
            return out if post is None else post(out)

        return wrapper  # type: ignore[return-value]

    return decorate


# -- translators of the 1.0.0a5 options without a plain rename ------------------------------
def lanczos_reorthogonalize_none(
    owner: str, args: tuple[Any, ...], kw: dict[str, Any]
) -> Translation:
    """``reorthogonalize=None`` (1.0.0a5: "choose for me") becomes ``True``.

    1.0.0a5 reorthogonalised fully up to 50 steps and not beyond; this library always
    reorthogonalises the basis, so ``None`` means the default, ``True``.
    """
    if "reorthogonalize" in kw and kw["reorthogonalize"] is None:
        kw["reorthogonalize"] = True
        deprecated(
            f"{owner}(reorthogonalize=None)",
            f"{owner}(reorthogonalize=True) (the default: the basis is always fully "
            "reorthogonalised)",
            stacklevel=_TRANSLATOR_DEPTH,
        )
    return args, None


def power_iteration_momentum(owner: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Translation:
    """1.0.0a5's deterministic power iteration took a heavy-ball ``momentum``.

    ``momentum=0`` (its default) is plain power iteration and is accepted with a warning.
    Any other value is refused: the accelerated iteration lives in
    :func:`~hessian_eigenthings.stochastic_power_iteration` (unbiased) and Lanczos
    converges faster than either.
    """
    if "momentum" not in kw:
        return args, None
    momentum = kw.pop("momentum")
    if momentum in (0, 0.0, None):
        deprecated(
            f"{owner}(momentum=0)",
            f"{owner}() without momentum (plain power iteration is what momentum=0 computed)",
            stacklevel=_TRANSLATOR_DEPTH,
        )
        return args, None
    raise TypeError(
        f"{owner}() no longer takes momentum={momentum!r} (1.0.0a5's heavy-ball power "
        "iteration). Use lanczos(operator, k=...) (faster and with honest residuals), or "
        "stochastic_power_iteration(operator, momentum=...) for the accelerated method of "
        "De Sa et al."
    )


def microbatch_unsafe_flag(owner: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Translation:
    """``microbatch_unsafe=True`` silenced 1.0.0a5's refusal to microbatch BatchNorm models.

    Microbatching is now exact for every model except train-mode BatchNorm (whose batch
    statistics depend on the split), which raises whatever this flag says; the flag is
    accepted and dropped with a warning.
    """
    if "microbatch_unsafe" in kw:
        kw.pop("microbatch_unsafe")
        deprecated(
            f"{owner}(microbatch_unsafe=...)",
            f"{owner}() without it: microbatches give exactly the un-split operator, and "
            "train-mode BatchNorm (the one unsafe case) always raises",
            stacklevel=_TRANSLATOR_DEPTH,
        )
    return args, None


def lambda_operator_positional(
    owner: str, args: tuple[Any, ...], kw: dict[str, Any]
) -> Translation:
    """``LambdaOperator(fn, n, device, dtype)``: 1.0.0a5 took device and dtype positionally."""
    # args = (self, matvec_fn, size, device, dtype) at most
    if len(args) > 3:
        extra = args[3:]
        if len(extra) > 2:
            raise TypeError(
                f"{owner}() takes matvec_fn and size positionally (plus device, dtype in the "
                f"1.0.0a5 style), got {len(args) - 1} positional arguments."
            )
        for name, value in zip(("device", "dtype"), extra):
            if name in kw:
                raise TypeError(f"{owner}() got {name!r} both positionally and by keyword.")
            kw[name] = value
        deprecated(
            f"{owner}(matvec_fn, size, device, dtype) with positional device/dtype",
            f"{owner}(matvec_fn, size, dtype=..., device=...)",
            stacklevel=_TRANSLATOR_DEPTH,
        )
        args = args[:3]
    return args, None


def spectral_density_grid_padding(
    owner: str, args: tuple[Any, ...], kw: dict[str, Any]
) -> Translation:
    """``grid_padding=f``: 1.0.0a5 evaluated the density on ``[lo - f s, hi + f s]``.

    ``lo``/``hi`` are the extreme Ritz values and ``s = hi - lo``. The density is
    re-smoothed on that grid (same kernel width, no operator products). Combined with an
    explicit ``grid=`` it is refused (the two disagree).
    """
    if "grid_padding" not in kw:
        return args, None
    padding = kw.pop("grid_padding")
    if not isinstance(padding, (int, float)) or not math.isfinite(padding) or padding < 0:
        raise ValueError(f"grid_padding must be a non-negative float, got {padding!r}.")
    if kw.get("grid") is not None:
        raise TypeError(f"{owner}() got both grid= and the 1.0.0a5 grid_padding=; pass only grid=.")
    deprecated(
        f"{owner}(grid_padding=...)",
        f"{owner}(grid=...) (an explicit grid), or result.resmooth(grid=...) afterwards",
        stacklevel=_TRANSLATOR_DEPTH,
    )
    num_points = kw.get("num_grid_points", 1024)

    def regrid(result: Any) -> Any:
        import numpy as np

        nodes = np.concatenate([np.asarray(n, dtype=np.float64) for n in result.nodes])
        lo, hi = float(nodes.min()), float(nodes.max())
        spread = max(hi - lo, 1e-9)
        grid = np.linspace(lo - padding * spread, hi + padding * spread, int(num_points))
        return result.resmooth(grid=grid)

    return args, regrid
