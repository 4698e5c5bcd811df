"""Fused losses have first derivatives only: differentiating their gradient again (``create_graph=True``,
Hessians, gradient penalties) raises, on every backend and path, instead of giving a zero second derivative.
The first-order gradients are unchanged (checked against the float64 references). Also: the custom ops refuse
labels (and other per-row inputs) that their kernels cannot read by pointer, naming the argument."""
import pytest
import torch

import fastalign
from fastalign.ops import divergence, linear_stats, token_stats
from fastalign.reference import divergence as R_div
from fastalign.reference import policy as R_policy
from conftest import CPU_BACKENDS
from helpers import assert_close

# the eager fused paths, and the custom ops' backward ops (no autograd formula of their own)
REFUSED = "no second derivative|no autograd formula"
V, H = 11, 6


def _second_derivative(loss_of, x):
    """d/dx of the gradient's squared norm, a gradient penalty: the first gradient with a graph, then a second."""
    (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    return torch.autograd.grad((g * g).sum(), x)


def _policy_batch(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g) * 0.3 - 1.0
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return lp, old, adv, mask


POLICY_CASES = {
    "ppo": dict(loss_type="ppo"),
    "ppo+k3": dict(loss_type="ppo", kl_coef=1.0),
    "gspo": dict(loss_type="gspo"),
    "clip_cov": dict(loss_type="clip_cov"),
    "kl_cov": dict(loss_type="kl_cov", cov_ratio=0.5),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy_loss_has_no_second_derivative(backend, case):
    lp, old, adv, mask = _policy_batch()
    kw = dict(POLICY_CASES[case])
    if "kl_coef" in kw:
        kw["ref_logprobs"] = old - 0.05

    def loss_of(x):
        return fastalign.policy_loss(x, old, adv, mask, backend=backend, **kw)[0]

    x = lp.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=REFUSED):
        _second_derivative(loss_of, x)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.functional.hessian(loss_of, lp.clone())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refused_double_backward_leaves_the_first_derivative(backend):
    """The refusal comes before the backward runs: a plain backward through the same graph still gives the
    first derivative of the float64 reference."""
    lp, old, adv, mask = _policy_batch(seed=1)
    x = lp.clone().requires_grad_()
    loss = fastalign.policy_loss(x, old, adv, mask, loss_type="ppo", backend=backend)[0]
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(loss, x, create_graph=True)[0].sum().backward()
    (g,) = torch.autograd.grad(loss, x)
    xr = lp.double().requires_grad_()
    ref = R_policy.policy_loss(xr, old.double(), adv.double(), mask, loss_type="ppo", agg="token-mean")[0]
    (g_ref,) = torch.autograd.grad(ref, xr)
    assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def _linear_batch(B=2, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_pass", ["auto", True, False])
def test_linear_policy_loss_has_no_second_derivative(backend, single_pass):
    hidden, weight, labels = _linear_batch()
    old = torch.randn(labels.shape) - 2.0
    adv = torch.randn(labels.shape)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    loss_fn = fastalign.LinearPolicyLoss(loss_type="grpo", single_pass=single_pass, backend=backend)

    def loss_of(x):
        return loss_fn(x, weight, labels, old, adv, mask)[0]

    with pytest.raises(RuntimeError, match=REFUSED):
        _second_derivative(loss_of, hidden.clone().requires_grad_())
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.functional.hessian(loss_of, hidden.clone())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_pass", ["auto", True, False])
def test_linear_preference_loss_has_no_second_derivative(backend, single_pass):
    hidden, weight, labels = _linear_batch(B=4, seed=2)
    loss_fn = fastalign.LinearPreferenceLoss(single_pass=single_pass, backend=backend)
    ref = torch.full((2,), -5.0)

    def loss_of(x):
        return loss_fn(x, weight, labels, ref_chosen_logprobs=ref, ref_rejected_logprobs=ref)[0]

    with pytest.raises(RuntimeError, match=REFUSED):
        _second_derivative(loss_of, hidden.clone().requires_grad_())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_pass", ["auto", True, False])
@pytest.mark.parametrize("wrt", ["hidden", "weight"])
def test_linear_divergence_loss_has_no_second_derivative(backend, single_pass, wrt):
    hidden, weight, labels = _linear_batch(seed=3)
    teacher_hidden, teacher_weight, _ = _linear_batch(seed=4)

    def loss_of(x):
        h, w = (x, weight) if wrt == "hidden" else (hidden, x)
        return fastalign.linear_divergence_loss(h, w, teacher_hidden, teacher_weight, labels=labels, hard_weight=0.5,
                                                single_pass=single_pass, backend=backend)[0]

    x = (hidden if wrt == "hidden" else weight).clone()
    with pytest.raises(RuntimeError, match=REFUSED) as raised:
        _second_derivative(loss_of, x.requires_grad_())
    assert "single_pass=False" not in str(raised.value)  # it has no second derivative either
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.functional.hessian(loss_of, x.detach())


@pytest.mark.parametrize("single_pass", [True, False])
def test_linear_divergence_first_derivative_after_a_refused_second(single_pass):
    """A retained graph still gives the first derivative (float64 reference) after the refusal, once per
    forward for the single pass."""
    hidden, weight, labels = _linear_batch(seed=5)
    teacher_hidden, teacher_weight, _ = _linear_batch(seed=6)
    h = hidden.clone().requires_grad_()
    loss, _ = fastalign.linear_divergence_loss(h, weight, teacher_hidden, teacher_weight, single_pass=single_pass)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)
    (g,) = torch.autograd.grad(loss, h)
    hr = hidden.double().requires_grad_()
    ref, _ = R_div.linear_divergence_loss(hr, weight.double(), teacher_hidden.double(), teacher_weight.double())
    (g_ref,) = torch.autograd.grad(ref, hr)
    assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# per-row inputs read by pointer
# ---------------------------------------------------------------------------------------------

def _token_stats_args(labels, logits=None):
    logits = torch.randn(1, 4, 7) if logits is None else logits
    return (logits, labels, 1.0, -100, False, False, False, "cpp", False)


LABELS = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize("fake", [False, True])
def test_token_stats_op_refuses_labels_it_cannot_read(fake):
    """int32 labels were read as int64 (garbage, and past the end of the buffer); the checks run in the fake
    too (torch.compile sees the same errors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        ((LABELS.int(),), TypeError, "labels must be torch.int64"),
        ((LABELS[:3],), ValueError, "labels must have 4 elements"),
        ((torch.tensor([1, 0, 2, 0, 3, 0, 4, 0])[::2],), ValueError, "labels must be contiguous"),
        ((LABELS, torch.randn(1, 4, 7, dtype=torch.float64)), TypeError, "logits must be float32, bfloat16"),
        ((LABELS, torch.randn(1, 4, 14)[..., ::2]), ValueError, "logits must have contiguous rows"),
    ]
    for args, error, message in cases:
        args = _token_stats_args(*args)
        if fake:
            mode = FakeTensorMode()
            args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with mode, pytest.raises(error, match=message):
                token_stats.token_stats(*args)
        else:
            with pytest.raises(error, match=message):
                torch.ops.fastalign.token_stats(*args)
    logits = torch.randn(1, 4, 7)
    lp = torch.ops.fastalign.token_stats(*_token_stats_args(LABELS, logits))[0]
    assert_close(lp, torch.log_softmax(logits[0].double(), -1).gather(1, LABELS[:, None])[:, 0], atol=1e-6)


def test_token_stats_backward_ops_refuse_int32_labels():
    logits = torch.randn(1, 4, 7)
    f32 = torch.zeros(4)
    empty = torch.empty(0)
    for op in (token_stats.token_stats_backward, token_stats.token_stats_backward_):
        with pytest.raises(TypeError, match="labels must be torch.int64"):
            op(torch.ones(4), None, None, logits.clone(), LABELS.int(), f32, f32, empty, empty, 1.0, -100, "cpp")


def test_linear_stats_ops_refuse_int32_labels():
    hidden, weight = torch.randn(4, H), torch.randn(V, H)
    with pytest.raises(TypeError, match="labels must be torch.int64"):
        linear_stats.linear_stats(hidden, weight, None, None, None, LABELS.int(), 1.0, 0.0, 1.0, -100, False, False,
                                  False, "cpp", 0, 0, 0.0)
    e = torch.empty(0)
    with pytest.raises(TypeError, match="labels must be torch.int64"):
        linear_stats.linear_stats_backward(torch.ones(4), None, None, hidden, weight, None, None, None, LABELS.int(),
                                           torch.zeros(4), e, e, 1.0, 0.0, 1.0, -100, "cpp", 0, 0, 0.0, True, True,
                                           False, False, torch.zeros(4))


def test_divergence_rows_op_refuses_per_row_inputs_it_cannot_read():
    student, teacher = torch.randn(4, V), torch.randn(4, V)
    ones = torch.ones(4)
    with pytest.raises(TypeError, match="labels must be torch.int64"):
        divergence.divergence_rows(student, teacher, ones, LABELS.int(), None, None, 1.0, "jsd", 0.5, -100, True, "cpp")
    with pytest.raises(TypeError, match="mask must be torch.float32"):
        divergence.divergence_rows(student, teacher, ones.bool(), None, None, None, 1.0, "jsd", 0.5, -100, False, "cpp")
    with pytest.raises(ValueError, match="grad_soft must have 4 elements"):
        divergence.divergence_rows(student, teacher, ones, None, ones[:3], None, 1.0, "jsd", 0.5, -100, False, "cpp")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_function_transforms_raise_and_vmap_runs(backend):
    """``torch.func.grad`` (a functorch transform of the backward) raises a RuntimeError through the fused
    ops, as docs/bad-inputs.md says, instead of returning a gradient; a forward ``vmap`` runs and equals the
    loop over the mapped dimension."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, V, generator=g)
    labels = torch.randint(0, V, (3, 4), generator=g)

    def total(x):
        return fastalign.token_logprobs(x, labels, backend=backend).logprobs.sum()

    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(total)(logits)
    mapped = torch.vmap(lambda x, y: fastalign.token_logprobs(x, y, backend=backend).logprobs)(logits, labels)
    looped = torch.stack([fastalign.token_logprobs(logits[i], labels[i], backend=backend).logprobs for i in range(3)])
    assert_close(mapped, looped, atol=0, rtol=0, what="vmap of token_logprobs")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_of_the_fused_losses_is_the_loop(backend):
    """A forward ``vmap`` of the losses (docs/bad-inputs.md) equals the loop: on the C++ path the mapped inputs
    pass for plain tensors, and the call must take the custom op, not the eager shortcut."""
    g = torch.Generator().manual_seed(5)
    K, B, T, H, Vs = 3, 2, 4, 4, 9
    lp = torch.randn(K, B, T, generator=g) - 1
    old = lp + 0.1 * torch.randn(K, B, T, generator=g)
    adv = torch.randn(K, B, T, generator=g)
    mask = torch.ones(K, B, T, dtype=torch.bool)
    h = torch.randn(K, B, T, H, generator=g)
    W = torch.randn(Vs, H, generator=g)
    y = torch.randint(0, Vs, (K, B, T), generator=g)
    cases = [
        (lambda a, b, c, d: fastalign.PolicyLoss(loss_type="grpo", backend=backend)(a, b, c, d)[0], (lp, old, adv, mask)),
        (lambda a, b, c, d, e: fastalign.LinearPolicyLoss(backend=backend)(a, W, b, c, d, e)[0], (h, y, old, adv, mask)),
        (lambda a: fastalign.linear_divergence_loss(a, W, a * 0.3, W * 0.5, backend=backend)[0], (h,)),
        (lambda a, b: fastalign.LinearPreferenceLoss("sigmoid", backend=backend)(a, W, b)[0], (h, y)),
        (lambda a: fastalign.linear_mean_logits(a, W, backend=backend), (h,)),
    ]
    for f, args in cases:
        mapped = torch.vmap(f)(*args)
        looped = torch.stack([f(*(a[i] for a in args)) for i in range(K)])
        assert_close(mapped, looped, atol=1e-6, rtol=1e-6, what="vmap of a fused loss")
    # the ops whose autograd Function has no vmap rule raise PyTorch's error, as docs/bad-inputs.md says
    q = torch.softmax(torch.randn(K, B, T, Vs, generator=g), -1)
    for f, args in ((lambda a: fastalign.linear_topk_logprobs(a, W, 3).logprobs, (h,)),
                    (lambda a: fastalign.linear_mean_logits(a, W, softcap=2.0, backend=backend), (h,)),
                    (lambda a, b: fastalign.linear_soft_cross_entropy(a, W, b), (h, q))):
        with torch.no_grad(), pytest.raises(RuntimeError, match="functorch transforms"):
            torch.vmap(f)(*args)
