"""``torch.compile(fullgraph=True)`` of a whole training step equals the eager step.

The step runs a tiny Qwen2 (built from its config): reference log-probs by
``causal_lm_logprobs`` of a frozen copy, the policy's hidden states, and the GRPO loss
with a KL term and an entropy bonus by ``LinearPolicyLoss``; a second step differentiates
through ``causal_lm_logprobs`` itself into ``policy_loss``. ``fullgraph=True`` makes any
graph break an error; the loss and every parameter gradient must match eager mode.
``aot_eager`` traces forward and backward (the custom ops as single nodes) without code
generation; ``inductor`` (the default compiler) also generates the code around them.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the compiled step runs a transformers model")

import fastalign  # noqa: E402
from fastalign.integrations.hf import causal_lm_logprobs  # noqa: E402

V, P, T = 48, 3, 10  # vocabulary, prompt length, tokens per row


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    return transformers.Qwen2ForCausalLM(config).float().train()


def rollout_batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    response_mask = attention_mask.clone()
    response_mask[:, :P] = 0
    old = -3.0 - torch.rand(B, T - 1, generator=g)
    adv = torch.randn(B, generator=g)
    return input_ids, attention_mask, response_mask, old, adv


def fused_step(model, ref_model, loss_fn, input_ids, attention_mask, response_mask, old, adv):
    """Reference log-probs (no gradient), hidden states, then LinearPolicyLoss from them."""
    with torch.no_grad():
        ref = causal_lm_logprobs(ref_model, input_ids, attention_mask, response_mask=response_mask).logprobs
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mask = response_mask[:, 1:] * attention_mask[:, 1:]
    loss, metrics = loss_fn(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:], old, adv, mask,
                            ref_logprobs=ref)
    return loss, metrics["clipfrac"], metrics["entropy"]


def logprob_step(model, input_ids, attention_mask, response_mask, old, adv):
    """causal_lm_logprobs with gradients (and entropy), then policy_loss."""
    stats = causal_lm_logprobs(model, input_ids, attention_mask, response_mask=response_mask, entropy=True)
    mask = response_mask[:, 1:] * attention_mask[:, 1:]
    loss, metrics = fastalign.policy_loss(stats.logprobs, old, adv, mask, entropy=stats.entropy,
                                          loss_type="dapo", entropy_coef=0.01)
    return loss, metrics["clipfrac"]


def run(step, model, *args):
    model.zero_grad(set_to_none=True)
    out = step(model, *args)
    out[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def assert_same(eager, compiled, loosen=1.0):
    """Outputs to 1e-5 and gradients to (1e-5, 1e-4), each times ``loosen``."""
    (out_e, g_e), (out_c, g_c) = eager, compiled
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(b, a, atol=1e-5 * loosen, rtol=1e-5 * loosen)
    assert g_c.keys() == g_e.keys() and len(g_e) > 0
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], atol=1e-5 * loosen, rtol=1e-4 * loosen, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_fused_step_matches_eager(compiler, device, loosen=1.0):
    model = tiny_qwen2().to(device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # the reference differs from the policy, so the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = fastalign.LinearPolicyLoss(loss_type="grpo", kl_coef=0.04, entropy_coef=0.01, entropy_metric=True)
    batch = tuple(t.to(device) for t in rollout_batch())

    eager = run(lambda m, *a: fused_step(m, ref_model, loss_fn, *a), model, *batch)
    compiled_step = torch.compile(fused_step, fullgraph=True, backend=compiler)
    compiled = run(lambda m, *a: compiled_step(m, ref_model, loss_fn, *a), model, *batch)
    assert_same(eager, compiled, loosen)
    # the gradient reaches the whole model, the body through the hidden states
    assert "lm_head.weight" in eager[1] and "model.embed_tokens.weight" in eager[1]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fused_step_matches_eager(compiler):
    compiled_fused_step_matches_eager(compiler, "cpu")


def test_compiled_fused_step_on_the_triton_kernels():
    """The step through the Triton kernels (the interpreter here): choosing them is traced without importlib,
    which torch 2.11's compiler refuses to trace (a CUDA step failed so before)."""
    with fastalign.use_backend("triton"):
        compiled_fused_step_matches_eager("aot_eager", "cpu")


@pytest.mark.gpu
def test_gpu_compiled_fused_step_matches_eager():
    """The compiled Triton kernels inside an inductor graph on CUDA (inductor may order the
    model's sums differently from eager: fp32 rounding, hence the wider tolerance)."""
    compiled_fused_step_matches_eager("inductor", "cuda", loosen=10.0)


def test_compiled_logprob_step_matches_eager():
    model = tiny_qwen2(seed=3)
    batch = rollout_batch(seed=4)
    eager = run(logprob_step, model, *batch)
    compiled = run(torch.compile(logprob_step, fullgraph=True, backend="aot_eager"), model, *batch)
    assert_same(eager, compiled)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compiled_divergence_compiles_once_for_every_token_count(backend):
    """linear_divergence_loss under torch.compile(fullgraph=True) over 10 token counts: the blocks loop over the
    tokens inside the custom ops at run time, so the count stays symbolic (one static frame, then one dynamic),
    never reaching the recompile limit; the loss and gradients equal the eager call's (its single pass)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(5)
    Vd, H, Ht = 13, 8, 5
    weight = torch.randn(Vd, H, generator=g).requires_grad_()
    bias = torch.randn(Vd, generator=g).requires_grad_()
    teacher_weight = torch.randn(Vd, Ht, generator=g)

    def step(hidden, teacher_hidden, labels):
        loss, metrics = fastalign.linear_divergence_loss(
            hidden, weight, teacher_hidden, teacher_weight, bias=bias, labels=labels, hard_weight=0.5, beta=0.3,
            softcap=4.0, backend=backend)
        return loss, metrics["divergence"], metrics["nll"]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with torch._dynamo.config.patch(recompile_limit=4, automatic_dynamic_shapes=True):
        for N in range(3, 13):
            hidden = torch.randn(N, H, generator=g).requires_grad_()
            teacher_hidden = torch.randn(N, Ht, generator=g)
            labels = torch.randint(0, Vd, (N,), generator=g)
            labels[0] = -100
            results = []
            for fn in (step, compiled):
                out = fn(hidden, teacher_hidden, labels)
                results.append((*out, *torch.autograd.grad(out[0], (hidden, weight, bias))))
            for a, c in zip(*results):
                torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    assert counter.frame_count <= 2


_DYNAMIC_CASES = {
    "token_logprobs": lambda x, y, lp: fastalign.token_logprobs(x, y, temperature=0.7).logprobs,
    "linear_logprobs": lambda x, y, lp: fastalign.linear_logprobs(x[..., :16], x[0, :5, :16].repeat(8, 1)[:37], y,
                                                           temperature=0.7).logprobs,
    "preference_loss": lambda x, y, lp: fastalign.preference_loss(lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3], beta=0.2)[0],
    "group_advantages": lambda x, y, lp: fastalign.group_advantages(lp[:, 0], group_size=2, eps=1e-5),
    "policy_loss": lambda x, y, lp: fastalign.policy_loss(lp, lp - 0.1, torch.ones(4), torch.ones(4, 6), ref_logprobs=lp - 0.2,
                                                   loss_type="grpo", kl_coef=0.1)[0],
}


@pytest.mark.parametrize("name", list(_DYNAMIC_CASES))
def test_ops_compile_with_dynamic_shapes(name):
    """torch.compile(fullgraph=True, dynamic=True) traces the float options as symbolic floats: their checks
    (finite, > 0, read by a loss row) compile (math.isfinite and repr of a symbolic float did not)."""
    torch.manual_seed(0)
    x, y, lp = torch.randn(3, 7, 37), torch.randint(0, 37, (3, 7)), -2 + 0.3 * torch.randn(4, 6)
    fn = _DYNAMIC_CASES[name]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)(x, y, lp)
    torch.testing.assert_close(got, fn(x, y, lp))
