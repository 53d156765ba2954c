"""Backbone adapters: one module per model family, found here by family, preset or checkpoint config.

Every module of this package other than ``base`` defines one :class:`~hanorec.backbones.base.Backbone`
subclass; defining it registers it. Adding a family is one file here (and one test).
"""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, object] = {}


def register(adapter) -> None:
    if adapter.family in _REGISTRY:
        raise ValueError(f"two backbone adapters for family {adapter.family!r}")
    _REGISTRY[adapter.family] = adapter


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


from hanorec.backbones.base import Backbone, BackboneError, ModelError  # noqa: E402

_load_all()


def all_backbones() -> list[Backbone]:
    """Every adapter, the paper's family first."""
    return sorted(_REGISTRY.values(), key=lambda a: (a.order, a.family))


def families() -> tuple[str, ...]:
    return tuple(a.family for a in all_backbones())


def tiny_presets() -> tuple[str, ...]:
    return tuple(a.preset for a in all_backbones() if a.preset)


def backbone(family: str) -> Backbone:
    """The adapter of a family (as saved in hanorec_model.json, or a checkpoint's model type)."""
    if family in _REGISTRY:
        return _REGISTRY[family]
    for a in _REGISTRY.values():
        if family in a.model_types:
            return a
    raise ModelError(f"model family {family!r} is not supported; supported families: {list(families())}")


def for_preset(preset: str) -> Backbone:
    for a in _REGISTRY.values():
        if a.preset == preset:
            return a
    raise ModelError(f"unknown tiny preset {preset!r}; use one of {list(tiny_presets())}")


def for_model_type(model_type: str) -> Backbone:
    """The adapter that loads checkpoints whose config.model_type is ``model_type``."""
    for a in all_backbones():
        if model_type in a.model_types:
            return a
    supported = sorted({t for a in _REGISTRY.values() for t in a.model_types})
    raise ModelError(f"model type {model_type!r} is not supported yet; supported model types: {supported}")


def vision_module_names() -> tuple[str, ...]:
    """Every family's vision module names (last path component), for code that sees only the model."""
    return tuple(sorted({n for a in _REGISTRY.values() for n in a.vision_modules}))


def language_model_names() -> tuple[str, ...]:
    return tuple(sorted({a.language_model for a in _REGISTRY.values()}))


__all__ = [
    "Backbone",
    "BackboneError",
    "ModelError",
    "all_backbones",
    "backbone",
    "families",
    "for_model_type",
    "for_preset",
    "language_model_names",
    "register",
    "tiny_presets",
    "vision_module_names",
]
