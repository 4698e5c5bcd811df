"""Edges of ``fastalign::linear_stats`` and the paths built on it, against float64 plain PyTorch on the full logits:

* the C++ path's ``lse`` output: ``-inf`` (not NaN) for a row whose logits are all ``-inf``, however the
  vocabulary is cut into chunks, and 0 on ignored rows whether or not argmax sends them through the vocabulary;
* a low-rank term ``a @ L.T`` of which only one factor trains (a frozen LoRA ``B`` or a constant ``a``);
* ``separable_step`` traced by ``torch.compile`` (two passes, every row through the vocabulary): the unscored
  positions of the statistics hold the same constants as in eager mode;
* the Triton backward's d(weight) in bf16 over several token chunks: summed in fp32, the first chunk overwriting
  its buffer;
* vocabulary parallelism: an empty shard beside logits that are all negative (argmax), a label just past the
  whole vocabulary (NaN log-prob), and a shard of only ``-inf`` logits cut into several vocabulary chunks.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign import reference
from fastalign.linear_step import separable_step
from fastalign.ops.linear_stats import linear_stats
from helpers import assert_close, rank_body
from test_linear_logprobs import _free_port, make_inputs

N, H, V = 17, 40, 203


def _stats_op(hidden, weight, bias, labels, *, argmax=False, chunk=(5, 37), ignore_index=-100):
    """The C++ op's (logprobs, entropy, sum_p2, argmax, argmax_logit, lse) with no logit options."""
    return linear_stats(hidden, weight, bias, None, None, labels, 1.0, 0.0, 1.0, ignore_index, True, True, argmax,
                        "cpp", *chunk, 0.0)


@pytest.mark.parametrize("chunk", [(5, 37), (N, V)], ids=["vocab-chunks", "one-chunk"])
def test_lse_of_a_row_of_only_minus_inf_logits_is_minus_inf(chunk):
    """Every logit -inf (a banned vocabulary): ``lse`` is -inf, as float64 ``logsumexp`` of the full row, with
    several vocabulary chunks as with one; a vocabulary shard of such logits is then a piece of no mass when the
    shards are merged (a NaN lse would make every row of the batch NaN)."""
    hidden, weight, _, labels = make_inputs(seed=2)
    bias = torch.full((V,), float("-inf"))
    out = _stats_op(hidden, weight, bias, labels, chunk=chunk)
    want = torch.logsumexp(hidden.double() @ weight.double().T + bias.double(), 1)
    labelled = labels != -100
    assert torch.isneginf(want).all()
    assert torch.isneginf(out[5][labelled]).all(), out[5].tolist()
    assert torch.isnan(out[0][labelled]).all()


def test_lse_of_ignored_rows_is_zero_with_and_without_argmax():
    """argmax sends the ignored rows through the vocabulary too (their argmax is kept); their ``lse`` is still 0,
    as when they are skipped, and the labelled rows' ``lse`` is float64 ``logsumexp`` of the full logits."""
    hidden, weight, bias, labels = make_inputs(seed=4)
    ignored = labels == -100
    assert ignored.any()
    want = torch.logsumexp(hidden.double() @ weight.double().T + bias.double(), 1)
    for argmax in (False, True):
        lse = _stats_op(hidden, weight, bias, labels, argmax=argmax)[5]
        assert torch.count_nonzero(lse[ignored]) == 0, (argmax, lse[ignored].tolist())
        assert_close(lse[~ignored], want[~ignored], atol=2e-5, rtol=2e-6, what=f"lse, argmax={argmax}")


@pytest.mark.parametrize("trains", ["a", "L"])
@pytest.mark.parametrize("backend,chunk", [("cpp", (5, 37)), ("cpp", None)], ids=["cpp-chunked", "cpp-auto"])
def test_low_rank_gradient_when_only_one_factor_trains(trains, backend, chunk):
    """``low_rank=(a, L)`` with only ``a`` (a frozen ``L``) or only ``L`` (a constant ``a``) requiring a gradient,
    the head frozen: that factor's gradient equals the float64 reference of the widened head ``[h, a] [W, L]^T``."""
    hidden, weight, bias, labels = make_inputs(seed=6)
    g = torch.Generator().manual_seed(7)
    a, lw = torch.randn(N, 5, generator=g), torch.randn(V, 5, generator=g) * 0.4
    leaf = (a if trains == "a" else lw).clone().requires_grad_(True)
    pair = (leaf, lw) if trains == "a" else (a, leaf)
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, low_rank=pair, entropy=True, temperature=0.8,
                                   backend=backend, chunk=chunk)
    (st.logprobs - 0.3 * st.entropy).sum().backward()
    ar, lr = a.double(), lw.double()
    ref_leaf = (ar if trains == "a" else lr).requires_grad_(True)
    ref = reference.linear_logprobs(torch.cat([hidden.double(), ar], -1), torch.cat([weight.double(), lr], 1),
                                    labels, bias=bias.double(), temperature=0.8, dtype=torch.float64)
    (ref[0] - 0.3 * ref[1]).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape
    assert_close(leaf.grad, ref_leaf.grad, atol=2e-5, rtol=2e-5, what=f"d {trains}")


def test_compiled_two_passes_fill_the_unscored_positions():
    """Traced (torch.compile), the two passes of ``separable_step`` send every row through the vocabulary; the
    statistics of the unscored positions still hold 0 (log-prob), 1 (sum p^2) and -1 (argmax), as in eager mode
    and as the loss sees them, and the scored ones equal float64 log_softmax of the full logits."""
    torch.manual_seed(1)
    h = torch.randn(4, 5, 16)
    w = torch.randn(37, 16)
    y = torch.randint(0, 37, (4, 5))
    y[:, 0] = -100
    y[1, 3] = -100

    def loss(lp, sp2):
        return (lp * sp2).sum() + sp2.sum(), {}

    def step(h, w):
        value, _m, stats = separable_step(h, w, y, loss, items="rows", sum_p2=True, extras=("argmax",),
                                          single_pass=False)
        return value, stats["logprobs"], stats["sum_p2"], stats["argmax"]

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w)
    z = h.double() @ w.double().T
    logp = torch.log_softmax(z, -1)
    scored = y != -100
    lp = torch.where(scored, logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    sp2 = torch.where(scored, (logp.exp() ** 2).sum(-1), 1.0)
    amax = torch.where(scored, z.argmax(-1), -1)
    assert_close(got[1], lp, atol=2e-5, rtol=2e-5, what="logprobs")
    assert_close(got[2], sp2, atol=2e-5, rtol=2e-5, what="sum_p2")
    assert torch.equal(got[3], amax), got[3].tolist()
    assert_close(got[0], (lp * sp2).sum() + sp2.sum(), atol=1e-4, rtol=1e-5, what="loss")


# ----------------------------------------------------------------------------- vocabulary shards (2 gloo ranks)
V_SHARDS = 41


def _shard_data():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(6, 12, generator=g) * 0.3
    weight = torch.randn(V_SHARDS, 12, generator=g) * 0.3
    labels = torch.randint(0, 20, (6,), generator=g)
    labels[2] = -100
    return hidden, weight, labels


def _shards_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with rank_body():
        torch.set_num_threads(1)
        hidden, weight, labels = _shard_data()
        out = {}
        # rank 1 holds no row of the vocabulary; every logit is negative; one label is just past the vocabulary
        bias = torch.full((V_SHARDS,), -30.0)
        y = labels.clone()
        y[4] = V_SHARDS
        lo, hi = (0, V_SHARDS) if rank == 0 else (V_SHARDS, V_SHARDS)
        st = fastalign.linear_logprobs(hidden, weight[lo:hi], y, bias=bias[lo:hi], argmax=True,
                                       vocab_group=dist.group.WORLD, backend="cpp")
        out["empty"] = [st.logprobs, st.argmax]
        # rank 1's shard is banned (-inf bias), its 21 ids cut into vocabulary chunks of 8
        bias = torch.zeros(V_SHARDS)
        bias[20:] = float("-inf")
        y = labels.clone()
        y[5] = 30  # a label inside the banned shard
        lo, hi = (0, 20) if rank == 0 else (20, V_SHARDS)
        h = hidden.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, weight[lo:hi], y, bias=bias[lo:hi], entropy=True,
                                       vocab_group=dist.group.WORLD, backend="cpp", chunk=(4, 8))
        torch.where(torch.isfinite(st.logprobs), st.logprobs, 0.0).sum().backward()
        out["banned"] = [st.logprobs.detach(), st.entropy.detach(), h.grad]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_vocab_shards_empty_banned_and_out_of_range(tmp_path):
    """Two vocabulary shards against float64 log_softmax of the whole vocabulary's logits:

    * an empty shard beside logits that are all negative: the argmax is the other shard's best id (an empty
      shard has no logit, not one of 0), and a label equal to the vocabulary's size has a NaN log-prob;
    * a shard whose logits are all -inf, in several vocabulary chunks: a piece of no mass, so the other rows'
      log-probs, entropies and d(hidden) are those of the unbanned vocabulary, and a label inside it has log-prob
      -inf."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_shards_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    hidden, weight, labels = _shard_data()

    y = labels.clone()
    y[4] = V_SHARDS
    z = hidden.double() @ weight.double().T - 30.0
    assert (z < 0).all()
    logp = torch.log_softmax(z, -1)
    want_lp = torch.where(y == -100, 0.0, logp.gather(-1, y.clamp(0, V_SHARDS - 1).unsqueeze(-1)).squeeze(-1))
    want_lp[4] = float("nan")
    for r in range(world):
        lp, amax = res[r]["empty"]
        assert_close(lp, want_lp, atol=2e-5, rtol=2e-5, what=f"rank {r} logprobs, empty shard")
        assert torch.isnan(lp[4]), lp.tolist()
        assert torch.equal(amax, z.argmax(-1)), (r, amax.tolist())

    y = labels.clone()
    y[5] = 30
    bias = torch.zeros(V_SHARDS, dtype=torch.float64)
    bias[20:] = float("-inf")
    hr = hidden.double().requires_grad_(True)
    z = hr @ weight.double().T + bias
    logp = torch.log_softmax(z, -1)
    lp = torch.where(y == -100, 0.0, logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1))
    p = logp[:, :20].exp()
    ent = torch.where(y == -100, 0.0, -(p * logp[:, :20]).sum(-1))
    torch.where(torch.isfinite(lp), lp, 0.0).sum().backward()
    for r in range(world):
        got_lp, got_ent, dh = res[r]["banned"]
        finite = torch.arange(6) != 5  # row 5's label is in the banned shard
        assert torch.isneginf(got_lp[5]) and torch.isfinite(got_lp[finite]).all(), got_lp.tolist()
        assert_close(got_lp[finite], lp.detach()[finite], atol=2e-5, rtol=2e-5, what=f"rank {r} logprobs, banned shard")
        assert_close(got_ent, ent.detach(), atol=2e-5, rtol=2e-5, what=f"rank {r} entropy, banned shard")
        assert_close(dh, hr.grad, atol=2e-5, rtol=2e-5, what=f"rank {r} d hidden, banned shard")


def test_triton_backward_sums_a_bf16_weight_gradient_over_token_chunks():
    """The Triton backward with a bf16 d(weight) (as on a GPU, where the op gives it the input dtype) and several
    token chunks: the chunks' ``du.T @ h`` are summed in an fp32 buffer that the first chunk overwrites, then cast
    once; the result is float64 autograd's d(weight) within bf16 rounding."""
    pytest.importorskip("triton")
    from fastalign.ops import linear_triton

    hidden, weight, _, labels = make_inputs(n=12, v=70, dtype=torch.bfloat16, seed=3, bias=False)
    g_lp = torch.linspace(-1.0, 1.0, 12)
    wr = weight.double().requires_grad_(True)
    z = hidden.double() @ wr.T
    lse = torch.logsumexp(z, -1).detach().float()
    scored = labels != -100
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    (torch.where(scored, lp, 0.0) * g_lp.double()).sum().backward()
    dw = torch.full(weight.shape, float("nan"), dtype=torch.bfloat16)
    empty = torch.empty(0)
    linear_triton.backward(g_lp, None, None, hidden, weight, None, None, labels, lse, empty, empty, 1.0, 0.0, 1.0,
                           -100, 5, 0.0, None, dw, None, (None, None), torch.zeros_like(lse))  # |lse| < 32: log c 0
    assert dw.dtype == torch.bfloat16
    assert_close(dw, wr.grad, atol=2e-3, rtol=1e-2, what="d weight")


def _cuda_backends():
    from fastalign import _backend

    return ["triton", *(["cuda"] if _backend.cuda_kernels_usable(torch.device("cuda")) else [])]


@pytest.mark.parametrize("device, backend", [("cpu", "cpp"), ("cpu", "triton"),
                                             pytest.param("cuda", None, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("chunk", [None, (1, 1)], ids=["one piece", "a piece per id"])
def test_argmax_under_a_temperature_is_the_largest_logit(device, backend, chunk):
    """Two logits one ulp apart round to one z / T at T = 0.7: the argmax is the larger logit's id (1), as the C++
    token kernel takes it. The Triton kernels and the CUDA token kernel compared z / T (id 0), and so did the C++
    head path between its vocabulary pieces. On a GPU: every GPU backend."""
    if backend is None:
        for backend in _cuda_backends():
            _argmax_of_logits_one_ulp_apart(device, backend, chunk)
        return
    _argmax_of_logits_one_ulp_apart(device, backend, chunk)


def _argmax_of_logits_one_ulp_apart(device, backend, chunk):
    import numpy as np

    inv_t = np.float32(1 / 0.7)
    # in [1.5, 2) a logit's ulp is 2^-23 and z / T's (in [2, 4)) twice that: adjacent logits may share one
    a = next(a for a in np.float32(1.5) + np.arange(100, dtype=np.float32) * np.float32(2 ** -23)
             if a * inv_t == np.nextafter(a, np.float32(2)) * inv_t)
    b = np.nextafter(a, np.float32(2))
    logits = torch.tensor([[float(a), float(b), 0.0]], device=device)
    labels = torch.tensor([2], device=device)
    got = fastalign.token_logprobs(logits, labels, temperature=0.7, argmax=True, backend=backend).argmax
    assert got.tolist() == [1], backend
    if backend == "cuda":  # no CUDA head kernel
        return
    hidden, weight = torch.ones(1, 1, device=device), logits.T.contiguous()  # logits = hidden @ weight.T: a, b, 0
    got = fastalign.linear_logprobs(hidden, weight, labels, temperature=0.7, argmax=True, backend=backend,
                                    chunk=chunk).argmax
    assert got.tolist() == [1], backend
