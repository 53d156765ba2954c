"""What the model sees (issue 6 item 5): post-template text with image tokens expanded, token counts,
the images as the model's own processing resizes them, and a user's history by id."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hanorec.data import DataError, make_splits
from hanorec.models import TINY_PRESETS, build_tiny
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text

PRESETS = TINY_PRESETS  # every family


@pytest.fixture(scope="module")
def bundles(ds):
    return {p: build_tiny(p, corpus_text(ds), hidden_size=64, seed=0) for p in PRESETS}


@pytest.fixture(scope="module")
def example(ds):
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    return build_examples("hit3", splits.test, ds, seed=0, max_examples=1)[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_model_view_text_is_the_tokenized_prompt(bundles, ds, example, preset):
    b = bundles[preset]
    view = b.view_example(example, ds)
    enc = b.encode_prompt(example.prompt, [ds.load_image(i, size=b.image_size) for i in example.image_items])
    assert view.input_ids == enc.input_ids and view.n_tokens == len(enc.input_ids)
    assert b.tokenizer(view.text, add_special_tokens=False)["input_ids"] == view.input_ids  # round trip
    # 3 history images, 16 visual tokens each at the tiny presets' resolution (see build_tiny)
    assert view.image_tokens == [16, 16, 16] and view.n_image_tokens == 48
    assert view.input_ids.count(b.image_token_id) == 48
    split = b.adapter.split  # the one token per image in the chat text (the image token itself, or its start)
    assert view.text.count(view.image_token) == 48 and view.chat_text.count(split) == 3
    assert view.chat_text.startswith("<|user|>\n") and view.chat_text.endswith("<|assistant|>\n")
    one = b.tokenizer.decode(b.image_ids(16)).replace(view.image_token * 16, f"{view.image_token}x16")
    assert view.collapsed_text() == view.chat_text.replace(split, one)


SIZES = {"tiny-qwen2.5-vl": 64, "tiny-llava": 32, "tiny-qwen3-vl": 64, "tiny-gemma3": 32, "tiny-smolvlm": 64}


@pytest.mark.parametrize("preset", PRESETS)
def test_model_view_images_at_the_processed_resolution(bundles, ds, example, preset):
    """Rebuilt from the model's pixel values: the Qwen families keep the 64x64 grid (8x8 patches), SmolVLM
    its 64x64 tile, LLaVA's CLIP and Gemma 3's SigLIP processors give 32x32. Processing a rebuilt image
    again gives the same pixel values (up to uint8 rounding), so the picture is exactly what the vision
    tower reads."""
    b = bundles[preset]
    size = (SIZES[preset], SIZES[preset])
    view = b.view_example(example, ds)
    assert view.image_sizes == [size] * 3
    enc = b.encode_prompt("<image>", [ds.load_image(example.image_items[0], size=b.image_size)])
    as_is = dataclasses.replace(b, image_size=None)  # the processor alone, no square resize first
    again = as_is.encode_prompt("<image>", [view.images[0]]).pixel_values
    assert again.shape == enc.pixel_values.shape
    assert torch.allclose(enc.pixel_values, again, atol=0.02)  # one uint8 step is 1/255/0.27 = 0.015
    if size == (64, 64):  # same size: no resampling, so the rebuilt image equals the input
        original = np.asarray(ds.load_image(example.image_items[0], size=64), dtype=np.int16)
        assert np.abs(np.asarray(view.images[0], dtype=np.int16) - original).max() <= 1


def test_model_view_without_images_and_bad_count(bundles):
    b = bundles["tiny-llava"]
    view = b.model_view("Just text", [])
    assert view.images == [] and view.n_image_tokens == 0 and view.text == view.chat_text
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        b.model_view("one <image>", [])


def test_history_by_user_id(ds, example):
    items = ds.history(example.user)
    assert [it.item_id for it in items] == ds.sequences[example.user]
    assert items[0].title == ds.items[items[0].item_id].title
    assert set(example.history) <= {it.item_id for it in items}
    with pytest.raises(DataError, match="User id 'nobody' is not in dataset"):
        ds.history("nobody")
