"""linear_logprobs with a low-rank term on the head, ``z = scale (h W^T + a L^T + b)`` (a LoRA lm_head):
against the float64 reference of the widened head ``[h, a] [W, L]^T``, gradients to h, W, b, a and L,
on the C++ path and the Triton kernels in the interpreter."""
import os

import pytest
import torch

import fastalign
from fastalign import reference
from helpers import assert_close, rank_body
from test_linear_logprobs import BACKEND_IDS, BACKENDS, N, V, _free_port, make_inputs

R = 5  # a rank not a multiple of any block size


def make_low_rank(n=N, v=V, r=R, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g).to(dtype), (torch.randn(v, r, generator=g) * 0.4).to(dtype)


def run_both(hidden, weight, bias, a, lw, labels, backend, chunk, weights=(1.0, -0.3, 0.5), **kw):
    """(stats, grads of h, W, b, a, L) from fastalign and from the float64 reference of the widened head,
    for loss = sum(w0 logprobs + w1 entropy + w2 sum_p2)."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (hidden, weight, bias, a, lw)]
    h, w, b, a_, l_ = leaves
    st = fastalign.linear_logprobs(h, w, labels, bias=b, low_rank=(a_, l_), entropy=True, sum_p2=True, argmax=True,
                                   backend=backend, chunk=chunk, **kw)
    (st.logprobs * weights[0] + st.entropy * weights[1] + st.sum_p2 * weights[2]).sum().backward()
    refs = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias, a, lw)]
    hr, wr, br, ar, lr = refs
    ref = reference.linear_logprobs(torch.cat([hr, ar], -1), torch.cat([wr, lr], 1), labels, bias=br,
                                    dtype=torch.float64, **kw)
    (ref[0] * weights[0] + ref[1] * weights[1] + ref[2] * weights[2]).sum().backward()
    return st, [None if t is None else t.grad for t in leaves], ref, [None if t is None else t.grad for t in refs]


def check(st, grads, ref, ref_grads, tol, gtol):
    for got, want, name in zip(st[:3], ref[:3], ("logprobs", "entropy", "sum_p2")):
        assert_close(got, want, atol=tol, rtol=tol, what=name)
    assert torch.equal(st.argmax, ref[3])
    for got, want, name in zip(grads, ref_grads, ("d hidden", "d weight", "d bias", "d a", "d L")):
        if want is not None:
            assert_close(got, want, atol=gtol, rtol=gtol, what=name)


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def path(request):
    return request.param


@pytest.mark.parametrize("pipe", [{}, dict(logit_scale=1.7, softcap=3.0, temperature=0.8)], ids=["plain", "all"])
def test_fp32_equals_widened_head(path, pipe):
    hidden, weight, bias, labels = make_inputs()
    a, lw = make_low_rank()
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, a, lw, labels, *path, **pipe)
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5)
    ignored = labels == -100
    assert ignored.any() and torch.count_nonzero(grads[3][ignored]) == 0  # ignored rows: no gradient to a


def test_bf16_no_bias_3d(path):
    hidden, weight, _bias, labels = make_inputs(dtype=torch.bfloat16, bias=False)
    a, lw = make_low_rank(dtype=torch.bfloat16)
    B = 1 if N % 2 else 2
    st, grads, ref, ref_grads = run_both(hidden.view(B, -1, hidden.shape[-1]), weight, None,
                                         a.view(B, -1, R), lw, labels.view(B, -1), *path)
    assert st.logprobs.dtype == torch.float32 and grads[3].dtype == grads[4].dtype == torch.bfloat16
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-2)


def test_gradients_renormalised_at_large_lse(path):
    """|lse| >= 32 (temperature 1/64): backward renormalises each row by its mass, the low-rank term included."""
    hidden, weight, bias, labels = make_inputs(seed=4)
    a, lw = make_low_rank(seed=5)
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, a, lw, labels, *path, weights=(1.0, 0.0, 0.0),
                                         temperature=1.0 / 64)
    check(st, grads, ref, ref_grads, tol=2e-3, gtol=2e-3)


def test_only_the_low_rank_term_trains():
    """A frozen head with a trainable adapter (LoRA): gradients reach a and L only; they equal those of
    the widened head, whose W columns are not asked for."""
    hidden, weight, bias, labels = make_inputs(seed=6)
    a, lw = make_low_rank(seed=7)
    a_, l_ = a.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, low_rank=(a_, l_), entropy=True)
    (st.logprobs - 0.1 * st.entropy).sum().backward()
    ar, lr = a.double().requires_grad_(True), lw.double().requires_grad_(True)
    ref = reference.linear_logprobs(torch.cat([hidden.double(), ar], -1), torch.cat([weight.double(), lr], 1),
                                    labels, bias=bias.double(), dtype=torch.float64)
    (ref[0] - 0.1 * ref[1]).sum().backward()
    assert_close(a_.grad, ar.grad, atol=2e-5, rtol=2e-5, what="d a")
    assert_close(l_.grad, lr.grad, atol=2e-5, rtol=2e-5, what="d L")


def test_zero_low_rank_term_changes_nothing(path):
    """LoRA's initial state (L = 0) gives the head's own statistics, bit for bit on the C++ path."""
    hidden, weight, bias, labels = make_inputs(seed=8)
    a, _ = make_low_rank(seed=9)
    plain = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, backend=path[0], chunk=path[1])
    zero = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, backend=path[0], chunk=path[1],
                                     low_rank=(a, torch.zeros(V, R)))
    assert_close(zero.logprobs, plain.logprobs, atol=1e-6, rtol=0, what="logprobs")
    assert_close(zero.entropy, plain.entropy, atol=1e-6, rtol=0, what="entropy")


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = make_inputs(seed=10)
    a, lw = make_low_rank(seed=11)

    def step(a, lw):
        st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, low_rank=(a, lw), entropy=True)
        return (st.logprobs - 0.01 * st.entropy).sum()

    leaves = [t.clone().requires_grad_(True) for t in (a, lw)]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    eager = [t.clone().requires_grad_(True) for t in (a, lw)]
    step(*eager).backward()
    for got, want in zip(leaves, eager):
        assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-6, what="compiled gradient")


@pytest.mark.parametrize("low_rank,err,match", [
    ("ab", TypeError, "low_rank must be a pair"),
    ((torch.randn(N, R),), TypeError, "low_rank must be a pair"),
    ((torch.randn(N, R), torch.randn(V + 1, R)), ValueError, r"low_rank\[1\] must have shape"),
    ((torch.randn(N, R + 1), torch.randn(V, R)), ValueError, r"low_rank\[0\] must have shape"),
    ((torch.randn(N, R, dtype=torch.float64), torch.randn(V, R)), TypeError, r"low_rank\[0\] must be float32"),
    ((torch.randn(N, R).half(), torch.randn(V, R).half()), TypeError, r"low_rank\[0\] must have the dtype"),
    ((torch.randn(N, R), torch.randn(V, R).bfloat16()), TypeError, r"low_rank\[1\] must have the dtype"),
    ((torch.randn(N, 0), torch.randn(V, 0)), ValueError, "rank"),
    ((torch.randn(N, R), torch.randint(0, 3, (V, R))), TypeError, r"low_rank\[1\]"),
])
def test_bad_low_rank(low_rank, err, match):
    hidden, weight, bias, labels = make_inputs()
    with pytest.raises(err, match=match):
        fastalign.linear_logprobs(hidden, weight, labels, bias=bias, low_rank=low_rank)


def _vocab_parallel_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with rank_body():
        torch.set_num_threads(1)
        hidden, weight, bias, labels = make_inputs(n=N, v=2 * 101)
        a, lw = make_low_rank(v=2 * 101)
        vr = weight.shape[0] // world
        shard = slice(rank * vr, (rank + 1) * vr)
        h, a_ = hidden.clone().requires_grad_(True), a.clone().requires_grad_(True)
        w, l_ = weight[shard].clone().requires_grad_(True), lw[shard].clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, labels, bias=bias[shard], low_rank=(a_, l_), entropy=True,
                                       vocab_group=dist.group.WORLD, backend="cpp", chunk=(5, 37))
        (st.logprobs - 0.3 * st.entropy).sum().backward()
        torch.save({"stats": [st.logprobs.detach(), st.entropy.detach()], "dh": h.grad, "dw": w.grad, "da": a_.grad,
                    "dl": l_.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_vocab_parallel_two_ranks_gloo(tmp_path):
    """L sharded with the weight, a replicated with hidden: two shards equal one rank, d(a) summed over them."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    hidden, weight, bias, labels = make_inputs(n=N, v=2 * 101)
    a, lw = make_low_rank(v=2 * 101)
    h, w, a_, l_ = (t.clone().requires_grad_(True) for t in (hidden, weight, a, lw))
    st = fastalign.linear_logprobs(h, w, labels, bias=bias, low_rank=(a_, l_), entropy=True, backend="cpp")
    (st.logprobs - 0.3 * st.entropy).sum().backward()
    vr = weight.shape[0] // world
    for r in range(world):
        out = torch.load(tmp_path / f"rank{r}.pt")
        shard = slice(r * vr, (r + 1) * vr)
        assert_close(out["stats"][0], st.logprobs, atol=2e-5, rtol=1e-5, what=f"rank {r} logprobs")
        assert_close(out["stats"][1], st.entropy, atol=2e-5, rtol=1e-5, what=f"rank {r} entropy")
        for key, want in (("dh", h.grad), ("da", a_.grad), ("dw", w.grad[shard]), ("dl", l_.grad[shard])):
            assert_close(out[key], want, atol=2e-5, rtol=1e-5, what=f"rank {r} {key}")
