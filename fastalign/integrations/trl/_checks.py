"""The checks a TRL drop-in trainer runs at construction: its config (:func:`check_config`), its model and
reference (:func:`check_model`: PEFT, the head transform, a float64 head), a teacher
(:func:`check_teacher`), and TRL's constructor run with its config checked before and after
(:func:`init_checked`). Each raises naming the config field or the argument."""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from fastalign.integrations.hf import head_adapters_refusal, head_transform, peft_refusal
from fastalign.integrations.trl._head import base_model, install_head


def check_config(args, name: str) -> None:
    """Raise on the fields of a TRL config that the drop-in trainers cannot honour."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(f"{name}.use_liger_kernel: the fastalign trainers replace the LM head and loss that Liger "
                         "would patch; set it to False")


def check_model(trainer, name: str, *, head_dtype: Optional[torch.dtype] = None) -> None:
    """Raise on a model the fastalign head cannot score like TRL's fused head: an architecture without a known
    head transform, a policy or reference with a PEFT adapter set up outside
    the body (:func:`check_peft`), and a policy or reference whose head would run in float64
    (:func:`check_head_dtype`; ``head_dtype``: the dtype the trainer runs its head in, None: the model's)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_peft(model, "model")
    if getattr(trainer, "ref_model", None) is not None:
        check_peft(trainer.accelerator.unwrap_model(trainer.ref_model), "ref_model")
    check_head_transform(base_model(trainer, model), "model")
    check_head_dtype(trainer, trainer.model, "model", head_dtype=head_dtype)
    if getattr(trainer, "ref_model", None) is not None:
        check_head_dtype(trainer, trainer.ref_model, "ref_model", head_dtype=head_dtype)


def check_head_transform(base, name: str) -> None:
    """Raise, naming ``name``, on a ``PreTrainedModel`` the fused head cannot score: an architecture without a known
    head transform (a vision-language model's included)."""
    head_transform(base.config)  # raises for an architecture without a known head transform


def check_peft(model, name: str) -> None:
    """A ``ValueError`` naming ``name`` for a PEFT model whose active adapter the fused head cannot score, at
    construction rather than at the first step (:func:`fastalign.integrations.hf.head_operands` refuses it at every
    call): :func:`fastalign.integrations.hf.peft_refusal` (prompt learning, X-LoRA, ShadowPEFT), then
    :func:`fastalign.integrations.hf.head_adapters_refusal` (DoRA and other adapters on the output head)."""
    if getattr(model, "active_peft_config", None) is None:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    refusal = peft_refusal(model) or (None if head is None else head_adapters_refusal(head))
    if refusal is not None:
        raise ValueError(f"{name}: {refusal}")


def check_head_dtype(trainer, model, name: str, *, head_dtype: Optional[torch.dtype] = None,
                     autocast: bool = True) -> None:
    """A ``TypeError`` naming ``name`` for a float64 ``model`` whose head would run in float64: the fused head runs
    in float32, bfloat16 or float16. It runs in ``head_dtype`` when given, else (``autocast``: a head that runs
    under the trainer's autocast) in the trainer's mixed precision (bf16 / fp16) when on, else in the model's dtype."""
    if head_dtype is not None or (autocast and trainer.accelerator.mixed_precision in ("bf16", "fp16")):
        return
    if base_model(trainer, model).dtype == torch.float64:
        raise TypeError(f"{name}: its dtype is torch.float64, which the fastalign trainers' fused LM head does not "
                        f"run in: cast the model to float32, bfloat16 or float16 (e.g. {name}.float(), or "
                        f"dtype=torch.float32 when loading it) before passing it to the trainer")


def check_teacher(trainer, teacher, name: str = "teacher_model") -> None:
    """Raise on a teacher the fused head cannot score (a float64 head, an architecture
    without a known head transform), naming it; then install the fused head on it."""
    check_head_dtype(trainer, teacher, name)
    check_head_transform(base_model(trainer, teacher), name)
    install_head(trainer.accelerator.unwrap_model(teacher))


def init_checked(trainer, init, args, kwargs, check) -> None:
    """Run TRL's trainer ``init`` with ``check`` applied to its config: before, when the caller
    passes one (so a refused option fails before any model work), and after, on the config TRL
    settled on (a default one when none was passed)."""
    try:
        config = inspect.signature(init).bind_partial(None, *args, **kwargs).arguments.get("args")
    except TypeError as error:  # an unknown or repeated keyword: Python's message for the call, with its name
        raise TypeError(f"{type(trainer).__name__}.__init__() {error}") from None
    if config is not None:
        check(config)
    init(trainer, *args, **kwargs)
    check(trainer.args)
