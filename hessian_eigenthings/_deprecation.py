"""Old public names kept working: each warns once per use, naming its replacement.

A renamed function stays a function (:func:`renamed_function`): it warns when called,
so importing it, or ``from hessian_eigenthings import *``, stays silent. A renamed
class is resolved by the module's ``__getattr__`` (:func:`renamed_attributes`), so it is
the very same class (``isinstance`` and subclassing keep working) and warns when looked
up; such names are left out of ``__all__`` so that star imports do not warn.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["factory_call", "renamed_attributes", "renamed_function", "warn_renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_renamed(old: str, new: str, *, note: str = "", stacklevel: int = 3) -> None:
    """Emit the ``DeprecationWarning`` of a renamed public name."""
    warnings.warn(
        f"{old} is deprecated{note}; use {new} instead (same behaviour).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed_function(new: F, old_name: str, *, note: str = "") -> F:
    """``new`` under its old name ``old_name``, warning on every call."""

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warn_renamed(old_name, new.__name__, note=note)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{new.__name__}`{note}."
    return alias  # type: ignore[return-value]


def factory_call(fn: F) -> F:
    """``fn`` itself, for the old factory call ``fn()`` of a plain forward function.

    Warns that ``fn`` is the function ``(model, batch) -> output`` and is passed
    without calling it.
    """
    warnings.warn(
        f"{fn.__name__}() is deprecated: {fn.__name__} is itself the function "
        f"(model, batch) -> output; pass {fn.__name__} without calling it.",
        DeprecationWarning,
        stacklevel=3,
    )
    return fn


def renamed_attributes(
    module: str, renamed: Mapping[str, tuple[str, Callable[[], Any]]]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``old -> (new name, getter of the object)``."""

    def __getattr__(name: str) -> Any:
        if name in renamed:
            new_name, get = renamed[name]
            warn_renamed(name, new_name)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
