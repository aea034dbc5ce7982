"""hessian-eigenthings: matrix-free curvature of neural networks in PyTorch.

Top-k eigenpairs, trace and spectral density of the Hessian, Generalized Gauss-Newton
and Fisher of a model on a dataset, without ever forming the matrix.
"""

from hessian_eigenthings._deprecation import renamed_attributes

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
    linear_ce_ggn_product,
    loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
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
    OutputCurvatureOperator,
)

# Distributed operators (torch.distributed: DDP data shards, FSDP2 parameter shards)
from hessian_eigenthings.operators.distributed import (
    DDPCurvatureOperator,
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    ShardedHessianOperator,
)

# Parameter selection and flat-vector helpers
from hessian_eigenthings.param_utils import (
    ParamFilter,
    ParamLayout,
    flatten,
    match_names,
    match_regex,
    select_params,
    unflatten,
)

__version__ = "2.0.0.dev0"

# Renamed names keep resolving, with a DeprecationWarning naming the replacement (classes
# are looked up here, so they stay out of __all__ and star imports do not warn).
__getattr__ = renamed_attributes(
    __name__, {"DDPOperatorMixin": ("DDPCurvatureOperator", lambda: DDPCurvatureOperator)}
)

__all__ = [
    # operators
    "CurvatureOperator",
    "DataCurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LambdaOperator",
    "MCFisherOperator",
    "OutputCurvatureOperator",
    # distributed operators
    "DDPCurvatureOperator",
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
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
    "hf_lm_shifted_ce",  # deprecated alias of hf_lm_loss_of_output (warns when called)
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
    "__version__",
]
