"""The Triton program of the cross-entropy HVP: one row, two passes over the vocabulary.

Kept as a plain (undecorated) function in its own module, which imports Triton
unconditionally; :mod:`~hessian_eigenthings.loss_fns.fused_ce.triton_kernel` jits it on
first launch (reading ``TRITON_INTERPRET`` then) and holds the launcher and the
mathematics. Compile-time parameters are annotated ``tl.constexpr`` literally, because
Triton's interpreter reads the annotation from the source text.
"""

import triton.language as tl

__all__ = ["ce_hvp_rows"]


def ce_hvp_rows(
    z_ptr,
    u_ptr,
    t_ptr,
    o_ptr,
    n_ptr,
    T,
    V,
    z_sb,
    z_st,
    z_sv,
    u_sb,
    u_st,
    u_sv,
    t_sb,
    t_st,
    o_sb,
    o_st,
    o_sv,
    ignore_index,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Write ``(H u)_r = p_r (u_r - <p_r, u_r>) m_r / n`` for the row ``r`` of this program."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    z_row = z_ptr + b * z_sb + t * z_st
    u_row = u_ptr + b * u_sb + t * u_st
    o_row = o_ptr + b * o_sb + t * o_st
    target = tl.load(t_ptr + b * t_sb + t * t_st)
    n = tl.load(n_ptr).to(ACC)
    scale = tl.where(target != ignore_index, 1.0 / tl.maximum(n, 1.0), 0.0).to(ACC)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    d = tl.zeros([], ACC)
    # pass 1: running max M, S = sum exp(z - M), D = sum exp(z - M) u
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < V
        z = tl.load(z_row + cols * z_sv, mask=inside, other=float("-inf")).to(ACC)
        uu = tl.load(u_row + cols * u_sv, mask=inside, other=0.0).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, 0)
        d = d * alpha + tl.sum(e * uu, 0)
        m = m_new
    inv_s = 1.0 / s
    dot = d * inv_s
    # pass 2: out = p (u - <p,u>) * mask / n, written once
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < V
        z = tl.load(z_row + cols * z_sv, mask=inside, other=float("-inf")).to(ACC)
        uu = tl.load(u_row + cols * u_sv, mask=inside, other=0.0).to(ACC)
        p = tl.exp(z - m) * inv_s
        val = tl.where(scale != 0.0, p * (uu - dot) * scale, 0.0)
        tl.store(o_row + cols * o_sv, val.to(o_ptr.dtype.element_ty), mask=inside)
