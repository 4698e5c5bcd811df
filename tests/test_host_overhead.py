"""The host work around the kernels on small eager CPU calls (benchmarks/host_overhead.py measures it): eager
token statistics skip the custom-op dispatcher, the policy loss reads its metrics with few tensor ops, and both
give the results of the op path bit for bit. No timing here: the counts are of ops, the checks of values."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import fastalign
from fastalign.ops.token_stats import token_stats


class _Passthrough(TorchFunctionMode):
    """A function mode that changes nothing but makes every fastalign call take the custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _policy_batch(B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g) * 0.3 - 1.0
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    return lp, old, adv, mask


def _top_level_ops(fn) -> int:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def _bits(t):
    return t.detach().view(torch.int32) if t.dtype == torch.float32 else t


def test_eager_token_logprobs_skip_the_dispatcher_with_the_ops_results():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 0] = -100
    outs = []
    for mode in (None, _Passthrough()):
        x = logits.clone().requires_grad_(True)
        if mode is None:
            s = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, argmax=True, temperature=0.7)
        else:
            with mode:
                s = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, argmax=True, temperature=0.7)
        nodes = {type(n).__name__ for n, _ in s.logprobs.grad_fn.next_functions if n is not None}
        (s.logprobs.sum() + 0.5 * s.entropy.sum() - s.sum_p2.sum()).backward()
        outs.append((s, x.grad, nodes))
    (eager, g_eager, nodes), (op, g_op, op_nodes) = outs
    assert nodes == {"TokenStatsEagerBackward"}, nodes  # the eager function's node: no custom-op autograd node
    assert "TokenStatsEagerBackward" not in op_nodes
    for a, b in zip(eager, op):
        assert (a is None and b is None) or torch.equal(_bits(a), _bits(b))
    assert torch.equal(_bits(g_eager), _bits(g_op))


@pytest.mark.parametrize("loss_type, mask_dtype, budget", [("ppo", torch.bool, 17), ("grpo", torch.bool, 21),
                                                        ("ppo", torch.float32, 21)])
def test_policy_loss_reads_its_metrics_with_few_ops(loss_type, mask_dtype, budget):
    """One eager CPU call: the kernel, then its loss and metrics in at most ``budget`` top-level tensor ops
    (the clip metrics and divisors took 39 and 46, then 32 and 36 and 38 with a float mask: the kernel now
    writes the clip extremes, the mask is checked from its bool and tensors without a graph are not detached)."""
    lp, old, adv, mask = _policy_batch()
    lp.requires_grad_(True)
    mask = mask.to(mask_dtype)
    n = _top_level_ops(lambda: fastalign.policy_loss(lp, old, adv, mask, loss_type=loss_type))
    assert n <= budget, n


@pytest.mark.parametrize("options", [dict(loss_type="ppo"), dict(loss_type="grpo"),
                                     dict(loss_type="gspo", ref_logprobs=True, kl_coef=0.1),
                                     dict(loss_type="ppo", importance_sampling_level="sequence", per_sequence=True),
                                     dict(loss_type="dr_grpo", global_seqs=7), dict(loss_type="luspo"),
                                     dict(loss_type="cispo", global_tokens=29, dp_size=2)])
@pytest.mark.parametrize("empty", [False, True])
def test_eager_policy_loss_is_the_op_path_bit_for_bit(options, empty):
    lp, old, adv, mask = _policy_batch(seed=3)
    if empty:
        mask[:] = False  # no sequence counts: NaN extremes
    options = dict(options)
    if options.pop("ref_logprobs", False):
        options["ref_logprobs"] = old + 0.1
    if options.pop("per_sequence", False):
        adv = adv[:, 0].contiguous()
    results = []
    for mode in (None, _Passthrough()):
        x = lp.clone().requires_grad_(True)
        if mode is None:
            loss, metrics = fastalign.policy_loss(x, old, adv, mask, **options)
        else:
            with mode:
                loss, metrics = fastalign.policy_loss(x, old, adv, mask, **options)
        loss.backward()
        results.append((loss, metrics, x.grad))
    (loss, metrics, grad), (loss_op, metrics_op, grad_op) = results
    assert torch.equal(_bits(loss), _bits(loss_op)) and torch.equal(_bits(grad), _bits(grad_op))
    assert metrics.keys() == metrics_op.keys()
    for k in metrics:
        assert torch.equal(_bits(metrics[k]), _bits(metrics_op[k])), k
    if empty and "clip_low_min" in metrics and not options.get("importance_sampling_level"):
        assert metrics["clip_low_min"].isnan() and metrics["clip_high_max"].isnan()


def test_policy_loss_under_vmap_is_the_loop():
    """Under a functorch transform the inputs pass for plain tensors: the call takes the custom op (a vmap of the
    eager autograd function raised)."""
    g = torch.Generator().manual_seed(5)
    lp, old, adv = (torch.randn(3, 2, 6, generator=g) for _ in range(3))
    mask = torch.rand(3, 2, 6, generator=g) > 0.2
    mapped = torch.vmap(lambda a, b, c, d: fastalign.policy_loss(a, b, c, d)[0])(lp, old, adv, mask)
    looped = torch.stack([fastalign.policy_loss(lp[i], old[i], adv[i], mask[i])[0] for i in range(3)])
    assert torch.equal(mapped, looped)


def test_token_stats_op_still_serves_direct_callers():
    """The custom op itself (torch.compile, other libraries) is unchanged by the eager path."""
    logits = torch.randn(1, 4, 9)
    labels = torch.tensor([0, 3, -100, 8])
    lp, *_rest = token_stats(logits, labels, 1.0, -100, False, False, False, "cpp", False)
    s = fastalign.token_logprobs(logits[0], labels)
    assert torch.equal(lp, s.logprobs)


def _rows_with_counts(B, seed):
    """Row sums [B, 11] whose counts are those of a bool mask: n in 0..5, #clip_low + #clip_high <= n."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(B, 11, generator=g)
    n = torch.randint(0, 6, (B,), generator=g).float()
    lo = torch.floor(torch.rand(B, generator=g) * (n + 1))
    row[:, 1], row[:, 8], row[:, 9] = n, lo, torch.floor(torch.rand(B, generator=g) * (n - lo + 1))
    return row


@pytest.mark.parametrize("B", [0, 1, 5, 40])
def test_clip_extremes_in_torch_are_the_float64_extremes(B):
    """The clip extremes of the rows (the Triton path computes them in torch): min #clip_low / n and max
    #clip_high / n over the rows with n > 0, NaN when there is none."""
    from fastalign.ops.policy_loss import clip_extremes

    for row in (_rows_with_counts(B, B), torch.zeros(B, 11)):
        ext = clip_extremes(row)
        r = row.double()
        counted = r[:, 1] > 0
        if not counted.any():
            assert ext.dtype == torch.float32 and ext.shape == (2,) and ext.isnan().all()
            continue
        want = torch.stack(((r[counted, 8] / r[counted, 1]).min(), (r[counted, 9] / r[counted, 1]).max()))
        assert torch.equal(ext, want.float())  # quotients of small whole numbers: one rounding


@pytest.mark.parametrize("loss_type", ["ppo", "clip_cov"])
@pytest.mark.parametrize("empty", [False, True])
def test_kernels_write_the_clip_extremes_of_their_rows(loss_type, empty):
    """The C++ kernels write the clip extremes after their rows (the policy loss reads its clip_low_min /
    clip_high_max there, with no tensor op): bit for bit the torch computation from the same rows."""
    from fastalign.ops import policy_loss as ops

    lp, old, adv, mask = _policy_batch(B=6, T=40, seed=4)
    if empty:
        mask[:] = False
    m8 = mask.view(torch.uint8)
    params = list(fastalign.PolicyConfig(loss_type=loss_type).kernel_params(entropy_in_kernel=True))
    if loss_type == "ppo":
        outs = ops.policy_loss_rows(lp, old, adv, m8, None, None, None, None, None, None, params, "cpp")
    else:
        outs = ops.policy_loss_cov_rows(lp, old, adv, m8, None, None, None, None, None, torch.tensor([3]), params,
                                        True)
    row, _dlp, ext = outs
    assert (row[:, 8] > 0).any() or empty  # something was clipped
    assert torch.equal(_bits(ext), _bits(ops.clip_extremes(row)))
    assert ext.isnan().all() == empty
