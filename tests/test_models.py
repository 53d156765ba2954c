"""Tiny offline presets: image tokens, save/reload, generation, LoRA on the language model only."""

import socket
from pathlib import Path

import pytest
import torch

from hanorec.config import LoraConfig
from hanorec.data import make_splits
from hanorec.models import (
    TINY_PRESETS,
    ModelError,
    add_lora,
    build_tiny,
    family_of,
    load_model,
    vision_parameter_names,
)
from hanorec.scoring import forward_logits, generate
from hanorec.tasks import IMAGE_PLACEHOLDER, TASK_SHAPES, build_examples, corpus_text, render

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
PRESETS = TINY_PRESETS  # every family
TOKENS_PER_IMAGE = 16  # every preset at its default size (see each adapter's build_tiny_model)


@pytest.fixture(scope="module")
def examples(ds):
    out = {}
    for task in ("hit3", "hit1"):
        s = TASK_SHAPES[task]
        sp = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
        out[task] = build_examples(task, sp.test[:3], ds, seed=0)
    return out


@pytest.fixture(scope="module", params=PRESETS)
def bundle(request, ds):
    b = build_tiny(request.param, corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    b.model.eval()
    return b


def encode(bundle, ds, ex):
    r = render(ex, ds)
    return bundle.encode_prompt(r.text, r.images)


def test_build_tiny_architecture(bundle):
    from hanorec.backbones import for_preset

    assert bundle.family == for_preset(bundle.name).family
    assert bundle.base_model().config.model_type in bundle.adapter.model_types
    assert sum(p.numel() for p in bundle.model.parameters()) < 1_000_000  # tiny: under a million parameters
    assert bundle.model.config.text_config.hidden_size == 64
    assert len(bundle.tokenizer) <= 400 + 20
    assert bundle.image_token_id != bundle.tokenizer.unk_token_id
    assert bundle.eos_token_id is not None and bundle.pad_token_id is not None
    assert vision_parameter_names(bundle.model), "the model must have a vision tower"
    names = {n.rsplit(".", 1)[-1] for n, _ in bundle.model.named_modules()}
    assert set(bundle.adapter.vision_modules) <= names and bundle.adapter.language_model in names


def test_build_tiny_is_deterministic_for_a_seed(ds):
    texts = corpus_text(ds)
    a = build_tiny("tiny-llava", texts, hidden_size=64, vocab_size=400, seed=3)
    b = build_tiny("tiny-llava", texts, hidden_size=64, vocab_size=400, seed=3)
    c = build_tiny("tiny-llava", texts, hidden_size=64, vocab_size=400, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def test_unknown_tiny_preset(ds):
    with pytest.raises(ModelError, match="tiny-gpt"):
        build_tiny("tiny-gpt", ["a"])


@pytest.mark.parametrize("task, n_images", [("hit3", 3), ("hit1", 5)])
def test_encode_prompt_image_token_count(bundle, ds, examples, task, n_images):
    ex = examples[task][0]
    p = encode(bundle, ds, ex)
    n_image_tokens = sum(1 for t in p.input_ids if t == bundle.image_token_id)
    assert p.n_images == n_images
    assert n_image_tokens == n_images * TOKENS_PER_IMAGE
    if bundle.adapter.mrope:  # a patch grid per image
        merge = bundle.image_processor.merge_size
        assert p.image_grid_thw.shape == (n_images, 3)
        assert int(p.image_grid_thw.prod(dim=1).sum()) // merge**2 == n_image_tokens
        assert p.pixel_values.shape[0] == int(p.image_grid_thw.prod(dim=1).sum())
    else:
        assert p.pixel_values.shape[:2] == (n_images, 3)
    # the visual tokens sit in contiguous runs, one run per image
    runs, prev = 0, False
    for t in p.input_ids:
        cur = t == bundle.image_token_id
        runs += cur and not prev
        prev = cur
    assert runs == n_images
    # the rest of the prompt is the text
    text = bundle.tokenizer.decode([t for t in p.input_ids if t != bundle.image_token_id])
    assert ds.items[ex.history[0]].title in text


def test_encode_prompt_checks_the_image_count(bundle, ds, examples):
    ex = examples["hit3"][0]
    r = render(ex, ds)
    with pytest.raises(ValueError, match="3 <image> placeholders but 2 images"):
        bundle.encode_prompt(r.text, r.images[:2])
    p = bundle.encode_prompt("no images here", [])
    assert p.n_images == 0 and p.pixel_values is None
    assert IMAGE_PLACEHOLDER not in bundle.tokenizer.decode(p.input_ids)


def test_collate_labels_only_on_the_completion(bundle, ds, examples):
    exs = examples["hit3"][:2]
    prompts = [encode(bundle, ds, e) for e in exs]
    comps = [bundle.encode_completion(e.answer) for e in exs]
    batch = bundle.collate(prompts, comps)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == c and c[-1] == bundle.eos_token_id
        assert int(batch["attention_mask"][i].sum()) == len(p.input_ids) + len(c)
    assert bundle.tokenizer.decode(comps[0][:-1]) == exs[0].answer


def test_save_and_reload_identical(bundle, ds, examples, tmp_path):
    exs = examples["hit3"][:1] + examples["hit1"][:1]
    prompts = [encode(bundle, ds, e) for e in exs]
    comps = [bundle.encode_completion(e.answer) for e in exs]
    batch = bundle.collate(prompts, comps)
    with torch.no_grad():
        before = forward_logits(bundle.model, batch)

    bundle.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    loaded.model.eval()
    assert loaded.family == bundle.family and loaded.name == bundle.name
    assert loaded.image_size == bundle.image_size
    assert loaded.image_token_id == bundle.image_token_id
    assert loaded.eos_token_id == bundle.eos_token_id and loaded.pad_token_id == bundle.pad_token_id
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    for e, p in zip(exs, prompts):
        q = encode(loaded, ds, e)
        assert q.input_ids == p.input_ids
        torch.testing.assert_close(q.pixel_values, p.pixel_values)
        assert loaded.encode_completion(e.answer) == bundle.encode_completion(e.answer)
    with torch.no_grad():
        after = forward_logits(loaded.model, loaded.collate(prompts, comps))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    # generation works after reload and is the same greedy decode
    out_loaded = generate(loaded, prompts[1], max_new_tokens=4)
    assert isinstance(out_loaded, str)
    assert out_loaded == generate(bundle, prompts[1], max_new_tokens=4)


def lora_cfg(**kw):
    return LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **kw})


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_only_in_the_language_model(ds, preset):
    """Two AdamW steps move every LoRA weight and leave every vision weight as it was."""
    b = build_tiny(preset, corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    add_lora(b, lora_cfg())
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert trainable
    vision_names = set(vision_parameter_names(b.model))
    for n in trainable:
        assert "lora_" in n and f".{b.adapter.language_model}." in n, n
        assert not any(f".{v}." in n for v in b.adapter.vision_modules), n
        assert n.replace(".lora_A.default", "").replace(".lora_B.default", "") not in vision_names, n
    # every target module name of the language model got an adapter, in each of the 2 layers
    for name in lora_cfg().target_modules:
        assert sum(f".{name}.lora_A" in n for n in trainable) == 2, name
    vision = {n: p.detach().clone() for n, p in b.model.named_parameters() if n in vision_names}
    assert vision
    lora_before = {n: p.detach().clone() for n, p in b.model.named_parameters() if p.requires_grad}

    b.model.train()
    item = sorted(ds.items)[0]
    prompt = b.encode_prompt(f'{IMAGE_PLACEHOLDER} "{ds.items[item].title}"', [ds.load_image(item)])
    batch = b.collate([prompt], [b.encode_completion('"x"')])
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at zero: A gets a gradient from the second step on
        b.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(b.model.named_parameters())
    for n, v in vision.items():
        torch.testing.assert_close(params[n].detach(), v, rtol=0, atol=0)
    for n, v in lora_before.items():
        assert not torch.equal(params[n].detach(), v), f"{n} did not change"


def test_modules_to_save_stay_in_the_language_model(ds):
    b = build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    add_lora(b, lora_cfg(modules_to_save=["embed_tokens", "lm_head"]))
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("visual" in n or "vision_tower" in n for n in trainable)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_load_model_unknown_name_is_a_clear_error(no_network):
    with pytest.raises(ModelError) as info:
        load_model("no-such-org/no-such-model-hanorec-test")
    msg = str(info.value)
    assert "no-such-org/no-such-model-hanorec-test" in msg
    assert "not a local folder" in msg and "cache" in msg
    assert "\n" not in msg


def test_load_model_folder_without_config(tmp_path, no_network):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tmp_path / "empty")


def test_load_model_tiny_preset_name_explains(no_network):
    with pytest.raises(ModelError, match="build_tiny"):
        load_model("tiny-llava")


def test_unsupported_family():
    assert family_of("llava") == "llava"
    with pytest.raises(ModelError, match="'gpt2'"):
        family_of("gpt2")


def test_real_checkpoints_use_the_processor_resizing_under_a_pixel_cap(ds, tmp_path):
    """A checkpoint folder that is not a saved tiny preset keeps its processor's own resizing (no fixed
    square), capped at model.max_pixels: a 128x128 poster becomes at most max_pixels pixels of patches,
    aspect ratio kept; a saved tiny preset keeps its fixed image size."""
    from PIL import Image

    from hanorec.models import META_FILE, cap_image_pixels, load_model

    tiny = build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    tiny.save(tmp_path / "saved")
    assert load_model(tmp_path / "saved").image_size == 64
    (tmp_path / "saved" / META_FILE).unlink()  # now it looks like any checkpoint folder
    real = load_model(tmp_path / "saved", max_pixels=32 * 32)
    assert real.image_size is None and real.image_processor.size.longest_edge == 32 * 32
    wide = Image.new("RGB", (256, 128), "red")
    p = real.encode_prompt(f"{IMAGE_PLACEHOLDER} a title", [wide])
    t, h, w = p.image_grid_thw[0].tolist()
    patch = real.image_processor.patch_size
    assert h * w * patch * patch <= 32 * 32 and w > h  # capped, aspect ratio kept
    uncapped = load_model(tmp_path / "saved", max_pixels=256 * 128)
    _, h2, w2 = uncapped.encode_prompt(f"{IMAGE_PLACEHOLDER} a title", [wide]).image_grid_thw[0].tolist()
    assert h2 * w2 > h * w
    clip = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    assert cap_image_pixels(clip.image_processor, 1024) is False  # CLIP resizes to one fixed size anyway
