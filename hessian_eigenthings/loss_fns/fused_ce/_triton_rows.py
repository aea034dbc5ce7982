"""The Triton program of the cross-entropy HVP: one row, two passes over the vocabulary.

Kept as a plain (undecorated) function in its own module, which imports Triton
unconditionally; :mod:`~hessian_eigenthings.loss_fns.fused_ce.triton_kernel` jits it on
first launch (reading ``TRITON_INTERPRET`` then) and holds the launcher, the launch
configurations and the mathematics. Compile-time parameters are annotated
``tl.constexpr`` literally, because Triton's interpreter reads the annotation from the
source text.

Blocks and alignment. The row is walked in blocks of ``BLOCK`` positions ``j`` of the
logits' *aligned* frame: column ``c`` sits at ``j = head + c``, where ``head`` is the
logits row's offset modulo ``ALIGN`` elements, so ``base + j`` is 16-byte aligned whenever
``j`` is a multiple of ``ALIGN`` (``ALIGN = 16 // element size`` of the logits when their
vocabulary stride is 1; ``ALIGN = 1`` otherwise, which makes ``head = 0`` and the frame
the row itself). The direction and the output use the same frame, aligned too, when the
launcher has checked that their rows have the logits' phase (``U_FRAME``, ``O_FRAME``);
otherwise they are addressed from their own row start, correctly but without the
alignment the compiler could prove. Interior blocks are loaded and stored without a
mask, so the compiler can use 128-bit accesses (a mask compared against a vocabulary size
that is not a multiple of 16, e.g. GPT-2's 50257, would otherwise force element-wise
accesses); only the first block and the last partial block are masked.
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
    ALIGN: tl.constexpr,
    U_FRAME: tl.constexpr,
    O_FRAME: tl.constexpr,
    ACC: tl.constexpr,
):
    """Write ``(H u)_r = p_r (u_r - <p_r, u_r>) m_r / n`` for the row ``r`` of this program."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    z_off = b * z_sb + t * z_st
    u_off = b * u_sb + t * u_st
    o_off = b * o_sb + t * o_st
    # the logits' aligned frame: position j holds column j - head of every row below
    head = z_off % ALIGN
    z_row = z_ptr + (z_off // ALIGN) * ALIGN
    # U_FRAME: u_off has z_off's phase mod ALIGN and u_sv == 1 (O_FRAME alike)
    u_row = u_ptr + (u_off // ALIGN) * ALIGN if U_FRAME else u_ptr + u_off - head * u_sv
    o_row = o_ptr + (o_off // ALIGN) * ALIGN if O_FRAME else o_ptr + o_off - head * o_sv
    end = head + V
    offs = tl.arange(0, BLOCK)
    target = tl.load(t_ptr + b * t_sb + t * t_st)
    if target == ignore_index:
        # ignored row: write V zeros and read nothing (traffic V)
        zero = tl.zeros([BLOCK], o_ptr.dtype.element_ty)
        for start in range(0, end, BLOCK):
            j = start + offs
            if (start >= BLOCK) & (start + BLOCK <= end):
                tl.store(o_row + j * o_sv, zero)
            else:
                tl.store(o_row + j * o_sv, zero, mask=(j >= head) & (j < end))
    else:
        n = tl.load(n_ptr).to(ACC)
        scale = 1.0 / tl.maximum(n, 1.0)
        m = tl.full([], float("-inf"), ACC)
        s = tl.zeros([], ACC)
        d = tl.zeros([], ACC)
        # pass 1 (reads z and u: 2V): running max M, S = sum exp(z - M), D = sum exp(z - M) u.
        # Exponents are taken against M_ref = M, or 0 while every logit seen is -inf
        # (-inf - -inf would be NaN); S and D are exactly 0 until a finite logit arrives,
        # so the choice of reference does not change them.
        for start in range(0, end, BLOCK):
            j = start + offs
            if (start >= BLOCK) & (start + BLOCK <= end):
                z = tl.load(z_row + j * z_sv).to(ACC)
                uu = tl.load(u_row + j * u_sv).to(ACC)
            else:
                inside = (j >= head) & (j < end)
                z = tl.load(z_row + j * z_sv, mask=inside, other=float("-inf")).to(ACC)
                uu = tl.load(u_row + j * u_sv, mask=inside, other=0.0).to(ACC)
            m_new = tl.maximum(m, tl.max(z, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            alpha = tl.exp(m - m_ref)
            e = tl.exp(z - m_ref)
            s = s * alpha + tl.sum(e, 0)
            d = d * alpha + tl.sum(e * uu, 0)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m).to(ACC)
        inv_s = 1.0 / s
        dot = d * inv_s
        # pass 2 (re-reads z and u, writes H u: 3V): out = p (u - <p,u>) / n
        for start in range(0, end, BLOCK):
            j = start + offs
            if (start >= BLOCK) & (start + BLOCK <= end):
                z = tl.load(z_row + j * z_sv).to(ACC)
                uu = tl.load(u_row + j * u_sv).to(ACC)
                val = tl.exp(z - m_ref) * inv_s * (uu - dot) * scale
                tl.store(o_row + j * o_sv, val.to(o_ptr.dtype.element_ty))
            else:
                inside = (j >= head) & (j < end)
                z = tl.load(z_row + j * z_sv, mask=inside, other=float("-inf")).to(ACC)
                uu = tl.load(u_row + j * u_sv, mask=inside, other=0.0).to(ACC)
                val = tl.exp(z - m_ref) * inv_s * (uu - dot) * scale
                tl.store(o_row + j * o_sv, val.to(o_ptr.dtype.element_ty), mask=inside)
