"""Option checks under torch.compile and functorch: an invalid option raises with its message (the Dynamo error's
cause), also for the symbolic floats of ``dynamic=True``; the pure-torch ops run under vmap and grad."""
import math

import pytest
import torch

import fastalign as fa


def _compiled_error(fn, *args) -> str:
    """The message a compiled call's error carries (``fullgraph=True`` wraps the raised error as its cause)."""
    with pytest.raises(Exception) as err:
        fn(*args)
    cause = err.value.__cause__
    return str(err.value) + " | " + ("" if cause is None else str(cause))


def test_an_infinite_option_raises_under_dynamic_compile():
    """abs(v) != inf passed a symbolic float (taken for finite): masked_whiten(eps=inf) returned zeros and
    preference_loss(beta=inf) inf under dynamic=True. The check guards on the value now."""
    torch._dynamo.reset()
    x, m = torch.randn(2, 5, generator=torch.Generator().manual_seed(1)), torch.ones(2, 5)
    whiten = torch.compile(lambda x, m, eps: fa.masked_whiten(x, m, eps), fullgraph=True, dynamic=True,
                           backend="eager")
    assert torch.isfinite(whiten(x, m, 1e-6)).all()
    assert "eps must be finite" in _compiled_error(whiten, x, m, math.inf)
    lc, lr = -torch.rand(4), -torch.rand(4)
    pref = torch.compile(lambda beta: fa.preference_loss(lc, lr, lc - 0.1, lr - 0.1, beta=beta)[0], fullgraph=True,
                         dynamic=True, backend="eager")
    assert torch.isfinite(pref(0.1))
    assert "beta must be > 0 and finite" in _compiled_error(pref, math.inf)


@pytest.mark.parametrize("options, message", [
    (dict(eps_high=math.nan), "eps_high must be finite"),
    (dict(loss_type="grpoo"), "loss_type must be one of"),
    (dict(cov_lb=0.1), "cov_lb does not apply to loss_type 'ppo'"),
    (dict(eps_hgh=0.2), "unknown option 'eps_hgh'"),
])
def test_option_errors_keep_their_message_under_compile(options, message):
    """Building an OptionError (its own __init__) and the did-you-mean hint (difflib) did not trace: the compiled
    call failed with an unrelated Dynamo error and no cause."""
    torch._dynamo.reset()
    lp, old, adv, m = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2), torch.ones(2, 4)
    step = torch.compile(lambda lp: fa.policy_loss(lp, old, adv, m, **options)[0], fullgraph=True, backend="eager")
    assert message in _compiled_error(step, lp)


def test_option_error_names_its_option_and_pickles():
    import pickle

    from fastalign.policy_config import OptionError

    with pytest.raises(OptionError) as err:
        fa.PolicyConfig(eps_high=-1.0)
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.option, str(again)) == ("eps_high", str(err.value)) and err.value.option == "eps_high"


def test_k3_and_packed_sequence_sums_run_under_functorch():
    """kl_penalty's k3 (an autograd.Function) had no setup_context / vmap rule, and sequence_logprobs'
    cu_seqlens sums added in place: vmap, grad and jacrev raised."""
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mapped = torch.vmap(lambda a, b: fa.kl_penalty(a, b))(lp, ref)
    torch.testing.assert_close(mapped, torch.stack([fa.kl_penalty(a, b) for a, b in zip(lp, ref)]))
    grad = torch.func.grad(lambda a: fa.kl_penalty(a, ref, kl_clamp=False).sum())(lp)
    want = -torch.expm1(ref.double() - lp.double()).float()  # d/d lp of exp(x) - x - 1, x = ref - lp
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 1, 6, generator=g)
    cu = torch.tensor([0, 2, 6])
    mapped = torch.vmap(lambda t: fa.sequence_logprobs(t, cu_seqlens=cu).sum)(x)
    torch.testing.assert_close(mapped, torch.stack([fa.sequence_logprobs(t, cu_seqlens=cu).sum for t in x]))


def test_clip_cov_with_a_generator_names_it_under_compile():
    """A draw from a torch.Generator does not trace: the compiled step failed inside Dynamo; it names the
    argument now, and the global generator compiles."""
    torch._dynamo.reset()
    lp, old, adv, m = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2), torch.ones(2, 4)
    gen = torch.Generator().manual_seed(0)
    step = torch.compile(lambda lp: fa.policy_loss(lp, old, adv, m, loss_type="clip_cov", generator=gen)[0],
                         fullgraph=True, backend="eager")
    assert "generator: torch.compile cannot trace" in _compiled_error(step, lp)
    plain = torch.compile(lambda lp: fa.policy_loss(lp, old, adv, m, loss_type="clip_cov")[0], fullgraph=True,
                          backend="eager")
    assert torch.isfinite(plain(lp))


def test_preference_single_pass_true_under_compile_names_the_option():
    """LinearPreferenceLoss(single_pass=True) under torch.compile raises the ValueError LinearPolicyLoss and
    linear_divergence_loss raise there (the two passes run traced); it failed inside Dynamo on torch.autograd.grad,
    naming nothing."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(40, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 40, (4, 6), generator=g)
    rc, rr = -8 - torch.rand(2, generator=g), -9 - torch.rand(2, generator=g)
    pref = fa.LinearPreferenceLoss(loss_type="sigmoid", beta=0.1, single_pass=True)
    step = torch.compile(lambda h, w: pref(h, w, labels, ref_chosen_logprobs=rc, ref_rejected_logprobs=rr)[0],
                         fullgraph=True, backend="eager")
    assert "single_pass=True does not apply: under torch.compile" in _compiled_error(step, hidden, weight)


def test_linear_mean_logits_under_autocast_keeps_fp32_products():
    """fp32 inputs under a bf16 autocast give the fp32 means and gradients bit for bit, as the fused ops' (its plain
    products ran in bf16 there: off by 1.3e-3)."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    bias, classes = torch.randn(40, generator=g), torch.rand(40, generator=g)
    for options in ({}, dict(bias=bias, logit_scale=0.5), dict(class_weights=classes)):
        out = []
        for autocast in (False, True):
            h = hidden.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                mean = fa.linear_mean_logits(h, weight, **options)
            mean.sum().backward()
            out.append((mean, h.grad))
        assert out[1][0].dtype == torch.float32
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]), options
