"""Noise lab: how NoDO's Gaussian noise (method.md section 8) moves one prompt's candidate scores.

Handlers are a few lines over hanorec.explore.example_noise / noise_sweep, which call
hanorec.scoring.score_options(noise=NoiseSpec(...)) and hanorec.noise.noise_summary / lora_factor_scale.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import (
    HEAVY,
    NOISE,
    download_buttons,
    example_for,
    example_pickers,
    frozen_plot,
    number,
    number_field,
    slider_field,
    user_errors,
)

TARGETS = ("lora", "logits")
# the lab's first settings: what a classroom asks for most (app/main.py --warm precomputes them)
DEFAULT_SIGMA, DEFAULT_DRAWS, DEFAULT_SEED = 0.02, 100, 0


def draw_noise(ctx, dataset, task, user, model, target, sigma, draws, seed):
    """Score the candidates clean and under `draws` noise draws; summary, per-candidate table, chart."""
    sigma, draws, seed = _numbers(ctx, sigma, draws, seed)
    data, example = example_for(ctx, dataset, task, user)
    bundle, _ = ctx.model(model, dataset, task)
    cache = getattr(ctx, "results", None)

    def make():
        return _noise_answer(ctx, data, example, bundle, task, target, sigma, draws, seed)

    # the whole answer (the figure already serialised) is kept per model weights, dataset, example and
    # setting: a classroom asks for the same users at the lab's defaults again and again
    if cache is None:
        return make()
    key = ("noise answer", example, str(target), float(sigma), int(draws), int(seed))
    return cache.get((bundle.model, data.dataset), key, make)


def _noise_answer(ctx, data, example, bundle, task, target, sigma, draws, seed):
    from hanorec.explore import example_noise

    with user_errors("scoring under noise"):
        clean, noisy, summary = example_noise(
            bundle, data.dataset, example, target=target, sigma=sigma, draws=int(draws), seed=int(seed),
            cache=ctx.results,
        )  # fmt: skip
        scale = lora_scale_text(bundle, target, sigma, ctx.results)
    true = set(example.targets) if task != "hit1" else set()
    labels = [_short(o) + (" ✓" if item in true else "") for o, item in zip(example.options, example.option_items)]
    d = summary.as_dict()
    text = (
        f"**{int(draws)} draws, sigma = {sigma:g} on the {target}.** "
        f"Top-1 changed in **{d['top1_change_rate']:.0%}** of draws, the top-3 set in **{d['top3_change_rate']:.0%}**; "
        f"KL(noisy ‖ clean) over the candidates: mean **{d['kl_mean']:.4g}** (std {d['kl_std']:.3g}); "
        f"mean |score shift| {d['mean_abs_shift']:.4g} nats. {scale}"
    )
    table = summary.per_candidate.round(4)
    table.insert(0, "candidate", labels)
    table = table.drop(columns=["option"])
    return text, frozen_plot(scores_figure(labels, clean, noisy, sigma)), table


def sweep(ctx, dataset, task, user, model, target, draws, seed, sigma, progress=gr.Progress()):
    """KL and top-1 / top-3 change rates as sigma grows (fewer draws per sigma)."""
    from hanorec.explore import noise_sweep

    sigma, draws, seed = _numbers(ctx, sigma, draws, seed)
    data, example = example_for(ctx, dataset, task, user)
    bundle, _ = ctx.model(model, dataset, task)
    progress(0, desc="sweeping sigma")
    with user_errors("sweeping sigma"):
        rows = noise_sweep(
            bundle,
            data.dataset,
            example,
            target=target,
            draws=max(1, int(draws) // 5),
            seed=int(seed),
            progress=lambda done, total: progress(done / total, desc=f"sigma {done}/{total}"),
            cache=ctx.results,
        )
        a_rms = _lora_scale(bundle, ctx.results).a_rms if target == "lora" else None
    return sweep_figure(pd.DataFrame(rows), sigma, a_rms, target), pd.DataFrame(rows).round(5)


def _numbers(ctx, sigma, draws, seed):
    """sigma, draws and seed through app.common.number; demo mode caps the draws."""
    cap = ctx.limit("draws", MAX_DRAWS) if hasattr(ctx, "limit") else MAX_DRAWS
    return (number(sigma, "sigma", minimum=0, maximum=100), number(draws, "draws", integer=True, minimum=1, maximum=cap),
            number(seed, "seed", integer=True, minimum=0, maximum=2**32 - 1))  # fmt: skip


MAX_DRAWS = 300


def default_draws(ctx) -> int:
    """The draws slider's first value: DEFAULT_DRAWS, or demo mode's cap when lower."""
    cap = ctx.limit("draws", MAX_DRAWS) if hasattr(ctx, "limit") else MAX_DRAWS
    return min(DEFAULT_DRAWS, cap)


def lora_scale_text(bundle, target: str, sigma: float, cache=None) -> str:
    if target != "lora":
        return "Logit noise is added to every completion token's prediction logits."
    s = _lora_scale(bundle, cache)
    ratio = f"{sigma / s.a_rms:.2g}x" if s.a_rms > 0 else "n/a"
    return (
        f"Scale of the {s.n_pairs} LoRA factor pairs it perturbs: rms(A) = {s.a_rms:.3g}, rms(B) = {s.b_rms:.3g} "
        f"(sigma / rms(A) = {ratio}; a fresh adapter has B = 0)."
    )


def _lora_scale(bundle, cache=None):
    """hanorec.noise.lora_factor_scale of the model, kept in the result cache while its weights stay the same."""
    from hanorec.noise import lora_factor_scale

    if cache is None:
        return lora_factor_scale(bundle.model)
    return cache.get((bundle.model,), ("lora_scale",), lambda: lora_factor_scale(bundle.model))


def _short(text: str, n: int = 34) -> str:
    text = text.replace("\n", " / ")
    return text if len(text) <= n else text[: n - 1] + "…"


def scores_figure(labels, clean, noisy, sigma) -> go.Figure:
    """One box per candidate: how far its score moved (noisy - clean) over the draws."""
    fig = go.Figure()
    for k, label in enumerate(labels):
        shift = (noisy[:, k] - clean[k]).tolist()
        fig.add_trace(
            go.Box(y=shift, name=f"{label}<br>clean {float(clean[k]):.1f}", boxpoints="outliers",
                   marker_color="#4c78a8", showlegend=False)
        )  # fmt: skip
    fig.add_hline(y=0, line_color="#e45756", line_dash="dot", annotation_text="clean score")
    fig.update_layout(
        title=f"How far each candidate's score moves under noise sigma = {sigma:g} (one box over the draws; ✓ = true next)",
        yaxis_title="noisy − clean log p(candidate | prompt)",
        height=380,
        margin=dict(l=50, r=10, t=50, b=90),
        template="plotly_white",
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right"),
    )
    return fig


def sweep_figure(df: pd.DataFrame, sigma: float, a_rms: float | None, target: str) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=df.sigma, y=df.kl_mean, name="KL(noisy ‖ clean)", mode="lines+markers"), secondary_y=False)
    fig.add_trace(go.Scatter(x=df.sigma, y=df.top1_change_rate, name="top-1 changed", mode="lines+markers", line_dash="dot"), secondary_y=True)
    fig.add_trace(go.Scatter(x=df.sigma, y=df.top3_change_rate, name="top-3 set changed", mode="lines+markers", line_dash="dash"), secondary_y=True)
    fig.add_vline(x=sigma, line_color="grey", annotation_text=f"chosen sigma {sigma:g}")
    if a_rms:
        fig.add_vline(x=a_rms, line_color="#54a24b", line_dash="dot", annotation_text=f"rms(LoRA A) {a_rms:.3g}", annotation_position="bottom right")
    fig.update_layout(
        title=f"Noise on the {target}: divergence from the clean ranking as sigma grows",
        xaxis_title="sigma", height=380, template="plotly_white", margin=dict(l=50, r=50, t=50, b=40),
    )  # fmt: skip
    fig.update_yaxes(title_text="KL (nats)", secondary_y=False)
    fig.update_yaxes(title_text="share of draws", range=[0, 1.05], secondary_y=True)
    return fig


def build(ctx) -> None:
    from functools import partial

    gr.Markdown(
        "Score one prompt's candidates **without noise** and under **NoDO noise** (Gaussian, std sigma) on the "
        "LoRA factors A and B or on the output logits, over many independent draws. Training uses noise; "
        "here it is applied at inference only to show how far it moves the ranking."
    )
    dataset, task, user, model = example_pickers(ctx, "noise")
    with gr.Row():
        target = gr.Radio(list(TARGETS), value="lora", label="Noise target", scale=1)
        sigma = slider_field(0.0, 1.0, value=DEFAULT_SIGMA, step=0.001, label="sigma (LoRA: try 0.005-0.1; logits: 0.1-1)", scale=2, elem_id="noise-sigma")
        cap = ctx.limit("draws", MAX_DRAWS) if hasattr(ctx, "limit") else MAX_DRAWS
        draws = slider_field(1, cap, value=default_draws(ctx), step=1, label="draws", scale=2)
        seed = number_field(DEFAULT_SEED, label="seed", precision=0, scale=1, minimum=0)
    with gr.Row():
        run = gr.Button("Draw noise", variant="primary", elem_id="noise-run")
        run_sweep = gr.Button("Sweep sigma (KL vs sigma)", elem_id="noise-sweep")
    summary = gr.Markdown(elem_id="noise-summary")
    scores = gr.Plot(label="Scores per candidate", elem_id="noise-scores")
    table = gr.Dataframe(headers=["candidate", "clean", "noisy_mean", "shift_mean", "shift_std", "top1_rate"], interactive=False, label="Per candidate (shift = noisy - clean, top1_rate = share of draws it was top-1)")
    download_buttons(noise_per_candidate=table)
    sweep_plot = gr.Plot(label="Sweep over sigma", elem_id="noise-sweep-plot")
    sweep_table = gr.Dataframe(
        headers=["sigma", "kl_mean", "kl_std", "top1_change_rate", "top3_change_rate", "mean_abs_shift"],
        interactive=False, label="Sweep values",
    )  # fmt: skip
    download_buttons(sigma_sweep=sweep_table)

    inputs = [dataset, task, user, model, target, sigma, draws, seed]
    heavy = ctx.events(HEAVY)
    run.click(partial(draw_noise, ctx), inputs, [summary, scores, table], api_name="noise_draw", **ctx.events(NOISE))
    run_sweep.click(
        partial(sweep, ctx), [dataset, task, user, model, target, draws, seed, sigma], [sweep_plot, sweep_table],
        api_name="noise_sweep", **heavy,
    )  # fmt: skip
