"""Refuse finite differences over parameters that share memory.

Finite-difference products move every selected parameter in place,
``p <- p + h u_p``. If two selected parameters overlap in memory (one is a view of the
other), writing one moves the other, so the step is not ``h u`` and the product is
silently wrong. Models that alias parameters this way exist: TransformerLens'
``TransformerBridge`` keeps GPT-2's fused ``qkv`` weight next to ``q``, ``k`` and ``v``
views of the same storage. The exact (autograd / forward-mode) paths treat every
parameter as an independent leaf and are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["check_disjoint_for_finite_differences", "overlapping_parameters"]


def _strided(t: torch.Tensor) -> bool:
    # tensor subclasses (DTensor shards) and sparse tensors are not checked
    return type(t) is torch.Tensor and t.numel() > 0 and t.layout is torch.strided


def _extent(t: torch.Tensor) -> int:
    """One past the largest storage element (in elements of ``t``) that ``t`` touches."""
    last = sum((int(n) - 1) * abs(int(s)) for n, s in zip(t.shape, t.stride()))
    return int(t.storage_offset()) + last + 1


def overlapping_parameters(
    named: Sequence[tuple[str, torch.Tensor]],
) -> list[tuple[str, str]]:
    """Pairs ``(earlier, later)`` of names whose tensors share at least one memory element.

    Tensors on different storages never overlap. Views of one storage are compared
    exactly, element by element, on a CPU map of the storage (so interleaved views such
    as the columns of one matrix are told apart); only such groups cost anything.
    """
    groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for name, p in named:
        t = p.detach()
        if _strided(t):
            groups.setdefault((t.untyped_storage().data_ptr(), t.device), []).append((name, t))
    pairs: list[tuple[str, str]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if len({t.element_size() for _, t in members}) > 1:  # mixed-dtype views: all suspect
            pairs += [(members[0][0], name) for name, _ in members[1:]]
            continue
        owner = torch.zeros(max(_extent(t) for _, t in members), dtype=torch.int32)
        for index, (name, t) in enumerate(members, start=1):
            view = owner.as_strided(t.shape, t.stride(), t.storage_offset())
            taken = view[view != 0]
            if taken.numel():
                pairs.append((members[int(taken[0]) - 1][0], name))
            view.fill_(index)
    return pairs


def check_disjoint_for_finite_differences(
    named: Sequence[tuple[str, nn.Parameter]], perturbed: Sequence[nn.Parameter], owner: str
) -> None:
    """Raise if parameters that a finite-difference product moves in place overlap.

    Args:
        named: The operator's ``(name, parameter)`` pairs.
        perturbed: The parameters its products perturb in place (empty: nothing to check).
        owner: Operator name for the message.

    Raises:
        ValueError: Two of them overlap; the message names them and the remedies.
    """
    if not perturbed:
        return
    ids = {id(p) for p in perturbed}
    pairs = overlapping_parameters([(n, p) for n, p in named if id(p) in ids])
    if pairs:
        shown = "; ".join(f"{a} and {b}" for a, b in pairs[:4])
        more = f" (and {len(pairs) - 4} more pairs)" if len(pairs) > 4 else ""
        raise ValueError(
            f"{owner} uses finite differences, which move the selected parameters in place, "
            f"but these share memory (one is a view of the other): {shown}{more}. A step "
            "along one would also move the other and the product would be wrong. Leave one "
            f"of each pair out with param_filter (e.g. ~match_names({pairs[0][1]!r})), or use "
            "the exact path (method='autograd' / jvp='forward')."
        )
