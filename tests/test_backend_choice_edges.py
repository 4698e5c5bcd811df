"""Edges of the backend setting and of the lm_head arguments: nested ``use_backend`` blocks restore the outer
setting, a CUDA device given without an index is the current device, a preference option is accepted when any
of several combined loss types reads it, and with ``vocab_group`` a DTensor head that is not a ``Shard(0)``
vocabulary shard is refused with a ``TypeError`` naming the argument."""
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

import fastalign
from fastalign import _backend


def test_nested_use_backend_restores_the_outer_setting(monkeypatch):
    """Leaving an inner ``use_backend`` block puts back the outer block's backend, not the default; leaving the
    outer one puts back the environment's setting."""
    monkeypatch.setenv("FASTALIGN_BACKEND", "cpp")
    with fastalign.use_backend("auto"):
        with fastalign.use_backend("triton"):
            assert _backend.current() == "triton"
        assert _backend.current() == "auto"
        with fastalign.use_backend("cuda"):
            assert _backend.current() == "cuda"
        assert _backend.current() == "auto"
    assert _backend.current() == "cpp"


def test_a_cuda_device_without_index_is_the_current_device(monkeypatch):
    """``cuda_kernels_usable(torch.device("cuda"))`` answers for the current CUDA device: the fallback warning
    names that device and its answer is the one remembered for it."""
    fake = type("FakeCore", (), {"cuda_compiled": False})
    monkeypatch.setitem(sys.modules, "fastalign._C", fake)
    monkeypatch.setattr(fastalign, "_C", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    cache = {}
    monkeypatch.setattr(_backend, "_cuda_usable", cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.cuda_kernels_usable(torch.device("cuda")) is False
    assert len(caught) == 1 and "cuda:2 runs the Triton kernels instead" in str(caught[0].message)
    assert cache == {2: False}


def _pairs():
    g = torch.Generator().manual_seed(0)
    return [-torch.rand(4, generator=g) * 3 for _ in range(4)]


def test_an_option_read_by_one_of_the_combined_loss_types_is_accepted():
    """A loss option (``cpo_alpha``) set for a combination of loss types is accepted when one of them reads it
    (``cpo``), and refused when none does."""
    lc, lr, lc0, lr0 = _pairs()
    out = fastalign.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "cpo"], cpo_alpha=0.5,
                                   chosen_nll=-lc.mean())
    loss = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="cpo_alpha"):
        fastalign.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "hinge"], cpo_alpha=0.5)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_vocab_group_takes_a_shard0_dtensor_head_and_refuses_a_replicated_one(one_rank_group):
    """With ``vocab_group`` a ``Shard(0)`` DTensor head over that group is this rank's vocabulary rows (here,
    one rank: all of them, so the log-probs are the plain head's, in float64); a replicated DTensor head is not
    a vocabulary shard and is refused with a TypeError naming ``weight``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    expected = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, labels[:, None])[:, 0]
    mesh = init_device_mesh("cpu", (1,))
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    got = fastalign.linear_logprobs(hidden, sharded, labels, vocab_group=one_rank_group)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    replicated = distribute_tensor(weight, mesh, [Replicate()])
    with pytest.raises(TypeError, match="weight is a DTensor with placements"):
        fastalign.linear_logprobs(hidden, replicated, labels, vocab_group=one_rank_group)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_vocab_group_argmax_of_rows_without_a_logit_above_minus_inf(one_rank_group, backend, monkeypatch):
    """A shard row of only -inf and NaN reports column 0, whose logit may be the NaN: the merge compared NaN with
    the largest logit and gave id V, past the row; it takes such a logit as -inf, so the id is 0 as without
    vocab_group (docs/bad-inputs.md)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nan, ninf = float("nan"), float("-inf")
    z = torch.tensor([[nan, ninf, ninf, ninf], [ninf] * 4, [1.0, 2.0, nan, 2.0]])
    labels = torch.zeros(3, dtype=torch.long)
    alone = fastalign.token_logprobs(z, labels, argmax=True, backend=backend).argmax
    grouped = fastalign.token_logprobs(z, labels, argmax=True, backend=backend, vocab_group=one_rank_group).argmax
    assert alone.tolist() == grouped.tolist() == [0, 0, 1]


def _token_stats_of_a_shard(group):
    labels = torch.tensor([1, 2])
    return torch.randn(2, 0), lambda x: fastalign.token_logprobs(x, labels, vocab_group=group).logprobs


def _linear_stats_of_a_shard(group):
    hidden, labels = torch.randn(2, 4), torch.tensor([1, 2])
    return torch.randn(0, 4), lambda w: fastalign.linear_logprobs(hidden, w, labels, vocab_group=group).logprobs


@pytest.mark.parametrize("shard_stats", [_token_stats_of_a_shard, _linear_stats_of_a_shard],
                         ids=["token_logprobs", "linear_logprobs"])
def test_an_empty_vocabulary_shard_refuses_torch_compile(one_rank_group, shard_stats):
    """An empty vocabulary shard under torch.compile: the compiler moved or repeated that rank's constant
    collectives (a hang in backward, or a gloo abort: seen with two ranks, one empty, for both ops), so it is
    refused at tracing, naming the cause; eagerly, a vocabulary empty on every rank raises (a shard that is empty
    beside others is scored)."""
    shard, stats = shard_stats(one_rank_group)
    with pytest.raises(Exception, match="needs a non-empty vocabulary shard on every rank"):
        torch.compile(stats, fullgraph=True)(shard)
    with pytest.raises(ValueError, match="every rank's vocabulary shard is empty"):
        stats(shard)
