"""The README's two usage sketches, end to end on tiny random tensors."""
import torch

import fastalign as fa


def test_token_logprobs_quickstart():
    B, T, V = 3, 5, 40
    logits = torch.randn(B, T + 1, V, requires_grad=True)
    input_ids = torch.randint(0, V, (B, T + 1))
    advantages = torch.randn(B, 1)
    stats = fa.token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=0.7, entropy=True, ignore_index=-100)
    loss = -(stats.logprobs * advantages).sum() - 0.01 * stats.entropy.sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.count_nonzero(logits.grad[:, -1]) == 0


def test_grpo_step_quickstart():
    B, T, H, V = 4, 6, 16, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    response_mask = torch.ones(B, T)
    response_mask[:, -2:] = 0
    rewards, prompt_ids = torch.randn(B), torch.tensor([7, 7, 9, 9])
    old_logprobs, ref_logprobs = torch.randn(B, T) - 3, torch.randn(B, T) - 3
    adv = fa.group_advantages(rewards, prompt_ids)
    loss, metrics = fa.LinearPolicyLoss(loss_type="grpo", kl_coef=1e-3)(
        hidden, weight, labels, old_logprobs, adv[:, None].expand_as(response_mask), response_mask,
        ref_logprobs=ref_logprobs)
    loss.backward()
    assert {"clipfrac", "approx_kl", "kl"} <= set(metrics)
    assert all(v.dim() == 0 for v in metrics.values())
    assert torch.isfinite(hidden.grad).all() and weight.grad.abs().sum() > 0
