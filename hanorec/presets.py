"""The lesson preset (configs/lab.yaml): one source of truth for the explorer's form defaults.

The Train tab opens on it and launches tiny-backbone runs from it, and the Compare tab starts its
comparisons from it, so "SFT max steps 30" means the same learning rate and batch in both. Everything reads
it through :func:`lab_config`; :func:`form_defaults` is what the forms show (every field its value).
"""

from __future__ import annotations

from pathlib import Path

LAB_PRESET = Path(__file__).resolve().parents[1] / "configs" / "lab.yaml"


def lab_path() -> Path:
    """The lesson preset's file (configs/lab.yaml beside the package), or one sentence when it is missing."""
    from hanorec.config import ConfigError

    if not LAB_PRESET.is_file():
        raise ConfigError(f"the lesson preset {LAB_PRESET} is missing; restore configs/lab.yaml from the repository")
    return LAB_PRESET


def lab_config(overrides: dict | None = None):
    """The RunConfig of the lesson preset, with ``overrides`` (a nested dict) on top."""
    from hanorec.config import load_config

    return load_config(lab_path(), overrides or {})


def form_defaults(cfg=None) -> dict:
    """The values the forms show, from the preset (or the given RunConfig): per stage the learning rate,
    steps and batch, and the preference knobs."""
    cfg = cfg or lab_config()
    p = cfg.pref
    return {
        "seed": cfg.seed,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "sft_lr": cfg.sft.lr,
        "pref_lr": p.lr,
        "sft_max_steps": cfg.sft.max_steps,
        "pref_max_steps": p.max_steps,
        "sft_batch": cfg.sft.batch_size * cfg.sft.grad_accum,
        "pref_batch": p.batch_size * p.grad_accum,
        "epochs": cfg.sft.epochs,
        "eval_examples": cfg.task.max_eval_examples,
        "beta": p.beta,
        "noise_sigma": p.noise_sigma,
        "noise_target": p.noise_target,
        "k_negatives": max(p.k_negatives, 1),
        "negative_sampling": p.negative_sampling,
        "hardness_k": p.hardness_k,
        "hars_temperature": getattr(p, "hars_temperature", 1.0),
        "catalogue_items": cfg.eval.catalogue_items,
        "sft_run": p.sft_run,
    }
