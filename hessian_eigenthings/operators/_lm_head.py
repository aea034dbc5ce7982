r"""Curvature products of language models with the LM head chunked over tokens.

A causal LM computes :math:`z = h(\theta) W^\top (+ b)` and a token cross entropy; at
large vocabularies the ``(tokens, V)`` logits, their tangents and the loss's products in
logit space dominate the memory of every curvature product (GPT-2, ``V = 50257``: 196
MiB of float32 logits per 1024 tokens, several of them alive at once). When the loss
declares itself the cross entropy of the head's logits (``loss.head_ce``, see
:mod:`~hessian_eigenthings.loss_fns.head_ce`) and the model's logits are exactly the
output of its linear output embedding (HuggingFace ``get_output_embeddings()``,
TransformerLens ``unembed``), the operators run the model only up to the head's input
:math:`h` (a forward pre-hook stops the forward there, so no logits are computed) and
apply head and loss chunk by chunk:

* GGN: :math:`J^\top H J v` with :math:`J v = (\dot h W^\top + h \dot W^\top + \dot b)`,
  :math:`\dot h = J_h v` by forward mode through the trunk; the head's product
  :func:`~hessian_eigenthings.loss_fns.fused_ce.linear.linear_ce_ggn_product` gives the
  cotangent of :math:`h` (pulled back through the trunk by one reverse pass) and the
  head's own blocks.
* Empirical Fisher (one loss per sequence): :math:`s_i = \langle g_i, v\rangle` from the
  per-token slopes, then the gradient of :math:`\sum_i (s_i / B) \ell_i`, both chunked.
* Hessian: with :math:`\ell(h, W, b)` the head's loss and :math:`\rho = \nabla_z \ell`,

  .. math::

      H v = J_h^\top\big(r W + \rho \dot W\big)
            + \sum_k (\rho W)_k \, \nabla^2_\theta h_k \, v
            + \big(r^\top h + \rho^\top \dot h\big)_{W}
            + \big(\textstyle\sum_t r_t\big)_{b},

  where :math:`r = H_z \dot z`: the trunk's second-order term is a double backward of
  :math:`\langle \rho W, h \rangle` (which also yields :math:`\dot h` as the derivative
  with respect to the cotangent), and the head's terms are
  :func:`~hessian_eigenthings.loss_fns.fused_ce.linear_hvp.linear_ce_hvp`.

Tied input and output embeddings (GPT-2) are one parameter: its block receives both the
trunk's and the head's contributions. Everything is exact: chunking reorders sums only.
Peak memory: the trunk's activations (and their double-backward graph for the Hessian),
``O(chunk x V)`` for the head, and parameter-sized vectors.

``lm_head="auto"`` (default) chunks when it applies and logs once why it does not
otherwise; ``"chunked"`` raises instead; ``"off"`` never chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp, vmap

from hessian_eigenthings.loss_fns.fused_ce.linear import linear_ce_ggn_product
from hessian_eigenthings.loss_fns.fused_ce.linear_hvp import (
    linear_ce_grad,
    linear_ce_hvp,
    linear_ce_token_slopes,
)
from hessian_eigenthings.loss_fns.head_ce import HeadCrossEntropy, head_ce_of
from hessian_eigenthings.operators._autodiff_safety import curvature_mode
from hessian_eigenthings.operators._data import Piece, split_batch
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators._jvp import _Call

__all__ = ["LM_HEAD_MODES", "ChunkedHead", "chunked_head", "default_chunk"]

logger = logging.getLogger("hessian_eigenthings")

LM_HEAD_MODES = ("auto", "chunked", "off")
_CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in float32, whatever the vocabulary
_CHECK_TOKENS = 8  # positions of the one-time check forward
_LOGGED: set[str] = set()
_R = TypeVar("_R")
# a tangent of the head's inputs: (d_hidden, d_weight as (V, D), d_bias), None for zero
_Tangent = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def default_chunk(vocab: int) -> int:
    """Tokens per chunk: ``2^22 / V`` (at least 1), so a chunk's logits hold 16 MiB in fp32."""
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _HeadReached(BaseException):
    """Raised by the pre-hook to stop a forward at the head (not an ``Exception``)."""


@dataclass(frozen=True)
class LinearHead:
    """The model's output embedding: ``z = h W^T + b`` with ``W`` of shape ``(V, D)``."""

    module: nn.Module
    weight_name: str
    transposed: bool  # the stored weight is (D, V) (TransformerLens ``W_U``)
    bias_name: str | None

    def weight_of(self, w: torch.Tensor) -> torch.Tensor:
        """The stored weight (or a tangent or product of it) as ``(V, D)``, and back."""
        return w.T if self.transposed else w

    @property
    def vocab(self) -> int:
        weight = getattr(self.module, self.weight_name)
        return int(weight.shape[1] if self.transposed else weight.shape[0])


def find_linear_head(model: nn.Module) -> LinearHead | None:
    """HuggingFace ``get_output_embeddings()`` (an ``nn.Linear``) or TransformerLens ``unembed``."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            module = get()
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Linear):
            return LinearHead(module, "weight", False, "bias" if module.bias is not None else None)
    unembed = getattr(model, "unembed", None)
    if isinstance(unembed, nn.Module) and isinstance(getattr(unembed, "W_U", None), torch.Tensor):
        bias = getattr(unembed, "b_U", None)
        return LinearHead(unembed, "W_U", True, "b_U" if isinstance(bias, torch.Tensor) else None)
    return None


@dataclass
class _Captured:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@contextmanager
def _stop_at(head: LinearHead, store: dict[str, Any]) -> Iterator[None]:
    def pre(module: nn.Module, args: Any) -> None:
        store["hidden"] = args[0]
        store["weight"] = getattr(module, head.weight_name)
        store["bias"] = None if head.bias_name is None else getattr(module, head.bias_name)
        raise _HeadReached

    handle = head.module.register_forward_pre_hook(pre)
    try:
        yield
    except _HeadReached:
        pass
    finally:
        handle.remove()


def run_to_head(head: LinearHead, run: Callable[[], Any]) -> _Captured:
    """Run ``run()`` up to the head's input (never computing the logits)."""
    store: dict[str, Any] = {}
    with _stop_at(head, store):
        run()
    if "hidden" not in store:
        raise RuntimeError(
            "The forward did not reach the model's output embedding; chunking the LM head "
            "needs logits computed by it. Pass lm_head='off'."
        )
    return _Captured(store["hidden"], store["weight"], store["bias"])


def _views(t: torch.Tensor, p: torch.Tensor) -> bool | None:
    """``False`` if ``t`` is ``p``'s memory as is, ``True`` if as its transpose, else ``None``."""
    if t is p:
        return False
    if t.data_ptr() != p.data_ptr() or t.numel() != p.numel() or t.dim() != p.dim():
        return None
    if t.shape == p.shape and t.stride() == p.stride():
        return False
    if t.dim() == 2 and t.shape == p.shape[::-1] and t.stride() == p.stride()[::-1]:
        return True
    return None


def _slot_of(params: Sequence[torch.Tensor], t: torch.Tensor | None) -> tuple[int | None, bool]:
    """The index of the parameter ``t`` is (or is a transpose of), and whether transposed."""
    if t is not None:
        for i, p in enumerate(params):
            flipped = _views(t, p)
            if flipped is not None:
                return i, flipped
    return None, False


def _derived(model: nn.Module, head: LinearHead) -> str | None:
    """Why the head's weight or bias is not one of the model's parameters (or a transpose)."""
    params = list(model.parameters())
    for name in (head.weight_name, head.bias_name):
        t = None if name is None else getattr(head.module, name)
        if isinstance(t, torch.Tensor) and t.requires_grad and _slot_of(params, t)[0] is None:
            return (
                f"the output embedding's {name} is computed from parameters (not a parameter "
                "or its transpose), so its derivatives would be lost"
            )
    return None


def _short_batch(batch: Any) -> Any:
    """The first sample of ``batch``, cut to its first few positions (for the check)."""
    first = split_batch(batch, 1)[0]
    length: list[int] = []

    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            if not length:
                length.append(t.shape[1])
            if t.shape[1] == length[0]:
                return t[:, :_CHECK_TOKENS]
        return t

    if isinstance(first, torch.Tensor):
        return cut(first)
    if isinstance(first, Mapping):
        mapped = {k: cut(v) for k, v in first.items()}
        try:
            return type(first)(mapped)  # type: ignore[call-arg]  # dict, BatchEncoding
        except TypeError:
            return mapped
    if isinstance(first, (tuple, list)):
        return type(first)(cut(v) for v in first)
    return first


def _why_not(
    model: nn.Module,
    head: LinearHead,
    logits_fn: Callable[[nn.Module, Any], torch.Tensor],
    declared: HeadCrossEntropy,
    batch: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> str | None:
    """``None`` if ``logits_fn`` returns exactly the head's output, else the reason."""
    short = _short_batch(batch)
    seen: list[torch.Tensor] = []

    def post(_m: nn.Module, _args: Any, out: Any) -> None:
        seen.append(out)

    handle = head.module.register_forward_hook(post)
    try:
        # the kernels of the products that need them (a few positions: no memory concern)
        with preserve_model_state(model), torch.no_grad(), curvature_mode(device, dtype):
            logits = logits_fn(model, short)
            targets = declared.targets(short)
    except Exception as err:  # a batch format the short check cannot cut: do not chunk
        return f"the check forward on a short batch failed ({type(err).__name__}: {err})"
    finally:
        handle.remove()
    if len(seen) != 1:
        return f"the output embedding ran {len(seen)} times in one forward"
    out = seen[0]
    same = (
        isinstance(logits, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and logits.shape == out.shape
        and logits.data_ptr() == out.data_ptr()
    )
    if not same:
        return (
            "the logits are not the output embedding's output (the model transforms them, "
            "e.g. soft-capping or scaling)"
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        return f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}"
    return None


class ChunkedHead:
    """An operator's chunked products (see the module docstring).

    Args:
        model: The model (the operator's).
        named_params: The operator's selected parameters.
        head: The model's output embedding.
        declared: The loss's declaration.
        logits_fn: ``(model, batch) -> logits`` (stopped at the head when used).
        chunk: Tokens per chunk.
        device: The operator's device.
        dtype: The operator's dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        named_params: Sequence[tuple[str, nn.Parameter]],
        head: LinearHead,
        declared: HeadCrossEntropy,
        logits_fn: Callable[[nn.Module, Any], torch.Tensor],
        chunk: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.params = [p for _, p in named_params]
        self.names = ["model." + n for n, _ in named_params]
        self.head = head
        self.declared = declared
        self.logits_fn = logits_fn
        self.chunk = chunk
        self.device = device
        self.dtype = dtype
        self._call = _Call(model, logits_fn)
        weight = head.weight_of(getattr(head.module, head.weight_name))
        bias = None if head.bias_name is None else getattr(head.module, head.bias_name)
        # a head's weight may be a transposed view of its parameter (TransformerLens W_U,
        # the bridge's W_U of an nn.Linear): its slot and whether the slot holds (D, V)
        self.weight_slot, self.weight_flipped = _slot_of(self.params, weight)
        self.bias_slot, _ = _slot_of(self.params, bias)

    def _weight_to_slot(self, value: torch.Tensor) -> torch.Tensor:
        """A ``(V, D)`` weight product (or tangent) in its parameter's layout, and back."""
        return value.T if self.weight_flipped else value

    # -- pieces ---------------------------------------------------------------------------
    def _targets(self, batch: Any) -> torch.Tensor:
        return self.declared.targets(batch).to(self.device)

    def _forward(self, batch: Any) -> _Captured:
        """The head's input with its graph to the parameters; the head's weight and bias."""
        with torch.enable_grad():
            cap = run_to_head(self.head, lambda: self.logits_fn(self.model, batch))
        return _Captured(
            cap.hidden,
            self.head.weight_of(cap.weight.detach()),
            None if cap.bias is None else cap.bias.detach(),
        )

    def _tangents(self, batch: Any, vs: Sequence[torch.Tensor]) -> _Tangent:
        """``(J_h v, dW, db)`` by forward mode through the trunk, stopped at the head."""
        with (
            curvature_mode(self.device, self.dtype),
            torch.no_grad(),
            fwAD.dual_level(),
        ):
            duals = {
                n: fwAD.make_dual(p.detach(), v) for n, p, v in zip(self.names, self.params, vs)
            }
            cap = run_to_head(self.head, lambda: functional_call(self._call, duals, (batch,)))
            dh = fwAD.unpack_dual(cap.hidden).tangent
            dw = fwAD.unpack_dual(cap.weight).tangent
            db = None if cap.bias is None else fwAD.unpack_dual(cap.bias).tangent
        return dh, None if dw is None else self.head.weight_of(dw), db

    def _block_tangents(self, batch: Any, vs: Sequence[torch.Tensor]) -> list[_Tangent]:
        """The tangents ``(J_h v_j, dW_j, db_j)`` of a block's vectors in one batched pass.

        ``J_h V`` by ``torch.func.vmap`` over the tangents of ``torch.func.jvp`` of the
        trunk (one forward for the block, the primal computed once); the head's own
        tangents are the vectors' blocks of its parameters (the head's weight is a
        parameter or its transpose). A model that vmap cannot carry (e.g. ``.item()`` on
        activations, in-place buffer updates) gets one forward-mode pass per vector.
        """
        count = vs[0].shape[0]
        primals = tuple(p.detach() for p in self.params)

        def trunk(*ps: torch.Tensor) -> torch.Tensor:
            params = dict(zip(self.names, ps))
            cap = run_to_head(self.head, lambda: functional_call(self._call, params, (batch,)))
            return cap.hidden

        def tangent(*ts: torch.Tensor) -> torch.Tensor:
            return jvp(trunk, primals, ts)[1]

        try:
            with curvature_mode(self.device, self.dtype), torch.no_grad():
                dh = vmap(tangent)(*vs)
        except (RuntimeError, NotImplementedError) as err:
            key = f"vmap:{type(err).__name__}"
            if key not in _LOGGED:
                _LOGGED.add(key)
                logger.info(
                    "hessian_eigenthings: the chunked LM head's batched tangents failed "
                    "(%s: %s); one forward-mode pass per vector instead.",
                    type(err).__name__,
                    str(err).strip().splitlines()[0] if str(err).strip() else "",
                )
            return [self._tangents(batch, [v[j] for v in vs]) for j in range(count)]
        return [
            (
                dh[j],
                None if self.weight_slot is None else self._weight_to_slot(vs[self.weight_slot][j]),
                None if self.bias_slot is None else vs[self.bias_slot][j],
            )
            for j in range(count)
        ]

    def _tangents_of(self, batch: Any, vs: Sequence[torch.Tensor]) -> list[_Tangent]:
        """Every vector's tangents: one dual pass for one vector, batched for several."""
        if vs[0].shape[0] == 1:
            return [self._tangents(batch, [v[0] for v in vs])]
        return self._block_tangents(batch, vs)

    def _head_slots(
        self,
        out: list[torch.Tensor | None],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> list[torch.Tensor | None]:
        """Add the head's own blocks (``(V, D)`` weight product) to their parameters' slots."""
        for slot, value in ((self.weight_slot, weight), (self.bias_slot, bias)):
            if slot is None or value is None:
                continue
            if slot == self.weight_slot:
                value = self._weight_to_slot(value)
            prev = out[slot]
            out[slot] = value if prev is None else prev + value.to(prev.dtype)
        return out

    def _pull_back(
        self, hidden: torch.Tensor, cotangent: torch.Tensor | None, **kw: Any
    ) -> list[torch.Tensor | None]:
        """``J_h^T u`` for the selected parameters (``None`` where ``h`` does not reach)."""
        if cotangent is None or not hidden.requires_grad:
            return [None] * len(self.params)
        return list(
            torch.autograd.grad(
                hidden,
                self.params,
                grad_outputs=cotangent.to(hidden.dtype),
                allow_unused=True,
                **kw,
            )
        )

    def _along(
        self,
        derivative: Callable[..., _R],
        cap: _Captured,
        targets: torch.Tensor,
        tangents: _Tangent,
        **kw: Any,
    ) -> _R:
        """A chunked head derivative at ``cap`` along the tangent ``(dh, dW, db)``.

        Args:
            derivative: One of the ``linear_ce_*`` products, called with the captured
                head, the tangent, the loss's ``ignore_index`` and this head's chunk.
            cap: The head's input, weight and bias (:meth:`_forward`).
            targets: The batch's targets.
            tangents: ``(d_hidden, d_weight, d_bias)`` (``None``: zero).
            **kw: ``derivative``'s other keywords.
        """
        dh, dw, db = tangents
        return derivative(
            cap.hidden.detach(),
            cap.weight,
            targets,
            bias=cap.bias,
            d_hidden=dh,
            d_weight=dw,
            d_bias=db,
            ignore_index=self.declared.ignore_index,
            chunk_size=self.chunk,
            **kw,
        )

    # -- products ---------------------------------------------------------------------------
    def probe(self, batch: Any) -> torch.Tensor:
        """A scalar that depends on the model's randomness: the head's input, summed."""
        with torch.no_grad():
            cap = run_to_head(self.head, lambda: self.logits_fn(self.model, batch))
        return cap.hidden.detach().double().sum()

    # Each product takes a block: ``vs[i]`` of shape ``(b, *param_i.shape)``, and returns
    # the ``b`` columns' blocks (``None``: zero). The forward to the head (and, for the
    # Hessian, the head's gradient and the first backward) is shared by the block.
    def _columns(self, vs: Sequence[torch.Tensor]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        for j in range(vs[0].shape[0]):
            yield j, [v[j] for v in vs]

    def ggn(self, piece: Piece, vs: Sequence[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        """``J^T H J v_j`` of the mean token cross entropy for each vector of the block."""
        batch = piece.data
        count = vs[0].shape[0]
        # the tangents before the forward with graph: a matvec's peak is unchanged
        tangents = self._tangents_of(batch, vs)
        cap = self._forward(batch)
        targets = self._targets(batch)
        cols = []
        for j in range(count):
            res = self._along(
                linear_ce_ggn_product,
                cap,
                targets,
                tangents[j],
                want_hidden=cap.hidden.requires_grad,
                backend=self.declared.fused,
            )
            out = self._pull_back(cap.hidden, res.hidden, retain_graph=j < count - 1)
            cols.append(self._head_slots(out, res.weight, res.bias))
        return cols

    def fisher(self, piece: Piece, vs: Sequence[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        """``(1/B) sum_i g_i <g_i, v_j>`` for the per-sequence mean losses ``l_i``."""
        batch = piece.data
        w = piece.weight
        count = vs[0].shape[0]
        tangents = self._tangents_of(batch, vs)
        cap = self._forward(batch)
        targets = self._targets(batch)
        rows = targets.shape[0]
        if isinstance(w, int) and w != rows:
            raise ValueError(
                f"loss_fn returned {rows} per-sample losses for a batch of {w} samples "
                "(weight_fn / leading dimension). They must agree."
            )
        counted = (targets != self.declared.ignore_index).sum(-1).clamp_min(1)
        cols = []
        for j in range(count):
            slopes = self._along(linear_ce_token_slopes, cap, targets, tangents[j])
            n = counted.to(slopes.dtype)
            s = slopes.sum(-1) / n  # J_l v: one number per sequence
            token_weight = (s / (rows * n)).unsqueeze(-1).expand_as(slopes)
            grad = linear_ce_grad(
                cap.hidden.detach(),
                cap.weight,
                targets,
                bias=cap.bias,
                token_weight=token_weight,
                ignore_index=self.declared.ignore_index,
                want_hidden=cap.hidden.requires_grad,
                want_params=self.weight_slot is not None or self.bias_slot is not None,
                chunk_size=self.chunk,
            )
            out = self._pull_back(cap.hidden, grad.hidden, retain_graph=j < count - 1)
            cols.append(self._head_slots(out, grad.weight, grad.bias))
        return cols

    def hessian(self, piece: Piece, vs: Sequence[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        """``H v_j`` of the mean token cross entropy (trunk by double backward, head chunked).

        Shared by the block: the forward to the head, ``rho W`` and the first backward
        ``J_h^T (rho W)`` with its graph; per vector: one reverse pass through that graph,
        the head's chunked product and one pull-back.
        """
        batch = piece.data
        targets = self._targets(batch)
        count = vs[0].shape[0]
        cols = []
        with curvature_mode(self.device, self.dtype):
            cap = self._forward(batch)
            hidden = cap.hidden
            first: Sequence[torch.Tensor | None] = ()
            rho_w = None
            if hidden.requires_grad:
                grad = linear_ce_grad(
                    hidden.detach(),
                    cap.weight,
                    targets,
                    bias=cap.bias,
                    ignore_index=self.declared.ignore_index,
                    want_params=False,
                    chunk_size=self.chunk,
                )
                rho_w = cast(torch.Tensor, grad.hidden).to(hidden.dtype).requires_grad_(True)
                with torch.enable_grad():
                    # J_h^T (rho W), differentiable in theta and in rho W
                    first = torch.autograd.grad(
                        hidden,
                        self.params,
                        grad_outputs=rho_w,
                        create_graph=True,
                        allow_unused=True,
                    )
            for j, v in self._columns(vs):
                dw = None if self.weight_slot is None else self._weight_to_slot(v[self.weight_slot])
                db = None if self.bias_slot is None else v[self.bias_slot]
                trunk: list[torch.Tensor | None] = [None] * len(self.params)
                dh = None
                terms = [
                    (g * x).sum() for g, x in zip(first, v) if g is not None and g.requires_grad
                ]
                if terms and rho_w is not None:
                    with torch.enable_grad():
                        second = torch.autograd.grad(
                            torch.stack(terms).sum(),
                            [*self.params, rho_w],
                            allow_unused=True,
                            retain_graph=True,
                        )
                    trunk, dh = list(second[:-1]), second[-1]
                res = self._along(linear_ce_hvp, cap, targets, (dh, dw, db))
                back = self._pull_back(hidden, res.hidden, retain_graph=j < count - 1)
                out = [
                    None
                    if a is None and b is None
                    else (a if b is None else b if a is None else a + b)
                    for a, b in zip(trunk, back)
                ]
                cols.append(self._head_slots(out, res.weight, res.bias))
        return cols


def _decide(
    owner: str,
    model: nn.Module,
    declared: HeadCrossEntropy | None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    first_batch: Callable[[], Any],
    unsupported: str | None,
    per_sample: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[LinearHead, Callable[[nn.Module, Any], torch.Tensor]] | str:
    """The head and the logits function to chunk with, or why chunking does not apply."""
    if declared is None:
        return "the loss does not declare itself the cross entropy of the LM head (head_ce)"
    if unsupported is not None:
        return unsupported
    if declared.per_sample != per_sample:
        return f"{owner} needs {'per-sequence losses' if per_sample else 'a mean token loss'}"
    head = find_linear_head(model)
    if head is None:
        return (
            "the model has no linear output embedding (get_output_embeddings() returning an "
            "nn.Linear, or a TransformerLens unembed)"
        )
    derived = _derived(model, head)
    if derived is not None:
        return derived
    logits_fn = declared.logits if declared.logits is not None else forward_fn
    if logits_fn is None:
        return "no forward function gives the logits"
    reason = _why_not(model, head, logits_fn, declared, first_batch(), device, dtype)
    return (head, logits_fn) if reason is None else reason


def chunked_head(
    *,
    mode: str,
    owner: str,
    model: nn.Module,
    named_params: Sequence[tuple[str, nn.Parameter]],
    loss: Any,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    first_batch: Callable[[], Any],
    chunk: int | None,
    device: torch.device,
    dtype: torch.dtype,
    unsupported: str | None = None,
    per_sample: bool = False,
) -> ChunkedHead | None:
    """The operator's :class:`ChunkedHead`, or ``None`` (not applicable, or ``mode="off"``).

    Args:
        mode: ``"auto"``, ``"chunked"`` or ``"off"``.
        owner: Operator name for messages.
        model: The model.
        named_params: The selected parameters.
        loss: The loss that may declare ``head_ce``.
        forward_fn: The operator's forward (the logits) for a loss of the output;
            ``None`` for a loss of the model (its declaration names the forward).
        first_batch: Returns the first batch, on the device (for the one-time check).
        chunk: Tokens per chunk (default :func:`default_chunk`).
        device: The operator's device.
        dtype: The operator's dtype.
        unsupported: Why this operator configuration cannot chunk (e.g. a
            finite-difference method), if it cannot.
        per_sample: Whether the operator needs a per-sample loss (the empirical Fisher).

    Raises:
        ValueError: Unknown ``mode`` or bad ``chunk``; ``mode="chunked"`` where chunking
            does not apply (the message says why).
    """
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"Unknown lm_head={mode!r} for {owner}; expected one of {LM_HEAD_MODES}.")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"lm_head_chunk must be a positive int or None, got {chunk!r}.")
    if mode == "off":
        return None
    declared = head_ce_of(loss)
    decision = _decide(
        owner, model, declared, forward_fn, first_batch, unsupported, per_sample, device, dtype
    )
    if isinstance(decision, str) or declared is None:
        reason = decision if isinstance(decision, str) else "no declaration"
        if mode == "chunked":
            raise ValueError(
                f"{owner}(lm_head='chunked'): cannot chunk the LM head: {reason}. Pass "
                "lm_head='auto' (chunks where it applies) or 'off'."
            )
        if declared is not None and f"{owner}:{reason}" not in _LOGGED:
            _LOGGED.add(f"{owner}:{reason}")  # a line only when the loss asked for it
            logger.info("hessian_eigenthings: %s does not chunk the LM head: %s.", owner, reason)
        return None
    head, logits_fn = decision
    size = chunk if chunk is not None else default_chunk(head.vocab)
    if f"{owner}:on" not in _LOGGED:
        _LOGGED.add(f"{owner}:on")
        logger.info(
            "hessian_eigenthings: %s chunks the LM head (V=%d) over %d tokens at a time; "
            "pass lm_head='off' for the unchunked product.",
            owner,
            head.vocab,
            size,
        )
    return ChunkedHead(model, named_params, head, declared, logits_fn, size, device, dtype)
