"""Loss functions, losses of the model output with closed-form HVPs, and fused kernels."""

from hessian_eigenthings.loss_fns.base import LossOfOutput, loss_of_output
from hessian_eigenthings.loss_fns.fused_ce import (
    fused_ce_hvp,
    linear_ce_ggn_product,
    linear_ce_grad,
    linear_ce_hvp,
    linear_ce_token_slopes,
)
from hessian_eigenthings.loss_fns.head_ce import HeadCrossEntropy
from hessian_eigenthings.loss_fns.huggingface import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_lm_per_sample_loss,
    hf_lm_shifted_ce,
    hf_token_count,
)
from hessian_eigenthings.loss_fns.huggingface_seq2seq import (
    hf_seq2seq_forward,
    hf_seq2seq_loss,
    hf_seq2seq_loss_of_output,
    hf_seq2seq_token_count,
    hf_seq2seq_token_losses,
)
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
)
from hessian_eigenthings.loss_fns.transformer_lens import (
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
    tlens_per_sample_loss,
    tlens_token_count,
)

__all__ = [
    "LossOfOutput",
    "loss_of_output",
    # standard losses of output (closed-form HVP) and (x, y) helpers
    "cross_entropy_loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    # HuggingFace causal LMs (next-token loss, token-count batch weights)
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_per_sample_loss",
    "hf_lm_shifted_ce",  # deprecated alias of hf_lm_loss_of_output (warns when called)
    "hf_token_count",
    # HuggingFace encoder-decoder LMs (labels not shifted, token-count batch weights)
    "hf_seq2seq_forward",
    "hf_seq2seq_loss",
    "hf_seq2seq_loss_of_output",
    "hf_seq2seq_token_count",
    "hf_seq2seq_token_losses",
    # TransformerLens HookedTransformer
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
    "tlens_per_sample_loss",
    "tlens_token_count",
    # 1.0.0a5 names (deprecated aliases)
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
    # fused cross-entropy HVP kernels and the chunked derivatives of a linear LM head
    "fused_ce_hvp",
    "linear_ce_ggn_product",
    "linear_ce_grad",
    "linear_ce_hvp",
    "linear_ce_token_slopes",
    # what an LM loss declares so that operators chunk the head (loss.head_ce)
    "HeadCrossEntropy",
]
