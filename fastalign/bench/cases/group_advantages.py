"""group_advantages (GRPO): segmented C++/CUDA statistics vs vectorised PyTorch and a per-group loop."""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case
from fastalign.bench.optional import compiled, optional_impl
from fastalign.reference import advantages as ref


def _make_build(B, G, loop):
    def build(device, mode):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(B, generator=g).to(device)
        prompt = torch.randperm(B // G, generator=g).repeat_interleave(G)
        index = (prompt[torch.randperm(B, generator=g)] * 7919 + 12345).to(device)  # hashed ids, shuffled
        ids = index.tolist()
        impls = {
            "fastalign": lambda: fastalign.group_advantages(scores, index),
            "eager": lambda: ref.grpo_vectorized(scores, index),
            # trainers keep prompt ids host-side (numpy / lists): the loop gets python ints
            "python-loop": (lambda: ref.grpo_python_loop(scores, ids)) if loop else None,
        }
        fn = compiled(ref.grpo_vectorized)
        impls["torch.compile"] = None if fn is None else (lambda: fn(scores, index))
        verl = optional_impl("verl.trainer.ppo.core_algos", "compute_grpo_outcome_advantage")
        if verl is not None:
            import numpy as np

            rewards = torch.zeros(B, 2, device=device)
            rewards[:, -1] = scores
            mask = torch.ones(B, 2, device=device)
            impls["verl"] = lambda: verl[0](rewards, mask, np.asarray(ids))
        else:
            impls["verl"] = None
        return impls

    return build


def cases():
    return [
        Case(op="group_advantages", label=f"B={B} groups of {G}", params={"sequences": B, "group_size": G},
             build=_make_build(B, G, loop), modes=("fwd",), quick=quick, warmup=_make_build(64, 16, loop),
             impls=("fastalign", "eager", "python-loop", "torch.compile", "verl"),
             # reads each score (fp32) and prompt id (int64), writes its advantage (fp32)
             bytes_moved=lambda mode, B=B: 16 * B)
        for B, G, loop, quick in [(65536, 16, True, True), (1 << 20, 16, False, False)]
    ]
