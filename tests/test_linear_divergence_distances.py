"""The distances of linear_divergence_loss besides the JSD, and the divergence_rows op's modes for them, against
the float64 reference: the total variation distance of the two distributions (``divergence="tvd"``, D = 1/2 sum
|p_s - p_t|) and the cosine distance of the logit rows (``divergence="cosine"``, D = 1 - cos, torch's F.normalize
of each row). Their values and gradients with masks, labels, the hard loss and the logit pipeline are in
test_linear_divergence.py's tables; here: the references against torch's own functions, the edges of each (equal
and disjoint distributions, zero, parallel and opposite logit rows, a temperature), many blocks, both passes,
bf16, masked and NaN rows of the op, both kernels alike, and the bad inputs."""
import math

import pytest
import torch

import fastalign
from fastalign.ops.divergence import divergence_rows
from fastalign.reference import divergence as R
from conftest import CPU_BACKENDS
from helpers import assert_close
from test_linear_divergence import V, _batch, _check

DISTANCES = ("tvd", "cosine")


def test_tvd_reference_is_half_the_l1_distance_of_the_distributions():
    """The reference's TVD against torch's own L1 distance of the softmaxes, and its edges: equal distributions 0
    (logits differing by a constant), disjoint ones 1 (each all on its own token)."""
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    zt[1] = zs[1] + 3.0
    zs[2], zt[2] = torch.full((9,), -1e4, dtype=torch.float64), torch.full((9,), -1e4, dtype=torch.float64)
    zs[2, 0] = zt[2, 5] = 0.0
    d = R.total_variation(zs, zt, temperature=0.8)
    want = 0.5 * torch.nn.functional.l1_loss(torch.softmax(zs[0] / 0.8, -1), torch.softmax(zt[0] / 0.8, -1),
                                             reduction="sum")
    assert_close(d[0], want, atol=1e-12)
    assert_close(d[1:], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tvd_rows_of_the_op_equal_disjoint_nan_and_unweighted(backend):
    """The op's TVD rows against the reference and its autograd: a long row (several Triton tiles), a teacher
    equal to the student up to a constant (D = 0; its gradient is the signs of rounding errors, as autograd's),
    disjoint one-token distributions (D = 1), a row whose mask is 0 (zeros, without reading it), a NaN logit
    (NaN D and gradient row), the NLL and its gradient."""
    g = torch.Generator().manual_seed(9)
    n, Vl = 6, 2500
    zs, zt = torch.randn(n, Vl, generator=g) * 3, torch.randn(n, Vl, generator=g) * 3
    zt[1] = zs[1] + 2.0
    zs[2], zt[2] = torch.full((Vl,), -1e4), torch.full((Vl,), -1e4)
    zs[2, 0] = zt[2, 7] = 0.0
    zs[4, 7] = math.nan
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    y = torch.tensor([3, -100, 299, 1, 0, 2499])
    gs, gh = torch.rand(n, generator=g), torch.rand(n, generator=g)
    a = zs.clone()
    d, e, nll = divergence_rows(a, zt, mask, y, gs, gh, 1 / 0.9, "tvd", 0.5, -100, True, backend)
    assert d[3] == 0 and e[3] == 0 and nll[3] == 0 and bool((a[3] == 0).all())
    assert math.isnan(d[4]) and bool(a[4].isnan().all())
    ok = [0, 2, 5]
    x = zs[ok].double().requires_grad_(True)
    ref = R.total_variation(x, zt[ok].double(), temperature=0.9)
    labelled = y[ok] != -100
    ce = torch.nn.functional.cross_entropy(x, y[ok].clamp(min=0), reduction="none") * labelled
    (gs[ok].double() * ref + gh[ok].double() * ce).sum().backward()
    assert_close(d[ok], ref.detach(), atol=2e-6, rtol=1e-5, what="D")
    assert_close(d[1:3], torch.tensor([0.0, 1.0]), atol=2e-6, what="equal, disjoint distributions")
    assert_close(nll[ok], ce.detach(), atol=1e-5, rtol=1e-5, what="nll")
    assert_close(a[ok], x.grad, atol=1e-7, rtol=1e-4, what="d z_s")


def test_reference_is_one_minus_the_cosine_of_the_logit_rows():
    """The reference's D against torch's own F.cosine_similarity, and its edges: parallel rows 0, opposite 2,
    a zero row 1 (cosine 0)."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    zt[1], zt[2], zt[3] = 2.5 * zs[1], -0.5 * zs[2], 0.0
    d = R.cosine_distance(zs, zt)
    assert_close(d[0], 1 - torch.nn.functional.cosine_similarity(zs[0], zt[0], dim=0), atol=1e-12)
    assert_close(d[1:], torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_temperature_leaves_the_cosine_distance_unchanged(backend):
    """The temperature scales both logit rows alike: the same D at T = 0.7 as at 1 (it still sets the entropy)."""
    h, w, b, ht, wt, bt, y = _batch(2)
    kw = dict(softcap=3.0, logit_scale=1.3, labels=y, backend=backend, divergence="cosine")
    with torch.no_grad():
        _, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, temperature=0.7, **kw)
        _, m_t1 = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, **kw)
    assert_close(m["divergence_sum"], m_t1["divergence_sum"], atol=1e-5, rtol=1e-5, what="D at T = 0.7 and 1")
    assert not torch.allclose(m["entropy_sum"], m_t1["entropy_sum"])


@pytest.mark.parametrize("divergence", DISTANCES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_blocks_and_global_tokens(backend, divergence, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(3 * V * 4 / (1 << 20)))  # 3 rows of logits: 1 row per block pair
    h, w, b, ht, wt, bt, y = _batch(3)
    _check(h, w, b, ht, wt, bt, divergence=divergence, global_tokens=torch.tensor(11.0), labels=y, hard_weight=0.5,
           backend=backend)


@pytest.mark.parametrize("divergence", DISTANCES)
@pytest.mark.parametrize("single_pass", [True, False])
def test_both_passes_match(single_pass, divergence):
    h, w, b, ht, wt, bt, y = _batch(4)
    _check(h, w, b, ht, wt, bt, divergence=divergence, single_pass=single_pass, labels=y, hard_weight=0.2)


@pytest.mark.parametrize("divergence", DISTANCES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_inputs(backend, divergence):
    h, w, b, ht, wt, bt, y = _batch(7, dtype=torch.bfloat16)
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, divergence=divergence,
                                               backend=backend)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    rl, _ = R.linear_divergence_loss(*ref_in[:2], ht, wt, bias=ref_in[2], teacher_bias=bt, divergence=divergence)
    rg = torch.autograd.grad(rl, ref_in)
    assert_close(loss, rl, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, rg):
        assert_close(g, r, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cosine_rows_of_the_op_zero_teacher_nan_and_unweighted(backend):
    """The op's cosine rows against the reference and its autograd: a long row (several Triton tiles), a teacher
    row of zeros (D = 1, no gradient), a teacher parallel to the student (D = 0) and one opposite (D = 2), a row
    whose mask is 0 (zeros, without reading it), a NaN logit (NaN D and gradient row), a student row whose norm
    is below the 1e-12 floor (the floored norm a constant: no cos term in its gradient), the NLL and its
    gradient."""
    g = torch.Generator().manual_seed(8)
    n, Vl = 8, 2500
    zs, zt = torch.randn(n, Vl, generator=g) * 3, torch.randn(n, Vl, generator=g) * 3
    zt[1] = 0.0
    zt[2] = 4.0 * zs[2]
    zt[3] = -0.25 * zs[3]
    zs[5, 7] = math.nan
    zs[7] = zt[7] * 1e-15 + torch.randn(Vl, generator=g) * 1e-15  # |x_s| ~ 1e-13
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    y = torch.tensor([3, 5, -100, 299, 1, 0, 2499, 4])
    gs, gh = torch.rand(n, generator=g), torch.rand(n, generator=g)
    a = zs.clone()
    d, e, nll = divergence_rows(a, zt, mask, y, gs, gh, 1 / 0.9, "cosine", 0.5, -100, True, backend)
    assert d[4] == 0 and e[4] == 0 and nll[4] == 0 and bool((a[4] == 0).all())
    assert math.isnan(d[5]) and bool(a[5].isnan().all())
    ok = [0, 1, 2, 3, 6, 7]
    x = zs[ok].double().requires_grad_(True)
    ref = R.cosine_distance(x / 0.9, zt[ok].double() / 0.9)
    assert 0.1 < float(1 - ref[-1]) < 0.9  # the floored norm: a cosine below the true one (about 1)
    labelled = y[ok] != -100
    ce = torch.nn.functional.cross_entropy(x, y[ok].clamp(min=0), reduction="none") * labelled
    (gs[ok].double() * ref + gh[ok].double() * ce).sum().backward()
    assert_close(d[ok], ref.detach(), atol=2e-6, rtol=1e-5, what="D")
    assert_close(d[1:4], torch.tensor([1.0, 0.0, 2.0]), atol=2e-6, what="zero, parallel, opposite teacher")
    assert_close(nll[ok], ce.detach(), atol=1e-5, rtol=1e-5, what="nll")
    assert_close(a[ok], x.grad, atol=1e-7, rtol=1e-4, what="d z_s")


@pytest.mark.parametrize("divergence", DISTANCES)
def test_kernels_agree(divergence):
    if "triton" not in CPU_BACKENDS:
        pytest.skip("no triton")
    h, w, b, ht, wt, bt, y = _batch(9)
    out = {}
    for backend in ("cpp", "triton"):
        loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, divergence=divergence,
                                                   labels=y, hard_weight=0.3, backend=backend)
        out[backend] = (loss, *torch.autograd.grad(loss, (h, w, b)))
    for c, t in zip(out["cpp"], out["triton"]):
        assert_close(t, c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw, err, match", [
    (dict(divergence="cosine", beta=0.5), ValueError, r"^beta applies to the jsd only"),
    (dict(divergence="tvd", beta=0.0), ValueError, r"^beta applies to the jsd only, not to divergence='tvd'"),
    (dict(divergence="cos"), ValueError,
     r"^divergence must be one of \('jsd', 'tvd', 'cosine'\).*did you mean 'cosine'"),
    (dict(divergence=None), ValueError, r"^divergence must be one of"),
    (dict(divergence="cosine", temperature=0.0), ValueError, "temperature"),
    (dict(divergence="tvd", temperature=-1.0), ValueError, "temperature"),
])
def test_bad_inputs(kw, err, match):
    h, w, b, ht, wt, bt, y = _batch(10, bias=False)
    with pytest.raises(err, match=match):
        fastalign.linear_divergence_loss(h, w, ht, wt, **kw)


def test_beta_none_is_the_jsd_at_one_half():
    h, w, b, ht, wt, bt, y = _batch(11)
    with torch.no_grad():
        default, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt)
        half, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, beta=0.5)
        others = [fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, divergence=d)[0]
                  for d in DISTANCES]
    assert torch.equal(default, half) and not any(torch.equal(default, o) for o in others)
