"""One module per tab; each exposes `build(ctx) -> None`, called inside a `gr.Tab` by app/main.py."""

from __future__ import annotations

import importlib


def build(name: str, ctx) -> None:
    """Build tab `name` (app/tabs/<name>.py)."""
    importlib.import_module(f"app.tabs.{name}").build(ctx)
