"""Confining a path a user typed (in the app, a notebook widget) to a set of allowed folders.

    root = confine("movielens-small", [Path("assets/demo"), Path("/data")])   # -> an existing Path

A typed path is accepted only when, after following every symlink, it lies inside one of the
allowed folders. Rejected in one sentence (:class:`PathError`): an empty path, a NUL byte, any
``..`` component, a percent-encoded form (``%2e%2e%2f``), a ``~`` home shortcut, an absolute path
outside the folders, and a symlink that leads outside them. A relative path is looked up inside
each allowed folder in order (first hit wins), then relative to the working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

from hanorec.errors import UserError

__all__ = ["PathError", "confine", "is_inside", "redact", "strip_tracebacks"]

_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")


class PathError(UserError, ValueError):
    """A typed path that is not allowed; the message is one sentence naming it."""


def is_inside(path: Path, root: Path) -> bool:
    """True when the fully resolved ``path`` is ``root`` or below it (both resolved, symlinks followed)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def _check_text(text: str) -> str:
    if text is None or not str(text).strip():
        raise PathError("Type a path: the field is empty.")
    text = str(text).strip()
    if "\x00" in text:
        raise PathError("The path contains a NUL byte, which no file name can hold.")
    if _PERCENT.search(text) or unquote(text) != text:
        raise PathError(f"The path {text!r} looks URL-encoded; type it plainly (no %xx escapes).")
    if text.startswith("~"):
        raise PathError(f"The path {text!r} starts with '~'; type it inside one of the allowed folders instead.")
    parts = set(PurePosixPath(text).parts) | set(PureWindowsPath(text).parts)
    if ".." in parts:
        raise PathError(f"The path {text!r} contains '..'; paths must stay inside the allowed folders.")
    return text


def confine(text: str, roots: Sequence[os.PathLike | str], *, must_exist: bool = True) -> Path:
    """The resolved Path for ``text`` if it lies inside one of ``roots``; otherwise PathError.

    Symlinks are followed before the check, so a link inside a root that points outside is rejected.
    """
    text = _check_text(text)
    allowed = [Path(r).resolve() for r in roots]
    if not allowed:
        raise PathError("No folders are allowed, so no path can be opened.")
    typed = Path(text)
    names = ", ".join(str(r) for r in allowed)
    if typed.is_absolute():
        candidates = [typed]
    else:
        candidates = [root / typed for root in allowed] + [Path.cwd() / typed]
    for cand in candidates:
        if must_exist and not os.path.lexists(cand):
            continue
        try:
            resolved = cand.resolve()
        except (RuntimeError, OSError):  # a symbolic link loop (RuntimeError before Python 3.13, OSError after)
            raise PathError(f"The path {text!r} is a loop of symbolic links, which leads nowhere.") from None
        if any(resolved == r or r in resolved.parents for r in allowed):
            if must_exist and not resolved.exists():
                raise PathError(f"The path {text!r} is a broken link inside the allowed folders.")
            return resolved
        lexical = Path(os.path.abspath(cand))
        if any(lexical == r or r in lexical.parents for r in allowed):
            raise PathError(f"The path {text!r} is a link that leads outside the allowed folders ({names}).")
    if typed.is_absolute():
        raise PathError(f"The path {text!r} is outside the allowed folders ({names}).")
    raise PathError(f"The path {text!r} does not exist inside the allowed folders ({names}).")


# ---- what a stranger may read: no absolute path of this machine, no traceback ------------------------
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()\[\]{}<>|*]+")


def redact(text: str, roots: dict | None = None) -> str:
    """``text`` with the machine's absolute paths taken out, for a reply to a stranger.

    roots: {folder: label}; a path inside a folder becomes ``label/relative/part`` (the runs folder as
    ``runs/...``). Any other absolute path becomes ``.../<its last component>``. Tracebacks are dropped
    (see strip_tracebacks); the exception's own last line stays."""
    text = strip_tracebacks(str(text))
    known = sorted(((str(Path(k)), str(v)) for k, v in (roots or {}).items()), key=lambda kv: -len(kv[0]))

    def one(match: re.Match) -> str:
        path = match.group(0)
        trail = ""
        while path and path[-1] in ".:":  # a sentence's full stop or colon is not part of the path
            path, trail = path[:-1], path[-1] + trail
        for root, label in known:
            if path == root:
                return label + trail
            if path.startswith(root.rstrip("/") + "/"):
                return f"{label}/{path[len(root.rstrip('/')) + 1:]}" + trail
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return (f".../{name}" if name else "/") + trail

    return _ABSOLUTE.sub(one, text)


def strip_tracebacks(text: str) -> str:
    """``text`` without Python traceback blocks: the "Traceback (most recent call last):" header and its
    indented frame lines go, and so do the chaining notes; the exception line itself stays."""
    out, inside = [], False
    for line in str(text).splitlines(keepends=True):
        bare = line.strip()
        if bare.startswith("Traceback (most recent call last)"):
            inside = True
            continue
        if bare.startswith(("During handling of the above exception", "The above exception was the direct cause")):
            continue
        if inside and (line.startswith((" ", "\t")) or not bare or bare.startswith("^")):
            continue
        inside = False
        out.append(line)
    return "".join(out)
