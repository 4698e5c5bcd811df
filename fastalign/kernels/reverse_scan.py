"""Token-level returns and GAE as reverse scans over time (docs/math.md#advantages), parallel across time.

Every recurrence here is affine in its carried state, so a row is a composition of
per-token affine maps, which is associative: one program per row takes BLOCK_T
tokens at a time from the end, composes their maps with ``tl.associative_scan``
(a parallel prefix over the block) and applies the composition to the state
carried in from the later tokens. Math in fp64 like the C++ kernels (``m`` the
mask, masked tokens map the state to itself; their x and V are read as 0, so a NaN or inf
there never reaches a valid token):

* ``return``: s_t = m_t (x_t m_t + gamma s_{t+1});   out_t = s_t        (reset after masked tokens)
* ``to_go``:  s_t = x_t m_t + gamma s_{t+1};         out_t = s_t m_t
* ``gae``:    state (A, V_next):
              A_t      = (m gamma lam + 1 - m) A_{t+1} + m gamma V_next + m (x_t - V_t)
              V_next_t = (1 - m) V_next + m V_t
              out_t = A_t m_t,  out2_t = (A_t + V_t) m_t

A map s -> c s + d composed after a is (c_b c_a, c_b d_a + d_b); the GAE maps are
upper-triangular 2 x 2 plus an offset and compose the same way. ``return`` maps also carry
``z`` = "holds a masked token": such a map sends every state to its ``d`` by selection, so an
infinite return after a masked token does not become ``0 * inf = NaN`` (the C++ scan resets to 0).
Masked outputs are stored as 0 by selection for the same reason.

A composed coefficient is a product of factors (gamma, gamma lam) that may underflow to 0 over a long
row, where the token-by-token scan never multiplies by 0: a product of positive factors is kept at
the smallest positive double at least (:func:`_mul`), so an infinite state stays infinite (not
``0 * inf = NaN``) while a finite one still vanishes. A genuine 0 (gamma = 0) stays 0.
"""
import triton
import triton.language as tl

RETURN, TO_GO, GAE = 0, 1, 2


@triton.jit
def _mul(c_a, c_b):
    # c_a c_b for coefficients >= 0; positive factors give at least 2^-1074 (the product only underflowed)
    p = c_a * c_b
    tiny = tl.full(p.shape, 1, tl.int64).to(tl.float64, bitcast=True)
    return tl.where((p == 0.0) & (c_a > 0.0) & (c_b > 0.0), tiny, p)


@triton.jit
def _then(c_a, d_a, c_b, d_b):
    # apply (c_a, d_a), then (c_b, d_b)
    return _mul(c_b, c_a), c_b * d_a + d_b


@triton.jit
def _then_reset(c_a, d_a, z_a, c_b, d_b, z_b):
    # apply (c_a, d_a), then (c_b, d_b); z: the map resets (its c is 0 by a masked token, not by gamma = 0)
    c = tl.where(z_a + z_b > 0, 0.0, _mul(c_b, c_a))
    d = tl.where(z_b > 0, d_b, c_b * d_a + d_b)
    return c, d, tl.maximum(z_a, z_b)


@triton.jit
def _then2(al_a, be_a, de_a, e_a, f_a, al_b, be_b, de_b, e_b, f_b):
    # [[al, be], [0, de]] (A, V) + (e, f): apply a, then b
    return (_mul(al_b, al_a), _mul(al_b, be_a) + _mul(be_b, de_a), de_b * de_a, al_b * e_a + be_b * f_a + e_b,
            de_b * f_a + f_b)


@triton.jit
def _last(v, j, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where(j == BLOCK_T - 1, v, 0.0), 0)


@triton.jit
def reverse_scan_kernel(x_ptr, v_ptr, m_ptr, out_ptr, out2_ptr, T, gamma: tl.float64, lam: tl.float64,
                        MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    # gamma and lam are passed as fp64 (a Python float argument is fp32 by default on a GPU)
    base = tl.program_id(0).to(tl.int64) * T
    j = tl.arange(0, BLOCK_T)
    carry_a = tl.zeros([], tl.float64)
    carry_v = tl.zeros([], tl.float64)
    for j0 in range(0, T, BLOCK_T):
        t = T - 1 - (j0 + j)  # block j0 of the row, last token first
        ok = t >= 0
        x = tl.load(x_ptr + base + t, mask=ok, other=0.0).to(tl.float64)
        m = tl.load(m_ptr + base + t, mask=ok, other=0.0).to(tl.float64)
        x = tl.where(m != 0.0, x, 0.0)  # a masked slot's value (NaN, inf) never reaches a valid token
        if MODE == 2:
            v = tl.load(v_ptr + base + t, mask=ok, other=0.0).to(tl.float64)
            v = tl.where(m != 0.0, v, 0.0)
            al = m * (gamma * lam) + 1.0 - m
            be = m * gamma
            de = 1.0 - m
            e = m * (x - v)
            f = m * v
            al, be, de, e, f = tl.associative_scan((al, be, de, e, f), 0, _then2)
            a = al * carry_a + be * carry_v + e
            nv = de * carry_v + f
            tl.store(out_ptr + base + t, tl.where(m != 0.0, a * m, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out2_ptr + base + t, tl.where(m != 0.0, (a + v) * m, 0.0).to(out2_ptr.dtype.element_ty),
                     mask=ok)
            carry_a = _last(a, j, BLOCK_T)
            carry_v = _last(nv, j, BLOCK_T)
        else:
            if MODE == 0:
                c = tl.where(ok, gamma * m, 1.0)
                d = x * m * m
                z = tl.where(ok & (m == 0.0), 1.0, 0.0)
                c, d, z = tl.associative_scan((c, d, z), 0, _then_reset)
                s = tl.where(z > 0, d, c * carry_a + d)
            else:
                c = tl.where(ok, gamma + 0.0 * m, 1.0)
                d = x * m
                c, d = tl.associative_scan((c, d), 0, _then)
                s = c * carry_a + d
            out = s if MODE == 0 else s * m
            tl.store(out_ptr + base + t, tl.where(m != 0.0, out, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
            carry_a = _last(s, j, BLOCK_T)


def reverse_scan(x, values, mask, gamma, lam, mode, out, out2):
    """Launch over contiguous [B, T] rows; ``values`` / ``out2`` only for gae."""
    B, T = x.shape
    if B == 0 or T == 0:
        return
    block = min(1024, max(16, triton.next_power_of_2(T)))
    reverse_scan_kernel[(B,)](
        x, values if values is not None else x, mask, out, out2 if out2 is not None else out, T,
        float(gamma), float(lam), MODE=int(mode), BLOCK_T=block, num_warps=4)


def aot_cases(dtype):
    """Launches for the ahead-of-time compile gate (fastalign.aot): every mode at B=1024, T=4096."""
    import torch

    if dtype not in (torch.float32, torch.float64):
        return
    B, T = 1024, 4096
    meta = lambda: torch.empty(B, T, dtype=dtype, device="meta")  # noqa: E731
    for name, mode in (("return", RETURN), ("to_go", TO_GO), ("gae", GAE)):
        yield name, lambda mode=mode: reverse_scan(meta(), meta() if mode == GAE else None, meta(), 0.99, 0.95,
                                                   mode, meta(), meta() if mode == GAE else None)
