r"""Checkpoint files of long algorithm runs: atomic, self-describing, checksummed.

A run with ``checkpoint="run.ckpt"`` writes its complete state every
``checkpoint_every`` products and/or every ``checkpoint_seconds`` seconds; a later call
with the same arguments and the same path resumes from it and returns the same result,
bit for bit, as an uninterrupted run (the state holds every tensor the run reads later and
the random generator's state, and the run continues with the same floating-point
operations). A run that finishes deletes its checkpoint; a run stopped by ``time_limit``
writes and keeps it, so calling again continues it; a run that raises leaves it as last
written (the state before the failing product). The run driver
(:mod:`hessian_eigenthings.algorithms._run`) applies these rules to every algorithm.

File layout (format version 1)::

    b"HETCKPT1"                    8 bytes magic
    header length                  8 bytes, little-endian unsigned
    header                         UTF-8 JSON: format, algorithm, operator identity,
                                   configuration, num_matvecs, payload_bytes, payload_sha256
    payload                        torch.save of a dict of tensors/ints/floats/lists

Memory: a write serialises the state in host memory first (the payload's length and hash
go into the header), so it holds the state's CPU copy plus its serialised bytes; for a
Lanczos basis of ``(m + 2) n`` entries that is twice the basis in RAM during the write.

Writes are atomic: the file is written to a temporary file in the same directory,
flushed and fsync'ed, renamed over the old one with :func:`os.replace`, and the directory
is fsync'ed, so a kill at any instant leaves either the previous or the new checkpoint.
The location is tested before the first product (a file is created in the directory and
removed): an unwritable one raises :class:`CheckpointWriteError` at once, not at the first
write. A write that fails later (a full disk) raises :class:`CheckpointWriteError` naming
the checkpoint path, carrying the run's partial result.
Reading checks the magic, the lengths and the SHA-256 of the payload before anything is
used: a truncated or corrupt file raises :class:`CorruptCheckpointError`, never silently
restarts or resumes from garbage.

Identity: the header records the operator's class, size, dtype and device type; for data
operators (anything with ``named_params``) a SHA-256 of the selected parameters' names,
shapes, dtypes and bytes; and ``operator.fingerprint`` if the user set one (e.g. a
LambdaOperator built from a matrix: ``op.fingerprint = "A-v3"``). The data are not hashed.
The configuration is every argument that changes the numbers (``k``, ``which``, ``tol``,
``seed`` *as passed*, ``max_iter``, ``method``, ``num_matvecs``, ...); ``time_limit`` and the
checkpoint options are not part of it. A mismatch raises :class:`CheckpointMismatchError`
listing expected vs found.

Distributed runs: the processes of the operator's backend (a
:class:`~hessian_eigenthings.backends.ReplicatedBackend` over a process group) compute the
same state; the group's first process builds the state on the host and writes it, and
the group waits for the first process's word that each write succeeded (a broadcast);
on resume every process reads the same
file, so the path must be on a file system shared by the group. Only the first process
hashes the parameters (it checks them on resume and tells the others whether the file
matches). A backend without a group (e.g. a local operator on one rank of a larger job)
writes and reads alone, with no collective at all. Sharded vectors (a backend whose
``local_size(n) < n``) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
)
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = [
    "FORMAT_VERSION",
    "Checkpointer",
    "generator_state",
    "operator_identity",
    "restore_generator",
]

FORMAT_VERSION = 1
_MAGIC = b"HETCKPT1"
_LEN = struct.Struct("<Q")
# Default interval when a path is given without checkpoint_every / checkpoint_seconds.
_DEFAULT_SECONDS = 300.0


def _parameters_sha256(named_params: Any) -> str:
    h = hashlib.sha256()
    for name, p in named_params:
        t = p.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def operator_identity(operator: CurvatureOperator, *, parameters: bool = True) -> dict[str, Any]:
    """What a checkpoint records about the operator (see the module docstring).

    Args:
        operator: The operator.
        parameters: Include the SHA-256 of a data operator's selected parameters. Cost:
            one pass over their bytes (copied to the CPU parameter by parameter and
            hashed; about a second per GB).
    """
    ident: dict[str, Any] = {
        "class": type(operator).__qualname__,
        "size": int(operator.size),
        "dtype": str(operator.dtype),
        "device_type": operator.device.type,
    }
    named = getattr(operator, "named_params", None)
    if named is not None and parameters:
        ident["parameters_sha256"] = _parameters_sha256(named)
    fingerprint = getattr(operator, "fingerprint", None)
    if fingerprint is not None:
        ident["fingerprint"] = str(fingerprint)
    return ident


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact round trip, also for inf/nan
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(expected) | set(found)):
        e, f = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if e != f:
            lines.append(f"  {key}: this call has {e!r}, the checkpoint has {f!r}")
    return lines


class Checkpointer:
    """Writes and reads the checkpoint of one algorithm call.

    Args:
        path: Checkpoint file; its directory must exist.
        algorithm: Name of the algorithm (recorded and checked).
        operator: The operator (its identity is recorded and checked).
        backend: The vector backend: its first process writes, its group agrees (sharded
            backends are refused).
        config: Arguments that determine the result (recorded and checked).
        every: Write every this many products (at the next point where the algorithm's
            state is complete: a convergence check, a probe block, a run).
        seconds: Write when this many seconds passed since the last write. With
            neither ``every`` nor ``seconds``, every 300 seconds.

    Raises:
        ValueError: A missing directory, or a sharded backend.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        algorithm: str,
        operator: CurvatureOperator,
        backend: LinAlgBackend,
        config: dict[str, Any],
        every: int | None = None,
        seconds: float | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(
                f"The directory of checkpoint={str(self.path)!r} does not exist; create it first."
            )
        if backend.local_size(operator.size) != operator.size:
            raise ValueError(
                f"checkpoint= needs whole vectors on every process, but the backend {backend!r} "
                "shards them; checkpointing sharded runs is not supported (drop checkpoint=)."
            )
        self.every = every
        self.seconds = seconds if seconds is not None or every is not None else _DEFAULT_SECONDS
        self.algorithm = algorithm
        self.operator = operator
        self.backend = backend
        self.writer = backend.is_first_process()
        self.config = {key: _jsonable(v) for key, v in config.items()}
        self._identity: dict[str, Any] | None = None
        self._last_matvecs = 0
        self._last_time = time.monotonic()
        # Tested by the writing process now; raised by every process in load().
        self._unwritable = self._test_writable() if self.writer else None

    def _test_writable(self) -> CheckpointWriteError | None:
        """The error an unwritable location gives, found by creating a file there."""
        where = str(self.path)
        if self.path.is_dir():
            return CheckpointWriteError(
                f"checkpoint={where!r} is a directory; pass a file path inside it "
                f"(e.g. {str(self.path / 'run.ckpt')!r}).",
                path=where,
            )
        try:
            fd, probe = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            return CheckpointWriteError(
                f"checkpoint={where!r} cannot be written: creating a file in its directory "
                f"failed ({err.strerror or err}). Choose a writable location; no product has "
                "been made yet.",
                path=where,
            )
        return None

    @property
    def identity(self) -> dict[str, Any]:
        """The operator's full identity (hashed on first use, by the writing process only)."""
        if self._identity is None:
            self._identity = operator_identity(self.operator)
        return self._identity

    # -- reading --------------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` if the file does not exist.

        Every process reads the file; the first process also checks the parameters'
        hash, and its verdict is shared (one small broadcast under a group), so that
        either every process resumes or every process raises.

        Raises:
            CorruptCheckpointError: The file is truncated, corrupt or not a checkpoint.
            CheckpointMismatchError: It belongs to another algorithm, operator or
                configuration.
        """
        problem: CheckpointError | None = self._unwritable
        state = None
        if problem is None and self.path.exists():
            try:
                state = self._read()
            except CheckpointError as err:
                problem = err
        agreed = self.backend.agree(problem is None)
        if problem is not None:
            raise problem
        if not agreed:
            raise CheckpointMismatchError(
                f"The first process of the group refused the checkpoint file "
                f"{str(self.path)!r}: it cannot write there, or the file does not match this "
                "call (its error says which); fix the location or delete the file."
            )
        return state

    def _read(self) -> dict[str, Any]:
        raw = self.path.read_bytes()
        where = f"checkpoint file {str(self.path)!r}"
        fix = "Delete it to start the run over."
        if len(raw) < len(_MAGIC) + _LEN.size or raw[: len(_MAGIC)] != _MAGIC:
            raise CorruptCheckpointError(
                f"The {where} is not a hessian_eigenthings checkpoint (bad magic bytes or "
                f"shorter than a header: {len(raw)} bytes). {fix}"
            )
        (hlen,) = _LEN.unpack_from(raw, len(_MAGIC))
        start = len(_MAGIC) + _LEN.size
        try:
            header = json.loads(raw[start : start + hlen].decode("utf-8"))
            payload_len = int(header["payload_bytes"])
            digest = str(header["payload_sha256"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(
                f"The {where} has an unreadable header ({exc}); it is truncated or corrupt. {fix}"
            ) from exc
        payload = raw[start + hlen :]
        if len(payload) != payload_len:
            raise CorruptCheckpointError(
                f"The {where} is truncated: expected a payload of {payload_len} bytes, found "
                f"{len(payload)}. {fix}"
            )
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CorruptCheckpointError(
                f"The {where} is corrupt: the SHA-256 of its payload does not match its "
                f"header. {fix}"
            )
        if header.get("format") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"The {where} has format version {header.get('format')!r}; this library reads "
                f"version {FORMAT_VERSION}. {fix}"
            )
        problems = []
        if header.get("algorithm") != self.algorithm:
            problems.append(
                f"  algorithm: this call is {self.algorithm!r}, the checkpoint is from "
                f"{header.get('algorithm')!r}"
            )
        found = dict(header.get("operator", {}))
        if self.writer:
            mine = self.identity
        else:  # only the first process hashes the parameters
            mine = operator_identity(self.operator, parameters=False)
            found.pop("parameters_sha256", None)
        problems += [f"  operator.{line.strip()}" for line in _diff(mine, found)]
        problems += _diff(self.config, header.get("config", {}))
        if problems:
            raise CheckpointMismatchError(
                f"The {where} does not match this call:\n"
                + "\n".join(problems)
                + f"\nDelete {str(self.path)!r} to start over, or call with the operator and "
                "arguments it was written with."
            )
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"The {where} holds no state dict. {fix}")
        self._last_matvecs = int(header.get("num_matvecs", 0))
        self._last_time = time.monotonic()
        return state

    # -- writing --------------------------------------------------------------------------

    def due(self, num_matvecs: int) -> bool:
        """Whether the interval since the last write has passed (the first process decides)."""
        if self.every is not None and num_matvecs - self._last_matvecs >= self.every:
            return True
        if self.seconds is None:
            return False
        return self.backend.agree(time.monotonic() - self._last_time >= self.seconds)

    def save(self, num_matvecs: int, make_state: Callable[[], dict[str, Any]]) -> None:
        """Write ``make_state()`` atomically.

        Only the first process builds the state (the host copy of a basis or sketch) and
        writes it; the group then learns from it whether the write succeeded (this is
        the group's wait for the write).

        Raises:
            CheckpointWriteError: The write failed (on every process of the group).
        """
        failure: OSError | None = None
        if self.writer:
            try:
                self._write(num_matvecs, make_state)
            except OSError as err:
                failure = err
        if not self.backend.agree(failure is None):
            why = "" if failure is None else f" ({failure.strerror or failure})"
            raise CheckpointWriteError(
                f"Writing the checkpoint {str(self.path)!r} failed{why}; the previous "
                "checkpoint (if any) is intact. err.partial holds the result of the products "
                "made so far; free space or choose another location, then call again to "
                "resume from the previous checkpoint.",
                path=str(self.path),
            ) from failure
        self._last_matvecs = num_matvecs
        self._last_time = time.monotonic()

    def _write(self, num_matvecs: int, make_state: Callable[[], dict[str, Any]]) -> None:
        """The first process's atomic write (temporary file, fsync, rename, fsync)."""
        buf = io.BytesIO()
        torch.save(make_state(), buf)
        payload = buf.getvalue()
        header = {
            "format": FORMAT_VERSION,
            "algorithm": self.algorithm,
            "operator": self.identity,
            "config": self.config,
            "num_matvecs": int(num_matvecs),
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "torch": torch.__version__,
        }
        hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + _LEN.pack(len(hbytes)) + hbytes + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.path.parent)

    def maybe_save(self, num_matvecs: int, make_state: Callable[[], dict[str, Any]]) -> None:
        """:meth:`save` if :meth:`due`."""
        if self.due(num_matvecs):
            self.save(num_matvecs, make_state)

    def finish(self) -> None:
        """Delete the checkpoint of a completed run (first process; the group waits)."""
        if self.writer and self.path.exists():
            self.path.unlink()
        self.backend.barrier()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """The generator's state as a CPU byte tensor (what :func:`restore_generator` takes)."""
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    """Set ``gen`` to a state saved by :func:`generator_state`."""
    gen.set_state(state.to("cpu", torch.uint8))
