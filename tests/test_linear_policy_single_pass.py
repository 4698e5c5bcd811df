"""LinearPolicyLoss's single pass (blocks of whole sequences through the head once, gradients while the
block's logits are in memory) equals its two-pass path: loss, every metric and the gradients of hidden,
weight and bias, for every loss separable over sequences; blocks of one sequence and of the whole batch;
the C++ kernels and the Triton kernels in the interpreter. The two-pass path itself equals the float64
oracle on materialised logits (test_linear_policy_loss)."""
from __future__ import annotations

import pytest
import torch

import fastalign
import fastalign.linear_policy as linear_policy
from helpers import assert_close

B, T, H, V = 4, 9, 16, 97

CONFIGS = {
    "grpo+k3+entropy": dict(loss_type="grpo", eps_high=0.28, kl_coef=0.05, entropy_coef=0.01),
    "dapo+kl_rho": dict(loss_type="dapo", eps_high=0.28, kl_coef=0.05, kl_rho="grad"),
    "dr_grpo": dict(loss_type="dr_grpo", max_len=T),
    "bnpo+dual_clip+delta": dict(loss_type="bnpo", dual_clip=3.0, delta=4.0),
    "gspo": dict(loss_type="gspo", eps_low=3e-4, eps_high=4e-4),
    "cispo": dict(loss_type="cispo", eps_high=0.28),
    "sapo": dict(loss_type="sapo"),
    "vespo": dict(loss_type="vespo"),
    "geo_mean": dict(loss_type="geo_mean"),
    "seq-mean-token-sum+entropy_agg": dict(loss_type="ppo", agg="seq-mean-token-sum", entropy_coef=0.02,
                                           entropy_agg="token-mean"),
    "rollout_correction+offpolicy": dict(loss_type="ppo", rollout_correction="token_truncate",
                                         offpolicy_threshold=0.05),
    "global_counts": dict(loss_type="ppo", agg="seq-mean-token-mean", dp_size=2),
    "global_token_count": dict(loss_type="ppo", agg="token-mean", dp_size=2),
    "sequence_ratio": dict(loss_type="ppo", importance_sampling_level="sequence", eps_low=3e-4, eps_high=4e-4),
    "dppo_tv+reinforce_kl": dict(loss_type="dppo_tv", kl_coef=0.1, kl_type="k2"),
    "gpg": dict(loss_type="gpg", entropy_coef=0.01),
}


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 5] = -100  # a tool token inside the response
    with torch.no_grad():
        z = hidden.float() @ weight.float().T + bias.float()
        lp0 = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = torch.rand(B, T, generator=g) > 0.15
    mask[3, 4:] = False  # a short response
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask,
                old=lp0 + torch.randn(B, T, generator=g) * 0.2, ref=lp0 + torch.randn(B, T, generator=g) * 0.2,
                rollout=lp0 + torch.randn(B, T, generator=g) * 0.2, A=torch.randn(B, generator=g))


def run(d, config, single_pass, backend="cpp", **call):
    leaves = [d[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    mod = fastalign.LinearPolicyLoss(backend=backend, single_pass=single_pass, **config)
    inputs = {}
    if config.get("kl_coef"):
        inputs["ref_logprobs"] = d["ref"]
    if config.get("rollout_correction") or config.get("offpolicy_threshold"):
        inputs["rollout_logprobs"] = d["rollout"]
    loss, metrics = mod(leaves[0], leaves[1], d["labels"], d["old"], d["A"], d["mask"], bias=leaves[2], **inputs,
                        **call)
    loss.backward()
    return loss, metrics, [t.grad for t in leaves]


def check_same(single, two, tol=2e-5):
    loss, metrics, grads = single
    rloss, rmetrics, rgrads = two
    assert_close(loss, rloss, atol=tol, rtol=tol, what="loss")
    assert set(metrics) == set(rmetrics)
    for k in rmetrics:
        assert_close(metrics[k], rmetrics[k], atol=tol, rtol=tol, what=k)
    for got, want, name in zip(grads, rgrads, ("d hidden", "d weight", "d bias")):
        assert_close(got, want, atol=tol, rtol=tol, what=name)


@pytest.fixture(params=["1e-9", "1024"], ids=["one-sequence-blocks", "one-block"])
def block_mib(request, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", request.param)


GLOBAL_COUNTS = {"global_counts": {"global_seqs": 7}, "global_token_count": {"global_tokens": torch.tensor(40.0)}}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_pass_equals_two_passes(name, block_mib):
    d = make(seed=1)
    call = GLOBAL_COUNTS.get(name, {})
    check_same(run(d, CONFIGS[name], True, **call), run(d, CONFIGS[name], False, **call))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_softcap_derivative_counts_in_the_block_budget(softcap, monkeypatch):
    """With softcap a block holds the logits and their softcap derivative, in one reused buffer each: the budget
    of two sequences' logits takes one sequence per block (a new derivative per block, beside the previous
    one, held three blocks of logits at once)."""
    import fastalign.ops.single_pass as single_pass

    rows, buffers, derivs = [], [], set()
    orig_forward, orig_buffer = single_pass.block_forward, single_pass.block_buffer

    def forward(buf, h, *a, **k):
        rows.append(h.shape[0])
        out = orig_forward(buf, h, *a, **k)
        if out[1] is not None:
            derivs.add(out[1].untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(single_pass, "block_forward", forward)
    monkeypatch.setattr(single_pass, "block_buffer", lambda *a: buffers.append(a) or orig_buffer(*a))
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(2 * T * V * 4 / 2**20))
    d = make(seed=3)
    config = dict(CONFIGS["grpo+k3+entropy"], softcap=softcap) if softcap else CONFIGS["grpo+k3+entropy"]
    check_same(run(d, config, True), run(d, config, False))
    assert len(rows) == (B if softcap else B // 2)
    assert len(buffers) == 1 and len(derivs) == (1 if softcap else 0)


def test_single_pass_is_taken(monkeypatch):
    """``"auto"`` takes the single pass when gradients are needed, the two passes otherwise."""
    calls = []
    orig = linear_policy.single_pass_loss
    monkeypatch.setattr(linear_policy, "single_pass_loss", lambda *a, **k: calls.append(k["aux"]) or orig(*a, **k))
    d = make(seed=2)
    run(d, CONFIGS["grpo+k3+entropy"], "auto")
    run(d, dict(loss_type="ppo"), "auto")
    assert calls == ["entropy", None]
    with torch.no_grad():
        fastalign.LinearPolicyLoss(loss_type="ppo")(d["hidden"], d["weight"], d["labels"], d["old"], d["A"],
                                                   d["mask"])
    assert len(calls) == 2
    head = torch.nn.Linear(H, V)  # a model's lm_head: its weight and bias are nn.Parameters
    loss, _ = fastalign.LinearPolicyLoss(loss_type="ppo")(d["hidden"], head.weight, d["labels"], d["old"], d["A"],
                                                          d["mask"], bias=head.bias)
    loss.backward()
    assert len(calls) == 3 and head.weight.grad is not None
    bf16 = make(seed=2, dtype=torch.bfloat16)  # a bf16 head on the CPU: the two passes (no whole-weight upcast)
    run(bf16, dict(loss_type="ppo"), "auto")
    assert len(calls) == 3
    # a loss that reads whole sequences (gspo) with one sequence's fp32 logits over the block budget: the two
    # passes; within it: the single pass
    sequence_mib = T * V * 4 / 2**20
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(sequence_mib * 0.99))
    run(d, CONFIGS["gspo"], "auto")
    assert len(calls) == 3
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(sequence_mib))
    run(d, CONFIGS["gspo"], "auto")
    assert len(calls) == 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_separable_losses_take_blocks_of_tokens(name, monkeypatch):
    """With a block budget of 3 tokens (under one sequence), a loss separable over tokens still takes the single
    pass, in blocks of any 3 tokens, and equals the two passes; a loss that reads whole sequences (gspo,
    geo_mean, vespo, a sequence-level ratio, the off-policy mask) takes the two passes."""
    calls = []
    orig = linear_policy._single_pass
    monkeypatch.setattr(linear_policy, "_single_pass", lambda *a: calls.append(a[5].shape) or orig(*a))
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(3 * V * 4 / 2**20))
    d = make(seed=4)
    call = GLOBAL_COUNTS.get(name, {})
    auto = run(d, CONFIGS[name], "auto", **call)
    separable = fastalign.PolicyConfig(**CONFIGS[name]).token_separable
    assert calls == ([(B * T, 1)] if separable else [])  # the labels, one token per item
    check_same(auto, run(d, CONFIGS[name], False, **call))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_triton_kernels(softcap):
    d = make(seed=3)
    cfg = dict(CONFIGS["grpo+k3+entropy"], temperature=0.8, softcap=softcap)
    check_same(run(d, cfg, True, backend="triton"), run(d, cfg, False, backend="triton"))


def test_triton_kernels_blocks_of_tokens(monkeypatch):
    """Blocks of 5 tokens across sequences on the Triton kernels (labelled rows put first on the device)."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(5 * V * 4 / 2**20))
    d = make(seed=5)
    cfg = dict(CONFIGS["grpo+k3+entropy"], temperature=0.8)
    check_same(run(d, cfg, "auto", backend="triton"), run(d, cfg, False, backend="triton"))


def test_entropy_quantile_with_threshold():
    """The batch's entropy quantile couples the sequences; a given threshold (e.g. gathered over every
    process) does not."""
    d = make(seed=4)
    cfg = dict(loss_type="ppo", entropy_quantile=0.5)
    threshold = torch.tensor([1.5])
    check_same(run(d, cfg, True, entropy_threshold=threshold), run(d, cfg, False, entropy_threshold=threshold))
    with pytest.raises(ValueError, match="entropy_quantile takes the batch's quantile"):
        run(d, cfg, True)
    run(d, cfg, "auto")  # the two passes


def test_bf16():
    d = make(seed=5, dtype=torch.bfloat16)
    cfg = CONFIGS["grpo+k3+entropy"]
    check_same(run(d, cfg, True), run(d, cfg, False), tol=2e-2)


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1 / 3), (torch.bfloat16, 0.1), (torch.float16, 2.0 ** 16),
                                         (torch.float16, 2.0 ** 12)])
def test_gradients_are_scaled_in_fp32_and_rounded_once(dtype, scale):
    """The incoming gradient (a GradScaler's 2^16, 1 / accumulation steps) multiplies the fp32 gradients, which
    are then rounded once: each gradient is the fp32 one (the same step on the fp32 values of the inputs) times
    the scale, rounded to the dtype; not the gradient rounded first and times the rounded scale (2^16 is inf in
    fp16, 1/3 is 0.2% high in bf16), a bias that no rounding tolerance hides in the mean."""
    d = make(seed=6, dtype=dtype)
    cfg = CONFIGS["dapo+kl_rho"]
    leaves = [d[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    f32 = [d[k].float().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    for xs in (leaves, f32):
        loss, _ = fastalign.LinearPolicyLoss(single_pass=True, **cfg)(
            xs[0], xs[1], d["labels"], d["old"], d["A"], d["mask"], bias=xs[2], ref_logprobs=d["ref"])
        (loss * scale).backward()
    for x, ref, name in zip(leaves, f32, ("d hidden", "d weight", "d bias")):
        want = ref.grad.to(dtype)  # (the fp32 gradient times the scale) rounded once
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name
        assert_close(x.grad, want, atol=0, rtol=2.0 ** -7, what=name)  # the fp32 sums' order: one ulp at most
        big = want.float().abs() > 1e-3 * want.float().abs().max()
        ratio = (x.grad.float()[big] / want.float()[big]).mean().item()
        assert abs(ratio - 1) < 3e-4, f"{name}: mean ratio to the once-rounded gradient {ratio}"


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1 / 3), (torch.float16, 2.0 ** 16)])
def test_gpu_blocks_scale_their_gradients_without_rounding_the_scale(dtype, scale, monkeypatch):
    """On a GPU the blocks, and d(hidden) from them, keep the input dtype (simulated here); the backward multiplies
    that d(hidden) by the incoming gradient in fp32 and rounds once: exactly the unscaled step's d(hidden) times
    the scale, rounded, never times the scale rounded first (1/3 in bf16: 0.2% high; 2^16 in fp16: inf)."""
    import fastalign.ops.single_pass as SP

    monkeypatch.setattr(SP, "block_dtype", lambda like: like.dtype)
    monkeypatch.setattr(SP, "block_buffer", lambda rows, vocab, like: torch.empty(rows * vocab, dtype=like.dtype))
    d = make(seed=7, dtype=dtype)
    cfg = CONFIGS["dapo+kl_rho"]
    grads = []
    for s in (1.0, scale):
        h = d["hidden"].clone().requires_grad_(True)
        loss, _ = fastalign.LinearPolicyLoss(single_pass=True, **cfg)(
            h, d["weight"], d["labels"], d["old"], d["A"], d["mask"], bias=d["bias"], ref_logprobs=d["ref"])
        (loss * s).backward()
        grads.append(h.grad)
    assert grads[1].dtype == dtype and torch.isfinite(grads[1]).all()
    assert torch.equal(grads[1], (grads[0].float() * scale).to(dtype))


@pytest.mark.parametrize("config,call,match", [
    (dict(loss_type="clip_cov", cov_ratio=0.2), {}, "chooses its tokens across the batch"),
    (dict(loss_type="ppo", chunk=(4, 16)), {}, "chunk"),
    (dict(loss_type="ppo", grad_skip_threshold=1e-3, backend="triton"), {}, "grad_skip_threshold"),
])
def test_single_pass_true_raises_where_it_does_not_apply(config, call, match):
    with pytest.raises(ValueError, match=match):
        fastalign.LinearPolicyLoss(single_pass=True, **config)


@pytest.mark.parametrize("unset", [dict(grad_skip_threshold=0), dict(grad_skip_threshold=float("0")),
                                   dict(chunk=None, vocab_group=None)], ids=["int-0", "float-0", "none"])
def test_single_pass_true_takes_the_two_pass_options_at_their_unset_values(unset):
    """``grad_skip_threshold`` 0 (as an int or any float 0) and ``chunk`` / ``vocab_group`` None are the options
    left unset: they do not rule out the single pass, which equals the two passes."""
    d = make(seed=7)
    cfg = dict(CONFIGS["grpo+k3+entropy"], **unset)
    check_same(run(d, cfg, True), run(d, cfg, False))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("config", ["grpo+k3+entropy", "seq-mean-token-sum+entropy_agg"])
def test_low_rank_head(backend, config, block_mib):
    """A LoRA head (frozen W, trainable a = s A(h) and L = B) through the single pass: loss, metrics and
    the gradients of hidden, a and L equal the two passes, and no gradient reaches the frozen W."""
    d = make(seed=6)
    g = torch.Generator().manual_seed(16)
    a0, lw0 = torch.randn(B, T, 3, generator=g), torch.randn(V, 3, generator=g) * 0.1
    cfg = CONFIGS[config]

    def lora(single_pass):
        h, a, lw = (t.clone().requires_grad_(True) for t in (d["hidden"], a0, lw0))
        inputs = {"ref_logprobs": d["ref"]} if cfg.get("kl_coef") else {}
        mod = fastalign.LinearPolicyLoss(backend=backend, single_pass=single_pass, **cfg)
        loss, metrics = mod(h, d["weight"], d["labels"], d["old"], d["A"], d["mask"], bias=d["bias"],
                            low_rank=(a, lw), **inputs)
        loss.backward()
        return loss, metrics, [h.grad, a.grad, lw.grad]

    single, two = lora(True), lora(False)
    check_same(single, two)
    for got, want, name in zip(single[2], two[2], ("d hidden", "d a", "d L")):
        assert_close(got, want, atol=2e-5, rtol=2e-5, what=name)


def test_low_rank_head_takes_the_single_pass_by_default(monkeypatch):
    """``"auto"`` with a LoRA head on an fp32 CPU head: the single pass runs (gradients are needed by
    a and L even with W frozen)."""
    d = make(seed=6)
    calls = []
    real = linear_policy.single_pass_loss
    monkeypatch.setattr(linear_policy, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, lw = torch.randn(B, T, 2, requires_grad=True), (torch.randn(V, 2) * 0.1).requires_grad_(True)
    loss, _ = fastalign.LinearPolicyLoss(loss_type="ppo")(d["hidden"], d["weight"], d["labels"], d["old"], d["A"],
                                                           d["mask"], low_rank=(a, lw))
    loss.backward()
    assert calls == [1] and a.grad is not None and lw.grad is not None


def test_backward_twice_raises():
    d = make(seed=7)
    h = d["hidden"].clone().requires_grad_(True)
    loss, _ = fastalign.LinearPolicyLoss(loss_type="ppo", single_pass=True)(
        h, d["weight"], d["labels"], d["old"], d["A"], d["mask"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_bad_head_inputs_are_named():
    d = make(seed=8)
    h = d["hidden"].clone().requires_grad_(True)
    mod = fastalign.LinearPolicyLoss(loss_type="ppo", single_pass=True)
    with pytest.raises(ValueError, match="weight must have shape"):
        mod(h, d["weight"][:, :-1], d["labels"], d["old"], d["A"], d["mask"])
    with pytest.raises(ValueError, match="bias must have shape"):
        mod(h, d["weight"], d["labels"], d["old"], d["A"], d["mask"], bias=d["bias"][:-1])
    with pytest.raises(ValueError, match="single_pass must be one of"):
        fastalign.LinearPolicyLoss(single_pass="yes")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_non_finite_ignored_row_adds_nothing_to_the_weight_gradient(backend):
    """NaN and inf hidden states at ignored positions (prompt, padding: label -100) with the rows kept in the
    block (compact=False): the single pass gives the two-pass loss and gradients, all finite (d(weight) took
    0 * NaN from those rows on the C++ path), for the preference loss and the policy loss."""
    g = torch.Generator().manual_seed(21)
    h = torch.randn(4, 6, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (4, 6), generator=g)
    y[:, :2] = -100
    h[0, 0, 3], h[3, 1, 0] = float("nan"), float("inf")
    results = []
    for single_pass in (True, False):
        hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fastalign.LinearPreferenceLoss(beta=0.1, backend=backend, single_pass=single_pass,
                                                 compact=False)(hx, wx, y)
        results.append((loss, *torch.autograd.grad(loss, [hx, wx])))
    assert all(torch.isfinite(t).all() for t in results[0])
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what="single pass against two passes")
    mask = (y != -100).float()
    old, adv = torch.randn(4, 6, generator=g) - 3.0, torch.randn(4, generator=g)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fastalign.LinearPolicyLoss(loss_type="grpo", backend=backend, single_pass=True)(
        hx, wx, y.clamp(min=0), old, adv, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in torch.autograd.grad(loss, [wx]))


def test_a_token_mean_entropy_bonus_over_a_quantile_takes_the_two_passes(monkeypatch):
    """With entropy_quantile, entropy_agg="token-mean" divides the bonus by the batch's kept tokens, which a block
    of sequences does not know: the single pass gave wrong d(hidden) / d(weight) over several blocks. It is
    refused with single_pass=True, and "auto" takes the two passes."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-9")
    d = make(seed=6)
    cfg = dict(loss_type="ppo", entropy_quantile=0.5, entropy_coef=0.05, entropy_agg="token-mean")
    threshold = torch.tensor([1.5])
    with pytest.raises(ValueError, match="token-mean"):
        run(d, cfg, True, entropy_threshold=threshold)
    check_same(run(d, cfg, "auto", entropy_threshold=threshold), run(d, cfg, False, entropy_threshold=threshold))


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_an_on_policy_sequence_rollout_correction_is_not_token_separable(mode, monkeypatch):
    """The sequence rollout weight reads the whole sequence's old log-probs, the policy's own when old_logprobs
    is None: blocks of tokens held the others at 0 and gave wrong gradients. Such a loss is not separable over
    tokens, and "auto" with a block under one sequence equals the two passes."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(3 * V * 4 / 2**20))
    cfg = dict(loss_type="dapo", rollout_correction=mode)
    assert not fastalign.PolicyConfig(**cfg).token_separable
    d = make(seed=7)
    d["old"] = None
    check_same(run(d, cfg, "auto"), run(d, cfg, False))


@pytest.mark.parametrize("module", ["policy", "preference"])
def test_a_single_pass_step_leaves_no_tensor_in_a_reference_cycle(module):
    """A closure that called itself held each block's [rows, V] logits in a reference cycle, freed only when the
    cyclic GC ran (a 1 GiB block per step on a GPU). With the GC off, a step leaves no tensor to collect."""
    import gc
    d = make(seed=8)
    if module == "policy":
        step = lambda h, w: fastalign.LinearPolicyLoss(loss_type="grpo", single_pass=True)(  # noqa: E731
            h, w, d["labels"], d["old"], d["A"], d["mask"])[0]
    else:
        step = lambda h, w: fastalign.LinearPreferenceLoss(single_pass=True)(h, w, d["labels"])[0]  # noqa: E731
    h, w = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
    step(h, w).backward()  # imports and first-call caches
    gc.collect()
    gc.disable()
    try:
        step(h, w).backward()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # fake tensors a torch.compile of an earlier test left for the collector are not this step's
        from torch._subclasses.fake_tensor import FakeTensor
        cycled = [t for t in gc.garbage if torch.is_tensor(t) and not isinstance(t, FakeTensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cycled == []


def test_single_pass_true_under_inference_mode_runs_the_forward():
    """single_pass=True under torch.inference_mode() crashed inside autograd (the single pass computes gradients
    in the forward); without gradients to compute the forward alone runs: the loss of the two passes."""
    d = make(seed=9)
    pol = fastalign.LinearPolicyLoss(loss_type="grpo", single_pass=True)
    pref = fastalign.LinearPreferenceLoss(single_pass=True)
    with torch.inference_mode():
        got = (pol(d["hidden"], d["weight"], d["labels"], d["old"], d["A"], d["mask"])[0],
               pref(d["hidden"], d["weight"], d["labels"])[0])
    with torch.no_grad():
        want = (fastalign.LinearPolicyLoss(loss_type="grpo", single_pass=False)(
                    d["hidden"], d["weight"], d["labels"], d["old"], d["A"], d["mask"])[0],
                fastalign.LinearPreferenceLoss(single_pass=False)(d["hidden"], d["weight"], d["labels"])[0])
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-6, rtol=1e-6, what="loss under inference_mode")


@pytest.mark.parametrize("token_separable", [False, True])
def test_policy_logprobs_are_the_steps_bit_for_bit_without_derivative_work(token_separable, monkeypatch):
    """``policy_logprobs`` (the old policy's log-probs of an on-policy step) equals, bit for bit, the log-probs
    and entropies ``policy_step`` computes with gradients (the same blocks of the single pass: their ratio is
    exactly 1), in several blocks, and runs no block backward."""
    import fastalign.ops.single_pass as single_pass_ops

    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(2 * T * V * 4 / 2**20))  # two sequences a block
    d = make(seed=11)
    leaves = [d[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    logit = dict(temperature=0.7)
    cfg = fastalign.PolicyConfig(loss_type="grpo")

    def loss(lp, old, ent):
        return fastalign.policy_loss(lp, old, d["A"], d["mask"], config=cfg, entropy=ent)

    backwards = []
    orig = single_pass_ops.block_backward
    monkeypatch.setattr(single_pass_ops, "block_backward", lambda *a, **k: backwards.append(1) or orig(*a, **k))
    _, _, lp, ent = linear_policy.policy_step(*leaves[:2], d["labels"], None, loss, bias=leaves[2], entropy=True,
                                              single_pass="auto", token_separable=token_separable, logit=logit)
    assert len(backwards) > 1  # the step took the single pass, in several blocks
    backwards.clear()
    got_lp, got_ent = linear_policy.policy_logprobs(*leaves[:2], d["labels"], bias=leaves[2], entropy=True,
                                                    token_separable=token_separable, logit=logit)
    assert backwards == []
    assert torch.equal(got_lp, lp) and torch.equal(got_ent, ent)
    assert not got_lp.requires_grad


@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_policy_step_without_old_logprobs_holds_them_constant(single_pass):
    """``policy_step(old_logprobs=None)``: the loss gets the policy's own log-probs, detached, as the old ones
    (a ratio of exactly 1 with no gradient through the old side). A loss that reads the ratio itself,
    ``sum(m A exp(lp - old))``, then has the gradient of ``sum(m A lp)``: checked against float64 autograd
    through materialised logits."""
    d = make(seed=12)
    leaves = [d[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    A, m = d["A"][:, None], d["mask"].float()

    def loss(lp, old, ent):
        return (m * A * torch.exp(lp - old)).sum(), {}

    value, _, _, _ = linear_policy.policy_step(*leaves[:2], d["labels"], None, loss, bias=leaves[2],
                                               single_pass=single_pass, logit={})
    value.backward()
    h, w, b = (d[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    lp = torch.log_softmax(h @ w.T + b, -1).gather(-1, d["labels"].clamp(min=0)[..., None])[..., 0]
    (m.double() * A.double() * torch.where(d["labels"] != -100, lp, 0.0)).sum().backward()
    assert_close(value, (m * A).sum(), atol=1e-5, rtol=1e-5, what="loss")  # every ratio is 1
    for got, want, what in ((leaves[0].grad, h.grad, "d hidden"), (leaves[1].grad, w.grad, "d weight"),
                            (leaves[2].grad, b.grad, "d bias")):
        assert_close(got, want, atol=1e-5, rtol=1e-4, what=what)
