"""Assertion helpers shared by the tests."""
import torch


def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    """Compare in float64 with a message that says where the worst error is."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    both_nan = torch.isnan(a) & torch.isnan(e)
    err = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound) & ~both_nan  # a NaN expected value also makes its bound NaN
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off; first at flat index {i}: "
            f"got {a.flatten()[i].item()}, expected {e.flatten()[i].item()} (atol={atol}, rtol={rtol})")


def policy_batch(g: torch.Generator, B: int, T: int):
    """A policy-loss batch drawn from ``g``: (log-probs, old log-probs, per-sequence advantages spread
    over tokens, response mask with one empty response), fp32 ``[B, T]`` each."""
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = (lp + torch.randn(B, T, generator=g) * 0.3).clamp(max=-1e-3)
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    m = torch.arange(T)[None, :] < torch.randint(2, T + 1, (B, 1), generator=g)
    m[2] = False  # an empty response
    return lp, old, A, m
