"""Fused cross-entropy Hessian-vector products (one backend per module).

* :mod:`.reference`: eager float32/float64 reference, ``ce_hvp_eager``.
* :mod:`.compiled`: ``torch.compile`` (fullgraph) version, ``ce_hvp_compiled``.
* :mod:`.triton_kernel` (+ :mod:`._triton_rows`): hand-written two-pass Triton kernel,
  ``ce_hvp_triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``).
* :mod:`.dispatch`: ``fused_ce_hvp(..., backend="auto"|"eager"|"compile"|"triton")``.
* :mod:`.linear`: ``linear_ce_ggn_product``, the GGN product of a linear LM head chunked
  over tokens so the ``(N, V)`` logits are never materialised.
* :mod:`.linear_hvp`: the gradient, per-token slopes and Hessian-vector product of the
  same head and loss, chunked alike (the Hessian and empirical Fisher products).
"""

from hessian_eigenthings.loss_fns.fused_ce.compiled import ce_hvp_compiled
from hessian_eigenthings.loss_fns.fused_ce.dispatch import BACKENDS, fused_ce_hvp, resolve_backend
from hessian_eigenthings.loss_fns.fused_ce.linear import LinearCEGGNProduct, linear_ce_ggn_product
from hessian_eigenthings.loss_fns.fused_ce.linear_hvp import (
    HeadDerivative,
    linear_ce_grad,
    linear_ce_hvp,
    linear_ce_token_slopes,
)
from hessian_eigenthings.loss_fns.fused_ce.reference import ce_hvp_eager
from hessian_eigenthings.loss_fns.fused_ce.triton_kernel import ce_hvp_triton

__all__ = [
    # the dispatcher
    "BACKENDS",
    "fused_ce_hvp",
    "resolve_backend",
    # backends
    "ce_hvp_compiled",
    "ce_hvp_eager",
    "ce_hvp_triton",
    # chunked derivatives of a linear LM head with cross entropy
    "HeadDerivative",
    "LinearCEGGNProduct",
    "linear_ce_ggn_product",
    "linear_ce_grad",
    "linear_ce_hvp",
    "linear_ce_token_slopes",
]
