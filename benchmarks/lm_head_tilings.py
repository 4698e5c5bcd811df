"""Tilings of the LM-head kernels against torch.mm: the forward statistics kernel and the products over the
labelled rows (fastalign/kernels/linear_stats.py, live_matmul.py).

Run on a GPU: python benchmarks/lm_head_tilings.py [--tokens 8192] [--rows 4096] [--hidden 4096] [--vocab 151936]
(``make gpu-check`` runs it after the profile.) In bf16, every row labelled (where a plain matmul does the same
work), the median time and TFLOP/s (2 M N K over the time) of ``torch.mm`` and of the kernel with its default
tiling and with each candidate, and the largest difference from the torch result:

- the forward statistics (log-probs) of ``--tokens`` rows, candidates ``(BLOCK_N, BLOCK_V, BLOCK_H,
  num_warps, num_stages)``, against ``torch.mm`` of the logits alone (the least any fused forward does);
  the difference is in log-probs, against log-softmax of the fp32 product;
- the three products of a block of ``--rows`` rows (logits, d(hidden), d(weight) accumulated in fp32 as in
  every backward chunk after the first), candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
  num_stages)``; the difference relative to the product's largest entry.

Compiled for sm_90, the larger tilings spill registers in places (the accumulated d(weight)): a candidate is
only a measurement. ``--device cpu`` runs the Triton interpreter at a tiny size (a check that the script
runs; its times mean nothing).
"""
import argparse
import os
import time

import torch

#: candidates on a GPU (None: the launcher's default), then in the interpreter
FORWARD_TILES = (None, (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
                 (64, 256, 64, 8, 3))
PRODUCT_TILES = (None, (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4),
                 (128, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3))
CPU_FORWARD_TILES = (None, (16, 32, 16, 4, 1))
CPU_PRODUCT_TILES = (None, (32, 32, 16, 2, 4, 1))


def _time_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _row(what, impl, ms, flop, diff=None):
    shown = "-" if diff is None else f"{diff:.2e}"
    print(f"{what:24s} {impl:42s} {ms:9.3f} {flop / ms / 1e9:8.1f} {shown:>10s}", flush=True)


def _candidates(what, flop, tilings, device, run, check):
    """Time ``run(tiles)`` for each tiling after ``check(tiles)`` (one call, its difference from torch); a
    tiling that does not fit the device (shared memory, registers) is reported and skipped."""
    for tiles in tilings:
        label = "default" if tiles is None else str(tiles)
        try:
            error = check(tiles)
            ms = _time_ms(lambda: run(tiles), device)
        except Exception as e:
            print(f"{what:24s} {label:42s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        _row(what, label, ms, flop, error)


def forward(args, device, dtype, tilings):
    from fastalign.kernels.linear_stats import linear_stats_forward
    from fastalign.ops._launch import linear_outputs
    from fastalign.ops.vocab_pieces import RENORMALISE_ABOVE

    N, H, V = args.tokens, args.hidden, args.vocab
    h = torch.randn(N, H, device=device).to(dtype)
    w = (torch.randn(V, H, device=device) * 0.05).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    logits = h.float() @ w.float().t()
    want = logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    del logits
    out = linear_outputs(N, device, False, False, False, False)
    flop = 2 * N * H * V
    _row("forward log-probs", "torch.mm (logits only)", _time_ms(lambda: torch.mm(h, w.t()), device), flop)

    def run(tiles):
        linear_stats_forward(h, w, None, None, labels, 1.0, 0.0, 1.0, -100, out, RENORMALISE_ABOVE, tiles=tiles)

    def check(tiles):
        run(tiles)
        return (out[0] - want).abs().max().item()

    _candidates("forward log-probs", flop, tilings, device, run, check)


def products(args, device, dtype, tilings):
    from fastalign.kernels.live_matmul import live_matmul

    R, H, V = args.rows, args.hidden, args.vocab
    h = torch.randn(R, H, device=device).to(dtype)
    w = (torch.randn(V, H, device=device) * 0.02).to(dtype)
    z = torch.randn(R, V, device=device).to(dtype)
    live = torch.full((1,), R, dtype=torch.int64, device=device)
    cases = (  # name, out, a, b, live_dim, accumulate
        ("logits = h @ W.T", torch.empty(R, V, dtype=dtype, device=device), h, w.t(), 0, False),
        ("dh = dz @ W", torch.empty(R, H, dtype=dtype, device=device), z, w, 0, False),
        ("dW += dz.T @ h (fp32)", torch.empty(V, H, dtype=torch.float32, device=device), z.t(), h, 1, True),
    )
    for name, out, a, b, live_dim, accumulate in cases:
        flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        want = torch.mm(a, b).float()
        scale = want.abs().max().clamp_min(1e-30)
        _row(name, "torch.mm", _time_ms(lambda: torch.mm(a, b), device), flop)

        def run(tiles, out=out, a=a, b=b, live_dim=live_dim, accumulate=accumulate):
            live_matmul(out, a, b, live, live_dim, accumulate, tiles=tiles)

        def check(tiles, out=out, want=want, scale=scale):
            out.zero_()  # the checked call adds to 0 where it accumulates
            run(tiles)
            return ((out.float() - want).abs().max() / scale).item()

        _candidates(name, flop, tilings, device, run, check)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192, help="rows of the forward")
    p.add_argument("--rows", type=int, default=4096, help="token rows of a block's products")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    print(f"H={args.hidden}, V={args.vocab}, {args.dtype}, {device}; TFLOP/s = 2 M N K / time")
    print(f"{'kernel':24s} {'tiling':42s} {'ms':>9s} {'TFLOP/s':>8s} {'max diff':>10s}")
    forward(args, device, dtype, FORWARD_TILES if gpu else CPU_FORWARD_TILES)
    products(args, device, dtype, PRODUCT_TILES if gpu else CPU_PRODUCT_TILES)


if __name__ == "__main__":
    main()
