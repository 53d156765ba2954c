"""Tasks and prompts (method.md section 3): hit3, hit1 and next1.

A `Window` from the data splits (history + true next items) becomes an `Example`: the prompt text
with one `<image>` placeholder per shown image, the item ids whose images fill those placeholders,
the exact target text, and the `options` (completions) that the ranking protocol scores.

Everything here is deterministic for a seed: candidates are drawn with one `random.Random(seed)`
walked over the windows in order, so every method is evaluated on the same candidates.
"""

from __future__ import annotations

import gc
import random
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
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


IMAGE_MODES = ("auto", "always", "never")


def has_images(ds: RecDataset) -> bool:
    """True when at least one item of the dataset has an image file."""
    return any(it.image_path is not None for it in ds.items.values())


def shows_images(ds: RecDataset, images: str = "auto") -> bool:
    """Whether prompts carry images: "auto" when any item has one (a text-only dataset gets no image tokens
    and no placeholders; a mixed one keeps the grey placeholder for its missing images), "always" even for
    a text-only dataset (a placeholder per item), "never" text only."""
    if images not in IMAGE_MODES:
        raise TaskError(f"task.images = {images!r} is not one of {list(IMAGE_MODES)}")
    return images == "always" or (images == "auto" and has_images(ds))


@contextmanager
def no_cyclic_gc(freeze: bool = False):
    """Python's cycle collector off while millions of small objects (sequences, windows, draws) are made: it
    would rescan them all again and again (a third of the CPU time at 2.4 million interactions), and they
    form no cycles; reference counting still frees everything. Its previous state is restored.

    freeze (a long-lived process keeping what was made, such as the app): when the collector is turned back
    on, the objects alive then go to its permanent generation (gc.freeze) first, so its next passes do not
    walk them all (about 1 s per pass at 2.4 million interactions, two or three passes); reference counting
    still frees them once they are dropped."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if freeze:
                gc.freeze()
            gc.enable()


def _catalogue(ds: RecDataset) -> list[str]:
    """The sorted item ids negatives are drawn from, computed once per dataset (not once per example)."""
    key = (id(ds.items), len(ds.items))
    cached = ds.__dict__.get("_hanorec_sorted_items")
    if cached is None or cached[0] != key:
        cached = (key, sorted(ds.items))
        ds.__dict__["_hanorec_sorted_items"] = cached
    return cached[1]


def _plant_false_negatives(
    rng: random.Random, negatives: list[str], target: str, ds: RecDataset, seen: set[str], fraction: float,
    memo: dict,
) -> list[str]:
    """The false-negatives scenario (hanorec.data.SCENARIOS, beyond the paper): each negative is replaced,
    with probability ``fraction``, by an unseen item of the target's own (colour, genre) cluster when one is
    left. Uses the item attributes of make_demo's titles.csv; items without them are left as drawn. ``memo``
    keeps each cluster's items between calls (grouped once per build, not once per example)."""
    attrs = ds.items[target].attributes
    key = (attrs.get("color"), attrs.get("genre"))
    if None in key:
        return negatives
    if "clusters" not in memo:
        clusters: dict = {}
        for i in sorted(ds.items):
            a = ds.items[i].attributes
            clusters.setdefault((a.get("color"), a.get("genre")), []).append(i)
        memo["clusters"] = clusters
    taste = memo["clusters"].get(key, [])
    out = list(negatives)
    for j in range(len(out)):
        if rng.random() < fraction:
            free = [i for i in taste if i not in seen and i not in out]
            if free:
                out[j] = free[rng.randrange(len(free))]
    return out


def _sample_unseen(
    rng: random.Random, pool: Sequence[str], seen: set[str], unseen_count: int, n: int, user: str
) -> list[str]:
    """n distinct items of pool outside seen, by rejection from rng (O(n) draws, not O(pool))."""
    if unseen_count < n:
        raise TaskError(
            f"user {user}: only {unseen_count} unseen items (never interacted with), too few to draw {n} negative "
            "candidates; lower --task.n_negatives or use a dataset with more items"
        )
    out: list[str] = []
    chosen: set[str] = set()
    size, randrange = len(pool), rng.randrange
    while len(out) < n:
        item = pool[randrange(size)]
        if item not in seen and item not in chosen:
            out.append(item)
            chosen.add(item)
    return out


@dataclass(frozen=True)
class _Draw:
    """What the seeded generator decided for one window: all an Example needs besides text formatting."""

    window: Window
    candidates: tuple[str, ...]  # hit3/next1: displayed order; hit1: (target,)
    negatives: tuple[str, ...]  # hit3/next1: sampled order; hit1: the not-watched items
    label: bool | None = None
    text: tuple[str, str] | None = None  # (prompt, answer) read from the authors' drawn SFT files, kept verbatim


def _assemble(task: str, d: _Draw, *args) -> Example:
    """The Example of a draw; a draw read from the authors' files keeps their prompt and answer text."""
    ex = _format(task, d, *args)
    if d.text is not None and (ex.prompt, ex.answer) != d.text:
        from dataclasses import replace

        ex = replace(ex, prompt=d.text[0], answer=d.text[1])
    return ex


def _pool_keys(ds: RecDataset, pool: Sequence[str]):
    """The pool as a set for counting a user's unseen items: the titled pool is the dataset's own keys (no
    copy); any other pool (the id range) is made a set once per build."""
    return ds.items.keys() if pool is _catalogue(ds) else frozenset(pool)


def _draw(
    task: str,
    window: Window,
    ds: RecDataset,
    rng: random.Random,
    n_neg: int,
    memo: dict | None = None,
    pool: Sequence[str] | None = None,
    false_negatives: float = 0.0,
) -> _Draw:
    """The rng walk of one window (the same calls, in the same order, as building its Example).

    pool: the ids negatives are drawn from (default: every titled item, sorted). memo keeps the pool, its set
    and the last user's interacted items between calls (a user's windows are consecutive); a window with its
    own ``seen`` (split_policy "files": the row's items) has its seen set made per window. false_negatives:
    see :func:`build_example`."""
    memo = {} if memo is None else memo
    if "pool" not in memo:
        memo["pool"] = _catalogue(ds) if pool is None else pool
        memo["keys"] = _pool_keys(ds, memo["pool"])
    pool = memo["pool"]
    key = window.user if window.seen is None else (window.user, window.seen)
    if memo.get("key") != key:
        seen = set(ds.sequences[window.user] if window.seen is None else window.seen)
        memo.update(key=key, seen=seen, unseen=len(pool) - len(seen & memo["keys"]))
    seen, unseen, where = memo["seen"], memo["unseen"], window.user
    if task in ("hit3", "next1"):
        targets = tuple(window.targets)
        if task == "hit3":
            targets = tuple(reversed(targets))  # most recent first (method.md section 3)
        negatives = _sample_unseen(rng, pool, seen, unseen, n_neg, where)
        if false_negatives:
            negatives = _plant_false_negatives(rng, negatives, targets[0], ds, seen, false_negatives, memo)
        candidates = list(targets) + negatives
        rng.shuffle(candidates)
        return _Draw(window, tuple(candidates), tuple(negatives))
    # hit1: n "not watched" items, and a target that is the true next item (Yes) or a random unseen item (No)
    not_watched = _sample_unseen(rng, pool, seen, unseen, n_neg, where)
    label = rng.random() < 0.5
    if label:
        target = window.targets[0]
    else:
        target = _sample_unseen(rng, pool, seen | set(not_watched), unseen - n_neg, 1, where)[0]
    return _Draw(window, (target,), tuple(not_watched), label)


def _format(
    task: str,
    d: _Draw,
    ds: RecDataset,
    words: dict,
    hit1_target_image: bool,
    with_images: bool = True,
    template_set: str = "ours",
    outer_quotes: bool = False,
) -> Example:
    """The Example of a draw: prompt text, answer and options (no randomness here)."""
    window = d.window
    history = tuple(window.history)
    authors = template_set == "authors"
    image_items = history if with_images else ()

    def title(i: str) -> str:
        return ds.items[i].title

    if task in ("hit3", "next1"):
        targets = tuple(window.targets)
        if task == "hit3":
            targets = tuple(reversed(targets))
        candidates = d.candidates
        if authors and task == "hit3":
            # their prompt file for a domain they had (also when given as that domain's words), else its shape
            name = next((n for n in AUTHORS_HIT3_TEMPLATES if _wording(n) == words), None)
            template = AUTHORS_HIT3_TEMPLATES.get(name, AUTHORS_HIT3_GENERIC)
            prompt = AUTHORS_HIT3_INSTRUCTION + template.format(
                history=_shown(ds, history, with_images, "\n"),
                candidates=_shown(ds, candidates, False, "\n"),
                **words,
            )
        else:
            prompt = TEMPLATES[task].format(
                history=_shown(ds, history, with_images), candidates=_shown(ds, candidates, False), **words
            )
        answer = format_titles([title(i) for i in targets]) if task == "hit3" else quote(title(targets[0]))
        lead = ""
        if outer_quotes and task == "hit3":
            answer, lead = f'"{answer}"', '"'
        return Example(
            task=task,
            user=window.user,
            history=history,
            candidates=candidates,
            targets=targets,
            prompt=prompt,
            image_items=image_items,
            answer=answer,
            options=tuple(lead + quote(title(i)) for i in candidates),
            correct_option=candidates.index(targets[0]),
            negatives=d.negatives,
        )

    label, target, not_watched = d.label, d.candidates[0], d.negatives
    target_image = hit1_target_image and with_images
    sep = "\n" if authors else ", "
    prompt = (AUTHORS_HIT1_TEMPLATE if authors else TEMPLATES["hit1"]).format(
        history=_shown(ds, history, with_images, sep),
        not_watched=_shown(ds, not_watched, False, sep),
        target=f"{IMAGE_PLACEHOLDER} {quote(title(target))}" if target_image else quote(title(target)),
        **words,
    )
    return Example(
        task="hit1",
        user=window.user,
        history=history,
        candidates=(target,),
        targets=(window.targets[0],),
        prompt=prompt,
        image_items=image_items + ((target,) if target_image else ()),
        answer="Yes" if label else "No",
        options=("Yes", "No"),
        correct_option=0 if label else 1,
        label=label,
        not_watched=not_watched,
        negatives=(target,) if not label else not_watched[:1],
    )


def _check_task(task: str, template_set: str = "ours") -> dict:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; use one of {list(TASKS)}")
    if template_set not in TEMPLATE_SETS:
        raise TaskError(f"unknown template set {template_set!r}; use one of {list(TEMPLATE_SETS)}")
    return TASK_SHAPES[task]


def build_example(
    task: str,
    window: Window,
    ds: RecDataset,
    rng: random.Random,
    n_negatives: int | None = None,
    domain: str | dict | None = None,
    hit1_target_image: bool = False,
    images: str = "always",
    *,
    template_set: str = "ours",
    outer_quotes: bool = False,
    pool: Sequence[str] | None = None,
    false_negatives: float = 0.0,
) -> Example:
    """Turn one window into an Example, drawing negatives (items the user never interacted with) from rng.

    domain: a domain name, or the words themselves as made by `wording` (default: the dataset's domain).
    images: "always" (history images, a grey placeholder for a missing one), "never" (text only) or "auto"
    (images unless no item of the dataset has one; see :func:`shows_images`).
    template_set: "ours" or "authors" (TEMPLATE_SETS). outer_quotes (hit3): wrap the answer's three quoted
    lines in one more pair of quotes, as the authors' SFT targets and chosen answers (``""A"\n"B"\n"C""``);
    the ranking protocol's options then start with that quote too. pool: the ids negatives are drawn from
    (default: every item with a title; :func:`id_range_pool` gives the authors' id range).
    false_negatives: the teaching scenario's fraction of hit3 / next1 negatives taken from the user's taste
    (training examples only; 0 draws no extra random numbers, so examples are unchanged)."""
    shape = _check_task(task, template_set)
    n_neg = shape["n_negatives"] if n_negatives is None else n_negatives
    words = domain if isinstance(domain, dict) else _wording(domain or ds.domain)
    d = _draw(task, window, ds, rng, n_neg, pool=pool, false_negatives=false_negatives)
    return _assemble(task, d, ds, words, hit1_target_image, shows_images(ds, images), template_set, outer_quotes)


class _PrefixDraws:
    """The deferred draws of windows taken in order (not shuffled), made only as far as a reader needs.

    One seeded generator walks the windows in order, so the draw of window k depends on the windows before it
    and not on any after it: drawing windows 0..k now and the rest later gives the very same draws as drawing
    them all at once. The user list (the windows' users) needs no draw at all. Thread-safe: the app's views may
    read one list from several threads."""

    def __init__(self, windows: Sequence[Window] | Callable[[], Sequence[Window]], step):
        self._windows = windows  # or the function giving them (called on first use)
        self.made: list[_Draw] = []
        self._step = step  # window -> its _Draw (the shared generator and memo inside)
        self._lock = threading.Lock()

    @property
    def windows(self) -> Sequence[Window]:
        if callable(self._windows):
            with self._lock:
                if callable(self._windows):
                    self._windows = self._windows()
        return self._windows

    def upto(self, n: int) -> list[_Draw]:
        """The draws of the first n windows (made now if not yet)."""
        if len(self.made) < n:
            windows = self.windows
            with self._lock, no_cyclic_gc():
                made, step = self.made, self._step
                for k in range(len(made), min(n, len(windows))):
                    made.append(step(windows[k]))
        return self.made


class ExampleList(Sequence):
    """Examples built on access: the seeded draws of every window are made once up front (cheap: a few
    generator calls per window), the prompt text of an example only when it is read. Reads like a list of
    Examples (len, index, slice, iterate, ==) and holds the same Examples `build_examples(lazy=False)` makes."""

    def __init__(self, task: str, draws, ds: RecDataset, words: dict, hit1_target_image: bool,
                 with_images: bool, template_set: str = "ours", outer_quotes: bool = False):  # fmt: skip
        """draws: the windows' draws, a function making them (called on first use: deferred), or a
        _PrefixDraws (deferred windows in order: an example draws only the windows up to its own)."""
        self.task, self.dataset = task, ds
        self._prefix = draws if isinstance(draws, _PrefixDraws) else None
        self._pending = draws if callable(draws) else None
        deferred = callable(draws) or self._prefix is not None
        self._made: list[_Draw] | None = None if deferred else list(draws)
        self._args = (words, hit1_target_image, with_images, template_set, outer_quotes)
        self._by_user: dict[str, int] | None = None

    @property
    def _draws(self) -> list[_Draw]:
        if self._prefix is not None:
            return self._prefix.upto(len(self._prefix.windows))
        if self._made is None:
            self._made, self._pending = list(self._pending()), None
        return self._made

    def _draw_at(self, k: int) -> _Draw:
        if self._prefix is not None:
            n = len(self._prefix.windows)
            if not -n <= k < n:
                raise IndexError("ExampleList index out of range")
            k %= n
            return self._prefix.upto(k + 1)[k]
        return self._draws[k]

    def __len__(self) -> int:
        return len(self._prefix.windows) if self._prefix is not None else len(self._draws)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        return _assemble(self.task, self._draw_at(index), self.dataset, *self._args)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def _windows(self) -> Sequence[Window]:
        return self._prefix.windows if self._prefix is not None else [d.window for d in self._draws]

    def users(self) -> list[str]:
        """The user of every example, in order, without building any prompt (nor, for windows taken in
        order, drawing any candidate)."""
        return [w.user for w in self._windows()]

    def for_user(self, user: str) -> Example | None:
        """The (first) example of a user, built on demand; None when the user has none. For windows taken in
        order only the draws up to that user's are made."""
        if self._by_user is None:
            by_user: dict[str, int] = {}
            for k, w in enumerate(self._windows()):
                by_user.setdefault(w.user, k)
            self._by_user = by_user
        k = self._by_user.get(str(user))
        return None if k is None else self[k]

    def subset(self, indices: Sequence[int]) -> ExampleList:
        """The examples at these indices, still built on access."""
        return ExampleList(self.task, [self._draw_at(k) for k in indices], self.dataset, *self._args)

    def __repr__(self) -> str:
        return f"ExampleList({self.task}, {len(self)} examples)"


def build_examples(
    task: str,
    windows: Sequence[Window] | Callable[[], Sequence[Window]],
    ds: RecDataset,
    *,
    seed: int = 0,
    n_negatives: int | None = None,
    domain: str | dict | None = None,
    max_examples: int | None = None,
    shuffle: bool = False,
    hit1_target_image: bool = False,
    images: str = "always",
    lazy: bool = False,
    defer: bool = False,
    template_set: str = "ours",
    outer_quotes: bool = False,
    negatives: str = "titled",
    max_item_id: int | None = None,
    false_negatives: float = 0.0,
    drawn: Sequence[_Draw] | None = None,
) -> list[Example] | ExampleList:
    """Examples for every window, deterministic for (seed, windows). shuffle=True permutes (training).

    One generator walks the windows in order, so example k depends on the windows before it; the walk
    costs a few draws per window and formatting is per example, so building is linear in the windows
    (the pool of negatives is made once per call, the titled catalogue sorted once per dataset). lazy=True
    returns an :class:`ExampleList` that formats an example only when it is read (the same Examples, for
    large datasets: bounded memory).

    hit1_target_image: also show the hit1 target item's image (an option beyond the authors' prompt, which
    shows the 5 history images only; the default follows the authors).
    images: "always", "never" or "auto" (:func:`shows_images`).
    defer (with lazy): even the draws wait until the list is first used (a view that needs only another
    split, such as the app's Data tab showing test prompts, never pays for the training split's); without
    shuffle the list's users are known without any draw and reading example k draws the windows up to k only
    (the same draws: one generator walks the windows in order). windows may then be a function giving them
    (called when first needed: lazy splits' train and val windows, hanorec.data.make_splits).
    template_set, outer_quotes: see :func:`build_example`. negatives: "titled" (items with a title) or
    "id_range" (the authors': ids 1 to max_item_id, see :func:`id_range_pool`). false_negatives: see
    :func:`build_example`. drawn: the windows' draws already made (one per window, in order: the authors'
    drawn SFT files, hanorec.authors_files), used instead of drawing."""
    shape = _check_task(task, template_set)
    if negatives not in NEGATIVE_POOLS:
        raise TaskError(f"unknown negative pool {negatives!r}; use one of {list(NEGATIVE_POOLS)}")
    n_neg = shape["n_negatives"] if n_negatives is None else n_negatives
    words = domain if isinstance(domain, dict) else _wording(domain or ds.domain)
    # the id range adds its title-less ids to ds.items, so it is made before images are looked at; the pool
    # is made once here (not per example: that would cost O(catalogue) per window)
    pool = id_range_pool(ds, max_item_id) if negatives == "id_range" else None
    with_images = shows_images(ds, images)

    def draws() -> list[_Draw]:
        rng, memo = random.Random(seed), {}
        with no_cyclic_gc():
            if drawn is not None:
                out = list(drawn)
            else:
                out = [_draw(task, w, ds, rng, n_neg, memo, pool, false_negatives) for w in given()]
        if shuffle:
            random.Random(seed + 1).shuffle(out)  # the same permutation shuffling the built examples gave
        return out if max_examples is None else out[:max_examples]

    def given() -> Sequence[Window]:
        return windows() if callable(windows) else windows

    if lazy and defer and not shuffle and drawn is None:  # windows in order: draw only as far as a reader needs (_PrefixDraws)
        rng, memo = random.Random(seed), {}
        kept = given if max_examples is None else (lambda: given()[:max_examples])
        deferred = _PrefixDraws(kept, lambda w: _draw(task, w, ds, rng, n_neg, memo, pool, false_negatives))
    else:
        deferred = draws if (lazy and defer) else draws()
    out = ExampleList(task, deferred, ds, words, hit1_target_image, with_images, template_set, outer_quotes)
    return out if lazy else list(out)


CANDIDATE_SENTENCE = " Below are the candidate "


def catalogue_prompt(example: Example, ds: RecDataset) -> str:
    """The prompt of the catalogue protocol (hanorec.eval): the task's prompt without its candidate sentence.

    hit3 and next1 prompts list their candidates ("Below are the candidate movies: ..."); ranking the whole
    catalogue cannot list it, so this prompt keeps everything else (the history with its images, the
    question and the answer format) and drops that one sentence. It is the only difference from the prompt
    the model is trained on.
    """
    if example.task == "hit1":
        raise TaskError("the catalogue protocol ranks titles; hit1 answers Yes or No and has no catalogue prompt")
    start = example.prompt.find(CANDIDATE_SENTENCE)
    at, shown = -1, ""
    for sep in (", ", "\n"):  # ours list candidates on one line, the authors' template set one per line
        shown = _shown(ds, example.candidates, False, sep)
        at = example.prompt.find(shown, start) if start >= 0 else -1
        if at >= 0:
            break
    if at < 0:
        raise TaskError(f"user {example.user}: the prompt has no candidate sentence to drop")
    end = at + len(shown) + 1  # the sentence's full stop
    return example.prompt[:start] + example.prompt[end:]


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
