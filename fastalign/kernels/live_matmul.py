"""Matrix products over the live rows only, their count read on the device (no host sync).

The LM-head products of a block or chunk of token rows whose labelled (scored) rows come first
(``fastalign.ops.live_rows``) are bounded by ``live``, the number of those rows, which only the
device knows. cuBLAS takes its sizes from the host, so these products are Triton kernels that
load ``live`` and leave the rest of the work undone:

    LIVE_DIM = 0 (rows):  C[m, :] = A[m, :] @ B        for m < live,  0 (or unchanged) for m >= live,
                                                       also where B holds a NaN or an inf
    LIVE_DIM = 1 (inner): C      (+)= A[:, :live] @ B[:live, :]

Rows are the logits ``z = h @ W.T`` and ``dh = dz @ W``; the inner dimension is the token one of
``dW += dz.T @ h``. A, B and C are strided views (a transpose is a view); the product
accumulates in fp32 (bf16/fp16 operands natively, fp32 ones in TF32 on a GPU unless
``FASTALIGN_FP32_MATMUL=ieee``) and is rounded once into C's dtype. Each program owns one
``BLOCK_M x BLOCK_N`` tile of C, visited ``GROUP_M`` row tiles at a time so that the programs
running together share the B tiles they stream (L2 reuse); the loop over K has a fixed order,
so the result is deterministic.
"""
import triton
import triton.language as tl

from fastalign.kernels.launch import matmul_precision, on_gpu, target_arch, tiled


@triton.jit
def live_matmul_kernel(
    a_ptr, b_ptr, c_ptr, live_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    LIVE_DIM: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    live = tl.load(live_ptr).to(tl.int64)
    m_end = live if LIVE_DIM == 0 else M
    k_end = live if LIVE_DIM == 1 else K
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < m_end
    n_ok = rn < N
    # a tile of dead rows multiplies nothing (its loop is empty)
    k_hi = tl.where(pid_m * BLOCK_M < m_end, k_end, 0)

    # acc[m, n] = sum_k A[m, k] B[k, n], BLOCK_K at a time, k < k_hi
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rk < k_hi
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16/fp16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # the dead rows of a tile with live ones multiplied B by A's 0s (NaN where B holds a NaN or an inf):
    # 0 instead, so that they end 0, or unchanged when accumulating, whatever B holds
    acc = tl.where(m_ok[:, None], acc, 0.0)
    c = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    c_ok = (rm < M)[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def _config(a):
    """Tensor-core tiles on a GPU (128 x 128, fp32 accumulator in registers), small ones in the interpreter."""
    if not on_gpu(a):
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, UPCAST=True), {}
    block_k = 64 if a.element_size() == 2 else 32
    stages = 4 if target_arch() == 90 else 3
    return (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, UPCAST=False),
            dict(num_warps=8, num_stages=stages))


def live_matmul(out, a, b, live, live_dim: int, accumulate: bool, tiles=None):
    """``out (+)= a @ b`` over the first ``live`` rows of ``a`` (``live_dim`` 0; the other rows of
    ``out`` are 0, or unchanged when accumulating) or the first ``live`` entries of the shared
    dimension (``live_dim`` 1). ``live``: a one-element integer tensor on the device. ``tiles``: the
    launch, ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``, instead of the default
    (benchmarks/lm_head_tilings.py compares them)."""
    M, K = a.shape
    N = b.shape[1]
    blocks, launch = tiled(_config(a), tiles, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"]),)
    live_matmul_kernel[grid](
        a, b, out, live, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        LIVE_DIM=live_dim, ACCUMULATE=accumulate, PRECISION=matmul_precision(a), **blocks, **launch,
    )


def aot_cases(dtype):
    """The LM-head products of a backward chunk / single-pass block at 8192 x 4096 x 151936, with a LoRA
    adapter of rank 16 on the head: (out, a, b, LIVE_DIM, ACCUMULATE) as the ops launch them."""
    import torch

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    rows, H, V, R = 4096, 4096, 151936, 16
    h, w, z = meta(rows, H), meta(V, H), meta(rows, V)
    a, lw = meta(rows, R), meta(V, R)  # the adapter: logits += a @ lw.T
    live = meta(1, dt=torch.int64)
    products = (
        ("logits rows", z, h, w.t(), 0, False),
        ("logits += lora rows", z, a, lw.t(), 0, True),
        ("dh rows", meta(rows, H), z, w, 0, False),
        ("d lora-a rows", meta(rows, R), z, lw, 0, False),
        ("dW first chunk", meta(V, H, dt=torch.float32), z.t(), h, 1, False),
        ("dW inner", meta(V, H, dt=torch.float32), z.t(), h, 1, True),
        ("d lora-W first chunk", meta(V, R, dt=torch.float32), z.t(), a, 1, False),
        ("d lora-W inner", meta(V, R, dt=torch.float32), z.t(), a, 1, True),
    )
    for name, out, x, y, live_dim, accumulate in products:
        yield name, lambda out=out, x=x, y=y, live_dim=live_dim, accumulate=accumulate: live_matmul(
            out, x, y, live, live_dim, accumulate)
