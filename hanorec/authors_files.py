"""The authors' drawn SFT files (``data.prompts=authors``): each row's candidates, hit1 label and order as
their loader drew them, read back instead of drawn again.

Their ``main_mllm.py`` writes ``<split>-mllm_sft_<hit>.json`` beside ``train.tsv`` / ``val.tsv`` /
``test.tsv`` (their dataset archive calls them ``<split>_sft_<hit>``): a JSON list with one sample per row
of the split file that has at least 6 items, in file order, each ``{"messages": [{"role": "user", "content":
prompt}, {"role": "assistant", "content": answer}], "images": [...]}``. hit3 prompts list the candidates
one per line after "Below are the candidate ..."; hit1 prompts list the not-watched items after "... not
watched ..." and the target after "Whether the user will like the target ...", and the answer is Yes or No.
Titles are quoted; an id without a title is ``[unknown N]``.

Each sample becomes the row's draw (hanorec.tasks._Draw): candidate titles are matched to item ids (the
row's own targets first, then ids the row does not contain), so every later step (options, the ranking
protocol, preference pairs, HaRS) reads their candidates; the prompt and answer text stay theirs verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hanorec.data import DataError, RecDataset, Window, _id_key
from hanorec.tasks import _Draw

NAMES = ("{split}-mllm_sft_{hit}.json", "{split}_sft_{hit}.json", "{split}_sft_{hit}")
HIT = {"hit3": 3, "hit1": 1}


def find_sft_file(root: str | Path, split: str, task: str) -> Path | None:
    """The authors' drawn SFT file of a split and task in ``root``, or None."""
    if task not in HIT:
        return None
    for name in NAMES:
        path = Path(root) / name.format(split=split, hit=HIT[task])
        if path.is_file():
            return path
    return None


def read_sft_file(path: Path) -> list[tuple[str, str]]:
    """(user prompt, answer) of every sample; DataError names the file and sample when one is malformed."""
    try:
        samples = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"The file {path} is not a JSON list of SFT samples ({str(e).splitlines()[0]}).") from None
    if not isinstance(samples, list):
        raise DataError(f"The file {path} must hold a JSON list of SFT samples, not {type(samples).__name__}.")
    out = []
    for k, sample in enumerate(samples):
        messages = sample.get("messages") if isinstance(sample, dict) else None
        ok = (
            isinstance(messages, list) and len(messages) == 2
            and [m.get("role") if isinstance(m, dict) else None for m in messages] == ["user", "assistant"]
            and all(isinstance(m.get("content"), str) for m in messages)
        )  # fmt: skip
        if not ok:
            raise DataError(f"Sample {k} of {path} must have messages [user, assistant] with text content.")
        out.append((messages[0]["content"], messages[1]["content"]))
    return out


def _clean(line: str) -> str:
    value = line.strip()
    if value.startswith("<image>"):
        value = value[len("<image>") :].strip()
    value = value.rstrip().rstrip(".").rstrip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].strip()
    return value


def _section(text: str, start: str, end: str | None = None) -> list[str]:
    lines = text.splitlines()
    at = next((k + 1 for k, line in enumerate(lines) if start.casefold() in line.casefold()), None)
    if at is None:
        return []
    out = []
    for line in lines[at:]:
        if end and end.casefold() in line.casefold():
            break
        if line.strip():
            out.append(_clean(line))
    return out


class _Titles:
    def __init__(self, ds: RecDataset):
        self.ds = ds
        self.by_title: dict[str, list[str]] = {}
        for i in sorted(ds.items, key=_id_key):
            self.by_title.setdefault(ds.items[i].title.strip(), []).append(i)

    def ids(self, title: str) -> list[str]:
        found = self.by_title.get(title, [])
        if not found and title.startswith("[unknown ") and title.endswith("]"):
            found = [title[len("[unknown ") : -1].strip()]
        return found

    def resolve(self, title: str, prefer: Sequence[str], avoid: set[str]) -> str | None:
        """The id a shown title stands for: one of ``prefer`` (the row's targets) when its title, else the
        first id with that title outside ``avoid`` (the row's items and candidates taken)."""
        ids = self.ids(title)
        for i in prefer:
            if i in ids and i not in avoid:
                return i
        return next((i for i in ids if i not in avoid), None)


def authors_draws(task: str, windows: Sequence[Window], ds: RecDataset, path: Path) -> list[_Draw]:
    """One draw per window from the authors' drawn SFT file of its split (see the module docstring)."""
    from hanorec.tasks import unknown_title

    samples = read_sft_file(path)
    if len(samples) != len(windows):
        raise DataError(
            f"The file {path} holds {len(samples)} samples but its split file has {len(windows)} usable rows "
            "(rows of at least 6 items, in order); the two do not belong together."
        )
    titles = _Titles(ds)
    out = []
    for k, (window, (prompt, answer)) in enumerate(zip(windows, samples)):
        where = f"Sample {k} of {path} (user {window.user})"
        seen = set(window.seen if window.seen is not None else ds.sequences.get(window.user, ()))
        if task == "hit3":
            shown = _section(prompt, "Below are the candidate")
            targets = tuple(reversed(window.targets))
            taken: set[str] = set()
            candidates = []
            for title in shown:
                i = titles.resolve(title, targets, (seen - set(targets)) | taken)
                if i is None:
                    raise DataError(f"{where}: the candidate {title!r} is no item of the titles file.")
                candidates.append(i)
                taken.add(i)
            if not set(targets) <= taken:
                raise DataError(f"{where}: its candidates do not include the row's next items; the file does not "
                                "belong to this split file.")  # fmt: skip
            negatives = tuple(i for i in candidates if i not in targets)
            draw = _Draw(window, tuple(candidates), negatives, None, (prompt, answer))
        else:
            label = answer.strip().casefold()
            if label not in ("yes", "no"):
                raise DataError(f"{where}: the answer is {answer!r}, not Yes or No.")
            target_title = next(iter(_section(prompt, "Whether the user will like the target")), None)
            not_watched_titles = _section(prompt, "not watched", "Whether the user will like the target")
            if target_title is None or not not_watched_titles:
                raise DataError(f"{where}: the prompt has no target or no not-watched list.")
            true = window.targets[0]
            if label == "yes":
                if true not in titles.ids(target_title) and target_title != unknown_title(true):
                    raise DataError(f"{where}: answered Yes, but the target {target_title!r} is not the row's "
                                    "next item.")  # fmt: skip
                target = true
            else:
                target = titles.resolve(target_title, (), seen)
            not_watched = []
            for title in not_watched_titles:
                i = titles.resolve(title, (), seen | set(not_watched) | {target})
                if i is None:
                    raise DataError(f"{where}: the not-watched item {title!r} is no item of the titles file.")
                not_watched.append(i)
            if target is None:
                raise DataError(f"{where}: the target {target_title!r} is no item of the titles file.")
            draw = _Draw(window, (target,), tuple(not_watched), label == "yes", (prompt, answer))
        out.append(draw)
    return out


def write_sft_files(examples_by_split: dict[str, Sequence], root: str | Path, task: str) -> list[Path]:
    """Write examples in the authors' SFT file layout (``<split>-mllm_sft_<hit>.json``), to try
    ``data.prompts=authors`` without their data (images named ``images/<item>.jpg`` as theirs)."""
    root = Path(root)
    paths = []
    for split, examples in examples_by_split.items():
        path = root / NAMES[0].format(split=split, hit=HIT[task])
        rows = [{"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}],
                 "images": [str(root / "images" / f"{i}.jpg") for i in ex.image_items]} for ex in examples]  # fmt: skip
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
        paths.append(path)
    return paths
