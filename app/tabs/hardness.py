"""Hardness tab: HaRS (method.md section 7) on a model's own item embeddings.

For the training pairs of a run (or the untrained model on a dataset): each pair's profile distance D,
lambda and beta = beta0 x lambda; the lambda distribution and its spread; one user's pair with each
negative's neighbour profile beside the positive's; re-sampling the negatives; K and the profile
temperature (1 = the paper); after a preference run, per-pair reward margins and accuracy, and who sets beta
(HaRS, beta-DPO and DynamicPO on the same pairs, hanorec.beta_views).
Handlers are a few lines over hanorec.hardness (ItemIndex, pairs_table, pair_detail: the numbers),
hanorec.explore (training_pairs, pair_stats, spread) and hanorec.pairs.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.common import (
    HEAVY,
    LIGHT,
    download_buttons,
    example_pickers,
    item_image,
    number,
    number_field,
    slider_field,
    user_errors,
)
from hanorec import methods

SAMPLING = ("random", "embedding")
FALSE_NEGATIVE = "false negatives"  # ✗ per rejected item of the true item's own colour and genre
STATS_COLUMNS = ["pair", "user", "lambda", "beta", "reward_margin", "accurate", "chosen_reward", "rejected_reward"]


# ---- state shared by the handlers (cached in the context) ---------------------------------------
def _setup(ctx, dataset, task, model):
    """(cfg, PreparedData, hanorec.hardness.ItemIndex) for the chosen model: a run's own config and data, and
    the item index of the model lambda is computed from (a preference stage: its run's SFT model), built
    once per model and dataset and kept in the app's cache (neighbours per K, profiles per (K, T) inside)."""
    from hanorec.hardness import ItemIndex

    source = model or "base"
    if source == "base" or source.startswith("base:"):  # an untrained preset
        cfg = ctx.config(dataset, task)
        data = ctx.prepared(dataset, task)
        emb_source = source
    else:
        from hanorec.runs import sft_run_of

        run, _, stage = source.rpartition("::")
        cfg = ctx.model(source, dataset, task)[1] or ctx.config(dataset, task)
        data = ctx.prepared_for(cfg)
        # the SFT model the stage was trained on, in this run or in the run it took its SFT from
        emb_source = f"{sft_run_of(ctx.resolve_path(run), stage)}::sft"
    bundle, _ = ctx.model(emb_source, dataset, task)

    def build():
        with user_errors("computing item embeddings"):
            return ItemIndex.from_model(bundle, data.dataset)

    index = ctx.cached(("item-index", emb_source, str(cfg.data.path)), build)
    return cfg, data, index


def _k(index, k) -> int:
    """K as asked, at most the number of other items."""
    return max(1, min(number(k, "K neighbours", integer=True, minimum=1, maximum=10_000), len(index.ids) - 1))


def _pairs(ctx, dataset, task, model, k, temperature, sampling, seed):
    """(cfg, data, index, pairs, hanorec.hardness.pairs_table) for the chosen settings."""
    from hanorec.explore import training_pairs
    from hanorec.hardness import pairs_table

    temperature = number(temperature, "profile temperature", minimum=1e-3, maximum=100)
    seed = number(seed, "sampling seed", integer=True, minimum=0, maximum=2**32 - 1)
    cfg, data, index = _setup(ctx, dataset, task, model)
    with user_errors("building the preference pairs"):
        pairs = training_pairs(cfg, data, index.ids, index.embeddings, sampling=sampling, seed=int(seed))
        table = pairs_table(pairs, index, beta0=cfg.pref.beta, k=_k(index, k), temperature=float(temperature))
    return cfg, data, index, pairs, table


# ---- handlers -----------------------------------------------------------------------------------
def compute(ctx, dataset, task, model, k, temperature, sampling, seed):
    """lambda and beta of every training pair; the distribution and its spread in numbers; in a demo dataset,
    which rejected items are false negatives (the true item's own colour and genre: what a teaching scenario
    plants), and whether lambda finds them."""
    from hanorec.explore import false_negative_summary, same_taste_negatives, spread

    cfg, data, _, pairs, pt = _pairs(ctx, dataset, task, model, k, temperature, sampling, seed)
    lam = pt["lambda"].tolist()
    s = spread(lam)
    beyond = "" if float(temperature) == 1.0 else " **Temperature ≠ 1 is beyond the paper** (exploration only)."
    text = (
        f"**{len(pt)} training pairs** ({cfg.task.name}, {sampling} negatives, K = {int(k)}, temperature {temperature:g}, "
        f"beta0 = {cfg.pref.beta:g}). lambda: min **{s['min']:.5f}**, 5% {s['p05']:.5f}, mean {s['mean']:.5f}, "
        f"95% {s['p95']:.5f}, max **{s['max']:.5f}** (range {s['range']:.2e}, std {s['std']:.2e}). "
        f"beta = beta0 x lambda spans {cfg.pref.beta * s['min']:.5f} to {cfg.pref.beta * s['max']:.5f}; "
        "training also multiplies it by the batch responsiveness eta (see the run's metrics)." + beyond
    )
    marks = same_taste_negatives(pairs, data.dataset)
    planted = data.dataset.scenario.get("false_negatives", 0.0)
    if marks is not None and (note := false_negative_summary(lam, marks, planted)):
        text += f"\n\n{note} The column *{FALSE_NEGATIVE}* marks each such rejected item with ✗."
    users = sorted(set(pt["user"]))
    table = pt[["pair", "user", "distance", "lambda", "beta"]].rename(columns={"distance": "D"})
    table = table.astype({"D": float, "lambda": float})
    table["beta"] = (cfg.pref.beta * table["lambda"]).clip(lower=1e-6)  # beta0 x lambda in float64, as training
    if marks is not None:  # a demo dataset: which rejected items share the true item's colour and genre
        table[FALSE_NEGATIVE] = ["✗ " * m if m else "" for m in marks]
    table = table.round(6)
    fig = lambda_figure(lam, marks if planted else None)
    return text, fig, table, gr.update(choices=users, value=users[0] if users else None)


def pair_view(ctx, dataset, task, model, k, temperature, sampling, seed, user):
    """(pair number, the pair, hanorec.hardness.pair_detail of it, the dataset) for one user's training pair."""
    from hanorec.hardness import pair_detail

    if not user:
        raise gr.Error("Compute the pairs and pick a user first.")
    cfg, data, index, pairs, pt = _pairs(ctx, dataset, task, model, k, temperature, sampling, seed)
    mine = pt.index[pt["user"] == user]
    if not len(mine):
        raise gr.Error(f"User {user!r} has no training pair with these settings.")
    n = int(mine[0])
    detail = pair_detail(
        pairs[n], index, mean_distance=pt.attrs["mean_distance"], beta0=cfg.pref.beta,
        k=_k(index, k), temperature=float(temperature),
    )  # fmt: skip
    return n, pairs[n], detail, data.dataset


def show_pair(ctx, dataset, task, model, k, temperature, sampling, seed, user):
    """One user's training pair: aligned (positive, negative) items, distances, lambda, beta, profiles."""
    n, pair, detail, ds = pair_view(ctx, dataset, task, model, k, temperature, sampling, seed, user)
    aligned = detail.items.rename(columns={"positive_title": "positive title", "negative_title": "negative title"})
    positives = [detail.profiles[i]["p"].max() for i in aligned["positive"]]
    flat = float(sum(positives) / len(positives))
    k_used = len(detail.profiles[aligned["positive"][0]])
    text = (
        f"Pair {n} of user {user}: D = {detail.distance:.5f} (mean of the {len(aligned)} aligned distances), "
        f"**lambda = {detail.lam:.5f}**, **beta = {max(1e-6, detail.beta):.5f}**. Chosen: {_one_line(pair.chosen)}; "
        f"rejected: {_one_line(pair.rejected[0])}. The positives' largest profile weight is {flat:.3f} "
        f"(1/K = {1 / k_used:.3f} would be a flat profile: near-flat profiles are why lambda stays "
        "close to 1; a lower temperature sharpens them)."
    )
    gallery = []
    for j, a in aligned.iterrows():
        gallery += [(item_image(ds, a["positive"]), f"{j + 1}+ {a['positive title']}"),
                    (item_image(ds, a["negative"]), f"{j + 1}− {a['negative title']}")]  # fmt: skip
    return text, aligned.astype({"distance": float}).round(5), profiles_figure(detail), gallery


def _one_line(answer: str) -> str:
    return " / ".join(answer.splitlines())


GRID_KS, GRID_TEMPERATURES = (5, 10, 20, 50), (1.0, 0.3, 0.1, 0.03)


def spread_grid(ctx, dataset, task, model, sampling, seed):
    """lambda's spread for several K and temperatures: what widens it (temperature 1 = paper)."""
    from hanorec.explore import spread, training_pairs
    from hanorec.hardness import pairs_table

    seed = number(seed, "sampling seed", integer=True, minimum=0, maximum=2**32 - 1)
    cfg, data, index = _setup(ctx, dataset, task, model)
    rows = []
    with user_errors("computing the spread grid"):
        pairs = training_pairs(cfg, data, index.ids, index.embeddings, sampling=sampling, seed=int(seed))
        for k in GRID_KS:
            for t in GRID_TEMPERATURES:
                s = spread(pairs_table(pairs, index, beta0=1.0, k=_k(index, k), temperature=t)["lambda"])
                rows.append({"K": _k(index, k), "temperature": t, "lambda min": s["min"], "lambda max": s["max"],
                             "lambda std": s["std"], "paper": t == 1.0})  # fmt: skip
    return pd.DataFrame(rows).round(6)


def score_pairs(ctx, dataset, task, model, progress=gr.Progress()):
    """Per-pair reward margin and accuracy of a trained preference stage (policy vs its reference)."""
    from hanorec.explore import pair_stats, training_pairs
    from hanorec.hardness import pairs_table

    if not model or model == "base" or model.startswith("base:") or model.endswith("::sft"):
        raise gr.Error("Choose a preference stage of a run (DPO, S-DPO, HaNo-DPO...) to see its per-pair training view.")
    cfg, data, index = _setup(ctx, dataset, task, model)
    bundle, _ = ctx.model(model, dataset, task)
    with user_errors("scoring the training pairs"):
        pairs = training_pairs(cfg, data, index.ids, index.embeddings)
        hard = methods.uses_hardness(cfg.pref)
        temperature = getattr(cfg.pref, "hars_temperature", 1.0)  # what training computed lambda with
        lam = pairs_table(pairs, index, k=_k(index, cfg.pref.hardness_k), temperature=temperature)["lambda"].tolist() if hard else [1.0] * len(pairs)
        progress(0, desc="scoring pairs")
        rows = pair_stats(
            bundle, data.dataset, pairs, lam, beta0=cfg.pref.beta,
            progress=lambda done, total: progress(done / total, desc=f"pair {done}/{total}"),
        )  # fmt: skip
    df = pd.DataFrame(rows).round(5)
    df = df[STATS_COLUMNS + [c for c in df.columns if c not in STATS_COLUMNS]]
    acc = df["accurate"].mean()
    text = (
        f"**{len(df)} training pairs** of {methods.label_of(cfg.pref)} scored with the trained policy and its reference (adapter "
        f"disabled): reward accuracy **{acc:.1%}**, mean margin {df['reward_margin'].mean():.4g}. Sort by a column header, "
        "filter with the search box; pick a pair number below to see its prompt and images."
    )
    return text, df, margins_figure(df)


def pair_prompt(ctx, dataset, task, model, pair_index):
    """The prompt, chosen and rejected answers and the images of training pair `pair_index`."""
    from hanorec.explore import training_pairs
    from hanorec.tasks import render

    cfg, data, index = _setup(ctx, dataset, task, model)
    pairs = training_pairs(cfg, data, index.ids, index.embeddings)
    n = number(pair_index, "pair #", integer=True, optional=True) or 0
    if not 0 <= n < len(pairs):
        raise gr.Error(f"Pair {n} does not exist; there are {len(pairs)} pairs (0 to {len(pairs) - 1}).")
    pair = pairs[n]
    r = render(pair.example, data.dataset)
    images = [(im, data.dataset.items[i].title) for im, i in zip(r.images, r.image_items)]
    return r.text, pair.chosen, "\n---\n".join(pair.rejected), images


def who_sets_beta(ctx, dataset, task, model, k_negatives, max_pairs, progress=gr.Progress()):
    """For a preference stage's training pairs: the per-pair beta of HaRS, beta-DPO and DynamicPO side by side
    (hanorec.beta_views), against the reward margin and the planted false negatives."""
    from hanorec import beta_views
    from hanorec.explore import training_pairs
    from hanorec.hardness import pairs_table

    if not model or model == "base" or model.startswith("base:") or model.endswith("::sft"):
        raise gr.Error("Choose a preference stage of a run (DPO, HaNo-DPO...) to see who sets beta for its pairs.")
    k = number(k_negatives, "K rejected answers", integer=True, minimum=1, maximum=8)
    n = number(max_pairs, "pairs", integer=True, minimum=4, maximum=512)
    cfg, data, index = _setup(ctx, dataset, task, model)
    bundle, _ = ctx.model(model, dataset, task)
    with user_errors("scoring the training pairs"):
        pairs = training_pairs(cfg, data, index.ids, index.embeddings, k_negatives=k)[:n]
        lam = pairs_table(pairs, index, k=_k(index, cfg.pref.hardness_k))["lambda"].tolist()
        progress(0, desc="scoring pairs")
        table, negatives = beta_views.who_sets_beta(
            bundle, data.dataset, pairs, lam, beta0=cfg.pref.beta, batch_size=cfg.pref.batch_size,
            mode=cfg.pref.scoring, progress=lambda done, total: progress(done / total, desc=f"pair {done}/{total}"),
        )  # fmt: skip
    planted = data.dataset.scenario.get("false_negatives", 0.0)
    marks = (f"this dataset plants false negatives ({planted:g} of the training negatives): a red point's rejected "
             "answer holds an item of the first target's (colour, genre) cluster" if planted else
             "no false negatives are planted in this dataset (a red point's rejected answer shares the target's "
             "cluster by chance); a teaching scenario plants them (`make-demo --false-negatives=0.3`)")  # fmt: skip
    text = (
        f"**Who sets beta** for {len(table)} training pairs of {methods.label_of(cfg.pref)} (K = {k}, micro-batches "
        f"of {cfg.pref.batch_size} in order, beta0 = {cfg.pref.beta:g}): HaRS beta0 x eta x lambda (lambda from "
        "the SFT model's item embeddings, fixed before training), beta-DPO one beta per micro-batch, DynamicPO "
        f"one beta per boundary negative from the policy's own log-probs. {marks}."
    )
    return text, beta_views.summary(table).round(5), table.round(5), beta_figure(table, negatives)


def beta_figure(table: pd.DataFrame, negatives: pd.DataFrame) -> go.Figure:
    """Three panels, beta against the reward margin: HaRS and beta-DPO per pair, DynamicPO per rejected answer
    (its boundary negatives; the others keep beta0); red: a (possibly planted) false negative."""
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True,
                        subplot_titles=["HaRS: beta0 x eta x lambda (per pair)", "beta-DPO (per micro-batch)",
                                        "DynamicPO (per boundary negative)"])  # fmt: skip
    fn_pair = table["false_negatives"].fillna(0).astype(float) > 0
    on = negatives[negatives["boundary"]]
    fn_neg = on["false_negative"].fillna(False).astype(bool)
    panels = ((1, table, "beta_hars", fn_pair), (2, table, "beta_dpo_batch", fn_pair), (3, on, "beta_dynamicpo", fn_neg))
    for col, df, y, fn in panels:
        for flag, color, name in ((False, "#4c78a8", "no false negative"), (True, "#e45756", "false negative")):
            part = df[fn == flag]
            fig.add_trace(go.Scatter(x=part["reward_margin"], y=part[y], mode="markers", marker_color=color, name=name,
                                     showlegend=col == 1, text=[f"pair {p}" for p in part["pair"]]),
                          row=1, col=col)  # fmt: skip
    fig.update_layout(title="Who sets beta? Each method's beta for the same pairs against the reward margin beta0 x h",
                      height=360, template="plotly_white", margin=dict(l=40, r=10, t=60, b=40))  # fmt: skip
    fig.update_xaxes(title_text="reward margin")
    fig.update_yaxes(title_text="beta", col=1)
    return fig


def select_pair(evt: gr.SelectData):
    """Clicking a row of the per-pair table picks that pair."""
    row = evt.row_value if evt is not None and evt.row_value else None
    return int(row[0]) if row else 0


# ---- figures ------------------------------------------------------------------------------------
def lambda_figure(lam, marks=None) -> go.Figure:
    """lambda's histogram; with ``marks`` (false negatives per pair, a false-negatives scenario), the pairs
    holding one stacked in their own colour, so a student sees where lambda puts them."""
    if marks is None:
        fig = go.Figure(go.Histogram(x=lam, nbinsx=40, marker_color="#4c78a8"))
    else:
        fig = go.Figure()
        for fn, color, name in ((False, "#4c78a8", "other pairs"), (True, "#e45756", "with a false negative")):
            fig.add_trace(go.Histogram(x=[v for v, m in zip(lam, marks) if (m > 0) == fn], nbinsx=40, name=name,
                                       marker_color=color))  # fmt: skip
        fig.update_layout(barmode="stack")
    fig.add_vline(x=1.0, line_dash="dot", line_color="grey", annotation_text="lambda = 1 (DPO)")
    fig.update_layout(
        title="lambda over the training pairs (x axis zoomed to the data)", xaxis_title="lambda", yaxis_title="pairs",
        height=320, template="plotly_white", margin=dict(l=40, r=10, t=40, b=40),
    )  # fmt: skip
    fig.update_xaxes(tickformat=".4f")
    return fig


def profiles_figure(detail) -> go.Figure:
    """Per aligned pair: the positive's and the negative's softmax profile over their K nearest neighbours
    (detail: hanorec.hardness.pair_detail's PairHardness)."""
    aligned = detail.items
    n = len(aligned)
    fig = make_subplots(rows=1, cols=n, subplot_titles=[f"pair {j + 1}: distance {d:.4f}" for j, d in enumerate(aligned["distance"])])
    for j, a in aligned.iterrows():
        for key, color, name in (("positive", "#54a24b", "positive"), ("negative", "#e45756", "negative")):
            prof = detail.profiles[a[key]]
            fig.add_trace(
                go.Bar(
                    x=prof["rank"].tolist(), y=prof["p"].tolist(), name=name, marker_color=color,
                    showlegend=j == 0, hovertext=[f"neighbour {q}" for q in prof["neighbour"]],
                ),
                row=1, col=j + 1,
            )  # fmt: skip
    fig.update_layout(
        title="Neighbour profiles: softmax over each item's K most similar items (sorted); D = distance between them",
        barmode="group", height=320, template="plotly_white", margin=dict(l=40, r=10, t=60, b=40),
    )  # fmt: skip
    fig.update_xaxes(title_text="neighbour rank")
    return fig


def margins_figure(df: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for ok, color, name in ((True, "#54a24b", "chosen ranked higher"), (False, "#e45756", "rejected ranked higher")):
        part = df[df["accurate"] == ok]
        fig.add_trace(go.Scatter(x=part["lambda"], y=part["reward_margin"], mode="markers", marker_color=color, name=name,
                                 text=[f"pair {p}, user {u}" for p, u in zip(part["pair"], part["user"])]))  # fmt: skip
    fig.update_layout(
        title="Reward margin per training pair against its lambda", xaxis_title="lambda", yaxis_title="reward margin",
        height=340, template="plotly_white", margin=dict(l=40, r=10, t=40, b=40),
    )  # fmt: skip
    return fig


# ---- layout -------------------------------------------------------------------------------------
def build(ctx) -> None:
    from functools import partial

    gr.Markdown(
        "**HaRS**: each item's *profile* is a softmax over its K most similar items (the model's own fused title + "
        "image embeddings); a pair's distance D compares the positive's and negative's profiles, "
        "lambda = sigmoid(D) / sigmoid(mean D) and beta = beta0 x lambda: a hard negative (profile like the "
        "positive's) gets a smaller beta. Choose a run's preference stage to use its own data and pairs."
    )
    dataset, task, _, model = example_pickers(ctx, "hardness", with_user=False)
    with gr.Row():
        k = slider_field(2, 50, value=10, step=1, label="K neighbours (paper: 10)")
        temperature = slider_field(0.01, 2.0, value=1.0, step=0.01, label="profile temperature (1 = paper; other values are beyond it)")
        sampling = gr.Radio(list(SAMPLING), value="random", label="negative sampling")
        seed = number_field(0, label="sampling seed", precision=0, minimum=0)
    go_btn = gr.Button("Compute lambda for the training pairs", variant="primary", elem_id="hardness-run")
    summary = gr.Markdown(elem_id="hardness-summary")
    with gr.Row():
        hist = gr.Plot(label="lambda distribution")
        table = gr.Dataframe(headers=["pair", "user", "D", "lambda", "beta"], interactive=False, label="Pairs (D, lambda, beta)", max_height=320, show_search="filter")
    download_buttons(pairs=table)
    with gr.Accordion("What widens the spread: lambda range per K and temperature", open=False):
        grid_btn = gr.Button("Compute the grid")
        grid = gr.Dataframe(headers=["K", "temperature", "lambda min", "lambda max", "lambda std", "paper"], interactive=False)
        download_buttons(lambda_grid=grid)
    gr.Markdown("### One user's pair")
    with gr.Row():
        user = gr.Dropdown([], label="User (with a training pair)", allow_custom_value=True)
    pair_text = gr.Markdown()
    aligned = gr.Dataframe(interactive=False, label="Aligned (positive, negative) items")
    download_buttons(aligned_items=aligned)
    profiles = gr.Plot(label="Neighbour profiles")
    images = gr.Gallery(label="Aligned pairs: positive (+) then its negative (−)", columns=6, height=250, object_fit="contain")
    gr.Markdown("### Per-pair training view (after a preference run)")
    stats_btn = gr.Button("Score the training pairs with the policy and its reference", elem_id="hardness-stats")
    stats_text = gr.Markdown(elem_id="hardness-stats-text")
    with gr.Row():
        stats = gr.Dataframe(headers=STATS_COLUMNS, interactive=False, label="Per pair (click a row)", max_height=360, show_search="filter", scale=3)
        margins = gr.Plot(label="Reward margin vs lambda", scale=2)
    download_buttons(per_pair_statistics=stats)
    with gr.Row():
        pair_n = number_field(0, label="pair #", precision=0, scale=1, minimum=0)
        pair_btn = gr.Button("Show this pair's prompt", scale=1, elem_id="hardness-pair-prompt")
    with gr.Row():
        with gr.Column(scale=3):
            pair_prompt_box = gr.Textbox(label="Prompt", lines=5)
            with gr.Row():
                chosen = gr.Textbox(label="Chosen", lines=3)
                rejected = gr.Textbox(label="Rejected", lines=3)
        # a narrow column: a gallery spreads a few images over its whole width
        pair_images = gr.Gallery(label="Prompt images", columns=5, height=300, object_fit="contain",
                                 elem_id="hardness-prompt-images", scale=2)  # fmt: skip

    with gr.Accordion("Who sets beta? HaRS, beta-DPO and DynamicPO on the same pairs", open=False):
        gr.Markdown(
            "HaRS sets each pair's beta from the pair's hardness (before training) and the batch's responsiveness; "
            "beta-DPO one beta per batch from its mean margin; DynamicPO one beta per 'boundary' negative (at or "
            "above the chosen answer's log-prob) from the policy's own log-probs. Choose a preference stage above."
        )
        with gr.Row():
            beta_k = number_field(3, label="K rejected answers per pair", precision=0, minimum=1, maximum=8)
            beta_pairs = number_field(64, label="pairs (the first N)", precision=0, minimum=4, maximum=512)
        beta_btn = gr.Button("Compare who sets beta", elem_id="hardness-who-sets-beta")
        beta_text = gr.Markdown()
        beta_summary = gr.Dataframe(interactive=False, label="Per method: beta against the margin and false negatives")
        beta_plot = gr.Plot(label="beta against the reward margin")
        beta_table = gr.Dataframe(interactive=False, label="Per pair", max_height=320, show_search="filter")
        download_buttons(who_sets_beta=beta_table)

    base = [dataset, task, model]
    settings = [*base, k, temperature, sampling, seed]
    heavy, light = ctx.events(HEAVY), ctx.events(LIGHT)
    go_btn.click(partial(compute, ctx), settings, [summary, hist, table, user], api_name="hardness_compute", **heavy)
    user.change(partial(show_pair, ctx), [*settings, user], [pair_text, aligned, profiles, images], api_name="hardness_pair", **light)
    grid_btn.click(partial(spread_grid, ctx), [*base, sampling, seed], grid, api_name="hardness_grid", **heavy)
    stats_btn.click(partial(score_pairs, ctx), base, [stats_text, stats, margins], api_name="hardness_stats", **heavy)
    stats.select(select_pair, None, pair_n, api_visibility="private")
    beta_btn.click(partial(who_sets_beta, ctx), [*base, beta_k, beta_pairs], [beta_text, beta_summary, beta_table, beta_plot],
                   api_name="hardness_who_sets_beta", **heavy)  # fmt: skip
    pair_btn.click(partial(pair_prompt, ctx), [*base, pair_n], [pair_prompt_box, chosen, rejected, pair_images], api_name="hardness_pair_prompt", **light)
    pair_n.submit(partial(pair_prompt, ctx), [*base, pair_n], [pair_prompt_box, chosen, rejected, pair_images], api_visibility="private", **light)
