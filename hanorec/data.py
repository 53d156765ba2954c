"""Datasets for multimodal sequential recommendation: loading, splitting, and a demo generator.

From the file on disk to windows of (history, targets):

    ds = load_dataset("../shared/data/movielens-small-posters")        # RecDataset
    splits = make_splits(ds, n_history=3, n_target=3)                  # Splits of Window
    ds.load_image(splits.test[0].history[-1], size=224)                # PIL RGB image

Two on-disk formats are read (method.md section 2):

- ``hanorec`` (MicroLens / HaNoRec reference layout): ``pairs.tsv`` with one
  ``user<TAB>item item ...`` line per user (items in time order), ``titles.csv`` with
  ``item,title[,more columns]`` and ``images/<item>.jpg`` (also ``covers/``, ``.jpeg``, ``.png``).
- ``movielens``: GroupLens' own ``ratings.csv`` (userId,movieId,rating,timestamp) and
  ``movies.csv`` (movieId,title,genres); images from ``image_dir`` or ``<root>/images``.

Errors a user can cause (a malformed line, an unknown item id, an unreadable image) raise
:class:`DataError` with one sentence naming the file and the line or the id. With
``on_error="report"`` the bad rows are skipped and listed in ``summary.bad_rows`` instead.
A missing image file is not an error: the item gets ``image_path=None``, it is counted in
the summary, and :meth:`RecDataset.load_image` returns a plain grey placeholder.

:func:`make_demo` writes a small synthetic dataset whose next items depend on a colour seen
only in the image and a genre read only from the title, so a text-only recommender cannot
match a multimodal one; the "demo oracles" at the end of this module score candidates by
reading those two modalities and are used by the tests to check that property.
"""

from __future__ import annotations

import csv
import itertools
import math
import operator
import os
import random
import re
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from hanorec.errors import UserError

DOMAINS = ("movies", "micro-videos", "tv", "products", "music")
FORMATS = ("auto", "hanorec", "movielens")
SPLIT_POLICIES = ("leave_one_out", "last_window_by_user", "files")
# split_policy "files": the authors' pre-split files, read as given (one window per row, file order kept)
SPLIT_FILES = ("train.tsv", "val.tsv", "test.tsv")
# older names still accepted (configs and runs made before the rename); make_splits maps them to the new name
SPLIT_ALIASES = {"by_user": "last_window_by_user"}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # preference order when several exist
IMAGE_FOLDERS = ("images", "covers")  # MicroLens calls the folder covers/
PLACEHOLDER_COLOR = (128, 128, 128)
PLACEHOLDER_SIZE = 224  # side of the placeholder when load_image is called without a size

# First-cell values that mark the first row of titles.csv as a header row.
_TITLE_HEADER_NAMES = {"item", "item_id", "itemid", "id", "movieid", "iid", "video_id"}


class DataError(UserError, ValueError):
    """Bad input data; the message is one sentence naming the file and line (or the id)."""


@dataclass(frozen=True)
class SplitRow:
    """One row of a split file (split_policy "files"): its user, its items in time order, its line number."""

    user: str
    items: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    image_path: Path | None  # None when the image file is missing (a placeholder is used)
    attributes: dict[str, str] = field(default_factory=dict, hash=False)  # extra columns


@dataclass
class LoadSummary:
    source: str
    format: str
    n_users: int
    n_items: int
    n_interactions: int
    missing_images: int  # items whose image file does not exist
    missing_image_ids: list[str]  # the first 20 of them
    bad_rows: list[str]  # one message per skipped bad row (on_error="report")
    untitled: int = 0  # ids a split or pairs file names that the titles file lacks, kept as "[unknown N]"

    @property
    def text_only(self) -> bool:
        """No item has an image (prompts then carry no image tokens unless task.images = always)."""
        return self.n_items > 0 and self.missing_images >= self.n_items

    def __str__(self) -> str:
        text = (
            f"{self.format} dataset at {self.source}: {self.n_users:,} users, {self.n_items:,} items, "
            f"{self.n_interactions:,} interactions; {self.missing_images:,} missing images"
        )
        if self.text_only:
            text = text.rsplit(";", 1)[0] + "; text only (no item has an image: prompts carry no images)"
        elif self.missing_image_ids:
            shown = ", ".join(self.missing_image_ids[:5])
            text += f" (e.g. {shown})"
        if self.untitled:
            text += f"; {self.untitled:,} ids without a title shown as [unknown N]"
        text += f"; {len(self.bad_rows):,} bad rows skipped"
        if self.bad_rows:
            text += f" (first: {self.bad_rows[0]})"
        return text


@dataclass
class RecDataset:
    name: str
    domain: str  # one of DOMAINS
    root: Path
    items: dict[str, Item]  # item_id -> Item
    sequences: dict[str, list[str]]  # user -> item ids in time order
    summary: LoadSummary
    # a teaching scenario planted by make_demo (scenario.json; beyond the paper): see SCENARIOS
    scenario: dict = field(default_factory=dict)
    # the rows of train.tsv / val.tsv / test.tsv in file order (split_policy "files"), else None
    split_rows: dict[str, list[SplitRow]] | None = None

    def load_image(self, item_id: str, size: int | None = None) -> Image.Image:
        """The item's image as RGB, resized to ``size x size`` if given (posters are stretched,
        not cropped). A missing image gives a plain grey placeholder; an unreadable file raises
        DataError naming the file."""
        item = self.items.get(item_id)
        if item is None:
            raise DataError(f"Item id {item_id!r} is not in dataset {self.name!r}.")
        if item.image_path is None:
            side = size or PLACEHOLDER_SIZE
            return Image.new("RGB", (side, side), PLACEHOLDER_COLOR)
        try:
            with warnings.catch_warnings():
                # above Image.MAX_IMAGE_PIXELS (89 M pixels) refuse instead of decoding gigabytes for a poster
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(item.image_path) as im:
                    image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:  # fmt: skip
            raise DataError(
                f"The image {item.image_path} of item {item_id!r} cannot be read ({str(e).rstrip('.')})."
            ) from None
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return image

    def history(self, user_id: str) -> list[Item]:
        """The user's items in time order (oldest first); DataError naming an unknown user id."""
        seq = self.sequences.get(str(user_id))
        if seq is None:
            raise DataError(
                f"User id {user_id!r} is not in dataset {self.name!r} ({len(self.sequences)} users)."
            )
        return [self.items[i] for i in seq]

    def subset_users(self, n: int, seed: int = 0) -> RecDataset:
        """A dataset with ``n`` users drawn with ``random.Random(seed)`` from the sorted user ids
        (same inputs -> same subset), keeping only the items those users interacted with."""
        users = sorted(self.sequences)
        chosen = set(random.Random(seed).sample(users, min(n, len(users))))
        sequences = {u: list(s) for u, s in self.sequences.items() if u in chosen}
        used = {i for s in sequences.values() for i in s}
        rows = None
        if self.split_rows is not None:  # the chosen users' rows of every split file, in file order
            rows = {name: [r for r in rs if r.user in chosen] for name, rs in self.split_rows.items()}
            used |= {i for rs in rows.values() for r in rs for i in r.items}
        items = {i: it for i, it in self.items.items() if i in used}
        missing = [i for i, it in items.items() if it.image_path is None]
        summary = replace(
            self.summary,
            n_users=len(sequences),
            n_items=len(items),
            n_interactions=sum(len(s) for s in sequences.values()),
            missing_images=len(missing),
            missing_image_ids=missing[:20],
            bad_rows=list(self.summary.bad_rows),
        )
        return RecDataset(
            f"{self.name}[{len(sequences)} users]", self.domain, self.root, items, sequences, summary, self.scenario,
            rows,
        )

    def popularity(self, users: Iterable[str] | None = None) -> dict[str, int]:
        """Interaction count of every item (0 for unused ones) over ``users`` (default: all), in item order."""
        from collections import Counter

        counts = dict.fromkeys(self.items, 0)
        seqs = self.sequences.values() if users is None else map(self.sequences.__getitem__, users)
        for item, n in Counter(itertools.chain.from_iterable(seqs)).items():  # counted at C speed
            counts[item] += n
        return counts


# ----------------------------------------------------------------------------- loading


class _Problems:
    """Raise the first problem (on_error="raise") or collect them all (on_error="report")."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        self.messages.append(message)


def load_dataset(
    path,
    *,
    format: str = "auto",
    domain: str | None = None,
    image_dir=None,
    on_error: str = "raise",
    check_images: bool = True,
    split_files: bool = False,
    untitled: str = "raise",
) -> RecDataset:
    """Load a dataset folder in the ``hanorec`` or ``movielens`` format (see module docstring).

    format: "auto" picks "hanorec" when the folder has pairs.tsv (or *_pairs.tsv), else
        "movielens" when it has ratings.csv and movies.csv.
    domain: prompt domain, one of DOMAINS (default "movies").
    image_dir: image folder (default <root>/images, or <root>/covers for the hanorec format).
    on_error: "raise" stops at the first bad row with DataError; "report" skips bad rows and
        lists each one in ``summary.bad_rows``. An unknown item id in pairs.tsv drops that item
        from the user's sequence (one message per line); an unreadable image leaves the item
        without an image.
    check_images: open each image file's header with PIL and verify it, so an unreadable
        image is found at load time (header check only: about 0.3 s per 1,500 posters).
    split_files: also read the authors' pre-split ``train.tsv``, ``val.tsv`` and ``test.tsv`` (the same
        ``user<TAB>item item ...`` rows) into ``split_rows``, in file order, for split_policy "files". A
        user may appear in several files. ``pairs.tsv`` is then optional: without it a user's sequence
        (``sequences``, used by the data views) is its row in the last file that lists it (test, else val,
        else train).
    untitled: an id in pairs.tsv or a split file that the titles file does not list: "raise" (a bad row, as
        on_error says) or "unknown" (kept, titled "[unknown N]" as the authors' loader shows it, its image
        looked up as any item's; counted in the summary).
    """
    if format not in FORMATS:
        raise DataError(f"Unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}.")
    domain = domain or "movies"
    if domain not in DOMAINS:
        raise DataError(f"Unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}.")
    if on_error not in ("raise", "report"):
        raise DataError(f"Unknown on_error {on_error!r}; expected 'raise' or 'report'.")
    if untitled not in UNTITLED:
        raise DataError(f"Unknown untitled {untitled!r}; expected one of {', '.join(UNTITLED)}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"The dataset folder {root} does not exist; point --data.path at your copy (the README's "
            "'Your own data' says where data comes from and what layout it takes)."
        )
    if not root.is_dir():
        raise DataError(f"The dataset path {root} is a file, not a folder.")

    pairs_file = _find_file(root, "pairs.tsv")
    if split_files:
        absent = [name for name in SPLIT_FILES if not (root / name).is_file()]
        if absent:
            raise DataError(
                f"split_policy 'files' reads {', '.join(SPLIT_FILES)} from {root}, but {', '.join(absent)} "
                f"{'is' if len(absent) == 1 else 'are'} not there (the authors' layout: one "
                "`user<TAB>item item ...` row per line in each file, beside <name>_titles.csv and images/)."
            )
    if format == "auto":
        if pairs_file is not None or split_files:
            format = "hanorec"
        elif (root / "ratings.csv").is_file() and (root / "movies.csv").is_file():
            format = "movielens"
        else:
            raise DataError(
                f"The folder {root} has neither pairs.tsv + titles.csv (hanorec format) "
                "nor ratings.csv + movies.csv (movielens format)."
            )

    problems = _Problems(on_error)
    split_rows = None
    if format == "hanorec":
        if pairs_file is None and not split_files:
            raise DataError(f"The file {root / 'pairs.tsv'} does not exist.")
        titles_file = _find_file(root, "titles.csv")
        if titles_file is None:
            raise DataError(f"The file {root / 'titles.csv'} does not exist.")
        rows = _read_item_table(titles_file, problems, header="detect")
        titled = len(rows)
        if untitled == "unknown":
            rows = _UntitledRows(rows)
        if split_files:
            split_rows = {
                name[: -len(".tsv")]: _read_rows(root / name, rows, problems, titles_file.name)
                for name in SPLIT_FILES
            }
        if pairs_file is not None:
            sequences = _read_pairs(pairs_file, rows, problems, titles_file.name)
        else:  # a user's sequence for the data views: its row in the last file that lists it
            sequences = {r.user: list(r.items) for name in ("train", "val", "test") for r in split_rows[name]}
        titles_name = titles_file.name
        n_untitled = len(rows) - titled
    else:
        ratings_file, movies_file = root / "ratings.csv", root / "movies.csv"
        for f in (ratings_file, movies_file):
            if not f.is_file():
                raise DataError(f"The file {f} does not exist.")
        rows = _read_item_table(movies_file, problems, header="movielens")
        sequences = _read_ratings(ratings_file, rows, problems)
        titles_name = movies_file.name
        n_untitled = 0
    if not sequences:
        data_file = pairs_file if format == "hanorec" else root / "ratings.csv"
        if data_file is None:  # split files only
            raise DataError(f"The files {', '.join(SPLIT_FILES)} in {root} hold no row with a known item.")
        if not any(line.strip() for line in _read_lines(data_file)[(0 if format == "hanorec" else 1):]):
            raise DataError(f"The file {data_file} is empty: it has no interactions to learn from.")
        if not rows:
            raise DataError(f"The file {root / titles_name} is empty: no item has a title.")
        raise DataError(f"The dataset at {root} has no users with at least one known item.")

    if image_dir is not None:
        image_root = Path(image_dir).expanduser()
        if not image_root.is_dir():
            raise DataError(f"The image folder {image_root} does not exist.")
    else:
        folders = IMAGE_FOLDERS if format == "hanorec" else IMAGE_FOLDERS[:1]
        image_root = next((root / f for f in folders if (root / f).is_dir()), None)
    image_files = _index_images(image_root) if image_root is not None else {}

    items: dict[str, Item] = {}
    missing: list[str] = []
    for item_id, (title, attributes, _line) in rows.items():
        image_path = image_files.get(item_id)
        if image_path is None:
            missing.append(item_id)
        elif check_images and not _image_header_ok(image_path):
            problems.add(f"The image {image_path} of item {item_id!r} (from {titles_name}) cannot be read.")
            image_path = None
        items[item_id] = Item(item_id, title, image_path, attributes)

    summary = LoadSummary(
        source=str(root),
        format=format,
        n_users=len(sequences),
        n_items=len(items),
        n_interactions=sum(len(s) for s in sequences.values()),
        missing_images=len(missing),
        missing_image_ids=missing[:20],
        bad_rows=problems.messages,
        untitled=n_untitled,
    )
    name = root.resolve().name if root.name in ("", ".", "..") else root.name
    return RecDataset(name, domain, root, items, sequences, summary, read_scenario(root), split_rows)


UNTITLED = ("raise", "unknown")


class _UntitledRows(dict):
    """The titles table of load_dataset(untitled="unknown"): an id it lacks is added, titled as the authors'
    loader shows it (hanorec.tasks.unknown_title), when a row names it."""

    def add_missing(self, ids) -> None:
        from hanorec.tasks import unknown_title

        for i in ids:
            if i not in self:
                self[i] = (unknown_title(i), {}, 0)


def _find_file(root: Path, name: str) -> Path | None:
    """``root/name``, else the single ``root/*_name`` (MicroLens: MicroLens-50k_pairs.tsv)."""
    if (root / name).is_file():
        return root / name
    matches = sorted(root.glob(f"*_{name}"))
    return matches[0] if len(matches) == 1 else None


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", newline="")


def _read_lines(path: Path) -> list[str]:
    try:
        with _open_text(path) as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"The file {path} is not UTF-8 text (byte {e.start}).") from None


def _csv_rows(path: Path):
    """Yield (first line number, fields) per csv record; a quoted field may span lines."""
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            start = 1
            for fields in reader:
                yield start, fields
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"The file {path} is not UTF-8 text (byte {e.start}).") from None
    except csv.Error as e:
        raise DataError(f"The file {path} is not valid CSV near line {reader.line_num} ({e}).") from None


def _read_item_table(
    path: Path, problems: _Problems, header: str
) -> dict[str, tuple[str, dict[str, str], int]]:
    """Read titles.csv / movies.csv into item_id -> (title, attributes, line number).

    header="detect": the first row is a header when its first cell is a usual id column name
    (item, item_id, id, movieId, ...), otherwise the columns are item,title,column_3,...
    header="movielens": the header must have movieId and title columns.
    """
    rows: dict[str, tuple[str, dict[str, str], int]] = {}
    records = _csv_rows(path)
    first = next(records, None)
    if first is None:
        raise DataError(f"The file {path} is empty.")
    line, fields = first
    if header == "movielens":
        names = [c.strip() for c in fields]
        lower = [c.lower() for c in names]
        if "movieid" not in lower or "title" not in lower:
            raise DataError(f"Line {line} of {path} must be a header with movieId and title columns.")
        id_col, title_col = lower.index("movieid"), lower.index("title")
    else:
        id_col, title_col = 0, 1
        if fields and fields[0].strip().lower() in _TITLE_HEADER_NAMES:
            names = [c.strip() for c in fields]
        else:
            names = ["item", "title"] + [f"column_{k}" for k in range(3, len(fields) + 1)]
            records = _chain_first(first, records)
        if len(names) < 2:
            raise DataError(f"Line {line} of {path} must have at least two columns, item and title.")
    attr_cols = [k for k in range(len(names)) if k not in (id_col, title_col)]

    for line, fields in records:
        if not fields or all(not c.strip() for c in fields):
            continue  # blank line
        if len(fields) != len(names):
            problems.add(
                f"Line {line} of {path} has {len(fields)} fields but the header has {len(names)} "
                "(quote titles that contain commas)."
            )
            continue
        # whitespace runs (a quoted title may span lines) become one space: an answer lists one title per line
        item_id, title = fields[id_col].strip(), " ".join(fields[title_col].split())
        if not item_id:
            problems.add(f"Line {line} of {path} has an empty item id.")
            continue
        if not title:
            problems.add(f"Line {line} of {path} has an empty title for item {item_id!r}.")
            continue
        if item_id in rows:
            problems.add(f"Lines {rows[item_id][2]} and {line} of {path} both define item {item_id!r}.")
            continue
        rows[item_id] = (title, {names[k]: fields[k].strip() for k in attr_cols}, line)
    return rows


def _chain_first(first, rest):
    yield first
    yield from rest


def _read_pairs(path: Path, rows: dict, problems: _Problems, titles_name: str) -> dict[str, list[str]]:
    """Read pairs.tsv: ``user<TAB>item item ...`` per line, items in time order."""
    return {user: seq for user, seq, _ in _iter_rows(path, rows, problems, titles_name, one_per_user=True)}


def _read_rows(
    path: Path, rows: dict, problems: _Problems, titles_name: str, *, one_per_user: bool = False
) -> list[SplitRow]:
    """The ``user<TAB>item item ...`` rows of pairs.tsv or of the authors' split files (train.tsv, val.tsv,
    test.tsv), in file order; ``one_per_user`` (pairs.tsv) refuses a user's second row, a split file may
    hold several rows of one user."""
    return [SplitRow(user, tuple(seq), line) for user, seq, line in _iter_rows(path, rows, problems, titles_name,
                                                                               one_per_user=one_per_user)]  # fmt: skip


def _iter_rows(path: Path, rows: dict, problems: _Problems, titles_name: str, *, one_per_user: bool = False):
    """(user, items, line number) of every usable row of a ``user<TAB>item item ...`` file (see _read_rows)."""
    if isinstance(rows, _UntitledRows):
        rows.add_missing(i for line in _read_lines(path) if "\t" in line for i in line.split("\t", 1)[1].split())
    known = set(rows)  # one C-speed test per line when every id is known (the usual case), not one per item
    first_line: dict[str, int] = {}
    for line_no, text in enumerate(_read_lines(path), start=1):
        if not text or text.isspace():
            continue
        if "\t" not in text:
            problems.add(f"Line {line_no} of {path} has no tab between the user id and the item list.")
            continue
        user, item_text = text.split("\t", 1)
        user, seq = user.strip(), item_text.split()
        if not user:
            problems.add(f"Line {line_no} of {path} has an empty user id.")
            continue
        if not seq:
            problems.add(f"Line {line_no} of {path} has an empty item list for user {user!r}.")
            continue
        if one_per_user and user in first_line:
            problems.add(
                f"Line {line_no} of {path} repeats user {user!r} already given on line {first_line[user]}."
            )
            continue
        if not known.issuperset(seq):
            unknown = [i for i in seq if i not in rows]
            shown = ", ".join(repr(i) for i in unknown[:5])
            problems.add(
                f"Line {line_no} of {path} names {len(unknown)} item id(s) that {titles_name} does not "
                f"list ({shown})."
            )
            seq = [i for i in seq if i in rows]
            if not seq:
                continue
        first_line[user] = line_no
        yield user, seq, line_no


def _id_key(value: str):
    """Sort key: numeric ids by value ("2" < "10"), others as text after them."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def _read_ratings(path: Path, rows: dict, problems: _Problems) -> dict[str, list[str]]:
    """Read MovieLens ratings.csv; each user's items ordered by timestamp, ties by item id."""
    records = _csv_rows(path)
    first = next(records, None)
    if first is None:
        raise DataError(f"The file {path} is empty.")
    header_line, header = first
    lower = [c.strip().lower() for c in header]
    wanted = ("userid", "movieid", "rating", "timestamp")
    if any(w not in lower for w in wanted):
        raise DataError(f"Line {header_line} of {path} must be the header userId,movieId,rating,timestamp.")
    u_col, m_col, r_col, t_col = (lower.index(w) for w in wanted)

    events: dict[str, list[tuple[int, tuple, str]]] = {}
    for line, fields in records:
        if not fields or all(not c.strip() for c in fields):
            continue
        if len(fields) != len(header):
            problems.add(f"Line {line} of {path} has {len(fields)} fields but the header has {len(header)}.")
            continue
        user, movie = fields[u_col].strip(), fields[m_col].strip()
        rating, stamp = fields[r_col].strip(), fields[t_col].strip()
        if not user or not movie:
            problems.add(f"Line {line} of {path} has an empty userId or movieId.")
            continue
        try:
            if not math.isfinite(float(rating)):
                raise ValueError
        except ValueError:
            problems.add(f"Line {line} of {path} has rating {rating!r}, which is not a number.")
            continue
        try:
            timestamp = int(stamp)
        except ValueError:
            problems.add(f"Line {line} of {path} has timestamp {stamp!r}, which is not an integer.")
            continue
        if movie not in rows:
            problems.add(f"Line {line} of {path} rates movie {movie!r}, which movies.csv does not list.")
            continue
        events.setdefault(user, []).append((timestamp, _id_key(movie), movie))
    return {u: [m for _, _, m in sorted(events[u])] for u in sorted(events, key=_id_key)}


def _index_images(folder: Path) -> dict[str, Path]:
    """item id -> image file in ``folder`` (<id>.jpg preferred over .jpeg over .png)."""
    found: dict[str, tuple[int, Path]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            rank = IMAGE_SUFFIXES.index(suffix.lower()) if suffix.lower() in IMAGE_SUFFIXES else -1
            if rank < 0 or not entry.is_file():
                continue
            if stem not in found or rank < found[stem][0]:
                found[stem] = (rank, folder / entry.name)
    return {stem: p for stem, (_, p) in found.items()}


def _image_header_ok(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # too many pixels: refused
            with Image.open(path) as im:
                im.verify()
        return True
    except Exception:  # PIL raises many kinds for a bad file
        return False


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Window:
    user: str
    history: tuple[str, ...]  # oldest first
    targets: tuple[str, ...]  # the true next items, in time order
    # the items negatives must avoid (split_policy "files": the row's own items, as the authors' code);
    # None: the user's whole sequence
    seen: tuple[str, ...] | None = None


_user_of = operator.attrgetter("user")


@dataclass
class Splits:
    train: list[Window]
    val: list[Window]
    test: list[Window]
    policy: str
    n_users_dropped: int  # users too short for a test window (fewer than min_interactions, ...)
    config: dict = field(default_factory=dict)  # the make_splits arguments that produced it

    def sizes(self) -> tuple[int, int, int, int]:
        """(train windows, val windows, test windows, users with a window)."""
        users = len(set(map(_user_of, itertools.chain(self.train, self.val, self.test))))
        return len(self.train), len(self.val), len(self.test), users

    def describe(self) -> str:
        c = self.config
        n_train, n_val, n_test, users = self.sizes()
        if self.policy == "files":
            skipped = c.get("skipped_rows", {})
            return (
                f"files splits (train.tsv / val.tsv / test.tsv as given, one window per row, file order): "
                f"{n_train:,} train / {n_val:,} val / {n_test:,} test windows; "
                f"{self.n_users_dropped:,} rows under {c.get('min_row_items')} items skipped "
                f"({', '.join(f'{k} {v:,}' for k, v in skipped.items())}); history {c.get('n_history')} items, "
                f"{c.get('n_target')} targets"
            )
        return (
            f"{self.policy} splits: {n_train:,} train / {n_val:,} val / "
            f"{n_test:,} test windows from {users:,} users "
            f"({self.n_users_dropped:,} dropped with fewer than {c.get('min_interactions')} interactions "
            f"or too short for a window); history {c.get('n_history')} items, {c.get('n_target')} targets"
        )


class _LazySplits(Splits):
    """Leave-one-out splits whose train and val windows are cut when first read (make_splits(lazy=True)):
    the test windows, the sizes and the description are there at once. Reads exactly as the Splits that
    make_splits(lazy=False) returns (it is what is made on first read); pickles as one."""

    def __init__(self, make, test, policy, dropped, config, sizes):
        self._make, self._sizes, self._lock, self._cut = make, sizes, threading.Lock(), None
        self.test, self.policy, self.n_users_dropped, self.config = test, policy, dropped, config

    def _windows(self) -> tuple[list[Window], list[Window]]:
        if self._cut is None:
            with self._lock:
                if self._cut is None:
                    from hanorec.tasks import no_cyclic_gc  # (tasks imports this module)

                    with no_cyclic_gc():  # hundreds of thousands of windows: as when prepare_data cuts them
                        full = self._make()
                    self._cut = (full.train, full.val)
        return self._cut

    train = property(lambda self: self._windows()[0], lambda self, v: self._set(0, v))
    val = property(lambda self: self._windows()[1], lambda self, v: self._set(1, v))

    def _set(self, k: int, value) -> None:
        cut = list(self._windows())
        cut[k] = value
        self._cut = tuple(cut)

    @property
    def cut(self) -> bool:
        """Whether the train and val windows are made yet."""
        return self._cut is not None

    def sizes(self) -> tuple[int, int, int, int]:
        return self._sizes if self._cut is None else super().sizes()

    def __eq__(self, other):
        return isinstance(other, Splits) and _splits_fields(self) == _splits_fields(other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return Splits, _splits_fields(self)


def _splits_fields(s: Splits) -> tuple:
    return (s.train, s.val, s.test, s.policy, s.n_users_dropped, s.config)


def require_windows(splits: Splits, ds: RecDataset, *, train: bool = True, eval_split: str | None = "test") -> None:
    """Raise DataError naming the cause and the way out when a split a run needs has no windows.

    Training needs the train split; evaluation needs `eval_split` ("test" or "val"). Called before any
    model is built, so an unusable task/dataset pairing never starts (or silently skips) training.
    """
    needed = (["train"] if train else []) + ([eval_split] if eval_split else [])
    c = splits.config
    sizes = dict(zip(("train", "val", "test"), splits.sizes()))  # without cutting lazy splits' windows
    for name in needed:
        if sizes[name]:
            continue
        lengths = sorted(len(seq) for seq in ds.sequences.values())
        median = lengths[len(lengths) // 2] if lengths else 0
        n_hist, n_tgt = c.get("n_history", 0), c.get("n_target", 1)
        counts = f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test windows"
        if splits.policy == "leave_one_out":
            need = n_hist + n_tgt * {"test": 1, "val": 2, "train": 3}[name]
            cause = (
                f"under leave_one_out a {name} window needs a user with at least {need} items (a history of "
                f"{n_hist} and {n_tgt} target(s){', after the val and test windows' if name == 'train' else ''}), "
                f"and the median user here has {median}"
            )
            way_out = (
                "use a task with a shorter history (hit3: 3, hit1: 5, next1: 10 items), "
                "--data.split_policy=last_window_by_user (one window per user, users split), or a dataset with "
                "longer sequences"
            )
        elif splits.policy == "files":
            rows = len((ds.split_rows or {}).get(name, []))
            cause = (
                f"the files policy builds one window per row of {name}.tsv with at least "
                f"{c.get('min_row_items')} items, and {name}.tsv has {rows} row(s), "
                f"{c.get('skipped_rows', {}).get(name, 0)} of them shorter"
            )
            way_out = f"check {ds.root / (name + '.tsv')}, or use a task with a shorter history"
        else:
            cause = f"last_window_by_user gives each user one window and there are only {len({w.user for w in splits.train + splits.val + splits.test})} users with one"
            way_out = "use more users (drop --data.max_users), --data.split_policy=leave_one_out, or a task with a shorter history"
        raise DataError(f"the {name} split of {ds.root} is empty ({counts}): {cause}; {way_out}")


def make_splits(
    ds: RecDataset,
    *,
    n_history: int,
    n_target: int,
    policy: str = "leave_one_out",
    min_interactions: int = 6,
    max_items_per_user: int | None = None,
    max_train_windows_per_user: int | None = None,
    min_history: int | None = None,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    lazy: bool = False,
) -> Splits:
    """Cut each user's sequence into windows of ``n_history`` items followed by ``n_target`` targets.

    Users are visited in sorted order; users with fewer than ``min_interactions`` items are
    dropped (counted in ``n_users_dropped``), then a sequence is truncated to its last
    ``max_items_per_user`` items if set. A window ending at position e (exclusive) has
    targets ``seq[e-n_target:e]`` and history the ``n_history`` items before them; with
    ``min_history`` a window may have between ``min_history`` and ``n_history`` history items
    (default: exactly ``n_history``).

    policy "leave_one_out" (several windows per user, no target leak into training):
        test  = the window ending at L = len(seq);
        val   = the window ending at L - n_target;
        train = windows ending at L - 2*n_target, L - 2*n_target - 1, ... down to the earliest
                one with enough history (only the latest ``max_train_windows_per_user`` if set),
                listed oldest first.
        With n_target=1 these are the windows ending at L, L-1 and L-2, L-3, ...; the steps of
        n_target keep the val and test targets out of every earlier window's targets (they may
        appear in later windows' histories, as in classic leave-one-out). A user too short for
        the val or the train windows still gets its test window; a user too short for a test
        window is dropped.
    policy "last_window_by_user" (alias "by_user"): one window per user, its last
        n_history + n_target items (hit3: the last 6); users (sorted, then shuffled with
        ``random.Random(seed)``) go to test (``round(test_frac * N)`` users), then val
        (``round(val_frac * N)``), the rest to train. Train, val and test users are disjoint.
        This mirrors what is known of the authors' setup: their code reads pre-split train / val /
        test files and builds one window per row from its last 6 items; how those files were split
        is not published, so the user split here is our assumption, not a reproduction.

    policy "files": the authors' own train.tsv / val.tsv / test.tsv, read as given (the dataset must
        be loaded with ``split_files=True``): one window per row, from the row's last n_history + n_target
        items (hit3 and hit1: its last 6), in file order, so the first N test examples are the file's
        first N usable rows; a row shorter than that (or than ``min_interactions``) is skipped and counted
        (``n_users_dropped`` then counts rows, ``config["skipped_rows"]`` per file). A user may have rows
        in several files. Negatives avoid the row's own items (``Window.seen``), as the authors' code.

    Deterministic: the same dataset and arguments give identical Splits.

    lazy (leave_one_out only; other policies ignore it): only the test windows are cut now, and the train and
    val windows when first read (a view that shows test prompts never pays for them); their numbers
    (``sizes()``, ``describe()``) are counted at once. The windows are the same.
    """
    policy = SPLIT_ALIASES.get(policy, policy)
    if policy not in SPLIT_POLICIES:
        raise ValueError(f"Unknown split policy {policy!r}; expected one of {', '.join(SPLIT_POLICIES)}.")
    if n_history < 0 or n_target < 1:
        raise ValueError(f"Need n_history >= 0 and n_target >= 1, got {n_history} and {n_target}.")
    min_history = n_history if min_history is None else min_history
    if not 0 <= min_history <= n_history:
        raise ValueError(f"min_history must be between 0 and n_history={n_history}, got {min_history}.")
    if not (0 <= val_frac and 0 <= test_frac and val_frac + test_frac <= 1):
        raise ValueError(
            f"val_frac and test_frac must be >= 0 with a sum <= 1, got {val_frac} and {test_frac}."
        )
    config = dict(
        n_history=n_history,
        n_target=n_target,
        policy=policy,
        min_interactions=min_interactions,
        max_items_per_user=max_items_per_user,
        max_train_windows_per_user=max_train_windows_per_user,
        min_history=min_history,
        val_frac=val_frac,
        test_frac=test_frac,
        seed=seed,
    )

    if policy == "files":
        return _file_splits(ds, n_history, n_target, min_interactions, config)
    if lazy and policy == "leave_one_out":
        return _lazy_leave_one_out(ds, config)

    def window(user: str, seq: tuple[str, ...], end: int) -> Window | None:
        return _window(user, seq, end, n_history, n_target, min_history)

    train: list[Window] = []
    val: list[Window] = []
    test: list[Window] = []
    dropped = 0
    by_user_windows: list[Window] = []
    for user in sorted(ds.sequences):
        seq = ds.sequences[user]
        if len(seq) < min_interactions:
            dropped += 1
            continue
        if max_items_per_user is not None:
            seq = seq[-max_items_per_user:]
        seq = tuple(seq)  # its slices are the windows' tuples (no copy per window)
        last = window(user, seq, len(seq))
        if last is None:
            dropped += 1
            continue
        if policy == "last_window_by_user":
            by_user_windows.append(last)
            continue
        test.append(last)
        val_window = window(user, seq, len(seq) - n_target)
        if val_window is not None:
            val.append(val_window)
        # the windows ending at L - 2*n_target down to the earliest with min_history items (latest first), only
        # the latest max_train_windows_per_user of them kept, listed oldest first
        ends = range(len(seq) - 2 * n_target, n_target + min_history - 1, -1)[:max_train_windows_per_user]
        train.extend([window(user, seq, e) for e in reversed(ends)])  # every such end leaves min_history items

    if policy == "last_window_by_user":
        order = list(range(len(by_user_windows)))
        random.Random(seed).shuffle(order)
        n_test = round(test_frac * len(order))
        n_val = round(val_frac * len(order))
        test_ids, val_ids = set(order[:n_test]), set(order[n_test : n_test + n_val])
        for k, w in enumerate(by_user_windows):  # keep sorted-user order inside each split
            (test if k in test_ids else val if k in val_ids else train).append(w)
    return Splits(train, val, test, policy, dropped, config)


def _window(user: str, seq: tuple[str, ...], end: int, n_history: int, n_target: int, min_history: int) -> Window | None:
    """The window of seq ending at end: n_target targets after up to n_history history items (slices of the
    tuple, no copy), or None when fewer than min_history history items are left."""
    start = end - n_target
    if start - min_history < 0:
        return None
    return Window(user, seq[max(0, start - n_history) : start], seq[start:end])


def _lazy_leave_one_out(ds: RecDataset, config: dict) -> _LazySplits:
    """make_splits(lazy=True) under leave_one_out: the test windows now, the numbers of val and train windows
    counted from the lengths (as make_splits cuts them), the windows themselves on first read."""
    c = config
    n_history, n_target, min_history = c["n_history"], c["n_target"], c["min_history"]
    cap, max_items = c["max_train_windows_per_user"], c["max_items_per_user"]
    test: list[Window] = []
    dropped = n_val = n_train = 0
    for user in sorted(ds.sequences):
        seq = ds.sequences[user]
        if len(seq) < c["min_interactions"]:
            dropped += 1
            continue
        if max_items is not None:
            seq = seq[-max_items:]
        n = len(seq)
        start = n - n_target
        last = _window(user, tuple(seq), n, n_history, n_target, min_history)
        if last is None:
            dropped += 1
            continue
        test.append(last)
        n_val += start - n_target - min_history >= 0
        n_train += len(range(n - 2 * n_target, n_target + min_history - 1, -1)[:cap])
    args = {k: v for k, v in config.items() if k != "policy"}
    return _LazySplits(lambda: make_splits(ds, **args, policy="leave_one_out"), test, "leave_one_out", dropped,
                       config, (n_train, n_val, len(test), len(test)))  # fmt: skip


def _file_splits(ds: RecDataset, n_history: int, n_target: int, min_interactions: int, config: dict) -> Splits:
    """split_policy "files" (see make_splits): one window per usable row of each split file, in file order."""
    if ds.split_rows is None:
        raise DataError(
            f"split_policy 'files' needs the dataset at {ds.root} loaded with its train.tsv, val.tsv and "
            "test.tsv (load_dataset(..., split_files=True))."
        )
    need = max(n_history + n_target, min_interactions)
    out: dict[str, list[Window]] = {}
    skipped: dict[str, int] = {}
    for name in ("train", "val", "test"):
        windows, short = [], 0
        for row in ds.split_rows[name]:
            if len(row.items) < need:
                short += 1
                continue
            last = row.items[-(n_history + n_target) :]
            windows.append(Window(row.user, last[:n_history], last[n_history:], seen=row.items))
        out[name], skipped[name] = windows, short
    config = dict(config, min_row_items=need, skipped_rows=skipped)
    return Splits(out["train"], out["val"], out["test"], "files", sum(skipped.values()), config)


def write_split_files(ds: RecDataset, out_dir, *, seed: int = 0, name: str = "Demo", hold_out: int = 3) -> Path:
    """Write ``ds`` in the authors' layout, to try split_policy "files" without their data: ``train.tsv``,
    ``val.tsv``, ``test.tsv`` (``user<TAB>item item ...``), ``<name>_titles.csv`` (``item,title``) and
    ``images/<item>.<ext>`` (copies of the items' images).

    Users (sorted, shuffled with ``random.Random(seed)``) go 10% to test, 10% to val and the rest to train,
    each with its whole sequence; a val or test user whose sequence is longer than ``hold_out`` items also
    gets a train row without its last ``hold_out`` items, so a user appears in several files. This is only
    a way to make such a folder: how the authors split their own files is not published."""
    import shutil

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    users = sorted(ds.sequences, key=_id_key)
    order = users[:]
    random.Random(seed).shuffle(order)
    n_test = n_val = round(0.1 * len(order))
    part = {u: "test" for u in order[:n_test]} | {u: "val" for u in order[n_test : n_test + n_val]}
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for user in users:
        seq = ds.sequences[user]
        where = part.get(user, "train")
        if where != "train" and len(seq) > hold_out:
            rows["train"].append(f"{user}\t{' '.join(seq[:-hold_out])}")
        rows[where].append(f"{user}\t{' '.join(seq)}")
    for split, lines in rows.items():
        (out / f"{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with open(out / f"{name}_titles.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "title"])
        for item_id in sorted(ds.items, key=_id_key):
            writer.writerow([item_id, ds.items[item_id].title])
            path = ds.items[item_id].image_path
            if path is not None:
                shutil.copyfile(path, out / "images" / f"{item_id}{path.suffix}")
    return out


# ----------------------------------------------------------------------------- demo dataset

DEMO_COLORS = {"red": (205, 45, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 30)}
DEMO_GENRE_WORDS = {
    "space": (
        "Star",
        "Orbit",
        "Galaxy",
        "Comet",
        "Nebula",
        "Rocket",
        "Planet",
        "Moon",
        "Astronaut",
        "Cosmos",
    ),
    "sea": ("Tide", "Harbor", "Reef", "Anchor", "Wave", "Island", "Sailor", "Lighthouse", "Shore", "Voyage"),
    "western": (
        "Saddle",
        "Outlaw",
        "Canyon",
        "Sheriff",
        "Frontier",
        "Rodeo",
        "Mustang",
        "Ranch",
        "Prairie",
        "Gunslinger",
    ),
    "mystery": (
        "Detective",
        "Alibi",
        "Witness",
        "Clue",
        "Secret",
        "Verdict",
        "Suspect",
        "Cipher",
        "Heist",
        "Riddle",
    ),
}
_DEMO_NEUTRAL = (
    "Last", "Long", "Quiet", "Broken", "Lost", "Silent", "Final", "Hidden", "Wild", "Distant",
    "Night", "Summer", "Winter", "Journey", "Promise", "Road", "Heart", "Morning", "Edge", "Return",
)  # fmt: skip
_DEMO_TEMPLATES = (
    "The {n} {g}",
    "{g} of the {n}",
    "{n} {g}",
    "Return to {g} {g2}",
    "The {g} and the {g2}",
    "Goodbye, {g}",
    "{g}, My {g2}",
    "A {n} {g} Story",
    "{g} {g2}",
)
# ----------------------------------------------------------------------------- teaching scenarios
# Phenomena the preference methods claim to handle, planted in the demo data (all beyond the paper, which
# measures none of them). make_demo writes them to scenario.json; training reads them from RecDataset.scenario:
# false negatives when the training examples draw their negatives (hanorec.tasks.build_examples), preference
# noise when the pairs are built (hanorec.pairs.build_pairs); uneven density shapes the catalogue itself.
# Test examples never see a scenario: every method is measured on the same clean test candidates.
SCENARIO_FILE = "scenario.json"
SCENARIOS = {
    "false_negatives": (
        "False negatives (beyond the paper): this fraction of the training negatives is drawn from the user's "
        "own taste (the true item's colour and genre), so a 'rejected' item is often one the user would like. "
        "Stresses HaRS, which is meant to soften hard and false negatives."
    ),
    "preference_noise": (
        "Preference noise (beyond the paper): this fraction of the training pairs has chosen and rejected "
        "swapped. Stresses the label-noise methods, rDPO and cDPO, and the overfitting guards, NoDO and IPO."
    ),
    "uneven_density": (
        "Uneven cluster density (beyond the paper): the 16 (colour, genre) clusters hold very different numbers "
        "of items (the largest up to 1 + 19 x this value times the smallest), so HaRS' neighbour profiles differ "
        "between positives (dense clusters) and negatives. Stresses HaRS' hardness estimate."
    ),
    "title_noise": (
        "Title noise (beyond the paper): this fraction of the items has a title written with the words of a "
        "genre drawn at random, so the titles say less (at 1: nothing) about a user's taste and the images "
        "become the only route to it. Run the evaluation with eval.image_ablation to see how much each "
        "trained model relies on the images."
    ),
}


def read_scenario(root) -> dict:
    """The scenario planted in a dataset folder (its scenario.json), {} when there is none. One sentence
    naming the file when it is damaged or holds an unknown key or a value outside [0, 1]."""
    import json

    path = Path(root) / SCENARIO_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"The scenario file {path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise DataError(f"The scenario file {path} must hold an object such as {{\"false_negatives\": 0.3}}.")
    out = {}
    for key, value in data.items():
        if key not in SCENARIOS:
            raise DataError(f"The scenario file {path} names {key!r}; use some of {list(SCENARIOS)}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise DataError(f"The scenario file {path} sets {key} = {value!r}; it must be a number in [0, 1].")
        out[key] = float(value)
    return out


def scenario_sentences(scenario: dict) -> list[str]:
    """One sentence per planted phenomenon, naming the mechanism it stresses (the app shows them)."""
    return [f"{SCENARIOS[k]} Planted at {v:g}." for k, v in scenario.items() if v and k in SCENARIOS]


DEMO_LOGIC = (
    "The demo world (synthetic, hanorec.data.make_demo): each item's colour is shown only in its image and its "
    "genre only in its title's words; a user's next items mostly match their current (colour, genre) taste, so "
    "only a model that reads both the images and the titles can rank the true items first."
)


def planted_sentences(ds) -> list[str]:
    """What is planted in a dataset, one sentence each: the demo world's logic when its items carry make_demo's
    colour and genre, then each teaching scenario's sentence (:func:`scenario_sentences`)."""
    first = next(iter(ds.items.values()), None)
    demo = first is not None and {"color", "genre"} <= set(first.attributes)
    return ([DEMO_LOGIC] if demo else []) + scenario_sentences(getattr(ds, "scenario", {}) or {})


# The teaching-scenario datasets the explorer makes at start (folder name -> make_demo's scenario fractions, the
# values of configs/compare-scenario-*.yaml), each from the plain demo's seed: same items, users and test data.
TEACHING_DATASETS = {
    "demo-false-negatives-30": {"false_negatives": 0.3},
    "demo-preference-noise-30": {"preference_noise": 0.3},
    "demo-uneven-density": {"uneven_density": 1.0},
}
_MADE_FILE = ".made.json"


def teaching_datasets(folder, *, seed: int = 0) -> Path:
    """Make the teaching-scenario datasets (:data:`TEACHING_DATASETS`) under ``folder`` unless they are there
    already (a stamp file records what made each; a dataset made differently is made again), and return the
    folder. Each is written under a temporary name and renamed, so two processes starting together never see
    half a dataset. About 0.1 s per dataset on one core."""
    import json
    import shutil

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, planted in TEACHING_DATASETS.items():
        out = root / name
        stamp = {"seed": seed, "version": 1, **planted}
        try:
            if json.loads((out / _MADE_FILE).read_text()) == stamp:
                continue
        except (OSError, ValueError):
            pass
        tmp = root / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_demo(tmp, seed=seed, **planted)
        (tmp / _MADE_FILE).write_text(json.dumps(stamp))
        shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # another process put its copy there first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


DEMO_TASTE_MATCH = 0.85  # probability that a next item matches the user's (colour, genre) taste
DEMO_TASTE_DRIFT = 0.1  # per-step probability that the taste changes one attribute


def make_demo(
    out_dir,
    *,
    seed: int = 0,
    n_items: int = 300,
    n_users: int = 240,
    image_size: int = 64,
    false_negatives: float = 0.0,
    preference_noise: float = 0.0,
    uneven_density: float = 0.0,
    title_noise: float = 0.0,
) -> Path:
    """Write a small synthetic multimodal dataset in the hanorec format and return its folder.

    Each item has a COLOUR (4 values) shown only in its image, as a large shape on a pale
    background with a few small shapes of random colours as distractors, and a GENRE
    (4 values) readable only from its title's vocabulary (e.g. space: Star, Orbit, ...) mixed
    with neutral words. Each user has a current (colour, genre) taste; each next item matches
    both with probability DEMO_TASTE_MATCH (else it is a random unseen item) and before each
    step the taste changes one attribute with probability DEMO_TASTE_DRIFT, so recent items
    matter. Sequences have 10 to 30 items. A text-only model sees the genre but not the
    colour, so it cannot match a multimodal one.

    Writes pairs.tsv, titles.csv (item,title,color,genre), images/<id>.jpg, README.txt.
    The color and genre columns are the ground truth for analysis: never put them in prompts.
    Deterministic: the same arguments give byte-identical files.

    Teaching scenarios (beyond the paper; :data:`SCENARIOS` says what each stresses), each a fraction in
    [0, 1], written to scenario.json when any is set: ``false_negatives`` and ``preference_noise`` act when
    training data are built from this folder; ``uneven_density`` gives the (colour, genre) clusters uneven
    sizes; ``title_noise`` writes this fraction of the titles with the words of a genre drawn at random (seeded
    apart from the rest, so the images and sequences are those of the plain demo), so at 1 the titles carry no
    taste signal and the images are the only route to it. With all at 0 the files are those of the plain demo.
    """
    if n_items < 16 or n_users < 1 or image_size < 16:
        raise ValueError("make_demo needs n_items >= 16, n_users >= 1 and image_size >= 16.")
    planted = {"false_negatives": false_negatives, "preference_noise": preference_noise,
               "uneven_density": uneven_density, "title_noise": title_noise}  # fmt: skip
    for key, value in planted.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"make_demo: {key} = {value!r} must be a number in [0, 1].")
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    colors, genres = list(DEMO_COLORS), list(DEMO_GENRE_WORDS)

    cells = [(c, g) for c in colors for g in genres]
    if uneven_density:
        # cluster k gets a share proportional to ratio ** (k / 15): the largest holds 1 + 19 u times the smallest
        ratio = 1 + 19 * uneven_density
        weights = [ratio ** (k / (len(cells) - 1)) for k in range(len(cells))]
        counts = [max(1, int(n_items * w / sum(weights))) for w in weights]
        counts[-1] += n_items - sum(counts)
        labels = [cell for cell, n in zip(cells, counts) for _ in range(n)]
    else:
        labels = [cells[k % len(cells)] for k in range(n_items)]
    rng.shuffle(labels)
    item_ids = [str(k + 1) for k in range(n_items)]
    titles: list[str] = []
    seen_titles: set[str] = set()
    # the title-noise scenario draws from its own stream: the main one (and so every image and sequence) is
    # consumed as in the plain demo, since every genre has as many words
    noise_rng = random.Random(f"hanorec-title-noise:{seed}")
    for _, genre in labels:
        if title_noise and noise_rng.random() < title_noise:
            genre = noise_rng.choice(genres)
        title = _demo_title(rng, genre)
        while title in seen_titles:
            title = _demo_title(rng, genre)
        seen_titles.add(title)
        titles.append(title)

    wanted = {f"{i}.jpg" for i in item_ids}
    for name in os.listdir(out / "images"):  # stale images from an earlier, larger demo
        if name.endswith(".jpg") and name not in wanted:
            os.remove(out / "images" / name)
    for item_id, (color, _) in zip(item_ids, labels):
        _demo_image(rng, color, image_size).save(out / "images" / f"{item_id}.jpg", quality=90)

    by_cell: dict[tuple[str, str], list[str]] = {}
    for item_id, cell in zip(item_ids, labels):
        by_cell.setdefault(cell, []).append(item_id)
    width = max(3, len(str(n_users)))
    lines = []
    for u in range(n_users):
        taste = [rng.choice(colors), rng.choice(genres)]
        seq: list[str] = []
        for _ in range(rng.randint(10, 30)):
            if rng.random() < DEMO_TASTE_DRIFT:
                k = rng.randrange(2)
                options = colors if k == 0 else genres
                taste[k] = rng.choice([v for v in options if v != taste[k]])
            matching = [i for i in by_cell[tuple(taste)] if i not in seq]
            if matching and rng.random() < DEMO_TASTE_MATCH:
                seq.append(rng.choice(matching))
            else:
                seq.append(rng.choice([i for i in item_ids if i not in seq]))
        lines.append(f"u{u + 1:0{width}d}\t{' '.join(seq)}\n")
    with open(out / "pairs.tsv", "w", encoding="utf-8", newline="") as f:
        f.writelines(lines)
    with open(out / "titles.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["item", "title", "color", "genre"])
        for item_id, title, (color, genre) in zip(item_ids, titles, labels):
            writer.writerow([item_id, title, color, genre])
    scenario_path = out / SCENARIO_FILE
    if any(planted.values()):
        import json

        scenario_path.write_text(json.dumps({k: float(v) for k, v in planted.items() if v}, indent=2) + "\n")
    elif scenario_path.exists():  # an earlier scenario in the same folder
        scenario_path.unlink()
    (out / "README.txt").write_text(
        _DEMO_README.format(
            seed=seed,
            n_items=n_items,
            n_users=n_users,
            image_size=image_size,
            colors=", ".join(colors),
            genres=", ".join(genres),
            match=DEMO_TASTE_MATCH,
            drift=DEMO_TASTE_DRIFT,
        ),
        encoding="utf-8",
    )
    if any(planted.values()):
        with open(out / "README.txt", "a", encoding="utf-8") as f:
            f.write("\nTeaching scenario (scenario.json, beyond the paper):\n")
            f.writelines(f"  {line}\n" for line in scenario_sentences(read_scenario(out)))
    return out


_DEMO_README = """HaNoRec Studio demo dataset (synthetic)
=======================================

Generated by hanorec.data.make_demo(out_dir, seed={seed}, n_items={n_items}, n_users={n_users},
image_size={image_size}); `python -m hanorec make-demo` runs the same function. Nothing here
comes from a real dataset.

Layout (hanorec format, like MicroLens):
  pairs.tsv          user<TAB>item item ...   ({n_users} users, items in time order, 10-30 each)
  titles.csv         item,title,color,genre   ({n_items} items)
  images/<item>.jpg  {image_size}x{image_size} JPEG, one per item

How it works:
  Every item has a colour ({colors}) that is visible ONLY in its image (a large
  shape on a pale background, plus small distractor shapes of random colours) and a genre
  ({genres}) readable ONLY from its title (genre words such as Star/Orbit/Galaxy for
  space, mixed with neutral words). Each user has a current (colour, genre) taste; each next
  item matches both with probability {match}, otherwise it is a random unseen item, and
  before each step the taste changes one attribute with probability {drift}. A text-only
  recommender can only use the genre, so a multimodal one should beat it.
  The color and genre columns are ground truth for analysis; never put them in prompts.
"""


def _demo_title(rng: random.Random, genre: str) -> str:
    words = DEMO_GENRE_WORDS[genre]
    g, g2 = rng.sample(words, 2)
    title = rng.choice(_DEMO_TEMPLATES).format(g=g, g2=g2, n=rng.choice(_DEMO_NEUTRAL))
    return f"{title} ({rng.randint(1950, 2019)})"


def _demo_image(rng: random.Random, color: str, size: int) -> Image.Image:
    def jitter(rgb, amount):
        return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)

    pale = rng.randint(200, 240)
    image = Image.new("RGB", (size, size), jitter((pale, pale, pale), 8))
    draw = ImageDraw.Draw(image)
    # The large shape in the item's colour: 45-75% of the side, anywhere inside the frame.
    side = int(size * rng.uniform(0.55, 0.8))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = jitter(DEMO_COLORS[color], 20)
    shape = rng.choice(("ellipse", "rectangle", "triangle"))
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=fill)
    # Small distractors of random colours.
    for _ in range(rng.randint(2, 5)):
        r = max(2, int(size * rng.uniform(0.04, 0.09)))
        cx, cy = rng.randint(0, size - 1), rng.randint(0, size - 1)
        rgb = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
        else:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    return image


# ----------------------------------------------------------------------------- demo oracles
# Scorers that read the two modalities the way a model would have to: the genre from the
# title's words, the colour from the image's pixels (never the color/genre columns). A
# candidate's score is the recency-weighted number of history items (weights 1..n, most
# recent highest) that share its genre (text oracle), its colour (image oracle), or both.

_GENRE_OF_WORD = {w.lower(): g for g, words in DEMO_GENRE_WORDS.items() for w in words}


def demo_genre_from_title(title: str) -> str | None:
    """The genre whose vocabulary words the title uses most (None if it uses none)."""
    votes: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", title.lower()):
        if word in _GENRE_OF_WORD:
            votes[_GENRE_OF_WORD[word]] = votes.get(_GENRE_OF_WORD[word], 0) + 1
    return max(votes, key=lambda g: (votes[g], g)) if votes else None


def demo_color_from_image(image: Image.Image) -> str | None:
    """The demo colour whose hue covers most saturated pixels (None for a grey image)."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.int32)  # (H, W, 3), each 0..255
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    vivid = (sat > 100) & (val > 80)
    if not vivid.any():
        return None
    ref_hues = {name: _rgb_hue(rgb) for name, rgb in DEMO_COLORS.items()}
    names = list(ref_hues)
    dist = np.stack([np.abs(hue[vivid] - ref_hues[n]) for n in names])  # (4, n_vivid)
    dist = np.minimum(dist, 256 - dist)  # hue is circular
    counts = np.bincount(dist.argmin(axis=0), minlength=len(names))
    return names[int(counts.argmax())]


def _rgb_hue(rgb) -> int:
    return int(Image.new("RGB", (1, 1), tuple(rgb)).convert("HSV").getpixel((0, 0))[0])


def _image_color(path: Path | None) -> str | None:
    if path is None:
        return None
    stat = path.stat()
    return _cached_color(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=65536)
def _cached_color(path: str, mtime_ns: int, size: int) -> str | None:  # keyed on the file's version
    with Image.open(path) as im:
        return demo_color_from_image(im)


def _demo_score(history, candidates, attribute_of) -> list[float]:
    weights = {}
    for w, item in enumerate(history, start=1):
        value = attribute_of(item)
        if value is not None:
            weights[value] = weights.get(value, 0.0) + w
    return [weights.get(attribute_of(c), 0.0) for c in candidates]


def demo_text_oracle(ds: RecDataset, history, candidates) -> list[float]:
    """Score candidates by the genre read from the titles (one score per candidate)."""
    return _demo_score(history, candidates, lambda i: demo_genre_from_title(ds.items[i].title))


def demo_image_oracle(ds: RecDataset, history, candidates) -> list[float]:
    """Score candidates by the colour read from the image pixels (one score per candidate)."""

    return _demo_score(history, candidates, lambda i: _image_color(ds.items[i].image_path))


def demo_oracle(ds: RecDataset, history, candidates) -> list[float]:
    """Score candidates by both genre (titles) and colour (images): the sum of the two oracles."""
    text = demo_text_oracle(ds, history, candidates)
    image = demo_image_oracle(ds, history, candidates)
    return [t + v for t, v in zip(text, image)]
