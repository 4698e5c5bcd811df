"""Config fields TRL 1.16's preference trainers read from ``self.args`` at every step, changed between steps (a
TrainerCallback receives ``args``): the drop-in's loss (``trainer.fastalign_loss``) follows them as TRL's
``_compute_loss`` does, on the stand-ins of test_parity_trl_preference.py (loss, gradient and metrics at 1e-6)."""
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: `pip install trl==1.16.*` to run the parity tests")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from test_parity_trl_preference import (DPO_METRICS, _close, _compare_metrics, _config,  # noqa: E402
                                        _dpo_batch, _trl_dpo)
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastalign.integrations.trl.dpo_trainer import DPOTrainer as DropIn  # noqa: E402

#: each config field DPOTrainer._compute_loss reads from ``self.args`` at every step: (config, value set later)
DPO_LIVE_ARGS = {"discopop_tau": (dict(loss_type="discopop", beta=0.3, discopop_tau=0.05), 2.0)}


#: trainer -> (module of TRL's trainer, the methods of its loss step); GRPO's: test_parity_trl_grpo.py
_LOSS_METHODS = {
    "DPO": ("trl", ("_compute_loss",)),
    "KTO": ("trl", ("_compute_loss",)),
    "RLOO": ("trl", ("_compute_loss",)),
    "CPO": ("trl.experimental.cpo", ("get_batch_loss_metrics", "concatenated_forward", "cpo_loss")),
    "ORPO": ("trl.experimental.orpo", ("get_batch_loss_metrics", "concatenated_forward", "odds_ratio_loss")),
}
#: read by the reference model's forward, not the loss (the drop-ins read it from ``self.args`` too)
_NOT_LOSS = {"gradient_checkpointing_kwargs"}


@pytest.mark.parametrize("trainer", list(_LOSS_METHODS))
def test_drop_in_follows_every_config_field_trl_reads_at_every_step(trainer):
    """The drop-in's table of config fields read at every step is the set of ``self.args`` loss fields in TRL's
    loss step: DPO's ``discopop_tau``, none for KTO, RLOO, CPO and ORPO."""
    import importlib

    import fastalign.integrations.trl as fa_trl
    module, methods = _LOSS_METHODS[trainer]
    cls = getattr(importlib.import_module(module), f"{trainer}Trainer")
    read = {field for method in methods
            for field in re.findall(r"self\.args\.(\w+)", inspect.getsource(getattr(cls, method)))}
    table = getattr(fa_trl, f"{trainer}Trainer").fastalign_loss
    followed = {name[len("args."):] for name in table.options if name.startswith("args.")}
    assert followed == read - _NOT_LOSS
    assert followed == (set(DPO_LIVE_ARGS) if trainer == "DPO" else set())


@pytest.mark.parametrize("field", list(DPO_LIVE_ARGS))
def test_dpo_config_field_changed_between_steps_matches_trl(field):
    """``args.discopop_tau = 2.0`` after construction: TRL's next step uses it; the drop-in's loss kept 0.05."""
    config, value = DPO_LIVE_ARGS[field]
    args = _config(DPOConfig, **config)
    live = DropIn.fastalign_loss
    trainer = SimpleNamespace(args=args, **{attr: getattr(args, option) for attr, option in live.options.items()
                                            if isinstance(option, str)})
    constructed = live.__get__(trainer)
    lp, ref, mask, _ = _dpo_batch(seed=5)
    a = lp.clone().requires_grad_()
    loss_before, _ = _trl_dpo(args, a, ref, mask, None)
    setattr(args, field, value)  # what a callback's on_step_end(args, ...) may do
    changed = live.__get__(trainer)
    assert changed is not constructed and live.__get__(trainer) is changed  # rebuilt once
    loss_t, m_t = _trl_dpo(args, a, ref, mask, None)
    (g_t,) = torch.autograd.grad(loss_t, a)
    assert not torch.allclose(loss_before, loss_t), "the change has no effect"
    b = lp.clone().requires_grad_()
    loss_f, m_f = changed(b, mask, ref)
    (g_f,) = torch.autograd.grad(loss_f, b)
    _close(loss_f, loss_t, "loss")
    _close(g_f, g_t, "d loss / d per-token log-probs")
    _compare_metrics(m_f, m_t, DPO_METRICS)
