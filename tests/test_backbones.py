"""Backbone adapters: one class per family in hanorec/backbones, found by family, preset and checkpoint type;
no other module of the package or the app names a family; every family's preset trains, stops and resumes
bit for bit; `python -m hanorec models` lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hanorec import backbones
from hanorec.cli import main
from hanorec.models import (
    FAMILIES,
    TINY_PRESETS,
    ModelError,
    build_tiny,
    family_of,
    list_models,
)

REPO = Path(__file__).resolve().parents[1]
# Words that name a model family (or its vision parts); only hanorec/backbones may use them, apart from the
# tiny preset names.
FAMILY_WORDS = re.compile(r"(?i:qwen|llava|gemma|smolvlm|idefics|siglip)|CLIP")


def test_registry_has_one_adapter_per_family_and_preset():
    adapters = backbones.all_backbones()
    assert [a.family for a in adapters] == list(FAMILIES) and len(set(FAMILIES)) == len(FAMILIES)
    assert [a.preset for a in adapters] == list(TINY_PRESETS)
    assert TINY_PRESETS[:2] == ("tiny-qwen2.5-vl", "tiny-llava")  # the paper's family first
    assert {"tiny-qwen3-vl", "tiny-gemma3", "tiny-smolvlm"} <= set(TINY_PRESETS)
    for a in adapters:
        assert backbones.for_preset(a.preset) is a and backbones.backbone(a.family) is a
        for t in a.model_types:
            assert family_of(t) == a.family
        assert a.vision_modules and a.language_model and a.checkpoints
        assert (REPO / a.gpu_config).is_file(), a.gpu_config
        # the adapter lives in its own module of hanorec/backbones
        assert type(a).__module__.startswith("hanorec.backbones.") and type(a).__module__ != "hanorec.backbones.base"
    assert len({type(a).__module__ for a in adapters}) == len(adapters)
    with pytest.raises(ModelError, match="'gpt2'"):
        family_of("gpt2")
    with pytest.raises(ModelError, match="tiny-gpt"):
        backbones.for_preset("tiny-gpt")


def test_no_module_outside_the_adapters_names_a_family():
    """Scoring, hardness, sharding, training and the app talk to the bundle; family names (other than the
    tiny preset names) appear only in hanorec/backbones."""
    presets = re.compile("|".join(re.escape(p) for p in TINY_PRESETS))
    found = []
    for folder in ("hanorec", "app"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "backbones" in path.relative_to(REPO).parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                if FAMILY_WORDS.search(presets.sub("", line)):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "family names outside hanorec/backbones:\n" + "\n".join(found)


def test_models_command_lists_presets_and_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for row in list_models():
        assert row["preset"] in out and row["label"] in out and row["gpu_config"] in out
        assert all(t in out for t in row["model_types"])
    assert main(["models", "--all"]) == 2  # takes no options
    assert "models takes no options" in capsys.readouterr().err


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_is_under_a_million_parameters_and_offline(ds, preset, monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    from hanorec.tasks import corpus_text

    b = build_tiny(preset, corpus_text(ds), seed=0)  # the default size, as a run builds it
    assert sum(p.numel() for p in b.model.parameters()) < 1_000_000
    assert b.adapter is backbones.for_preset(preset)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_checkpoint_folder_of_every_family_loads_through_the_same_path(ds, preset, tmp_path, monkeypatch):
    """A saved preset without hanorec's own metadata is any checkpoint folder: the family comes from its
    config, images get the processor's own resizing (non-square ones too), nothing is downloaded, and the
    shared-prefix path agrees with the naive one on the loaded model."""
    import socket

    from PIL import Image

    from hanorec.models import META_FILE, load_model
    from hanorec.scoring import naive_logps, shared_prefix_logps
    from hanorec.tasks import corpus_text

    def refuse(*a, **k):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    build_tiny(preset, corpus_text(ds), hidden_size=64, seed=0).save(tmp_path / "m")
    (tmp_path / "m" / META_FILE).unlink()
    b = load_model(tmp_path / "m", dtype="float32", max_pixels=32 * 32)
    assert b.family == backbones.for_preset(preset).family and b.image_size is None
    b.model.eval()
    prompt = b.encode_prompt("<image> wide, <image> tall", [Image.new("RGB", (256, 128), "red"),
                                                            Image.new("RGB", (100, 300), "blue")])  # fmt: skip
    assert prompt.n_images == 2 and prompt.input_ids.count(b.image_token_id) > 0
    comps = [[b.encode_completion("a title"), b.encode_completion("another")]]
    with torch.no_grad():
        naive, _ = naive_logps(b.model, b, [prompt], comps)
        shared, _ = shared_prefix_logps(b.model, b, [prompt], comps)
    assert torch.allclose(naive[0], shared[0], atol=1e-4) and bool((naive[0] < 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_stop_and_resume_is_bit_exact_for_every_family(tmp_path, ds, preset):
    """Two HaNo-DPO steps (NoDO on, LoRA dropout on, shared-prefix scoring with the vision part run once) in
    one go, and the same run stopped after step 1 and resumed from its checkpoint: the same adapter weights
    bit for bit and the same last loss."""
    from hanorec.config import load_config
    from hanorec.data import make_splits
    from hanorec.models import add_lora
    from hanorec.pairs import build_pairs
    from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
    from hanorec.train.preference import PrefItem, train_preference

    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    examples = build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=6)
    items = [PrefItem(p) for p in build_pairs(examples, ds, seed=0)]

    def run(out: Path, *, stop_after=None, resume=False):
        cfg = load_config(overrides={
            "seed": 0, "output_dir": str(out),
            "model": {"name": preset, "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
            "pref": {"method": "hano_dpo", "max_steps": 2, "batch_size": 3, "grad_accum": 1, "log_every": 1,
                     "progress_bar": False, "scoring": "shared_prefix", "noise_target": "lora", "noise_sigma": 0.1},
        })  # fmt: skip
        bundle = build_tiny(preset, corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
        add_lora(bundle, cfg.lora)
        steps = iter(range(1, 3))
        stop = (lambda: next(steps) >= stop_after) if stop_after else None
        result = train_preference(cfg, bundle, ds, items, out, resume=resume, should_stop=stop)
        weights = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
        return result, weights

    whole, w_whole = run(tmp_path / "whole")
    first, _ = run(tmp_path / "resumed", stop_after=1)
    assert first.global_step == 1
    again, w_again = run(tmp_path / "resumed", resume=True)
    assert again.global_step == 2 and [h["step"] for h in again.history] == [2]
    assert w_whole.keys() == w_again.keys() and w_whole
    assert all(torch.equal(w_whole[n], w_again[n]) for n in w_whole)
    assert again.history[-1]["loss"] == whole.history[-1]["loss"]
