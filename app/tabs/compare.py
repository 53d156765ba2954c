"""Compare tab: launch a paired comparison of preference methods as a queued job, then read its results.

Every handler is a few lines over the package: hanorec.jobs (comparison_request, submit, status, stop,
resume: the same one-at-a-time queue as the Train tab) and hanorec.report (load_comparison, forest, scatter,
summary_csv, summary_latex). A finished job's folder and a CLI `python -m hanorec compare` output folder hold
the same comparison.json, so both open here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import TASKS, number_field, owner_state, owner_token, user_errors
from hanorec import presets, report, runs
from hanorec.jobs import COMPARE, COMPARE_LIMITS, comparison_request

TRAIN_SFT = "train SFT for each seed"
DEFAULT_METHODS = ("DPO", "HaNo-DPO")
INTRO = (
    "Compare preference methods on the same test users. Each seed trains SFT (or starts from a finished SFT "
    "run), then every chosen method from it; the job waits in the same one-at-a-time queue as the Train tab. "
    "Evaluation uses the **catalogue protocol** (the true item ranked against the items the user never saw: "
    "random HR@3 = 3 / candidates) and the ranking protocol. Results: each method's paired difference against "
    "a reference with a 95% bootstrap interval over test users and the difference the comparison could detect "
    "with 80% power (±). A CLI `compare` output folder opens here too."
)


def _num(value):
    """An optional number field: empty or 0 means "the preset's"."""
    return None if value in (None, "") or value == 0 else value


def preset_note() -> str:
    """What the lesson preset (configs/lab.yaml, the Train tab's too) fixes beside the fields shown."""
    d = presets.form_defaults()
    return (
        f"From the lesson preset `configs/lab.yaml`, the Train tab's too: SFT learning rate {d['sft_lr']:g} at batch "
        f"{d['sft_batch']}, preference batch {d['pref_batch']}, backbone `{d['model']}`; the fields below start "
        "at its values."
    )


# ---- launching -----------------------------------------------------------------------------------
DEMO_PREFIX = "demo:"  # the shipped demo runs (assets/demo_runs): their SFT models are read, never written


def sft_choices(ctx) -> list[str]:
    """Train SFT per seed, or a finished run's SFT model: the runs folder's, then the shipped demo runs'."""
    def with_sft(root, prefix=""):
        infos = runs.list_runs(root, with_metrics=False) if root is not None else []
        return [prefix + i.name for i in infos if "sft" in i.stages and runs.latest_checkpoint(i.path / "sft")]

    return [TRAIN_SFT, *with_sft(ctx.runs_dir), *with_sft(getattr(ctx, "demo_runs_dir", None), DEMO_PREFIX)]


def _sft_path(ctx, name: str) -> Path:
    demo = getattr(ctx, "demo_runs_dir", None)
    if name.startswith(DEMO_PREFIX) and demo is not None:
        return ctx.resolve_path(str(Path(demo) / name[len(DEMO_PREFIX):]))
    return ctx.resolve_path(str(Path(ctx.runs_dir) / name))


def compare_jobs(ctx) -> list[str]:
    return [j.job_id for j in ctx.jobs.jobs() if j.stage == COMPARE]


def scenario_note(ctx, dataset) -> str:
    """The teaching scenario planted in the chosen dataset (make-demo options), with what it stresses."""
    from hanorec.data import read_scenario, scenario_sentences

    if not dataset:
        return ""
    with user_errors():
        lines = scenario_sentences(read_scenario(ctx.resolve_path(dataset)))
    return "\n".join(f"- {line}" for line in lines) or "No teaching scenario is planted in this dataset."


def knob_note(chosen) -> str:
    """The registry's own knobs of the chosen methods (set them under "more overrides")."""
    from hanorec import methods

    names = {report.preference_methods()[m].get("method") for m in chosen or [] if m in report.preference_methods()}
    lines = [line.strip() for line in methods.describe_knobs().splitlines()
             if any(f"({n})" in line for n in names if n)]  # fmt: skip
    if not lines:
        return "The chosen methods have no knobs of their own beyond beta, the learning rate and NoDO's sigma."
    return "Knobs of the chosen methods (type them under more overrides):\n" + "\n".join(f"- `{ln}`" for ln in lines)


def launch(ctx, dataset, task, sft_from, methods, seeds, sft_steps, pref_steps, beta, lr, sigma, catalogue_items,
           eval_examples, extra, owner=None):  # fmt: skip
    """Queue the comparison (it starts at once when nothing else runs); returns the job picker, its status and
    the browser's owner token (only that browser may stop or resume it; owner=None: a local Python caller).
    Refused in demo mode: a comparison trains several models per seed, beyond the demo's per-run caps."""
    if getattr(ctx, "demo", False):
        raise gr.Error("Comparisons are not launched in demo mode (each trains several models): open a finished "
                       "one under Results.")  # fmt: skip
    token = None if owner is None else owner_token(owner)
    sft_run = None
    if sft_from and sft_from != TRAIN_SFT:
        sft_run = str(_sft_path(ctx, sft_from))
    data = str(ctx.resolve_path(dataset)) if dataset else None
    with user_errors():
        over, args, base = comparison_request(
            dataset=data, task=task, methods=list(methods or []), seeds=str(seeds or ""), sft_run=sft_run,
            sft_steps=_num(sft_steps), pref_steps=_num(pref_steps), beta=_num(beta), lr=_num(lr),
            sigma=_num(sigma), catalogue_items=_num(catalogue_items), eval_examples=_num(eval_examples),
            extra=extra or None, limits=COMPARE_LIMITS[bool(getattr(ctx, "demo", False))],
        )  # fmt: skip
        if sft_run and data:  # the SFT run's dataset, checked to be the chosen one: named as the app resolved it
            over["data"] = {**over.get("data", {}), "path": data}
        if not eval_examples:  # 0 = every test prompt, whatever the preset evaluates
            over["task"] = {**over.get("task", {}), "max_eval_examples": None}
        # one source of truth: a comparison trained here starts from the Train tab's lesson preset
        job = ctx.jobs.submit(over, stage=COMPARE, config=base or presets.lab_path(), args=args, owner=token)
        st = ctx.jobs.status(job)
    return gr.update(choices=compare_jobs(ctx), value=job), status_text(st), token


def status_text(st) -> str:
    line = st.describe()
    if st.state in ("stopped", "failed"):
        line += " Press Resume to continue: finished stages are kept, the current one resumes from its checkpoint."
    return f"**comparison** · {line}"


def progress_html(st) -> str:
    """The job's bar: finished parts (SFT or one method for one seed) plus the current part's steps."""
    if st is None:
        value, label = 0.0, ""
    else:
        info = runs.read_status(st.run_dir)
        part, parts = info.get("part") or 0, info.get("parts") or 0
        inner = (st.step / st.total) if st.step and st.total else 0.0
        value = 1.0 if st.state == "finished" else ((part - 1 + inner) / parts if parts and part else 0.0)
        label = st.state if st.state != "running" else f"part {part} of {parts}: {info.get('current', '')}"
        if st.state == "running" and st.step is not None:
            label += f", step {st.step}/{st.total or '?'}"
    return (
        f'<div class="hanorec-progress"><progress value="{max(0.0, min(1.0, value)):.4f}" max="1" '
        f'style="width:100%"></progress><span>{label}</span></div>'
    )


def poll(ctx, job_id):
    if not job_id:
        return "No comparison selected: launch one above.", progress_html(None)
    with user_errors():
        st = ctx.jobs.status(job_id, detail=False)
    return status_text(st), progress_html(st)


def control(ctx, job_id, action: str, owner=None):
    """Stop (SIGTERM: a checkpoint after the current step) or resume (queued again) the chosen comparison;
    only the browser that launched it may (its owner token; owner=None: a local Python caller)."""
    if not job_id:
        raise gr.Error(f"Pick a comparison to {action}.")
    with user_errors():
        return status_text(getattr(ctx.jobs, action)(job_id, owner=None if owner is None else owner_token(owner)))


# ---- results -------------------------------------------------------------------------------------
def folder_choices(ctx) -> list[str]:
    return [ctx.public_path(p) for p in report.find_comparisons(ctx.runs_dir)]


def load(ctx, folder: str) -> dict:
    if not folder:
        raise gr.Error("Pick a finished comparison, or type the output folder of a CLI `compare` run.")
    path = ctx.resolve_path(folder.strip())
    with user_errors():
        return ctx._extra.get(("comparison", str(path), (path / report.COMPARISON_FILE).stat().st_mtime),
                              lambda: report.load_comparison(path))  # fmt: skip


def open_folder(ctx, folder):
    """Read a comparison folder: the method and metric pickers, the mean ± std table, the downloads."""
    result = load(ctx, folder)
    methods = report.comparison_methods(result)
    metrics = report.comparison_metrics(result)
    ref = "SFT" if "SFT" in methods else methods[0]
    others = [m for m in methods if m != ref]
    table = pd.DataFrame(
        [[e["method"], *[_cell(e, c) for c in _summary_columns(result)]] for e in result["summary"]],
        columns=["method", *_summary_columns(result)],
    )
    out = Path(tempfile.mkdtemp(prefix="hanorec-compare-"))
    name = Path(folder.strip()).name or "comparison"
    csv_path, tex_path = out / f"{name}.csv", out / f"{name}.tex"
    csv_path.write_text(report.summary_csv(result))
    tex_path.write_text(report.summary_latex(result))
    caption = ctx.public_text(
        f"{len(result['seeds'])} seed(s) {result['seeds']}, dataset `{result.get('dataset')}`, model "
        f"`{result.get('model')}`; mean ± std over seeds, {report.protocol_words(result.get('protocol', 'ranking'))}; "
        "chance = a random ranking."
    )
    return (
        gr.update(choices=methods, value=ref),
        gr.update(choices=metrics, value=metrics[0] if metrics else None),
        gr.update(choices=methods, value=ref),
        gr.update(choices=methods, value=others[0] if others else ref),
        table,
        caption,
        [str(csv_path), str(tex_path)],
    )


def _summary_columns(result) -> list[str]:
    return [c for c in (f"{t} {m}" for t, m in report.SUMMARY_METRICS) if any(c in e for e in result["summary"])]


def _cell(e: dict, c: str) -> str:
    if c not in e:
        return "-"
    digits = 2 if c.endswith("Pop@3") else 4
    return f"{e[c][0]:.{digits}f}" if e["method"] == "chance" else f"{e[c][0]:.{digits}f} ± {e[c][1]:.{digits}f}"


def forest_figure(rows: list[dict], reference: str, metric: str) -> go.Figure:
    """Each method's paired difference (dot), its 95% interval (bar) and the detectable difference (shaded
    band around 0: a true difference that large would have been seen with 80% power)."""
    fig = go.Figure()
    names = [r["method"] for r in rows]
    if rows:
        mdd = max(r["detectable"] for r in rows if r["detectable"] == r["detectable"]) if any(
            r["detectable"] == r["detectable"] for r in rows) else 0.0  # fmt: skip
        fig.add_vrect(x0=-mdd, x1=mdd, fillcolor="lightgrey", opacity=0.35, line_width=0,
                      annotation_text=f"±{mdd:.4f} detectable (80% power)", annotation_position="top left")  # fmt: skip
        fig.add_trace(go.Scatter(
            x=[r["mean"] for r in rows], y=names, mode="markers",
            marker=dict(size=10, color=["#d62728" if r["excludes_zero"] else "#1f77b4" for r in rows]),
            error_x=dict(type="data", symmetric=False, array=[r["high"] - r["mean"] for r in rows],
                         arrayminus=[r["mean"] - r["low"] for r in rows]),
            customdata=[[r["low"], r["high"], r["detectable"], r["n_users"]] for r in rows],
            hovertemplate="%{y}: %{x:+.4f} [%{customdata[0]:+.4f}, %{customdata[1]:+.4f}], detectable "
                          "±%{customdata[2]:.4f}, %{customdata[3]} users<extra></extra>",
        ))  # fmt: skip
    fig.add_vline(x=0, line_dash="dash", line_color="black")
    fig.update_layout(
        title=f"{metric}: method minus {reference} (95% bootstrap interval over test users; red excludes 0)",
        xaxis_title=f"paired difference in {metric}", height=120 + 40 * max(1, len(rows)),
        margin=dict(l=150, r=20, t=50, b=40), template="plotly_white", showlegend=False,
    )  # fmt: skip
    return fig


def show_forest(ctx, folder, reference, metric):
    """The forest plot, its table, and the readouts: what the result means, one sentence each (a model below
    chance, a method identical to the reference on every user, each difference or the size it rules out)."""
    if not (folder and reference and metric):
        return go.Figure(), "", ""
    result = load(ctx, folder)
    with user_errors():
        rows = report.forest(result, reference, metric)
        said = report.readouts(result, reference, metric)
    lines = [f"| method | {metric} vs {reference} |", "|---|---:|"]
    lines += [f"| {r['method']} | {report.format_difference(r)} |" for r in rows]
    readout = "**What this means**\n\n" + "\n".join(f"- {line}" for line in said) if said else ""
    return forest_figure(rows, reference, metric), "\n".join(lines), readout


def show_images(ctx, folder, metric):
    """The "uses the images?" panel (hanorec.report.image_use_panel): each model's drop when its history
    images are blanked, beside SFT and random; how to run the meter when the comparison did not."""
    if not folder:
        return ""
    result = load(ctx, folder)
    with user_errors():
        return report.image_use_panel(result, metric)


def show_scatter(ctx, folder, metric, a, b):
    if not (folder and metric and a and b):
        return go.Figure()
    result = load(ctx, folder)
    with user_errors():
        pts = report.scatter(result, metric, a, b)
    fig = go.Figure(go.Scatter(x=pts["b"], y=pts["a"], mode="markers", text=pts["user"], opacity=0.6,
                               hovertemplate="%{text}: " + b + " %{x:.3f}, " + a + " %{y:.3f}<extra></extra>"))
    lo = min(pts["a"] + pts["b"] + [0.0])
    hi = max(pts["a"] + pts["b"] + [1e-9])
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"),
                             hoverinfo="skip"))
    fig.update_layout(title=f"per-user {metric} (mean over the user's examples and seeds); above the line: {a} better",
                      xaxis_title=b, yaxis_title=a, height=420, showlegend=False, template="plotly_white",
                      margin=dict(l=50, r=20, t=50, b=40))  # fmt: skip
    return fig


# ---- layout --------------------------------------------------------------------------------------
def build(ctx) -> None:
    from functools import partial

    if getattr(ctx, "jobs", None) is None:
        gr.Markdown("Background runs are not available (hanorec.jobs could not be loaded).")
        return
    datasets = ctx.dataset_choices()
    offered = list(report.preference_methods())
    gr.Markdown(INTRO)
    with gr.Row():
        dataset = ctx.path_menu(gr.Dropdown(datasets, value=datasets[0][1] if datasets else None, label="Dataset",
                                                scale=3))  # fmt: skip
        task = gr.Dropdown([t for t in TASKS], value="hit3", label="Task", scale=1)
        sft_from = gr.Dropdown([TRAIN_SFT], value=TRAIN_SFT, label="SFT source", scale=3, elem_id="compare-sft")
        seeds = gr.Textbox("0,1,2", label="Seeds", scale=1, elem_id="compare-seeds")
    scenario = gr.Markdown(elem_id="compare-scenario")
    methods = gr.CheckboxGroup(offered, value=[m for m in DEFAULT_METHODS if m in offered],
                               label="Methods (the registry's rows)", elem_id="compare-methods")  # fmt: skip
    knobs = gr.Markdown(knob_note(DEFAULT_METHODS), elem_id="compare-knobs")
    caps = COMPARE_LIMITS[bool(getattr(ctx, "demo", False))]  # every number: one sentence when out of range
    d = presets.form_defaults()
    with gr.Accordion("Hyperparameters (shared by every method)", open=True):
        gr.Markdown(preset_note(), elem_id="compare-preset")
        with gr.Row():
            sft_steps = number_field(d["sft_max_steps"], precision=0, label="SFT max steps", minimum=1,
                                     maximum=caps.steps)
            pref_steps = number_field(d["pref_max_steps"], precision=0, label="preference max steps", minimum=1,
                                      maximum=caps.steps)
            beta = number_field(d["beta"], label="beta", minimum=0, maximum=1000)
            lr = number_field(d["pref_lr"], label="preference learning rate", minimum=0, maximum=10)
            sigma = number_field(d["noise_sigma"], label="NoDO sigma (methods with NoDO)", minimum=0, maximum=100)
        with gr.Row():
            catalogue_items = number_field(d["catalogue_items"] or 0, precision=0,
                                           label="catalogue items (0: every unseen item)", minimum=0,
                                           maximum=caps.catalogue_items)  # fmt: skip
            eval_examples = number_field(d["eval_examples"] or 0, precision=0, label="test prompts (0: all)",
                                         minimum=0, maximum=caps.eval_examples)  # fmt: skip
            extra = gr.Textbox(label="more overrides, e.g. --pref.options.epsilon=0.2", scale=2)
    launch_btn = gr.Button("Launch comparison in background", variant="primary", elem_id="compare-launch")
    with gr.Row():
        job = gr.Dropdown([], label="Comparison job", scale=3, elem_id="compare-job")
        stop_btn = gr.Button("Stop (checkpoint)", scale=1, elem_id="compare-stop")
        resume_btn = gr.Button("Resume", scale=1, elem_id="compare-resume")
    status = gr.Markdown(elem_id="compare-status")
    bar = gr.HTML(progress_html(None), elem_id="compare-progress")

    gr.Markdown("### Results")
    with gr.Row():
        folder = gr.Dropdown([], label="Comparison folder (a finished job, or type a CLI `compare` output folder)",
                             allow_custom_value=True, scale=4, elem_id="compare-folder")  # fmt: skip
        refresh_btn = gr.Button("Refresh", scale=1, elem_id="compare-refresh")
        open_btn = gr.Button("Open", variant="primary", scale=1, elem_id="compare-open")
    caption = gr.Markdown(elem_id="compare-caption")
    table = gr.Dataframe(interactive=False, label="mean ± std over seeds", elem_id="compare-table")
    files = gr.File(label="Downloads (CSV, LaTeX)", file_count="multiple", elem_id="compare-files")
    with gr.Row():
        reference = gr.Dropdown([], label="Reference", scale=1, elem_id="compare-reference")
        metric = gr.Dropdown([], label="Metric", scale=1, elem_id="compare-metric")
    forest = gr.Plot(label="Paired differences against the reference", elem_id="compare-forest")
    readout = gr.Markdown(elem_id="compare-readout")
    forest_text = gr.Markdown(elem_id="compare-forest-text")
    with gr.Row():
        method_a = gr.Dropdown([], label="Method A (y)", scale=1)
        method_b = gr.Dropdown([], label="Method B (x)", scale=1)
    scatter_plot = gr.Plot(label="Per-user scatter", elem_id="compare-scatter")
    images = gr.Markdown(elem_id="compare-images")

    timer = gr.Timer(1.0)
    form = [dataset, task, sft_from, methods, seeds, sft_steps, pref_steps, beta, lr, sigma, catalogue_items,
            eval_examples, extra]  # fmt: skip
    owner = owner_state(ctx)
    launch_btn.click(partial(launch, ctx), [*form, owner], [job, status, owner], api_name="compare_launch")
    timer.tick(partial(poll, ctx), [job], [status, bar], api_visibility="private", show_progress="hidden")
    stop_btn.click(lambda j, o: control(ctx, j, "stop", o), [job, owner], status, api_name="compare_stop")
    resume_btn.click(lambda j, o: control(ctx, j, "resume", o), [job, owner], status, api_name="compare_resume")
    dataset.change(partial(scenario_note, ctx), [dataset], scenario, api_visibility="private")
    methods.change(knob_note, [methods], knobs, api_visibility="private")

    def refresh():
        return (gr.update(choices=folder_choices(ctx)), gr.update(choices=sft_choices(ctx)),
                gr.update(choices=compare_jobs(ctx)))  # fmt: skip

    refresh_btn.click(refresh, None, [folder, sft_from, job], api_name="compare_refresh")
    opened = open_btn.click(partial(open_folder, ctx), [folder],
                            [reference, metric, method_a, method_b, table, caption, files], api_name="compare_open")
    opened.then(partial(show_forest, ctx), [folder, reference, metric], [forest, forest_text, readout])
    opened.then(partial(show_scatter, ctx), [folder, metric, method_a, method_b], scatter_plot)
    opened.then(partial(show_images, ctx), [folder, metric], images)
    metric.input(partial(show_images, ctx), [folder, metric], images, api_visibility="private")
    for trigger in (reference, metric):
        trigger.input(partial(show_forest, ctx), [folder, reference, metric], [forest, forest_text, readout],
                      api_visibility="private")  # fmt: skip
    for trigger in (metric, method_a, method_b):
        trigger.input(partial(show_scatter, ctx), [folder, metric, method_a, method_b], scatter_plot,
                      api_visibility="private")  # fmt: skip

    def on_load():
        jobs = compare_jobs(ctx)
        return (*refresh()[:2], gr.update(choices=jobs, value=jobs[0] if jobs else None),
                scenario_note(ctx, datasets[0][1] if datasets else None))  # fmt: skip

    from gradio.context import Context

    Context.root_block.load(on_load, None, [folder, sft_from, job, scenario], api_visibility="private")
