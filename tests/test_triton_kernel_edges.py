"""The Triton kernels at the edges of their tiling and masking, in the interpreter, against float64 references:

* rows longer than one tile: token statistics over a vocabulary of several [4, 2048] forward tiles and 4096-wide
  backward blocks (argmax ties across tiles), reverse scans whose carried state crosses a fully masked block,
  divergence rows wider than one 2048-column block;
* ignored and masked entries: an ``ignore_index`` that is also a vocabulary id, NaN upstream gradients of ignored
  rows, NaN / inf values in masked scan slots, an infinite return before a reset, zero-probability (-inf) columns
  of the distillation divergence;
* the linear statistics op: its ``argmax_logit`` output (``max z / T``, softcapped to fp32 rounding), and its
  gradient when only the entropy and sum p^2 take one.

The policy-loss kernels' edges are in test_policy_kernel_edges.py.
"""

import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.ops.divergence import divergence_rows
from fastalign.ops.linear_stats import linear_stats
from fastalign.ops.returns import SCANS, reverse_scan
from fastalign.reference import divergence as R
from fastalign.reference.advantages import discounted_returns, gae_advantages
from helpers import assert_close

pytest.importorskip("triton")
TRITON = "triton"


# ----------------------------------------------------------------------------- token statistics


def test_token_logprobs_over_several_vocabulary_tiles():
    """V = 2 * 8192 + 37: the forward reads two whole [4, 2048] tiles (no bounds checks) and a partial one, the
    backward five 4096-wide blocks. Values and d(logits) against float64; the argmax is the first of equal
    maxima, also when they lie in the same lane of different tiles (columns 5, 8197, 16389) or in other lanes."""
    g = torch.Generator().manual_seed(11)
    V = 2 * 8192 + 37
    z = torch.randn(3, V, generator=g) * 2.0
    z[0, [5, 8192 + 5, 16384 + 5]] = 9.0  # the same lane in each tile
    z[1, [16390, 8200, 40]] = 9.0  # different lanes and tiles
    z[2, 12000] = 9.0
    y = torch.tensor([8192 + 5, 16400, 3])
    x = z.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, y, temperature=0.8, entropy=True, sum_p2=True, argmax=True, backend=TRITON)
    w = torch.randn(3, 3, generator=g)
    (w[0] @ st.logprobs + w[1] @ st.entropy + w[2] @ st.sum_p2).backward()
    zr = z.double().requires_grad_(True)
    lp, ent, sp2, amax = reference.token_logprobs(zr, y, temperature=0.8, dtype=torch.float64)
    (w[0].double() @ lp + w[1].double() @ ent + w[2].double() @ sp2).backward()
    assert st.argmax.tolist() == [5, 40, 12000] == amax.tolist()
    assert_close(st.logprobs, lp, atol=2e-5, rtol=1e-5, what="logprobs")
    assert_close(st.entropy, ent, atol=2e-5, rtol=1e-5, what="entropy")
    assert_close(st.sum_p2, sp2, atol=1e-6, rtol=1e-5, what="sum_p2")
    assert_close(x.grad, zr.grad, atol=1e-6, rtol=1e-5, what="d logits")


def test_token_logprobs_ignore_index_that_is_a_vocabulary_id(cpu_backend):
    """``ignore_index=0`` (a padding id that is also a vocabulary id): ignored rows give 0 and a zero d(logits) row,
    also at column 0 and when their upstream gradients are NaN (as torch.where in the reference); the other rows
    match float64."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(6, 37, generator=g) * 2.0
    y = torch.tensor([0, 4, 0, 36, 7, 0])
    ignored = y == 0
    x = z.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, y, ignore_index=0, entropy=True, sum_p2=True, backend=cpu_backend)
    gl, ge, gp = (torch.randn(6, generator=g) for _ in range(3))
    gl[ignored] = float("nan")
    ge[ignored] = float("nan")
    gp[ignored] = float("nan")
    grad, = torch.autograd.grad((st.logprobs, st.entropy, st.sum_p2), x, (gl, ge, gp))
    zr = z.double().requires_grad_(True)
    ref = reference.token_logprobs(zr, y, ignore_index=0, dtype=torch.float64)
    ref_grad, = torch.autograd.grad(ref[:3], zr, (gl.double(), ge.double(), gp.double()))
    assert bool((st.logprobs[ignored] == 0).all()) and bool((st.entropy[ignored] == 0).all())
    assert bool((grad[ignored] == 0).all()), grad[ignored]
    assert_close(st.logprobs, ref[0], atol=1e-5, rtol=1e-5, what="logprobs")
    assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5, what="d logits")


# ----------------------------------------------------------------------------- linear statistics


@pytest.mark.parametrize("softcap, temperature", [(0.0, 0.7), (4.0, 1.0)], ids=["temperature", "softcap"])
def test_linear_stats_argmax_logit(cpu_backend, softcap, temperature):
    """The op's ``argmax_logit`` is ``max_j z_j``, the largest logit before the temperature (what vocabulary shards
    compare: two logits may round to one z / T), softcapped ``cap tanh(u / cap)`` to fp32 rounding also where
    |u / cap| < 1/4 (the series branch of the kernel's tanh). Hidden size 1 and a weight of exact values make u
    exact, so the only error is the tanh's."""
    g = torch.Generator().manual_seed(13)
    V = 150
    hidden = torch.ones(4, 1)
    weight = (torch.rand(V, 1, generator=g) * 0.9 - 0.45)
    weight[[7, 80, 120, 149], 0] = torch.tensor([0.99, 0.995, 0.9975, 0.999])  # u / cap just below 1/4 at cap 4
    hidden[:, 0] = torch.tensor([1.0, 0.5, -1.0, 0.25])
    labels = torch.tensor([3, -100, 149, 0])
    out = linear_stats(hidden, weight, None, None, None, labels, 1.0, softcap, 1.0 / temperature, -100,
                       False, False, True, cpu_backend, 3, 64, 0.0)
    u = hidden.double() @ weight.double().T
    z = softcap * torch.tanh(u / softcap) if softcap else u
    assert torch.equal(out[3], z.argmax(1))
    assert_close(out[4], z.amax(1), atol=0.0, rtol=1.5e-7, what="argmax logit")


def test_linear_gradient_of_the_entropy_alone(cpu_backend):
    """Only the entropy (and sum p^2) take a gradient, the log-probs none: the backward runs without an upstream
    log-prob gradient (not a zero one), and d(hidden), d(weight), d(bias) are float64 autograd's."""
    g = torch.Generator().manual_seed(21)
    h, w = torch.randn(9, 12, generator=g) * 0.5, torch.randn(37, 12, generator=g) * 0.5
    b, y = torch.randn(37, generator=g) * 0.3, torch.randint(0, 37, (9,), generator=g)
    y[4] = -100
    hg, wg, bg = (t.clone().requires_grad_(True) for t in (h, w, b))
    st = fastalign.linear_logprobs(hg, wg, y, bias=bg, temperature=0.8, entropy=True, sum_p2=True,
                                   backend=cpu_backend)
    (st.entropy.sum() - 2 * st.sum_p2.sum()).backward()
    hd, wd, bd = (t.double().requires_grad_(True) for t in (h, w, b))
    logp = torch.log_softmax((hd @ wd.T + bd) / 0.8, -1)
    scored = (y != -100).double()
    ent = -(logp.exp() * logp).sum(-1) * scored
    sp2 = (logp.exp() ** 2).sum(-1) * scored
    (ent.sum() - 2 * sp2.sum()).backward()
    for got, want, what in ((hg.grad, hd.grad, "d hidden"), (wg.grad, wd.grad, "d weight"),
                            (bg.grad, bd.grad, "d bias")):
        assert_close(got, want, atol=1e-5, rtol=1e-4, what=what)


# ----------------------------------------------------------------------------- reverse scans


def test_gae_carries_the_next_value_across_a_fully_masked_block():
    """GAE with T = 2100 (three 1024-token blocks from the end): the middle block is all masked (a tool output),
    so the tokens before it take V_next and A_next from the first valid token after it, carried through the
    masked block, as the float64 loop."""
    g = torch.Generator().manual_seed(18)
    B, T = 2, 2100
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.ones(B, T, dtype=torch.float64)
    m[:, T - 2048:T - 1024] = 0  # the whole middle block
    m[1, T - 1030:T - 1000] = 0
    a, ret = reverse_scan(r, v, m, 0.99, 0.95, SCANS["gae"], TRITON)
    ra, rret = gae_advantages(r, v, m, gamma=0.99, lam=0.95, whiten=False)
    assert_close(a, ra, atol=1e-10, rtol=1e-10, what="advantages")
    assert_close(ret, rret, atol=1e-10, rtol=1e-10, what="returns")


@pytest.mark.parametrize("mode", ["return", "to_go", "gae"])
def test_scans_never_read_masked_slots_and_reset_an_infinite_return(mode):
    """NaN / inf rewards and values in masked slots reach no valid token (T = 1030: two blocks), and with resets
    an infinite return carried in from the later block stops at a masked token instead of becoming 0 * inf = NaN:
    the tokens before it are finite, as in the float64 loop."""
    g = torch.Generator().manual_seed(19)
    B, T = 2, 1030
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) > 0.2).to(torch.float64)
    m[:, 3] = 0
    m[:, 700] = 0
    x[:, 700], v[:, 700] = float("nan"), float("inf")
    x[0, 3], v[1, 3] = float("-inf"), float("nan")
    if mode == "return":
        m[:, 6:1030] = 1
        m[:, 700] = 0
        x[1, 10] = float("inf")  # returns of tokens 6..10 are inf, carried into the block of tokens 0..5
    values = v if mode == "gae" else x.new_empty(0)
    out = reverse_scan(x, values, m, 0.9, 0.8, SCANS[mode], TRITON)
    if mode == "gae":
        ra, rret = gae_advantages(x, v, m, gamma=0.9, lam=0.8, whiten=False)
        expected = (ra, rret)
    else:
        expected = (discounted_returns(x, m, 0.9, reset=mode == "return"),)
    for got, want in zip(out, expected):
        finite = torch.isfinite(want)
        assert torch.equal(got[~finite], want[~finite]), mode  # the infinite returns, nothing else
        assert_close(got[finite], want[finite], atol=1e-10, rtol=1e-10, what=mode)
    if mode == "return":
        assert torch.isinf(out[0][1, 6:11]).all() and torch.isfinite(out[0][1, :3]).all()


# ----------------------------------------------------------------------------- divergence rows


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_divergence_rows_wider_than_a_block_with_zero_probabilities(cpu_backend, beta):
    """Rows of V = 2100 (two 2048-column blocks) with vocabulary ids masked to -inf in both the student and the
    teacher (zero probabilities: 0 log 0 = 0, no NaN): divergence and entropy against float64, d(student logits)
    against float64 autograd on the unmasked columns and exactly 0 on the masked ones."""
    g = torch.Generator().manual_seed(20)
    n, V = 3, 2100
    zs = torch.randn(n, V, generator=g) * 2.0
    zt = torch.randn(n, V, generator=g) * 2.0
    dead = torch.zeros(V, dtype=torch.bool)
    dead[[0, 1000, 2060, 2099]] = True
    zs[:, dead], zt[:, dead] = float("-inf"), float("-inf")
    gs = torch.tensor([1.0, 0.5, 2.0])
    grad = zs.clone()
    d, e, _ = divergence_rows(grad, zt, torch.ones(n), None, gs, None, 1 / 0.9, "jsd", beta, -100, False, cpu_backend)
    live = zs[:, ~dead].double().requires_grad_(True)
    rd = R.generalized_jsd(live, zt[:, ~dead], beta=beta, temperature=0.9)
    rg, = torch.autograd.grad(rd, live, gs.double())
    assert_close(d, rd, atol=2e-5, rtol=1e-5, what="divergence")
    assert_close(e, R.entropy(zs[:, ~dead], temperature=0.9), atol=2e-5, rtol=1e-5, what="entropy")
    assert bool((grad[:, dead] == 0).all())
    assert_close(grad[:, ~dead], rg, atol=1e-7, rtol=1e-4, what="d student logits")
