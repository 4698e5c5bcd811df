"""Two processes over ``torch.distributed`` equal one process on the whole batch.

* Data parallel: each rank takes half of the batch; with the step-wide token count
  (``global_tokens``) and ``dp_size`` the per-rank losses are scaled so that averaging the
  gradients over the ranks (what DDP / FSDP do) gives the single-process step on the
  concatenated batch: ``LinearPolicyLoss`` from hidden states, and ``causal_lm_logprobs``
  of a tiny Qwen2 into ``policy_loss``. Gradients and the parameters after an SGD step match.
* Vocabulary parallel: each rank holds a shard of the lm_head rows (``vocab_group``), of an odd
  vocabulary split as ``torch.chunk`` splits it (shards of unequal size); the log-probs, entropy,
  sum p^2 and argmax equal the single-rank result, and so do the gradients of the hidden states
  and of each weight / bias shard. The same with the shards as one FSDP2-style DTensor
  (``Shard(0)``) over the group; and without ``vocab_group`` a DTensor head is gathered, with the
  gradients of plain PyTorch on the gathered head. The loss modules on a vocabulary that leaves either
  rank an empty shard equal the single rank too; ranks that disagree on the rows (hidden size, low-rank
  term) all raise the same ``ValueError`` instead of crashing or hanging.
* Vocabulary-parallel logits: each rank holds a slice of the logits (``token_logprobs(vocab_group=)``);
  the statistics and the concatenated d(logits) equal the single rank's.

CPU runs use ``gloo`` with two spawned processes meeting at a ``FileStore``; the GPU-marked
versions use ``nccl`` with one GPU per rank, or ``gloo`` with both ranks on one GPU (what a
one-GPU machine can run). Each worker writes its results to a file the
test compares; a hang fails the test after ``HANG_LIMIT_S`` instead of blocking the run.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastalign
from conftest import CPU_BACKENDS
from fastalign.reference.linear import linear_logits as reference_linear_logits
from fastalign.reference.linear import linear_logprobs as reference_linear_logprobs
from helpers import rank_body, spawn_ranks

try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:  # pragma: no cover - transformers is in the test extra
    HAS_TRANSFORMERS = False

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)

WORLD = 2
HANG_LIMIT_S = 600  # for the whole spawn; collectives time out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = timedelta(seconds=300)
B, T, F, H, V = 4, 7, 6, 16, 40  # rows, tokens, input features, hidden size, vocabulary
V_ODD = 41  # the vocabulary of the vocabulary-parallel cases: shards of 21 and 20 rows
LR = 0.5


# ----------------------------------------------------------------------------- shared data (same on every rank)

def policy_data():
    """A rollout batch: features x [B, T, F] mapped to hidden states by a parameter, labels with an
    ignored token, a right-padded row and a prompt, old / reference log-probs and advantages."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, F, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[2, 4] = -100
    mask = torch.ones(B, T)
    mask[:, :2] = 0  # prompt
    mask[3, 5:] = 0  # padding
    mask[0, 2:4] = 0  # a tool output inside the response
    old = -3.5 - torch.rand(B, T, generator=g)
    ref = -3.5 - torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    proj = 0.5 * torch.randn(F, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    return dict(x=x, labels=labels, mask=mask, old=old, ref=ref, adv=adv), dict(proj=proj, weight=weight)


def policy_loss_fn(dp_size: int, backend: str):
    return fastalign.LinearPolicyLoss(loss_type="grpo", agg="token-mean", kl_coef=0.05, entropy_coef=0.02,
                                      dp_size=dp_size, backend=backend)


def policy_step(data, params, rows, dp_size, backend, global_tokens=None, group=None):
    """One SGD step of the policy on ``rows`` of the batch; with ``group`` the gradients (and the
    reported loss) are averaged over the ranks. Returns the loss, gradients and new parameters."""
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    d = {k: v[rows] for k, v in data.items()}
    hidden = torch.tanh(d["x"] @ p["proj"])
    loss, _ = policy_loss_fn(dp_size, backend)(hidden, p["weight"], d["labels"], d["old"], d["adv"], d["mask"],
                                               ref_logprobs=d["ref"], global_tokens=global_tokens)
    loss.backward()
    grads = {k: v.grad for k, v in p.items()}
    loss = loss.detach()
    if group is not None:
        for g in [loss, *grads.values()]:
            dist.all_reduce(g, group=group)
            g /= dist.get_world_size(group)
    return dict(loss=loss, grads=grads, params={k: (p[k] - LR * grads[k]).detach() for k in p})


def hf_data():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, 9), generator=g)
    attention_mask = torch.ones(B, 9, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    attention_mask[2, :2] = 0  # left padding
    response_mask = attention_mask.clone()
    response_mask[:, :4] = 0
    old = -3.5 - torch.rand(B, 8, generator=g)
    adv = torch.randn(B, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, old=old, adv=adv)


def tiny_qwen2():
    import transformers

    torch.manual_seed(2)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False, attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(config).float()


def wrapped(model, wrap, group, device):
    """``model`` as a step calls it: itself (``wrap`` None), a ``DistributedDataParallel`` wrapper (``"ddp"``), or
    sharded by FSDP2 (``"fsdp2"``: each layer, then the model, which stays the one called)."""
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    if wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(group),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def hf_step(data, rows, dp_size, global_tokens=None, group=None, device="cpu", wrap=None):
    """causal_lm_logprobs of a tiny Qwen2 into policy_loss, on ``rows``; SGD-updated parameters. ``wrap``: the
    model passed as a ``DistributedDataParallel`` wrapper (``"ddp"``) or sharded by FSDP2 (``"fsdp2"``: each layer,
    then the model), whose own reductions average the gradients over ``group``; else they are all-reduced here."""
    from fastalign.integrations.hf import causal_lm_logprobs

    model = tiny_qwen2().to(device)
    scored = wrapped(model, wrap, group, device)
    d = {k: v[rows].to(device) for k, v in data.items()}
    refused = None
    if wrap is not None:  # the body alone, outside the wrapper's forward: refused, naming the way that works
        from fastalign.integrations.hf import head_operands

        with pytest.raises(ValueError) as refused:
            head_operands(scored, d["input_ids"], d["attention_mask"])
        refused = str(refused.value)
    stats = causal_lm_logprobs(scored, d["input_ids"], d["attention_mask"], response_mask=d["response_mask"],
                               entropy=True)
    mask = d["response_mask"][:, 1:] * d["attention_mask"][:, 1:]
    loss, _ = fastalign.policy_loss(stats.logprobs, d["old"], d["adv"], mask, entropy=stats.entropy,
                                    loss_type="grpo", agg="token-mean", entropy_coef=0.02, dp_size=dp_size,
                                    global_tokens=global_tokens)
    loss.backward()
    loss = loss.detach()
    full = (lambda t: t.full_tensor()) if wrap == "fsdp2" else (lambda t: t)  # FSDP2 holds shards (DTensors)
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    if group is not None:
        for g in [loss, *(grads.values() if wrap is None else ())]:
            dist.all_reduce(g, group=group)
            g /= dist.get_world_size(group)
    params = {n: (full(p) - LR * grads[n]).detach() for n, p in model.named_parameters()}
    return dict(loss=loss, grads=grads, params=params, **({} if refused is None else {"refused": refused}))


def hf_fused_loss_step(data, rows, world, items=None, group=None, device="cpu", wrap=None):
    """``model(**batch, labels=...).loss`` of a tiny Qwen2 after ``install_fused_loss``, as ``transformers.Trainer``
    takes it across ranks: ``num_items_in_batch`` the scored count of every rank (``items``; None: the rank's own
    mean), the loss times the world size, the gradients averaged by ``wrap`` (a ``DistributedDataParallel``
    wrapper, or FSDP2 on each layer then the model); SGD-updated parameters. The loss is summed over the ranks."""
    from fastalign.integrations.hf import install_fused_loss

    model = install_fused_loss(tiny_qwen2().to(device).train())
    scored = wrapped(model, wrap, group, device)
    d = {k: v[rows].to(device) for k, v in data.items()}
    labels = d["input_ids"].masked_fill(d["response_mask"] * d["attention_mask"] == 0, -100)
    out = scored(input_ids=d["input_ids"], attention_mask=d["attention_mask"], labels=labels,
                 **({} if items is None else {"num_items_in_batch": items}))
    assert out.logits is None
    (out.loss * world).backward()
    loss = out.loss.detach()
    if group is not None:
        dist.all_reduce(loss, group=group)
    full = (lambda t: t.full_tensor()) if wrap == "fsdp2" else (lambda t: t)
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    params = {n: (full(p) - LR * grads[n]).detach() for n, p in model.named_parameters()}
    return dict(loss=loss, grads=grads, params=params)


VOCAB_OPTIONS = dict(temperature=0.7, softcap=4.0, logit_scale=1.3)
BANNED_OPTIONS = dict(temperature=0.7, logit_scale=1.3)


def vocab_data():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, H, generator=g)
    weight = torch.randn(V_ODD, H, generator=g)
    bias = 0.5 * torch.randn(V_ODD, generator=g)
    labels = torch.randint(0, V_ODD, (2, 5), generator=g)
    labels[0, :4] = torch.tensor([1, V_ODD // 2, V_ODD // 2 + 1, V_ODD - 1])  # both ends of both shards
    labels[1, 2] = -100
    # upstream gradients of the three statistics
    g_lp, g_ent, g_sp2 = torch.randn(3, 2, 5, generator=g)
    g_mean = torch.randn(2, 5, generator=g)  # and of the mean logit
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2,
                g_mean=g_mean)


def banned_shard_data():
    """:func:`vocab_data` with the second half of the vocabulary banned (a -inf bias: every logit of rank 1's
    shard) and labels inside it; scored without a softcap (which would bound the -inf logits)."""
    d = vocab_data()
    d["bias"][V_ODD // 2:] = -math.inf
    d["labels"][1, :2] = torch.tensor([V_ODD // 2, V_ODD - 1])
    return d


def _backward(st, d):
    mean = 0.0 if st.mean_logit is None else (st.mean_logit * d["g_mean"]).sum()
    ((st.logprobs * d["g_lp"]).sum() + (st.entropy * d["g_ent"]).sum() + (st.sum_p2 * d["g_sp2"]).sum()
     + mean).backward()


def vocab_stats(data, backend, rank=0, world=1, group=None, device="cpu", compiled=False, sizes=None,
                options=VOCAB_OPTIONS, mean_logit=True):
    """Statistics and gradients of this rank's shard (its ``torch.chunk`` of the vocabulary, or its rows of
    ``split(sizes)``); ``compiled``: through ``torch.compile(fullgraph=True)`` (no graph break, backward
    included); ``mean_logit``: the mean logit too, its gradient in the loss."""
    d = {k: v.to(device) for k, v in data.items()}
    hidden = d["hidden"].clone().requires_grad_(True)
    weight, bias = (d[k].chunk(world)[rank] if sizes is None else d[k].split(sizes)[rank] for k in ("weight", "bias"))
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)

    def stats(hidden, weight, bias):
        return fastalign.linear_logprobs(hidden, weight, d["labels"], bias=bias, entropy=True, sum_p2=True,
                                         argmax=True, mean_logit=mean_logit, vocab_group=group, backend=backend,
                                         **options)
    st = (torch.compile(stats, fullgraph=True) if compiled else stats)(hidden, weight, bias)
    _backward(st, d)
    means = {} if st.mean_logit is None else dict(mean_logit=st.mean_logit.detach())
    return dict(logprobs=st.logprobs.detach(), entropy=st.entropy.detach(), sum_p2=st.sum_p2.detach(),
                argmax=st.argmax, d_hidden=hidden.grad, d_weight=weight.grad, d_bias=bias.grad, **means)


def dtensor_stats(data, backend, rank, world):
    """The head as DTensors sharded over the rows on a 1-D CPU mesh (an FSDP2 parameter): with ``vocab_group``
    its local shards (as :func:`vocab_stats`); without, the gathered head, with gradients against plain
    PyTorch's on the same DTensors (``full_tensor()`` into ``log_softmax``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, group in (("sharded", mesh.get_group()), ("gathered", None)):
        hidden = data["hidden"].clone().requires_grad_(True)
        weight, bias = (distribute_tensor(data[k], mesh, [Shard(0)]).requires_grad_(True) for k in ("weight", "bias"))
        st = fastalign.linear_logprobs(hidden, weight, data["labels"], bias=bias, entropy=True, sum_p2=True,
                                       vocab_group=group, backend=backend, **VOCAB_OPTIONS)
        _backward(st, data)
        out[name] = dict(logprobs=st.logprobs.detach(), entropy=st.entropy.detach(), sum_p2=st.sum_p2.detach(),
                         d_hidden=hidden.grad, d_weight=weight.grad.to_local(), d_bias=bias.grad.to_local())
    # a vocab_group that is not the mesh's group (one rank of the two): the shard is not this group's shard
    one_rank_groups = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes every group
    weight = distribute_tensor(data["weight"], mesh, [Shard(0)])
    try:
        fastalign.linear_logprobs(data["hidden"], weight, data["labels"], vocab_group=one_rank_groups[rank],
                                  backend=backend)
        out["other_group"] = None
    except TypeError as e:
        out["other_group"] = str(e)
    # data parallel (FSDP2): rank r scores its own row, its loss scaled by the world size as a dp_size-scaled
    # mean; the head's gradient is averaged over the ranks, so each shard holds the whole batch's gradient
    rows = slice(rank, rank + 1)
    weight, bias = (distribute_tensor(data[k], mesh, [Shard(0)]).requires_grad_(True) for k in ("weight", "bias"))
    st = fastalign.linear_logprobs(data["hidden"][rows], weight, data["labels"][rows], bias=bias, entropy=True,
                                   sum_p2=True, backend=backend, **VOCAB_OPTIONS)
    mine = {k: data[k][rows] for k in ("g_lp", "g_ent", "g_sp2")}
    (world * ((st.logprobs * mine["g_lp"]).sum() + (st.entropy * mine["g_ent"]).sum()
              + (st.sum_p2 * mine["g_sp2"]).sum())).backward()
    out["data_parallel"] = dict(d_weight=weight.grad.to_local(), d_bias=bias.grad.to_local())
    # plain PyTorch on the gathered DTensor head: the gradients a DTensor head gets
    hidden = data["hidden"].clone().requires_grad_(True)
    weight, bias = (distribute_tensor(data[k], mesh, [Shard(0)]).requires_grad_(True) for k in ("weight", "bias"))
    lp, ent, sp2, _amax = reference_linear_logprobs(hidden, weight.full_tensor(), data["labels"],
                                                    bias=bias.full_tensor(), **VOCAB_OPTIONS)
    ((lp * data["g_lp"]).sum() + (ent * data["g_ent"]).sum() + (sp2 * data["g_sp2"]).sum()).backward()
    out["torch"] = dict(logprobs=lp.detach(), entropy=ent.detach(), sum_p2=sp2.detach(), d_hidden=hidden.grad,
                        d_weight=weight.grad.to_local(), d_bias=bias.grad.to_local())
    return out


#: vocabulary splits that leave one rank an empty shard: the last rank's, the first rank's
EMPTY_SPLITS = {"empty_last": [V_ODD, 0], "empty_first": [0, V_ODD]}
SHARD_LOSSES = ("LinearPolicyLoss", "separable_step", "LinearPreferenceLoss")


def shard_loss(name, backend, rank=0, group=None, sizes=None):
    """The loss ``name`` of :data:`SHARD_LOSSES` on the :func:`vocab_data` head, its metrics and the gradients of
    the hidden states and of this rank's weight / bias rows (``split(sizes)``; the whole head without ``group``):
    LinearPolicyLoss (grpo with KL and entropy terms), separable_step (log-probs with sum p^2, entropy and argmax)
    and LinearPreferenceLoss (sigmoid, the reference as ``ref_hidden`` through the same head)."""
    d = vocab_data()
    g = torch.Generator().manual_seed(4)
    hidden = d["hidden"].clone().requires_grad_(True)
    weight, bias = (d[k] if sizes is None else d[k].split(sizes)[rank] for k in ("weight", "bias"))
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    labels, (n, t) = d["labels"], d["labels"].shape
    stats = {}
    if name == "LinearPolicyLoss":
        mask = torch.ones(n, t)
        mask[0, 0] = 0
        old, ref = (-3.5 - torch.rand(n, t, generator=g) for _ in range(2))
        fn = fastalign.LinearPolicyLoss(loss_type="grpo", kl_coef=0.05, entropy_coef=0.02, entropy_metric=True,
                                        vocab_group=group, backend=backend, **VOCAB_OPTIONS)
        value, metrics = fn(hidden, weight, labels, old, torch.randn(n, generator=g), mask, bias=bias,
                            ref_logprobs=ref)
    elif name == "separable_step":
        from fastalign.linear_step import separable_step

        def loss(lp, sp2):
            return (lp * d["g_lp"]).sum(), {"sum_p2": sp2.sum()}
        value, metrics, stats = separable_step(hidden, weight, labels, loss, bias=bias, sum_p2=True,
                                               extras=("entropy", "argmax", "mean_logit"),
                                               logit=dict(vocab_group=group, backend=backend, **VOCAB_OPTIONS))
    else:
        ref_hidden = d["hidden"] + 0.3 * torch.randn(d["hidden"].shape, generator=g)
        fn = fastalign.LinearPreferenceLoss("sigmoid", beta=0.1, vocab_group=group, backend=backend, **VOCAB_OPTIONS)
        value, metrics = fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    value.backward()
    return dict(value=value.detach(), metrics={k: v.detach() for k, v in metrics.items()}, stats=stats,
                d_hidden=hidden.grad, d_weight=weight.grad, d_bias=bias.grad)


#: Clip-Cov seeds: a generator per rank seeded apart (rank r: CLIP_COV_SEED + r), and the global generator
CLIP_COV_SEED, CLIP_COV_GLOBAL_SEED = 7, 100


def clip_cov_loss(backend, rank=0, world=1, group=None, generator=None):
    """``LinearPolicyLoss(loss_type="clip_cov")`` on the :func:`vocab_data` head (this rank's ``torch.chunk`` of
    the rows with ``group``), the Clip-Cov bounds wide enough that the random choice decides which candidates
    lose their gradient: the loss, the selected fraction and the gradients of the hidden states and of this rank's
    weight / bias rows. ``generator``: passed to the loss (None: torch's global generator)."""
    d = vocab_data()
    g = torch.Generator().manual_seed(8)
    hidden = d["hidden"].clone().requires_grad_(True)
    weight, bias = (d[k].chunk(world)[rank].clone().requires_grad_(True) for k in ("weight", "bias"))
    n, t = d["labels"].shape
    fn = fastalign.LinearPolicyLoss(loss_type="clip_cov", cov_ratio=0.4, cov_lb=-100.0, cov_ub=100.0,
                                    vocab_group=group, backend=backend, **VOCAB_OPTIONS)
    kw = {} if generator is None else {"generator": generator}
    lp = reference_linear_logprobs(d["hidden"], d["weight"], d["labels"], bias=d["bias"], **VOCAB_OPTIONS)[0]
    old = lp.detach() + 0.05 * torch.randn(n, t, generator=g)  # ratios inside the clip: candidates
    value, metrics = fn(hidden, weight, d["labels"], old, torch.randn(n, generator=g), torch.ones(n, t), bias=bias,
                        **kw)
    value.backward()
    return dict(value=value.detach(), selected=metrics["cov_selected_frac"], d_hidden=hidden.grad,
                d_weight=weight.grad, d_bias=bias.grad)


# ----------------------------------------------------------------------------- the workers

# ----------------------------------------------------------------------------- vocabulary-parallel logits

#: token_logprobs(vocab_group=) cases: (logits dtype, shard sizes (None: torch.chunk's), a -inf half, in-place backward)
LOGIT_SHARD_CASES = {
    "odd": (torch.float32, None, False, False),
    "empty_shard": (torch.float32, [V_ODD, 0], False, False),
    "empty_first_shard": (torch.float32, [0, V_ODD], False, False),
    "banned_shard": (torch.float32, [V_ODD // 2, V_ODD - V_ODD // 2], True, False),
    "bf16_in_place": (torch.bfloat16, None, False, True),
}


def logit_shard_data(dtype, banned):
    """Logits ``[2, 5, V_ODD]`` whose labels sit at both ends of both shards, with an ignored row and a label past
    the vocabulary (NaN log-prob); ``banned``: the second half of the vocabulary -inf at the first four positions
    of each row (two labels inside it: log-prob -inf). Upstream gradients of the three statistics."""
    g = torch.Generator().manual_seed(4)
    logits = 3.0 * torch.randn(2, 5, V_ODD, generator=g)
    labels = torch.randint(0, V_ODD, (2, 5), generator=g)
    labels[0, :4] = torch.tensor([0, V_ODD // 2 - 1, V_ODD // 2, V_ODD - 1])
    labels[1, 2] = -100
    labels[1, 3] = V_ODD + 2
    if banned:
        logits[:, :4, V_ODD // 2:] = -math.inf
        labels[1, :2] = torch.tensor([V_ODD // 2, V_ODD - 1])
    g_lp, g_ent, g_sp2 = torch.randn(3, 2, 5, generator=g)
    return dict(logits=logits.to(dtype), labels=labels, g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2)


def logit_shard_stats(case, backend, rank=0, world=1, group=None, device="cpu", compiled=False):
    """token_logprobs of this rank's shard of the logits (every statistic, temperature 0.7) and d(logits) of
    the shard; one rank: the whole vocabulary, without ``vocab_group``."""
    dtype, sizes, banned, in_place = LOGIT_SHARD_CASES[case]
    d = {k: v.to(device) for k, v in logit_shard_data(dtype, banned).items()}
    whole = d["logits"]
    shard = whole.chunk(world, -1)[rank] if sizes is None or world == 1 else whole.split(sizes, -1)[rank]
    leaf = shard.clone().requires_grad_(True)

    def stats(leaf):
        logits = leaf * 1 if in_place else leaf  # in place: an intermediate of the graph, as a model's logits
        return fastalign.token_logprobs(logits, d["labels"], temperature=0.7, entropy=True, sum_p2=True,
                                        argmax=True, inplace_backward=in_place, vocab_group=group, backend=backend)
    st = (torch.compile(stats, fullgraph=True) if compiled else stats)(leaf)
    (torch.nan_to_num(st.logprobs * d["g_lp"], nan=0.0).sum() + (st.entropy * d["g_ent"]).sum()
     + (st.sum_p2 * d["g_sp2"]).sum()).backward()
    return dict(logprobs=st.logprobs.detach(), entropy=st.entropy.detach(), sum_p2=st.sum_p2.detach(),
                argmax=st.argmax, d_logits=leaf.grad)


def logit_shard_refusals(rank, group, backend, device):
    """What token_logprobs(vocab_group=) refuses, each error as ``"Type: message"``: a second derivative (it gave a
    wrong one, each rank's Hessian-vector product missing the other shards' terms), and, on the ranks outside a
    group of rank 0 alone, the placeholder dist.new_group returns to them (a TypeError that said it was no group)."""
    out = {}
    logits = torch.randn(2, 6, device=device).chunk(WORLD, -1)[rank].clone().requires_grad_(True)
    labels = torch.tensor([1, 4], device=device)
    lp = fastalign.token_logprobs(logits, labels, vocab_group=group, backend=backend).logprobs
    try:
        torch.autograd.grad(lp.sum(), logits, create_graph=True)
        out["second_derivative"] = "no error"
    except RuntimeError as e:
        out["second_derivative"] = f"RuntimeError: {e}"
    first = dist.new_group([0])  # a collective: every rank makes it
    try:
        fastalign.token_logprobs(logits.detach(), labels, vocab_group=first, backend=backend)
        out["outside"] = "no error"
    except (TypeError, ValueError) as e:
        out["outside"] = f"{type(e).__name__}: {e}"
    return out


def reference_logit_stats(case):
    """:func:`logit_shard_stats` in float64 plain PyTorch (a zero probability adds 0 to the entropy)."""
    dtype, _sizes, banned, _ = LOGIT_SHARD_CASES[case]
    d = logit_shard_data(dtype, banned)
    z = d["logits"].double().requires_grad_(True)
    labels = d["labels"]
    log_p = (z / 0.7).log_softmax(-1)
    p = log_p.exp()
    scored = labels != -100
    inside = (labels >= 0) & (labels < V_ODD)
    lp = log_p.gather(-1, torch.where(inside, labels, 0)[..., None]).squeeze(-1)
    lp = torch.where(scored, torch.where(inside, lp, math.nan), 0.0)
    ent = torch.where(scored, -(p * torch.where(p > 0, log_p, 0.0)).sum(-1), 0.0)
    sp2 = torch.where(scored, (p * p).sum(-1), 0.0)
    (torch.nan_to_num(lp * d["g_lp"], nan=0.0).sum() + (ent * d["g_ent"]).sum() + (sp2 * d["g_sp2"]).sum()).backward()
    return dict(logprobs=lp.detach(), entropy=ent.detach(), sum_p2=sp2.detach(), d_logits=z.grad)


def check_logit_shards(ranks, single, case, atol, rtol):
    """Every rank's statistics equal the single rank's; the ranks' d(logits) shards, concatenated, its d(logits)."""
    for r, got in enumerate(ranks):
        for k in ("logprobs", "entropy", "sum_p2"):
            torch.testing.assert_close(got[k], single[k], atol=atol, rtol=rtol, equal_nan=True,
                                       msg=f"{k}, {case}, rank {r}")
        assert torch.equal(got["argmax"], single["argmax"]), f"argmax, {case}, rank {r}"
    torch.testing.assert_close(torch.cat([got["d_logits"] for got in ranks], -1), single["d_logits"], atol=atol,
                               rtol=rtol, msg=f"d_logits, {case}")


def half(rank: int, world: int) -> slice:
    return slice(rank * B // world, (rank + 1) * B // world)


def _cpu(x):
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x.cpu() if isinstance(x, torch.Tensor) else x


def mismatched_rows():
    """Hidden states [6, H] and labels [6] of :func:`mismatched_calls` (the same on every rank)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, H, generator=g), torch.randint(0, V_ODD, (6,), generator=g)


def mismatched_calls(rank, group, backend):
    """Calls with vocab_group whose ranks disagree on a size every rank must share (the rows, the hidden size, the
    low-rank term), then one that agrees: the error each raised on this rank (its type and message), and the good
    call's log-probs. Each raised at the first collective and left the group usable."""
    weight = vocab_data()["weight"].chunk(WORLD)[rank]
    hidden, labels = mismatched_rows()
    n = 6 - rank  # rows of this rank in the mismatched calls; the others take 5 rows on every rank
    g = torch.Generator().manual_seed(6 + rank)  # the ranks' own shapes
    wide = torch.randn(weight.shape[0], H + 8 * rank, generator=g)  # a hidden size of its own on each rank
    a, lora = torch.randn(5, 3, generator=g), torch.randn(weight.shape[0], 3, generator=g)
    T = 4 - rank
    policy = fastalign.LinearPolicyLoss(loss_type="grpo", vocab_group=group, backend=backend)
    calls = {
        "rows": lambda: fastalign.linear_logprobs(hidden[:n], weight, labels[:n], vocab_group=group, backend=backend),
        "policy_tokens": lambda: policy(torch.randn(2, T, H, generator=g), weight, torch.zeros(2, T, dtype=torch.long),
                                        torch.zeros(2, T), torch.ones(2), torch.ones(2, T)),
        "hidden_size": lambda: fastalign.linear_logprobs(torch.randn(5, wide.shape[1], generator=g), wide,
                                                         labels[:5], vocab_group=group, backend=backend),
        "low_rank": lambda: fastalign.linear_logprobs(hidden[:5], weight, labels[:5], vocab_group=group,
                                                      low_rank=(a, lora) if rank == 0 else None, backend=backend),
        "logit_rows": lambda: fastalign.token_logprobs(hidden[:n] @ weight.T, labels[:n], vocab_group=group,
                                                       backend=backend),
        "logit_statistics": lambda: fastalign.token_logprobs(hidden[:5] @ weight.T, labels[:5], vocab_group=group,
                                                             entropy=rank == 0, backend=backend),
        "empty_vocabulary": lambda: fastalign.token_logprobs(hidden[:5] @ weight[:0].T, labels[:5],
                                                             vocab_group=group, backend=backend),
        "linear_statistics": lambda: fastalign.linear_logprobs(hidden[:5], weight, labels[:5], vocab_group=group,
                                                               entropy=rank == 0, sum_p2=rank == 1, backend=backend),
        "linear_softcap": lambda: fastalign.linear_logprobs(hidden[:5], weight, labels[:5], vocab_group=group,
                                                            softcap=None if rank == 0 else 30.0, backend=backend),
        "temperature": lambda: fastalign.token_logprobs(hidden[:5] @ weight.T, labels[:5], vocab_group=group,
                                                        temperature=1.0 + rank, backend=backend),
        "ignore_index": lambda: fastalign.token_logprobs(hidden[:5] @ weight.T, labels[:5], vocab_group=group,
                                                         ignore_index=-100 if rank == 0 else int(labels[0]),
                                                         backend=backend),
        "check": lambda: fastalign.token_logprobs(hidden[:5] @ weight.T, labels[:5], vocab_group=group,
                                                  check=rank == 0, backend=backend),
        "label_past_the_vocabulary": lambda: fastalign.token_logprobs(
            hidden[:5] @ weight.T, torch.where(torch.arange(5) == 2, V_ODD, labels[:5]), vocab_group=group, check=True,
            backend=backend),
    }
    out = {}
    for case, call in calls.items():
        try:
            call()
            out[case] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            out[case] = f"{type(e).__name__}: {e}"
    out["good"] = fastalign.linear_logprobs(hidden[:5], weight, labels[:5], vocab_group=group,
                                            backend=backend).logprobs
    return out


def _worker(rank, world, pg_backend, store_path, out_dir, scenarios, backend, cuda, timeout=COLLECTIVE_TIMEOUT):
    device = "cpu"
    if cuda:  # nccl: a GPU per rank; gloo: every rank on the first GPU
        device = f"cuda:{rank if pg_backend == 'nccl' else 0}"
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(pg_backend, store=store, rank=rank, world_size=world, timeout=timeout)
    with rank_body():
        group = dist.group.WORLD
        out = {}
        if "policy" in scenarios:
            data, params = policy_data()
            # the step-wide count of scored tokens: each rank counts its own, then one all-reduce
            local = (data["mask"][half(rank, world)] * (data["labels"][half(rank, world)] != -100)).sum()
            dist.all_reduce(local, group=group)
            out["policy"] = policy_step(data, params, half(rank, world), world, backend, global_tokens=local,
                                        group=group)
        if "hf" in scenarios:
            data = hf_data()
            rows = half(rank, world)
            local = (data["response_mask"][rows, 1:] * data["attention_mask"][rows, 1:]).sum().to(device)
            dist.all_reduce(local, group=group)
            with fastalign.use_backend(backend):
                out["hf"] = hf_step(data, rows, world, global_tokens=local, group=group, device=device)
                if "hf_wrapped" in scenarios:
                    out["hf_wrapped"] = {wrap: hf_step(data, rows, world, global_tokens=local, group=group,
                                                       device=device, wrap=wrap) for wrap in ("ddp", "fsdp2")}
                if "hf_fused_loss" in scenarios:
                    out["hf_fused_loss"] = {wrap: hf_fused_loss_step(data, rows, world, items=local, group=group,
                                                                     device=device, wrap=wrap)
                                            for wrap in ("ddp", "fsdp2")}
        if "vocab" in scenarios:
            out["vocab"] = vocab_stats(vocab_data(), backend, rank, world, group, device)
        if "vocab_empty_shard" in scenarios:  # every row on rank 0: rank 1 holds an empty shard
            out["vocab_empty_shard"] = vocab_stats(vocab_data(), backend, rank, world, group, device,
                                                   sizes=[V_ODD] + [0] * (world - 1))
        if "vocab_banned_shard" in scenarios:  # every logit of rank 1's shard is -inf
            out["vocab_banned_shard"] = vocab_stats(banned_shard_data(), backend, rank, world, group, device,
                                                    sizes=[V_ODD // 2, V_ODD - V_ODD // 2], options=BANNED_OPTIONS)
        if "shard_losses" in scenarios:  # the loss modules with an empty shard on one rank
            out["shard_losses"] = {(name, split): shard_loss(name, backend, rank, group, sizes)
                                   for split, sizes in EMPTY_SPLITS.items() for name in SHARD_LOSSES}
        if "logit_shards" in scenarios:
            out["logit_shards"] = {case: logit_shard_stats(case, backend, rank, world, group, device)
                                   for case in LOGIT_SHARD_CASES}
            out["logit_shard_refusals"] = logit_shard_refusals(rank, group, backend, device)
        if "logit_shards_compiled" in scenarios:
            out["logit_shards_compiled"] = logit_shard_stats("odd", backend, rank, world, group, device, compiled=True)
        if "vocab_compiled" in scenarios:
            out["vocab_compiled"] = vocab_stats(vocab_data(), backend, rank, world, group, device, compiled=True)
            out["vocab_compiled_no_mean"] = {
                mode: vocab_stats(vocab_data(), backend, rank, world, group, device, compiled=mode == "compiled",
                                  mean_logit=False) for mode in ("eager", "compiled")}
        if "dtensor" in scenarios:
            out["dtensor"] = dtensor_stats(vocab_data(), backend, rank, world)
        if "mismatched" in scenarios:
            out["mismatched"] = mismatched_calls(rank, group, backend)
        if "clip_cov" in scenarios:  # the ranks' generators, and their global ones, seeded apart
            out["clip_cov"] = {"generator": clip_cov_loss(backend, rank, world, group,
                                                          torch.Generator().manual_seed(CLIP_COV_SEED + rank))}
            torch.manual_seed(CLIP_COV_GLOBAL_SEED + rank)
            out["clip_cov"]["global"] = clip_cov_loss(backend, rank, world, group)
        torch.save(_cpu(out), os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(tmp_path, scenarios, backend, pg_backend="gloo", cuda=False, timeout=COLLECTIVE_TIMEOUT,
          hang_limit_s=HANG_LIMIT_S):
    """Run the scenarios on WORLD spawned ranks; their results, one dict per rank. ``timeout``: of each
    collective; ``hang_limit_s``: of the whole run."""
    return spawn_ranks(_worker, (WORLD, pg_backend, str(tmp_path / "store"), str(tmp_path), tuple(scenarios), backend,
                                 cuda, timeout), WORLD, tmp_path, hang_limit_s)


# ----------------------------------------------------------------------------- checks

def check_data_parallel(ranks, single, atol=1e-6, rtol=1e-5):
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], single["loss"], atol=atol, rtol=rtol, msg=f"loss, rank {r}")
        assert got["grads"].keys() == single["grads"].keys()
        for k in single["grads"]:
            torch.testing.assert_close(got["grads"][k], single["grads"][k], atol=atol, rtol=rtol,
                                       msg=f"d {k}, rank {r}")
            torch.testing.assert_close(got["params"][k], single["params"][k], atol=atol, rtol=rtol,
                                       msg=f"{k} after the step, rank {r}")
    assert any(g.abs().max() > 0 for g in single["grads"].values())


def check_vocab_parallel(ranks, single, atol=1e-5, rtol=1e-5):
    for r, got in enumerate(ranks):
        for k in ("logprobs", "entropy", "sum_p2", "mean_logit", "d_hidden"):
            if k in single:
                torch.testing.assert_close(got[k], single[k], atol=atol, rtol=rtol, msg=f"{k}, rank {r}")
        assert torch.equal(got["argmax"], single["argmax"]), f"argmax, rank {r}"
    for k in ("d_weight", "d_bias"):  # each rank holds the gradient of its own rows
        torch.testing.assert_close(torch.cat([got[k] for got in ranks]), single[k], atol=atol, rtol=rtol, msg=k)


def check_single_against_reference(single, data):
    """The single-rank result itself against the float64 reference (so both sides are right)."""
    d = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    hidden, weight, bias = (d[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    lp, ent, sp2, amax = reference_linear_logprobs(hidden, weight, d["labels"], bias=bias, dtype=torch.float64,
                                                   **VOCAB_OPTIONS)
    z = reference_linear_logits(hidden, weight, bias=bias, softcap=VOCAB_OPTIONS["softcap"],
                                logit_scale=VOCAB_OPTIONS["logit_scale"], dtype=torch.float64)
    mean = torch.where(d["labels"] != -100, z.mean(-1), 0.0)  # before the temperature
    ((lp * d["g_lp"]).sum() + (ent * d["g_ent"]).sum() + (sp2 * d["g_sp2"]).sum()
     + (mean * d["g_mean"]).sum()).backward()
    for k, ref in (("logprobs", lp), ("entropy", ent), ("sum_p2", sp2), ("mean_logit", mean), ("d_hidden", hidden.grad),
                   ("d_weight", weight.grad), ("d_bias", bias.grad)):
        torch.testing.assert_close(single[k].double(), ref.detach(), atol=1e-5, rtol=1e-5, msg=k)


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def gloo_run(request, tmp_path_factory):
    """All CPU scenarios in one 2-rank gloo run per kernel backend (spawning costs more than the work)."""
    backend = request.param
    scenarios = (("policy", "vocab", "vocab_empty_shard", "vocab_banned_shard", "shard_losses", "dtensor", "clip_cov",
                  "logit_shards")
                 + (("hf", "hf_wrapped", "hf_fused_loss") if HAS_TRANSFORMERS else ())
                 # compiled on the C++ backend only: the interpreter is not compiled
                 + (("vocab_compiled", "logit_shards_compiled") if backend == "cpp" else ()))
    return backend, spawn(tmp_path_factory.mktemp(f"gloo-{backend}"), scenarios, backend)


def test_gloo_linear_policy_step_equals_single_process(gloo_run):
    backend, ranks = gloo_run
    data, params = policy_data()
    single = policy_step(data, params, slice(None), 1, backend)
    check_data_parallel([r["policy"] for r in ranks], single)


def test_gloo_causal_lm_step_equals_single_process(gloo_run):
    if not HAS_TRANSFORMERS:
        pytest.skip("the model step needs transformers")
    backend, ranks = gloo_run
    with fastalign.use_backend(backend):
        single = hf_step(hf_data(), slice(None), 1)
    check_data_parallel([r["hf"] for r in ranks], single, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_gloo_causal_lm_step_of_a_wrapped_model_equals_single_process(gloo_run, wrap):
    """causal_lm_logprobs of a DistributedDataParallel wrapper, and of a model sharded by FSDP2 (its layers, then
    the model: the embedding, final norm and head in the root's unit), each computed inside the wrapper's (the
    root's) forward call: the gradients come averaged over the ranks by DDP / FSDP2 themselves and equal the
    single-process step on the whole batch (the wrapper's module alone gave unsynchronised gradients; the FSDP2
    root raised from its embedding's sharded weight)."""
    if not HAS_TRANSFORMERS:
        pytest.skip("the model step needs transformers")
    backend, ranks = gloo_run
    with fastalign.use_backend(backend):
        single = hf_step(hf_data(), slice(None), 1)
    check_data_parallel([r["hf_wrapped"][wrap] for r in ranks], single, atol=1e-6, rtol=1e-4)
    for r in ranks:  # head_operands, which runs the body outside the wrapper's forward, refuses it
        assert "causal_lm_logprobs(model, ...)" in r["hf_wrapped"][wrap]["refused"]


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_gloo_fused_loss_step_of_a_wrapped_model_equals_single_process(gloo_run, wrap):
    """install_fused_loss under DistributedDataParallel and FSDP2 (the loss computed in the model's forward, inside
    the wrapper's hooks), each rank's loss over every rank's scored count times the world size, as
    transformers.Trainer takes it: the gradients and the step equal the single process's mean over the whole
    batch."""
    if not HAS_TRANSFORMERS:
        pytest.skip("the model step needs transformers")
    backend, ranks = gloo_run
    with fastalign.use_backend(backend):
        single = hf_fused_loss_step(hf_data(), slice(None), 1)
    check_data_parallel([r["hf_fused_loss"][wrap] for r in ranks], single, atol=1e-6, rtol=1e-4)


def test_gloo_vocab_parallel_equals_single_rank(gloo_run):
    backend, ranks = gloo_run
    data = vocab_data()
    single = vocab_stats(data, backend)
    check_single_against_reference(single, data)
    check_vocab_parallel([r["vocab"] for r in ranks], single)


def test_gloo_vocab_parallel_with_an_empty_shard(gloo_run):
    """A vocabulary smaller than the group leaves a rank an empty shard (torch.tensor_split, FSDP2's Shard(0)):
    it is a piece with no mass. That rank refused it before the first collective, so the others failed (gloo) or
    hung (NCCL) in the all-reduce."""
    backend, ranks = gloo_run
    single = vocab_stats(vocab_data(), backend)
    check_vocab_parallel([r["vocab_empty_shard"] for r in ranks], single)


def test_gloo_vocab_parallel_label_in_a_shard_of_minus_inf_logits(gloo_run):
    """A label whose shard holds only -inf logits (a banned half of the vocabulary) has log-prob -inf, as on one
    rank; the shard's lp + lse was -inf - (-inf) = NaN."""
    backend, ranks = gloo_run
    data = banned_shard_data()
    single = vocab_stats(data, backend, sizes=[V_ODD], options=BANNED_OPTIONS)
    assert torch.isneginf(single["logprobs"][1, :2]).all()
    check_vocab_parallel([r["vocab_banned_shard"] for r in ranks], single)


@pytest.mark.parametrize("case", LOGIT_SHARD_CASES)
def test_gloo_token_logprobs_over_logit_shards_equals_single_rank(gloo_run, case):
    """token_logprobs(vocab_group=) on each rank's shard of the logits (Megatron's layout): log-probs, entropy,
    sum p^2 and argmax of the whole vocabulary on every rank, and each rank's d(logits) its shard of the single
    rank's; the single rank against float64. Shards of unequal size, an empty shard first or last, a shard of only
    -inf logits (a label inside it: log-prob -inf), an ignored row and a label past the vocabulary (NaN), bf16
    logits with the backward written over them."""
    backend, ranks = gloo_run
    single = logit_shard_stats(case, backend)
    half_precision = LOGIT_SHARD_CASES[case][0] != torch.float32
    ref = reference_logit_stats(case)
    tol = dict(atol=2e-2, rtol=2e-2) if half_precision else dict(atol=1e-5, rtol=1e-5)
    for k, want in ref.items():
        torch.testing.assert_close(single[k].double(), want, equal_nan=True, msg=f"{k}, single rank, {case}", **tol)
    check_logit_shards([r["logit_shards"][case] for r in ranks], single, case,
                       **(dict(atol=1e-2, rtol=1e-2) if half_precision else dict(atol=1e-5, rtol=1e-5)))


def test_gloo_token_logprobs_over_logit_shards_refusals(gloo_run):
    """A second derivative raises on every rank, as one process's does; a rank outside the group it is handed is
    told so."""
    _, ranks = gloo_run
    for r, rank in enumerate(ranks):
        got = rank["logit_shard_refusals"]
        assert got["second_derivative"].startswith("RuntimeError: ") and "no second derivative" in \
            got["second_derivative"], got["second_derivative"]
        if r == 0:
            assert got["outside"] == "no error", got["outside"]
        else:
            assert got["outside"].startswith("ValueError: vocab_group is dist.GroupMember.NON_GROUP_MEMBER"), \
                got["outside"]


def test_gloo_token_logprobs_over_logit_shards_compiles(gloo_run):
    """torch.compile(fullgraph=True) of token_logprobs(vocab_group=), backward included, equals eager."""
    backend, ranks = gloo_run
    if backend != "cpp":
        pytest.skip("compiled on the C++ backend (the Triton interpreter is not compiled)")
    for r in ranks:
        for k, eager_value in r["logit_shards"]["odd"].items():
            torch.testing.assert_close(r["logit_shards_compiled"][k], eager_value, atol=1e-6, rtol=1e-6,
                                       equal_nan=True, msg=f"{k}, rank {r}")


@pytest.mark.parametrize("name", SHARD_LOSSES)
def test_gloo_loss_modules_with_an_empty_shard(gloo_run, name):
    """LinearPolicyLoss, separable_step and LinearPreferenceLoss(ref_hidden=...) on a vocabulary split that leaves
    a rank an empty shard (either rank) equal the single rank: loss, metrics, statistics and gradients. The empty
    rank refused its shard before the first collective (linear_logprobs took it), so its peer failed (gloo) or
    hung (NCCL) in the all-reduce."""
    backend, ranks = gloo_run
    single = shard_loss(name, backend)
    for split in EMPTY_SPLITS:
        for r, rank in enumerate(ranks):
            got, where = rank["shard_losses"][(name, split)], f"{name}, {split}, rank {r}"
            for k in ("value", "d_hidden"):
                torch.testing.assert_close(got[k], single[k], atol=1e-5, rtol=1e-5, msg=f"{k}, {where}")
            for group in ("metrics", "stats"):
                assert got[group].keys() == single[group].keys(), where
                for k, want in single[group].items():
                    torch.testing.assert_close(got[group][k], want, atol=1e-5, rtol=1e-5, msg=f"{k}, {where}")
        for k in ("d_weight", "d_bias"):  # each rank holds the gradient of its own rows
            torch.testing.assert_close(torch.cat([rank["shard_losses"][(name, split)][k] for rank in ranks]),
                                       single[k], atol=1e-5, rtol=1e-5, msg=f"{k}, {name}, {split}")


def test_gloo_vocab_parallel_compiles_without_graph_breaks(gloo_run):
    """torch.compile(fullgraph=True) of the vocabulary-parallel statistics, backward included, equals eager (the
    backward read on the host whether a row needed renormalising: a graph break), with the mean logit and without
    it (the traced backward multiplied the mean logit's gradient by its share of None: a TypeError)."""
    backend, ranks = gloo_run
    if backend != "cpp":
        pytest.skip("compiled on the C++ backend (the Triton interpreter is not compiled)")
    for r in ranks:
        for k, eager_value in r["vocab"].items():
            torch.testing.assert_close(r["vocab_compiled"][k], eager_value, atol=1e-6, rtol=1e-6, msg=k)
        no_mean = r["vocab_compiled_no_mean"]
        for k, eager_value in no_mean["eager"].items():
            torch.testing.assert_close(no_mean["compiled"][k], eager_value, atol=1e-6, rtol=1e-6, msg=f"{k}, no mean")


def test_gloo_dtensor_head(gloo_run):
    """An FSDP2-style DTensor head: with vocab_group its local shards, as plain shards; without, gathered, with
    the gradients of plain PyTorch on the same DTensor; under data parallelism (each rank its own rows) the head's
    gradient is the ranks' average, as FSDP2 averages its parameters' gradients. A vocab_group other than the
    mesh's group (one rank of the mesh's two) is refused on every rank."""
    backend, ranks = gloo_run
    single = vocab_stats(vocab_data(), backend, mean_logit=False)
    stats = ("logprobs", "entropy", "sum_p2", "d_hidden")
    for r, got in enumerate(ranks):
        for k in stats:
            torch.testing.assert_close(got["dtensor"]["sharded"][k], single[k], atol=1e-5, rtol=1e-5,
                                       msg=f"{k}, rank {r}")
        for k in (*stats, "d_weight", "d_bias"):
            torch.testing.assert_close(got["dtensor"]["gathered"][k], got["dtensor"]["torch"][k].float(), atol=1e-5,
                                       rtol=1e-5, msg=f"gathered {k}, rank {r}")
        assert got["dtensor"]["other_group"] is not None, f"rank {r}: a one-rank vocab_group took a 2-rank shard"
        assert "weight is a DTensor" in got["dtensor"]["other_group"] and "exactly that group" in \
            got["dtensor"]["other_group"], got["dtensor"]["other_group"]
    for k in ("d_weight", "d_bias"):
        torch.testing.assert_close(torch.cat([got["dtensor"]["sharded"][k] for got in ranks]), single[k], atol=1e-5,
                                   rtol=1e-5, msg=f"sharded {k}")
        torch.testing.assert_close(torch.cat([got["dtensor"]["data_parallel"][k] for got in ranks]), single[k],
                                   atol=1e-5, rtol=1e-5, msg=f"data-parallel {k} (the ranks' average)")


def test_dtensor_head_of_another_dtype_takes_the_hidden_states_dtype(tmp_path):
    """An fp32 DTensor head (FSDP2's sharded parameter under bf16 mixed precision) beside bf16 hidden states is
    cast to bf16 on its shards, as FSDP2 casts it for the model's forward, gathered or as the vocabulary shard:
    the results of the bf16 head (log-probs, the policy and preference losses), and the gradient reaches the
    fp32 shard. A plain fp32 head still raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    d = vocab_data()
    h, w, y = d["hidden"].bfloat16(), d["weight"], d["labels"]
    adv, mask = torch.randn(2, generator=torch.Generator().manual_seed(6)), torch.ones(2, 5)

    def run(weight, **kw):
        hg = h.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(hg, weight, y, entropy=True, **kw)
        loss, _ = fastalign.LinearPolicyLoss(loss_type="grpo", entropy_coef=0.1)(
            hg, weight, y, st.logprobs.detach(), adv[:, None].expand(2, 5), mask, **kw)
        pref, _ = fastalign.LinearPreferenceLoss(loss_type="sigmoid", **kw)(hg, weight, y, ref_chosen_logprobs=
                                                                              torch.zeros(1), ref_rejected_logprobs=
                                                                              torch.zeros(1))
        (st.logprobs.sum() + loss + pref).backward()
        return st.logprobs, st.entropy, loss, pref, hg.grad

    wb = w.bfloat16().requires_grad_(True)
    want = run(wb)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        fastalign.linear_logprobs(h, w, y)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for kw in ({}, {"vocab_group": dist.group.WORLD}):
            shard = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
            got = run(shard, **kw)
            assert isinstance(shard.grad, DTensor) and shard.grad.dtype == torch.float32
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0, msg=str(kw))
            # the three calls' bf16 gradients summed in fp32 on the shard, in bf16 on the bf16 head: roundings apart
            diff = shard.grad.full_tensor() - wb.grad.float()
            assert diff.norm() < 4e-3 * wb.grad.float().norm(), kw
    finally:
        dist.destroy_process_group()


def test_gloo_clip_cov_ranks_take_the_first_ranks_seed(gloo_run):
    """Clip-Cov with vocab_group: every rank holds the same tokens, so every rank must pick the same ones. Each
    drew the seed from its own generator, so ranks whose generators differ (spawned processes, unless seeded
    alike) dropped different tokens: losses that differ and gradients of no single process. Every rank takes
    the seed of the group's first rank now: loss, selection and gradients equal the single process with that
    rank's generator, on every rank (an explicit generator or the global one)."""
    backend, ranks = gloo_run
    for case, seed in (("generator", CLIP_COV_SEED), ("global", CLIP_COV_GLOBAL_SEED)):
        single = clip_cov_loss(backend, generator=torch.Generator().manual_seed(seed))
        own = clip_cov_loss(backend, generator=torch.Generator().manual_seed(seed + 1))  # the second rank's seed
        assert not torch.allclose(single["d_hidden"], own["d_hidden"]), "the seed must decide the selection"
        for r, rank in enumerate(ranks):
            got = rank["clip_cov"][case]
            for k in ("value", "selected", "d_hidden"):
                torch.testing.assert_close(got[k], single[k], atol=1e-5, rtol=1e-5, msg=f"{k}, {case}, rank {r}")
        for k in ("d_weight", "d_bias"):  # each rank holds the gradient of its own rows
            torch.testing.assert_close(torch.cat([rank["clip_cov"][case][k] for rank in ranks]), single[k],
                                       atol=1e-5, rtol=1e-5, msg=f"{k}, {case}")


def test_gloo_ranks_that_disagree_on_a_size_raise_on_every_rank(tmp_path):
    """With vocab_group every rank must pass the same rows (and hidden size, and low-rank term; the same rows of
    logits to token_logprobs), ask for the same statistics (and check) and take the same temperature, softcap,
    logit scale and ignore_index: a rank with other rows or statistics crashed the process in gloo (SIGABRT, a size
    mismatch in a later all-reduce) or left every rank waiting out the collective timeout; NCCL hangs or reads
    garbage; another temperature or ignore_index merged different distributions into silently wrong log-probs. The
    first all-reduce carries them now: every rank raises the same ValueError, and the group stays usable. With
    check=True on every rank, a label past the whole vocabulary raises on every rank. Short timeouts: a regression
    fails, it does not hang."""
    ranks = spawn(tmp_path, ("mismatched",), "cpp", timeout=timedelta(seconds=60), hang_limit_s=180)
    expected = {"rows": "number of rows", "policy_tokens": "number of rows", "hidden_size": "hidden size",
                "low_rank": "low_rank", "logit_rows": "number of rows",
                "logit_statistics": "entropy, sum_p2, argmax and check",
                "empty_vocabulary": "every rank's vocabulary shard",
                "linear_statistics": "entropy, sum_p2, argmax and mean_logit must be asked for alike",
                "linear_softcap": "softcap must be the same", "temperature": "temperature must be the same",
                "ignore_index": "ignore_index must be the same", "check": "argmax and check must be asked for alike",
                "label_past_the_vocabulary": f"labels must lie in [0, {V_ODD})"}
    for r, rank in enumerate(ranks):
        got = rank["mismatched"]
        for case, words in expected.items():
            assert got[case].startswith("ValueError: ") and words in got[case], f"{case}, rank {r}: {got[case]}"
            assert "vocab_group" in got[case] or case == "label_past_the_vocabulary", f"{case}, rank {r}: {got[case]}"
            assert got[case] == ranks[0]["mismatched"][case], f"{case}: the ranks raised different errors"
    hidden, labels = mismatched_rows()
    want = fastalign.linear_logprobs(hidden[:5], vocab_data()["weight"], labels[:5], backend="cpp").logprobs
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(rank["mismatched"]["good"], want, atol=1e-5, rtol=1e-5, msg=f"rank {r}")


# ----------------------------------------------------------------------------- GPU (NCCL on 2 devices, gloo on 1)

def _need_gpus(pg_backend):
    if pg_backend == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"nccl needs {WORLD} CUDA devices, found {torch.cuda.device_count()}")
    if pg_backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")


@pytest.mark.gpu
@pytest.mark.parametrize("pg_backend", ["nccl", "gloo"])
def test_gpu_vocab_parallel_equals_single_rank(tmp_path, pg_backend):
    _need_gpus(pg_backend)
    ranks = spawn(tmp_path, ("vocab", "logit_shards"), "triton", pg_backend=pg_backend, cuda=True)
    single = _cpu(vocab_stats(vocab_data(), "triton", device="cuda:0"))
    check_vocab_parallel([r["vocab"] for r in ranks], single, atol=1e-4, rtol=1e-4)
    for case, (dtype, *_) in LOGIT_SHARD_CASES.items():
        single = _cpu(logit_shard_stats(case, "triton", device="cuda:0"))
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        check_logit_shards([r["logit_shards"][case] for r in ranks], single, case, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("pg_backend", ["nccl", "gloo"])
def test_gpu_causal_lm_step_equals_single_process(tmp_path, pg_backend):
    _need_gpus(pg_backend)
    pytest.importorskip("transformers", reason="the model step needs transformers")
    ranks = spawn(tmp_path, ("hf",), "triton", pg_backend=pg_backend, cuda=True)
    with fastalign.use_backend("triton"):
        single = _cpu(hf_step(hf_data(), slice(None), 1, device="cuda:0"))
    check_data_parallel([r["hf"] for r in ranks], single, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- GPU: flash-attn packed rows

@pytest.mark.gpu
def test_flash_attn_packed_rows_equal_separate_sequences():
    """One packed row (position_ids restarting at each sequence) through a flash_attention_2
    Qwen2 gives, per sequence, the log-probs of that sequence run on its own."""
    pytest.importorskip("flash_attn", reason="the packed path under test is flash-attn's (not installed)")
    transformers = pytest.importorskip("transformers", reason="the model is a transformers Qwen2")
    from fastalign.integrations.hf import causal_lm_logprobs

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attn_implementation="flash_attention_2")
    model = transformers.Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    lengths = [7, 12, 5]
    seqs = [torch.randint(0, 256, (n,), device="cuda") for n in lengths]
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    with torch.no_grad():
        got = causal_lm_logprobs(model, packed, position_ids=position_ids, entropy=True)
        start = 0
        for s, n in zip(seqs, lengths):
            alone = causal_lm_logprobs(model, s[None], entropy=True)
            # entries start .. start+n-2 score tokens inside the sequence; the last one (next
            # sequence's first token) is not scored and is 0
            torch.testing.assert_close(got.logprobs[0, start:start + n - 1], alone.logprobs[0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(got.entropy[0, start:start + n - 1], alone.entropy[0], atol=2e-2, rtol=2e-2)
            if start + n - 1 < got.logprobs.shape[1]:
                assert got.logprobs[0, start + n - 1] == 0
            start += n
