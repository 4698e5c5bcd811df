"""policy_loss fwd+bwd at 1M tokens: fused and eager steps alternate in one process (same load for both).

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/policy_loss_interleaved.py [ppo clip_cov kl_cov]
(NT = torch threads, REPS = timed pairs). Prints median and min of both sides.
"""
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("NT", "2")))
import fastalign
from fastalign.reference import policy as ref
from fastalign.bench.cases.policy_loss import _batch
B, T = 1024, 1024
lp0, old, A, m, refl, H0 = _batch(B, T, "cpu")
g = torch.Generator().manual_seed(0)
def mk(lt, fused):
    def s():
        x = lp0.detach().requires_grad_(True)
        if lt == "ppo":
            h = H0.detach().requires_grad_(True)
            f = fastalign.policy_loss if fused else ref.policy_loss
            loss = f(x, old, A, m, ref_logprobs=refl, kl_type="k3", kl_coef=1e-3, entropy=h, entropy_coef=1e-3)[0]
        elif fused:
            loss = fastalign.policy_loss(x, old, A, m, loss_type=lt, cov_ratio=2e-4, generator=g)[0]
        else:
            loss = ref.eager_cov_loss(x, old, A, m, loss_type=lt, ratio=2e-4, generator=g)
        loss.backward()
    return s
reps = int(os.environ.get("REPS", "30"))
for lt in sys.argv[1:] or ["ppo", "clip_cov", "kl_cov"]:
    f, e = mk(lt, True), mk(lt, False)
    for _ in range(3): f(); e()
    tf, te = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); t1 = time.perf_counter(); e(); t2 = time.perf_counter()
        tf.append((t1 - t0) * 1e3); te.append((t2 - t1) * 1e3)
    mf, me = statistics.median(tf), statistics.median(te)
    print(f"{lt:9s} threads={torch.get_num_threads()} fused median {mf:6.2f} ms min {min(tf):6.2f} | eager median {me:6.2f} min {min(te):6.2f} | speedup median {me/mf:5.2f}x min {min(te)/min(tf):5.2f}x")
