"""The analyses of one command as stages: one time budget, timings, checkpoints, reuse.

A command runs stages in order (``eigen``, ``trace``, ``density`` for ``analyze``), each
one library call. :class:`Stages` gives them:

- one wall-clock budget (``--time-limit``, counted from the start of the command): each
  stage is called with the time that is left as its ``time_limit``; a stage stopped by it
  returns its partial result, and the stages after it do not start;
- per-stage timings (``timings``), also of the steps around them (loading, figures);
- with ``--checkpoint DIR``: the library's checkpoint file of stage ``s`` is
  ``DIR/s.ckpt`` (written every few minutes and when the time limit stops the stage;
  rerunning the command continues it), and a finished stage's result is kept in
  ``DIR/s.result.json``, so that a rerun reuses it instead of computing it again. Both
  record what they belong to (the operator's identity: class, size, dtype, a hash of the
  selected parameters and of the data; the stage's arguments); a rerun with other inputs
  is refused with the list of differences (exit code 2) rather than mixing results.

Under ``torchrun`` the clock of rank 0 decides whether a stage starts, so every rank
makes the same collective calls.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from hessian_eigenthings.cli.errors import BadInput
from hessian_eigenthings.errors import CheckpointMismatchError, CorruptCheckpointError

__all__ = ["Stage", "Stages", "checkpoint_dir"]

R = TypeVar("R")
_FORMAT = 1


def checkpoint_dir(spec: str | None) -> Path | None:
    """Validate ``--checkpoint DIR`` (created if missing).

    Raises:
        BadInput: ``DIR`` exists and is not a directory, or cannot be created.
    """
    if spec is None:
        return None
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise BadInput(
            f"--checkpoint {spec!r} exists and is not a directory; it names a folder that "
            "holds one checkpoint file per stage"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"--checkpoint {spec!r} cannot be created: {err}") from err
    return path


def _rank0_value(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank under ``torch.distributed`` (else ``value``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=where)
    dist.broadcast(t, src=0)
    return float(t.item())


def _diff(expected: Any, found: Any, prefix: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        lines = []
        for key in sorted(set(expected) | set(found)):
            lines += _diff(expected.get(key), found.get(key), f"{prefix}{key}.")
        return lines
    if expected != found:
        return [f"  {prefix.rstrip('.')}: this run {expected!r}, the file {found!r}"]
    return []


@dataclass
class Stage:
    """What happened to one stage.

    Attributes:
        name: ``"eigen"``, ``"trace"``, ``"density"``, ...
        status: ``"computed"``, ``"reused"`` (from ``DIR/name.result.json``),
            ``"time_limit"`` (stopped by ``--time-limit``; partial result) or
            ``"not_started"`` (no time was left).
        seconds: Wall-clock time of the stage.
    """

    name: str
    status: str
    seconds: float


class Stages:
    """Runs the stages of one command (see the module docstring).

    Args:
        time_limit: Seconds for the whole command, counted from construction; ``None``
            for no limit.
        checkpoint: Folder of the per-stage files (from :func:`checkpoint_dir`), or
            ``None``.
        identity: Describes the operator and data every stage file must match (e.g.
            :func:`hessian_eigenthings.algorithms.checkpoint.operator_identity`); called
            once, on the first stage that needs it.
        device: Device of the collectives under ``torchrun``.
        write: Whether this process writes the result files (rank 0).
    """

    def __init__(
        self,
        *,
        time_limit: float | None,
        checkpoint: Path | None,
        identity: Callable[[], dict[str, Any]],
        device: torch.device,
        write: bool = True,
    ) -> None:
        self.start = time.perf_counter()
        self.time_limit = time_limit
        self.checkpoint = checkpoint
        self.device = device
        self.write = write
        self.timings: dict[str, float] = {}
        self.stages: list[Stage] = []
        self._identity_fn = identity
        self._identity: dict[str, Any] | None = None

    @property
    def stopped(self) -> bool:
        """Whether the time limit stopped a stage (later stages do not start)."""
        return any(s.status in ("time_limit", "not_started") for s in self.stages)

    def remaining(self) -> float | None:
        """Seconds left of ``--time-limit`` (rank 0's clock), ``None`` without a limit."""
        if self.time_limit is None:
            return None
        left = self.time_limit - (time.perf_counter() - self.start)
        return _rank0_value(left, self.device)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall-clock time of a step that is not a stage (loading, figures)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _key(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        if self._identity is None:
            self._identity = self._identity_fn()
        return {"format": _FORMAT, "stage": name, "operator": self._identity, "config": config}

    def _load(self, path: Path, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            found, result = stored["key"], stored["result"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BadInput(
                f"--checkpoint: {str(path)!r} is unreadable ({err}); delete it to compute the "
                f"{name} stage again"
            ) from err
        problems = _diff(_jsonable(key), found)
        if problems:
            raise BadInput(
                f"--checkpoint: {str(path)!r} holds a finished {name} stage of another run:\n"
                + "\n".join(problems)
                + "\nUse another --checkpoint folder, or delete the file to compute it again."
            )
        return dict(result)

    def _store(self, path: Path, key: dict[str, Any], result: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        text = json.dumps({"key": _jsonable(key), "result": result}, allow_nan=True)
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def run(
        self,
        name: str,
        compute: Callable[..., R],
        *,
        config: dict[str, Any],
        to_dict: Callable[[R], dict[str, Any]],
        from_dict: Callable[[dict[str, Any]], R],
    ) -> R | None:
        """Run (or reuse) one stage.

        Args:
            name: Stage name (also the name of its files).
            compute: ``compute(checkpoint=..., time_limit=...) -> result``: the library
                call with those two keyword arguments filled in.
            config: The stage's arguments that change its numbers (stored with the
                result; a rerun with other values is refused).
            to_dict: Serialises a finished result for reuse.
            from_dict: Restores it.

        Returns:
            The result (partial if ``result.stop_reason == "time_limit"``), or ``None``
            when the time limit passed before the stage could start.

        Raises:
            BadInput: A stage file belongs to another run, or is unreadable / corrupt.
        """
        t0 = time.perf_counter()
        done = None if self.checkpoint is None else self.checkpoint / f"{name}.result.json"
        key = None if done is None else self._key(name, config)
        if done is not None and key is not None:
            stored = self._load(done, name, key)
            if stored is not None:
                self.stages.append(Stage(name, "reused", time.perf_counter() - t0))
                self.timings[name] = time.perf_counter() - t0
                return from_dict(stored)
        left = self.remaining()
        if self.stopped or (left is not None and left <= 0.0):
            self.stages.append(Stage(name, "not_started", 0.0))
            return None
        ckpt = None if self.checkpoint is None else self.checkpoint / f"{name}.ckpt"
        try:
            result = compute(checkpoint=ckpt, time_limit=left)
        except (CheckpointMismatchError, CorruptCheckpointError) as err:
            raise BadInput(f"--checkpoint: {err}") from err
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        if getattr(result, "stop_reason", "") == "time_limit":
            self.stages.append(Stage(name, "time_limit", seconds))
            return result
        self.stages.append(Stage(name, "computed", seconds))
        if done is not None and key is not None and self.write:
            self._store(done, key, to_dict(result))
        return result


def _jsonable(value: Any) -> Any:
    """Normalise a key to what JSON gives back (tuples -> lists, dtypes -> strings)."""
    return json.loads(json.dumps(value, default=str))
