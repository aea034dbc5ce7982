"""Wall-clock budget of an algorithm call (``time_limit=`` seconds).

Under ``torch.distributed`` the decisions that depend on the clock (stop now, write a
checkpoint now) are taken by rank 0 and broadcast (:func:`agree_flag`), so that every rank
stops or writes at the same point of the run.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["Deadline", "agree_flag"]


def agree_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one small broadcast); ``flag`` without a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    from hessian_eigenthings.backends.distributed import collective_device

    t = torch.tensor([int(flag)], dtype=torch.int64, device=collective_device(None, device))
    dist.broadcast(t, src=0)
    return bool(t.item())


class Deadline:
    """Tells an algorithm when its ``time_limit`` has passed.

    Checked only where the algorithm's state is complete (a convergence check, a probe
    block, a run), so a call can overrun its limit by up to one such interval.

    Args:
        time_limit: Seconds from construction, or ``None`` for no limit.

    Raises:
        ValueError: ``time_limit`` is not a positive number.
    """

    def __init__(self, time_limit: float | None) -> None:
        if time_limit is not None and (
            not isinstance(time_limit, (int, float))
            or isinstance(time_limit, bool)
            or not time_limit > 0
            or math.isnan(time_limit)
        ):
            raise ValueError(
                f"time_limit must be a positive number of seconds, got {time_limit!r}."
            )
        self.time_limit = time_limit
        self._end = None if time_limit is None else time.monotonic() + float(time_limit)

    def expired(self, device: torch.device) -> bool:
        """Whether the limit has passed (rank 0's clock decides under torchrun)."""
        if self._end is None:
            return False
        return agree_flag(time.monotonic() >= self._end, device)
