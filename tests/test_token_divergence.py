"""fastalign.token_divergence (the per-token distillation divergence from two models' logits) against the float64
references of fastalign.reference (each divergence's own function, checked against torch's there and in
test_linear_divergence_distances.py): values and gradients of D and the NLL with random upstream gradients, every
divergence, a temperature, ignored and out-of-range labels, NaN rows, bf16, the in-place backward, torch.compile
and the bad inputs, on both CPU backends."""
import math

import pytest
import torch

import fastalign
from fastalign.reference import divergence as R
from fastalign.reference.logprobs import token_logprobs as reference_logprobs
from conftest import CPU_BACKENDS
from helpers import assert_close

V = 37
CASES = [("jsd", None), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.3), ("tvd", None), ("cosine", None)]


def _reference(zs, zt, y, divergence, beta, temperature, ignore_index=-100):
    """(D, entropy, NLL) in float64, 0 where the label is ignore_index."""
    if divergence == "jsd":
        d = R.generalized_jsd(zs, zt, beta=0.5 if beta is None else beta, temperature=temperature)
    elif divergence == "tvd":
        d = R.total_variation(zs, zt, temperature=temperature)
    else:
        d = R.cosine_distance(zs, zt)
    ent = R.entropy(zs, temperature=temperature)
    if y is None:
        return d, ent, None
    keep = y != ignore_index
    nll = -reference_logprobs(zs, y, ignore_index=ignore_index, dtype=torch.float64)[0]
    return torch.where(keep, d, 0.0), torch.where(keep, ent, 0.0), nll


def _batch(seed, shape=(2, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    zt = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[1] = -100
    return g, zs, zt, y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_values_and_gradients_against_float64(backend, divergence, beta):
    g, zs, zt, y = _batch(3)
    x = zs.clone().requires_grad_(True)
    out = fastalign.token_divergence(x, zt, y, divergence=divergence, beta=beta, temperature=1.3, backend=backend)
    xd = zs.double().requires_grad_(True)
    d, ent, nll = _reference(xd, zt, y, divergence, beta, 1.3)
    assert_close(out.divergence, d, atol=2e-6, rtol=1e-5, what="divergence")
    assert_close(out.entropy, ent, atol=2e-6, rtol=1e-5, what="entropy")
    assert_close(out.nll, nll, atol=2e-6, rtol=1e-5, what="nll")
    assert out.divergence.dtype == out.nll.dtype == torch.float32 and not out.entropy.requires_grad
    gd, gn = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    (out.divergence * gd + out.nll * gn).sum().backward()
    (d * gd + nll * gn).sum().backward()
    assert_close(x.grad, xd.grad, atol=2e-6, rtol=1e-5, what="d(student_logits)")
    assert bool((x.grad[0, 1] == 0).all()), "an ignored token has a zero gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_labels_every_token_is_scored_and_only_d_has_a_gradient(backend):
    g, zs, zt, _ = _batch(4)
    x = zs.clone().requires_grad_(True)
    out = fastalign.token_divergence(x, zt, divergence="tvd", backend=backend)
    assert out.nll is None
    xd = zs.double().requires_grad_(True)
    d = R.total_variation(xd, zt)
    assert_close(out.divergence, d, atol=2e-6, what="divergence")
    w = torch.randn(2, 3, generator=g)
    (out.divergence * w).sum().backward()
    (d * w).sum().backward()
    assert_close(x.grad, xd.grad, atol=2e-6, what="d(student_logits)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logits_and_out_of_range_labels_give_nan_rows(backend):
    """A NaN student logit: that token's D, NLL and gradient row are NaN, the others exact; a label outside [0, V)
    (not ignore_index): a NaN NLL, never another row's logit."""
    _, zs, zt, y = _batch(5)
    zs[0, 2, 4] = math.nan
    y[1, 0] = V + 3
    x = zs.clone().requires_grad_(True)
    out = fastalign.token_divergence(x, zt, y, backend=backend)
    d_out, nll_out = out.divergence.detach(), out.nll.detach()
    assert math.isnan(d_out[0, 2]) and math.isnan(nll_out[0, 2]) and math.isnan(nll_out[1, 0])
    d, _, nll = _reference(zs.double(), zt, y.clamp(max=V - 1), "jsd", None, 1.0)
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[0, 2] = ok[1, 0] = False
    assert_close(out.divergence[ok], d[ok], atol=2e-6, what="divergence")
    assert_close(out.nll[ok], nll[ok], atol=2e-6, what="nll")
    (out.divergence.sum() + out.nll.nan_to_num().sum()).backward()
    assert bool(x.grad[0, 2].isnan().all()) and bool(x.grad[0, 0].isfinite().all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence, beta", CASES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_nan_logit_of_either_model_gives_a_nan_row_as_the_reference(backend, divergence, beta, side):
    """A NaN logit of the student or the teacher: a NaN divergence at that token in the kernels and in the float64
    reference (whose 0 log 0 = 0 rule took a NaN probability for 0 at beta = 0 and 1), the other rows equal."""
    _, zs, zt, y = _batch(7)
    (zs if side == "student" else zt)[1, 1, 3] = math.nan
    options = {} if beta is None else dict(beta=beta)
    got = fastalign.token_divergence(zs, zt, y, divergence=divergence, backend=backend, **options).divergence
    want = _reference(zs.double(), zt, y, divergence, beta, 1.0)[0]
    assert bool(got[1, 1].isnan()) and bool(want[1, 1].isnan())
    ok = torch.ones_like(got, dtype=torch.bool)
    ok[1, 1] = False
    assert_close(got[ok], want[ok], atol=2e-6, what="divergence")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["jsd", "tvd"])
def test_bf16_logits_against_float64(backend, divergence):
    """bf16 logits, read in fp32 (the C++ kernel through an fp32 copy): the outputs at fp32 accuracy of the bf16
    values, the gradient in bf16."""
    g, zs, zt, y = _batch(6, dtype=torch.bfloat16)
    x = zs.clone().requires_grad_(True)
    out = fastalign.token_divergence(x, zt, y, divergence=divergence, backend=backend)
    xd = zs.double().requires_grad_(True)
    d, _, nll = _reference(xd, zt.double(), y, divergence, None, 1.0)
    assert_close(out.divergence, d, atol=1e-5, rtol=1e-4, what="divergence")
    assert_close(out.nll, nll, atol=1e-5, rtol=1e-4, what="nll")
    gd = torch.randn(2, 3, generator=g)
    (out.divergence * gd + out.nll).sum().backward()
    (d * gd + nll).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad, xd.grad, atol=2e-3, rtol=1e-2, what="d(student_logits)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_writes_the_gradient_over_intermediate_logits(backend):
    """A model's logits (an intermediate): d(logits) is their own buffer and equals the allocating backward's; a
    leaf that requires grad is refused; a slice ``[:, :-1]`` of intermediate logits is written in place too."""
    g, zs, zt, y = _batch(7, shape=(2, 4))
    base = zs.clone().requires_grad_(True)
    want = torch.autograd.grad(fastalign.token_divergence(base * 1.0, zt, y, backend=backend).nll.sum()
                               + fastalign.token_divergence(base * 1.0, zt, y, backend=backend).divergence.sum(),
                               base)[0]
    logits = base * 1.0
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    out = fastalign.token_divergence(logits, zt, y, inplace_backward=True, backend=backend)
    (out.nll + out.divergence).sum().backward()
    assert seen == [logits.data_ptr()]
    assert_close(base.grad, want, atol=1e-6, what="in-place d(logits)")
    with pytest.raises(ValueError, match="inplace_backward"):
        fastalign.token_divergence(base, zt, y, inplace_backward=True, backend=backend)
    full = base * 1.0
    out = fastalign.token_divergence(full[:, :-1], zt[:, :-1], y[:, :-1], inplace_backward=True, backend=backend)
    assert_close(out.divergence, _reference(zs[:, :-1].double(), zt[:, :-1], y[:, :-1], "jsd", None, 1.0)[0],
                 atol=2e-6, what="a slice's divergence")


def test_second_derivative_is_refused():
    _, zs, zt, y = _batch(8)
    x = zs.clone().requires_grad_(True)
    out = fastalign.token_divergence(x, zt, y, backend="cpp")
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(out.divergence.sum(), x, create_graph=True)


def test_compiled_fullgraph_equals_eager():
    _, zs, zt, y = _batch(9)

    def step(x):
        out = fastalign.token_divergence(x, zt, y, divergence="tvd", temperature=0.7, backend="cpp")
        return (out.divergence + out.nll).sum()

    x1, x2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    step(x1).backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(x2).backward()
    assert_close(x2.grad, x1.grad, atol=1e-6, what="compiled d(student_logits)")


@pytest.mark.parametrize("call,error,match", [
    (lambda s, t, y: fastalign.token_divergence(s, t.double(), y), TypeError, "teacher_logits"),
    (lambda s, t, y: fastalign.token_divergence(s, t[:, :2], y), ValueError, "teacher_logits"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y.float()), TypeError, "labels"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y[:, :2]), ValueError, "labels"),
    (lambda s, t, y: fastalign.token_divergence(s.int(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, divergence="kl"), ValueError, "divergence"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, divergence="tvd", beta=0.5), ValueError, "beta"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, beta=1.5), ValueError, "beta"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, temperature=0.0), ValueError, "temperature"),
    (lambda s, t, y: fastalign.token_divergence(s[..., :0], t[..., :0], y), ValueError, "vocabulary"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, inplace_backward=1), TypeError, "inplace_backward"),
    (lambda s, t, y: fastalign.token_divergence(s, t, y, backend="nope"), ValueError, "backend"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    _, zs, zt, y = _batch(10)
    with pytest.raises(error, match=match):
        call(zs, zt, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_kl_with_no_mass_where_the_other_side_has_some_is_infinite(backend):
    """KL(p_t || p_s) where the student has a -inf logit on a token the teacher supports is +inf (torch's kl_div,
    TRL's and Liger's losses, elementwise_divergence); the floored log-probs gave ~1e30 p_t, a huge finite number.
    The same for KL(p_s || p_t) with the teacher's -inf; the JSD stays finite, and so do the gradients, which the
    floored terms keep (forward KL: p_s - p_t exactly)."""
    ninf = -math.inf
    student = torch.tensor([[0.0, 1.0, ninf], [0.5, -1.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0], [0.5, ninf, 2.0]])
    x = student.clone().requires_grad_(True)
    forward = fastalign.token_divergence(x, teacher, beta=0.0, backend=backend).divergence
    lps, lpt = student.double().log_softmax(-1), teacher.double().log_softmax(-1)
    want = torch.where(lpt > -math.inf, lpt.exp() * (lpt - lps), 0.0).sum(-1)  # 0 log 0 = 0
    assert forward[0] == math.inf and want[0] == math.inf
    assert_close(forward[1], want[1], atol=1e-6, rtol=1e-6, what="forward KL of the finite row")
    forward.sum().backward()
    assert_close(x.grad, student.softmax(-1) - teacher.softmax(-1), atol=1e-6, rtol=1e-6, what="forward KL grad")
    reverse = fastalign.token_divergence(student, teacher, beta=1.0, backend=backend).divergence
    # row 1: the teacher's -inf where the student has mass; row 0: the student has none where the teacher's -inf is
    assert reverse[1] == math.inf and math.isfinite(reverse[0])
    jsd = fastalign.token_divergence(student, teacher, beta=0.5, backend=backend).divergence
    assert torch.isfinite(jsd).all()
