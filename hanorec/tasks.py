"""Tasks and prompts (method.md section 3): hit3, hit1 and next1.

A `Window` from the data splits (history + true next items) becomes an `Example`: the prompt text
with one `<image>` placeholder per shown image, the item ids whose images fill those placeholders,
the exact target text, and the `options` (completions) that the ranking protocol scores.

Everything here is deterministic for a seed: candidates are drawn with one `random.Random(seed)`
walked over the windows in order, so every method is evaluated on the same candidates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from hanorec.data import RecDataset, Window
from hanorec.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
TASKS = ("hit3", "hit1", "next1")

# Per task: history length, number of true next items in a window, default number of negatives.
TASK_SHAPES = {
    "hit3": {"n_history": 3, "n_target": 3, "n_negatives": 4},
    "hit1": {"n_history": 5, "n_target": 1, "n_negatives": 4},
    "next1": {"n_history": 10, "n_target": 1, "n_negatives": 19},
}

# Domain wording: (verb in past tense, item noun singular, item noun plural). Any other domain: name the
# noun and verb yourself (`--task.item_noun=artist --task.item_verb="listened to"`, see `wording`).
DOMAINS = {
    "movies": ("watched", "movie", "movies"),
    "micro-videos": ("viewed", "micro-video", "micro-videos"),
    "tv": ("watched", "TV show", "TV shows"),
    "products": ("bought", "product", "products"),
    "music": ("listened to", "artist", "artists"),  # LastFM, the S-DPO paper's dataset
}
# The tiny presets' tokenizers are trained on these domains' wording (kept fixed so a tokenizer, and every
# measured number, does not change when a domain is added); a run in another domain adds its own wording.
_CORPUS_DOMAINS = ("movies", "micro-videos", "tv", "products")


class TaskError(UserError, ValueError):
    """A task, domain wording or candidate count that cannot work with this dataset (one clear sentence)."""


TEMPLATES = {
    "hit3": (
        "The user has {verb} the following {plural}: {history}. "
        "Please write a {singular} that the user may {verb_present} next. "
        "Below are the candidate {plural}: {candidates}. "
        "Answer with the 3 candidate {plural} the user is most likely to {verb_present} next, most likely first, "
        "one per line, each title in double quotes, and nothing else."
    ),
    "hit1": (
        "The user has {verb} the following {plural}: {history}. "
        "The user has not {verb} these {plural}: {not_watched}. "
        "Will the user {verb_present} this {singular} next: {target}? Answer Yes or No."
    ),
    "next1": (
        "The user has {verb} the following {plural}: {history}. "
        "Below are the candidate {plural}: {candidates}. "
        "Which {singular} will the user {verb_present} next? Answer with one candidate title in double quotes."
    ),
}
PRESENT = {"watched": "watch", "viewed": "view", "bought": "buy", "listened to": "listen to"}

# Template sets (task.template_set): "ours" (TEMPLATES above, one paragraph per prompt) or "authors" (the
# wording of the authors' prompt files and data loader, verbatim: hit3 puts the instruction first with no
# space before the dataset's template, and lists items one per line as `<image> "title"`; hit1 has no
# instruction and speaks of movies on every dataset). next1, which the authors do not have, keeps ours.
TEMPLATE_SETS = ("ours", "authors")
AUTHORS_HIT3_INSTRUCTION = (
    "Given the title of a list of the user's recently enjoyed, please recommend a new item that the user may "
    "like. Only output the title of the selected candidate item, without any additional explanation or "
    "description."
)
# their prompt/<dataset>.txt by our domain; other domains take the same shape in their own words
AUTHORS_HIT3_TEMPLATES = {
    "movies": "The user has watched the following movies:\n{history}.\n\nPlease write a movie that the user may "
    "watch. Below are the candidate movies:\n{candidates}.",
    "micro-videos": "The user has watched the following micro-videos:\n{history}.\n\nPlease write a micro-video "
    "that the user may watch. Below are the candidate micro-videos:\n{candidates}.",
    "tv": "The user has watched the following TV shows:\n{history}.\n\nPlease write a movie that the user may "
    "watch. Below are the candidate TV shows:\n{candidates}.",
}
AUTHORS_HIT3_GENERIC = (
    "The user has {verb} the following {plural}:\n{history}.\n\nPlease write a {singular} that the user may "
    "{verb_present}. Below are the candidate {plural}:\n{candidates}."
)
AUTHORS_HIT1_TEMPLATE = (
    "The user has watched the following movies:\n{history}\n\n"
    "The movies the user has not watched, which may be those they do not prefer:\n{not_watched}\n\n"
    "Whether the user will like the target movie:\n{target}"
)
# task.negatives: "titled" (ours: items that have a title) or "id_range" (the authors': every integer id
# from 1 to the largest, an id without a title shown as "[unknown id]")
NEGATIVE_POOLS = ("titled", "id_range")


def unknown_title(item_id: str) -> str:
    """The title the authors' loader shows for an id that has none."""
    return f"[unknown {item_id}]"


def id_range_pool(ds: RecDataset, max_item_id: int | None = None) -> list[str]:
    """task.negatives = "id_range": the ids 1..max_item_id as text (default: the largest integer id with a
    title), as the authors' loader draws negatives. Ids without a title join ``ds.items`` as title-less
    placeholders (title "[unknown id]", no image), so every later step can show and score them."""
    from hanorec.data import Item

    numeric = [int(i) for i in ds.items if i.isdigit()]
    if max_item_id is None:
        if len(numeric) != len(ds.items) or not numeric:
            raise TaskError(
                "task.negatives = 'id_range' draws integer ids from 1 up, but this dataset's item ids are not all "
                "integers; use --task.negatives=titled"
            )
        max_item_id = max(numeric)
    pool = [str(i) for i in range(1, int(max_item_id) + 1)]
    for i in pool:
        if i not in ds.items:
            ds.items[i] = Item(i, unknown_title(i), None)
    return pool


@dataclass(frozen=True)
class Example:
    """One prompt as the model sees it, with everything needed to train on it and score it."""

    task: str
    user: str
    history: tuple[str, ...]  # item ids, oldest first
    candidates: tuple[str, ...]  # item ids in displayed order (hit3, next1); (target,) for hit1
    targets: tuple[str, ...]  # true next items in answer order (hit3: most recent first)
    prompt: str  # text with IMAGE_PLACEHOLDER markers
    image_items: tuple[str, ...]  # item ids whose images fill the placeholders, in order
    answer: str  # the exact target text
    options: tuple[str, ...]  # completions the ranking protocol scores (one per candidate, or Yes/No)
    correct_option: int  # index in options of the first true answer
    label: bool | None = None  # hit1: True when the answer is Yes
    not_watched: tuple[str, ...] = ()  # hit1: the "not watched" items shown
    negatives: tuple[str, ...] = ()  # the sampled negatives among the candidates, in sampled order

    @property
    def option_items(self) -> tuple[str, ...]:
        """The item id each option stands for (hit1: the target item for both Yes and No)."""
        return self.candidates if self.task != "hit1" else (self.candidates[0], self.candidates[0])


def quote(title: str) -> str:
    return f'"{title}"'


def format_titles(titles: Sequence[str]) -> str:
    """The exact hit3/next1 target format: one quoted title per line."""
    return "\n".join(quote(t) for t in titles)


def _wording(domain: str) -> dict:
    if domain not in DOMAINS:
        raise TaskError(f"unknown domain {domain!r}; use one of {list(DOMAINS)} or name the item noun and verb")
    verb, singular, plural = DOMAINS[domain]
    return {"verb": verb, "verb_present": PRESENT[verb], "singular": singular, "plural": plural}


def wording(
    domain: str = "movies",
    *,
    noun: str | None = None,
    nouns: str | None = None,
    verb: str | None = None,
    verb_present: str | None = None,
) -> dict:
    """The words the prompt templates use: a domain preset, with any of its parts replaced.

    noun / nouns: the item noun, singular and plural ("artist", "artists"; plural defaults to noun + "s").
    verb / verb_present: what the user did, past and present ("listened to", "listen to"); the present
    defaults to the past without its "-ed" for a regular verb ("played" -> "play").
    """
    words = dict(_wording(domain))
    if noun:
        words["singular"], words["plural"] = noun, nouns or f"{noun}s"
    elif nouns:
        words["plural"] = nouns
    if verb:
        words["verb"] = verb
        if verb_present:
            words["verb_present"] = verb_present
        elif verb in PRESENT:
            words["verb_present"] = PRESENT[verb]
        else:
            head, _, rest = verb.partition(" ")
            if not (head.endswith("ed") and len(head) > 3):
                raise TaskError(
                    f"item_verb = {verb!r} is not a regular past tense; also give its present, "
                    f"e.g. --task.item_verb_present={verb!r}"
                )
            words["verb_present"] = " ".join(p for p in (head[:-2], rest) if p)
    elif verb_present:
        words["verb_present"] = verb_present
    return words


def _shown(ds: RecDataset, items: Sequence[str], with_images: bool, sep: str = ", ") -> str:
    if with_images:
        return sep.join(f"{IMAGE_PLACEHOLDER} {quote(ds.items[i].title)}" for i in items)
    return sep.join(quote(ds.items[i].title) for i in items)


def _sample_unseen(rng: random.Random, pool: Sequence[str], seen: set[str], n: int, where: str) -> list[str]:
    unseen_count = len(pool) - len(seen & set(pool))
    if unseen_count < n:
        raise TaskError(
            f"{where}: only {unseen_count} unseen items (never interacted with), too few to draw {n} negative "
            "candidates; lower --task.n_negatives or use a dataset with more items"
        )
    out: list[str] = []
    chosen: set[str] = set()
    while len(out) < n:
        item = pool[rng.randrange(len(pool))]
        if item not in seen and item not in chosen:
            out.append(item)
            chosen.add(item)
    return out


def build_example(
    task: str,
    window: Window,
    ds: RecDataset,
    rng: random.Random,
    n_negatives: int | None = None,
    domain: str | dict | None = None,
    hit1_target_image: bool = False,
    *,
    template_set: str = "ours",
    outer_quotes: bool = False,
    pool: Sequence[str] | None = None,
) -> Example:
    """Turn one window into an Example, drawing negatives (items the user never interacted with) from rng.

    domain: a domain name, or the words themselves as made by `wording` (default: the dataset's domain).
    template_set: "ours" or "authors" (TEMPLATE_SETS). outer_quotes (hit3): wrap the answer's three quoted
    lines in one more pair of quotes, as the authors' SFT targets and chosen answers (``""A"\n"B"\n"C""``);
    the ranking protocol's options then start with that quote too. pool: the ids negatives are drawn from
    (default: every item with a title; :func:`id_range_pool` gives the authors' id range)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; use one of {list(TASKS)}")
    if template_set not in TEMPLATE_SETS:
        raise TaskError(f"unknown template set {template_set!r}; use one of {list(TEMPLATE_SETS)}")
    shape = TASK_SHAPES[task]
    n_neg = shape["n_negatives"] if n_negatives is None else n_negatives
    words = domain if isinstance(domain, dict) else _wording(domain or ds.domain)
    pool = sorted(ds.items) if pool is None else pool
    authors = template_set == "authors"
    seen = set(ds.sequences[window.user] if window.seen is None else window.seen)
    where = f"user {window.user}"
    history = tuple(window.history)

    def titles_of(ids):
        return [ds.items[i].title for i in ids]

    if task in ("hit3", "next1"):
        targets = tuple(window.targets)
        if task == "hit3":
            targets = tuple(reversed(targets))  # most recent first (method.md section 3)
        negatives = _sample_unseen(rng, pool, seen, n_neg, where)
        candidates = list(targets) + negatives
        rng.shuffle(candidates)
        if authors and task == "hit3":
            # their prompt file for a domain they had (also when given as that domain's words), else its shape
            name = next((d for d in AUTHORS_HIT3_TEMPLATES if _wording(d) == words), None)
            template = AUTHORS_HIT3_TEMPLATES.get(name, AUTHORS_HIT3_GENERIC)
            prompt = AUTHORS_HIT3_INSTRUCTION + template.format(
                history=_shown(ds, history, True, "\n"), candidates=_shown(ds, candidates, False, "\n"), **words
            )
        else:
            prompt = TEMPLATES[task].format(
                history=_shown(ds, history, True), candidates=_shown(ds, candidates, False), **words
            )
        answer = format_titles(titles_of(targets)) if task == "hit3" else quote(titles_of(targets[:1])[0])
        lead = ""
        if outer_quotes and task == "hit3":
            answer, lead = f'"{answer}"', '"'
        options = tuple(lead + quote(t) for t in titles_of(candidates))
        return Example(
            task=task,
            user=window.user,
            history=history,
            candidates=tuple(candidates),
            targets=targets,
            prompt=prompt,
            image_items=history,
            answer=answer,
            options=options,
            correct_option=candidates.index(targets[0]),
            negatives=tuple(negatives),
        )

    # hit1: 5 history items, n "not watched" items, and a target that is the true next item (Yes)
    # or a random unseen item (No), 50/50.
    not_watched = _sample_unseen(rng, pool, seen, n_neg, where)
    label = rng.random() < 0.5
    true_next = window.targets[0]
    target = true_next if label else _sample_unseen(rng, pool, seen | set(not_watched), 1, where)[0]
    target_title = quote(ds.items[target].title)
    sep = "\n" if authors else ", "
    prompt = (AUTHORS_HIT1_TEMPLATE if authors else TEMPLATES["hit1"]).format(
        history=_shown(ds, history, True, sep),
        not_watched=_shown(ds, not_watched, False, sep),
        target=f"{IMAGE_PLACEHOLDER} {target_title}" if hit1_target_image else target_title,
        **words,
    )
    return Example(
        task="hit1",
        user=window.user,
        history=history,
        candidates=(target,),
        targets=(true_next,),
        prompt=prompt,
        image_items=history + ((target,) if hit1_target_image else ()),
        answer="Yes" if label else "No",
        options=("Yes", "No"),
        correct_option=0 if label else 1,
        label=label,
        not_watched=tuple(not_watched),
        negatives=(target,) if not label else tuple(not_watched[:1]),
    )


def build_examples(
    task: str,
    windows: Sequence[Window],
    ds: RecDataset,
    *,
    seed: int = 0,
    n_negatives: int | None = None,
    domain: str | dict | None = None,
    max_examples: int | None = None,
    shuffle: bool = False,
    hit1_target_image: bool = False,
    template_set: str = "ours",
    outer_quotes: bool = False,
    negatives: str = "titled",
    max_item_id: int | None = None,
) -> list[Example]:
    """Examples for every window, deterministic for (seed, windows). shuffle=True permutes (training).

    hit1_target_image: also show the hit1 target item's image (an option beyond the authors' prompt, which
    shows the 5 history images only; the default follows the authors). template_set, outer_quotes: see
    :func:`build_example`. negatives: "titled" (items with a title) or "id_range" (the authors': ids 1 to
    max_item_id, see :func:`id_range_pool`)."""
    if negatives not in NEGATIVE_POOLS:
        raise TaskError(f"unknown negative pool {negatives!r}; use one of {list(NEGATIVE_POOLS)}")
    pool = id_range_pool(ds, max_item_id) if negatives == "id_range" else None
    rng = random.Random(seed)
    examples = [
        build_example(
            task, w, ds, rng, n_negatives, domain, hit1_target_image,
            template_set=template_set, outer_quotes=outer_quotes, pool=pool,
        )  # fmt: skip
        for w in windows
    ]
    if shuffle:
        random.Random(seed + 1).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    return examples


@dataclass
class Rendered:
    """An example as the model sees it: text with placeholders, the images in order, the answer."""

    text: str
    images: list[Image.Image]
    image_items: tuple[str, ...]
    answer: str


def render(example: Example, ds: RecDataset, image_size: int | None = None) -> Rendered:
    """The one function the app and notebooks call to show what the model sees."""
    images = [ds.load_image(i, size=image_size) for i in example.image_items]
    return Rendered(
        text=example.prompt, images=images, image_items=example.image_items, answer=example.answer
    )


def corpus_text(ds: RecDataset, words: dict | None = None, template_set: str = "ours") -> list[str]:
    """Text a local tokenizer is trained on: every title, every template in the built-in domains (and in
    `words`, a run's own wording, when it is not one of them), the answers; with template_set "authors" also
    the authors' templates (added only then, so the tokenizer of a run with our templates never changes)."""
    out = [ds.items[i].title for i in sorted(ds.items)]
    extra = [words] if words and words not in [_wording(d) for d in _CORPUS_DOMAINS] else []
    for w in [_wording(dom) for dom in _CORPUS_DOMAINS] + extra:
        for t in TEMPLATES.values():
            out.append(t.format(history="", candidates="", not_watched="", target="", **w))
    out += ["Yes", "No", '"', '"\n"']
    if template_set == "authors":
        blank = dict(history="", candidates="", not_watched="", target="")
        out.append(AUTHORS_HIT3_INSTRUCTION)
        for t in (*AUTHORS_HIT3_TEMPLATES.values(), AUTHORS_HIT1_TEMPLATE):
            out.append(t.format(**blank))
        for w in [_wording(dom) for dom in _CORPUS_DOMAINS] + extra:
            out.append(AUTHORS_HIT3_GENERIC.format(**blank, **w))
    return out
