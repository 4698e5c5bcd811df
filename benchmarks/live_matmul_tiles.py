"""Tilings of the products over the labelled rows (fastalign/kernels/live_matmul.py) against torch.mm.

Run on a GPU: python benchmarks/live_matmul_tiles.py [--rows 4096] [--hidden 4096] [--vocab 151936]
(``make gpu-check`` runs it after the profile.) For the three LM-head products of a block of token rows,
every row live (where a plain matmul does the same work), in bf16: the median time and TFLOP/s of
``torch.mm`` and of ``live_matmul`` with the default tiling and each candidate
``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``, and the largest difference from
``torch.mm``'s result relative to its largest entry. The d(weight) product accumulates into fp32, as in
every backward chunk after the first (compiled for sm_90, the larger tilings spill registers there).
``--device cpu`` runs the Triton interpreter at a tiny size (a check that the script runs; its times mean
nothing).
"""
import argparse
import os
import time

import torch

#: candidate tilings on a GPU (None: the launcher's default)
GPU_TILES = (None, (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
             (128, 128, 128, 8, 8, 3))
CPU_TILES = (None, (32, 32, 16, 2, 4, 1))


def _time_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=4096, help="token rows of the block")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from fastalign.kernels.live_matmul import live_matmul

    dtype = getattr(torch, args.dtype)
    R, H, V = args.rows, args.hidden, args.vocab
    torch.manual_seed(0)
    h = torch.randn(R, H, device=device).to(dtype)
    w = (torch.randn(V, H, device=device) * 0.02).to(dtype)
    z = torch.randn(R, V, device=device).to(dtype)
    live = torch.full((1,), R, dtype=torch.int64, device=device)
    products = (  # name, out, a, b, live_dim, accumulate
        ("logits = h @ W.T", torch.empty(R, V, dtype=dtype, device=device), h, w.t(), 0, False),
        ("dh = dz @ W", torch.empty(R, H, dtype=dtype, device=device), z, w, 0, False),
        ("dW += dz.T @ h (fp32)", torch.empty(V, H, dtype=torch.float32, device=device), z.t(), h, 1, True),
    )
    tilings = GPU_TILES if device.type == "cuda" else CPU_TILES
    print(f"{R} rows, H={H}, V={V}, {args.dtype}, {device}; TFLOP/s = 2*M*N*K / time")
    print(f"{'product':24s} {'implementation':36s} {'ms':>9s} {'TFLOP/s':>8s} {'max rel diff':>12s}")
    for name, out, a, b, live_dim, accumulate in products:
        flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        want = torch.mm(a, b).float()
        scale = want.abs().max().clamp_min(1e-30)
        ms = _time_ms(lambda: torch.mm(a, b), device)
        print(f"{name:24s} {'torch.mm':36s} {ms:9.3f} {flop / ms / 1e9:8.1f} {'-':>12s}", flush=True)
        for tiles in tilings:
            label = "live_matmul default" if tiles is None else f"live_matmul {tiles}"
            run = lambda: live_matmul(out, a, b, live, live_dim, accumulate, tiles=tiles)  # noqa: E731
            try:
                out.zero_()  # the product once (added to 0 where it accumulates), then timed
                run()
                diff = ((out.float() - want).abs().max() / scale).item()
                ms = _time_ms(run, device)
            except Exception as e:  # a tiling that does not fit this device (shared memory, registers)
                print(f"{name:24s} {label:36s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            print(f"{name:24s} {label:36s} {ms:9.3f} {flop / ms / 1e9:8.1f} {diff:12.2e}", flush=True)


if __name__ == "__main__":
    main()
