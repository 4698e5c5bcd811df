"""fastalign.elementwise_divergence (divergences between given log-probabilities or probabilities, differentiated
element by element) against the float64 terms of fastalign.reference.divergence.elementwise_terms, themselves checked
against torch's kl_div and the JSD of the same distributions from logits: per-token sums and every term, gradients
under random upstream gradients, ignored tokens, zero probabilities, NaN, bf16, torch.compile, the custom ops and the
bad inputs, on both CPU backends."""
import pytest
import torch

import fastalign
from fastalign.ops import elementwise_divergence as ops
from fastalign.reference import divergence as R
from conftest import CPU_BACKENDS
from helpers import assert_close

V = 37
#: (divergence, options, what x and y hold)
CASES = [
    ("jsd", {}, "logprobs"), ("jsd", {"beta": 0.0}, "logprobs"), ("jsd", {"beta": 1.0}, "logprobs"),
    ("jsd", {"beta": 0.3}, "logprobs"), ("kl", {}, "kl"), ("kl", {"log_target": True}, "logprobs"),
    ("kl", {"eps": 1e-3}, "kl"), ("tvd", {}, "probs"),
]
IDS = [f"{d}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for d, o, _ in CASES]


def _inputs(kind, seed, shape=(2, 3), dtype=torch.float32):
    """(x, y) of ``kind``: both log-probs, both probs, or (log-probs, probs) for the KL; y with exact zeros."""
    g = torch.Generator().manual_seed(seed)
    zx, zy = torch.randn(*shape, V, generator=g) * 2, torch.randn(*shape, V, generator=g) * 2
    x = zx.softmax(-1) if kind == "probs" else zx.log_softmax(-1)
    y = zy.softmax(-1) if kind in ("probs", "kl") else zy.log_softmax(-1)
    if kind == "kl":
        y[..., :3] = 0.0  # zero probabilities: their terms are 0
    return x.to(dtype), y.to(dtype), g


def _reference(x, y, divergence, options):
    return R.elementwise_terms(x, y, divergence=divergence, beta=options.get("beta", 0.5),
                               log_target=options.get("log_target", False), eps=options.get("eps", 1e-10))


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("divergence,options,kind", CASES, ids=IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_and_gradients_against_float64(backend, divergence, options, kind, elementwise):
    x0, y, g = _inputs(kind, 1)
    labels = torch.randint(0, V, (2, 3), generator=g)
    labels[0, 1] = -100
    x = x0.clone().requires_grad_(True)
    out = fastalign.elementwise_divergence(x, y, labels, divergence=divergence, elementwise=elementwise,
                                           backend=backend, **options)
    xd = x0.double().requires_grad_(True)
    terms = _reference(xd, y, divergence, options) * (labels != -100)[..., None]
    want = terms if elementwise else terms.sum(-1)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert_close(out, want, atol=1e-6, rtol=1e-5, what="divergence")
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    (want * w).sum().backward()
    assert_close(x.grad, xd.grad, atol=1e-6, rtol=1e-5, what="d(input)")
    assert bool((x.grad[0, 1] == 0).all()) and bool((out[0, 1] == 0).all()), "an ignored token gives 0"


def test_reference_terms_against_torch_and_the_jsd_of_logits():
    """The reference's KL terms are torch's kl_div's, its JSD sums the JSD of the distributions from logits."""
    x, y, _ = _inputs("kl", 2, dtype=torch.float64)
    assert_close(R.elementwise_terms(x, y, divergence="kl"), torch.nn.functional.kl_div(x, y, reduction="none"),
                 atol=1e-15, what="kl terms")
    x, y, _ = _inputs("logprobs", 2, dtype=torch.float64)
    assert_close(R.elementwise_terms(x, y, divergence="kl", log_target=True),
                 torch.nn.functional.kl_div(x, y, reduction="none", log_target=True), atol=1e-15, what="kl log")
    x, y = x.log_softmax(-1), y.log_softmax(-1)  # normalised in float64: generalized_jsd's softmax keeps them
    for beta in (0.0, 0.3, 1.0):
        assert_close(R.elementwise_terms(x, y, divergence="jsd", beta=beta).sum(-1), R.generalized_jsd(x, y, beta=beta),
                     atol=1e-12, what=f"jsd beta={beta}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,options,kind", CASES, ids=IDS)
def test_bf16_reads_and_writes_the_input_dtype(backend, divergence, options, kind):
    """bf16 inputs: fp32 sums within fp32 rounding of the float64 terms of the bf16 values; the gradient in bf16,
    within one rounding of its value (2^-8; 2^-7 in the Triton interpreter, whose fp32 -> bf16 cast truncates)."""
    x0, y, g = _inputs(kind, 3, dtype=torch.bfloat16)
    x = x0.clone().requires_grad_(True)
    out = fastalign.elementwise_divergence(x, y, divergence=divergence, backend=backend, **options)
    xd = x0.double().requires_grad_(True)
    want = _reference(xd, y, divergence, options).sum(-1)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="divergence")
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    (want * w).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad, xd.grad, atol=1e-6, rtol=2 ** -8 if backend == "cpp" else 2 ** -7, what="d(input)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's unused lanes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_zero_probability_adds_nothing_to_the_jsd(backend, beta):
    """A log-prob of -inf on one side or both: its term is 0 where its probability is its weight (0 log 0 = 0), the
    sum finite, the gradient finite; a positive mass against a zero one is an infinite KL."""
    x, y, _ = _inputs("logprobs", 4, shape=(3,))
    x[0, 5] = y[0, 5] = float("-inf")  # both zero
    y[1, 7] = float("-inf")  # the teacher's zero: weight p = 0 in the forward KL
    x[2, 9] = float("-inf")  # the student's zero: weight q = 0 in the reverse KL
    rows = [0, 1] if beta == 0 else [0, 2] if beta == 1 else [0, 1, 2]
    xg = x.clone().requires_grad_(True)
    out = fastalign.elementwise_divergence(xg, y, divergence="jsd", beta=beta, backend=backend)
    out.sum().backward()
    assert bool(torch.isfinite(out[rows]).all()) and bool(torch.isfinite(xg.grad[rows]).all())
    finite = x.clone(), y.clone()
    for t in finite:
        t[t == float("-inf")] = -1e4  # e^-1e4 = 0 in float64: the same distributions with finite logs
    assert_close(out[rows], R.elementwise_terms(*finite, divergence="jsd", beta=beta).sum(-1)[rows], atol=1e-6,
                 what="sum with zero probabilities")
    if beta == 0:
        assert out[2] == float("inf"), "the teacher's mass where the student has none: KL(p || q) = inf"


@pytest.mark.parametrize("divergence,options,kind", CASES, ids=IDS)
def test_nan_propagates_alike_on_both_backends(divergence, options, kind):
    if len(CPU_BACKENDS) < 2:
        pytest.skip("the Triton interpreter is not installed")
    x, y, _ = _inputs(kind, 5, shape=(3,))
    x[0, 4] = float("nan")
    y[1, 6] = float("nan")
    results = []
    for backend in CPU_BACKENDS:
        xg = x.clone().requires_grad_(True)
        out = fastalign.elementwise_divergence(xg, y, divergence=divergence, backend=backend, **options)
        out.sum().backward()
        results.append((out.detach(), xg.grad))
    (out, grad), (out_t, grad_t) = results
    assert bool(out[:2].isnan().all()) and bool(torch.isfinite(out[2]))
    # a derivative that reads x is NaN at a NaN x; the forward KL's -p and the KL's -y, -e^y do not read it
    reads_x = divergence == "tvd" or (divergence == "jsd" and options.get("beta") != 0.0)
    assert bool(grad[0, 4].isnan()) == reads_x
    assert bool(grad[1, 6].isnan()), "every derivative reads the target: a NaN target element has a NaN gradient"
    torch.testing.assert_close(out, out_t, equal_nan=True, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, grad_t, equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_kl_gradient_reads_the_target_alone(backend):
    """d/dx of y (log y - x) is -y whatever x holds (a NaN x included, as Liger's kernel and torch's kl_div)."""
    x, y, _ = _inputs("kl", 6, shape=(2,))
    x = x.clone()
    x[0, 0] = float("nan")
    xg = x.requires_grad_(True)
    fastalign.elementwise_divergence(xg, y, divergence="kl", backend=backend).sum().backward()
    assert_close(xg.grad, -y, atol=0, what="d(input)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_and_strided_rows(backend):
    x0, y, _ = _inputs("logprobs", 7)
    wide = torch.zeros(2, 3, 2 * V)
    wide[..., :V] = x0
    x = wide[..., :V].requires_grad_(False).clone().requires_grad_(True)

    def step(x, y):
        return fastalign.elementwise_divergence(x, y, divergence="jsd", beta=0.2, backend=backend).sum()

    eager = step(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    assert_close(compiled, eager, atol=0, what="compiled loss")
    assert_close(g_compiled, g_eager, atol=0, what="compiled gradient")
    strided = fastalign.elementwise_divergence(wide[..., :V], wide[..., V:] + y, divergence="jsd", beta=0.2,
                                               backend=backend)
    assert_close(strided, fastalign.elementwise_divergence(x0, y, divergence="jsd", beta=0.2, backend=backend),
                 atol=0, what="rows of a wider buffer")


@pytest.mark.parametrize("elements", [False, True])
def test_custom_ops_pass_opcheck(elements):
    x, y, _ = _inputs("logprobs", 8, shape=(4,))
    x.requires_grad_(True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.library.opcheck(ops.elementwise_divergence, (x, y, mask, 2, 0.3, 1e-10, elements, "cpp"))
    g = torch.randn(x.shape if elements else x.shape[:1])
    torch.library.opcheck(ops.elementwise_divergence_backward, (g, x.detach(), y, mask, 2, 0.3, 1e-10, "cpp"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_derivative_is_refused(backend):
    x, y, _ = _inputs("logprobs", 9, shape=(2,))
    x.requires_grad_(True)
    out = fastalign.elementwise_divergence(x, y, divergence="jsd", backend=backend).sum()
    with pytest.raises(RuntimeError):
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        g.sum().backward()


def test_empty_inputs():
    x = torch.zeros(0, V, requires_grad=True)
    out = fastalign.elementwise_divergence(x, torch.zeros(0, V), divergence="tvd")
    out.sum().backward()
    assert out.shape == (0,) and x.grad.shape == (0, V)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(divergence="kl", beta=0.5), ValueError, "beta applies to divergence='jsd'"),
    (dict(divergence="jsd", log_target=True), ValueError, "log_target applies to divergence='kl'"),
    (dict(divergence="tvd", eps=1e-8), ValueError, "eps applies to divergence='kl'"),
    (dict(divergence="kl", eps=0.0), ValueError, "eps"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(divergence="cosine"), ValueError, "divergence"),
    (dict(divergence="kl", log_target=1), TypeError, "log_target"),
    (dict(elementwise="yes"), TypeError, "elementwise"),
])
def test_bad_options_raise_naming_them(kwargs, error, match):
    x, y, _ = _inputs("logprobs", 10, shape=(2,))
    with pytest.raises(error, match=match):
        fastalign.elementwise_divergence(x, y, **kwargs)


def test_bad_tensors_raise_naming_them():
    x, y, _ = _inputs("logprobs", 11, shape=(2,))
    with pytest.raises(TypeError, match="target must have the dtype of input"):
        fastalign.elementwise_divergence(x, y.bfloat16())
    with pytest.raises(ValueError, match="target"):
        fastalign.elementwise_divergence(x, y[:, :5])
    with pytest.raises(ValueError, match="labels"):
        fastalign.elementwise_divergence(x, y, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        fastalign.elementwise_divergence(x, y, torch.zeros(2))
    with pytest.raises(TypeError, match="input"):
        fastalign.elementwise_divergence(x.long(), y)
