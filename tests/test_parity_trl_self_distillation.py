"""Self-distillation (TRL 1.16's experimental ``SDPOTrainer`` and ``SDFTTrainer``):
:class:`fastalign.integrations.trl.SelfDistillationLoss` against TRL's own ``_compute_self_distillation_loss``
(called unbound on a stand-in carrying the attributes it reads, with the logits it would compute: the heads applied
to the hidden states at the temperature). The sampled-token, full-vocabulary and top-k modes, with and without
the clipped importance ratio: loss, gradients of the student's hidden states and head (through the logits in TRL's,
from the hidden states here) and the ``self_distillation/distillation_loss`` metric."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from helpers import LocalAccelerator

sdpo = pytest.importorskip("trl.experimental.sdpo", reason="TRL 1.16 is not installed")
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.experimental.sdpo.sdpo_trainer import DistillationLogits  # noqa: E402

from fastalign.integrations.trl import SelfDistillationLoss  # noqa: E402

METRIC = "self_distillation/distillation_loss"
B, T, H, Ht, V = 3, 6, 8, 10, 29


def _config(cls=sdpo.SDPOConfig, **kw):
    return cls(output_dir="/tmp/fastalign-sdpo", report_to=[], use_cpu=True, **kw)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    ht = torch.randn(B, T, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2] = 0  # a sample not distilled (TRL's self_distillation_mask)
    old = -torch.rand(B, T, generator=g) * 4 - 1.0  # the rollout's log-probs: ratios above and below the clip
    return h, w, ht, wt, ids, mask, old


def _trl(trainer_cls, args, h, w, ht, wt, ids, mask, old):
    """TRL's loss, metric and gradients w.r.t. the student's hidden states and head, from the logits."""
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = DistillationLogits(completion_ids=ids, completion_mask=torch.ones_like(mask), loss_mask=mask,
                                student_logits=(hs @ ws.T) / args.temperature,
                                teacher_logits=(ht @ wt.T) / args.temperature)
    stand_in = SimpleNamespace(args=args, accelerator=LocalAccelerator(), _name=trainer_cls._name,
                               _metrics=defaultdict(lambda: defaultdict(list)))
    stand_in._log_self_distillation_metric = trainer_cls._log_self_distillation_metric.__get__(stand_in)
    inputs = {} if old is None else {"old_per_token_logps": old}
    loss = trainer_cls._compute_self_distillation_loss(stand_in, SimpleNamespace(training=True), inputs, logits)
    return loss, stand_in._metrics["train"][METRIC][0], torch.autograd.grad(loss, (hs, ws))


def _compare_linear(trainer_cls, args, seed=0, rollout=True):
    """:meth:`SelfDistillationLoss.linear` from the hidden states against TRL's loss from the logits."""
    h, w, ht, wt, ids, mask, old = _batch(seed)
    old = old if rollout else None
    loss_t, metric_t, grads_t = _trl(trainer_cls, args, h, w, ht, wt, ids, mask, old)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = SelfDistillationLoss(args).linear(hs, ws, ht, wt, ids, mask, old)
    torch.testing.assert_close(loss, loss_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics[METRIC], torch.tensor(metric_t), atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(loss, (hs, ws)), grads_t):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, alpha", [("sampled_token", 1.0), ("full_logits", 0.0), ("full_logits", 1.0),
                                         ("full_logits", 0.3)])
@pytest.mark.parametrize("clip", [2.0, None], ids=["is-clip", "no-is"])
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "no-rollout"])
def test_linear_matches_trl(mode, alpha, clip, rollout):
    args = _config(distillation_mode=mode, distillation_alpha=alpha, distillation_is_clip=clip, temperature=0.8)
    _compare_linear(sdpo.SDPOTrainer, args, rollout=rollout)


def test_sampled_token_from_log_probs_in_float64_matches_trl():
    """``forward`` on per-token log-probs: float64 in, TRL's float64 loss, gradient w.r.t. the logits at 1e-12."""
    args = _config(temperature=1.3)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 2:] = 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3

    a = logits.clone().requires_grad_()
    stand_in = SimpleNamespace(args=args, accelerator=LocalAccelerator(), _name="SDPO",
                               _metrics=defaultdict(lambda: defaultdict(list)))
    stand_in._log_self_distillation_metric = sdpo.SDPOTrainer._log_self_distillation_metric.__get__(stand_in)
    loss_t = sdpo.SDPOTrainer._compute_self_distillation_loss(
        stand_in, SimpleNamespace(training=True), {"old_per_token_logps": old},
        DistillationLogits(ids, torch.ones_like(mask), mask, a, teacher))
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = logits.clone().requires_grad_()
    lp = b.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    lt = teacher.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    loss, metrics = SelfDistillationLoss(args)(lp, lt, mask, old)
    (g_f,) = torch.autograd.grad(loss, b)
    torch.testing.assert_close(loss, loss_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_f, g_t, atol=1e-12, rtol=1e-12)
    assert float(metrics[METRIC]) == pytest.approx(stand_in._metrics["train"][METRIC][0], rel=1e-12)


def test_sdft_config_full_logits_matches_trl():
    _compare_linear(SDFTTrainer, _config(SDFTConfig, distillation_mode="full_logits", distillation_topk=None), seed=2)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("tail", [False, True], ids=["renormalised", "tail"])
@pytest.mark.parametrize("clip", [2.0, None], ids=["is-clip", "no-is"])
def test_topk_logits_matches_trl(alpha, tail, clip, monkeypatch):
    """SDFT's default mode: the divergence over the student's top-k support, renormalised or with the tail bucket,
    against TRL's ``compute_topk_self_distillation_loss`` on the full logits. Renormalised, the teacher's
    log-probs are dot products at the support: no logits over the teacher's vocabulary (the tail needs them)."""
    from fastalign.ops import linear_topk as ops

    widths = []
    chunk_logits = ops.chunk_logits
    monkeypatch.setattr(ops, "chunk_logits", lambda buf, h, w, *a: widths.append(w.shape[1]) or chunk_logits(
        buf, h, w, *a))
    args = _config(SDFTConfig, distillation_topk=7, distillation_add_tail=tail, distillation_alpha=alpha,
                   distillation_is_clip=clip, temperature=0.8)
    _compare_linear(SDFTTrainer, args, seed=2)
    assert (Ht in widths) == tail and H in widths


def test_topk_logits_in_an_sdpo_config_and_a_support_of_the_whole_vocabulary_match_trl():
    _compare_linear(sdpo.SDPOTrainer, _config(distillation_mode="topk_logits", distillation_topk=3), seed=5)
    # k = V: the support is every token, so the renormalised divergence is the full one
    _compare_linear(SDFTTrainer, _config(SDFTConfig, distillation_topk=V, distillation_alpha=0.3), seed=6)


def test_topk_logits_needs_a_support_size():
    with pytest.raises(ValueError, match="SDFTConfig.distillation_topk must be set"):
        SelfDistillationLoss(_config(SDFTConfig, distillation_topk=None))
    with pytest.raises(ValueError, match="SDPOConfig.distillation_topk must be an int >= 1"):
        SelfDistillationLoss(_config(distillation_mode="topk_logits", distillation_topk=0))
    h, w, ht, wt, ids, mask, old = _batch(0)  # a support larger than the vocabulary names the config field
    with pytest.raises(ValueError, match=rf"SDFTConfig.distillation_topk={V + 1} is larger than the vocabulary"):
        SelfDistillationLoss(_config(SDFTConfig, distillation_topk=V + 1)).linear(h, w, ht, wt, ids, mask, old)
    with pytest.raises(ValueError, match="distillation_mode='topk_logits' compares distributions"):
        h = torch.zeros(1, 2)
        SelfDistillationLoss(_config(SDFTConfig))(h, h, h)


def test_config_name_takes_sdft_s_defaults_and_names():
    """``config_name="SDFTConfig"``: the fields a dict (or another config view) lacks take SDFT's defaults
    (``topk_logits``, alpha 0.5), so the loss is TRL's SDFT loss for that config, and the errors name SDFTConfig."""
    h, w, ht, wt, ids, mask, old = _batch(2)
    loss_t, metric_t, _ = _trl(SDFTTrainer, _config(SDFTConfig, distillation_topk=5), h, w, ht, wt, ids, mask, old)
    loss, metrics = SelfDistillationLoss({"distillation_topk": 5}, config_name="SDFTConfig").linear(
        h, w, ht, wt, ids, mask, old)
    torch.testing.assert_close(loss, loss_t.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics[METRIC], torch.tensor(metric_t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="SDFTConfig.distillation_topk must be set"):
        SelfDistillationLoss({"distillation_topk": None}, config_name="SDFTConfig")
    with pytest.raises(ValueError, match="config_name must be 'SDPOConfig' or 'SDFTConfig'"):
        SelfDistillationLoss({}, config_name="GRPOConfig")


def test_nothing_distilled_gives_zero_as_trl():
    h, w, ht, wt, ids, mask, old = _batch(3)
    for mode in ("sampled_token", "full_logits"):
        args = _config(distillation_mode=mode)
        hs = h.clone().requires_grad_()
        loss, metrics = SelfDistillationLoss(args).linear(hs, w, ht, wt, ids, torch.zeros_like(mask), old)
        (grad,) = torch.autograd.grad(loss, hs)
        assert float(loss) == 0.0 and float(metrics[METRIC]) == 0.0 and not grad.any()


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="distillation_alpha=0.5: distillation_mode='sampled_token'"):
        SelfDistillationLoss({"distillation_alpha": 0.5})
    with pytest.raises(ValueError, match="SDPOConfig.distillation_is_clip"):
        SelfDistillationLoss({"distillation_is_clip": 0.0})
    with pytest.raises(ValueError, match="SDPOConfig.distillation_mode must be one of"):
        SelfDistillationLoss({"distillation_mode": "tokens"})
    with pytest.raises(ValueError, match="SDPOConfig has no field 'distillation_beta'"):
        SelfDistillationLoss({"distillation_beta": 0.5})
    with pytest.raises(ValueError, match=r"use \.linear\(\)"):
        SelfDistillationLoss({"distillation_mode": "full_logits"})(torch.zeros(2, 3), torch.zeros(2, 3),
                                                                   torch.ones(2, 3))
    with pytest.raises(ValueError, match="old_logprobs"):
        SelfDistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 2))
