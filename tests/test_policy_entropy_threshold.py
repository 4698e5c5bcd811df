"""policy_loss with a precomputed ``entropy_threshold`` (the entropy quantile over every data-parallel
process's valid tokens) against the float64 reference, on the C++ kernels and the Triton interpreter."""
import math

import pytest
import torch

import fastalign
from fastalign import reference
from helpers import assert_close


def _batch(seed, B=4, T=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.4
    A = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.25
    m[:, 0] = True
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    H = torch.rand(B, T, generator=g) * 3.0
    return [t.to(dtype) if t.is_floating_point() else t for t in (lp, old, A, m, ref, H)]


def _other_process_threshold(H, m, q):
    """The (1 - q) quantile over this batch's valid entropies and a second process's (float64)."""
    other_H, other_m = _batch(99, B=3, T=7)[5], _batch(99, B=3, T=7)[3]
    return torch.quantile(torch.cat([H.double()[m], other_H.double()[other_m]]), 1.0 - q)


def _both(backend, lp, old, A, m, ref, H, threshold, **kw):
    x, h = lp.clone().requires_grad_(True), H.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, old, A, m, ref_logprobs=ref, entropy=h, backend=backend,
                                      entropy_threshold=threshold.float(), **kw)
    loss.backward()
    xr, hr = lp.double().requires_grad_(True), H.double().requires_grad_(True)
    rloss, rmet = reference.policy_loss(xr, old.double(), A.double(), m, ref_logprobs=ref.double(), entropy=hr,
                                        entropy_threshold=threshold.float().double(), **kw)
    rloss.backward()
    return (loss, met, x.grad, h.grad), (rloss, rmet, xr.grad, hr.grad)


@pytest.mark.parametrize("loss_type, agg", [("ppo", "token-mean"), ("ppo", "seq-mean-token-mean"),
                                            ("cispo", "token-mean"), ("gmpo", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_threshold_matches_reference(cpu_backend, loss_type, agg, dtype):
    lp, old, A, m, ref, H = _batch(3, dtype=dtype)
    q = 0.4
    thr = _other_process_threshold(H, m, q)
    local = torch.quantile(H.double()[m], 1.0 - q)
    keep_global, keep_local = (H.double() >= thr.float().double()) & m, (H.double() >= local) & m
    assert not torch.equal(keep_global, keep_local)  # the other process moves the threshold
    kw = dict(loss_type=loss_type, entropy_quantile=q, kl_coef=0.05, entropy_coef=0.03, entropy_agg="token-mean")
    if agg is not None:
        kw["agg"] = agg
    (loss, met, g, gh), (rloss, rmet, rg, rgh) = _both(cpu_backend, lp, old, A, m, ref, H, thr, **kw)
    tol = 1e-5
    assert_close(loss, rloss, atol=tol, rtol=tol, what="loss")
    for k, v in rmet.items():
        assert_close(met[k], v, atol=tol, rtol=tol, what=f"metric {k}")
    grad_rtol = 1e-4 if dtype == torch.float32 else 8e-3  # the gradients come back in the inputs' dtype
    assert_close(g, rg, atol=1e-6, rtol=grad_rtol, what="d logprobs")
    assert_close(gh, rgh, atol=1e-6, rtol=grad_rtol, what="d entropy")  # the bonus acts on the kept tokens only
    assert torch.equal(gh != 0, keep_global)


def test_local_quantile_as_threshold_equals_entropy_quantile(cpu_backend):
    lp, old, A, m, ref, H = _batch(5)
    q = 0.3
    local = torch.quantile(H[m], 1.0 - q)  # fp32, as the batch's own quantile
    kw = dict(entropy_quantile=q, entropy=H, backend=cpu_backend)
    a, ma = fastalign.policy_loss(lp, old, A, m, **kw)
    b, mb = fastalign.policy_loss(lp, old, A, m, entropy_threshold=local, **kw)
    assert_close(b, a, atol=1e-7, rtol=0, what="loss")
    for k in ma:
        assert_close(mb[k], ma[k], atol=1e-7, rtol=0, what=k)


def test_nan_threshold_keeps_no_token(cpu_backend):
    """No valid entropy on any process: the quantile is NaN and no token takes the policy gradient."""
    lp, old, A, m, _, H = _batch(6)
    x = lp.clone().requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, entropy=H, entropy_quantile=0.5, backend=cpu_backend,
                                    entropy_threshold=torch.tensor(math.nan))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("threshold, options, error, match", [
    (torch.tensor(1.0), {}, ValueError, "entropy_threshold is used only with entropy_quantile"),
    (torch.tensor([1.0, 2.0]), dict(entropy_quantile=0.5), ValueError, "entropy_threshold must hold one value"),
    (torch.tensor(1), dict(entropy_quantile=0.5), TypeError, "entropy_threshold must be a floating tensor"),
    (1.0, dict(entropy_quantile=0.5), TypeError, "entropy_threshold must be a torch.Tensor"),
])
def test_entropy_threshold_bad_inputs(threshold, options, error, match):
    lp, old, A, m, _, H = _batch(7)
    with pytest.raises(error, match=match):
        fastalign.policy_loss(lp, old, A, m, entropy=H, entropy_threshold=threshold, **options)


# --------------------------------------------------------------------- the threshold over every process

class _TwoProcesses:
    """An accelerator stand-in: this process's values and another's, padded to one length and gathered."""
    num_processes = 2

    def __init__(self, other):
        self.other = other

    def pad_across_processes(self, t, dim=0, pad_index=0):
        n = max(t.shape[0], self.other.shape[0])
        self.other = torch.cat([self.other, self.other.new_full((n - self.other.shape[0],), pad_index)])
        return torch.cat([t, t.new_full((n - t.shape[0],), pad_index)])

    def gather(self, t):
        return torch.cat([t, self.other])


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_entropy_threshold_is_torch_quantile_of_every_process(q, dtype):
    """Bit for bit the torch.quantile of every process's valid entropies, as TRL's get_high_entropy_mask
    takes it (ties included: bf16 entropies repeat)."""
    from fastalign.integrations.trl import entropy_threshold

    _, _, _, m, _, H = _batch(11, B=5, T=13, dtype=dtype)
    other_H, other_m = _batch(12, B=2, T=31)[5], _batch(12, B=2, T=31)[3]
    other = torch.where(other_m, other_H, torch.inf).flatten()
    got = entropy_threshold(H, m, q, _TwoProcesses(other.clone()))
    expected = torch.quantile(torch.cat([H[m].float(), other_H[other_m]]), 1.0 - q)
    assert got.dim() == 0 and torch.equal(got, expected), (got, expected)
    assert torch.equal(entropy_threshold(H, m, q), torch.quantile(H[m].float(), 1.0 - q))  # one process


def test_trl_entropy_threshold_empty_or_nan_is_nan():
    from fastalign.integrations.trl import entropy_threshold

    _, _, _, m, _, H = _batch(13)
    assert torch.isnan(entropy_threshold(H, torch.zeros_like(m), 0.5))  # no valid token anywhere
    assert torch.isnan(entropy_threshold(H, torch.zeros_like(m), 0.5, _TwoProcesses(torch.full((3,), torch.inf))))
    H = H.clone()
    H[0, 0] = torch.nan  # a valid NaN entropy: torch.quantile gives NaN, no token is kept
    assert torch.isnan(entropy_threshold(H, m, 0.5))
