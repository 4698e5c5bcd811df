"""The metrics the TRL drop-in trainers log under TRL's names, gathered over every process as TRL gathers them."""
from __future__ import annotations

import torch
from torch import Tensor


def token_mean(accelerator, values: Tensor, where: Tensor, empty=0.0):
    """The mean of ``values`` at the positions ``where`` over every process (sums and counts gathered, as TRL
    gathers its token metrics); ``empty`` where no process has such a position."""
    gather = accelerator.gather_for_metrics
    total, count = gather(values.detach().float()[where].sum()).sum(), gather(where.sum()).sum()
    return (total / count).item() if count > 0 else empty


def log_num_tokens(trainer, mode: str, attention_mask: Tensor) -> None:
    """TRL's ``num_tokens``: the attended tokens of every process trained on so far (the ranks of a tensor-parallel
    group hold the same batch: counted once)."""
    if mode == "train":
        trainer._total_train_tokens += (trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
                                        // trainer._tp_size)
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def log_pair_metrics(trainer, mode: str, stats: dict, targets: Tensor, parts: int = 2) -> None:
    """TRL's ``logits/chosen``, ``logits/rejected`` (from ``stats["position_mean_logits"]``) and
    ``mean_token_accuracy`` (of the chosen rows), token-weighted over every process, for a batch of
    ``parts`` equal parts (the chosen rows first, then the rejected ones; TPO's gold rows third) from the
    statistics of the loss's own pass (:func:`head_separable_loss`)."""
    log = trainer._metrics[mode]
    scored = (targets != -100).chunk(parts, dim=0)

    def only(i):  # the scored positions of the i-th part
        return torch.cat([p if j == i else torch.zeros_like(p) for j, p in enumerate(scored)])

    mean_logits = stats["position_mean_logits"][:, :-1]
    log["logits/chosen"].append(token_mean(trainer.accelerator, mean_logits, only(0)))
    log["logits/rejected"].append(token_mean(trainer.accelerator, mean_logits, only(1)))
    log["mean_token_accuracy"].append(token_mean(trainer.accelerator, stats["argmax"] == targets, only(0)))


def gathered_mean(accelerator, mean: Tensor, count, *, empty: float = float("nan")) -> float:
    """The mean over every process of values each process holds ``count`` of, from each process's
    ``mean``: ``Σ_p count_p mean_p / Σ_p count_p`` (what TRL's gather of the values themselves, or of
    their sums and counts, gives; with one process it is ``mean``). A process holding none (its
    mean NaN) adds nothing; ``empty`` where no process holds any."""
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device).reshape(())
    local = torch.where(count > 0, mean.detach().float().reshape(()) * count, 0.0)
    total, held = accelerator.gather(torch.stack([local, count]).reshape(1, 2)).reshape(-1, 2).sum(0).tolist()
    return total / held if held > 0 else empty


def reduced_metric(accelerator, value: Tensor, count, per_process=None, *, empty: float = 0.0) -> float:
    """One metric of this process over every process, as TRL reduces it: ``per_process`` (TRL's min, max or
    nanmean) of the processes' own values when given, else :func:`gathered_mean` of ``value`` as the mean of
    ``count`` items of this process (``empty`` where no process holds any)."""
    if per_process is not None:
        return per_process(accelerator.gather(value.detach().float().reshape(1))).item()
    return gathered_mean(accelerator, value, count, empty=empty)
