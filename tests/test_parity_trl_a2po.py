"""A*-PO (TRL 1.16's experimental ``A2POTrainer``): :func:`a2po_optimal_values` against a float64 reference,
:class:`A2POLoss` against TRL's own ``A2POTrainer.compute_loss`` (unbound, on a stand-in whose
``_get_sequence_logps`` sums the given per-token log-probs over the completion mask, as TRL's does from the
logits): loss, gradient w.r.t. the per-token log-probs and metrics at 1e-6 in float64; and the loss from hidden
states through the head in one pass over whole rows."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_a2po = pytest.importorskip("trl.experimental.a2po", reason="TRL 1.16 is not installed")

from fastalign.integrations.trl import A2POLoss, a2po_optimal_values  # noqa: E402
from fastalign.linear_step import separable_step  # noqa: E402

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


def _config(**kw):
    return trl_a2po.A2POConfig(output_dir="/tmp/fastalign-a2po", report_to=[], use_cpu=True, **kw)


@pytest.mark.parametrize("beta1", [0.5, 0.05, 20.0])
def test_optimal_values_match_float64(beta1):
    """``beta1 log mean_i exp(r_i / beta1)``: near the best reward for a small beta1, the mean for a large one; the
    log-sum-exp form stays finite where exp(r / beta1) overflows float64 (beta1 = 0.05: exp(20))."""
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(4, 8, generator=g, dtype=D) > 0.5).to(D)
    rewards[0] = 0.0  # every sample wrong
    rewards[1, 3] = 1.0
    want = torch.tensor([beta1 * math.log(sum(math.exp(float(r) / beta1) for r in row) / len(row))
                         for row in rewards], dtype=D)
    got = a2po_optimal_values(_config(beta1=beta1), rewards)
    torch.testing.assert_close(got, want, **TOL)
    big = a2po_optimal_values({"beta1": 1e-3}, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=D) * 10)
    torch.testing.assert_close(big, torch.tensor([10.0 - 1e-3 * math.log(4)], dtype=D), **TOL)


def _batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D) * 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, :] = 0  # an empty completion: s = 0
    ref = -torch.rand(B, generator=g, dtype=D) * 8
    rewards = (torch.rand(B, generator=g, dtype=D) > 0.5).to(D)
    v_star = torch.rand(B, generator=g, dtype=D)
    return lp, mask, ref, rewards, v_star


@pytest.mark.parametrize("beta2", [1e-3, 0.7])
def test_a2po_loss_matches_trl(beta2):
    args = _config(beta2=beta2)
    lp, mask, ref, rewards, v_star = _batch(seed=int(beta2 * 10))
    a = lp.clone().requires_grad_()
    trainer = SimpleNamespace(args=args, model=SimpleNamespace(training=True),
                              _metrics=defaultdict(lambda: defaultdict(list)),
                              _get_sequence_logps=lambda model, ids, attention, k: (a * attention).sum(1))
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=mask, logits_to_keep=mask.shape[1],
                  ref_logps=ref, rewards=rewards, v_star=v_star)
    loss_t = trl_a2po.A2POTrainer.compute_loss(trainer, None, inputs)
    (g_t,) = torch.autograd.grad(loss_t, a)

    b = lp.clone().requires_grad_()
    loss_f, m_f = A2POLoss(args)(b, mask, ref, rewards, v_star)
    (g_f,) = torch.autograd.grad(loss_f, b)
    torch.testing.assert_close(loss_f, loss_t, **TOL)
    torch.testing.assert_close(g_f, g_t, **TOL)
    assert set(m_f) == {"implicit_reward", "advantage"}
    for k, v in m_f.items():
        torch.testing.assert_close(v, torch.tensor(trainer._metrics["train"][k][0], dtype=D), **TOL, msg=k)


def test_a2po_loss_from_hidden_states_in_one_pass():
    """The loss is a mean of per-row terms: from hidden states it goes through the head in one pass over whole rows,
    with the loss and gradients of the log-probs' path (fp32 head on the CPU)."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 5, 8, 19
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    mask = (labels != -100).long()
    ref, rewards, v_star = -torch.rand(B, generator=g) * 5, torch.tensor([1.0, 0.0, 1.0]), torch.rand(B, generator=g)
    a2po = A2POLoss({"beta2": 0.3})
    logits = (hidden @ weight.T).log_softmax(-1)
    lp = torch.where(labels != -100, logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    want = a2po(lp, mask, ref, rewards, v_star)[0]
    want_grads = torch.autograd.grad(want, (hidden, weight))
    loss = separable_step(hidden, weight, labels, lambda lp, _: a2po(lp, mask, ref, rewards, v_star), items="rows",
                          single_pass=True)[0]
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for got, ref_grad in zip(torch.autograd.grad(loss, (hidden, weight)), want_grads):
        torch.testing.assert_close(got, ref_grad, atol=1e-6, rtol=1e-5)


def test_a2po_bad_inputs_name_the_field():
    lp, mask, ref, rewards, v_star = _batch()
    with pytest.raises(ValueError, match="A2POConfig.beta2"):
        A2POLoss({"beta2": 0.0})
    with pytest.raises(TypeError, match="A2POConfig.beta1"):
        a2po_optimal_values({"beta1": "0.5"}, rewards[None])
    with pytest.raises(ValueError, match="A2POConfig has no field 'beta3'"):
        A2POLoss({"beta3": 1.0})
    with pytest.raises(ValueError, match="v_star"):
        A2POLoss()(lp, mask, ref, rewards, v_star[:2])
    with pytest.raises(ValueError, match="at least one sample"):
        a2po_optimal_values(None, torch.zeros(3, 0))
    with pytest.raises(TypeError, match="rewards"):
        a2po_optimal_values(None, torch.ones(3, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ trainer

def _binary_reward(completions, **_):
    """1 when the completion holds one of the words w0 .. w29, else 0 (A*-PO's binary reward)."""
    return [float(any(w in c.split() for w in [f"w{i}" for i in range(30)])) for c in completions]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    from trl_runs import tiny_checkpoint

    # an EOS bias: some completions stop early, padding after their EOS (not scored)
    return tiny_checkpoint(tmp_path_factory.mktemp("policy"), eos_bias=1.5)


def _trainer(cls, checkpoint, tmp_path, options):
    import datasets
    import transformers

    args = trl_a2po.A2POConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1, optim="sgd",
        learning_rate=0.05, bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=3, max_completion_length=5, num_value_samples=4, beta2=0.5), **options})
    prompts = [" ".join(f"w{(3 * i + j) % 50}" for j in range(2 + i % 4)) for i in range(6)]
    return cls(model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint), reward_funcs=_binary_reward,
               args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
               processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint))


@pytest.mark.parametrize("options", [dict(), dict(beta1=0.05, gradient_accumulation_steps=2, temperature=0.7)])
def test_trainer_matches_trl(checkpoint, tmp_path, options):
    """TRL's own ``A2POTrainer`` and the drop-in, two steps from the same seed (stage 1's ``V*`` from the
    reference's samples, then on-policy regression): the logged metrics and the parameter updates agree."""
    from fastalign.integrations.trl import A2POTrainer
    from trl_runs import assert_same_run, run

    theirs = run(_trainer(trl_a2po.A2POTrainer, checkpoint, tmp_path / "trl", options))
    ours = run(_trainer(A2POTrainer, checkpoint, tmp_path / "ours", options))
    assert_same_run(ours, theirs)
