"""Liger-Kernel adapters (fastalign.integrations.liger) against Liger-Kernel 0.8's own chunked losses.

Each case builds Liger's module (``compiled=False``: its loss math runs eagerly on the CPU) and
fastalign's with the same constructor arguments, calls both on the same random hidden states,
lm_head weight (and bias) and labels, and compares the loss, every returned metric and the
gradients with respect to the hidden states, the weight and the bias. fp32 on both sides; a few
bf16 cases. The C++ backend (the default on CPU tensors) runs fastalign.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_close

from fastalign.integrations import liger as fl

chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger_kernel is not installed: "
                              "`pip install liger-kernel==0.8.*` (the test extra)")

V, H = 37, 16


def _tensors(g, shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _compare(out_fa, out_lg, leaves_fa, leaves_lg, *, rtol, atol, what, grad_atol_scale=0.0):
    """Loss, metrics and input gradients; a gradient also passes within ``grad_atol_scale`` times its
    largest entry (sums with cancellation)."""
    loss_fa, met_fa = out_fa
    loss_lg, met_lg = out_lg
    assert_close(loss_fa, loss_lg, rtol=rtol, atol=atol, what=f"{what} loss")
    assert isinstance(met_fa, tuple) and len(met_fa) == len(met_lg), f"{what}: metrics {len(met_fa)} != {len(met_lg)}"
    for i, (a, b) in enumerate(zip(met_fa, met_lg)):
        b = torch.as_tensor(b)
        assert_close(torch.as_tensor(a).reshape(b.shape), b, rtol=rtol, atol=atol, what=f"{what} metric {i}")
    loss_fa.backward()
    loss_lg.backward()
    for name, a, b in zip(("hidden", "weight", "bias"), leaves_fa, leaves_lg):
        if a is None:
            continue
        assert a.grad is not None and b.grad is not None, f"{what}: no gradient for {name}"
        assert a.grad.dtype == b.grad.dtype, f"{what}: d{name} dtype {a.grad.dtype} != {b.grad.dtype}"
        tol = max(atol, grad_atol_scale * float(b.grad.abs().max()))
        assert_close(a.grad, b.grad, rtol=rtol, atol=tol, what=f"{what} d{name}")


# ------------------------------------------------------------------------------------------------------------ GRPO
def _grpo_batch(seed, B=4, T=7, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = _tensors(g, (B, T, H), dtype)
    weight = _tensors(g, (V, H), dtype, 0.3)
    b = _tensors(g, (V,), dtype, 0.1) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[0, :] = 1
    mask[-1, :] = 0  # an empty sequence
    ids = ids.masked_fill(mask == 0, -100)  # unscored positions carry ignore_index
    ids[1, 2] = 5  # ... or any token
    mask[1, 2] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp_guess = torch.log_softmax((hidden.float() @ weight.float().T), -1).gather(-1, ids.clamp(min=0)[..., None])[
            ..., 0]
    old = lp_guess + torch.randn(B, T, generator=g) * 0.3
    ref = lp_guess + torch.randn(B, T, generator=g) * 0.2
    ref_hidden = hidden + _tensors(g, (B, T, H), dtype, 0.1)
    ref_weight = weight + _tensors(g, (V, H), dtype, 0.02)
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref,
                ref_hidden=ref_hidden, ref_weight=ref_weight)


GRPO_CASES = {
    "dapo_default": dict(),
    "dapo_no_kl": dict(beta=0.0, use_ref_model=False),
    "grpo": dict(loss_type="grpo", beta=0.1),
    "grpo_sequence": dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence", epsilon_low=0.05,
                          epsilon_high=0.08),
    "bnpo_asymmetric": dict(loss_type="bnpo", epsilon_low=0.1, epsilon_high=0.28),
    "bnpo_sequence_bias_kl": dict(loss_type="bnpo", importance_sampling_level="sequence", use_bias_correction_kl=True,
                                  epsilon_low=0.1, epsilon_high=0.1),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9, beta=0.2),
    "dapo_delta": dict(loss_type="dapo", delta=1.3, epsilon_low=0.1),
    "dapo_bias_correction_kl": dict(use_bias_correction_kl=True, beta=0.3),
    "dapo_temperature": dict(temperature=0.7, beta=0.1),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2, beta=0.0, use_ref_model=False),
    "cispo_kl": dict(loss_type="cispo", epsilon_high=0.9, beta=0.05),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    "vespo": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5, beta=0.0, use_ref_model=False),
    "luspo_sequence": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0, use_ref_model=False,
                           epsilon_low=0.05, epsilon_high=0.05),
    "ref_model_off_beta": dict(beta=0.1, use_ref_model=False),
    "grpo_chunked": dict(loss_type="grpo", beta=0.1, chunk_size=2),  # Liger's chunking does not change the result
}


def _run_grpo(module, d, leaves, *, ref_mode, on_policy=False, **extra):
    hidden, weight, bias = leaves
    kw = dict(bias=bias, old_per_token_logps=None if on_policy else d["old"])
    if module.use_ref_model:
        if ref_mode == "logps":
            kw["ref_per_token_logps"] = d["ref"]
        else:
            kw.update(ref_input=d["ref_hidden"], ref_weight=d["ref_weight"], ref_bias=bias.detach() if bias is not None
                      else None)
    return module(hidden, weight, d["ids"], d["mask"], d["adv"], **kw, **extra)


def _grpo_pair(opts):
    lg = chunked.LigerFusedLinearGRPOLoss(compiled=False, **opts)
    fa = fl.LigerFusedLinearGRPOLoss(compiled=False, **opts)
    return fa, lg


def _liger_ids(d):
    # Liger scores every position; the unscored ones are masked: give them a real token
    return d["ids"].clamp(min=0)


@pytest.mark.parametrize("name", list(GRPO_CASES))
def test_grpo_matches_liger(name):
    opts = GRPO_CASES[name]
    fa, lg = _grpo_pair(opts)
    for ref_mode in (("logps", "hidden") if opts.get("use_ref_model", True) else ("none",)):
        d = _grpo_batch(sum(map(ord, name)))
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        out_fa = _run_grpo(fa, d, leaves_fa, ref_mode=ref_mode)
        out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode=ref_mode)
        _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{name}/{ref_mode}")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "vespo"])
def test_grpo_vllm_is_ratio_and_num_items(loss_type):
    opts = dict(loss_type=loss_type, beta=0.05, epsilon_high=1.5 if loss_type == "cispo" else 0.2)
    fa, lg = _grpo_pair(opts)
    d = _grpo_batch(7)
    g = torch.Generator().manual_seed(3)
    for ratio in (torch.rand(4, 7, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5):
        extra = dict(vllm_is_ratio=ratio)
        if loss_type in ("dapo", "cispo", "vespo"):
            extra["num_items_in_batch"] = 41
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps", **extra)
        out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="logps", **extra)
        _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{loss_type}/{ratio.dim()}D")


_PPO_ROWS = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo")


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(loss_type=st.sampled_from(list(_PPO_ROWS) + ["cispo", "sapo", "vespo"]), beta=st.sampled_from([0.0, 0.04]),
       no_ref=st.booleans(), eps=st.sampled_from([(0.2, 0.2), (0.1, 0.28), (0.2, 1.2)]),
       sequence=st.booleans(), temperature=st.sampled_from([1.0, 0.7]), bias_kl=st.booleans(),
       delta=st.sampled_from([None, 1.3]), chunk_size=st.sampled_from([1, 2]), ref_hidden=st.booleans(),
       ratio=st.sampled_from([None, "token", "sequence"]), num_items=st.booleans(), on_policy=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_grpo_option_combinations_match_liger(loss_type, beta, no_ref, eps, sequence, temperature, bias_kl, delta,
                                              chunk_size, ref_hidden, ratio, num_items, on_policy, bias, seed):
    """Random combinations of the options that apply to each loss type, against Liger's module."""
    opts = dict(loss_type=loss_type, beta=beta, temperature=temperature, use_bias_correction_kl=bias_kl,
                chunk_size=chunk_size)
    if loss_type in _PPO_ROWS:
        opts.update(epsilon_low=eps[0], epsilon_high=eps[1], delta=delta)
    if loss_type == "cispo":
        opts["epsilon_high"] = eps[1]
    if loss_type == "dr_grpo":
        opts["max_completion_length"] = 9
    if loss_type == "luspo":  # what the adapter supports (module doc)
        opts.update(beta=0.0, importance_sampling_level="sequence")
    elif sequence and loss_type in _PPO_ROWS:
        opts["importance_sampling_level"] = "sequence"
    if opts["beta"] == 0.0 and no_ref:
        opts["use_ref_model"] = False
    fa, lg = _grpo_pair(opts)
    d = _grpo_batch(seed, bias=bias)
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if ratio == "token" and loss_type == "luspo":  # refused (module doc): Liger sums it over padding too
        ratio = "sequence"
    if ratio is not None:
        extra["vllm_is_ratio"] = torch.rand(*((4, 7) if ratio == "token" else (4,)), generator=g) + 0.5
    if num_items and loss_type in ("dapo", "cispo", "vespo"):
        extra["num_items_in_batch"] = 41
    ref_mode = ("hidden" if ref_hidden else "logps") if opts.get("use_ref_model", True) else "none"
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode=ref_mode, on_policy=on_policy, **extra)
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode=ref_mode, on_policy=on_policy, **extra)
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=str(opts))


def test_grpo_on_policy_and_no_bias():
    fa, lg = _grpo_pair(dict(loss_type="grpo", beta=0.1))
    d = _grpo_batch(11, bias=False)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], None), _leaves(d["hidden"], d["weight"], None)
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps", on_policy=True)
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="logps", on_policy=True)
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what="on-policy")


def test_grpo_reference_log_probs_win_over_a_reference_head_as_liger():
    """Given both ``ref_per_token_logps`` and ``ref_input``, the log-probs are used and Liger's warning is given."""
    fa, lg = _grpo_pair(dict(loss_type="grpo", beta=0.1))
    d = _grpo_batch(12)
    both = dict(ref_per_token_logps=d["ref"], ref_input=d["ref_hidden"], ref_weight=d["ref_weight"])
    outs, leaves = [], []
    for module, ids in ((fa, d["ids"]), (lg, _liger_ids(d))):
        hidden, weight, bias = _leaves(d["hidden"], d["weight"], d["bias"])
        with pytest.warns(UserWarning, match="Using ref_per_token_logps"):
            outs.append(module(hidden, weight, ids, d["mask"], d["adv"], bias=bias, old_per_token_logps=d["old"],
                               **both))
        leaves.append((hidden, weight, bias))
    _compare(*outs, *leaves, rtol=1e-5, atol=2e-6, what="both references")
    ours = fa(*_leaves(d["hidden"], d["weight"], d["bias"])[:2], d["ids"], d["mask"], d["adv"], bias=d["bias"],
              old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    assert torch.equal(ours[0], outs[0][0])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_bf16(loss_type):
    fa, lg = _grpo_pair(dict(loss_type=loss_type, beta=0.1))
    d = _grpo_batch(5, dtype=torch.bfloat16)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="hidden")
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="hidden")
    # Liger rounds the logits to bf16 before its fp32 softmax; fastalign keeps them in fp32
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-2, atol=4e-3, what=f"bf16 {loss_type}")


@pytest.mark.parametrize("hidden_dtype, weight_dtype", [(torch.bfloat16, torch.float32),
                                                        (torch.float32, torch.bfloat16)])
def test_grpo_head_of_another_dtype_than_its_hidden_states_as_liger(hidden_dtype, weight_dtype):
    """A weight whose dtype differs from the hidden states' (an fp32 head under bf16 activations) is computed in the
    hidden states' dtype, as Liger casts each chunk of it; d(weight) in the weight's own dtype, as Liger's. It raised
    a TypeError before."""
    fa, lg = _grpo_pair(dict(loss_type="grpo", beta=0.1))
    d = _grpo_batch(6, dtype=hidden_dtype)
    d["weight"], d["ref_weight"] = d["weight"].to(weight_dtype), d["ref_weight"].to(weight_dtype)
    d["bias"] = d["bias"].float()  # Liger adds the bias in fp32
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="hidden")
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="hidden")
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-2, atol=4e-3, what="mixed dtypes")


def test_grpo_advantages_of_shape_b_1_as_liger():
    """``advantages [B, 1]``, one per sequence as a column, gives the loss of ``[B]``, as Liger's at one sequence a
    chunk (with more, Liger's column broadcasts to ``[c, c, T]``: docs/integrations.md)."""
    fa, lg = _grpo_pair(dict(loss_type="grpo", beta=0.1))
    d = _grpo_batch(7)
    column = {**d, "adv": d["adv"][:, None]}
    for what, module, batch in (("fastalign", fa, column), ("Liger", lg, {**column, "ids": _liger_ids(d)})):
        got = _run_grpo(module, batch, [d["hidden"], d["weight"], d["bias"]], ref_mode="logps")
        want = _run_grpo(fa, d, [d["hidden"], d["weight"], d["bias"]], ref_mode="logps")
        assert_close(got[0], want[0], rtol=1e-5, atol=2e-6, what=f"{what} [B, 1]")


def test_signatures_match_liger():
    import inspect

    for fa_cls, lg_cls in ((fl.LigerFusedLinearGRPOLoss, chunked.LigerFusedLinearGRPOLoss),
                           (fl.LigerFusedLinearDPOLoss, chunked.LigerFusedLinearDPOLoss),
                           (fl.LigerFusedLinearCPOLoss, chunked.LigerFusedLinearCPOLoss),
                           (fl.LigerFusedLinearORPOLoss, chunked.LigerFusedLinearORPOLoss),
                           (fl.LigerFusedLinearSimPOLoss, chunked.LigerFusedLinearSimPOLoss),
                           (fl.LigerFusedLinearKTOLoss, chunked.LigerFusedLinearKTOLoss)):
        for meth in ("__init__", "forward"):
            a = inspect.signature(getattr(fa_cls, meth)).parameters
            b = inspect.signature(getattr(lg_cls, meth)).parameters
            assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()], \
                f"{fa_cls.__name__}.{meth}"


@pytest.mark.parametrize("opts, word", [
    (dict(loss_type="nope"), "loss_type"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="luspo"), "luspo"),
    (dict(loss_type="dapo", sapo_temperature_pos=0.5), "sapo_temperature_pos"),
    (dict(loss_type="sapo", delta=2.0), "delta"),
    (dict(loss_type="grpo", vespo_k_pos=1.0), "vespo_k_pos"),
    (dict(loss_type="sapo", epsilon_low=0.1), "epsilon_low"),
    (dict(delta=-1.0), "delta"),
    (dict(sapo_temperature_neg=0.0, loss_type="sapo"), "sapo_temperature"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_grpo_options_that_do_not_apply_raise(opts, word):
    with pytest.raises(ValueError, match=word):
        fl.LigerFusedLinearGRPOLoss(**opts)


def test_grpo_call_errors():
    d = _grpo_batch(1)
    fa = fl.LigerFusedLinearGRPOLoss(beta=0.1)
    with pytest.raises(ValueError, match="use_ref_model"):
        fa(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"])
    off = fl.LigerFusedLinearGRPOLoss(beta=0.1, use_ref_model=False)
    with pytest.raises(ValueError, match="use_ref_model=False"):
        off(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"], ref_per_token_logps=d["ref"])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fl.LigerFusedLinearGRPOLoss(loss_type="grpo", use_ref_model=False)(d["hidden"], d["weight"], d["ids"], d["mask"],
                                                                 d["adv"], num_items_in_batch=10)
    for name in ("ref_weight", "ref_bias"):  # were ignored (ref_input in the same place raised)
        with pytest.raises(ValueError, match="use_ref_model=False"):
            off(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"], **{name: d["weight"][:, 0]
                                                                            if name == "ref_bias" else d["weight"]})


def test_preference_arguments_that_are_not_read_raise():
    """ref_weight / ref_bias with use_ref_model=False and ORPO's nll_target without compute_nll_loss were ignored."""
    d = _pref_batch(2)
    w, h, y = d["weight"], d["hidden"], d["target"]
    with pytest.raises(ValueError, match="use_ref_model=False"):
        fl.LigerFusedLinearDPOLoss(use_ref_model=False)(w, h, y, ref_weight=w)
    with pytest.raises(ValueError, match="use_ref_model=False"):
        fl.LigerFusedLinearDPOLoss(use_ref_model=False)(w, h, y, ref_bias=w[:, 0])
    with pytest.raises(ValueError, match="nll_target applies only with compute_nll_loss=True"):
        fl.LigerFusedLinearORPOLoss(compute_nll_loss=False)(w, h, y, nll_target=y)


@pytest.mark.parametrize("name", ["KTO", "DPO", "SimPO"])
def test_an_empty_averaged_response_gives_nan_gradients_as_liger(name):
    """With average_log_prob a response of no scored token averages 0 / 0: the loss was NaN (as Liger's) with
    finite gradients for KTO (the pass skips that response's tokens). Every gradient is NaN now, as Liger's."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 4, 8, 16
    hidden, weight = torch.randn(2 * B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[1] = -100
    opts = dict(KTO=dict(average_log_prob=True), DPO=dict(average_log_prob=True, use_ref_model=False), SimPO={})[name]
    module = getattr(fl, f"LigerFusedLinear{name}Loss")(**opts)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if name == "KTO":
        loss, _ = module(h, w, target, preference_labels=torch.tensor([True, True, False, False]))
    else:
        loss, _ = module(w, h, target)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad).all() and torch.isnan(w.grad).all()


def test_grpo_attention_mask_none_is_named():
    """attention_mask=None reached the 0/1 check of the mask (AttributeError): a TypeError naming it now."""
    d = _grpo_batch(1)
    with pytest.raises(TypeError, match="^attention_mask must be a torch.Tensor"):
        fl.LigerFusedLinearGRPOLoss(use_ref_model=False)(d["hidden"], d["weight"], d["ids"], None, d["adv"])


def test_grpo_errors_name_liger_arguments():
    """Bad shapes crashed inside torch (attention_mask, selected_token_ids), gave a NaN loss (a reference head of
    another vocabulary) or named fastalign's arguments (old_logprobs, kl_coef, max_len); they name Liger's now."""
    d = _grpo_batch(2)
    B, T = d["ids"].shape
    h, w, ids, mask, adv = d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"]
    loss = fl.LigerFusedLinearGRPOLoss(beta=0.1)
    for call, match in (
            (lambda: loss(h, w, ids, mask[:, :-1], adv, ref_per_token_logps=d["ref"]), r"^attention_mask must have"),
            (lambda: loss(h, w, ids[:, :-1], mask, adv, ref_per_token_logps=d["ref"]), r"^selected_token_ids must"),
            (lambda: loss(h, w, ids, mask, adv, old_per_token_logps=d["old"][:, :-1], ref_per_token_logps=d["ref"]),
             r"^old_per_token_logps must have shape"),
            (lambda: loss(h, w, ids, mask, adv, ref_per_token_logps=d["ref"][:, :-1]),
             r"^ref_per_token_logps must have shape"),
            (lambda: loss(h, w, ids, mask, adv[:-1], ref_per_token_logps=d["ref"]), r"^advantages must have shape"),
            (lambda: loss(h, w, ids, mask, adv, ref_per_token_logps=d["ref"], vllm_is_ratio=torch.ones(B, T - 1)),
             r"^vllm_is_ratio must have shape"),
            (lambda: loss(h, w, ids, mask, adv, ref_input=d["ref_hidden"], ref_weight=d["ref_weight"][:-3]),
             r"^ref_weight must have lin_weight's vocabulary")):
        with pytest.raises(ValueError, match=match):
            call()
    for opts, match in ((dict(epsilon_high=-0.1), "epsilon_high"), (dict(beta=float("nan")), "beta"),
                        (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length")):
        with pytest.raises(ValueError, match=match):
            fl.LigerFusedLinearGRPOLoss(**opts)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
@pytest.mark.parametrize("world, num_items", [(2, None), (4, None), (2, 1), (4, 3), (4, 0)])
def test_grpo_fewer_tokens_than_processes_match_liger(monkeypatch, loss_type, world, num_items):
    """One process of ``world`` in a step that scores fewer tokens than there are processes (one token here, none on
    the other processes: their all-reduce adds nothing; or ``num_items_in_batch`` below ``world``). Liger divides by
    ``clamp(tokens / world, min=1)``; fastalign divided by ``clamp(tokens, min=1) / world``: world / tokens times
    Liger's loss."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)  # the other processes score nothing
    opts = dict(loss_type=loss_type, beta=0.0, use_ref_model=False)
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.2
    fa, lg = _grpo_pair(opts)
    d = _grpo_batch(17)
    d["mask"] = torch.zeros_like(d["mask"])
    d["mask"][0, 3] = 1  # one scored token
    extra = {} if num_items is None else dict(num_items_in_batch=num_items)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="none", **extra)
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="none", **extra)
    assert float(out_lg[0].detach()) != 0.0
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{loss_type} world={world}")


def test_vespo_small_is_ratio_clamps_the_sequence_weight_as_liger():
    """Liger clamps the sum of the sequence's log-ratio and its IS log-weights; fastalign folded the IS part into one
    token's weight, which its own clamp cut at log 1e-8 first: 20x Liger's loss here (hidden by an absolute
    tolerance: both are ~1e-14). Compared relatively."""
    d = _grpo_batch(5, B=2, T=3)
    d["mask"] = torch.ones_like(d["mask"])
    d["ids"] = d["ids"].clamp(min=0)
    old = d["old"].clone()
    old[0] = d["ref"][0] - 0.5  # a positive sequence log-ratio beside a tiny IS weight
    fa, lg = _grpo_pair(dict(loss_type="vespo", beta=0.0, use_ref_model=False))
    ratio = torch.full(d["ids"].shape, 1e-4)
    outs = [m(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"].abs(), old_per_token_logps=old,
              vllm_is_ratio=ratio)[0] for m in (fa, lg)]
    assert_close(outs[0], outs[1], rtol=1e-4, atol=0.0, what="vespo loss")


@pytest.mark.parametrize("shift, ratio_value, beta", [(30.0, 1e-5, 0.0), (-40.0, math.exp(7.0), 0.0),
                                                       (30.0, 1e-4, 0.05), (-0.5, (math.exp(25.0), math.exp(-4.0)), 0.0)])
def test_vespo_is_log_sum_beyond_a_token_bound_is_clamped_once_as_liger(shift, ratio_value, beta):
    """A per-token ``vllm_is_ratio`` far from 1 at every position, padding included, beside a policy log-ratio of the
    other sign: Liger adds the IS log-sum to the sequence's log-ratio sum and clamps the total once, to [log 1e-8,
    20]. fastalign spread the log-sum over the scored tokens and clamped each share to that range first, so a share
    beyond it (|sum| / n > 18.4) gave another weight: phi ~1 against Liger's ~0 (a loss of 3.7 against 7e-15).
    ``(first, rest)``: the first position's ratio, past e^20, is clamped to 20 within the log-sum (0 here, not 5)."""
    d = _grpo_batch(9, B=2, T=6)
    d["mask"] = torch.zeros_like(d["mask"])
    d["mask"][:, :2] = 1  # 2 scored tokens, 4 padding positions
    d["ids"] = d["ids"].clamp(min=0)
    with torch.no_grad():
        lp = torch.log_softmax(d["hidden"] @ d["weight"].T + d["bias"], -1).gather(-1, d["ids"][..., None])[..., 0]
    d["old"] = lp - shift / 2  # the policy's log-ratio sum over the scored tokens: shift
    first, rest = ratio_value if isinstance(ratio_value, tuple) else (ratio_value, ratio_value)
    ratio = torch.full(d["ids"].shape, rest)
    ratio[:, 0] = first
    fa, lg = _grpo_pair(dict(loss_type="vespo", beta=beta, use_ref_model=beta != 0.0))
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps", vllm_is_ratio=ratio, num_items_in_batch=4)
    out_lg = _run_grpo(lg, d, leaves_lg, ref_mode="logps", vllm_is_ratio=ratio, num_items_in_batch=4)
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=1e-12, grad_atol_scale=1e-5,
             what=f"vespo shift={shift}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_vespo_is_log_sum_in_the_ratio_dtype_as_liger(dtype):
    """A bf16 / fp16 ``vllm_is_ratio`` with vespo: Liger takes its log and the sum over positions in the ratio's
    dtype before adding the fp32 log-ratio sum; fastalign took them in fp32 (losses 1.6% / 0.6% apart)."""
    d = _grpo_batch(4)
    B, T = d["mask"].shape
    ratio = (torch.rand(B, T, generator=torch.Generator().manual_seed(1)) * 3 + 0.05).to(dtype)
    fa, lg = _grpo_pair(dict(loss_type="vespo", beta=0.05))
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps", vllm_is_ratio=ratio)
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="logps", vllm_is_ratio=ratio)
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=1e-7, grad_atol_scale=1e-5, what=str(dtype))


def test_grpo_float64_per_token_inputs_as_liger():
    """Liger casts old / ref log-probs (and takes float64 advantages and IS ratios); they were refused."""
    d = _grpo_batch(3)
    fa, lg = _grpo_pair(dict(beta=0.1))
    kw = dict(old_per_token_logps=d["old"].double(), ref_per_token_logps=d["ref"].double(),
              vllm_is_ratio=torch.full((d["adv"].shape[0], 1), 0.9, dtype=torch.float64))
    out_fa = fa(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"].double(), bias=d["bias"], **kw)
    out_lg = lg(d["hidden"], d["weight"], _liger_ids(d), d["mask"], d["adv"].double(), bias=d["bias"], **kw)
    assert_close(out_fa[0], out_lg[0], rtol=1e-4, atol=1e-5, what="loss")


# ----------------------------------------------------------------------------------------------------- preference
def _pref_batch(seed, B=3, T=6, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = _tensors(g, (2 * B, T, H), dtype)
    weight = _tensors(g, (V, H), dtype, 0.3)
    b = _tensors(g, (V,), dtype, 0.1) if bias else None
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[:, :2] = -100  # the prompt
    target[0, -1] = -100  # padding
    target[B + 1, -2:] = -100
    ref_hidden = hidden + _tensors(g, (2 * B, T, H), dtype, 0.2)
    ref_weight = weight + _tensors(g, (V, H), dtype, 0.05)
    return dict(hidden=hidden, weight=weight, bias=b, target=target, ref_hidden=ref_hidden, ref_weight=ref_weight)


def _run_pref(module, d, leaves, **extra):
    hidden, weight, bias = leaves
    kw = dict(bias=bias, **extra)
    if getattr(module, "use_ref_model", False):
        kw.update(ref_input=d["ref_hidden"], ref_weight=d["ref_weight"], ref_bias=None if bias is None else
                  bias.detach())
    return module(weight, hidden, d["target"], **kw)


DPO_CASES = {
    "sigmoid": dict(),
    "sigmoid_average_nll": dict(average_log_prob=True, compute_nll_loss=True, alpha=0.5),
    "sigmoid_no_ref": dict(use_ref_model=False, beta=0.2),
    "hinge": dict(loss_type="hinge", beta=0.5),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "bco_pair": dict(loss_type="bco_pair", compute_nll_loss=True),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.5),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop", discopop_tau=0.1),
    "sigmoid_chunked": dict(chunk_size=2, compute_nll_loss=True),
}

PREF_CASES = (
    [("DPO", name, opts) for name, opts in DPO_CASES.items()]
    + [("CPO", "default", dict()), ("CPO", "smoothing_average", dict(label_smoothing=0.1, average_log_prob=True)),
       ("CPO", "no_nll", dict(compute_nll_loss=False, beta=0.3)), ("CPO", "alpha", dict(alpha=0.25))]
    + [("SimPO", "default", dict()), ("SimPO", "gamma_smoothing", dict(gamma=0.8, label_smoothing=0.1, beta=2.0)),
       ("SimPO", "no_nll", dict(compute_nll_loss=False))]
    + [("ORPO", "default", dict()), ("ORPO", "no_nll", dict(compute_nll_loss=False, beta=0.5))]
)


@pytest.fixture
def item_passes(monkeypatch):
    """The single passes of ``separable_step`` (blocks of whole pairs or responses) taken while a test runs."""
    import fastalign.linear_step as linear_step

    single, passes = linear_step._single_pass, []
    monkeypatch.setattr(linear_step, "_single_pass", lambda *a: passes.append(1) or single(*a))
    return passes


@pytest.mark.parametrize("kind, name, opts", PREF_CASES, ids=[f"{k}-{n}" for k, n, _ in PREF_CASES])
def test_preference_matches_liger(kind, name, opts, item_passes):
    """Loss, outputs and gradients equal Liger's; the loss goes through the head in one pass over whole pairs."""
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False, **opts)
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False, **opts)
    for bias in (True, False):
        d = _pref_batch(len(name) + len(kind), bias=bias)
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        _compare(_run_pref(fa, d, leaves_fa), _run_pref(lg, d, leaves_lg), leaves_fa, leaves_lg, rtol=1e-5,
                 atol=2e-6, what=f"{kind}/{name}/bias={bias}")
    assert len(item_passes) == 2


@pytest.mark.parametrize("kind, where", [("DPO", "target"), ("CPO", "target"), ("SimPO", "target"),
                                         ("ORPO", "target"), ("ORPO", "nll_target"), ("KTO", "target")])
def test_preference_target_past_the_vocabulary_raises_as_liger(kind, where):
    """A label past the vocabulary: Liger's losses fail (IndexError / RuntimeError); fastalign's raise a ValueError
    naming it on CPU tensors (they gave a NaN loss)."""
    d = _pref_batch(10)
    bad = d["target"].clone()
    bad[1, 3] = V + 3
    target, extra = (bad, {}) if where == "target" else (d["target"], dict(nll_target=bad))
    if where == "nll_target":  # Liger reads the chosen rows of nll_target alone: a bad rejected label is unread
        unread = d["target"].clone()
        unread[-1, 3] = V + 3
        for module in (fl.LigerFusedLinearORPOLoss(compiled=False), chunked.LigerFusedLinearORPOLoss(compiled=False)):
            assert torch.isfinite(module(d["weight"], d["hidden"], d["target"], nll_target=unread)[0])
    opts = dict(compiled=False, **(dict(use_ref_model=False) if kind in ("DPO", "KTO") else {}))
    for module in (getattr(fl, f"LigerFusedLinear{kind}Loss")(**opts),
                   getattr(chunked, f"LigerFusedLinear{kind}Loss")(**opts)):
        if kind == "KTO":
            call = lambda: module(d["hidden"], d["weight"], target, preference_labels=torch.tensor([True, False] * 3))
        else:
            call = lambda: module(d["weight"], d["hidden"], target, **extra)
        with pytest.raises((ValueError, IndexError, RuntimeError)) as info:
            call()
        if module.__module__.startswith("fastalign"):
            assert info.type is ValueError and f"{where} must lie in [0, {V})" in str(info.value), str(info.value)


def test_orpo_nll_target():
    fa, lg = fl.LigerFusedLinearORPOLoss(compiled=False), chunked.LigerFusedLinearORPOLoss(compiled=False)
    d = _pref_batch(21)
    nll_target = d["target"].clone()
    nll_target[:, 0] = 3  # the NLL also scores the first prompt token
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    _compare(_run_pref(fa, d, leaves_fa, nll_target=nll_target), _run_pref(lg, d, leaves_lg, nll_target=nll_target),
             leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what="orpo nll_target")


@pytest.mark.parametrize("kind", ["DPO", "SimPO"])
def test_preference_bf16(kind):
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False)
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False)
    d = _pref_batch(4, dtype=torch.bfloat16)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    _compare(_run_pref(fa, d, leaves_fa), _run_pref(lg, d, leaves_lg), leaves_fa, leaves_lg, rtol=1e-2, atol=4e-3,
             what=f"bf16 {kind}")


@pytest.mark.parametrize("kind", ["DPO", "CPO"])
def test_preference_ignore_index(kind):
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False, ignore_index=-1)
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False, ignore_index=-1)
    d = _pref_batch(12)
    d["target"] = d["target"].masked_fill(d["target"] == -100, -1)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    _compare(_run_pref(fa, d, leaves_fa), _run_pref(lg, d, leaves_lg), leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6,
             what=f"ignore_index {kind}")


@pytest.mark.parametrize("opts, word", [
    (dict(loss_type="ipo"), "loss_type"),
    (dict(loss_type="sigmoid", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="hinge", discopop_tau=0.2), "discopop_tau"),
    (dict(alpha=0.5), "alpha"),
])
def test_dpo_options_that_do_not_apply_raise(opts, word):
    with pytest.raises(ValueError, match=word):
        fl.LigerFusedLinearDPOLoss(**opts)


# ------------------------------------------------------------------------------------------------------------ KTO
def test_preference_errors_name_liger_arguments():
    """A reference head of another vocabulary gave a NaN loss, a KTO kl of the wrong length crashed in torch, and
    label_smoothing="a" raised a comparison error naming nothing."""
    d = _pref_batch(4)
    h, w, y = d["hidden"], d["weight"], d["target"]
    N = y.shape[0]
    dpo, kto = fl.LigerFusedLinearDPOLoss(), fl.LigerFusedLinearKTOLoss()
    good = torch.arange(N) % 2 == 0
    for call, match in (
            (lambda: dpo(w, h, y, ref_input=d["ref_hidden"], ref_weight=d["ref_weight"][:-3]),
             r"^ref_weight must have lin_weight's vocabulary"),
            (lambda: dpo(w, h, y[:, :-1], ref_input=d["ref_hidden"], ref_weight=d["ref_weight"]),
             r"^target must have shape"),
            (lambda: kto(h, w, y, preference_labels=good, kl=torch.zeros(N - 1)), r"^kl must have shape"),
            (lambda: kto(h, w, y, preference_labels=good[:-1]), r"^preference_labels must have shape")):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="label_smoothing"):
        fl.LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing="a")


KTO_CASES = {
    "default": dict(),
    "ref_model": dict(use_ref_model=True, beta=0.3),
    "ref_model_average": dict(use_ref_model=True, average_log_prob=True),
}


@pytest.mark.parametrize("name", list(KTO_CASES))
@pytest.mark.parametrize("kl", [None, 0.3, -0.2])
def test_kto_matches_liger(name, kl, item_passes):
    """Loss, outputs and gradients equal Liger's; the loss goes through the head in one pass over responses."""
    opts = KTO_CASES[name]
    fa = fl.LigerFusedLinearKTOLoss(compiled=False, **opts)
    lg = chunked.LigerFusedLinearKTOLoss(compiled=False, **opts)
    d = _pref_batch(9, B=3)
    labels = torch.tensor([True, False, True, True, False, False])
    for bias in (True, False):
        b = d["bias"] if bias else None
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], b), _leaves(d["hidden"], d["weight"], b)
        kw = dict(preference_labels=labels, kl=None if kl is None else torch.tensor(kl))
        if opts.get("use_ref_model"):
            kw.update(ref_input=d["ref_hidden"], ref_weight=d["ref_weight"], ref_bias=None if b is None else b.detach())
        outs = [m(lv[0], lv[1], d["target"], lv[2], **kw) for m, lv in ((fa, leaves_fa), (lg, leaves_lg))]
        _compare(*outs, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"kto/{name}/kl={kl}/bias={bias}")
    assert len(item_passes) == 2


def test_kto_kl_per_response_is_read_row_by_row():
    """A ``kl`` of one value per response: row i takes ``kl[i]``. Liger hands the whole ``kl`` to every chunk, where
    it broadcasts against the chunk's rows: the same only with every response in one chunk (``chunk_size=N``)."""
    d = _pref_batch(10, B=3)
    labels = torch.tensor([True, False, True, True, False, False])
    kl = torch.tensor([0.3, -0.1, 0.0, 0.7, 0.2, -0.4])
    fa = fl.LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True, beta=0.3)
    lg = chunked.LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True, beta=0.3, chunk_size=6)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    kw = dict(preference_labels=labels, kl=kl, ref_input=d["ref_hidden"], ref_weight=d["ref_weight"],
              ref_bias=d["bias"].detach())
    outs = [m(lv[0], lv[1], d["target"], lv[2], **kw) for m, lv in ((fa, leaves_fa), (lg, leaves_lg))]
    _compare(*outs, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what="kto per-response kl")
    one = fa(*_leaves(d["hidden"], d["weight"], d["bias"])[:2], d["target"], d["bias"], **{**kw, "kl": kl[:1]})[0]
    assert not torch.allclose(outs[0][0], one), "the per-response values are read, not the first alone"


@pytest.mark.parametrize("case", ["grpo", "dpo", "kto"])
def test_every_cpu_backend(cpu_backend, case):
    """The same numbers from the C++ kernels and the Triton kernels (interpreter)."""
    import fastalign

    if case == "grpo":
        opts = dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True)
        fa, lg = _grpo_pair(opts)
        d = _grpo_batch(17, B=2, T=5)
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        with fastalign.use_backend(cpu_backend):
            out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="hidden")
        out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="hidden")
    elif case == "dpo":
        fa = fl.LigerFusedLinearDPOLoss(compiled=False, compute_nll_loss=True)
        lg = chunked.LigerFusedLinearDPOLoss(compiled=False, compute_nll_loss=True)
        d = _pref_batch(18, B=2, T=5)
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        with fastalign.use_backend(cpu_backend):
            out_fa = _run_pref(fa, d, leaves_fa)
        out_lg = _run_pref(lg, d, leaves_lg)
    else:
        fa = fl.LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True)
        lg = chunked.LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True)
        d = _pref_batch(19, B=2, T=5)
        leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"],
                                                                                     d["bias"])
        kw = dict(preference_labels=torch.tensor([True, False, False, True]), ref_input=d["ref_hidden"],
                  ref_weight=d["ref_weight"], kl=torch.tensor(0.1))
        with fastalign.use_backend(cpu_backend):
            out_fa = fa(leaves_fa[0], leaves_fa[1], d["target"], leaves_fa[2], **kw)
        out_lg = lg(leaves_lg[0], leaves_lg[1], d["target"], leaves_lg[2], **kw)
    with fastalign.use_backend(cpu_backend):
        _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{case}/{cpu_backend}")


@pytest.mark.parametrize("name", ["dapo_default", "grpo_sequence", "bnpo_sequence_bias_kl", "cispo_kl",
                                  "dapo_bias_correction_kl"])
def test_diverged_policy_matches_liger(name):
    """Log-ratios of +-25 (a ratio beyond e^20): Liger's ratio has no clamp, nor has the adapter's
    (``log_ratio_cap=inf``); loss and gradients stay Liger's."""
    opts = GRPO_CASES[name]
    fa, lg = _grpo_pair(opts)
    d = _grpo_batch(31)
    d["old"] = d["old"].clone()
    d["old"][0] -= 25.0
    d["old"][1, :3] += 25.0
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps")
    out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="logps")
    # both fp32: the weight gradient sums terms of order e^25 of both signs, in different orders
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{name} diverged",
             grad_atol_scale=1e-5)


ASSIGNMENTS = [("GRPO", dict(beta=0.5, epsilon_high=0.0)), ("GRPO", dict(loss_type="grpo", temperature=0.7)),
               ("GRPO", dict(use_bias_correction_kl=True)), ("DPO", dict(beta=1.0)),
               ("DPO", dict(loss_type="robust", label_smoothing=0.2)),
               ("DPO", dict(compute_nll_loss=True, alpha=0.5, average_log_prob=True)),
               ("DPO", dict(use_ref_model=False)),
               ("CPO", dict(beta=0.5, alpha=0.3)), ("CPO", dict(compute_nll_loss=False, label_smoothing=0.1)),
               ("CPO", dict(average_log_prob=True)), ("SimPO", dict(gamma=0.9, alpha=0.3, label_smoothing=0.1)),
               ("SimPO", dict(compute_nll_loss=False, beta=2.0)), ("ORPO", dict(beta=0.5, compute_nll_loss=False)),
               ("KTO", dict(beta=0.4, average_log_prob=True)), ("KTO", dict(use_ref_model=True))]
KTO_LABELS = torch.tensor([True, False, True, True, False, False])


def _run_kto(module, d, leaves):
    kw = dict(preference_labels=KTO_LABELS, kl=torch.tensor(0.2))
    if module.use_ref_model:
        kw.update(ref_input=d["ref_hidden"], ref_weight=d["ref_weight"])
    return module(leaves[0], leaves[1], d["target"], leaves[2], **kw)


@pytest.mark.parametrize("kind, assigned", ASSIGNMENTS, ids=[f"{k}-{'-'.join(a)}" for k, a in ASSIGNMENTS])
def test_option_assignment_takes_effect_as_liger(kind, assigned):
    """Liger reads its options at each call, so a schedule that assigns ``loss_fn.beta`` changes the loss; the
    adapters built their configuration once, so the loss kept the old value while the metrics or rewards took
    the new one."""
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False)
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False)
    for module in (fa, lg):
        for name, value in assigned.items():
            setattr(module, name, value)
    d = _grpo_batch(31) if kind == "GRPO" else _pref_batch(31)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    if kind == "GRPO":
        out_fa = _run_grpo(fa, d, leaves_fa, ref_mode="logps")
        out_lg = _run_grpo(lg, {**d, "ids": _liger_ids(d)}, leaves_lg, ref_mode="logps")
    elif kind == "KTO":
        out_fa, out_lg = _run_kto(fa, d, leaves_fa), _run_kto(lg, d, leaves_lg)
    else:
        out_fa, out_lg = _run_pref(fa, d, leaves_fa), _run_pref(lg, d, leaves_lg)
    _compare(out_fa, out_lg, leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6, what=f"{kind} {assigned}")


def test_invalid_option_assignment_raises_and_keeps_the_module():
    grpo, dpo = fl.LigerFusedLinearGRPOLoss(compiled=False), fl.LigerFusedLinearDPOLoss(compiled=False)
    for module, name, value in ((grpo, "epsilon_low", -1.0), (grpo, "loss_type", "ppo"), (grpo, "delta", 0.0),
                                (grpo, "sapo_temperature_pos", 2.0), (dpo, "loss_type", "ipo"),
                                (dpo, "label_smoothing", 0.1)):
        before = getattr(module, name)
        with pytest.raises(ValueError, match=name):
            setattr(module, name, value)
        assert getattr(module, name) == before
    assert grpo.config == fl.LigerFusedLinearGRPOLoss(compiled=False).config
    assert dpo._options == fl.LigerFusedLinearDPOLoss(compiled=False)._options


INVALID_ASSIGNMENTS = [
    ("GRPO", {}, "use_ref_model", "yes", TypeError),
    ("DPO", {}, "alpha", 0.5, ValueError), ("DPO", {}, "compute_nll_loss", "no", TypeError),
    ("DPO", {}, "average_log_prob", 1, TypeError), ("DPO", {}, "use_ref_model", None, TypeError),
    ("DPO", {}, "chunk_size", 0, ValueError), ("DPO", {}, "ignore_index", 1.5, TypeError),
    ("CPO", dict(alpha=0.5), "compute_nll_loss", False, ValueError), ("CPO", {}, "compute_nll_loss", "no", TypeError),
    ("CPO", {}, "label_smoothing", float("nan"), ValueError), ("CPO", {}, "beta", float("inf"), ValueError),
    ("SimPO", {}, "alpha", float("nan"), ValueError), ("SimPO", {}, "gamma", "a", TypeError),
    ("SimPO", dict(alpha=0.5), "compute_nll_loss", False, ValueError),
    ("ORPO", {}, "beta", float("nan"), ValueError), ("ORPO", {}, "compute_nll_loss", "no", TypeError),
    ("KTO", {}, "ignore_index", "a", TypeError), ("KTO", {}, "use_ref_model", "yes", TypeError),
    ("KTO", {}, "average_log_prob", None, TypeError), ("KTO", {}, "compiled", 1, TypeError),
]


@pytest.mark.parametrize("kind, opts, name, value, err", INVALID_ASSIGNMENTS,
                         ids=[f"{k}-{n}={v!r}" for k, _, n, v, _ in INVALID_ASSIGNMENTS])
def test_invalid_shared_option_assignment_raises_and_keeps_the_loss(kind, opts, name, value, err):
    """Each module runs its constructor's checks at each assignment: CPO's compute_nll_loss=False set after alpha=0.5
    left alpha silently unused, SimPO's alpha=nan gave a NaN loss, a non-bool switch was read as truthy and KTO's
    ignore_index="a" failed at the next call with a message naming nothing."""
    module = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False, **opts)
    d = _grpo_batch(32) if kind == "GRPO" else _pref_batch(32)
    run = {"GRPO": lambda: _run_grpo(module, d, (d["hidden"], d["weight"], d["bias"]), ref_mode="logps"),
           "KTO": lambda: _run_kto(module, d, (d["hidden"], d["weight"], d["bias"]))}.get(
        kind, lambda: _run_pref(module, d, (d["hidden"], d["weight"], d["bias"])))
    before, kept = run()[0], getattr(module, name)
    with pytest.raises(err, match=name):
        setattr(module, name, value)
    assert getattr(module, name) == kept
    assert torch.equal(run()[0], before)


# ------------------------------------------------------------------------------------- option values, forward types
BAD_OPTION_VALUES = [
    ("CPO", "alpha", None, TypeError), ("SimPO", "alpha", None, TypeError), ("SimPO", "gamma", None, TypeError),
    ("CPO", "beta", None, TypeError), ("KTO", "beta", None, TypeError), ("DPO", "beta", None, TypeError),
    ("ORPO", "beta", "a", TypeError), ("DPO", "label_smoothing", None, TypeError),
    ("DPO", "discopop_tau", None, TypeError), ("CPO", "label_smoothing", None, TypeError),
    ("GRPO", "vespo_k_pos", "a", TypeError), ("GRPO", "vespo_lambda_neg", None, TypeError),
    ("GRPO", "vespo_k_neg", float("nan"), ValueError), ("GRPO", "vespo_lambda_pos", float("inf"), ValueError),
]


@pytest.mark.parametrize("kind, name, value, err", BAD_OPTION_VALUES,
                         ids=[f"{k}-{n}={v!r}" for k, n, v, _ in BAD_OPTION_VALUES])
def test_bad_option_values_raise_naming_the_option(kind, name, value, err):
    """None where a number is needed, a string or NaN raises at construction and at assignment, naming the option
    as Liger names it: a None passed both (the forward then failed naming nothing), DPO's label_smoothing=None
    raised that it "does not apply", and the vespo options were named vespo_k[1] or not at all."""
    opts = dict(loss_type="vespo") if kind == "GRPO" else dict(loss_type="discopop") if name == "discopop_tau" else {}
    cls = getattr(fl, f"LigerFusedLinear{kind}Loss")
    with pytest.raises(err, match=f"^{name} "):
        cls(compiled=False, **opts, **{name: value})
    module = cls(compiled=False, **opts)
    kept = getattr(module, name)
    with pytest.raises(err, match=f"^{name} "):
        setattr(module, name, value)
    assert getattr(module, name) == kept


BETA_ZERO = [("DPO", dict()), ("DPO", dict(loss_type="robust", label_smoothing=0.1)),
             ("DPO", dict(loss_type="discopop", use_ref_model=False, compute_nll_loss=True)),
             ("DPO", dict(loss_type="nca_pair")), ("DPO", dict(loss_type="apo_down")),
             ("CPO", dict()), ("CPO", dict(label_smoothing=0.3, compute_nll_loss=False)),
             ("SimPO", dict(gamma=0.8)), ("ORPO", dict()), ("ORPO", dict(compute_nll_loss=False)),
             ("KTO", dict()), ("KTO", dict(use_ref_model=True))]


@pytest.mark.parametrize("kind, opts", BETA_ZERO, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in BETA_ZERO])
@pytest.mark.parametrize("assigned", [False, True])
def test_beta_zero_matches_liger(kind, opts, assigned):
    """beta=0 passed the constructor, then every forward raised; Liger computes it (ORPO: the NLL alone; the
    others: the pair term at a zero margin, with no gradient, plus the NLL)."""
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False, **opts, **({} if assigned else dict(beta=0.0)))
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False, **opts, beta=0.0)
    if assigned:
        fa.beta = 0.0
    d = _pref_batch(41)
    leaves_fa, leaves_lg = _leaves(d["hidden"], d["weight"], d["bias"]), _leaves(d["hidden"], d["weight"], d["bias"])
    run = _run_kto if kind == "KTO" else _run_pref
    _compare(run(fa, d, leaves_fa), run(lg, d, leaves_lg), leaves_fa, leaves_lg, rtol=1e-5, atol=2e-6,
             what=f"{kind} beta=0 {opts}")


REFUSED = [("DPO", {}, "beta", -0.1), ("CPO", {}, "beta", -1.0), ("KTO", {}, "beta", -0.5),
           ("ORPO", {}, "beta", -0.1), ("DPO", dict(loss_type="sppo_hard"), "beta", 0.0),
           ("CPO", {}, "label_smoothing", 1.5), ("CPO", {}, "label_smoothing", -0.1),
           ("SimPO", {}, "label_smoothing", 2.0), ("DPO", dict(loss_type="discopop"), "discopop_tau", 0.0),
           ("DPO", dict(loss_type="discopop"), "discopop_tau", -0.05),
           ("DPO", dict(loss_type="exo_pair", label_smoothing=0.1), "label_smoothing", 1.0)]


@pytest.mark.parametrize("kind, opts, name, value", REFUSED, ids=[f"{k}-{n}={v}" for k, _, n, v in REFUSED])
def test_values_fastalign_refuses_raise_at_construction_and_assignment(kind, opts, name, value):
    """A value that fastalign's loss refuses (docs/parity-preference.md) raises where it is set, naming it: it
    passed the constructor and the assignment, then every forward raised."""
    cls = getattr(fl, f"LigerFusedLinear{kind}Loss")
    with pytest.raises(ValueError, match=f"^{name} "):
        cls(compiled=False, **{**opts, name: value})
    module = cls(compiled=False, **opts)
    with pytest.raises(ValueError, match=f"^{name} "):
        setattr(module, name, value)


def test_forward_arguments_of_a_wrong_type_raise_naming_them():
    """GRPO's num_items_in_batch and KTO's kl: a string or a list failed inside torch, naming nothing."""
    d = _grpo_batch(43)
    grpo = fl.LigerFusedLinearGRPOLoss(compiled=False)
    for value in ("10", [10], True):
        with pytest.raises(TypeError, match="^num_items_in_batch must be a real number or a tensor"):
            _run_grpo(grpo, d, (d["hidden"], d["weight"], d["bias"]), ref_mode="logps", num_items_in_batch=value)
    for value in (float("nan"), torch.tensor(float("inf"))):  # named as num_items_in_batch (it was global_tokens)
        with pytest.raises(ValueError, match="^num_items_in_batch must be finite"):
            _run_grpo(grpo, d, (d["hidden"], d["weight"], d["bias"]), ref_mode="logps", num_items_in_batch=value)
    p = _pref_batch(43)
    kto = fl.LigerFusedLinearKTOLoss(compiled=False)
    for value in ("0.1", [0.1], True):
        with pytest.raises(TypeError, match="^kl must be a real number or a tensor"):
            kto(p["hidden"], p["weight"], p["target"], preference_labels=KTO_LABELS, kl=value)


@pytest.mark.parametrize("num_items", [9, 9.0, torch.tensor(9), torch.tensor(9.0)])
def test_num_items_in_batch_number_or_tensor_matches_liger(num_items):
    fa, lg = _grpo_pair(dict(loss_type="dapo"))
    d = _grpo_batch(44)
    kw = dict(bias=d["bias"], old_per_token_logps=d["old"], ref_per_token_logps=d["ref"], num_items_in_batch=num_items)
    out_fa = fa(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"], **kw)
    out_lg = lg(d["hidden"], d["weight"], _liger_ids(d), d["mask"], d["adv"], **kw)
    assert_close(out_fa[0], out_lg[0].reshape(()), rtol=1e-5, atol=2e-6, what=f"num_items_in_batch={num_items!r}")


def test_kto_kl_as_a_number_matches_liger():
    fa, lg = fl.LigerFusedLinearKTOLoss(compiled=False), chunked.LigerFusedLinearKTOLoss(compiled=False)
    d = _pref_batch(45)
    outs = [m(d["hidden"], d["weight"], d["target"], d["bias"], preference_labels=KTO_LABELS, kl=0.25)
            for m in (fa, lg)]
    assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=2e-6, what="kto kl=0.25")


# ----------------------------------------------------------------------------------------- GRPO attention_mask
@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dapo"])
def test_grpo_fractional_attention_mask_raises(loss_type):
    """Liger weighs each token by a fractional attention_mask (its loss is not the binarised mask's); fastalign's
    policy loss counts a token or not, so the drop-in refuses such a mask, naming it (it binarised it silently).
    A 0/1 mask of any dtype still matches Liger."""
    d = _grpo_batch(46)
    opts = dict(loss_type=loss_type, beta=0.1)
    fa, lg = _grpo_pair(opts)
    frac = d["mask"].float()
    frac[0, :3] = torch.tensor([0.5, 0.25, 0.75])
    kw = dict(bias=d["bias"], old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    liger = lambda mask: lg(d["hidden"], d["weight"], _liger_ids(d), mask, d["adv"], **kw)[0]  # noqa: E731
    assert not torch.allclose(liger(frac), liger(d["mask"].float()))  # Liger's number is a weighted one
    for mask in (frac, d["mask"] * 2):
        with pytest.raises(ValueError, match="^attention_mask must hold 0 and 1 only"):
            fa(d["hidden"], d["weight"], d["ids"], mask, d["adv"], **kw)
    for mask in (d["mask"].float(), d["mask"].bool(), d["mask"].int()):
        assert_close(fa(d["hidden"], d["weight"], d["ids"], mask, d["adv"], **kw)[0], liger(mask.float()), rtol=1e-5,
                     atol=2e-6, what=f"{mask.dtype} mask")


def test_grpo_fractional_attention_mask_unread_gives_nan(monkeypatch):
    """Where the mask's values are not read on the host (a GPU tensor), a fractional mask makes the loss NaN."""
    from fastalign import _validate

    monkeypatch.setattr(_validate, "flag_or_raise", lambda bad, x, message: bad)
    d = _grpo_batch(47)
    fa = fl.LigerFusedLinearGRPOLoss(compiled=False, loss_type="bnpo")
    kw = dict(bias=d["bias"], old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    frac = d["mask"].float()
    frac[0, 0] = 0.5
    assert torch.isnan(fa(d["hidden"], d["weight"], d["ids"], frac, d["adv"], **kw)[0])
    assert torch.isfinite(fa(d["hidden"], d["weight"], d["ids"], d["mask"].float(), d["adv"], **kw)[0])


# ------------------------------------------------------------------------------------- a second backward
@pytest.mark.parametrize("kind", ["GRPO", "DPO", "ORPO", "KTO"])
def test_second_backward_with_single_pass_false_matches_liger(kind):
    """Liger allows a second backward through a retained graph; the drop-in's single pass computes its gradients
    in the forward, so it raises, advising single_pass=False, which the drop-in did not take. Its single_pass
    attribute (not one of Liger's options) takes the two passes, whose gradients then match Liger's."""
    fa = getattr(fl, f"LigerFusedLinear{kind}Loss")(compiled=False)
    lg = getattr(chunked, f"LigerFusedLinear{kind}Loss")(compiled=False)
    d = _grpo_batch(48) if kind == "GRPO" else _pref_batch(48)

    def loss_of(module, leaves):
        if kind == "GRPO":
            dd = d if module is fa else {**d, "ids": _liger_ids(d)}
            return _run_grpo(module, dd, leaves, ref_mode="logps")[0]
        return (_run_kto if kind == "KTO" else _run_pref)(module, d, leaves)[0]

    leaves = _leaves(d["hidden"], d["weight"], d["bias"])
    loss = loss_of(fa, leaves)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single_pass=False"):
        loss.backward()
    fa.single_pass = False
    grads = []
    for module in (fa, lg):
        leaves = _leaves(d["hidden"], d["weight"], d["bias"])
        loss = loss_of(module, leaves)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("hidden", "weight", "bias"), *grads):
        assert_close(a, b, rtol=1e-5, atol=4e-6, what=f"{kind} d{name} after two backwards")


def test_single_pass_attribute_is_checked():
    module = fl.LigerFusedLinearDPOLoss(compiled=False)
    for value in ("no", 0, None):
        with pytest.raises(ValueError, match=r"^single_pass must be one of \('auto', True, False\)"):
            module.single_pass = value
    assert module.single_pass == "auto"
    module.single_pass = False
    assert module.single_pass is False and fl.LigerFusedLinearDPOLoss().single_pass == "auto"
