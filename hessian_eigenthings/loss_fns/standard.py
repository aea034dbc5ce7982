r"""Standard losses of the model output (cross-entropy, MSE) with closed-form Hessians.

Each factory returns a :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput`: a
callable ``(output, batch) -> scalar`` that also carries

* ``.hvp(output, batch, u)``: the exact Hessian of the loss with respect to ``output``
  applied to ``u`` (no autograd, no double backward), which the GGN operator needs;
* ``.batch_weight(batch)``: how much the batch counts in the dataset mean (non-ignored
  targets for cross-entropy, elements for MSE), so data operators weight ragged
  batches and token losses exactly.

Cross-entropy Hessian. For logits ``z`` of one row, ``p = softmax(z)`` and any target
distribution ``a`` (one-hot, smoothed, or probabilities, possibly class-weighted),

.. math::

    \ell(z) = -\sum_c a_c \log p_c, \qquad
    \nabla^2_z \ell = \Big(\sum_c a_c\Big) \big(\operatorname{diag}(p) - p p^\top\big),

because ``-log p_c = -z_c + logsumexp(z)`` and the Hessian of ``logsumexp`` is
``diag(p) - p p^T``. Hence ``H u = s (p \odot u - p \langle p, u \rangle)`` per row,
with the row scale ``s`` given by the reduction (see
:func:`cross_entropy_loss_of_output`).

Helpers :func:`supervised_loss` and :func:`supervised_forward` adapt ``(x, y)`` batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessian_eigenthings._compat import deprecated
from hessian_eigenthings.loss_fns.base import LOSS_FN, LOSS_OF_OUTPUT, LossOfOutput, factory_of
from hessian_eigenthings.loss_fns.single_sample import SingleSampleLoss

__all__ = [
    "TargetSpec",
    "cross_entropy_loss_of_output",
    "get_target",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    # 1.0.0a5 names (deprecated aliases)
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
]

TargetSpec = int | str | Callable[[Any], torch.Tensor] | None
"""Where the target lives in a batch: an index, a mapping key, a callable, or ``None``."""

_REDUCTIONS = ("mean", "sum")


def get_target(batch: Any, target: TargetSpec = None) -> torch.Tensor:
    """Extract the target tensor from ``batch``.

    Args:
        batch: The batch as the dataloader yields it.
        target: ``None`` (default): ``batch[1]`` for ``(x, y)`` tuples/lists, or
            ``batch["labels"]`` for mappings. An ``int``: ``batch[target]``. A ``str``:
            ``batch[target]`` of a mapping. A callable: ``target(batch)``.

    Raises:
        ValueError: The default rule does not apply to this batch or the key is missing.
        TypeError: The result is not a tensor.
    """
    if callable(target):
        found = target(batch)
    elif isinstance(target, (int, str)):
        try:
            found = batch[target]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"Cannot take target {target!r} from a batch of type {type(batch).__name__}: "
                f"{err}. Pass target=<index>, target='<key>' or target=lambda batch: ..."
            ) from err
    elif isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                f"The batch is a mapping with keys {sorted(map(str, batch))} and no 'labels'; "
                "pass target='<key>' (or a callable batch -> target) to the loss factory."
            )
        found = batch["labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = batch[1]
    else:
        raise ValueError(
            f"Cannot find the target in a batch of type {type(batch).__name__}: the default "
            "is batch[1] for (x, y) tuples or batch['labels'] for dicts. Pass target=<index>, "
            "target='<key>' or target=lambda batch: ... to the loss factory."
        )
    if not isinstance(found, torch.Tensor):
        raise TypeError(f"The target must be a torch.Tensor, got {type(found).__name__}.")
    return found


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        hint = (
            " Per-sample losses (reduction='none') belong to EmpiricalFisherOperator's "
            "loss_fn, not to a loss of output."
            if reduction == "none"
            else ""
        )
        raise ValueError(f"Unknown reduction {reduction!r}; expected one of {_REDUCTIONS}.{hint}")


def _weight_dtype(device: torch.device) -> torch.dtype:
    """Float64 for weight sums, except on devices without float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@factory_of(LOSS_OF_OUTPUT)
def cross_entropy_loss_of_output(
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    target: TargetSpec = None,
) -> LossOfOutput:
    r"""Cross-entropy of logits, exactly as :func:`torch.nn.functional.cross_entropy`.

    The returned loss computes ``F.cross_entropy(output, y, weight=weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)``
    with ``y = get_target(batch, target)``: class dimension 1 for ``(N, C, d1, ...)``
    logits (dimension 0 for unbatched ``(C,)``), integer class targets with
    ``ignore_index``, or floating class-probability targets of the logits' shape.

    Hessian with respect to the logits (exact, closed form). Per row ``i`` with
    ``p_i = softmax(z_i)``, ``H_i u_i = s_i (p_i \odot u_i - p_i \langle p_i, u_i\rangle)``
    where, with ``\varepsilon`` the label smoothing, ``C`` the number of classes and
    ``w`` the class weights (all ones if ``weight is None``):

    * class targets: ``s_i = m_i ((1-\varepsilon) w_{y_i} + \tfrac{\varepsilon}{C}
      \sum_c w_c) / D`` with ``m_i = [y_i \neq \text{ignore\_index}]`` and
      ``D = \sum_j m_j w_{y_j}`` (the number of non-ignored targets when unweighted);
    * probability targets ``t_i``: ``s_i = ((1-\varepsilon)\sum_c w_c t_{ic} +
      \tfrac{\varepsilon}{C}\sum_c w_c) / D`` with ``D`` the number of rows;
    * ``reduction="sum"``: ``D = 1``.

    Without weights or smoothing this is the textbook ``H u = (p u - p <p,u>) / n_valid``.

    Batch weight (``.batch_weight(batch)``): ``D``, a 0-d tensor computed from the
    targets (int64 counts, or float64 sums of class weights), never in the logits' dtype
    and without a host sync. Data operators weight each batch by it, so the operator is
    the curvature of the mean over *all* non-ignored targets of the dataset (the
    class-weighted mean when ``weight`` is given). With ``reduction="sum"`` every batch
    weighs 1: the operator is the mean over batches of each batch's summed loss.

    A batch whose targets are all ignored has loss 0 and ``H = 0`` (PyTorch returns NaN
    for that empty mean; here it contributes nothing instead).

    No call synchronises with the device: nothing is read back to the host, constants are
    device-side fills, and the class weights are copied to a device (and dtype) once, at
    first use, then reused. They are a snapshot taken when the loss is built: changing
    ``weight`` in place afterwards does not change the loss.

    Args:
        ignore_index: Class target that is ignored (class-index targets only).
        reduction: ``"mean"`` or ``"sum"``.
        label_smoothing: ``\varepsilon`` in ``[0, 1]``.
        weight: Class weights of shape ``(C,)``, or ``None`` (copied at construction).
        target: Where the target is in the batch (see :func:`get_target`).

    Returns:
        A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput` with ``.hvp`` and
        ``.batch_weight``.

    Example:
        >>> loss = cross_entropy_loss_of_output(ignore_index=-100)
        >>> z, y = torch.randn(4, 3), torch.tensor([0, 2, -100, 1])
        >>> float(loss(z, (None, y)) - F.cross_entropy(z, y)) == 0.0
        True
    """
    _check_reduction(reduction)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}.")
    eps = float(label_smoothing)
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ValueError(f"weight must be a 1-D tensor of class weights (C,), got {got}.")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}.")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}.")
    host_weight = None if weight is None else weight.detach().clone()
    weights_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def weight_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The class weights on ``device`` in ``dtype``, copied once and then reused."""
        if host_weight is None:
            return None
        key = (device, dtype)
        if key not in weights_on:
            weights_on[key] = host_weight.to(device=device, dtype=dtype)
        return weights_on[key]

    def class_dim(z: torch.Tensor) -> int:
        return 0 if z.dim() == 1 else 1

    def parts(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row scales ``s_i * D`` (shape of the rows) and ``D`` (0-d), in float64/32."""
        cd = class_dim(z)
        num_classes = z.shape[cd]
        wdt = _weight_dtype(z.device)
        w = weight_on(z.device, wdt)
        # sum_c w_c: a Python number without weights, so no device constant is made
        w_total: torch.Tensor | float = float(num_classes) if w is None else w.sum()
        if y.is_floating_point():
            if y.shape != z.shape:
                raise ValueError(
                    f"Probability targets must have the logits' shape {tuple(z.shape)}, got "
                    f"{tuple(y.shape)}."
                )
            yt = y.to(wdt)
            if w is not None:
                shape = [1] * z.dim()
                shape[cd] = num_classes
                yt = yt * w.view(shape)
            row = (1.0 - eps) * yt.sum(cd) + (eps / num_classes) * w_total
            rows = float(row.numel()) if reduction == "mean" else 1.0
            return row, torch.full((), rows, dtype=wdt, device=z.device)
        expected = z.shape[:cd] + z.shape[cd + 1 :]
        if y.shape != expected:
            raise ValueError(
                f"Class-index targets for logits of shape {tuple(z.shape)} (class dim {cd}) "
                f"must have shape {tuple(expected)}, got {tuple(y.shape)}."
            )
        valid = y != ignore_index
        if w is None:
            row = valid.to(wdt)
            count = row.sum()
        else:
            wy = w[y.masked_fill(~valid, 0)] * valid
            row = (1.0 - eps) * wy + (eps / num_classes) * w_total * valid
            count = wy.sum()
        denom = count if reduction == "mean" else torch.ones((), dtype=wdt, device=z.device)
        return row, denom

    def fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
        y = get_target(batch, target)
        total = F.cross_entropy(
            output,
            y,
            weight=weight_on(output.device, output.dtype),
            ignore_index=ignore_index,
            reduction="sum",
            label_smoothing=eps,
        )
        if reduction == "sum":
            return total
        if y.is_floating_point():
            cd = class_dim(output)
            return total / (output.numel() // output.shape[cd])
        valid = y != ignore_index
        w = weight_on(output.device, _weight_dtype(output.device))
        denom = valid.sum() if w is None else (w[y.masked_fill(~valid, 0)] * valid).sum()
        # an all-ignored batch has total == 0: return 0 rather than PyTorch's 0/0 = NaN
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return total / safe.to(total.dtype)

    def hvp(output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        y = get_target(batch, target)
        cd = class_dim(output)
        row, denom = parts(output, y)
        cdt = torch.promote_types(output.dtype, torch.float32)
        # memory: p and hu are the only output-sized allocations (plus a float32 copy of u
        # for reduced-precision logits); <p, u> per row is a batched matmul when the
        # class dim is last, so no p * u temporary is formed
        p = torch.softmax(output, dim=cd, dtype=cdt)
        uc = u.to(cdt)
        if cd == output.dim() - 1:
            dot = (p.unsqueeze(-2) @ uc.unsqueeze(-1)).squeeze(-1)
        else:
            dot = (p * uc).sum(cd, keepdim=True)
        hu = uc.sub_(dot) if uc is not u else uc - dot
        del dot
        hu.mul_(p)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        scale = (row / safe).to(cdt).unsqueeze(cd)
        hu.mul_(scale)
        return hu.to(u.dtype)

    def batch_weight(batch: Any) -> torch.Tensor | int:
        if reduction == "sum":
            return 1
        y = get_target(batch, target)
        if y.is_floating_point():
            # probability targets of shape (N, C, d1, ...) or (C,): one row per position
            return 1 if y.dim() == 1 else y.numel() // y.shape[1]
        valid = y != ignore_index
        w = weight_on(y.device, _weight_dtype(y.device))
        return valid.sum() if w is None else (w[y.masked_fill(~valid, 0)] * valid).sum()

    return LossOfOutput(fn, hvp, batch_weight=batch_weight, name="cross_entropy")


@factory_of(LOSS_OF_OUTPUT)
def mse_loss_of_output(reduction: str = "mean", target: TargetSpec = None) -> LossOfOutput:
    r"""Mean squared error, as :func:`torch.nn.functional.mse_loss`, with its Hessian.

    ``loss = mean((output - y)**2)`` over all elements (``reduction="mean"``) or the sum
    (``reduction="sum"``), ``y = get_target(batch, target)``. The Hessian with respect to
    ``output`` is ``2 I / numel`` (mean) or ``2 I`` (sum), so ``H u = 2 u / numel``.

    ``output`` and ``y`` must have the same shape: PyTorch would broadcast e.g. ``(N, 1)``
    against ``(N,)`` to ``(N, N)`` with only a warning, which is almost always a bug.

    Batch weight: the number of elements of the target (``reduction="mean"``), so the
    operator is the curvature of the mean squared error over every element of the
    dataset. When every sample has the same number of elements this is proportional to
    the number of samples (weighting by samples gives the same operator); with ragged
    per-sample sizes (sequences) it is the exact element-level mean. ``reduction="sum"``:
    every batch weighs 1.

    Args:
        reduction: ``"mean"`` or ``"sum"``.
        target: Where the target is in the batch (see :func:`get_target`).

    Returns:
        A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput` with ``.hvp`` and
        ``.batch_weight``.
    """
    _check_reduction(reduction)

    def checked_target(output: torch.Tensor, batch: Any) -> torch.Tensor:
        y = get_target(batch, target)
        if y.shape != output.shape:
            raise ValueError(
                f"mse_loss_of_output: output shape {tuple(output.shape)} != target shape "
                f"{tuple(y.shape)}. Reshape one of them (e.g. y.view_as(output)); "
                "broadcasting them would silently average over all pairs."
            )
        return y

    def fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.mse_loss(output, checked_target(output, batch), reduction=reduction)

    def hvp(output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        checked_target(output, batch)
        return u * (2.0 / output.numel() if reduction == "mean" else 2.0)

    def batch_weight(batch: Any) -> int:
        return get_target(batch, target).numel() if reduction == "mean" else 1

    return LossOfOutput(fn, hvp, batch_weight=batch_weight, name="mse")


def supervised_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(batch[0])``: the forward function for ``(x, y)`` batches."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 1:
        raise ValueError(
            f"supervised_forward expects an (x, y) tuple or list batch, got "
            f"{type(batch).__name__}. Write your own forward_fn(model, batch) for other batches."
        )
    return model(batch[0])


def _criterion_batch_weight(criterion: Any) -> Any:
    """The exact batch weight of a ``torch.nn`` criterion with mean reduction, if known."""
    if isinstance(criterion, LossOfOutput):
        return getattr(criterion, "batch_weight", None)
    if isinstance(criterion, nn.CrossEntropyLoss) and criterion.reduction in _REDUCTIONS:
        return cross_entropy_loss_of_output(
            ignore_index=criterion.ignore_index,
            reduction=criterion.reduction,
            label_smoothing=criterion.label_smoothing,
            weight=criterion.weight,
        ).batch_weight
    if isinstance(criterion, nn.MSELoss) and criterion.reduction in _REDUCTIONS:
        return mse_loss_of_output(criterion.reduction).batch_weight
    return None


@factory_of(LOSS_FN)
def supervised_loss(criterion: Callable[..., torch.Tensor]) -> Callable[[nn.Module, Any], Any]:
    """Turn a criterion into ``loss_fn(model, batch)`` for ``(x, y)`` batches.

    ``supervised_loss(nn.CrossEntropyLoss())(model, (x, y)) == criterion(model(x), y)``.
    A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput` criterion is called as
    ``criterion(model(x), batch)``. Per-sample criteria (``reduction="none"``) give the
    per-sample losses :class:`~hessian_eigenthings.operators.fisher.EmpiricalFisherOperator`
    needs.

    The returned function carries ``batch_weight`` when the criterion's weighting is
    known (``nn.CrossEntropyLoss`` / ``nn.MSELoss`` with mean or sum reduction, or a loss
    of output), so that e.g. ``HessianOperator`` weights batches by non-ignored targets.

    Args:
        criterion: ``criterion(output, target)`` (a ``torch.nn`` loss module or function)
            or a loss of output ``criterion(output, batch)``.

    Returns:
        ``loss_fn(model, batch) -> loss``.
    """
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}.")
    takes_batch = isinstance(criterion, LossOfOutput)

    def loss_fn(model: nn.Module, batch: Any) -> Any:
        output = supervised_forward(model, batch)
        if takes_batch:
            return criterion(output, batch)
        if len(batch) < 2:
            raise ValueError("supervised_loss expects (x, y) batches; got a batch of length 1.")
        return criterion(output, batch[1])

    bw = _criterion_batch_weight(criterion)
    if bw is not None:
        loss_fn.batch_weight = bw  # type: ignore[attr-defined]
    loss_fn.__name__ = (
        f"supervised_loss({getattr(criterion, '__name__', type(criterion).__name__)})"
    )
    return loss_fn


# -- 1.0.0a5 names (deprecated aliases) ------------------------------------------------------
def _closed_form_of(criterion: Any) -> LossOfOutput | None:
    """The closed-form loss of output equal to a known ``torch.nn`` criterion, if any."""
    if isinstance(criterion, LossOfOutput):
        return criterion
    if criterion is F.cross_entropy:
        return cross_entropy_loss_of_output()
    if criterion is F.mse_loss:
        return mse_loss_of_output()
    if isinstance(criterion, nn.CrossEntropyLoss):
        return cross_entropy_loss_of_output(
            ignore_index=criterion.ignore_index,
            reduction=criterion.reduction,
            label_smoothing=criterion.label_smoothing,
            weight=criterion.weight,
        )
    if isinstance(criterion, nn.MSELoss):
        return mse_loss_of_output(criterion.reduction)
    return None


def _autograd_output_hvp(
    fn: Callable[[torch.Tensor, Any], torch.Tensor],
) -> Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]:
    """``H_loss u`` of any loss of output by double backward through the loss only."""

    def hvp(output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            o = output.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(o, batch), o, create_graph=True)
            if not g.requires_grad:  # the loss is linear in the output
                return torch.zeros_like(u)
            (hu,) = torch.autograd.grad(g, o, grad_outputs=u)
        return hu

    return hvp


def supervised_loss_of_output(criterion: Callable[..., torch.Tensor]) -> LossOfOutput:
    """``(output, batch) -> criterion(output, batch[1])`` for ``(x, y)`` batches (1.0.0a5).

    Deprecated: use :func:`cross_entropy_loss_of_output` / :func:`mse_loss_of_output`.
    ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` modules (and ``F.cross_entropy`` /
    ``F.mse_loss``) are translated to them, so the GGN gets their closed-form Hessian and
    their exact batch weights (non-ignored targets, elements). Any other criterion gets an
    ``.hvp`` by double backward through the loss alone (exact; what 1.0.0a5 computed),
    and batches weighted by their number of samples.
    """
    deprecated(
        "supervised_loss_of_output(criterion)",
        "cross_entropy_loss_of_output() or mse_loss_of_output() (closed-form loss Hessian), "
        "or loss_of_output(fn, hvp=...) for another criterion",
    )
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}.")
    known = _closed_form_of(criterion)
    if known is not None:
        return known

    def fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
        return criterion(output, get_target(batch))

    name = getattr(criterion, "__name__", type(criterion).__name__)
    return LossOfOutput(fn, _autograd_output_hvp(fn), name=f"supervised_loss_of_output({name})")


def supervised_per_sample_loss(criterion: Callable[..., torch.Tensor]) -> SingleSampleLoss:
    """The loss of one un-batched ``(x, y)`` sample (1.0.0a5's empirical-Fisher interface).

    ``fn(model, (x, y)) = criterion(model(x[None])[0], y)``. Passed to
    :class:`~hessian_eigenthings.operators.fisher.EmpiricalFisherOperator`, it is evaluated
    on every sample of a batch at once by ``torch.func.vmap``.

    Deprecated: give the operator the batch's per-sample losses directly,
    ``supervised_loss(nn.CrossEntropyLoss(reduction="none"))``.
    """
    deprecated(
        "supervised_per_sample_loss(criterion)",
        "supervised_loss(<criterion with reduction='none'>), e.g. "
        "supervised_loss(nn.CrossEntropyLoss(reduction='none')), as EmpiricalFisherOperator's "
        "loss_fn",
    )
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}.")

    def one_sample(model: nn.Module, sample: Any) -> torch.Tensor:
        x, y = sample[0], sample[1]
        return criterion(model(x.unsqueeze(0)).squeeze(0), y)

    one_sample.__name__ = getattr(criterion, "__name__", type(criterion).__name__)
    return SingleSampleLoss(one_sample)
