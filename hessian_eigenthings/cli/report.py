"""Machine-readable results of a command: JSON with versions, and tidy number formatting."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "fmt", "to_jsonable", "write_json"]


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result file."""
    import numpy

    from hessian_eigenthings import __version__

    return {
        "hessian_eigenthings": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "num_threads": torch.get_num_threads(),
    }


def to_jsonable(value: Any) -> Any:
    """Convert tensors, NumPy arrays and nested containers into JSON-serialisable values.

    Non-finite floats become ``None`` (JSON has no NaN/Inf); bool tensors stay booleans.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return to_jsonable(value.tolist())
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy arrays and scalars
        return to_jsonable(value.tolist())
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype | torch.device | Path):
        return str(value)
    return repr(value)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON (strict: no NaN), creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def fmt(x: float) -> str:
    """Compact scientific formatting for tables (``1.234e+01``)."""
    return f"{x: .4e}"
