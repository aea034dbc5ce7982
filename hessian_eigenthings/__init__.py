"""hessian-eigenthings: matrix-free curvature of neural networks in PyTorch.

Top-k eigenpairs, trace and spectral density of the Hessian, Generalized Gauss-Newton
and Fisher of a model on a dataset, without ever forming the matrix.
"""

# Eigensolvers (Lanczos, power iteration, stochastic power iteration) and their results;
# stochastic estimators with error bars, and Lanczos tridiagonalisation (SLQ)
from hessian_eigenthings.algorithms import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    DiagonalResult,
    EigenResult,
    LanczosProgress,
    LanczosTridiag,
    NonFiniteError,
    SpectralDensityResult,
    StochasticEigenResult,
    TraceResult,
    deflated_power_iteration,
    diagonal,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_tridiagonal,
    power_iteration_one,
    spectral_density,
    stochastic_power_iteration,
    trace,
    xtrace,
)

# Vector backends (single device, replicated over ranks, sharded over ranks)
from hessian_eigenthings.backends import (
    LinAlgBackend,
    ReplicatedBackend,
    ShardedBackend,
    SingleDeviceBackend,
)

# Losses of the model output with closed-form HVPs: standard, HuggingFace, TransformerLens,
# and the fused cross-entropy HVP kernels
from hessian_eigenthings.loss_fns import (
    LossOfOutput,
    cross_entropy_loss_of_output,
    fused_ce_hvp,
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_lm_shifted_ce,
    hf_seq2seq_forward,
    hf_seq2seq_loss,
    hf_seq2seq_loss_of_output,
    hf_seq2seq_token_losses,
    linear_ce_ggn_product,
    loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
)

# Operators: the matrices, known through matrix-vector products
from hessian_eigenthings.operators import (
    CurvatureOperator,
    DataCurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
)

# Distributed operators (torch.distributed: DDP data shards, FSDP2 parameter shards)
from hessian_eigenthings.operators.distributed import (
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    DDPMCFisherOperator,
    DDPOperatorMixin,
    ShardedHessianOperator,
)

# Parameter selection and flat-vector helpers
from hessian_eigenthings.param_utils import (
    ParamFilter,
    ParamLayout,
    flatten,
    match_names,
    match_regex,
    params_to_vector,
    select_parameters,
    select_params,
    unflatten,
    vector_to_params,
)

__version__ = "2.0.0.dev0"

__all__ = [
    # operators
    "CurvatureOperator",
    "DataCurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LambdaOperator",
    "MCFisherOperator",
    # distributed operators
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "DDPOperatorMixin",
    "ShardedHessianOperator",
    # eigensolvers and their results
    "EigenResult",
    "LanczosProgress",
    "StochasticEigenResult",
    "deflated_power_iteration",
    "lanczos",
    "power_iteration_one",
    "stochastic_power_iteration",
    # stochastic estimators and Lanczos tridiagonalisation
    "DiagonalResult",
    "LanczosTridiag",
    "SpectralDensityResult",
    "TraceResult",
    "diagonal",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos_tridiagonal",
    "spectral_density",
    "trace",
    "xtrace",
    # long runs: non-finite products, checkpoints
    "CheckpointError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "NonFiniteError",
    # losses of the output with closed-form HVPs, LM losses, fused cross-entropy HVP
    "LossOfOutput",
    "cross_entropy_loss_of_output",
    "loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "fused_ce_hvp",
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_shifted_ce",
    "hf_seq2seq_forward",
    "hf_seq2seq_loss",
    "hf_seq2seq_loss_of_output",
    "hf_seq2seq_token_losses",
    "linear_ce_ggn_product",
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
    # backends
    "LinAlgBackend",
    "ReplicatedBackend",
    "ShardedBackend",
    "SingleDeviceBackend",
    # parameters
    "ParamFilter",
    "ParamLayout",
    "flatten",
    "match_names",
    "match_regex",
    "select_params",
    "unflatten",
    # 1.0.0a5 names (deprecated aliases; they warn and name the replacement)
    "params_to_vector",
    "select_parameters",
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
    "vector_to_params",
    "__version__",
]
