"""Option attributes that take effect when assigned, as in the trainers' own loss modules.

OpenRLHF's and Liger's loss modules read ``self.beta``, ``self.clip_eps_low`` and the like at every call,
so a schedule that assigns ``loss_fn.beta = ...`` between steps changes the loss. An adapter that
builds its fastalign configuration once keeps it in step with its attributes through
:class:`LiveOptions`: assigning one of ``OPTIONS`` checks the options again and rebuilds what depends on
them (``_configure``); an invalid value raises there, naming the option, and leaves the module as it was.
An adapter whose trainer accepts assignments in any order (OpenRLHF's) checks there only the value assigned,
and how the options combine at its next call, so that no valid configuration depends on the order.
"""
from __future__ import annotations

from fastalign._options import AUTO_OR_BOOL, check_choice


class LiveOptions:
    """Mixin for an ``nn.Module`` adapter: ``OPTIONS`` names its option attributes, and the adapter's own
    ``_configure()`` checks them and builds what the forward reads from them. ``__init__`` sets the
    options with one call of :meth:`_configure_options`."""

    OPTIONS: tuple[str, ...] = ()

    def _configure_options(self, values: dict) -> None:
        """Set each of ``OPTIONS`` from ``values`` (the constructor's ``locals()``), check them together
        (``_configure``) and make later assignments live."""
        for name in self.OPTIONS:
            setattr(self, name, values[name])
        self._configure()
        object.__setattr__(self, "_options_live", True)

    def __setattr__(self, name, value):
        if name not in self.OPTIONS or not self.__dict__.get("_options_live"):
            return super().__setattr__(name, value)
        previous = getattr(self, name)
        super().__setattr__(name, value)
        try:
            self._configure()
        except Exception:
            super().__setattr__(name, previous)
            self._configure()
            raise


class SinglePassAttribute:
    """The ``single_pass`` attribute of the Liger adapters (beside Liger's options, not in its constructors):
    ``"auto"`` (default) computes the gradients in the forward, in one pass through the head, where fastalign's
    loss would; such a loss can be differentiated once per forward. ``False`` takes the two passes, whose graph
    can be differentiated again (``backward(retain_graph=True)`` then a second ``backward``, as Liger allows);
    ``True`` asks for the single pass. Anything else raises ``ValueError`` at the assignment."""

    _single_pass = "auto"

    @property
    def single_pass(self):
        return self._single_pass

    @single_pass.setter
    def single_pass(self, value) -> None:
        check_choice("single_pass", value, AUTO_OR_BOOL)
        object.__setattr__(self, "_single_pass", value)
