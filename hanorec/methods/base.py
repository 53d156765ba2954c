"""What a preference method is: its knobs, what it needs, its loss over one common batch, its ablations.

A method is one :class:`Method` object registered with :func:`register` (hanorec/methods/<name>.py holds
each built-in one). Every face of the project (configuration checks and help, the CLI, the comparison,
jobs, run listing, the app's tabs) asks the registry instead of comparing method names.

The loss sees a :class:`LossBatch`: the policy's and the reference's summed completion log-probs, the
completions' token counts, the HaRS hardness weights, and the function that gathers a tensor across
processes. It returns a :class:`LossOutput`: the per-example losses, the rewards and beta it used (for the
logged metrics) and any extra values to log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from hanorec.errors import UserError


class MethodError(UserError, ValueError):
    """A preference method or one of its knobs was named or set wrongly (one sentence)."""


@dataclass(frozen=True)
class Knob:
    """A setting a method reads.

    name: the key. ``field=True``: a shared field of the pref section (``pref.beta``); otherwise a key of
    ``pref.options`` that only this method reads (``--pref.options.gamma=0.5``).
    check: value -> None, or the sentence saying why the value is wrong.
    """

    name: str
    default: Any
    help: str
    type: type = float
    check: Callable[[Any], str | None] | None = None
    field: bool = False
    label: str = ""

    @property
    def key(self) -> str:
        return f"pref.{self.name}" if self.field else f"pref.options.{self.name}"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True) -> Callable:
    """A knob check: lo <= value < hi (bounds open or closed as asked)."""

    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            return f"must be in {left}{lo:g}, {hi:g}{right}"
        return None

    return check


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


@dataclass
class LossBatch:
    """One micro-batch of summed completion log-probs (B examples, K rejected completions each).

    policy_chosen (B,), policy_rejected (B, K), ref_chosen (B,), ref_rejected (B, K): summed log-probs
    under the policy (with gradient) and the reference (none). chosen_lengths (B,), rejected_lengths
    (B, K): completion token counts. hardness_lambda (B,): HaRS lambda_n (1 when hardness is off).
    gather: local tensor -> the tensor gathered across processes (a collective: every process calls it).
    policy_imageless, ref_imageless (B,): the chosen answer's summed log-probs with the prompt's images
    blanked, for a method that declares ``needs_imageless`` (None otherwise).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    hardness_lambda: Tensor
    gather: Callable[[Tensor], Tensor] = lambda t: t  # noqa: E731
    policy_imageless: Tensor | None = None
    ref_imageless: Tensor | None = None


@dataclass
class LossOutput:
    """losses (B,): the training loss is their mean (or ``loss`` when the method weights examples);
    chosen_rewards (B,), rejected_rewards (B,) or (B, K), beta (B,): detached, for the logged metrics;
    eta: HaRS responsiveness (None when not used); logged: extra method values (float per name)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    beta: Tensor
    eta: Tensor | None = None
    logged: dict = field(default_factory=dict)
    loss: Tensor | None = None

    @classmethod
    def of(cls, out, **kw) -> LossOutput:
        """From a hanorec.losses.PreferenceLossOutput (losses, rewards, beta, eta)."""
        return cls(out.losses, out.chosen_rewards, out.rejected_rewards, out.beta, eta=out.eta, **kw)

    def total(self) -> Tensor:
        return self.losses.mean() if self.loss is None else self.loss


@dataclass
class Method:
    """One preference method (see the module docstring).

    needs_reference: the loss reads the reference log-probs (False: the reference forward is skipped).
    needs_imageless: the loss reads the chosen answer scored after the prompt with its images blanked
    (LossBatch.policy_imageless / ref_imageless): one more completion row per example in the same forwards.
    k_rejected: the loss takes K > 1 rejected completions (pref.k_negatives).
    hars: 'builtin' (HaNo-DPO), 'addon' (pref.hars=true puts HaRS's beta on it, beyond the paper) or 'no'.
    stateful: it carries state across batches (``init_state``), saved in every checkpoint.
    variant: pref overrides of the method's own row in the comparison and the app's stage list.
    ablations: label suffix -> pref overrides on top of ``variant`` ('w/o HaRS' -> 'HaNo-DPO w/o HaRS').
    in_paper_comparison: part of `compare`'s default set (the paper's table 3).
    loss_fn(batch, pref, beta, state) -> LossOutput; beta is pref.beta, or HaRS's (B,) tensor.
    """

    name: str
    label: str
    paper: str
    equation: str
    loss_fn: Callable[..., LossOutput]
    knobs: tuple[Knob, ...] = ()
    needs_reference: bool = True
    needs_imageless: bool = False
    k_rejected: bool = False
    hars: str = "no"
    stateful: bool = False
    init_state: Callable[[], dict] | None = None
    variant: dict = field(default_factory=dict)
    ablations: dict = field(default_factory=dict)
    in_paper_comparison: bool = False
    beyond_paper: bool = False

    def loss(self, batch: LossBatch, pref, beta, state: dict | None = None) -> LossOutput:
        return self.loss_fn(batch, pref, beta, state)

    def option(self, pref, name: str):
        """The value of this method's knob `name` in a pref section (its default when unset)."""
        for k in self.knobs:
            if k.name == name:
                return getattr(pref, k.name) if k.field else (pref.options or {}).get(k.name, k.default)
        raise MethodError(f"{self.name} has no knob named {name!r}")

    def needs(self) -> list[str]:
        out = []
        if self.needs_reference:
            out.append("reference model")
        if self.k_rejected:
            out.append("K rejected")
        if self.needs_imageless:
            out.append("chosen without images (one more row)")
        if self.hars == "builtin":
            out.append("hardness lambda")
        if self.stateful:
            out.append("state across batches (in checkpoints)")
        return out
