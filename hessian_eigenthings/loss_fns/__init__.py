"""Loss functions, losses of the model output with closed-form HVPs, and fused kernels."""

from hessian_eigenthings.loss_fns.base import LossOfOutput, loss_of_output
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
)

__all__ = [
    "LossOfOutput",
    "loss_of_output",
    # standard losses of output (closed-form HVP) and (x, y) helpers
    "cross_entropy_loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
]
