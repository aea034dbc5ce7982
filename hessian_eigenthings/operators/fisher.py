r"""Fisher information matrices in O(n) memory: empirical and Monte-Carlo.

Empirical Fisher (uncentred gradient covariance; Kunstner, Balles and Hennig, 2019,
"Limitations of the empirical Fisher approximation for natural gradient descent"):

.. math::

    F = \frac{1}{N} \sum_{i=1}^N g_i g_i^\top, \qquad g_i = \nabla_\theta \ell_i,

over all ``N`` samples of the dataset. A product never forms the ``B x n`` matrix of
per-sample gradients: with ``\ell = (\ell_1, ..., \ell_B)`` the per-sample losses of a
batch and ``J_\ell`` their Jacobian,
``\sum_i g_i g_i^\top v = J_\ell^\top (J_\ell v)``: one forward-mode pass gives all
``s_i = \langle g_i, v\rangle`` at once and one reverse pass of ``\sum_i s_i \ell_i``
gives ``\sum_i s_i g_i``.

Monte-Carlo Fisher (the true Fisher of the model's predictive distribution, estimated
with labels sampled from the model; Martens and Grosse, 2015, "Optimizing neural
networks with Kronecker-factored approximate curvature", section 5):

.. math::

    \hat F = \frac{1}{N} \sum_i J_i^\top \Big(\frac{1}{S} \sum_{s=1}^S r_{is} r_{is}^\top
    \Big) J_i, \qquad r_{is} = \nabla_f \big(-\log p(\tilde y_{is} \mid f_i)\big),
    \quad \tilde y_{is} \sim p(\cdot \mid f_i).

Because ``E[r r^T] = \nabla_f^2 (-\log p(y | f))`` for these exponential-family
likelihoods, ``E[\hat F]`` is exactly the GGN of the mean cross-entropy (categorical)
or of the mean of ``0.5 ||f - y||^2`` per sample (unit-variance Gaussian), with error
``O(1/\sqrt{S})``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hessian_eigenthings._compat import legacy_keywords
from hessian_eigenthings.backends.base import fresh_seed
from hessian_eigenthings.loss_fns.single_sample import legacy_fisher_loss
from hessian_eigenthings.operators._data import Piece
from hessian_eigenthings.operators._fingerprint import (
    pass_fingerprint,
    positions,
    sample_keys,
    uniforms,
)
from hessian_eigenthings.operators._user_fns import check_graph
from hessian_eigenthings.operators.data_operator import DataOptions
from hessian_eigenthings.operators.output_curvature import OutputCurvatureOperator, OutputFn

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EmpiricalFisherOperator", "MCFisherOperator"]

PerSampleLossFn = Callable[[nn.Module, Any], torch.Tensor]

_LIKELIHOODS = ("categorical", "gaussian")


class EmpiricalFisherOperator(OutputCurvatureOperator):
    r"""Empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` of per-sample loss gradients.

    ``N`` counts every sample of every batch used (ragged batches and microbatches are
    weighted by their sample counts), so ``F`` is exactly the mean over all samples.
    Per batch of ``B`` samples the product is
    ``(1/B) J_\ell^\top (J_\ell v) = (1/B) \sum_i \langle g_i, v\rangle g_i``: one call of
    ``loss_fn`` per batch and block of vectors (a forward pass carrying the forward-mode
    tangents ``J_\ell v_j``, exact; or finite differences with
    ``jvp="finite_difference"``) and one backward pass per vector, in O(n) memory (no
    per-sample gradient matrix).

    The empirical Fisher is not the Fisher information nor the GGN in general (Kunstner
    et al., 2019); it is the uncentred covariance of the per-sample gradients. For the
    Fisher of the model's own predictive distribution use :class:`MCFisherOperator`.

    Args:
        model: The model; never modified.
        dataloader: Re-iterable of batches (or a factory returning one).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` tensor of per-sample losses, e.g.
            ``supervised_loss(nn.CrossEntropyLoss(reduction="none"))``.
        jvp: ``"forward"`` (exact forward-mode AD) or ``"finite_difference"``.
        fd_eps: Finite-difference step for the unit direction.
        lm_head: ``"auto"`` (default): with a per-sequence language-model loss of the
            library (:func:`~hessian_eigenthings.loss_fns.huggingface.
            hf_lm_per_sample_loss`, :func:`~hessian_eigenthings.loss_fns.transformer_lens.
            tlens_per_sample_loss`) on a model whose logits come straight from its linear
            output embedding, the ``(tokens, V)`` logits and their tangents are never
            formed: per-sequence slopes and gradients are computed in chunks of tokens
            (exact; see :mod:`~hessian_eigenthings.operators._lm_head`). ``"chunked"``:
            the same, raising where it does not apply; ``"off"``: never.
        lm_head_chunk: Tokens per chunk (default ``2^22 / V``).
        one_pass: ``True`` (default): the forward-mode tangents of the per-sample losses
            ride along the forward with graph (one call of ``loss_fn`` per batch and
            block; while it runs, about one more set of activations); ``False``: in
            their own pass without graph first (two calls, a training step's peak memory;
            see :class:`~hessian_eigenthings.operators.output_curvature.OutputCurvatureOperator`).
        **options: The data-loop options of
            :class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator`
            (``param_filter``, ``full_dataset``, ``num_batches``, ``microbatch_size``,
            ``weight_fn``, ``check_determinism``, ``backend``); ``weight_fn`` defaults to
            ``loss_fn.batch_weight`` if the loss has one (per-token losses: the token
            count), else the batch's leading dimension, and must equal the number of
            losses ``loss_fn`` returns.

    Example:
        >>> from hessian_eigenthings.loss_fns.standard import supervised_loss
        >>> model = nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> F = EmpiricalFisherOperator(
        ...     model, data, supervised_loss(nn.CrossEntropyLoss(reduction="none")))
        >>> F.size
        8
    """

    @legacy_keywords(translate=legacy_fisher_loss)
    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        loss_fn: PerSampleLossFn,
        *,
        jvp: str = "forward",
        fd_eps: float | None = None,
        lm_head: str = "auto",
        lm_head_chunk: int | None = None,
        one_pass: bool = True,
        **options: Unpack[DataOptions],
    ) -> None:
        self.loss_fn = loss_fn
        super().__init__(
            model,
            dataloader,
            loss_fn,
            what="loss_fn",
            jvp=jvp,
            fd_eps=fd_eps,
            loss_for_weights=loss_fn,
            lm_head=lm_head,
            lm_head_chunk=lm_head_chunk,
            head_loss=loss_fn,
            one_pass=one_pass,
            **options,
        )

    def _output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        losses = super()._output(model, batch)
        if losses.dim() != 1:
            if losses.dim() == 0:
                hint = (
                    "a scalar (a reduced loss). Return one loss per sample, e.g. "
                    "nn.CrossEntropyLoss(reduction='none') or "
                    "F.cross_entropy(..., reduction='none')."
                )
            else:
                hint = (
                    f"shape {tuple(losses.shape)}. Reduce each sample's losses to one number "
                    "(e.g. the mean over its tokens) so the result has shape (B,)."
                )
            raise ValueError(
                f"EmpiricalFisherOperator's loss_fn must return per-sample losses of shape "
                f"(B,), got {hint}"
            )
        return losses

    _per_sample_head = True

    def _probe_loss(self, batch: Any) -> torch.Tensor:
        if self._head is not None:
            return self._head.probe(batch)
        return self._output(self.model, batch).detach().sum()

    def _output_product(self, out: torch.Tensor, piece: Piece, u: torch.Tensor) -> torch.Tensor:
        """``u / B`` for ``u_i = <g_i, v>``: the reverse pass then gives ``(1/B) sum_i s_i g_i``."""
        w = piece.weight
        if isinstance(w, int) and w != out.shape[0]:
            raise ValueError(
                f"loss_fn returned {out.shape[0]} per-sample losses for a batch of {w} "
                "samples (weight_fn / leading dimension). They must agree; pass "
                "weight_fn=lambda batch: <number of samples> if the batch's first tensor is "
                "not indexed by sample."
            )
        # the loop multiplies by B and divides by the total count N
        return u / out.shape[0]


def _row_keys(batch: Any, samples: int, rows: int) -> torch.Tensor:
    """``(rows,)`` keys: sample ``i`` of the batch owns rows ``i * rows // samples ...``.

    A sample's key comes from its contents (:func:`sample_keys`); its rows (positions of
    a sequence) add their index within the sample. A batch whose tensors are not
    indexed by sample is keyed as a whole.
    """
    keys = sample_keys(batch, samples)
    if keys is None:  # no per-sample tensor: the batch's contents key all of its rows
        whole = pass_fingerprint(batch).reshape(1) & 0xFFFFFFFF
        return positions(whole, rows)
    return positions(keys, rows // samples)


class MCFisherOperator(OutputCurvatureOperator):
    r"""Monte-Carlo Fisher with labels sampled from the model's predictive distribution.

    .. math::

        \hat F v = \frac{1}{W} \sum_b w_b \, \frac{1}{R_b} \sum_{i \in b}
        J_i^\top \Big( \frac{1}{S} \sum_{s=1}^{S} r_{is} \langle r_{is}, J_i v \rangle
        \Big),

    with ``R_b`` the number of prediction rows of the batch and ``S = num_samples``.

    * ``likelihood="categorical"``: logits with classes on ``class_dim`` (default 1,
      as in :func:`torch.nn.functional.cross_entropy`; use ``-1`` for ``(B, T, V)``
      language-model logits); every position is a row. ``\tilde y \sim
      \mathrm{softmax}(f_i)`` and ``r = p - e_{\tilde y}``, the gradient of the
      cross-entropy at the sampled label; ``E[r r^T] = diag(p) - p p^T``, so
      ``E[\hat F]`` is the GGN of the mean cross-entropy over rows
      (:class:`~hessian_eigenthings.operators.ggn.GGNOperator` with
      ``cross_entropy_loss_of_output()``).
    * ``likelihood="gaussian"``: unit-variance Gaussian around the output;
      ``r = -\varepsilon``, ``\varepsilon \sim N(0, I)`` per sample (row = sample);
      ``E[\hat F]`` is the GGN of the per-sample mean of ``0.5 ||f_i - y_i||^2``
      (which is ``k/2`` times the GGN of ``mse_loss_of_output()`` for outputs of ``k``
      elements per sample).

    Each product is an unbiased estimate of that GGN with relative error
    ``O(1/sqrt(S))``, and it is a *fixed* linear operator: the labels of a sample are a
    function of ``seed`` and of the sample's contents (a hash of the bits of its
    tensors, see :mod:`~hessian_eigenthings.operators._fingerprint`), not of its
    position, so every product uses the same labels and Lanczos sees one symmetric PSD
    matrix, also when the loader shuffles, and for any batching, ``microbatch_size`` or
    device. Identical samples get identical labels. Samples are the rows of the batch's
    tensors whose leading dimension is the output's; a batch without such a tensor is
    keyed as a whole (its labels then depend on how samples are grouped into batches).

    Args:
        model: The model; never modified.
        dataloader: Re-iterable of batches (or a factory returning one).
        forward_fn: ``forward_fn(model, batch) -> output`` (logits, or Gaussian means).
        likelihood: ``"categorical"`` or ``"gaussian"``.
        num_samples: Labels ``S`` drawn per row.
        seed: Seed of the label draws; ``None`` draws a fresh one (kept in ``.seed``).
        class_dim: Class dimension of the logits (categorical only).
        jvp: ``"forward"`` (exact) or ``"finite_difference"``.
        fd_eps: Finite-difference step for the unit direction.
        one_pass: ``True``: the forward-mode tangents in the forward with graph (one
            forward instead of two, about 1.5x the peak memory; see
            :class:`~hessian_eigenthings.operators.output_curvature.OutputCurvatureOperator`).
        **options: The data-loop options of
            :class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator`
            (``param_filter``, ``full_dataset``, ``num_batches``, ``microbatch_size``,
            ``weight_fn``, ``check_determinism``, ``backend``); ``weight_fn`` defaults to
            the batch's leading dimension, and the determinism check evaluates the output.

    Raises:
        TypeError: Called with a loss (the GGN's signature ``(model, dataloader,
            forward_fn, loss_of_output_fn)``): the Monte-Carlo Fisher has none.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> MCFisherOperator:
        loss = args[3] if len(args) > 3 else kwargs.get("loss_of_output_fn", kwargs.get("loss_fn"))
        if loss is not None or len(args) > 3:
            name = getattr(loss, "name", None) or getattr(loss, "__name__", type(loss).__name__)
            hint = (
                "likelihood='gaussian'"
                if "mse" in str(name).lower()
                else "likelihood='categorical'"
            )
            raise TypeError(
                f"MCFisherOperator takes no loss (got {name!r} as a fourth argument): it "
                "samples labels from the model's own predictive distribution, chosen by "
                "likelihood=. Call MCFisherOperator(model, dataloader, forward_fn, "
                f"{hint}) (categorical: the Fisher of the cross-entropy; gaussian: of the "
                "squared error), or GGNOperator(model, dataloader, forward_fn, "
                "loss_of_output_fn) for the GGN of that loss."
            )
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        forward_fn: OutputFn,
        *,
        likelihood: str = "categorical",
        num_samples: int = 1,
        seed: int | None = None,
        class_dim: int = 1,
        jvp: str = "forward",
        fd_eps: float | None = None,
        one_pass: bool = False,
        **options: Unpack[DataOptions],
    ) -> None:
        if likelihood not in _LIKELIHOODS:
            raise ValueError(
                f"Unknown likelihood {likelihood!r} for MCFisherOperator; expected one of "
                f"{_LIKELIHOODS}."
            )
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
        if not isinstance(class_dim, int):
            raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__}.")
        self.forward_fn = forward_fn
        self.likelihood = likelihood
        self.num_samples = num_samples
        self.seed = fresh_seed() if seed is None else seed
        self.class_dim = class_dim
        super().__init__(
            model,
            dataloader,
            forward_fn,
            what="forward_fn",
            jvp=jvp,
            fd_eps=fd_eps,
            one_pass=one_pass,
            **options,
        )

    def _probe_loss(self, batch: Any) -> torch.Tensor:
        return self._output(self.model, batch).detach().double().sum()

    def _graph_probe(self, batch: Any) -> None:
        out = self._output(self.model, batch)
        check_graph(out, self._what, "an output")
        if self.likelihood == "categorical":
            dims = out.dim()
            if not -dims <= self.class_dim < dims or dims == 0:
                raise ValueError(
                    f"class_dim={self.class_dim} is not a dimension of the logits, which have "
                    f"{dims} dimension(s) (valid: {-dims}..{dims - 1}). Pass the dimension of "
                    "the classes (1 for (B, C) logits, -1 for (B, T, V) language-model logits)."
                )

    def _output_product(self, out: torch.Tensor, piece: Piece, u: torch.Tensor) -> torch.Tensor:
        """``(1/R) (1/S) sum_s r_s <r_s, u>`` per row, for the samples' fixed labels."""
        # the labels of a sample are a function of (seed, its contents): the same draw in
        # every product, wherever the sample is
        cdt = torch.promote_types(out.dtype, torch.float32)
        s_count = self.num_samples
        if self.likelihood == "gaussian":
            rows = out.shape[0] if out.dim() > 0 else 1
            keys = _row_keys(piece.data, rows, out.numel())
            # Box-Muller: two independent uniforms per (element, draw)
            u1 = uniforms(keys, self.seed, s_count)
            u2 = uniforms(keys, self.seed ^ 0x5DEECE66D, s_count)
            normal = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)
            eps = normal.T.reshape(s_count, *out.shape).to(cdt)
            uc = u.to(cdt)
            dims = tuple(range(2, eps.dim()))
            coef = (eps * uc).sum(dims, keepdim=True) if dims else eps * uc
            return ((eps * coef).sum(0) / (s_count * rows)).to(u.dtype)
        if out.dim() == 0:
            raise ValueError("A categorical likelihood needs logits with a class dimension.")
        cd = self.class_dim % out.dim()
        num_classes = out.shape[cd]
        z = out.movedim(cd, -1).reshape(-1, num_classes)
        rows = z.shape[0]
        p = torch.softmax(z.to(cdt), dim=-1)
        samples = out.movedim(cd, -1).shape[0] if out.dim() > 1 else 1
        # inverse CDF at uniforms keyed by each row's sample and position: (R, S)
        cdf = torch.cumsum(p, dim=-1)
        draws = uniforms(_row_keys(piece.data, samples, rows), self.seed, s_count).to(cdt)
        labels = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True)
        labels.clamp_(max=num_classes - 1)
        ur = u.movedim(cd, -1).reshape(-1, num_classes).to(cdt)
        # <r_s, u> = <p, u> - u[y_s]  for r_s = p - e_{y_s}
        c = (p * ur).sum(-1, keepdim=True) - ur.gather(1, labels)
        hu = p * c.sum(-1, keepdim=True)
        hu.scatter_add_(1, labels, -c)
        hu.div_(s_count * rows)
        moved_shape = (*out.movedim(cd, -1).shape,)
        return hu.reshape(moved_shape).movedim(-1, cd).to(u.dtype)
