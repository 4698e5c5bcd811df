"""policy_loss: fused per-token loss + d(logprobs) (and Clip-Cov / KL-Cov selection) vs eager PyTorch."""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case, grad_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.reference import policy as ref

KL_COEF = 1e-3
ENT_COEF = 1e-3
COV_RATIO = 2e-4


def _batch(B, T, device):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3.0
    old = lp + torch.randn(B, T, generator=g) * 0.2
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()  # sequence-level advantages, per token
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    refl = lp + torch.randn(B, T, generator=g) * 0.3
    H = torch.rand(B, T, generator=g) * 3.0
    return [t.to(device) for t in (lp, old, A, m, refl, H)]


def _ppo_eager(lp, old, A, m, refl, H):
    return ref.policy_loss(lp, old, A, m, ref_logprobs=refl, kl_type="k3", kl_coef=KL_COEF, entropy=H,
                           entropy_coef=ENT_COEF)[0]


def _make_ppo(B, T):
    def build(device, mode):
        lp0, old, A, m, refl, H0 = _batch(B, T, device)
        backward = mode == "fwd+bwd"
        mf = m.float()

        def wrap(fn):
            return grad_step(fn and (lambda x, h: fn(x, old, A, m, refl, h)), (lp0, H0), backward)

        def fused(x, old, A, m, refl, h):
            return fastalign.policy_loss(x, old, A, m, ref_logprobs=refl, kl_type="k3", kl_coef=KL_COEF, entropy=h,
                                         entropy_coef=ENT_COEF)[0]

        impls = {"fastalign": wrap(fused), "eager": wrap(_ppo_eager), "torch.compile": wrap(compiled(_ppo_eager))}
        verl = optional_impl("verl.trainer.ppo.core_algos", "compute_policy_loss", "kl_penalty", "agg_loss")
        if verl is not None:
            pg_fn, kl_fn, agg_fn = verl

            def verl_step(x, old, A, m, refl, h):
                pg = pg_fn(old_log_prob=old, log_prob=x, advantages=A, response_mask=mf, cliprange=0.2,
                           loss_agg_mode="token-mean")[0]
                kl = agg_fn(kl_fn(x, refl, "low_var_kl"), mf, "token-mean")
                ent = agg_fn(h, mf, "token-mean")
                return pg + KL_COEF * kl - ENT_COEF * ent
            impls["verl"] = wrap(verl_step)
        else:
            impls["verl"] = None
        return impls

    return build


def _make_cov(B, T, loss_type):
    def build(device, mode):
        lp0, old, A, m, _refl, _H = _batch(B, T, device)
        backward = mode == "fwd+bwd"
        g = torch.Generator(device=device).manual_seed(0)

        def wrap(fn):
            return grad_step(fn and (lambda x: fn(x, old, A, m)), (lp0,), backward)

        def fused(x, old, A, m):
            return fastalign.policy_loss(x, old, A, m, loss_type=loss_type, cov_ratio=COV_RATIO,
                                         generator=g if loss_type == "clip_cov" else None)[0]

        def eager(x, old, A, m):
            return ref.eager_cov_loss(x, old, A, m, loss_type=loss_type, ratio=COV_RATIO, generator=g)

        def eager_nogen(x, old, A, m):  # torch.compile does not trace a Generator argument
            return ref.eager_cov_loss(x, old, A, m, loss_type=loss_type, ratio=COV_RATIO)

        return {"fastalign": wrap(fused), "eager": wrap(eager), "torch.compile": wrap(compiled(eager_nogen))}

    return build


def _bytes(per_token_fwd, per_token_bwd, n):
    return lambda mode: n * (per_token_fwd if mode == "fwd" else per_token_fwd + per_token_bwd)


def cases():
    out = []
    for B, T, quick in [(256, 1024, True), (1024, 1024, False)]:
        n = B * T
        out.append(Case(
            op="policy_loss", label=f"ppo+k3+entropy B={B} T={T}", params={"B": B, "T": T, "loss_type": "ppo"},
            build=_make_ppo(B, T), quick=quick, warmup=_make_ppo(2, 16),
            impls=("fastalign", "eager", "torch.compile", "verl"),
            # reads lp, old, A, ref, H (fp32) and the mask; backward writes d lp and d H
            bytes_moved=_bytes(21, 8, n), required_bytes=lambda mode, n=n: 0 if mode == "fwd" else 8 * n))
    for B, T, lt, quick in [(256, 1024, "clip_cov", True), (1024, 1024, "clip_cov", False),
                            (1024, 1024, "kl_cov", False)]:
        n = B * T
        out.append(Case(
            op="policy_loss", label=f"{lt} B={B} T={T}", params={"B": B, "T": T, "loss_type": lt},
            build=_make_cov(B, T, lt), quick=quick, warmup=_make_cov(4, 64, lt),
            # covariance means, selection and loss each read lp, old, A and the mask; backward writes d lp
            bytes_moved=_bytes(13, 4, n), required_bytes=lambda mode, n=n: 0 if mode == "fwd" else 4 * n))
    return out
