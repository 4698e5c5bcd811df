"""vespo's ``phi_mean`` metric (docs/math.md#metrics): with ``[B]`` advantages the mean over sequences of the
sequence's ``phi`` ((k, lambda) by the sign of its advantage); with ``[B, T]`` advantages the mean over valid
tokens of ``phi_t``, (k, lambda) by the sign of ``A_t`` (the weight the loss uses), 0 when no token is valid.
Oracle: a float64 formula written here, and the float64 reference."""
import math

import pytest
import torch

import fastalign
from fastalign.reference.policy import policy_loss as reference_policy_loss

K, LAM = (2.0, 3.0), (3.0, 2.0)  # the defaults: (A >= 0, A < 0)


def _batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2
    old = lp + torch.randn(B, T, generator=g) * 0.5
    A = torch.randn(B, T, generator=g)  # signs differ within a row
    m = torch.arange(T)[None] < torch.tensor([[6], [4], [0], [5]])  # rows of different lengths, one empty
    return lp, old, A, m


def _phi64(lp, old, m, pos):
    """float64 phi = exp(lam + k log_w - lam w) of docs/math.md, (k, lam) where ``pos`` (broadcast over [B, T])."""
    m = m.double()
    log_w = (m * (lp.double() - old.double()).clamp(-20, 20)).sum(-1, keepdim=True).clamp(math.log(1e-8), 20)
    k = torch.where(pos, K[0], K[1]).double()
    lam = torch.where(pos, LAM[0], LAM[1]).double()
    return torch.exp(lam + k * log_w - lam * log_w.exp())


def test_phi_mean_per_token_advantages_is_the_masked_token_mean(cpu_backend):
    lp, old, A, m = _batch()
    _, met = fastalign.policy_loss(lp, old, A, m, loss_type="vespo", backend=cpu_backend)
    want = (_phi64(lp, old, m, A >= 0) * m).sum() / m.sum()
    torch.testing.assert_close(met["phi_mean"].double(), want, rtol=1e-5, atol=1e-6)
    # the row mean (by the sign of each row's mean advantage) is another number here
    row = _phi64(lp, old, m, ((A * m).sum(-1, keepdim=True) >= 0)).mean()
    assert abs(float(row) - float(want)) > 1e-2
    _, ref = reference_policy_loss(lp.double(), old.double(), A.double(), m.double(), loss_type="vespo")
    torch.testing.assert_close(met["phi_mean"].double(), ref["phi_mean"], rtol=1e-5, atol=1e-6)


def test_phi_mean_expanded_row_advantages_weights_rows_by_length(cpu_backend):
    """One advantage per row, given as [B, T]: a token mean (rows weighted by their length); as [B]: a row
    mean over every row (an empty one's phi is exp(lam - lam) = 1). A zero advantage takes the (k, lambda) of
    ``A >= 0``."""
    lp, old, _, m = _batch(seed=1)
    a_row = torch.tensor([0.0, -1.2, 0.4, -0.3])
    pos = (a_row >= 0)[:, None]
    phi = _phi64(lp, old, m, pos)
    cases = {"token": (a_row[:, None].expand(m.shape).contiguous(), (phi * m).sum() / m.sum()),
             "row": (a_row, phi[:, 0].mean())}
    for name, (adv, want) in cases.items():
        _, met = fastalign.policy_loss(lp, old, adv, m, loss_type="vespo", backend=cpu_backend)
        torch.testing.assert_close(met["phi_mean"].double(), want, rtol=1e-5, atol=1e-6, msg=name)
        _, ref = reference_policy_loss(lp.double(), old.double(), adv.double(), m.double(), loss_type="vespo")
        torch.testing.assert_close(ref["phi_mean"], want, rtol=1e-12, atol=1e-12, msg=name)
    assert abs(float(cases["token"][1]) - float(cases["row"][1])) > 1e-2


def test_phi_mean_empty_batch(cpu_backend):
    """No valid token: 0 with [B, T] advantages (0 / clamp(0, 1), as TRL); with [B] advantages every row's
    phi is exp(lam - lam) = 1."""
    lp, old, A, m = _batch(seed=2)
    m = torch.zeros_like(m)
    _, met = fastalign.policy_loss(lp, old, A, m, loss_type="vespo", backend=cpu_backend)
    assert float(met["phi_mean"]) == 0.0
    _, met = fastalign.policy_loss(lp, old, A[:, 0], m, loss_type="vespo", backend=cpu_backend)
    torch.testing.assert_close(met["phi_mean"], torch.tensor(1.0))


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_selected_fraction_unchanged_on_the_shared_column(cpu_backend, loss_type):
    """The row column that carries vespo's phi_t sum still counts the Clip-Cov / KL-Cov picks."""
    lp, old, A, m = _batch(seed=3)
    kw = dict(loss_type=loss_type, cov_ratio=0.3)
    if loss_type == "clip_cov":  # every token a candidate
        kw.update(cov_lb=-10.0, cov_ub=10.0, generator=torch.Generator().manual_seed(0))
    _, met = fastalign.policy_loss(lp, old, A, m, backend=cpu_backend, **kw)
    n = int(m.sum())
    assert float(met["cov_selected_frac"]) * n == pytest.approx(math.floor(0.3 * n), abs=1e-4)
