"""The training curves a DPO course draws, from a run's metrics.jsonl rows (hanorec.runs.read_metrics).

Pure functions behind the Train tab's live panels and the notebooks: which panels there are (TRL's metric
names, the KL to the reference, the held-out pair accuracy, and HaRS' lambda beside beta and eta), each
stage's points against the step or the wall time, raw and smoothed by an exponential moving average, and
the sentences that go with them (the held-out accuracy of a stage, why HaNo-DPO's margins swing).

    rows = hanorec.runs.read_metrics(run_dir)
    for panel in panels(rows, x="step", smoothing=0.6):
        for s in panel.series: ...   # s.stage, s.key, s.x, s.raw, s.smooth
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hanorec import logkeys as K

# (title, keys): one panel per title, one line per key and stage; the titles name TRL's keys
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", (K.LOSS,)),
    (f"{K.EVAL_PAIR_ACCURACY} (held-out pairs)", (K.EVAL_PAIR_ACCURACY,)),
    (f"{K.REWARD_CHOSEN} / {K.REWARD_REJECTED}", (K.REWARD_CHOSEN, K.REWARD_REJECTED)),
    (K.REWARD_MARGIN, (K.REWARD_MARGIN,)),
    (f"{K.REWARD_ACCURACY} (per batch)", (K.REWARD_ACCURACY,)),
    (f"{K.LOGP_CHOSEN} / {K.LOGP_REJECTED}", (K.LOGP_CHOSEN, K.LOGP_REJECTED)),
    (f"{K.KL_REFERENCE} (KL to the reference)", (K.KL_REFERENCE,)),
    ("λ: hardness/lambda_mean (HaRS)", (K.LAMBDA_MEAN,)),
    ("β: hardness/beta_mean", (K.BETA_MEAN,)),
    ("η: hardness/eta (responsiveness)", (K.ETA,)),
    ("noise/sigma (NoDO)", (K.NOISE_SIGMA,)),
)
X_AXES = {"step": "step", "time": "elapsed_s"}  # what the x axis reads from a row
DEFAULT_SMOOTHING = 0.6


@dataclass
class Series:
    stage: str
    key: str
    x: list[float]
    raw: list[float]
    smooth: list[float]


@dataclass
class Panel:
    title: str
    keys: tuple[str, ...]
    series: list[Series] = field(default_factory=list)


def _finite(v) -> float | None:
    """A logged value as a float, None for anything else (a damaged line: text, NaN, infinities, bools)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def check_smoothing(smoothing) -> float:
    """The EMA weight as a float in [0, 1), else ValueError in one sentence."""
    s = _finite(smoothing)
    if s is None or not 0 <= s < 1:
        raise ValueError(f"smoothing {smoothing!r} must be a number in [0, 1) (0 = raw, 0.9 = very smooth)")
    return s


def ema(values, smoothing: float = DEFAULT_SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's weight: s_t = w s_(t-1) + (1 - w) v_t, debiased by
    1 - w^t so the first points are not pulled towards 0. w = 0 returns the values."""
    w = check_smoothing(smoothing)
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = w * acc + (1 - w) * float(v)
        out.append(acc / (1 - w**t) if w else float(v))
    return out


def merged_rows(rows: list[dict]) -> list[dict]:
    """One row per (stage, step), in order of first appearance: rows logged for the same step (a training
    step and an evaluation of the held-out pairs, or a step logged again after a resume) are merged, the
    later values winning."""
    out: dict = {}
    for r in rows:
        if not isinstance(r, dict):
            continue
        key = (r.get("stage_dir", r.get("stage")), r.get("step"))
        out[key] = {**out.get(key, {}), **r}
    return list(out.values())


def series(rows: list[dict], key: str, *, x: str = "step", smoothing: float = DEFAULT_SMOOTHING) -> list[Series]:
    """Each stage's points of one key against the step or the wall time (x = "time": the row's elapsed_s,
    seconds since the stage's training began; rows without it are left out), raw and smoothed."""
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r} must be one of {list(X_AXES)}")
    w = check_smoothing(smoothing)
    rows = merged_rows(rows)
    out = []
    for stage in dict.fromkeys(r.get("stage_dir", r.get("stage")) for r in rows):
        pts = []
        for r in rows:
            if r.get("stage_dir", r.get("stage")) != stage:
                continue
            xv, yv = _finite(r.get(X_AXES[x])), _finite(r.get(key))
            if xv is not None and yv is not None:
                pts.append((xv, yv))
        if pts:
            pts.sort(key=lambda p: p[0])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            out.append(Series(str(stage), key, xs, ys, ema(ys, w)))
    return out


# panels shown for a preference stage even before their first point (the held-out accuracy is evaluated every
# few steps, the KL to the reference beside it: their panels are there from the start, and say so while they wait)
PREFERENCE_PANELS = (K.EVAL_PAIR_ACCURACY, K.KL_REFERENCE)


def panels(rows: list[dict], *, x: str = "step", smoothing: float = DEFAULT_SMOOTHING, all_panels: bool = False):
    """The panels (:data:`PANELS`) that have points, in order; with a preference stage's rows, the
    :data:`PREFERENCE_PANELS` too (empty until their first point); all_panels: every panel."""
    preference = any(K.REWARD_MARGIN in r or K.LOGP_CHOSEN in r for r in rows if isinstance(r, dict))
    out = []
    for title, keys in PANELS:
        p = Panel(title, keys, [s for k in keys for s in series(rows, k, x=x, smoothing=smoothing)])
        if p.series or all_panels or (preference and set(keys) & set(PREFERENCE_PANELS)):
            out.append(p)
    return out


def last_value(rows: list[dict], key: str, stage: str | None = None) -> float | None:
    """The newest finite value of a key (in one stage's rows, or any), None when none was logged."""
    for r in reversed(merged_rows(rows)):
        if stage is not None and r.get("stage_dir", r.get("stage")) != stage:
            continue
        v = _finite(r.get(key))
        if v is not None:
            return v
    return None


def held_out_accuracy(rows: list[dict], stage: str | None = None) -> float | None:
    """The stage's last held-out pair accuracy (eval/pair_accuracy on the fixed validation pairs): what the
    run list shows as its accuracy, not the per-batch reward accuracy (a batch of 4 makes that 0, .25 ... 1)."""
    return last_value(rows, K.EVAL_PAIR_ACCURACY, stage)


def noise_note(rows: list[dict], stage: str | None = None) -> str:
    """One sentence for a stage trained under NoDO noise (noise/sigma > 0 logged): why its margins swing."""
    sigma = last_value(rows, K.NOISE_SIGMA, stage)
    if not sigma:
        return ""
    return (
        f"{stage or 'This stage'} trains under NoDO noise (sigma {sigma:g}): each step's rewards, margins and "
        "batch accuracy are measured on a freshly noised forward, so they swing from step to step; read the "
        "smoothed line and the held-out pair accuracy."
    )
