"""Loss functions, losses of the model output with closed-form HVPs, and fused kernels."""

from hessian_eigenthings.loss_fns.base import LossOfOutput, loss_of_output

__all__ = ["LossOfOutput", "loss_of_output"]
