"""mDPO (Wang et al., EMNLP 2024, arXiv 2406.11839): DPO plus an image-conditional term and an anchor.

    r(y)   = logp(y | x) - ref(y | x);  logp0, ref0: the chosen answer with the history's images blanked
    L      = -logsigmoid(beta h)                                          (DPO, response preference)
             -logsigmoid(beta [(logp(y_w) - logp0(y_w)) - (ref(y_w) - ref0(y_w))])   (image-conditional)
             -logsigmoid(beta r(y_w) - delta)                             (anchor: the chosen reward > delta)

The image-conditional term needs one more forward row per example: the chosen answer after the prompt
with its images blanked (Method.needs_imageless; the training step scores it in the same packed batch as
the chosen and rejected answers, under the policy and the reference). What is blanked: the authors' code
(mdpo_trainer.py with its Bunny model's ``mask_visual_tokens``) corrupts the image itself, a random
resized crop keeping 1-20% of its area, and leaves the image tokens and the attention mask as they are.
We also corrupt the pixels and keep the tokens and the mask, but deterministically: every image of the
prompt (the history's posters) is replaced by the blank image whose normalised pixel values are 0 (the
processor's mean colour), so no random draw enters training and a resumed run repeats it exactly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import Knob, LossOutput, Method
from hanorec.methods.knobs import BETA


def mdpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, policy_imageless: Tensor, ref_chosen: Tensor,
              ref_rejected: Tensor, ref_imageless: Tensor, *, beta: float = 0.1, delta: float = 0.0):  # fmt: skip
    """(hanorec.losses.PreferenceLossOutput, image-conditional logits (B,), anchor logits (B,)); all inputs
    (B,) summed log-probs; the logits are detached, before beta."""
    L._check_beta(beta)
    L._check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                        policy_imageless=policy_imageless, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                        ref_imageless=ref_imageless)  # fmt: skip
    dtype = L._compute_dtype(policy_chosen)
    pc, pr, p0 = policy_chosen.to(dtype), policy_rejected.to(dtype), policy_imageless.to(dtype)
    rc, rr, r0 = ref_chosen.to(dtype), ref_rejected.to(dtype), ref_imageless.to(dtype)
    h = (pc - rc) - (pr - rr)
    image_h = (pc - p0) - (rc - r0)
    anchor = pc - rc
    losses = -F.logsigmoid(beta * h) - F.logsigmoid(beta * image_h) - F.logsigmoid(beta * anchor - delta)
    out = L.PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * anchor).detach(),
        rejected_rewards=(beta * (pr - rr)).detach(),
        beta=pc.new_full(pc.shape, beta).detach(),
    )
    return out, image_h.detach(), anchor.detach()


def loss(b, pref, beta, state) -> LossOutput:
    if b.policy_imageless is None or b.ref_imageless is None:
        raise ValueError("mDPO needs the chosen answer's log-probs with the images blanked (LossBatch.*_imageless)")
    out, image_h, anchor = mdpo_loss(
        b.policy_chosen, b.policy_rejected[:, 0], b.policy_imageless, b.ref_chosen, b.ref_rejected[:, 0],
        b.ref_imageless, beta=pref.beta, delta=METHOD.option(pref, "delta"),
    )  # fmt: skip
    logged = {"mdpo/image_margin": float((pref.beta * image_h).mean()),
              "mdpo/image_accuracy": float((image_h > 0).float().mean()),
              "mdpo/anchor_reward": float((pref.beta * anchor).mean())}  # fmt: skip
    return LossOutput.of(out, logged=logged)


METHOD = register(
    Method(
        name="mdpo",
        label="mDPO",
        paper="Wang et al. 2024, mDPO: Conditional Preference Optimization for Multimodal Large Language Models "
        "(EMNLP 2024, arXiv 2406.11839)",
        equation="-logsigmoid(beta h) - logsigmoid(beta [(logp(y_w) - logp0(y_w)) - (ref(y_w) - ref0(y_w))]) "
        "- logsigmoid(beta r(y_w) - delta), 0: the history's images blanked",
        loss_fn=loss,
        knobs=(
            BETA,
            Knob("delta", 0.0, "delta: the anchor's margin, the chosen reward is pushed above it (0: the authors').",
                 label="delta (anchor margin)"),
        ),  # fmt: skip
        needs_imageless=True,
        variant={"noise_target": "none"},
    )
)
