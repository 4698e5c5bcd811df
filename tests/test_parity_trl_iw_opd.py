"""IW-OPD: :func:`fastalign.iw_opd_advantages` against the float64 plain-PyTorch reference, and
:class:`fastalign.integrations.trl.IWOPDLoss` against TRL 1.16's own ``IWOPDTrainer._compute_iw_opd_loss`` (called
unbound on a stand-in carrying the attributes it reads): loss, gradient w.r.t. the student's logits and metrics at
1e-6 in float64, with masks, a cached rollout, ``num_items_in_batch`` and a batch with no completion token."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fastalign
from fastalign.reference import advantages as R
from helpers import LocalAccelerator

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


def _batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0  # a short completion
    mask[2, 0] = 0  # a masked token inside a row
    teacher = -torch.rand(B, T, generator=g, dtype=D) * 3
    rollout = -torch.rand(B, T, generator=g, dtype=D) * 3
    teacher[1, 5] = float("-inf")  # not scored: never read
    rollout[2, 0] = float("nan")
    return teacher, rollout, mask


@pytest.mark.parametrize("gamma, eps", [(0.5, 1e-8), (2.0, 1e-8), (-0.3, 0.5), (0.0, 1e-8)])
def test_iw_opd_advantages_match_float64(gamma, eps):
    teacher, rollout, mask = _batch()
    want = R.iw_opd_advantages(teacher, rollout, mask, gamma, eps)
    got = fastalign.iw_opd_advantages(teacher, rollout, mask, gamma=gamma, eps=eps)
    assert got.dtype == D and not got.requires_grad
    torch.testing.assert_close(got, want, **TOL)
    got32 = fastalign.iw_opd_advantages(teacher.float(), rollout.float(), mask, gamma=gamma, eps=eps)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, atol=1e-5, rtol=1e-5)


def test_iw_opd_advantages_weigh_early_tokens_more():
    """Equal discrepancies: the weights fall from 1 + gamma at the first token to 1 + gamma / T at the last; a row
    without discrepancy has advantages 0 (eps keeps the weights finite)."""
    teacher = torch.zeros(2, 4, dtype=D)
    teacher[0] = -1.0
    rollout = torch.zeros(2, 4, dtype=D)
    got = fastalign.iw_opd_advantages(teacher, rollout, torch.ones(2, 4), gamma=1.0)
    torch.testing.assert_close(got[0], -torch.tensor([2.0, 1.75, 1.5, 1.25], dtype=D), **TOL)
    assert torch.equal(got[1], torch.zeros(4, dtype=D))


def test_iw_opd_advantages_bad_inputs():
    teacher, rollout, mask = _batch()
    with pytest.raises(ValueError, match="eps"):
        fastalign.iw_opd_advantages(teacher, rollout, mask, eps=0.0)
    with pytest.raises(ValueError, match="gamma"):
        fastalign.iw_opd_advantages(teacher, rollout, mask, gamma=float("nan"))
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastalign.iw_opd_advantages(teacher, rollout[:, :3], mask)
    with pytest.raises(TypeError, match="teacher_logprobs"):
        fastalign.iw_opd_advantages(teacher.long(), rollout, mask)


# ------------------------------------------------------------------------------------------ TRL's IW-OPD loss

trl_iw_opd = pytest.importorskip("trl.experimental.iw_opd", reason="TRL 1.16 is not installed")

from fastalign.integrations.trl import IWOPDLoss  # noqa: E402

METRICS = ("iw_opd/mean_advantage", "iw_opd/mean_abs_advantage", "iw_opd/mean_weight", "iw_opd/min_weight",
           "iw_opd/max_weight")


def _run(config, rollout=True, num_items=None, empty=False, seed=0, V=11):
    args = trl_iw_opd.IWOPDConfig(output_dir="/tmp/fastalign-iw-opd", report_to=[], use_cpu=True, **config)
    teacher_lp, rollout_lp, mask = _batch(seed=seed)
    if empty:
        mask = torch.zeros_like(mask)
    B, T = mask.shape
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(B, T, V, generator=g, dtype=D) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = tokens.masked_fill(mask == 0, -100)
    cached = rollout_lp if rollout else None

    a = logits.clone().requires_grad_()
    trainer = SimpleNamespace(accelerator=LocalAccelerator(), temperature=args.temperature,
                              iw_opd_gamma=args.iw_opd_gamma, iw_opd_epsilon=args.iw_opd_epsilon,
                              model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)))
    loss_t = trl_iw_opd.IWOPDTrainer._compute_iw_opd_loss(trainer, a, tokens, labels, teacher_lp, cached,
                                                          num_items_in_batch=num_items)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = logits.clone().requires_grad_()
    lp = torch.log_softmax(b / args.temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss_f, m_f = IWOPDLoss(args)(lp, teacher_lp, mask, cached, num_items_in_batch=num_items)
    (g_f,) = torch.autograd.grad(loss_f, b)
    torch.testing.assert_close(loss_f.double(), loss_t, **TOL)
    torch.testing.assert_close(g_f, g_t, **TOL)
    logged = trainer._metrics["train"]
    assert set(m_f) == set(METRICS)
    for k in METRICS:
        if empty:
            assert torch.isnan(m_f[k]) and k not in logged, k
        else:
            torch.testing.assert_close(m_f[k].double(), torch.tensor(logged[k][0], dtype=D), **TOL, msg=k)
    return loss_f, g_f


@pytest.mark.parametrize("rollout", [True, False], ids=["cached-rollout", "on-policy"])
@pytest.mark.parametrize("config", [{}, dict(iw_opd_gamma=1.5, temperature=0.7), dict(iw_opd_epsilon=10.0)],
                         ids=["defaults", "gamma-temperature", "large-eps"])
def test_iw_opd_loss_matches_trl(config, rollout):
    _run(config, rollout)


@pytest.mark.parametrize("num_items", [5, torch.tensor(23.0)], ids=["int", "tensor"])
def test_iw_opd_loss_divides_by_num_items_in_batch_as_trl(num_items):
    _run(dict(iw_opd_gamma=0.8), num_items=num_items, seed=1)


def test_iw_opd_loss_without_completion_tokens_as_trl():
    """No valid token: loss 0 (TRL divides the zero sum by max(count, 1)), no gradient, and no metric (NaN here,
    where TRL logs nothing)."""
    loss, grad = _run({}, empty=True)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_iw_opd_loss_refuses_what_it_is_not():
    with pytest.raises(ValueError, match="distillation_objective='jsd'"):
        IWOPDLoss({"distillation_objective": "jsd"})
    with pytest.raises(TypeError, match="IWOPDConfig.iw_opd_gamma"):
        IWOPDLoss({"iw_opd_gamma": "0.5"})
    with pytest.raises(ValueError, match="IWOPDConfig.iw_opd_epsilon"):
        IWOPDLoss({"iw_opd_epsilon": 0.0})
    with pytest.raises(ValueError, match="IWOPDConfig has no field 'iw_opd_gama'"):
        IWOPDLoss({"iw_opd_gama": 0.5})
    teacher, rollout, mask = _batch()
    teacher[0, 2] = float("-inf")  # a scored token the teacher server left out
    with pytest.raises(ValueError, match="teacher_logprobs are missing"):
        IWOPDLoss()(rollout.clone().requires_grad_(), teacher, mask)


def test_iw_opd_from_hidden_states_is_linear_policy_loss_with_its_advantages():
    """The module doc's path without the logits: LinearPolicyLoss(loss_type="reinforce") with the IW-OPD advantages
    of the log-probs at the temperature gives IWOPDLoss's loss and gradients (fp32 hidden states and head)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V, temp = 2, 6, 8, 13, 0.8
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    teacher = -torch.rand(B, T, generator=g) * 3
    n = torch.tensor(9.0)

    lp = fastalign.linear_logprobs(hidden, weight, labels.masked_fill(mask == 0, -100), temperature=temp).logprobs
    want = IWOPDLoss({"iw_opd_gamma": 0.7})(lp, teacher, mask, num_items_in_batch=n)[0]
    want_grads = torch.autograd.grad(want, (hidden, weight))
    advantages = fastalign.iw_opd_advantages(teacher, lp.detach(), mask, gamma=0.7)
    loss = fastalign.LinearPolicyLoss(loss_type="reinforce", agg="token-mean", temperature=temp)(
        hidden, weight, labels, lp.detach(), advantages, mask, global_tokens=n)[0]
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for got, ref in zip(torch.autograd.grad(loss, (hidden, weight)), want_grads):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ trainer

@pytest.fixture(scope="module")
def iw_opd_models(tmp_path_factory):
    pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    from trl_runs import tiny_checkpoint

    # an EOS bias: some sampled completions stop early, padding after their EOS (not scored)
    return (tiny_checkpoint(tmp_path_factory.mktemp("student"), hidden=32, seed=0, eos_bias=1.0),
            tiny_checkpoint(tmp_path_factory.mktemp("teacher"), hidden=48, seed=1))


def _trainer(cls, models, tmp_path, options, **kwargs):
    import datasets
    import transformers
    from trl.experimental.iw_opd import IWOPDConfig

    student, teacher = models
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(student)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    messages = [[{"role": "user", "content": " ".join(f"w{(3 * i + j) % 50}" for j in range(2 + i % 3))},
                 {"role": "assistant", "content": " ".join(f"w{(7 * i + 5 * j) % 50}" for j in range(1 + i % 4))}]
                for i in range(8)]
    args = IWOPDConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1, optim="sgd",
        learning_rate=0.05, bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=4, max_completion_length=5), **options})
    return cls(model=student, teacher_model=teacher, args=args,
               train_dataset=datasets.Dataset.from_dict({"messages": messages}), processing_class=tokenizer, **kwargs)


@pytest.mark.parametrize("options, lora", [
    (dict(), None),
    (dict(iw_opd_gamma=1.0, temperature=0.8, gradient_accumulation_steps=2, per_device_train_batch_size=2), None),
    (dict(distillation_objective="jsd", loss_top_k=0, beta=0.5, lmbda=0.5, gradient_accumulation_steps=2,
          per_device_train_batch_size=2), None),
    (dict(distillation_objective="jsd", loss_top_k=0, beta=0.0, temperature=0.7, lmbda=0.0), ["q_proj", "lm_head"]),
    # the JSD's default support: the sampled token's top-1 pair with the tail bucket (beta = 1, loss_top_k = 1)
    (dict(distillation_objective="jsd", lmbda=0.5), None),
    (dict(distillation_objective="jsd", beta=0.4, loss_top_k=1, reverse_kl_top_1_mode="argmax",
          loss_add_tail=False), None),
    (dict(distillation_objective="jsd", beta=0.4, loss_top_k=4, lmbda=1.0, gradient_accumulation_steps=2,
          per_device_train_batch_size=2), None),
    (dict(distillation_objective="jsd", beta=0.0, loss_top_k=3, temperature=0.9), ["q_proj", "lm_head"]),
])
def test_trainer_matches_trl(iw_opd_models, tmp_path, options, lora):
    """TRL's own ``IWOPDTrainer`` and the drop-in, two steps from the same seed (on-policy generations, a mixed
    on/off-policy JSD run, the JSD's top-k and top-1 supports, gradient accumulation, a LoRA adapter on the
    lm_head): logs and updates agree."""
    from trl.experimental.iw_opd import IWOPDTrainer as TRLIWOPDTrainer

    from fastalign.integrations.trl import IWOPDTrainer
    from trl_runs import assert_same_run, run

    def peft_config():  # init_lora_weights=False: B is not 0, so the adapter changes the logits from the first step
        import peft

        return {} if lora is None else {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora,
                                                                       init_lora_weights=False)}

    if lora is not None:
        pytest.importorskip("peft")
    theirs = run(_trainer(TRLIWOPDTrainer, iw_opd_models, tmp_path / "trl", options, **peft_config()))
    ours = run(_trainer(IWOPDTrainer, iw_opd_models, tmp_path / "ours", options, **peft_config()))
    if options.get("distillation_objective", "iw_opd") == "iw_opd":
        assert all("iw_opd/mean_weight" in log for log in ours[0])
    if lora is not None:
        assert any("lm_head.lora_A" in k for k in ours[1])
    assert_same_run(ours, theirs)


def test_trainer_refusals(iw_opd_models, tmp_path):
    from fastalign.integrations.trl import IWOPDTrainer

    with pytest.raises(ValueError, match="use_teacher_server"):
        _trainer(IWOPDTrainer, iw_opd_models, tmp_path, dict(use_teacher_server=True,
                                                             teacher_model_server_url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="use_liger_kernel"):
        _trainer(IWOPDTrainer, iw_opd_models, tmp_path, dict(use_liger_kernel=True))


#: (config, assigned at the end of the first step): the options TRL's compute_loss reads from the trainer
ASSIGNED = {
    "jsd_beta": (dict(distillation_objective="jsd", loss_top_k=0, beta=0.5), dict(beta=0.0)),
    "iw_opd_gamma_epsilon": (dict(iw_opd_gamma=0.5), dict(iw_opd_gamma=2.0, iw_opd_epsilon=50.0)),
    "jsd_support": (dict(distillation_objective="jsd", beta=0.4, loss_top_k=4),
                    dict(loss_top_k=1, reverse_kl_top_1_mode="argmax", loss_add_tail=False, temperature=0.7)),
}


@pytest.mark.parametrize("case", list(ASSIGNED))
def test_options_assigned_on_the_trainer_match_trl(iw_opd_models, tmp_path, case):
    """TRL's IWOPDTrainer reads beta, iw_opd_gamma, iw_opd_epsilon, loss_top_k, loss_add_tail,
    reverse_kl_top_1_mode and temperature from its attributes at every step: a callback that assigns them after
    the first step changes the second step's loss, in TRL and in the drop-in (logs and updates agree)."""
    import transformers
    from trl.experimental.iw_opd import IWOPDTrainer as TRLIWOPDTrainer

    from fastalign.integrations.trl import IWOPDTrainer
    from trl_runs import assert_same_run, run

    config, assigned = ASSIGNED[case]

    class Schedule(transformers.TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                for name, value in assigned.items():
                    setattr(self.trainer, name, value)

    def scheduled(cls, out):
        trainer = _trainer(cls, iw_opd_models, out, config)
        trainer.add_callback(Schedule(trainer))
        return run(trainer)

    assert_same_run(scheduled(IWOPDTrainer, tmp_path / "ours"), scheduled(TRLIWOPDTrainer, tmp_path / "trl"))


def test_an_assigned_value_the_loss_refuses_raises_naming_it(iw_opd_models, tmp_path):
    from fastalign.integrations.trl import IWOPDJSDLoss, IWOPDTrainer

    trainer = _trainer(IWOPDTrainer, iw_opd_models, tmp_path, dict(distillation_objective="jsd", loss_top_k=0))
    assert isinstance(trainer.fastalign_loss, IWOPDJSDLoss)
    trainer.beta = 1.5
    with pytest.raises(ValueError, match="IWOPDTrainer.beta=1.5: IWOPDConfig.beta"):
        trainer.fastalign_loss
    trainer.beta, trainer.distillation_objective = 0.5, "kl"
    with pytest.raises(ValueError, match="IWOPDTrainer.distillation_objective='kl'"):
        trainer.fastalign_loss
