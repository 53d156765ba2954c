"""Data tab: a dataset's statistics, one user's history, the task's candidates and the exact prompt.

Every handler is a few lines over hanorec.pipeline.prepare_data (the examples exactly as a run builds
them: same splits, same seeded candidates), hanorec.tasks.render and hanorec.explore.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import (
    LIGHT,
    MAX_USER_CHOICES,
    TASKS,
    download_buttons,
    example_for,
    image_file,
    item_image,
    on_load,
    test_users,
    user_errors,
)

CANDIDATE_COLUMNS = ["candidate", "item", "true next", "log-prob", "prob", "rank"]


# ---- handlers ---------------------------------------------------------------------------------
def open_dataset(ctx, dataset: str, task: str):
    """Statistics of the dataset and the users that have a test prompt for the task (all at once: the API's
    data_open; the page shows the same in two steps, open_dataset_steps)."""
    steps = open_dataset_steps(ctx, dataset, task)
    users = next(steps)[0]
    *_, last = steps
    return (users, *last[1:])


def open_dataset_steps(ctx, dataset: str, task: str):
    """The page's open, in two steps: first the users with a test prompt and the summary (the first user is
    shown while the rest is counted), then the statistics and figures (counted once per dataset fingerprint,
    kept on disk under the runs folder: another app process reads them instead of counting again)."""
    from hanorec.data import planted_sentences
    from hanorec.explore import dataset_stats

    data = ctx.prepared(dataset, task)
    users = test_users(data)  # the windows' users: no candidate is drawn before a user is shown
    summary = f"**{data.dataset.name}**: {data.splits.describe()}. {len(users):,} users have a test prompt for {task}."
    if data.dataset.summary.text_only:
        summary += " Text only: no item has an image, so prompts carry no images."
    if len(users) > MAX_USER_CHOICES:
        summary += f" The list shows the first {MAX_USER_CHOICES:,}; type any other user id."
    summary += "".join(f"\n\n- {line}" for line in planted_sentences(data.dataset))  # demo logic, scenario
    pick = gr.update(choices=users[:MAX_USER_CHOICES], value=users[0] if users else None)
    empty = pd.DataFrame([], columns=["statistic", "value"])
    yield pick, summary + " Counting the statistics…", empty, None, None, None
    with user_errors("counting the dataset's statistics"):
        stats = dataset_stats(data.dataset, cache_dir=stats_cache_dir(ctx))
    table = pd.DataFrame(stats.table, columns=["statistic", "value"])
    yield gr.skip(), summary, table, lengths_figure(stats), popularity_figure(stats), images_figure(stats)


def stats_cache_dir(ctx):
    """Where the dataset statistics are kept between app processes: <runs>/.cache (a dot folder: not a run)."""
    return ctx.runs_dir / ".cache" / "dataset-stats" if getattr(ctx, "runs_dir", None) else None


def open_typed(ctx, typed: str, task: str):
    """A dataset folder typed by the user (confined to the allowed folders)."""
    steps = open_typed_steps(ctx, typed, task)
    first = next(steps)
    *_, last = steps
    return (*first[:2], *last[2:])


def open_typed_steps(ctx, typed: str, task: str):
    """open_typed in open_dataset_steps' two steps (the page's button)."""
    path = ctx.public_path(ctx.resolve_path(typed))  # the menu's name for it, never the server's path
    choices = ctx.dataset_choices()
    if path not in [v for _, v in choices]:
        choices.append((path, path))
    steps = open_dataset_steps(ctx, path, task)
    first = next(steps)
    yield (gr.update(choices=choices, value=path), *first)
    for step in steps:
        yield (gr.skip(), *step)


def show_user(ctx, dataset: str, task: str, user: str, model: str):
    """The user's history (images and titles), the test prompt's candidates scored by the model, the prompt."""
    from hanorec.explore import candidate_scores
    from hanorec.tasks import render

    data, example = example_for(ctx, dataset, task, user)
    ds = data.dataset
    bundle, _ = ctx.model(model, dataset, task)
    cache = getattr(ctx, "results", None)

    def make():
        with user_errors("scoring the candidates"):
            rows = candidate_scores(bundle, ds, example, cache=cache)
            seen = model_view(bundle, ds, example)
        rendered = render(example, ds)
        return (
            history_gallery(ds, ds.sequences[user], example),
            candidates_table(ds, rows),
            [(item_image(ds, r["item"]), ("✓ " if r["true"] else "") + ds.items[r["item"]].title) for r in rows],
            rendered.text,
            rendered.answer,
            seen[0],
            [(image_file(im), caption) for im, caption in seen[1]],
        )

    # the whole view is kept per model (its weights), dataset, task and user: a classroom asks for the same
    # users again and again, and the history, the prompt and what the model sees do not change
    return make() if cache is None else cache.get((bundle.model, ds), ("user view", task, user), make)


def show_user_text(ctx, dataset: str, task: str, user: str):
    """The user's history, prompt, answer and candidates at once (no model): the page shows the user while
    the model scores the candidates (show_user, chained after this)."""
    from hanorec.explore import true_options
    from hanorec.tasks import render

    data, example = example_for(ctx, dataset, task, user)
    ds = data.dataset
    rendered = render(example, ds)
    true = true_options(example)
    rows = [[opt, item, "✓" if k in true else "", None, None, None]
            for k, (opt, item) in enumerate(zip(example.options, example.option_items))]  # fmt: skip
    return (
        history_gallery(ds, ds.sequences[user], example),
        pd.DataFrame(rows, columns=CANDIDATE_COLUMNS),
        [(item_image(ds, r[1]), ("✓ " if r[2] else "") + ds.items[r[1]].title) for r in rows],
        rendered.text,
        rendered.answer,
        gr.skip(),
        gr.skip(),
    )


def refresh_models(ctx):
    return gr.update(choices=ctx.model_choices())


# ---- pieces -------------------------------------------------------------------------------------
def history_gallery(ds, sequence, example) -> list:
    """Every item of the user's sequence in order; the prompt's history and the true next items marked."""
    start = _window_start(sequence, example)
    n_hist = len(example.history)
    out = []
    for k, item in enumerate(sequence):
        if start <= k < start + n_hist:
            mark = "◆ "
        elif start + n_hist <= k < start + n_hist + len(example.targets):
            mark = "★ "
        else:
            mark = ""
        out.append((item_image(ds, item), f"{k + 1} {mark}{ds.items[item].title}"))
    return out


def _window_start(sequence, example) -> int:
    h = list(example.history)
    for k in range(len(sequence) - len(h), -1, -1):
        if list(sequence[k : k + len(h)]) == h:
            return k
    return -1


def candidates_table(ds, rows) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [r["option"], r["item"], "✓" if r["true"] else "", round(r["logp"], 2), round(r["prob"], 3), r["rank"]]
            for r in rows
        ],
        columns=CANDIDATE_COLUMNS,
    )


def model_view(bundle, ds, example):
    """The exact text the model reads (chat template, image tokens expanded) and the images at model size."""
    if hasattr(bundle, "view_example"):  # hanorec.models.ModelBundle.view_example
        view = bundle.view_example(example, ds)
        head = (
            f"[{view.n_tokens} tokens, {view.n_image_tokens} of them image tokens: "
            f"{', '.join(map(str, view.image_tokens))} per image]\n"
        )
        images = [(im, f"image {k + 1}: {im.size[0]}x{im.size[1]}") for k, im in enumerate(view.images)]
        return head + view.text, images
    from hanorec.tasks import render

    r = render(example, ds, image_size=bundle.image_size)
    ids = bundle.encode_prompt(r.text, r.images).input_ids
    text = bundle.tokenizer.decode(ids, skip_special_tokens=False)
    return text, [(im, f"image {k + 1}: {im.size[0]}x{im.size[1]}") for k, im in enumerate(r.images)]


def lengths_figure(stats) -> go.Figure:
    """Users per sequence length, binned here (plotly gets tens of bars, not one value per user)."""
    starts, widths, counts = stats.length_histogram()
    fig = go.Figure(go.Bar(x=(starts + (widths - 1) / 2).tolist(), y=counts.tolist(), width=widths.tolist(),
                           marker_color="#4c78a8", customdata=(starts + widths - 1).tolist(),
                           hovertemplate="%{x} items: %{y} users<extra></extra>" if (widths == 1).all()
                           else "%{x:.0f} items (bin): %{y} users<extra></extra>"))  # fmt: skip
    return _layout(fig, "Sequence length per user", "items in the sequence", "users")


def popularity_figure(stats) -> go.Figure:
    """Interactions per item by rank (at most ~1,500 points, spaced evenly on the log scale of ranks)."""
    ranks, counts = stats.popularity_curve()
    fig = go.Figure(go.Scatter(x=ranks.tolist(), y=counts.tolist(), mode="lines", line_color="#f58518"))
    fig.update_yaxes(type="log")
    return _layout(fig, "Item popularity (long tail)", "item rank", "interactions (log)")


def images_figure(stats) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=["users", "items", "items with image", "missing images"],
            y=[stats.n_users, stats.n_items, stats.n_items - stats.missing_images, stats.missing_images],
            marker_color=["#4c78a8", "#72b7b2", "#54a24b", "#e45756"],
            text=[stats.n_users, stats.n_items, stats.n_items - stats.missing_images, stats.missing_images],
            textposition="inside",
        )
    )
    return _layout(fig, "Users, items and missing images", "", "count")


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=title, xaxis_title=x, yaxis_title=y, height=300, margin=dict(l=40, r=10, t=40, b=40), template="plotly_white"
    )
    return fig


# ---- layout -------------------------------------------------------------------------------------
def build(ctx) -> None:
    from functools import partial

    datasets = ctx.dataset_choices()
    with gr.Row():
        dataset = ctx.path_menu(gr.Dropdown(datasets, value=datasets[0][1] if datasets else None, label="Dataset",
                                                scale=3))  # fmt: skip
        typed = gr.Textbox(label="…or type a dataset folder (inside the allowed folders)", scale=3)
        open_btn = gr.Button("Open folder", scale=1)
        task = gr.Dropdown(list(TASKS), value="hit3", label="Task", scale=1)
    summary = gr.Markdown()
    with gr.Accordion("Dataset statistics", open=True):
        with gr.Row():
            stats_table = gr.Dataframe(headers=["statistic", "value"], interactive=False, label="Counts")
            fig_images = gr.Plot(label="Users, items, missing images")
        download_buttons(dataset_statistics=stats_table)
        with gr.Row():
            fig_lengths = gr.Plot(label="Sequence lengths")
            fig_pop = gr.Plot(label="Item popularity")
    with gr.Row():
        user = gr.Dropdown([], label="User (test prompt)", scale=2, allow_custom_value=True)
        model = ctx.path_menu(gr.Dropdown(ctx.model_choices(), value=ctx.default_model(),
                                              label="Score candidates with", scale=3))  # fmt: skip
        refresh = gr.Button("Refresh model list", scale=1)
    gr.Markdown(
        "**History** in time order (click an image to enlarge): ◆ = shown in the prompt, ★ = a true next item "
        "the model should recommend; the test prompt is the user's latest window."
    )
    history = gr.Gallery(label="History", columns=8, height=330, object_fit="contain", elem_id="data-history")
    with gr.Row():
        cands = gr.Dataframe(headers=CANDIDATE_COLUMNS, interactive=False, label="Candidates (✓ = true next item; rank = the model's ranking by log-prob)", scale=3)
        cand_images = gr.Gallery(label="Candidate images (✓ = true next)", columns=4, height=300, object_fit="contain", scale=2)
    download_buttons(candidates=cands)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt (as written, <image> = one history image)", lines=6, elem_id="data-prompt")
        answer = gr.Textbox(label="Target answer", lines=6)
    with gr.Accordion("What the model sees (chat template, image tokens expanded, images at model size)", open=False):
        with gr.Row():
            seen_text = gr.Textbox(label="Model input text", lines=12, max_lines=20, scale=3, elem_id="data-seen")
            seen_images = gr.Gallery(label="Images as the model receives them", columns=5, height=300,
                                     object_fit="contain", scale=2)  # fmt: skip

    stats_out = [user, summary, stats_table, fig_lengths, fig_pop, fig_images]
    user_out = [history, cands, cand_images, prompt, answer, seen_text, seen_images]
    user_in = [dataset, task, user, model]
    load = partial(open_dataset_steps, ctx)  # two steps: users and summary, then the statistics
    dataset.change(load, [dataset, task], stats_out, api_visibility="private")
    task.change(load, [dataset, task], stats_out, api_visibility="private")
    typed_out = [dataset, *stats_out]
    open_btn.click(partial(open_typed_steps, ctx), [typed, task], typed_out, api_visibility="private")
    # the API's calls answer once, with everything (a hidden button carries them)
    api = gr.Button(visible=False)
    api.click(partial(open_dataset, ctx), [dataset, task], stats_out, api_name="data_open")
    api.click(partial(open_typed, ctx), [typed, task], typed_out, api_name="data_open_typed")
    light = ctx.events(LIGHT)
    user.change(partial(show_user_text, ctx), user_in[:3], user_out, api_visibility="private", **light).then(
        partial(show_user, ctx), user_in, user_out, api_name="data_user", **light
    )
    model.change(partial(show_user, ctx), user_in, user_out, api_visibility="private", **light)
    refresh.click(partial(refresh_models, ctx), None, model, api_name="data_models")
    on_load(load, [dataset, task], stats_out)
