"""The last gaps between the paper presets and the authors' code: the pixel cap a loaded checkpoint gets,
the baselines a preference command trains, their drawn SFT files, and ids without a title."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from hanorec.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_a_loaded_checkpoint_capped_at_load_can_be_uncapped(tmp_path):
    """load_model caps the processor at model.max_pixels; set_max_pixels(bundle, 0) (pref.hars_inputs=authors)
    must then give the processor's own default back, not leave the load-time cap."""
    from hanorec.models import build_tiny, load_model, set_max_pixels

    tiny = build_tiny("tiny-qwen2.5-vl", ["a few words of text"] * 4, hidden_size=64, image_size=64)
    tiny.image_size = None  # saved as a checkpoint whose processor picks the resolution
    tiny.save(tmp_path / "ckpt")
    bundle = load_model(tmp_path / "ckpt", dtype="float32", max_pixels=32 * 32)
    image = Image.new("RGB", (256, 256))

    def pixels():
        t, h, w = bundle.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        return h * w * 8 * 8

    assert pixels() <= 32 * 32
    assert set_max_pixels(bundle, 0)
    assert pixels() == 64 * 64  # the saved processor's own cap (max_pixels 64 x 64)
