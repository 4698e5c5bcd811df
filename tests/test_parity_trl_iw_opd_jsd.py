"""IW-OPD's JSD objective: :class:`fastalign.integrations.trl.IWOPDJSDLoss` from hidden states against TRL 1.16's own
``IWOPDTrainer.generalized_jsd_loss`` and ``_compute_local_sparse_top_1_divergence_loss`` (called unbound on a
stand-in carrying the attributes it reads) on the logits of the same hidden states: the full vocabulary, the
teacher's / the student's / both top-k supports by ``beta``, the top-1 pair (sampled or argmax reverse token),
renormalised or with the tail bucket, ``num_items_in_batch``; loss and gradients of the student's hidden states
and head."""
from types import SimpleNamespace

import pytest
import torch

trl_iw_opd = pytest.importorskip("trl.experimental.iw_opd", reason="TRL 1.16 is not installed")
from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer  # noqa: E402

from fastalign.integrations.trl import IWOPDJSDLoss  # noqa: E402

B, T, H, Ht, V = 3, 6, 8, 10, 23


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.6
    ht = torch.randn(B, T, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.6
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[1, 4:] = -100  # padding after a short completion
    labels[2, :2] = -100
    return h, w, ht, wt, ids, labels


def _trl(config, h, w, ht, wt, ids, labels, num_items):
    """TRL's loss and the gradients w.r.t. the student's hidden states and head, from the logits."""
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    student, teacher = hs @ ws.T, ht @ wt.T
    if config.beta > 0 and config.loss_top_k == 1:
        stand_in = SimpleNamespace(beta=config.beta, temperature=config.temperature,
                                   loss_add_tail=config.loss_add_tail,
                                   reverse_kl_top_1_mode=config.reverse_kl_top_1_mode,
                                   _reduce_divergence_loss=IWOPDTrainer._reduce_divergence_loss)
        for name in ("_get_reverse_kl_top_1_tokens", "_compute_sparse_top_1_divergence_loss"):
            setattr(stand_in, name, getattr(IWOPDTrainer, name).__get__(stand_in))
        loss = IWOPDTrainer._compute_local_sparse_top_1_divergence_loss(stand_in, student, teacher, ids, labels,
                                                                         num_items_in_batch=num_items)
    else:
        loss = IWOPDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=config.beta,
                                                 temperature=config.temperature, top_k=config.loss_top_k,
                                                 add_tail=config.loss_add_tail, num_items_in_batch=num_items)
    return loss, torch.autograd.grad(loss, (hs, ws))


def _compare(num_items=None, seed=0, **fields):
    config = IWOPDConfig(output_dir="/tmp/fastalign-iw-opd-jsd", report_to=[], use_cpu=True,
                         distillation_objective="jsd", **fields)
    h, w, ht, wt, ids, labels = _batch(seed)
    want, want_grads = _trl(config, h, w, ht, wt, ids, labels, num_items)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = IWOPDJSDLoss(config).linear(hs, ws, ht, wt, ids, labels != -100, num_items)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(torch.autograd.grad(loss, (hs, ws)), want_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.4])
@pytest.mark.parametrize("top_k", [2, 5])
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "renormalised"])
def test_top_k_support_matches_trl(beta, top_k, add_tail):
    _compare(beta=beta, loss_top_k=top_k, loss_add_tail=add_tail, temperature=0.8)


@pytest.mark.parametrize("beta, top_k", [(0.0, 3), (0.4, 3), (0.4, 1)], ids=["teacher's top-k", "union", "top-1 pair"])
def test_the_tail_bucket_takes_one_pass_over_the_teacher_s_vocabulary(beta, top_k, monkeypatch):
    """With the tail bucket the teacher's log-probs at the support are normalised over its vocabulary, whose
    log-sum-exp comes from the pass that found its top ids: a support of those ids takes their log-probs as they
    are, a union (or the top-1 pair) the support's renormalised ones (dot products) shifted at the teacher's top-1.
    One pass over the teacher's vocabulary, and TRL's loss and gradients."""
    from fastalign.ops import linear_topk as ops

    widths = []
    chunk_logits = ops.chunk_logits
    monkeypatch.setattr(ops, "chunk_logits", lambda buf, h, w, *a: widths.append(w.shape[1]) or chunk_logits(
        buf, h, w, *a))
    _compare(beta=beta, loss_top_k=top_k, loss_add_tail=True, temperature=0.8, seed=3)
    assert widths.count(Ht) == 1


@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("reverse", ["sampled", "argmax"])
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "renormalised"])
def test_top_1_pair_matches_trl(beta, reverse, add_tail):
    _compare(beta=beta, loss_top_k=1, loss_add_tail=add_tail, reverse_kl_top_1_mode=reverse, temperature=1.2, seed=1)


@pytest.mark.parametrize("fields", [dict(beta=0.0, loss_top_k=1), dict(beta=0.3, loss_top_k=0),
                                    dict(beta=1.0, loss_top_k=V), dict(beta=0.5, loss_top_k=V + 4)],
                         ids=["forward-top-1", "full", "k=V", "k>V"])
def test_full_vocabulary_and_the_forward_top_1_match_trl(fields):
    _compare(**fields, seed=2)


@pytest.mark.parametrize("num_items", [7, torch.tensor(9.0)], ids=["int", "tensor"])
def test_num_items_in_batch_divides_as_trl(num_items):
    _compare(num_items, beta=0.4, loss_top_k=3)
    _compare(num_items, beta=1.0, loss_top_k=1)


@pytest.mark.parametrize("fields", [dict(beta=0.4, loss_top_k=0), dict(beta=0.4, loss_top_k=3)], ids=["full", "top-k"])
@pytest.mark.parametrize("bad,err,match", [
    (-3.0, ValueError, "^num_items_in_batch must be >= 0 and finite"),
    (torch.tensor(float("nan")), ValueError, "^num_items_in_batch must be >= 0 and finite"),
    (torch.ones(2), ValueError, "^num_items_in_batch must be a number or a one-element tensor"),
    ("6", TypeError, "^num_items_in_batch must be a real number"),
    (torch.tensor(1e300, dtype=torch.float64), ValueError, "^num_items_in_batch must be >= 0 and finite"),
    (1e300, ValueError, "^num_items_in_batch must be >= 0 and finite"),
], ids=["negative", "nan", "two-elements", "str", "past-fp32-tensor", "past-fp32-number"])
def test_a_bad_num_items_in_batch_is_named_as_passed(fields, bad, err, match):
    """The count goes to linear_divergence_loss's global_tokens: its errors name TRL's num_items_in_batch."""
    h, w, ht, wt, ids, labels = _batch()
    with pytest.raises(err, match=match):
        IWOPDJSDLoss(dict(**fields)).linear(h, w, ht, wt, ids, labels != -100, bad)


@pytest.mark.parametrize("fields", [dict(beta=0.4, loss_top_k=0), dict(beta=0.4, loss_top_k=3)], ids=["full", "top-k"])
def test_a_zero_num_items_in_batch_divides_as_one(fields, monkeypatch):
    """A count of 0 (a micro-batch with no scored token) divides as 1, as TRL clamps it, on the full-vocabulary and
    the top-k path (the top-k path divided by it: a NaN loss); a NaN count not read on the host makes it NaN."""
    from fastalign import _validate

    h, w, ht, wt, ids, labels = _batch()
    loss = IWOPDJSDLoss(dict(**fields))
    want = loss.linear(h, w, ht, wt, ids, labels != -100, 1)
    for zero in (0, torch.tensor(0.0)):
        assert torch.equal(loss.linear(h, w, ht, wt, ids, labels != -100, zero), want)
    monkeypatch.setattr(_validate, "eager", lambda x: False)
    assert torch.isnan(loss.linear(h, w, ht, wt, ids, labels != -100, torch.tensor(float("nan"))))


def test_no_scored_token_gives_zero():
    h, w, ht, wt, ids, _ = _batch()
    hs = h.clone().requires_grad_()
    loss = IWOPDJSDLoss(dict(beta=0.4, loss_top_k=3)).linear(hs, w, ht, wt, ids, torch.zeros(B, T))
    assert float(loss) == 0.0
    assert torch.equal(torch.autograd.grad(loss, hs)[0], torch.zeros_like(h))


def test_refusals_name_the_field():
    with pytest.raises(ValueError, match="distillation_objective='iw_opd'"):
        IWOPDJSDLoss(dict(distillation_objective="iw_opd"))
    with pytest.raises(ValueError, match="IWOPDConfig.loss_top_k"):
        IWOPDJSDLoss(dict(loss_top_k=-1))
    with pytest.raises(ValueError, match="IWOPDConfig.reverse_kl_top_1_mode"):
        IWOPDJSDLoss(dict(reverse_kl_top_1_mode="first"))
    with pytest.raises(ValueError, match="applies only when beta > 0 and loss_top_k == 1"):
        IWOPDJSDLoss(dict(reverse_kl_top_1_mode="argmax", loss_top_k=2))
    with pytest.raises(ValueError, match="IWOPDConfig.beta"):
        IWOPDJSDLoss(dict(beta=1.5))
