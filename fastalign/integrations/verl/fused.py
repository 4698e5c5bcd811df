"""fastalign as verl's fused log-prob / entropy backend (``impl_backend=fastalign``).

verl's FSDP actor can replace the model's logits with a fused head: with
``actor_rollout_ref.model.use_fused_kernels=True`` it patches the model's forward to hand the
last hidden states and ``lm_head.weight`` to ``FusedLinearForPPO(impl_backend=...)``, chosen by
``actor_rollout_ref.model.fused_kernel_options.impl_backend`` (``torch`` or ``liger``; ``triton``
takes another path). This module adds the value ``fastalign``::

    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=fastalign

:class:`FusedLinearForPPO` has verl's constructor and ``forward(hidden_states, vocab_weights,
input_ids, temperature=1.0) -> (log_probs, entropy)`` and computes them with
:func:`fastalign.linear_logprobs`, with the head transform of the model's architecture
(:func:`fastalign.integrations.hf.head_transform`: Gemma 2/3's softcap, Cohere's and Granite's logit
scale; Inkling's first rows of its padded head, :func:`fastalign.integrations.hf.head_rows`), so the log-probs
are those of the model's own logits, as verl's non-fused path computes them:

    z = softcap * tanh(logit_scale * hidden_states @ vocab_weights.T / softcap) / temperature  (no tanh without softcap)
    log_probs = z[input_ids] - logsumexp(z)           (float32)
    entropy   = logsumexp(z) - sum_j softmax(z)_j z_j (the dtype of hidden_states, as verl)

with fp32 accumulation and without the ``[tokens, V]`` logits (chunks of at most
``FASTALIGN_LINEAR_CHUNK_MIB``); gradients flow to ``hidden_states`` and ``vocab_weights``. A
``DTensor`` weight (FSDP2) is gathered with ``full_tensor()`` (differentiable). The operands take the dtype
of verl's non-fused product: the autocast dtype under ``torch.autocast`` (as the model's ``nn.Linear``), else,
for a ``DTensor`` weight, the hidden states' (FSDP2 casts the head it gathers to its ``param_dtype``, the body's:
verl's default bf16 mixed precision keeps an fp32 head sharded apart when the embeddings are untied, which the
fused forward reads without calling it); a plain weight of another dtype raises ``TypeError``, as the product.

:func:`enable` (called by the ``verl.plugins`` entry point, so by ``import verl``) teaches verl's
two switch points the new value: ``monkey_patch.patch_forward_with_backends`` installs verl's own
fused forward for ``fastalign`` (as for ``torch``) and marks the model with its head transform (an
architecture missing from :data:`fastalign.integrations.hf.HEAD_TRANSFORMS` raises ``ValueError``
until stated with :func:`~fastalign.integrations.hf.register_head_transform`), and
``verl.utils.experimental.torch_functional.FusedLinearForPPO`` becomes a subclass of verl's class
that builds this module for ``impl_backend="fastalign"``. ``monkey_patch`` imports
``transformers``, so its patch is applied when verl imports it, not before. Idempotent.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _dtensor, _validate
from fastalign.integrations.hf import autocast_dtype, head_rows, head_transform
from fastalign.integrations.verl._on_import import patch_modules
from fastalign.linear import linear_logprobs

__all__ = ["BACKEND", "FusedLinearForPPO", "enable"]

#: the value of ``fused_kernel_options.impl_backend`` that selects fastalign.
BACKEND = "fastalign"


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` computed by :func:`fastalign.linear_logprobs`.

    ``chunk_size``: ``None`` or a positive token count, accepted as verl's class takes it; chunking
    does not change the result, and fastalign sizes its chunks by a memory budget
    (``FASTALIGN_LINEAR_CHUNK_MIB``) instead. ``impl_backend`` must be ``"fastalign"``.
    ``logit_scale`` / ``softcap``: the model's head transform (those of :func:`fastalign.linear_logprobs`);
    verl's patched forward passes its model's, read by :func:`fastalign.integrations.hf.head_transform`.
    ``rows``: how many of the first rows of ``vocab_weights`` the model's logits keep (None: all; a head padded
    past its vocabulary, :func:`fastalign.integrations.hf.head_rows`: Inkling).
    """

    def __init__(self, chunk_size: Optional[int] = None, impl_backend: str = BACKEND, *,
                 logit_scale: float = 1.0, softcap: Optional[float] = None, rows: Optional[int] = None):
        super().__init__()
        if impl_backend != BACKEND:
            raise ValueError(f"impl_backend must be {BACKEND!r} for fastalign's FusedLinearForPPO, got {impl_backend!r}")
        if chunk_size is not None:
            _validate.at_least("chunk_size", chunk_size)
        self.chunk_size, self.impl_backend = chunk_size, BACKEND
        self.logit_scale, self.softcap, self.rows = logit_scale, softcap, rows

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        if input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                             f"{tuple(hidden_states.shape[:-1])}")
        out_dtype = hidden_states.dtype
        hidden, weight = _operands(hidden_states, vocab_weights)
        stats = linear_logprobs(hidden, weight[:self.rows], input_ids.to(torch.int64), temperature=float(temperature),
                                logit_scale=self.logit_scale, softcap=self.softcap, entropy=True)
        return stats.logprobs, stats.entropy.to(out_dtype)


def _operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(hidden, weight)`` gathered and in the dtype verl's non-fused ``hidden @ weight.T`` runs in (module
    docstring): the autocast dtype, else a ``DTensor`` weight's cast to the hidden states' dtype
    (:func:`fastalign._dtensor.head`)."""
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden, weight, _, _ = _dtensor.head(hidden, weight)
    return hidden, weight


class _Backend(str):
    """``"fastalign"`` carrying the model's head transform: verl's fused forward builds its
    ``FusedLinearForPPO(impl_backend=model._verl_fused_kernels_backend)`` from this value alone."""

    def __new__(cls, logit_scale: float, softcap: Optional[float], rows: Optional[int] = None):
        self = super().__new__(cls, BACKEND)
        self.logit_scale, self.softcap, self.rows = logit_scale, softcap, rows
        return self

    def __getnewargs__(self):  # copy, pickle and torch.save rebuild it from these (str's own gives the string)
        return self.logit_scale, self.softcap, self.rows


def _fused_linear_switch(verl_class: type) -> type:
    """A subclass of verl's ``FusedLinearForPPO`` whose ``impl_backend="fastalign"`` builds fastalign's module."""

    class Switch(verl_class):
        __doc__ = verl_class.__doc__

        def __new__(cls, chunk_size: int = 512, impl_backend: str = "torch"):
            if impl_backend == BACKEND:
                return FusedLinearForPPO(chunk_size, BACKEND, logit_scale=getattr(impl_backend, "logit_scale", 1.0),
                                         softcap=getattr(impl_backend, "softcap", None),
                                         rows=getattr(impl_backend, "rows", None))
            return super().__new__(cls)

    Switch.verl_class = verl_class
    Switch.__name__ = Switch.__qualname__ = verl_class.__name__
    Switch.__module__ = verl_class.__module__
    return Switch


def _patch_torch_functional(module) -> None:
    current = module.FusedLinearForPPO
    if getattr(current, "verl_class", None) is None:
        module.FusedLinearForPPO = _fused_linear_switch(current)


def _patch_monkey_patch(module) -> None:
    original = module.patch_forward_with_backends
    if getattr(original, "fastalign_wrapped", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            # the model's logits are its head transform of hidden @ lm_head.T; unlisted architectures raise
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            padded = None if head is None else head.weight.shape[0]  # (a DTensor's shape is the whole head's)
            rows = None if padded is None else head_rows(model.config, padded)
            backend = _Backend(*head_transform(model.config), None if rows == padded else rows)
            # verl's fused forward (the one its torch backend uses) asks FusedLinearForPPO for this backend
            original(model, use_fused_kernels=True, fused_kernels_backend="torch")
            if getattr(model, "_verl_fused_kernels_backend", None) == "torch":
                model._verl_fused_kernels_backend = backend
            return
        original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends.fastalign_wrapped = True
    patch_forward_with_backends.__wrapped__ = original
    module.patch_forward_with_backends = patch_forward_with_backends


_PATCHES = {"verl.utils.experimental.torch_functional": _patch_torch_functional,
            "verl.models.transformers.monkey_patch": _patch_monkey_patch}


def enable() -> None:
    """Make ``impl_backend=fastalign`` a backend of verl's fused kernels (idempotent)."""
    patch_modules(_PATCHES)
