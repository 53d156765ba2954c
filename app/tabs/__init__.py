"""One module per tab; each exposes `build(ctx) -> None`, called inside a `gr.Tab` by app/main.py."""

from __future__ import annotations

import importlib


def build(name: str, ctx) -> None:
    """Build tab `name` (app/tabs/<name>.py); a tab whose module is not there yet says so instead."""
    import gradio as gr

    try:
        module = importlib.import_module(f"app.tabs.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"app.tabs.{name}":
            raise
        gr.Markdown(f"The {name} tab is not available in this version.")
        return
    module.build(ctx)
