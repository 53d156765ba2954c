"""Train tab: launch a small run in the background, watch it live, stop and resume it, compare past runs.

Every handler is a few lines over hanorec.jobs (submit, status, stop, resume: the run is a subprocess of the
CLI, one at a time, later launches wait in a queue) and hanorec.runs (the run folders, their metrics logs
and results). The curves read the run's own metrics.jsonl; `log_with` mirrors the same metrics to
TensorBoard, W&B or trackio through accelerate where one is installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.common import (
    USER_ERRORS,
    download_buttons,
    number,
    number_field,
    owner_state,
    owner_token,
    slider_field,
)
from hanorec import curves as C
from hanorec import logkeys as K
from hanorec import methods, presets, report, runs
from hanorec.backbones import tiny_presets
from hanorec.jobs import JobError, available_trackers, stages

PRESETS = tiny_presets()  # one per family, the paper's first
TASKS = ("hit3", "hit1", "next1")
FROM_SCRATCH = "train SFT first, in this run"
NO_TRACKER = "none (metrics.jsonl only)"
# A launch with a tiny backbone starts from the lesson preset (configs/lab.yaml through hanorec.presets, the
# Compare tab's too): the form opens on its values and its fields override them.
STAGE_COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa"]
JOB_COLUMNS = ["job", "stage", "state", "queue position", "progress", "message"]
RUN_COLUMNS = ["run", "stage", "status", "steps", "final loss", "reward margin", "pair acc. (held-out)", "readout",
               "eval"]  # fmt: skip
X_AXES = {"step": "step", "wall time (s)": "time"}


@contextmanager
def _errors():
    """Package errors reach the page as their own one sentence (gr.Error), never a traceback."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise gr.Error(str(e.args[0]) if isinstance(e, KeyError) else str(e)) from None


# ---- launching -----------------------------------------------------------------------------------
# The launch form's fields, in the order of its widgets (build) and of the /train_launch API's arguments;
# each method option's widget follows them, named "<method>.<knob>" (option_fields).
FORM_FIELDS = ("dataset", "backbone", "stage", "task", "sft_from", "beta0", "sigma", "noise_target", "k_negatives",
               "sampling", "epochs", "lr", "max_steps", "eval_examples", "log_with", "seed", "name", "addons",
               "hars_k", "hars_temperature")  # fmt: skip
ADDONS = ("HaRS", "NoDO")  # on a method other than HaNo-DPO: beyond the paper


def option_fields() -> list[str]:
    """One form field per registered method's own knob (pref.options), "<method>.<knob>"."""
    return [f"{m.name}.{k.name}" for m in methods.all_methods() for k in methods.option_knobs(m)]


def base_config(backbone: str):
    """The config file a launch starts from: the lesson preset for a tiny backbone, None (the package's
    defaults) for a real checkpoint, which must not get the tiny model's LoRA settings."""
    return presets.lab_path() if backbone.startswith("tiny-") else None


def uses_hars(stage: str, addons=None) -> bool:
    """Whether the stage's method computes HaRS' lambda: HaNo-DPO's own (not its w/o HaRS ablation), or the
    HaRS add-on picked on a method that takes it."""
    if stage == "SFT":
        return False
    row = methods.variant_of(stage)
    m = methods.get(row["method"])
    if m.hars == "builtin":
        return row.get("hardness", True) is not False
    return m.hars == "addon" and "HaRS" in (addons or [])


def hars_note(k, temperature) -> str:
    """'' at the paper's K = 10 and T = 1, else the words that label the setting beyond the paper."""
    from hanorec.hardness import beyond_paper_note

    return beyond_paper_note(int(k), float(temperature)) if k and temperature else ""


def form_overrides(
    data_path: str,
    backbone: str,
    stage: str,
    task: str,
    *,
    beta0: float = 0.1,
    sigma: float = 0.05,
    noise_target: str = "lora",
    k_negatives: int = 1,
    sampling: str = "random",
    epochs: float = 1,
    lr: float | None = None,
    max_steps: int | None = 30,
    eval_examples: int | None = 40,
    log_with: str | None = None,
    seed: int = 0,
    options: dict | None = None,
    addons: list | None = None,
    hars_k: int | None = None,
    hars_temperature: float | None = None,
) -> dict:
    """The form's values as config overrides on :func:`base_config` (the variant's own fields are added by
    JobManager.submit).

    Only the knobs the stage's method reads are written: K for a method taking K rejected completions, the
    NoDO target where the row does not fix it (or where the NoDO add-on is picked), HaRS where picked and
    the method takes it (pref.hars) with its K neighbours and profile temperature, and the method's own
    options ("<method>.<knob>" keys)."""
    from hanorec.config import load_config

    over: dict = {
        "seed": int(seed),
        "data": {"path": data_path},
        "task": {"name": task, "max_eval_examples": int(eval_examples) if eval_examples else None},
        "model": {"name": backbone},
        "sft": {"epochs": epochs, "max_steps": int(max_steps) if max_steps else None},
        "pref": {"epochs": epochs, "max_steps": int(max_steps) if max_steps else None, "beta": beta0},
    }
    if stage != "SFT":
        row = methods.variant_of(stage)
        method = methods.get(row["method"])
        pref = {"noise_sigma": sigma, "negative_sampling": sampling}
        if "noise_target" not in row:
            pref["noise_target"] = noise_target  # the other rows are defined by their noise (none)
        elif "NoDO" in (addons or []):  # NoDO added to a row without it: beyond the paper
            pref["noise_target"] = noise_target if noise_target != "none" else "lora"
        if "HaRS" in (addons or []) and method.hars == "addon":
            pref["hars"] = True
        if uses_hars(stage, addons):
            if hars_k:
                pref["hardness_k"] = int(hars_k)
            if hars_temperature:
                pref["hars_temperature"] = float(hars_temperature)
        if method.k_rejected:
            pref["k_negatives"] = int(k_negatives)
        own = {k.name: (options or {}).get(f"{method.name}.{k.name}") for k in methods.option_knobs(method)}
        if any(v is not None for v in own.values()):
            pref["options"] = {k: v for k, v in own.items() if v is not None}
        if max_steps:
            base = load_config(base_config(backbone)).pref
            pref["max_pairs"] = int(max_steps) * base.batch_size * base.grad_accum
        over["pref"].update(pref)
    if lr:
        over["sft" if stage == "SFT" else "pref"]["lr"] = float(lr)
    if log_with and log_with != NO_TRACKER:
        over["sft"]["log_with"] = over["pref"]["log_with"] = log_with
    return over


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def backbone_name(ctx, text: str) -> str:
    """A tiny preset, a Hugging Face id (org/name, from the local cache), or a local folder (confined)."""
    text = (text or "").strip()
    if not text:
        raise gr.Error("Pick a backbone: a tiny preset, a Hugging Face id or a model folder.")
    if text in PRESETS:
        return text
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()
    return text if looks_like_id else str(ctx.resolve_path(text))


def checked_numbers(ctx, f: dict) -> dict:
    """The form's numbers through app.common.number (one sentence per bad field), with demo mode's caps."""
    steps_cap, eval_cap = ctx_limit(ctx, "max_steps"), ctx_limit(ctx, "eval_examples")
    rules = dict(
        beta0=dict(label="beta0", minimum=1e-6, maximum=1000),
        sigma=dict(label="noise sigma", minimum=0, maximum=100),
        k_negatives=dict(label="K negatives", integer=True, minimum=1, maximum=1000, optional=True),
        epochs=dict(label="epochs", minimum=0.01, maximum=ctx_limit(ctx, "epochs", 10_000)),
        lr=dict(label="learning rate", minimum=0, maximum=10, optional=True),
        max_steps=dict(label="max steps", integer=True, minimum=1, maximum=steps_cap or 10**8,
                       optional=steps_cap is None),
        eval_examples=dict(label="evaluation prompts", integer=True, minimum=1 if eval_cap else 0,  # 0: all
                           maximum=eval_cap or 2**31 - 1, optional=eval_cap is None),
        seed=dict(label="seed", integer=True, minimum=0, maximum=2**32 - 1),
        hars_k=dict(label="HaRS K neighbours", integer=True, minimum=1, maximum=100_000, optional=True),
        hars_temperature=dict(label="HaRS profile temperature", minimum=1e-3, maximum=100, optional=True),
    )  # fmt: skip
    return {key: number(f[key], **rule) for key, rule in rules.items() if key in f}


def ctx_limit(ctx, name: str, default=None):
    return ctx.limit(name, default) if hasattr(ctx, "limit") else default


def launch(ctx, *values):
    """The button's handler: the widgets' values in FORM_FIELDS order, then the method options', then (from the
    page) the browser's owner token."""
    names = (*FORM_FIELDS, *option_fields())
    form = dict(zip(names, values))
    if len(values) > len(names):
        form["owner"] = values[len(names)]
    return launch_form(ctx, form)


def launch_form(ctx, form: dict):
    """Queue a run from the form's values by name (FORM_FIELDS; "<method>.<knob>" for a method's options);
    it starts at once when nothing else runs. Returns the job picker, its status and the owner token (kept in
    the browser: only it can stop or resume the job)."""
    f = {"sft_from": FROM_SCRATCH, "seed": 0, "name": "", **form}
    f.update(checked_numbers(ctx, f))
    token = owner_token(f.get("owner"))
    if not isinstance(f["name"], (str, type(None))):
        raise gr.Error("Run name: type a name made of letters, digits, '.', '_' and '-'.")
    stage, task = f["stage"], f["task"]
    with _errors():
        method = methods.get(methods.variant_of(stage)["method"]) if stage != "SFT" else None
    k = int(f.get("k_negatives") or 1)
    if method is not None and method.k_rejected and task == "hit1" and k != 1:  # found before SFT, not after
        raise gr.Error(f"hit1 has one rejected answer (the other of Yes/No), so K negatives = {k} "
                       f"cannot work; use K = 1 ({method.label} on hit1 with K = 1).")  # fmt: skip
    data_path = str(ctx.resolve_path(f["dataset"]))
    model = backbone_name(ctx, f["backbone"])
    sft_run = None
    if f["sft_from"] and f["sft_from"] != FROM_SCRATCH and stage != "SFT":
        sft_run = str(_run_path(ctx, str(f["sft_from"])))
        with _errors():
            runs.check_sft_dataset(sft_run, data_path)  # its tokenizer, items and users are its dataset's
    named = ("beta0", "sigma", "noise_target", "k_negatives", "sampling", "epochs", "lr", "max_steps",
             "eval_examples", "log_with", "seed", "addons", "hars_k", "hars_temperature")  # fmt: skip
    options = {key: f[key] for key in option_fields() if key in f}
    over = form_overrides(data_path, model, stage, task, options=options, **{key: f[key] for key in named if key in f})
    if sft_run is None:  # SFT trained first in this run, whatever SFT run the preset names
        over["pref"]["sft_run"] = None
    with _errors():
        job = ctx.jobs.submit(over, stage=stage, config=base_config(model), name=(f["name"] or "").strip() or None,
                              sft_run=sft_run, owner=token)  # fmt: skip
        status = ctx.jobs.status(job)
    return gr.update(choices=job_choices(ctx), value=job), status_text(status), token


def method_view(stage: str):
    """When a stage is picked: its method's one-line loss and paper, and only the knobs it reads (HaRS' K and
    profile temperature where the method computes lambda), then the stage's learning rate and steps from the
    lesson preset."""
    d = presets.form_defaults()
    stage_values = (
        gr.update(value=d["sft_lr"] if stage == "SFT" else d["pref_lr"]),
        gr.update(value=d["sft_max_steps"] if stage == "SFT" else d["pref_max_steps"]),
    )
    if stage == "SFT":
        text = "**SFT**: mean token NLL of the answer (method.md section 5)."
        hidden = gr.update(visible=False)
        return (text, *[hidden] * 5, *[gr.update(visible=False) for _ in option_fields()], hidden, hidden,
                *stage_values)  # fmt: skip
    row = methods.variant_of(stage)
    m = methods.get(row["method"])
    text = f"**{stage}** (`--pref.method={m.name}`): `{m.equation}`. {m.paper}."
    if m.beyond_paper:
        text += " Beyond the paper."
    nodo = "noise_target" not in row
    own = {f"{m.name}.{k.name}" for k in methods.option_knobs(m)}
    addons = [a for a in ADDONS if (a == "HaRS" and m.hars == "addon") or (a == "NoDO" and not nodo)]
    if stage != m.label:  # an ablation is defined by what it leaves out
        addons = []
    hars = uses_hars(stage) or "HaRS" in addons
    if hars:
        text += (
            " HaRS: lambda from each pair's neighbour profiles (K and the profile temperature below; the paper's "
            "K = 10, T = 1 give lambda close to 1 at this scale, a lower temperature widens it, beyond the paper)."
        )
    return (
        text,
        gr.update(visible=any(k.name == "beta" for k in m.knobs)),
        gr.update(visible=nodo or "NoDO" in addons),
        gr.update(visible=nodo or "NoDO" in addons),
        gr.update(visible=m.k_rejected),
        gr.update(visible=bool(addons), choices=addons, value=[]),
        *[gr.update(visible=key in own) for key in option_fields()],
        gr.update(visible=hars),
        gr.update(visible=hars),
        *stage_values,
    )


def hars_label(k, temperature) -> str:
    """Under the HaRS fields: 'the paper's setting', or what is beyond it."""
    try:
        note = hars_note(number(k, "HaRS K neighbours", integer=True, minimum=1),
                         number(temperature, "HaRS profile temperature", minimum=1e-3))  # fmt: skip
    except gr.Error as e:
        return str(e)
    return f"**{note}**" if note else "HaRS at the paper's setting (K = 10, temperature 1)."


# ---- watching ------------------------------------------------------------------------------------
def job_choices(ctx) -> list[str]:
    return [j.job_id for j in ctx.jobs.jobs()]


def current_job(ctx) -> str | None:
    """What the page shows after a reload: the running job, else the next queued, else the newest."""
    jobs = ctx.jobs.jobs()
    return jobs[0].job_id if jobs else None


def poll(ctx, job_id, x_axis: str = "step", smoothing: float = C.DEFAULT_SMOOTHING):
    """The timer's refresh: status line, progress bar, live curves (against the step or the wall time, raw
    and smoothed), log tail and the queue."""
    jobs = ctx.jobs.jobs()
    table = jobs_table(jobs)
    x, w = _curve_settings(x_axis, smoothing)
    if not job_id:
        return "No run selected: launch one above.", progress_html(None), curves_figure([], x, w), "", table
    try:
        st = ctx.jobs.status(job_id)
    except (JobError, OSError, ValueError) as e:  # a damaged or vanished job: say so, keep the page working
        return f"**{job_id}** · {e}", progress_html(None), curves_figure([], x, w), "", table
    rows = runs.read_metrics(st.run_dir)
    note = curves_note(rows)
    return status_text(st) + (f"\n\n{note}" if note else ""), progress_html(st), curves_figure(rows, x, w), st.log_tail, table


def _curve_settings(x_axis, smoothing) -> tuple[str, float]:
    """The x axis ("step" or "time") and the EMA weight from the page's radio and slider, one sentence if bad."""
    x = X_AXES.get(x_axis, x_axis if x_axis in X_AXES.values() else None)
    if x is None:
        raise gr.Error(f"x axis {str(x_axis)[:40]!r}: use one of {list(X_AXES)}.")
    w = number(smoothing, "smoothing", minimum=0, maximum=0.99)
    return x, w


def stop(ctx, job_id, owner=None):
    """SIGTERM to the run: it writes a checkpoint after the current step and stops (or leaves the queue).
    Only the browser that launched the job may (its owner token); owner=None is a local caller."""
    if not job_id:
        raise gr.Error("Pick a job to stop.")
    with _errors():
        return status_text(ctx.jobs.stop(job_id, owner=_caller(owner)))


def resume(ctx, job_id, owner=None):
    """Queue a stopped or failed run again; training continues from its newest checkpoint."""
    if not job_id:
        raise gr.Error("Pick a job to resume.")
    with _errors():
        return status_text(ctx.jobs.resume(job_id, owner=_caller(owner)))


def _caller(owner):
    """The token a page or API call sends (a missing or malformed one becomes a fresh token that owns nothing);
    None stays None only for direct calls from Python (tests, notebooks)."""
    return None if owner is None else owner_token(owner)


def ensure_owner(value):
    """On page load: the browser keeps its token, or gets one."""
    return owner_token(value)


def page_load(ctx):
    """On (re)load: the job to follow, the past runs, and the choices that depend on them."""
    job = current_job(ctx)
    table, names, sft_runs = past_runs(ctx)
    first = [n for n in names if n.startswith(DEMO_PREFIX) and n.endswith("::hano_dpo")][:1]
    return (
        gr.update(choices=job_choices(ctx), value=job),
        table,
        gr.update(choices=names, value=first),
        gr.update(choices=[FROM_SCRATCH, *sft_runs], value=preset_sft_source(ctx, sft_runs)),
    )


def preset_sft_source(ctx, sft_runs: list[str]) -> str:
    """The SFT source the form opens on: the run the lesson preset's pref.sft_run names when it is listed
    (a shipped teaching SFT model), else training SFT first."""
    named = presets.form_defaults().get("sft_run")
    if not named:
        return FROM_SCRATCH
    want = Path(named) if Path(named).is_absolute() else presets.LAB_PRESET.parents[1] / named
    for name in sft_runs:
        try:
            if _run_path(ctx, name).resolve() == want.resolve():
                return name
        except gr.Error:
            continue
    return FROM_SCRATCH


def status_text(st) -> str:
    line = st.describe()
    if st.state == "running" and st.elapsed_s and st.step and st.total:
        eta = st.elapsed_s / st.step * (st.total - st.step)
        line += f" ({st.elapsed_s:.0f} s, about {eta:.0f} s left in this stage)"
    if st.state in ("stopped", "failed"):
        line += " Press Resume to continue from the newest checkpoint."
    return f"**{st.stage}** · {line}"


def progress_html(st) -> str:
    value, label = (0.0, "") if st is None else (st.fraction, _progress_label(st))
    return (
        f'<div class="hanorec-progress"><progress value="{value:.4f}" max="1" style="width:100%"></progress>'
        f"<span>{label}</span></div>"
    )


def _progress_label(st) -> str:
    if st.state == "queued":
        return f"queued, position {st.position}"
    if st.step is not None:
        return f"{st.command or ''} step {st.step}/{st.total or '?'} · {st.state}"
    return st.state


def jobs_table(jobs, finished_shown: int = 5) -> pd.DataFrame:
    """The running job, the queue in order, then the newest few that ended."""
    active = [j for j in jobs if j.state in ("running", "queued")]
    jobs = active + [j for j in jobs if j.state not in ("running", "queued")][:finished_shown]
    rows = [
        [j.job_id, j.stage, j.state, j.position or "", _progress_label(j) if j.state == "running" else "", j.message]
        for j in jobs
    ]  # an unreadable job (state 'unreadable') shows its sentence in the message column
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """A resumed run may log a step twice, and the held-out evaluation logs beside a step: one merged row per
    (stage, step), the newest values winning (hanorec.curves.merged_rows)."""
    return C.merged_rows(rows)


def curves_figure(rows: list[dict], x: str = "step", smoothing: float = C.DEFAULT_SMOOTHING) -> go.Figure:
    """The curves a DPO course draws (hanorec.curves.PANELS that have points: loss, held-out pair accuracy,
    rewards, margins, batch accuracy, log-probs, KL to the reference, lambda beside beta and eta, noise), one
    colour per stage, the raw values faint and their moving average bold; the title carries the note on
    NoDO's swings for a stage trained under noise."""
    panels = C.panels(rows, x=x, smoothing=smoothing)
    cols = 3 if len(panels) > 4 else max(1, len(panels))
    n_rows = max(1, -(-len(panels) // cols))
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[p.title for p in panels] or [""],
                        vertical_spacing=min(0.12, 0.5 / n_rows))  # fmt: skip
    stages_ = list(dict.fromkeys(s.stage for p in panels for s in p.series))
    shown: set = set()
    for i, panel in enumerate(panels):
        for s in panel.series:
            color = STAGE_COLORS[stages_.index(s.stage) % len(STAGE_COLORS)]  # one colour per stage in every panel
            dash = "dot" if len(panel.keys) > 1 and s.key == panel.keys[1] else "solid"  # rejected: dotted
            name = s.stage if len(panel.keys) == 1 else f"{s.stage} {s.key.rsplit('/', 1)[-1]}"
            where = dict(row=i // cols + 1, col=i % cols + 1)
            fig.add_trace(go.Scatter(x=s.x, y=s.raw, mode="lines", name=name, legendgroup=s.stage, showlegend=False,
                                     opacity=0.3, line={"color": color, "width": 1, "dash": dash},
                                     hovertemplate=f"{name} (raw): %{{y:.4g}}<extra></extra>"), **where)  # fmt: skip
            fig.add_trace(go.Scatter(x=s.x, y=s.smooth, mode="lines", name=s.stage, legendgroup=s.stage,
                                     showlegend=s.stage not in shown, line={"color": color, "width": 2.5, "dash": dash},
                                     hovertemplate=f"{name} (EMA {smoothing:g}): %{{y:.4g}}<extra></extra>"),
                          **where)  # fmt: skip
            shown.add(s.stage)
        if not panel.series:  # a panel shown before its first point (the held-out accuracy, every few steps)
            # an empty trace, so the browser draws the panel's axes (an axis without a trace is not drawn)
            fig.add_trace(go.Scatter(x=[], y=[], showlegend=False, hoverinfo="skip"), row=i // cols + 1,
                          col=i % cols + 1)  # fmt: skip
            fig.add_annotation(text="not logged yet", showarrow=False, xref="x domain", yref="y domain", x=0.5, y=0.5,
                               row=i // cols + 1, col=i % cols + 1)  # fmt: skip
    noisy = [st for st in stages_ if C.noise_note(rows, st)]
    fig.update_layout(height=max(320, 230 * n_rows + 40), margin=dict(l=40, r=10, t=60 if noisy else 40, b=30),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + 24 / max(320, 230 * n_rows + 40),
                                  xanchor="right", x=1),
                      legend_title_text="stage (bold: moving average; faint: raw; dotted: rejected)")  # fmt: skip
    if noisy:
        fig.update_layout(title=dict(font=dict(size=12), text=f"{', '.join(noisy)}: trained under NoDO noise, so per-step "
                                     "rewards and margins swing; read the bold moving average"))  # fmt: skip
    fig.update_xaxes(title_text="step" if x == "step" else "seconds since the stage began", row=n_rows)
    if not panels:
        fig.add_annotation(text="no metrics logged yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def curves_note(rows: list[dict]) -> str:
    """The sentences under the curves: each stage's held-out pair accuracy and, for a stage trained under
    NoDO noise, why its margins swing."""
    rows = C.merged_rows(rows)
    out = []
    for stage in dict.fromkeys(r.get("stage_dir", r.get("stage")) for r in rows):
        acc = C.held_out_accuracy(rows, stage)
        if acc is not None:
            out.append(f"{stage}: held-out pair accuracy {acc:.3f} (eval/pair_accuracy, the fixed validation pairs).")
        if note := C.noise_note(rows, stage):
            out.append(note)
    return "\n".join(f"- {line}" for line in out)


# ---- past runs and comparison --------------------------------------------------------------------
DEMO_PREFIX = "demo:"  # past runs shipped with the app (assets/demo_runs), listed read-only


def _all_runs(ctx) -> list:
    """The trained demo runs (named demo:<run>, read-only) first, then the runs folder's, newest first."""
    demo_dir = getattr(ctx, "demo_runs_dir", None)
    demo = runs.list_runs(demo_dir) if demo_dir is not None else []
    for info in demo:
        info.name, info.status = DEMO_PREFIX + info.name, "finished (demo, read-only)"
    return demo + runs.list_runs(ctx.runs_dir)


def _run_path(ctx, run_name: str) -> Path:
    if run_name.startswith(DEMO_PREFIX) and getattr(ctx, "demo_runs_dir", None) is not None:
        return ctx.resolve_path(str(Path(ctx.demo_runs_dir) / run_name[len(DEMO_PREFIX):]))
    return ctx.resolve_path(str(Path(ctx.runs_dir) / run_name))


def past_runs(ctx):
    """(table of runs x stages, names to compare, runs whose SFT model a new preference run can start from)."""
    infos = _all_runs(ctx)
    table = pd.DataFrame([_summary_row(i, s) for i in infos for s in i.stages or ["-"]], columns=RUN_COLUMNS)
    names = [f"{i.name}::{s}" for i in infos for s in i.stages]
    # the shipped demo runs' SFT models too (read, never written: a preference run writes its own folder)
    sft_runs = [i.name for i in infos if "sft" in i.stages and runs.latest_checkpoint(i.path / "sft")]
    return table, names, sft_runs


def refresh_runs(ctx):
    """The past runs again, and the job picker's choices (jobs launched from another page included)."""
    table, names, sft_runs = past_runs(ctx)
    return table, gr.update(choices=names), gr.update(choices=[FROM_SCRATCH, *sft_runs]), gr.update(choices=job_choices(ctx))


def jobs_signature(ctx) -> str:
    """Each job's id and state: when it changes (a run starts, ends or is queued) the past runs are stale."""
    return "|".join(f"{j.job_id}:{j.state}" for j in ctx.jobs.jobs())


def tick(ctx, job_id, last: str, x_axis: str = "step", smoothing: float = C.DEFAULT_SMOOTHING):
    """The timer's one request per second: the followed job's view, and the past runs when a job changed."""
    return (*poll(ctx, job_id, x_axis, smoothing), *refresh_if_jobs_changed(ctx, last))


def refresh_if_jobs_changed(ctx, last: str):
    """The past runs and the pickers again, only when a job changed state (part of the timer's tick)."""
    now = jobs_signature(ctx)
    if now == last:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
    return (*refresh_runs(ctx), now)


def _summary_row(info, stage: str) -> list:
    rows = [r for r in info.metrics if r.get("stage_dir") == stage]
    last = rows[-1] if rows else {}
    res = info.stage_results.get(stage) or (info.results if stage == "sft" else None)
    return [
        info.name,
        info.label(stage) if stage != "-" else "-",
        info.status,
        last.get("step", ""),
        _fmt(last.get(K.LOSS)),
        _fmt(last.get(K.REWARD_MARGIN)),
        _fmt(C.held_out_accuracy(rows, stage)),  # the held-out pairs', not the last batch of 4's
        " ".join(report.run_readouts(res, _sft_results(info, stage), name=info.label(stage) if stage != "-" else "")),
        _eval_text(res),
    ]


def _sft_results(info, stage: str) -> dict | None:
    """The results of the SFT model a preference stage started from, when that is this run's own SFT."""
    if stage in ("-", runs.SFT_STAGE):
        return None
    try:
        same = runs.sft_run_of(info.path, stage).resolve() == Path(info.path).resolve()
    except OSError:
        return None
    return info.results if same else None


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _eval_text(res: dict | None) -> str:
    if not res:
        return ""
    keep = ("HR@1", "HR@3", "NDCG@3", "AUC", "Accuracy")
    model_rows = [r for r in res.get("rows", []) if r.get("method") not in ("random", "popularity")]
    # the ranking protocol's row when there is one, else the first; the text names the protocol and split
    for r in sorted(model_rows, key=lambda r: r.get("protocol") != "ranking")[:1]:
        where = f", {res['split']} split" if res.get("split") else ""
        values = ", ".join(f"{k} {r[k]:.3f}" for k in keep if r.get(k) is not None)
        return f"{values} ({r.get('protocol', 'ranking')} protocol{where})"
    return ""


def compare(ctx, selected: list[str], metric: str):
    """The chosen runs' stages side by side: a table of final metrics and one metric's curve per stage."""
    if not selected:
        raise gr.Error("Choose one or more runs to compare.")
    rows, fig = [], go.Figure()
    for value in selected:
        run_name, _, stage = value.rpartition("::")
        with _errors():
            info = runs.run_info(_run_path(ctx, run_name))
        rows.append(_summary_row(info, stage))
        pts = [(r["step"], r[metric]) for r in _last_per_step(info.metrics) if r.get("stage_dir") == stage and metric in r]
        if pts:
            x, y = zip(*pts)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{run_name} / {rows[-1][1]}"))
    fig.update_layout(height=360, xaxis_title="step", yaxis_title=metric, margin=dict(l=40, r=10, t=30, b=40))
    return pd.DataFrame(rows, columns=RUN_COLUMNS), fig


# ---- export ---------------------------------------------------------------------------------------
def export_choices(ctx):
    """Stages of finished runs that have a checkpoint (run::stage): what the Export button can take away."""
    names = [f"{i.name}::{s}" for i in runs.list_runs(ctx.runs_dir, with_metrics=False) if i.status == "finished"
             for s in i.stages if runs.latest_checkpoint(i.path / s)]  # fmt: skip
    return gr.update(choices=names)


def export_model(ctx, value: str, merge: bool):
    """Export the chosen stage (hanorec.export) under <runs>/.exports (once per stage and checkpoint); the
    folder and a zip to download."""
    from hanorec.export import export_for_download, exports_dir

    if not value or "::" not in value:
        raise gr.Error("Choose a finished run's stage to export (run::stage).")
    run_name, _, stage = value.rpartition("::")
    with _errors():
        path = ctx.resolve_path(str(Path(ctx.runs_dir) / run_name))
        folder, archive = export_for_download(path, stage, exports_dir(ctx.runs_dir), merge=bool(merge),
                                              command=f"python -m hanorec export --run runs/{path.name} --stage {stage} "
                                                      f"--out exported{' --merge' if merge else ''}")  # fmt: skip
    how = "everything merged" if merge else "the base with SFT merged, and the stage's LoRA in adapter/"
    shown = f"runs/{folder.parent.name}/{folder.name}"  # never the server's absolute path
    text = f"Exported **{value}** to `{shown}` ({how}); its model card is `{shown}/README.md`."
    if archive is None:
        text += " It is too large to offer as a zip here: copy the folder."
    return text, gr.update(value=str(archive) if archive else None, interactive=archive is not None)


# ---- layout --------------------------------------------------------------------------------------
def _dataset_choices(ctx) -> list:
    if hasattr(ctx, "dataset_choices"):
        return ctx.dataset_choices()
    return [(str(d), str(d)) for d in ctx.data_dirs]


def build(ctx) -> None:
    from functools import partial

    if getattr(ctx, "jobs", None) is None:
        gr.Markdown("Background runs are not available (hanorec.jobs could not be loaded).")
        return
    datasets = _dataset_choices(ctx)
    d = presets.form_defaults()
    gr.Markdown(
        "Launch a small run in the background (it keeps running if you close the page; one run at a time, "
        "later launches wait in the queue). A preference stage starts from an SFT model: trained first in the "
        "same run, or taken from a finished run. The form opens on the lesson preset `configs/lab.yaml` (the "
        f"Compare tab's too): SFT batch {d['sft_batch']}, preference batch {d['pref_batch']}; each field shows "
        "the value a launch uses."
    )
    with gr.Row():
        dataset = ctx.path_menu(gr.Dropdown(datasets, value=datasets[0][1] if datasets else None, label="Dataset",
                                            scale=3))  # fmt: skip
        backbone = gr.Dropdown(list(PRESETS), value=d["model"] if d["model"] in PRESETS else PRESETS[0],
                               allow_custom_value=True, scale=2,
                               label="Backbone (tiny preset, Hugging Face id, or model folder)")  # fmt: skip
        stage = gr.Dropdown(list(stages()), value="SFT", label="Stage", scale=2)
        task = gr.Dropdown(list(TASKS), value=d["task"] if d["task"] in TASKS else "hit3", label="Task", scale=1)
    with gr.Row():
        sft_from = gr.Dropdown([FROM_SCRATCH], value=FROM_SCRATCH, label="SFT model for a preference stage", scale=3,
                               elem_id="train-sft-from")  # fmt: skip
        name = gr.Textbox(label="Run name (optional)", placeholder="date-stage", scale=2)
        seed = number_field(d["seed"], precision=0, label="Seed", scale=1, minimum=0)
    method_md = gr.Markdown(method_view("SFT")[0], elem_id="train-method")
    with gr.Accordion("Hyperparameters", open=True):
        with gr.Row():
            beta0 = number_field(d["beta"], label="beta (HaNo-DPO: beta0)", minimum=1e-6, visible=False)
            sigma = number_field(d["noise_sigma"], label="noise sigma (NoDO)", minimum=0, visible=False)
            noise_target = gr.Dropdown(["lora", "logits", "none"], value=d["noise_target"], label="noise target",
                                       visible=False)  # fmt: skip
            k_neg = number_field(max(3, d["k_negatives"]), precision=0, label="K negatives", minimum=1, visible=False)
            sampling = gr.Dropdown(["random", "embedding"], value=d["negative_sampling"], label="negative sampling")
            addons = gr.CheckboxGroup(list(ADDONS), value=[], label="add-ons (beyond the paper)", visible=False)
        with gr.Row():  # HaRS, where the stage's method computes lambda
            hars_k = number_field(d["hardness_k"], precision=0, label="HaRS K neighbours (paper: 10)", minimum=1,
                                  visible=False, elem_id="train-hars-k")  # fmt: skip
            hars_t = number_field(d["hars_temperature"], label="HaRS profile temperature (paper: 1)", minimum=1e-3,
                                  maximum=100, visible=False, elem_id="train-hars-temperature")  # fmt: skip
            hars_text = gr.Markdown(hars_label(d["hardness_k"], d["hars_temperature"]), elem_id="train-hars-note")
        with gr.Row():  # each method's own knobs, shown when its stage is picked
            option_widgets = []
            for m in methods.all_methods():
                for knob in methods.option_knobs(m):
                    label = f"{knob.label or knob.name} ({m.label})"
                    if knob.type is bool:
                        option_widgets.append(gr.Checkbox(knob.default, label=label, info=knob.help, visible=False))
                    else:
                        option_widgets.append(number_field(knob.default, label=label, info=knob.help, visible=False,
                                                           precision=0 if knob.type is int else None))  # fmt: skip
        with gr.Row():
            epochs = number_field(d["epochs"], label="epochs", minimum=0.01)
            lr = number_field(d["sft_lr"], label="learning rate (of the stage launched)", minimum=0,
                              elem_id="train-lr")  # fmt: skip
            max_steps = number_field(d["sft_max_steps"], precision=0, label="max steps (empty: epochs)", minimum=1,
                                     maximum=ctx_limit(ctx, "max_steps"), elem_id="train-max-steps")  # fmt: skip
            eval_cap = ctx_limit(ctx, "eval_examples")  # demo mode: a number up to the cap; else 0 means all
            eval_examples = number_field(min(d["eval_examples"] or eval_cap, eval_cap) if eval_cap else (d["eval_examples"] or 0),
                                         precision=0, label="evaluation prompts" + ("" if eval_cap else " (0: all)"),
                                         minimum=1 if eval_cap else 0, maximum=eval_cap)  # fmt: skip
            log_with = gr.Dropdown([NO_TRACKER, *available_trackers()], value=NO_TRACKER,
                                   label="also log to (installed trackers)")  # fmt: skip
    launch_btn = gr.Button("Launch in background", variant="primary", elem_id="train-launch")
    with gr.Row():
        job = gr.Dropdown([], label="Job", scale=3, elem_id="train-job")
        stop_btn = gr.Button("Stop (checkpoint)", scale=1, elem_id="train-stop")
        resume_btn = gr.Button("Resume", scale=1, elem_id="train-resume")
    status = gr.Markdown(elem_id="train-status")
    bar = gr.HTML(progress_html(None), elem_id="train-progress")
    with gr.Row():
        x_axis = gr.Radio(list(X_AXES), value="step", label="x axis", scale=1, elem_id="train-x-axis")
        smoothing = slider_field(0, 0.99, value=C.DEFAULT_SMOOTHING, step=0.01, scale=2, elem_id="train-smoothing",
                                 label="smoothing (moving-average weight; 0 = raw)")  # fmt: skip
    curves = gr.Plot(label="Live curves (from the run's metrics.jsonl)", elem_id="train-curves")
    with gr.Accordion("Log", open=False):
        log = gr.Textbox(lines=12, max_lines=12, label="job.log (last lines)", autoscroll=True)
    jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Jobs (running, then the queue)")
    download_buttons(jobs=jobs)
    gr.Markdown("### Past runs")
    refresh_btn = gr.Button("Refresh", size="sm")
    past = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, label="Runs and their stages")
    download_buttons(runs=past)
    with gr.Row():
        chosen = gr.Dropdown([], multiselect=True, label="Compare (run::stage)", scale=4)
        metric = gr.Dropdown(list(dict.fromkeys([k for _, keys in C.PANELS for k in keys] + [K.LR])), value=K.LOSS,
                             label="metric", scale=1)  # fmt: skip
        compare_btn = gr.Button("Compare", scale=1)
    cmp_table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, label="Side by side")
    download_buttons(side_by_side=cmp_table)
    cmp_fig = gr.Plot(label="Metric by step")
    gr.Markdown("### Take a model away (the README's section says why the stage's adapter alone is not enough)")
    with gr.Row():
        export_stage_pick = gr.Dropdown([], label="Finished stage (run::stage)", scale=3, elem_id="train-export-stage")
        export_merge = gr.Checkbox(False, label="merge every adapter into the weights", scale=1)
        export_btn = gr.Button("Export", scale=1, elem_id="train-export")
    export_text = gr.Markdown(elem_id="train-export-text")
    export_file = gr.DownloadButton("Download the exported model (zip)", interactive=False, size="sm")
    timer = gr.Timer(1.0)
    owner = owner_state(ctx)
    seen_jobs = gr.State("")  # jobs_signature() at the last refresh of the past runs

    widgets = dict(dataset=dataset, backbone=backbone, stage=stage, task=task, sft_from=sft_from, beta0=beta0,
                   sigma=sigma, noise_target=noise_target, k_negatives=k_neg, sampling=sampling, epochs=epochs, lr=lr,
                   max_steps=max_steps, eval_examples=eval_examples, log_with=log_with, seed=seed, name=name,
                   addons=addons, hars_k=hars_k, hars_temperature=hars_t)  # fmt: skip
    form = [widgets[f] for f in FORM_FIELDS] + option_widgets
    watched = [status, bar, curves, log, jobs]
    launch_btn.click(partial(launch, ctx), [*form, owner], [job, status, owner], api_name="train_launch")
    stage.change(method_view, [stage], [method_md, beta0, sigma, noise_target, k_neg, addons, *option_widgets, hars_k,
                                        hars_t, lr, max_steps], api_name="train_method")  # fmt: skip
    addons.change(lambda st, a: (gr.update(visible=uses_hars(st, a)),) * 2, [stage, addons], [hars_k, hars_t],
                  api_visibility="private")  # fmt: skip
    for field_ in (hars_k, hars_t):
        field_.change(hars_label, [hars_k, hars_t], hars_text, api_visibility="private", show_progress="hidden")
    timer.tick(partial(tick, ctx), [job, seen_jobs, x_axis, smoothing], [*watched, past, chosen, sft_from, job, seen_jobs],
               api_visibility="private", show_progress="hidden")  # fmt: skip
    job.change(partial(poll, ctx), [job, x_axis, smoothing], watched, api_name="train_poll")
    for control in (x_axis, smoothing):
        control.change(partial(poll, ctx), [job, x_axis, smoothing], watched, api_visibility="private")
    stop_btn.click(partial(stop, ctx), [job, owner], status, api_name="train_stop")
    resume_btn.click(partial(resume, ctx), [job, owner], status, api_name="train_resume")
    refresh_btn.click(partial(refresh_runs, ctx), None, [past, chosen, sft_from, job], api_name="train_runs")
    compare_btn.click(partial(compare, ctx), [chosen, metric], [cmp_table, cmp_fig], api_name="train_compare")
    export_stage_pick.focus(partial(export_choices, ctx), None, export_stage_pick, api_visibility="private")
    export_btn.click(partial(export_model, ctx), [export_stage_pick, export_merge], [export_text, export_file],
                     api_name="train_export")  # fmt: skip
    _on_load(partial(page_load, ctx), None, [job, past, chosen, sft_from])
    _on_load(ensure_owner, [owner], [owner])


def _on_load(fn, inputs, outputs) -> None:
    """Run fn when the page (re)loads: the enclosing Blocks is the page."""
    from gradio.context import Context

    Context.root_block.load(fn, inputs, outputs, api_visibility="private")
