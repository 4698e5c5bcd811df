"""TRL 1.16 parity: DPOTrainer, CPOTrainer, ORPOTrainer, KTOTrainer and TPOTrainer's own loss code against the
fastalign profiles of :mod:`fastalign.integrations.trl`, loss, gradient and metrics at 1e-6.

TRL computes these losses inside trainer methods that run the model. The tests call those methods
unbound (``DPOTrainer._compute_loss(stand_in, model, inputs, False)``) on the smallest stand-in
object that carries exactly the attributes the method reads, set from a real TRL config the way
the trainer's ``__init__`` sets them, and a stand-in model:

* DPO / KTO: the model returns what TRL's fused LM head returns — per-token ``log_probs``
  (zero where the label is -100), ``log_sum_sq_probs``, and zero ``entropy`` / ``mean_logits`` /
  ``is_top1`` (metrics fastalign does not reproduce: they need the logits);
* CPO / ORPO / TPO: the model returns ``logits``; TRL's own ``concatenated_forward`` (TPO: its
  ``_compute_loss``) takes the log-softmax, so the gradients are compared w.r.t. the logits, through
  fastalign's profile on the same log-probs.

No model, no download: synthetic log-probs, float64 (float32 where TRL's code casts).
"""
import math
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from helpers import LocalAccelerator

trl = pytest.importorskip("trl", reason="TRL is not installed: `pip install trl==1.16.*` to run the parity tests")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from fastalign.integrations.trl import preference as P  # noqa: E402

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


class _FusedHead:
    """Stand-in model: what TRL's fused LM head returns for these labels."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # no submodules (read by TRL's is_peft_model check when peft is installed)

    def __init__(self, log_probs, mask, log_sum_sq_probs=None):
        zero = torch.zeros_like(mask, dtype=log_probs.dtype)
        self.out = SimpleNamespace(log_probs=log_probs * mask, entropy=zero, mean_logits=zero,
                                   is_top1=torch.zeros_like(mask, dtype=torch.bool),
                                   log_sum_sq_probs=None if log_sum_sq_probs is None else log_sum_sq_probs * mask)

    def __call__(self, *args, **kwargs):
        return self.out


def _config(cls, **kw):
    return cls(output_dir="/tmp/fastalign-trl-parity", report_to=[], use_cpu=True, **kw)


def _close(a, b, what):
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _compare_metrics(got, trl_metrics, names):
    assert set(names) <= set(got), set(names) - set(got)
    for k in names:
        _close(got[k], trl_metrics[k], k)


# ------------------------------------------------------------------------------------------ DPO

def _dpo_batch(B=4, T=9, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (2 * B,), generator=g)
    lengths[0], lengths[B] = T, 1  # a full row, a one-token row
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    lp = (-torch.rand(2 * B, T, generator=g, dtype=D) * 1.5 - 0.05).to(dtype)
    ref = (lp.to(D) + 0.3 * torch.randn(2 * B, T, generator=g, dtype=D)).clamp(max=-0.01).to(dtype)
    # log Σ_j p_j² lies in [2 lp, 0]: rows above and below lp, so WPO weights fall on both sides of 1
    factor = 0.5 + 1.3 * torch.rand(2 * B, 1, generator=g, dtype=D)
    lssp = torch.maximum(lp.to(D) * factor, 2 * lp.to(D)).clamp(max=0.0).to(dtype)
    return lp, ref, mask, lssp


def _trl_dpo(args, lp, ref, mask, lssp):
    """DPOTrainer._compute_loss on a stand-in trainer (attributes as DPOTrainer.__init__ sets them)."""
    model = _FusedHead(lp, mask, lssp if args.use_weighting else None)
    trainer = SimpleNamespace(
        model=model, ref_model=_FusedHead(ref, mask), accelerator=LocalAccelerator(), args=args,
        aux_loss_enabled=False, precompute_ref_logps=False, beta=args.beta, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    rows, T = mask.shape
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], 1)  # position 0: prompt
    inputs = {"input_ids": torch.zeros(rows, T + 1, dtype=torch.long), "attention_mask": torch.ones(rows, T + 1),
              "completion_mask": completion_mask}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def test_every_dpo_loss_type_of_trl_is_covered():
    from trl.trainer import dpo_config
    import inspect
    text = inspect.getsource(dpo_config.DPOConfig)
    help_text = text[text.index("loss_type: list[str]"):text.index("loss_weights: list[float]")]
    listed = {t for t in DPO_TYPES if f"`'{t}'`" in help_text}
    assert listed == set(DPO_TYPES), set(DPO_TYPES) - listed
    # every quoted name in the help is one we test
    import re
    assert set(re.findall(r"`'([a-z_]+)'`", help_text)) == set(DPO_TYPES)


def test_profile_defaults_are_trls():
    import dataclasses
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    for cls, defaults in ((DPOConfig, P.DPO_DEFAULTS), (CPOConfig, P.CPO_DEFAULTS), (ORPOConfig, P.ORPO_DEFAULTS),
                          (KTOConfig, P.KTO_DEFAULTS)):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in defaults.items():
            f = fields[k]
            trl_default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert trl_default == v, (cls.__name__, k, trl_default, v)


def _run_dpo(cfg_kw, dtype=D, seed=0, ref_per_sequence=False, ref_is_policy=False):
    args = _config(DPOConfig, **cfg_kw)
    lp, ref, mask, lssp = _dpo_batch(seed=seed, dtype=dtype)
    if ref_is_policy:
        ref = lp.clone()
    a = lp.clone().requires_grad_()
    loss_t, m_t = _trl_dpo(args, a, ref, mask, lssp)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = lp.clone().requires_grad_()
    mod = P.DPOLoss(args)
    kw = dict(log_sum_sq_probs=lssp) if args.use_weighting else {}
    if ref_per_sequence:
        from fastalign import sequence_logprobs
        r = sequence_logprobs(ref, mask, ld_alpha=args.ld_alpha).sum
        B = lp.shape[0] // 2
        loss_f, m_f = mod(b, mask, ref_chosen_logps=r[:B], ref_rejected_logps=r[B:], **kw)
    else:
        loss_f, m_f = mod(b, mask, ref, **kw)
    (g_f,) = torch.autograd.grad(loss_f, b)
    _close(loss_f, loss_t, "loss")
    _close(g_f, g_t, "d loss / d per-token log-probs")
    _compare_metrics(m_f, m_t, DPO_METRICS)
    assert set(m_f) == set(DPO_METRICS)
    return loss_f


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_first_step_with_the_policy_as_reference_counts_no_accurate_pair(loss_type):
    """At the first step the policy is the reference: every reward is 0, and TRL's ``rewards/accuracies``
    (``chosen > rejected``, strictly) is 0, not 1."""
    _run_dpo(dict(loss_type=loss_type, beta=0.1), ref_is_policy=True)
    args = _config(DPOConfig, loss_type=loss_type, beta=0.1)
    lp, _, mask, _ = _dpo_batch()
    assert float(P.DPOLoss(args)(lp, mask, lp.clone())[1]["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("field", ["beta"])
@pytest.mark.parametrize("value", [0.0, -0.1])
def test_dpo_beta_must_be_positive(field, value):
    """TRL computes with ``beta <= 0``; fastalign's preference losses take ``beta > 0`` only, so the profile refuses
    it when built (docs/parity-policy.md), naming the config field."""
    with pytest.raises(ValueError, match=f"DPOConfig.{field}"):
        P.DPOLoss(dict(loss_type=["sigmoid"], **{field: value}))


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_each_loss_type(loss_type):
    kw = dict(loss_type=loss_type, beta=0.3)
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 1e-3
    _run_dpo(kw)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", ["sigmoid", "ipo"]])
def test_dpo_lengths_count_a_completion_token_at_position_zero_as_trl(loss_type):
    """An empty prompt or keep_end truncation puts a completion token at position 0: ipo and sigmoid_norm
    divide by DPOTrainer's unshifted completion_mask.sum(1), one more than the scored tokens there."""
    args = _config(DPOConfig, loss_type=loss_type, beta=0.4)
    lp, ref, mask, lssp = _dpo_batch(seed=3)
    rows, T = mask.shape
    first = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0])  # the rows whose completion starts at position 0
    model = _FusedHead(lp, mask)
    trainer = SimpleNamespace(
        model=model, ref_model=_FusedHead(ref, mask), accelerator=LocalAccelerator(), args=args,
        aux_loss_enabled=False, precompute_ref_logps=False, beta=args.beta, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=None,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    completion_mask = torch.cat([first.unsqueeze(1), mask.long()], 1)
    inputs = {"input_ids": torch.zeros(rows, T + 1, dtype=torch.long), "attention_mask": torch.ones(rows, T + 1),
              "completion_mask": completion_mask}
    a = lp.clone().requires_grad_()
    model.out.log_probs = a * mask
    loss_t = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = lp.clone().requires_grad_()
    loss_f, m_f = P.DPOLoss(args)(b, mask, ref, lengths=completion_mask.sum(1))
    (g_f,) = torch.autograd.grad(loss_f, b)
    _close(loss_f, loss_t, "loss")
    _close(g_f, g_t, "d loss / d per-token log-probs")
    _compare_metrics(m_f, {k: v[-1] for k, v in trainer._metrics["train"].items()}, DPO_METRICS)
    with pytest.raises(ValueError, match="lengths"):
        P.DPOLoss(args)(b, mask, ref, lengths=completion_mask.sum(1)[:-1])


@pytest.mark.parametrize("loss_type", ["robust", "exo_pair", "aot", "aot_unpaired"])
def test_dpo_label_smoothing_where_trl_applies_it(loss_type):
    _run_dpo(dict(loss_type=loss_type, label_smoothing=0.2))


def test_dpo_label_smoothing_reaches_only_trls_rows_in_a_list():
    _run_dpo(dict(loss_type=["sigmoid", "robust", "sigmoid_norm", "aot"], loss_weights=[1.0, 0.5, 0.7, 0.2],
                  label_smoothing=0.15, beta=0.2))


def test_dpo_label_smoothing_that_trl_ignores_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        P.DPOLoss(_config(DPOConfig, loss_type="sigmoid", label_smoothing=0.1))
    with pytest.raises(ValueError, match="exo_pair"):
        P.DPOLoss(_config(DPOConfig, loss_type="exo_pair"))
    for t in ("aot", "aot_unpaired"):  # DPOTrainer raises NotImplementedError: the losses sort the batch
        with pytest.raises(ValueError, match="use_weighting"):
            P.DPOLoss(_config(DPOConfig, loss_type=["sigmoid", t], use_weighting=True))


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                       ["sigmoid", "sft"]])
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", ("alpha_divergence", 0.5),
                                  ("alpha_divergence", 0.2), ("alpha_divergence", 1.5), ("alpha_divergence", 1.0)])
def test_dpo_f_divergences(loss_type, fdiv):
    name, coef = fdiv if isinstance(fdiv, tuple) else (fdiv, 0.5)
    kw = dict(loss_type=loss_type, f_divergence_type=name, f_alpha_divergence_coef=coef, beta=0.2)
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 0.01
    # TRL's alpha divergence casts through a float32/16/bf16 table only: float32 inputs there
    _run_dpo(kw, dtype=torch.float32 if name == "alpha_divergence" else D)


@pytest.fixture(scope="module")
def tiny_dpo_parts(tmp_path_factory):
    """(model, tokenizer, dataset) for building a real ``DPOTrainer`` (a tiny random Qwen2)."""
    pytest.importorskip("datasets", reason="DPOTrainer needs datasets")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    import datasets
    import transformers
    from test_integration_trl_trainers import _tokenizer, tiny_checkpoint
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-dpo-config"))
    dataset = datasets.Dataset.from_dict({"prompt": ["w3 w4"], "chosen": ["w5"], "rejected": ["w6"]})
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint), _tokenizer(checkpoint), dataset


@pytest.mark.parametrize("fdiv", [("forward_kl", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                       "apo_down"])
def test_dpo_f_divergence_on_other_losses_is_refused_like_trl(loss_type, fdiv, tiny_dpo_parts):
    """DPOTrainer refuses any f_divergence_type but reverse_kl on these losses, also the α-divergence with
    f_alpha_divergence_coef = 1 (its reverse-KL limit): the refusal comes before the coefficient is read. The
    profile turned that α-divergence into reverse KL first and accepted it; it refuses it as TRL now."""
    name, coef = fdiv
    args = _config(DPOConfig, loss_type=[loss_type], f_divergence_type=name, f_alpha_divergence_coef=coef)
    model, tokenizer, dataset = tiny_dpo_parts
    with pytest.raises(ValueError, match=f"f_divergence_type='{name}'"):
        DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    as_dict = dict(loss_type=[loss_type], f_divergence_type=name, f_alpha_divergence_coef=coef)
    for build in (P.dpo_options, P.DPOLoss, P.dpo_preference_loss, P.dpo_linear_loss):
        for config in (args, as_dict):
            with pytest.raises(ValueError, match=f"f_divergence_type='{name}' does not apply to loss_type "
                                                 f"'{loss_type}'"):
                build(config)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", ["robust", "ipo"], "discopop"])
def test_dpo_wpo_weights_uncapped(loss_type):
    loss = _run_dpo(dict(loss_type=loss_type, use_weighting=True))
    assert torch.isfinite(loss)


def test_dpo_wpo_with_sft_where_trl_fails():
    """TRL 1.16 multiplies the expanded sft term in place and fails; fastalign weights every row,
    the sft term included: checked against DPOTrainer's weighted sigmoid plus the weighted NLL."""
    from fastalign import sequence_logprobs, wpo_weights
    args = _config(DPOConfig, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], use_weighting=True)
    lp, ref, mask, lssp = _dpo_batch()
    with pytest.raises(RuntimeError, match="memory location"):
        _trl_dpo(args, lp.clone().requires_grad_(), ref, mask, lssp)
    a = lp.clone().requires_grad_()
    sigmoid_t, _ = _trl_dpo(_config(DPOConfig, loss_type="sigmoid", use_weighting=True), a, ref, mask, lssp)
    s = sequence_logprobs(a, mask, sum_p2=torch.exp(lssp))
    w = wpo_weights(s.wpo[:4], s.wpo[4:], cap=None)
    expected = sigmoid_t + 0.3 * w.mean() * (-s.sum[:4].sum() / s.count[:4].sum())
    b = lp.clone().requires_grad_()
    got, _ = P.DPOLoss(args)(b, mask, ref, log_sum_sq_probs=lssp)
    _close(got, expected, "loss")
    _close(torch.autograd.grad(got, b)[0], torch.autograd.grad(expected, a)[0], "gradient")


def test_dpo_wpo_with_hinge_alone_where_trl_backward_fails():
    """TRL 1.16 scales hinge's relu output in place: its forward is right, its backward fails.
    The loss is compared with TRL's, the gradient with fastalign's float64 reference."""
    from fastalign import sequence_logprobs, wpo_weights
    from fastalign.reference import preference as R
    args = _config(DPOConfig, loss_type="hinge", use_weighting=True, beta=0.5)
    lp, ref, mask, lssp = _dpo_batch()
    a = lp.clone().requires_grad_()
    loss_t, _ = _trl_dpo(args, a, ref, mask, lssp)
    with pytest.raises(RuntimeError, match="inplace"):
        loss_t.backward()
    b = lp.clone().requires_grad_()
    got, _ = P.DPOLoss(args)(b, mask, ref, log_sum_sq_probs=lssp)
    _close(got, loss_t, "loss")
    c = lp.clone().requires_grad_()
    s, r = sequence_logprobs(c, mask, sum_p2=torch.exp(lssp)), sequence_logprobs(ref, mask)
    w = wpo_weights(s.wpo[:4], s.wpo[4:], cap=None)
    expected, _ = R.preference_loss(s.sum[:4], s.sum[4:], r.sum[:4], r.sum[4:], loss_types=("hinge",), beta=0.5,
                                    pair_weights=w)
    _close(torch.autograd.grad(got, b)[0], torch.autograd.grad(expected, c)[0], "gradient")


def test_dpo_wpo_weights_exceed_one_here():
    # the batch of these tests has weights above 1 (so a cap at 1 would differ from TRL)
    from fastalign import sequence_logprobs, wpo_weights
    lp, _, mask, lssp = _dpo_batch()
    s = sequence_logprobs(lp, mask, sum_p2=torch.exp(lssp))
    assert wpo_weights(s.wpo[:4], s.wpo[4:], cap=None).max() > 1.0


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "sft"], "ipo"])
def test_dpo_ld_alpha(loss_type, ld_alpha):
    _run_dpo(dict(loss_type=loss_type, ld_alpha=ld_alpha))
    _run_dpo(dict(loss_type=loss_type, ld_alpha=ld_alpha), ref_per_sequence=True, seed=1)


def test_dpo_weighted_list_mpo_and_rpo():
    _run_dpo(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))
    _run_dpo(dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3], ld_alpha=0.5, use_weighting=True))
    _run_dpo(dict(loss_type=["apo_zero", "discopop", "hinge"], loss_weights=[0.3, 0.3, 0.4], discopop_tau=0.5))


@pytest.mark.parametrize("cfg", [dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.2, 0.1]),
                                 dict(loss_type="robust", label_smoothing=0.1, f_divergence_type="forward_kl")])
def test_dpo_preference_loss_on_sequence_logprobs(cfg):
    from fastalign import sequence_logprobs
    args = _config(DPOConfig, **cfg)
    lp, ref, mask, _ = _dpo_batch(seed=2)
    a = lp.clone().requires_grad_()
    loss_t, m_t = _trl_dpo(args, a, ref, mask, None)
    b = lp.clone().requires_grad_()
    s, r = sequence_logprobs(b, mask), sequence_logprobs(ref, mask)
    nll = -s.sum[:4].sum() / s.count[:4].sum()
    loss_f, m_f = P.dpo_preference_loss(args)(s.sum[:4], s.sum[4:], r.sum[:4], r.sum[4:], chosen_lengths=s.count[:4],
                                              rejected_lengths=s.count[4:], chosen_nll=nll)
    _close(loss_f, loss_t, "loss")
    _close(torch.autograd.grad(loss_f, b)[0], torch.autograd.grad(loss_t, a)[0], "gradient")
    _compare_metrics(m_f, m_t, DPO_METRICS)
    with pytest.raises(ValueError, match="ld_alpha"):
        P.dpo_preference_loss(_config(DPOConfig, ld_alpha=0.5))


def test_dpo_from_a_dict_and_unknown_keys():
    args = _config(DPOConfig, loss_type=["ipo"], beta=0.4, f_divergence_type="js_divergence")
    lp, ref, mask, _ = _dpo_batch()
    a, _ = P.DPOLoss(args)(lp, mask, ref)
    b, _ = P.DPOLoss(dict(loss_type=["ipo"], beta=0.4, f_divergence_type="js_divergence", learning_rate=1e-6))(
        lp, mask, ref)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        P.DPOLoss(dict(betta=0.2))
    # TRL 1.16 has no rpo_alpha / reference_free: RPO is loss_type=["sigmoid", "sft"] with loss_weights
    for gone in ("rpo_alpha", "reference_free"):
        with pytest.raises(ValueError, match=f"no field '{gone}'"):
            P.DPOLoss({gone: 0.5})


@pytest.mark.parametrize("cfg", [dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1], use_weighting=True,
                                     ld_alpha=0.5),
                                dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], ld_alpha=0.3),
                                dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence")],
                         ids=["wpo+ld", "rpo+ld", "js"])
def test_dpo_linear_loss_matches_trl_on_hidden_states(cfg):
    """dpo_linear_loss (hidden states x LM head, float32 kernels) against DPOTrainer on the float64
    log-probs of the same logits: float32 accumulation, so 2e-5 here instead of 1e-6."""
    _dpo_linear_vs_trl(cfg)


def test_dpo_linear_loss_wpo_weights_above_one_match_trl():
    """Labels that are the likeliest tokens (p_t > sum_j p_j^2): WPO weights above 1, uncapped as TRL's."""
    lssp, lp, mask = _dpo_linear_vs_trl(dict(loss_type="sigmoid", use_weighting=True), likeliest=True)
    wpo = ((lp - lssp) * mask).sum(1) / mask.sum(1)
    assert (wpo[:2] + wpo[2:]).exp().max() > 1.5


def _dpo_linear_vs_trl(cfg, likeliest=False):
    """Compare; ``likeliest``: the labels are the argmax tokens of the policy's logits. Returns TRL's
    ``(log sum_j p_j^2, log p_t, mask)``."""
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 5, 8, 11
    args = _config(DPOConfig, **cfg)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    if likeliest:
        labels = (hidden @ weight.T).argmax(-1)
    labels[1, 3:] = -100
    labels[B + 1, 1:] = -100
    mask = (labels != -100).to(D)
    ref_hidden = hidden + 0.1 * torch.randn(2 * B, T, H, generator=g)

    def token_logps(h, w):
        logp = torch.log_softmax(h.to(D) @ w.to(D).T, -1)
        return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.logsumexp(2 * logp, -1)

    w_t = weight.clone().requires_grad_()
    lp, lssp = token_logps(hidden, w_t)
    ref_lp, _ = token_logps(ref_hidden, weight)
    loss_t, m_t = _trl_dpo(args, lp, ref_lp, mask, lssp.detach())
    (g_t,) = torch.autograd.grad(loss_t, w_t)

    w_f = weight.clone().requires_grad_()
    loss_f, m_f = P.dpo_linear_loss(args)(hidden, w_f, labels, ref_hidden=ref_hidden)
    (g_f,) = torch.autograd.grad(loss_f, w_f)
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss_f.to(D), loss_t, **tol)
    torch.testing.assert_close(g_f.to(D), g_t.to(D), **tol)
    for k in DPO_METRICS:
        torch.testing.assert_close(m_f[k].to(D), torch.as_tensor(m_t[k], dtype=D), **tol, msg=k)
    return lssp.detach(), lp.detach(), mask


# ------------------------------------------------------------------------------------------ TPO

def _run_tpo(cfg_kw, seed=0, empty=()):
    """TRL's ``TPOTrainer._compute_loss`` on a stand-in (its model returns the logits) against
    :class:`TPOLoss` on the same log-probs: loss, gradient w.r.t. the logits, metrics (NaN where TRL's is)."""
    from trl.experimental.tpo import TPOConfig, TPOTrainer
    args = _config(TPOConfig, **cfg_kw)
    branches = 3 if args.tpo_alpha != 0.0 else 2
    _, logits, ids, attention, completion = _paired_token_batch(seed=seed, empty=empty, branches=branches)
    a = logits.clone().requires_grad_()
    trainer = _stand_in(TPOTrainer, ["_compute_loss"], model=_LogitsModel(a),
                        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                        beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                        tpo_alpha=args.tpo_alpha, tpo_l_gamma=args.tpo_l_gamma)
    trainer.model.training = True
    loss_t = trainer._compute_loss(trainer.model, dict(input_ids=ids, attention_mask=attention,
                                                       completion_mask=completion.long()), False)
    (g_t,) = torch.autograd.grad(loss_t, a)
    m_t = {k: v[0] for k, v in trainer._metrics["train"].items() if k in DPO_METRICS}

    b = logits.clone().requires_grad_()
    loss_f, m_f = P.TPOLoss(args)(_token_logps(b, ids), completion[:, 1:].to(D))
    (g_f,) = torch.autograd.grad(loss_f, b)
    _close_nan(loss_f, loss_t, "loss")
    _close_nan(g_f, g_t, "d loss / d logits")
    assert set(m_f) == set(m_t) == set(DPO_METRICS)
    for k in DPO_METRICS:
        _close_nan(m_f[k], m_t[k], k)
    return loss_f, g_f


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "tpo-l"])
@pytest.mark.parametrize("tpo_alpha", [1.0, 0.3, 0.0])
def test_tpo_each_loss_type_and_gold_nll_weight(loss_type, tpo_alpha):
    """Every TPO loss type, with the gold rows' NLL at TRL's default weight, another, and none (TRL's batch then
    holds no gold rows)."""
    gamma = dict(tpo_l_gamma=0.7) if loss_type == "tpo-l" else {}  # read there only
    _run_tpo(dict(loss_type=loss_type, beta=0.4, tpo_alpha=tpo_alpha, **gamma))


@pytest.mark.parametrize("loss_type", ["sigmoid", "tpo-l"])
def test_tpo_label_smoothing(loss_type):
    _run_tpo(dict(loss_type=loss_type, beta=0.6, label_smoothing=0.15), seed=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "tpo-l"])
def test_tpo_rows_with_no_completion_token_as_trl(loss_type):
    """An empty chosen or rejected row averages over max(|y|, 1) in TRL's TPO (a log-prob of 0, finite, unlike
    CPO's NaN); a batch whose gold rows hold no completion token gives TRL's NaN NLL and loss, while the
    gradient stays finite (the NLL reaches no token)."""
    loss, grad = _run_tpo(dict(loss_type=loss_type, beta=0.3), seed=2, empty=(1, 3))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad = _run_tpo(dict(loss_type=loss_type, beta=0.3), seed=3, empty=(6, 7, 8))
    assert torch.isnan(loss) and torch.isfinite(grad).all()


def test_tpo_refuses_what_trl_ignores_and_bad_options():
    from trl.experimental.tpo import TPOConfig
    for loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            P.TPOLoss(_config(TPOConfig, loss_type=loss_type, label_smoothing=0.1))
    with pytest.raises(ValueError, match="did you mean 'tpo-l'"):
        P.tpo_options({"loss_type": "tpol"})
    with pytest.raises(TypeError, match="TPOConfig.tpo_alpha"):
        P.tpo_options({"tpo_alpha": "1"})
    with pytest.raises(ValueError, match="TPOConfig.beta"):
        P.tpo_options({"beta": 0.0})
    with pytest.raises(ValueError, match="TPOConfig has no field 'tpo_gamma'"):
        P.tpo_options({"tpo_gamma": 0.5})
    with pytest.raises(ValueError, match="a multiple of 3"):
        P.TPOLoss()(torch.zeros(4, 3), torch.ones(4, 3))
    assert P.tpo_options({"tpo_alpha": 0})["rpo_alpha"] is None


# ------------------------------------------------------------------------------------------ CPO / ORPO

def _stand_in(trainer_cls, methods, **attrs):
    """An object with ``attrs`` and the trainer's own ``methods`` (static ones stay static)."""
    import inspect
    import types
    obj = SimpleNamespace(accelerator=LocalAccelerator(), aux_loss_enabled=False, is_encoder_decoder=False, **attrs)
    for name in methods:
        raw = inspect.getattr_static(trainer_cls, name)
        f = getattr(trainer_cls, name)
        setattr(obj, name, f if isinstance(raw, staticmethod) else types.MethodType(f, obj))
    return obj


class _LogitsModel:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *args, **kwargs):
        return SimpleNamespace(logits=self.logits)


def _paired_token_batch(B=3, P=2, C=6, V=7, seed=0, empty=(), branches=2):
    """Chosen / rejected rows (``branches=3``: then gold rows) sharing a prompt of P tokens, completions up to C
    tokens (right padding); the rows in ``empty`` have no completion token (a prompt that fills max_length)."""
    g = torch.Generator().manual_seed(seed)
    L = P + C
    ids = torch.randint(1, V, (branches * B, L), generator=g)
    lengths = torch.randint(1, C + 1, (branches * B,), generator=g)
    lengths[0] = C
    lengths[list(empty)] = 0
    pos = torch.arange(L).unsqueeze(0)
    attention = (pos < (P + lengths).unsqueeze(1)).long()
    completion = attention.bool() & (pos >= P)
    labels = torch.where(completion, ids, torch.full_like(ids, -100))
    ids = torch.where(attention.bool(), ids, torch.zeros_like(ids))
    logits = torch.randn(branches * B, L, V, generator=g, dtype=D) * 1.5
    batch = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch[f"{side}_input_ids"] = ids[rows]
        batch[f"{side}_attention_mask"] = attention[rows]
        batch[f"{side}_labels"] = labels[rows]
    return batch, logits, ids, attention, completion


def _token_logps(logits, ids):
    """Shifted per-token log-probs of ``ids[:, 1:]`` (what a causal LM head gives)."""
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


CPO_METRICS = DPO_METRICS + ("nll_loss",)


def _close_nan(a, b, what):
    """``_close`` where a NaN must sit where the other side has one."""
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    torch.testing.assert_close(a, b, **TOL, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _close_nan_rows(got, trl_grad, what, nll_rows=None):
    """Gradients ``[rows, T, V]`` with NaN rows: the same rows hold a NaN, and the entries finite on both sides
    agree. (TRL's masked products also put NaN on the masked positions of an empty pair's other row, which no
    scored token reads.) ``nll_rows``: rows that a NaN ORPO loss also reaches through the NLL (fastalign's
    rule: a NaN loss never has a finite gradient); without them every NaN here is one in TRL's."""
    nan_g, nan_t = torch.isnan(got), torch.isnan(trl_grad)
    want = nan_t.flatten(1).any(1)
    if nll_rows is None:
        assert not (nan_g & ~nan_t).any(), what
    else:
        want = want | nll_rows
    assert torch.equal(nan_g.flatten(1).any(1), want), what
    both = ~nan_g & ~nan_t
    _close(got[both], trl_grad[both], what)


def _run_cpo(cfg_kw, seed=0, empty=()):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    args = _config(CPOConfig, **cfg_kw)
    batch, logits, ids, attention, completion = _paired_token_batch(seed=seed, empty=empty)
    a = logits.clone().requires_grad_()
    trainer = _stand_in(CPOTrainer, ["concatenated_inputs", "concatenated_forward", "get_batch_logps", "cpo_loss",
                                     "get_batch_loss_metrics"],
                        pad_token_id=0, beta=args.beta, label_smoothing=args.label_smoothing,
                        loss_type=args.loss_type, cpo_alpha=args.cpo_alpha, simpo_gamma=args.simpo_gamma,
                        alpha=args.alpha)
    loss_t, m_t = trainer.get_batch_loss_metrics(_LogitsModel(a), batch)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = logits.clone().requires_grad_()
    loss_f, m_f = P.CPOLoss(args)(_token_logps(b, ids), completion[:, 1:].to(D))
    (g_f,) = torch.autograd.grad(loss_f, b)
    close = _close_nan if empty else _close
    close(loss_f, loss_t, "loss")
    (_close_nan_rows if empty else _close)(g_f, g_t, "d loss / d logits")
    for k in CPO_METRICS:
        close(m_f[k], m_t[k], k)
    assert set(m_f) == set(CPO_METRICS)
    return loss_f, g_f


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_cpo_tied_pair_is_not_counted_accurate(loss_type):
    """A pair whose chosen and rejected completions are both empty has equal rewards (0): TRL's
    ``rewards/accuracies`` counts ``chosen > rejected`` strictly, so the tie is not accurate."""
    _run_cpo(dict(loss_type=loss_type, beta=0.2), empty=(1, 4))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, -0.2])
def test_cpo_each_loss_type_and_alphapo_reward(loss_type, alpha):
    _run_cpo(dict(loss_type=loss_type, alpha=alpha, beta=0.2))


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_label_smoothing_gamma_and_bc_weight(loss_type):
    gamma = dict(simpo_gamma=0.8) if loss_type == "simpo" else {}  # read there only
    _run_cpo(dict(loss_type=loss_type, label_smoothing=0.1, cpo_alpha=0.3, beta=0.5, **gamma))
    _run_cpo(dict(loss_type=loss_type, cpo_alpha=0.0), seed=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "alphapo"])
def test_cpo_row_with_no_completion_token_as_trl(loss_type):
    """A chosen row with no completion token (its prompt fills max_length): the length-averaged losses give
    TRL's NaN loss and metrics, and a NaN gradient on that pair's rows only (never a finite step on a NaN
    loss); sigmoid sums the empty row to 0, finite, as TRL."""
    loss, grad = _run_cpo(dict(loss_type=loss_type, beta=0.3, cpo_alpha=0.5), seed=2, empty=(1,))
    averaged = loss_type != "sigmoid"
    assert bool(torch.isnan(loss)) == averaged
    rows = torch.isnan(grad).flatten(1).any(1)
    assert rows.tolist() == ([False, True, False, False, True, False] if averaged else [False] * 6)


def test_cpo_refuses_what_trl_ignores():
    from trl.experimental.cpo import CPOConfig
    with pytest.raises(ValueError, match="label_smoothing"):
        P.CPOLoss(_config(CPOConfig, loss_type="hinge", label_smoothing=0.1))


ORPO_METRICS = DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@pytest.mark.parametrize("beta, empty", [(0.1, ()), (0.7, ()), (0.4, (4,)), (0.4, (1, 4))],
                         ids=["0.1", "0.7", "empty-rejected", "empty-pair"])
def test_orpo(beta, empty):
    """Loss, gradient and metrics equal TRL's; a row with no completion token gives TRL's NaN loss and
    metrics with a NaN gradient on that pair's rows, never a NaN loss with a finite gradient."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = _config(ORPOConfig, beta=beta)
    batch, logits, ids, attention, completion = _paired_token_batch(seed=int(beta * 10), empty=empty)
    a = logits.clone().requires_grad_()
    trainer = _stand_in(ORPOTrainer, ["concatenated_inputs", "concatenated_forward", "get_batch_logps",
                                      "odds_ratio_loss", "get_batch_loss_metrics"], padding_value=0, beta=args.beta)
    loss_t, m_t = trainer.get_batch_loss_metrics(_LogitsModel(a), batch)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = logits.clone().requires_grad_()
    loss_f, m_f = P.ORPOLoss(args)(_token_logps(b, ids), completion[:, 1:].to(D), attention[:, 1:].to(D))
    (g_f,) = torch.autograd.grad(loss_f, b)
    # ORPOTrainer casts the log-probs to float32 for the odds ratio
    close = _close_nan if empty else _close
    close(loss_f, loss_t, "loss")
    if empty:  # the NaN also reaches every chosen row through the NLL
        _close_nan_rows(g_f, g_t, "d loss / d logits", nll_rows=torch.arange(6) < 3)
    else:
        _close(g_f, g_t, "d loss / d logits")
    for k in ORPO_METRICS:
        close(m_f[k], m_t[k], k)
    assert set(m_f) == set(ORPO_METRICS)
    assert bool(torch.isnan(loss_f)) == bool(empty)


# ------------------------------------------------------------------------------------------ KTO

class _UnpairedHead:
    """Stand-in model for KTO: the completions' and the KL completions' fused-head outputs."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # no submodules (read by TRL's is_peft_model check when peft is installed)

    def __init__(self, ids, lp, mask, kl_ids, kl_lp, kl_mask):
        self.ids, self.kl_ids = ids, kl_ids
        zero = torch.zeros_like(mask, dtype=lp.dtype)
        self.out = SimpleNamespace(log_probs=lp * mask, entropy=zero, mean_logits=zero)
        self.kl_out = SimpleNamespace(log_probs=kl_lp * kl_mask)

    def __call__(self, *args, input_ids=None, **kwargs):
        return self.kl_out if input_ids is self.kl_ids else self.out


KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _kto_batch(labels, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = len(labels)

    def rows():
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
        lp = -torch.rand(N, T, generator=g, dtype=D) * 1.5 - 0.05
        return lp, mask

    lp, mask = rows()
    ref = lp + 0.3 * torch.randn(N, T, generator=g, dtype=D)
    kl_lp, kl_mask = rows()
    kl_ref = kl_lp + 0.3 * torch.randn(N, T, generator=g, dtype=D) + 0.1
    return lp, ref, mask, kl_lp, kl_ref, kl_mask


def _trl_kto(args, labels, lp, ref, mask, kl_lp, kl_ref, kl_mask):
    N, T = mask.shape
    col = torch.zeros(N, 1, dtype=torch.long)
    ids, kl_ids = torch.zeros(N, T + 1, dtype=torch.long), torch.ones(N, T + 1, dtype=torch.long)
    model = _UnpairedHead(ids, lp, mask, kl_ids, kl_lp, kl_mask)
    ref_model = _UnpairedHead(ids, ref, mask, kl_ids, kl_ref, kl_mask)
    trainer = _stand_in(KTOTrainer, ["_compute_kl_logps"], model=model, ref_model=ref_model, args=args,
                        precompute_ref_logps=False, loss_type=args.loss_type, beta=args.beta,
                        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                        calculate_KL=args.loss_type != "apo_zero_unpaired",
                        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                        _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(N, T + 1),
              "completion_mask": torch.cat([col, mask.long()], 1),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(N, T + 1),
              "KL_completion_mask": torch.cat([col, kl_mask.long()], 1), "label": torch.tensor(labels)}
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labels", [[True, False, False, True, False, True, False, False],  # 3 : 5
                                    [True, False, True, False],
                                    [True, True, True],
                                    [False, False, False, False, False, True]],
                         ids=["3:5", "2:2", "3:0", "1:5"])
def test_kto_unpaired_unbalanced(loss_type, labels):
    args = _config(KTOConfig, loss_type=loss_type, beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)
    lp, ref, mask, kl_lp, kl_ref, kl_mask = _kto_batch(labels, seed=len(labels))
    a = lp.clone().requires_grad_()
    loss_t, m_t = _trl_kto(args, labels, a, ref, mask, kl_lp, kl_ref, kl_mask)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = lp.clone().requires_grad_()
    kw = {}
    if loss_type == "kto":
        kw = dict(kl_logps=(kl_lp * kl_mask).sum(-1), ref_kl_logps=(kl_ref * kl_mask).sum(-1))
    loss_f, m_f = P.KTOLoss(args)(b, mask, torch.tensor(labels), (ref * mask).sum(-1), **kw)
    (g_f,) = torch.autograd.grad(loss_f, b)
    _close(loss_f, loss_t, "loss")
    _close(g_f, g_t, "d loss / d per-token log-probs")
    assert set(m_f) == set(KTO_METRICS)
    logged = [k for k in KTO_METRICS if k in m_t]
    _compare_metrics(m_f, m_t, logged)
    for k in set(KTO_METRICS) - set(logged):  # TRL logs nothing for an absent class: NaN here
        assert torch.isnan(m_f[k]), k
    as_list, _ = P.KTOLoss(args)(lp, mask, [int(x) for x in labels], (ref * mask).sum(-1), **kw)
    _close(as_list, loss_t, "loss with 0/1 labels in a list")
    with pytest.raises(TypeError, match="label"):
        P.KTOLoss(args)(lp, mask, torch.tensor(labels, dtype=D), (ref * mask).sum(-1), **kw)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_response_with_a_nan_logprob_as_trl(loss_type):
    """TRL averages the per-response losses with ``nanmean`` and sums its rewards / logps metrics with ``nansum``
    over the class count: a response with a NaN log-prob drops out of the loss's value (its gradient is NaN in
    both). The profile gave a NaN loss and NaN metrics for its class."""
    labels = [True, False, False, True, False, True]
    args = _config(KTOConfig, loss_type=loss_type, beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)
    lp, ref, mask, kl_lp, kl_ref, kl_mask = _kto_batch(labels, seed=len(labels))
    lp[2, 0] = float("nan")  # an undesirable response
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    loss_t, m_t = _trl_kto(args, labels, a, ref, mask, kl_lp, kl_ref, kl_mask)
    kw = {}
    if loss_type == "kto":
        kw = dict(kl_logps=(kl_lp * kl_mask).sum(-1), ref_kl_logps=(kl_ref * kl_mask).sum(-1))
    loss_f, m_f = P.KTOLoss(args)(b, mask, torch.tensor(labels), (ref * mask).sum(-1), **kw)
    assert torch.isfinite(loss_t) and all(math.isfinite(float(v)) for v in m_t.values())
    _close(loss_f, loss_t, "loss")
    _compare_metrics(m_f, m_t, [k for k in KTO_METRICS if k in m_t])
    (g_t,) = torch.autograd.grad(loss_t, a)
    (g_f,) = torch.autograd.grad(loss_f, b)
    scored = mask.bool()  # TRL's masked sum also gives the row's padding NaN (NaN * 0), the masked one 0
    assert torch.equal(g_f.isnan() & scored, g_t.isnan() & scored) and g_f[2][scored[2]].isnan().all()
    _close(g_f.nan_to_num() * mask, g_t.nan_to_num() * mask, "d loss / d per-token log-probs")


@pytest.mark.parametrize("make, config, field", [
    (P.dpo_options, dict(loss_type=["sigmoid"], discopop_tau=0.3), "DPOConfig.discopop_tau=0.3"),
    (P.dpo_options, dict(loss_type=["ipo", "hinge"], f_alpha_divergence_coef=0.3),
     "DPOConfig.f_alpha_divergence_coef=0.3"),
    (P.dpo_options, dict(loss_type=["sigmoid"], f_divergence_type="forward_kl", f_alpha_divergence_coef=0.9),
     "DPOConfig.f_alpha_divergence_coef=0.9"),
    (P.cpo_options, dict(loss_type="sigmoid", simpo_gamma=0.9), "CPOConfig.simpo_gamma=0.9"),
    (P.cpo_options, dict(loss_type="hinge", simpo_gamma=0.0), "CPOConfig.simpo_gamma=0.0"),
    (P.tpo_options, dict(loss_type="sigmoid", tpo_l_gamma=0.9), "TPOConfig.tpo_l_gamma=0.9"),
])
def test_profiles_refuse_a_field_the_loss_type_does_not_read(make, config, field):
    """TRL 1.16 drops these fields without a word where the loss type (or the f-divergence) does not read them;
    the profiles raise naming the field, as for an unread ``label_smoothing``. At their defaults they pass."""
    with pytest.raises(ValueError, match=re.escape(field) + " does not apply to"):
        make(config)
    name = field.split("=")[0].split(".")[-1]
    make({**config, name: {**P.DPO_DEFAULTS, **P.CPO_DEFAULTS, **P.TPO_DEFAULTS}[name]})


@pytest.mark.parametrize("fdiv", [dict(f_divergence_type="forward_kl"),
                                  dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)])
def test_dpo_sft_alone_takes_any_f_divergence_as_trl(fdiv):
    """TRL 1.16 lists sft among the loss types that take an f-divergence; alone it reads no preference score, so
    the profile gives the reverse-KL loss whatever the divergence (TRL's numbers)."""
    _run_dpo(dict(loss_type=["sft"], **fdiv))


@pytest.mark.parametrize("arg, bad, error", [
    ("label", "yes", TypeError),  # torch.as_tensor's "new(): invalid data type 'str'", naming nothing
    ("label", ["yes", "no", "yes", "no"], TypeError),
    ("label", [[1, 0], [1], [0], [1]], TypeError),
    ("label", torch.tensor([True, False, True, False]).to("meta"), ValueError),
    ("label", torch.tensor([True, False, True, False]).to_sparse(), TypeError),
    ("ref_logps", None, TypeError),  # taken as a zero reference
])
def test_kto_bad_argument_is_named(arg, bad, error):
    lp = torch.full((4, 3), -1.0)
    kw = dict(per_token_logps=lp, completion_mask=torch.ones(4, 3), label=torch.tensor([True, False, True, False]),
              ref_logps=torch.full((4,), -3.0), kl_logps=torch.full((4,), -3.0), ref_kl_logps=torch.full((4,), -3.0))
    kw[arg] = bad
    with pytest.raises(error, match=f"^{arg} "):
        P.KTOLoss({"beta": 0.1})(*kw.values())


def test_options_feed_preference_loss_directly():
    """dpo_options / cpo_options / orpo_options are plain preference_loss keyword sets."""
    from fastalign import preference_loss
    lc, lr = torch.tensor([-3.0, -4.0], dtype=D), torch.tensor([-5.0, -4.5], dtype=D)
    n = torch.tensor([3.0, 4.0], dtype=D)
    for opts in (P.dpo_options({"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5, "use_weighting": True}),
                 P.cpo_options({"loss_type": "sigmoid", "alpha": 0.2}), P.orpo_options({"beta": 0.2})):
        loss, _ = preference_loss(lc, lr, chosen_lengths=n, rejected_lengths=n, **opts)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("seed", range(12))
def test_dpo_random_option_mixes(seed):
    """Random DPOConfig mixes (loss lists, weights, smoothing, f-divergences, LD-DPO, WPO) that
    DPOTrainer 1.16 runs, each against DPOTrainer."""
    import random
    rng = random.Random(seed)
    f_types = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
    fdiv = rng.choice(["reverse_kl", "forward_kl", "js_divergence"])
    pool = f_types if fdiv != "reverse_kl" else DPO_TYPES
    types = rng.sample(pool, rng.randint(1, 3))
    use_weighting = rng.random() < 0.4 and not {"sft", "hinge", "aot", "aot_unpaired"} & set(types)
    kw = dict(loss_type=types, loss_weights=[round(rng.uniform(0.1, 1.5), 3) for _ in types],
              beta=round(rng.uniform(0.05, 0.6), 3), f_divergence_type=fdiv, use_weighting=use_weighting,
              ld_alpha=rng.choice([None, 0.3, 0.8]))
    if "discopop" in types:
        kw["discopop_tau"] = rng.choice([0.05, 0.3])
    if set(types) & set(P.DPO_SMOOTHED):
        kw["label_smoothing"] = rng.choice([0.0, 0.05, 0.2]) if "exo_pair" not in types else 0.05
    _run_dpo(kw, seed=seed)


def test_online_profiles_refuse_misspelt_dict_keys():
    """The GRPO and RLOO profiles read a dict's known keys only: a misspelt key left its field at TRL's default
    (``epsilon_hgh`` gave eps_high 0.2, ``betta`` no KL term). They raise naming it, as the DPO profile does; the
    config classes' other fields are still accepted."""
    from fastalign.integrations import trl as T
    rewards = torch.rand(4, 1)
    cases = [
        (lambda: T.GRPOLoss({"loss_type": "grpo", "epsilon_hgh": 0.28}), "GRPOConfig has no field 'epsilon_hgh'",
         "epsilon_high"),
        (lambda: T.grpo_policy_config({"betta": 0.04}), "GRPOConfig has no field 'betta'", "beta"),
        (lambda: T.grpo_advantages({"num_generations": 2, "scale_reward": "none"}, rewards),
         "GRPOConfig has no field 'scale_reward'", "scale_rewards"),
        (lambda: T.RLOOLoss({"epsilon_hgh": 0.3}), "RLOOConfig has no field 'epsilon_hgh'", "epsilon_high"),
        (lambda: T.rloo_advantages({"num_generations": 2, "normalise_advantages": True}, rewards),
         "RLOOConfig has no field 'normalise_advantages'", "normalize_advantages"),
    ]
    for fn, message, meant in cases:
        with pytest.raises(ValueError, match=f"{message}; did you mean '{meant}'"):
            fn()
    T.grpo_policy_config({"loss_type": "grpo", "beta": 0.04, "learning_rate": 1e-6})
    T.rloo_advantages({"num_generations": 2, "beta": 0.0, "logging_steps": 5}, rewards)


@pytest.mark.parametrize("make, config, error, field", [
    (P.dpo_linear_loss, {"use_weighting": "false"}, TypeError, "DPOConfig.use_weighting"),
    (P.DPOLoss, {"use_weighting": 1}, TypeError, "DPOConfig.use_weighting"),
    (P.DPOLoss, {"beta": "0.1"}, TypeError, "DPOConfig.beta"),
    (P.dpo_options, {"ld_alpha": "0.5"}, TypeError, "DPOConfig.ld_alpha"),
    (P.dpo_preference_loss, {"loss_type": ["robust"], "label_smoothing": float("nan")}, ValueError,
     "DPOConfig.label_smoothing"),
    (P.dpo_options, {"loss_type": ["discopop"], "discopop_tau": "0.05"}, TypeError, "DPOConfig.discopop_tau"),
    (P.dpo_options, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": True}, TypeError,
     "DPOConfig.f_alpha_divergence_coef"),
    (P.CPOLoss, {"cpo_alpha": "1.0"}, TypeError, "CPOConfig.cpo_alpha"),
    (P.cpo_options, {"loss_type": "simpo", "simpo_gamma": "0.5"}, TypeError, "CPOConfig.simpo_gamma"),
    (P.cpo_options, {"alpha": float("inf")}, ValueError, "CPOConfig.alpha"),
    (P.ORPOLoss, {"beta": "0.1"}, TypeError, "ORPOConfig.beta"),
    (P.KTOLoss, {"desirable_weight": "2"}, TypeError, "KTOConfig.desirable_weight"),
    (P.kto_options, {"beta": True}, TypeError, "KTOConfig.beta"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_profiles_check_dict_values_naming_the_field(make, config, error, field):
    """A dict config's values are checked, not coerced: the string "false" (text read from YAML or a command
    line) no longer turns WPO on through bool(), nor "0.1" passes for beta through float(); a bool, NaN or inf
    for a number raises too. Each error names the config field."""
    with pytest.raises(error, match=field):
        make(config)


def test_profiles_take_number_and_switch_types_as_trl_does():
    """Integers, numpy scalars and numpy bools are real numbers and switches: the options equal the float and
    bool ones (TRL's configs hold whatever the user passed). None in a field the loss type does not read is its
    default (discopop_tau without discopop, simpo_gamma without simpo)."""
    import numpy as np
    plain = P.dpo_options({"loss_type": ["sigmoid"], "beta": 1.0})
    assert P.dpo_options({"loss_type": ["sigmoid"], "beta": np.float32(1.0)}) == plain
    assert P.dpo_options({"loss_type": ["sigmoid"], "beta": 1}) == plain
    assert P.DPOLoss({"use_weighting": np.bool_(True)}).use_weighting is True
    assert P.dpo_options({"loss_type": ["sigmoid"], "discopop_tau": None}) == P.dpo_options({"loss_type": ["sigmoid"]})
    assert P.cpo_options({"loss_type": "sigmoid", "simpo_gamma": None}) == P.cpo_options({"loss_type": "sigmoid"})
    assert P.kto_options({"desirable_weight": 2})["desirable_weight"] == 2.0
