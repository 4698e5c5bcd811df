"""Token-level ops on ``[B, T]`` tensors: the k3 ``kl_penalty`` (forward, and with its gradient) and
``masked_whiten`` (forward: advantages take no gradient), against their formulas in eager PyTorch (the reference's
k3, verl's whitening), torch.compile of those, and verl's own."""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case, grad_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.reference import policy as ref


def _batch(B, T, device):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3.0
    refl = lp + torch.randn(B, T, generator=g) * 0.05
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    return [t.to(device) for t in (lp, refl, m)]


def _eager_k3(x, refl):
    return ref.kl_penalty(x, refl, "k3")


def _make_kl(B, T):
    def build(device, mode):
        lp, refl, m = _batch(B, T, device)
        backward = mode == "fwd+bwd"
        wrap = lambda fn: grad_step(fn and (lambda x: fn(x, refl)), (lp,), backward, loss=torch.sum)  # noqa: E731
        impls = {"fastalign": wrap(lambda x, r: fastalign.kl_penalty(x, r, "k3")), "eager": wrap(_eager_k3),
                 "torch.compile": wrap(compiled(_eager_k3))}
        verl = optional_impl("verl.trainer.ppo.core_algos", "kl_penalty")
        impls["verl"] = wrap(verl and (lambda x, r: verl[0](x, r, "low_var_kl")))
        return impls

    return build


def _eager_whiten(x, m):
    """verl's formula (unbiased variance plus eps), in x's precision."""
    mf = m.to(x.dtype)
    n = mf.sum()
    mean = (x * mf).sum() / n
    var = ((x - mean) ** 2 * mf).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mf


def _make_whiten(B, T):
    def build(device, mode):
        x, _, m = _batch(B, T, device)
        step = lambda fn: fn and (lambda: fn(x, m))  # noqa: E731
        verl = optional_impl("verl.utils.torch_functional", "masked_whiten")
        mf = m.float()
        return {"fastalign": step(fastalign.masked_whiten), "eager": step(_eager_whiten),
                "torch.compile": step(compiled(_eager_whiten)), "verl": verl and (lambda: verl[0](x, mf))}

    return build


def cases():
    out = []
    for B, T, quick in [(256, 1024, True), (1024, 4096, False)]:
        n = B * T
        out.append(Case(
            op="kl_penalty", label=f"k3 B={B} T={T}", params={"B": B, "T": T}, build=_make_kl(B, T), quick=quick,
            warmup=_make_kl(2, 16), impls=("fastalign", "eager", "torch.compile", "verl"),
            # reads lp and ref (fp32), writes the estimate; backward reads them again and writes d lp
            bytes_moved=lambda mode, n=n: n * (12 if mode == "fwd" else 24),
            required_bytes=lambda mode, n=n: 0 if mode == "fwd" else 4 * n))
        out.append(Case(
            op="masked_whiten", label=f"B={B} T={T}", params={"B": B, "T": T}, build=_make_whiten(B, T), quick=quick,
            warmup=_make_whiten(2, 16), modes=("fwd",), impls=("fastalign", "eager", "torch.compile", "verl"),
            # three reads of x and the bool mask, one write
            bytes_moved=lambda mode, n=n: n * 17))
    return out
