"""Liger-Kernel 0.8's losses on given distributions (``liger_kernel.transformers``): ``LigerJSD``,
``LigerKLDIVLoss`` and ``LigerTVDLoss``, and their functions ``liger_jsd``, ``liger_kl_div`` and ``liger_tvd``,
computed by :func:`fastalign.elementwise_divergence` (one pass over the rows forward, one backward, no host
synchronisation). Same constructors, ``forward`` signatures, reductions and output dtypes; re-exported by
:mod:`fastalign.integrations.liger` (the functions also by :mod:`fastalign.integrations.liger_functional`)::

    from fastalign.integrations.liger import LigerJSD   # was: from liger_kernel.transformers import LigerJSD

The inputs are log-probabilities or probabilities as given (no softmax) and the gradient is taken element by
element, as Liger: ``d loss / d x_j`` is the term's partial derivative in ``x_j`` (after a ``log_softmax``,
autograd's backward of it gives the logits' gradient). The targets are constants (no gradient), as Liger. With
``n`` the count of rows whose ``shift_labels`` is not ``ignore_index`` (every row without them):

- JSD (``log_q`` the student's log-probs, ``log_p`` the teacher's): ``sum_rows JSD_beta / n`` in the input's
  dtype (docs/math.md#elementwise-divergence; beta 0 the forward KL, 1 the reverse KL).
- KL (``y_pred`` log-probs, ``y_true`` probabilities or, with ``log_target``, log-probs): torch's ``KLDivLoss``
  terms ``y (log max(y, eps) - x)``, fp32, reduced by ``reduction`` (``"none"``, ``"sum"``, ``"mean"`` over every
  element, ``"batchmean"`` over ``y_pred.shape[0]``).
- TVD (``p``, ``q`` probabilities): ``|p - q| / 2``, fp32, ``"none"`` (ignored rows 0), ``"sum"``, ``"mean"``
  (``/ (n V)``) or ``"batchmean"`` (``/ n``).

Where fastalign differs from Liger: in the JSD a zero probability adds 0 (Liger's terms are NaN where a log-prob
is ``-inf``), no count of rows is read on the host (Liger synchronises for ``n``; here ``n = 0`` gives 0, where
Liger's TVD raises ``ZeroDivisionError``), and an unknown ``reduction``, a ``beta`` outside [0, 1] or an ``eps <= 0``
is a ``ValueError`` naming it. Inputs of different dtypes are read as fp32, as Liger's kernels read them.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastalign import _validate
from fastalign._options import check_choice
from fastalign.divergence import check_pair, elementwise_divergence
from fastalign.integrations._liger_checks import legacy_reduction_arguments, reduced
from fastalign.integrations._live_options import LiveOptions

__all__ = ["LigerJSD", "LigerKLDIVLoss", "LigerTVDLoss", "liger_jsd", "liger_kl_div", "liger_tvd"]

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _read_alike(first: tuple[str, Tensor], second: tuple[str, Tensor], shift_labels: Optional[Tensor] = None):
    """The two ``(name, tensor)`` arguments in one dtype: as given when they share one, else both fp32 (exact),
    checked with the labels as :func:`~fastalign.elementwise_divergence` checks them, each error naming the
    forward's own argument."""
    (a, x), (b, y) = first, second
    for name, t in (first, second):
        _validate.floating(name, t, min_dim=1)
    if x.dtype != y.dtype:
        x, y = x.float(), y.float()
    check_pair((a, x), (b, y), shift_labels, "shift_labels")
    return x, y


def _scored_rows(x: Tensor, labels: Optional[Tensor], ignore_index: int):
    """n: the count of rows scored (with labels a device tensor: nothing is read on the host)."""
    if labels is None:
        return x.numel() // max(x.shape[-1], 1)
    return (labels != ignore_index).sum().float()


class LigerJSD(LiveOptions, nn.Module):
    r"""Liger's ``LigerJSD``: the generalized Jensen-Shannon divergence of given log-probabilities,
    ``forward(log_q, log_p, shift_labels=None)`` with ``log_q`` the student's ``[BT, V]``, ``log_p`` the teacher's:

    .. math::

        \mathrm{JSD}_\beta = \beta\,KL(P \| M) + (1-\beta)\,KL(Q \| M),\quad M = \beta P + (1-\beta) Q

    (forward KL at ``beta = 0``, reverse KL at 1), summed over the rows whose ``shift_labels`` is not
    ``ignore_index`` and divided by their count; the input's dtype. ``beta`` and ``ignore_index`` are attributes,
    read at each call."""

    OPTIONS = ("beta", "ignore_index")

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        _validate.unit_interval("beta", self.beta)
        _validate.index_value("ignore_index", self.ignore_index)

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Optional[Tensor] = None) -> Tensor:
        return self._named(("log_q", log_q), ("log_p", log_p), shift_labels)

    def _named(self, first: tuple[str, Tensor], second: tuple[str, Tensor], shift_labels=None) -> Tensor:
        """:meth:`forward` of ``(name, tensor)`` arguments, each error naming its caller's argument."""
        x, y = _read_alike(first, second, shift_labels)
        rows = elementwise_divergence(x, y, shift_labels, divergence="jsd", beta=float(self.beta),
                                      ignore_index=self.ignore_index)
        return reduced(rows.sum(), "batchmean", _scored_rows(x, shift_labels, self.ignore_index), 1).to(
            first[1].dtype)


class LigerKLDIVLoss(LiveOptions, nn.KLDivLoss):
    r"""Liger's ``LigerKLDIVLoss``, an ``nn.KLDivLoss`` (its constructor: ``size_average``, ``reduce``, ``reduction``
    default ``"mean"``, ``log_target``) with ``eps``: ``forward(y_pred, y_true)``, ``y_pred`` log-probabilities,
    ``y_true`` probabilities (or log-probabilities with ``log_target``), the terms

    .. math::

        y\,(\log \max(y, \epsilon) - x) \quad\text{or}\quad e^{y}\,(y - x)

    fp32, reduced as ``nn.KLDivLoss`` reduces them. ``eps``, ``reduction`` and ``log_target`` are attributes, read
    at each call."""

    OPTIONS = ("eps", "reduction", "log_target")

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        nn.KLDivLoss.__init__(self, *args, **kwargs)  # reduction from torch's legacy size_average / reduce too
        self._configure_options(dict(eps=eps, reduction=self.reduction, log_target=self.log_target))

    def _configure(self) -> None:
        _validate.positive("eps", self.eps)
        check_choice("reduction", self.reduction, REDUCTIONS)
        _validate.boolean("log_target", self.log_target)

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        return self._named(("y_pred", y_pred), ("y_true", y_true))

    def _named(self, first: tuple[str, Tensor], second: tuple[str, Tensor]) -> Tensor:
        """:meth:`forward` of ``(name, tensor)`` arguments, each error naming its caller's argument."""
        x, y = _read_alike(first, second)
        none = self.reduction == "none"
        out = elementwise_divergence(x, y, divergence="kl", log_target=bool(self.log_target), eps=float(self.eps),
                                     elementwise=none)
        if none:
            return out
        rows = x.shape[0]  # torch's "batchmean": over the first dim; "mean": over every element
        return reduced(out.sum(), self.reduction, rows, x.numel() // max(rows, 1))


class LigerTVDLoss(LiveOptions, nn.Module):
    r"""Liger's ``LigerTVDLoss``: the total variation distance of given probabilities, ``forward(p, q,
    shift_labels=None)`` with ``p``, ``q`` ``[BT, V]``: the terms ``|p - q| / 2`` (0 on the rows whose
    ``shift_labels`` is ``ignore_index``), fp32, reduced by ``reduction``: ``"none"``, ``"sum"``, ``"mean"``
    (divided by ``n V``) or ``"batchmean"`` (by ``n``), ``n`` the count of rows scored. The gradient reaches ``p``
    (``sign(p - q) / 2``, 0 at a tie), not ``q``. ``reduction`` and ``ignore_index`` are attributes, read at each
    call."""

    OPTIONS = ("reduction", "ignore_index")

    def __init__(self, reduction: str = "batchmean", ignore_index: int = -100):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        check_choice("reduction", self.reduction, REDUCTIONS)
        _validate.index_value("ignore_index", self.ignore_index)

    def forward(self, p: Tensor, q: Tensor, shift_labels: Optional[Tensor] = None) -> Tensor:
        return self._named(("p", p), ("q", q), shift_labels)

    def _named(self, first: tuple[str, Tensor], second: tuple[str, Tensor], shift_labels=None) -> Tensor:
        """:meth:`forward` of ``(name, tensor)`` arguments, each error naming its caller's argument."""
        x, y = _read_alike(first, second, shift_labels)
        none = self.reduction == "none"
        out = elementwise_divergence(x, y, shift_labels, divergence="tvd", ignore_index=self.ignore_index,
                                     elementwise=none)
        if none:
            return out
        return reduced(out.sum(), self.reduction, _scored_rows(x, shift_labels, self.ignore_index), x.shape[-1])


def liger_jsd(input: Tensor, target: Tensor, shift_labels: Optional[Tensor] = None, beta: float = 0.5,
              ignore_index: int = -100) -> Tensor:
    """Liger's ``liger_jsd``: :class:`LigerJSD` ``(beta, ignore_index)(input, target, shift_labels)``."""
    return LigerJSD(beta, ignore_index)._named(("input", input), ("target", target), shift_labels)


def liger_kl_div(input: Tensor, target: Tensor, size_average: bool = True, reduce: bool = True,
                 reduction: str = "mean", log_target: bool = False, eps: float = 1e-10) -> Tensor:
    """Liger's ``liger_kl_div``: :class:`LigerKLDIVLoss` ``(eps, reduction=reduction, log_target=log_target)(input,
    target)``. ``size_average`` and ``reduce`` are ``torch.nn.functional.kl_div``'s legacy arguments, which Liger's
    function takes and ignores: their default (True) is accepted, any other value raises ``ValueError`` naming it
    (pass ``reduction``)."""
    legacy_reduction_arguments("liger_kl_div", True, size_average=size_average, reduce=reduce)
    return LigerKLDIVLoss(eps, reduction=reduction, log_target=log_target)._named(("input", input),
                                                                                    ("target", target))


def liger_tvd(input: Tensor, target: Tensor, shift_labels: Optional[Tensor] = None, reduction: str = "mean",
              ignore_index: int = -100) -> Tensor:
    """Liger's ``liger_tvd``: :class:`LigerTVDLoss` ``(reduction, ignore_index)(input, target, shift_labels)``
    (note the function's default reduction, ``"mean"``, as Liger's)."""
    return LigerTVDLoss(reduction, ignore_index)._named(("input", input), ("target", target), shift_labels)
