"""The names of the values a training step logs (metrics.jsonl, the app's curves and tables, the pipeline's
sweep and the report), defined once: renaming one here renames it everywhere.

CURVES: the Train tab's live panels, (key, title) in order.
"""

from __future__ import annotations

LOSS = "loss"
LR = "lr"
REWARD_CHOSEN = "rewards/chosen"
REWARD_REJECTED = "rewards/rejected"
REWARD_ACCURACY = "rewards/accuracies"
REWARD_MARGIN = "rewards/margins"
LOGP_CHOSEN = "logps/chosen"
LOGP_REJECTED = "logps/rejected"
BETA_MEAN = "hardness/beta_mean"
LAMBDA_MEAN = "hardness/lambda_mean"
ETA = "hardness/eta"
NOISE_SIGMA = "noise/sigma"
# KL(policy || reference) per step, over each prompt's trained completions (chosen + rejected), each model's
# probabilities renormalised over that set (hanorec.train.preference.completion_kl; docs/method.md section 6)
KL_REFERENCE = "kl/reference"
# held-out pair accuracy: the share of fixed validation pairs whose chosen completion gains more log-probability
# over the reference than the rejected one (ties count half), every pref.eval_every steps and at step 0
EVAL_PAIR_ACCURACY = "eval/pair_accuracy"
EVAL_KL_REFERENCE = "eval/kl_reference"  # the same KL as KL_REFERENCE, on those validation pairs
EVAL_LOGP_CHOSEN = "eval/logps/chosen"  # the policy's mean summed log-prob of those pairs' chosen answers
EVAL_LOGP_REJECTED = "eval/logps/rejected"  # ... and of their rejected answers

PREFERENCE = (
    REWARD_CHOSEN, REWARD_REJECTED, REWARD_ACCURACY, REWARD_MARGIN, LOGP_CHOSEN, LOGP_REJECTED, ETA, BETA_MEAN,
    LAMBDA_MEAN, NOISE_SIGMA,
)  # fmt: skip

# the sweep's training diagnostics (hanorec.pipeline.run_sweep and sweep_table): the last logged step's
SWEEP_DIAGNOSTICS = (REWARD_ACCURACY, LOGP_CHOSEN, LAMBDA_MEAN)

CURVES = (
    (LOSS, "loss"),
    (REWARD_MARGIN, "reward margin"),
    (REWARD_ACCURACY, "reward accuracy"),
    (ETA, "eta (responsiveness)"),
    (BETA_MEAN, "mean beta"),
    (NOISE_SIGMA, "noise sigma"),
)
