"""Knobs several methods share: fields of the pref section (pref.beta, pref.label_smoothing, ...)."""

from __future__ import annotations

from hanorec.methods.base import Knob, in_range, positive

BETA = Knob("beta", 0.1, "beta: the strength of the implicit KL penalty (HaNo-DPO: beta0).", field=True,
            check=positive, label="beta")  # fmt: skip
LABEL_SMOOTHING = Knob(
    "label_smoothing", 0.0, "Label smoothing eps of the sigmoid loss (0: plain).", field=True,
    check=in_range(0.0, 0.5), label="label smoothing",
)  # fmt: skip
K_NEGATIVES = Knob("k_negatives", 3, "K: rejected completions per example.", type=int, field=True, check=positive,
                   label="K negatives")  # fmt: skip
HARDNESS = Knob("hardness", True, "HaRS: per-pair hardness weight lambda.", type=bool, field=True, label="hardness lambda")
RESPONSIVENESS = Knob("responsiveness", True, "HaRS: the batch responsiveness eta.", type=bool, field=True,
                      label="responsiveness eta")  # fmt: skip
SFT_WEIGHT = Knob("sft_weight", 0.0, "gamma: weight of an SFT term (mean-token NLL of the chosen answer).",
                  field=True, check=lambda v: None if v >= 0 else "must be >= 0", label="SFT weight")  # fmt: skip


def epsilon(default: float, help: str) -> Knob:
    """A flip-rate knob eps in [0, 0.5) (cDPO, rDPO), a key of pref.options."""
    return Knob("epsilon", default, help, check=in_range(0.0, 0.5), label="epsilon (label noise)")
