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
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off; first at flat index {i}: "
            f"got {a.flatten()[i].item()}, expected {e.flatten()[i].item()} (atol={atol}, rtol={rtol})")
