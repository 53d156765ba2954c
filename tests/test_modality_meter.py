"""The modality meter (eval.image_ablation): every model evaluated again with its history images blanked (the
token count unchanged), and the per-user paired drop against the same model with its images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hanorec.data import make_splits
from hanorec.eval import encode_example_prompt, evaluate, train_popularity
from hanorec.models import build_tiny
from hanorec.report import (
    IMAGE_ABLATION,
    comparison_tables,
    image_ablation_section,
    image_drops,
    image_use,
    image_use_table,
)
from hanorec.stats import paired_bootstrap
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, render


@pytest.fixture(scope="module")
def llava(ds):
    b = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, seed=0)
    b.model.float().eval()
    return b


@pytest.fixture(scope="module")
def examples(ds):
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples("hit3", splits.test, ds, seed=0, max_examples=6), train_popularity(splits.train)


def test_a_blanked_prompt_keeps_every_token_and_shows_a_flat_grey(ds, llava, examples):
    r = render(examples[0][0], ds)
    plain = encode_example_prompt(llava, r.text, r.images)
    dark = encode_example_prompt(llava, r.text, r.images, blank_images=True)
    assert dark.input_ids == plain.input_ids and dark.n_images == plain.n_images == len(r.images) > 0
    assert dark.pixel_values.shape == plain.pixel_values.shape and not dark.pixel_values.any()
    assert plain.pixel_values.abs().sum() > 0
    # what the model receives is the image processor's mean colour everywhere: a flat grey
    mean = tuple(round(255 * m) for m in llava.image_processor.image_mean)
    for image in llava.processed_images(dark):
        assert set(image.getdata()) == {mean}


def test_evaluate_with_the_images_blanked_changes_the_model_not_the_baselines(ds, llava, examples):
    exs, pop = examples
    kw = dict(protocols=("ranking", "catalogue"), popularity=pop, catalogue_items=12, catalogue_chunk=8)
    plain = evaluate(llava, ds, exs, **kw)
    dark = evaluate(llava, ds, exs, blank_images=True, **kw)
    for name in ("random", "popularity"):
        assert dark.per_example[name] == plain.per_example[name]
        assert dark.ranking_per_example[name] == plain.ranking_per_example[name]
    assert not np.allclose(dark.option_scores, plain.option_scores)  # the model reads its images
    assert not np.allclose(dark.catalogue_scores[0], plain.catalogue_scores[0])
    assert [r["n"] for r in dark.rows] == [r["n"] for r in plain.rows]


def _entry(method, seed, users, values, protocol="catalogue"):
    return {"task": "hit3", "seed": seed, "method": method, "protocol": protocol,
            "values": {"user": users, "HR@3": values, "NDCG@3": values, "MRR": values}}  # fmt: skip


def _meter_result():
    rng = np.random.default_rng(0)
    users = [f"u{k}" for k in range(40)]
    plain, dark = [], []
    for seed in (0, 1):
        for m in ("random", "popularity"):
            v = rng.integers(0, 2, 40).astype(float).tolist()
            plain.append(_entry(m, seed, users, v))
            dark.append(_entry(m, seed, users, v))  # the baselines read no images
        sft = rng.integers(0, 2, 40).astype(float)
        plain.append(_entry("SFT", seed, users, sft.tolist()))
        dark.append(_entry("SFT", seed, users, sft.tolist()))  # SFT ignores its images
        dpo = np.ones(40)
        plain.append(_entry("DPO", seed, users, dpo.tolist()))
        dark.append(_entry("DPO", seed, users, (rng.random(40) < 0.3).astype(float).tolist()))  # DPO needs them
    return plain, dark


def test_the_drop_is_the_paired_bootstrap_of_with_minus_without():
    plain, dark = _meter_result()
    drops = {d["method"]: d for d in image_drops(plain, dark)}
    assert list(drops) == ["random", "popularity", "SFT", "DPO"]
    a = [v for e in plain if e["method"] == "DPO" for v in e["values"]["HR@3"]]
    b = [v for e in dark if e["method"] == "DPO" for v in e["values"]["HR@3"]]
    users = [u for e in plain if e["method"] == "DPO" for u in e["values"]["user"]]
    assert drops["DPO"]["hit3 HR@3"] == paired_bootstrap(a, b, users).to_dict()
    assert drops["DPO"]["hit3 HR@3"]["low"] > 0.5
    assert drops["random"]["hit3 HR@3"]["mean"] == drops["SFT"]["hit3 HR@3"]["mean"] == 0.0
    assert drops["DPO"]["hit3 HR@3"]["detectable"] > 0


def test_the_uses_the_images_panel_reads_the_drop_per_method_beside_sft_and_random():
    plain, dark = _meter_result()
    result = {"per_example": plain, "paired_protocol": "catalogue", "seeds": [0, 1],
              IMAGE_ABLATION: image_ablation_section(plain, dark, ["catalogue", "ranking"])}  # fmt: skip
    assert list(result[IMAGE_ABLATION]["drop"]) == ["catalogue"]  # no ranking values were kept
    rows = image_use(result)
    assert [r["method"] for r in rows] == ["random", "SFT", "DPO"]  # popularity, imageless too, is left out
    dpo = rows[2]
    assert dpo["with images"] == 1.0 and dpo["blanked"] == pytest.approx(1.0 - dpo["drop"])
    assert "uses the images" in dpo["reading"] and "by construction" in rows[0]["reading"]
    assert "does not measurably use the images" in rows[1]["reading"]
    table = image_use_table(result, "hit3 NDCG@3")
    assert "| DPO | 1.0000 |" in table and "hit3 NDCG@3 with images" in table and "Catalogue protocol" in table
    json.loads(json.dumps(result))  # what comparison.json keeps is plain JSON


def test_a_comparison_without_the_meter_still_reads():
    plain, _ = _meter_result()
    old = {"per_example": plain, "summary": [], "seeds": [0, 1], "rows": []}
    assert image_use(old) == [] and image_use_table(old) == ""
    damaged = {**old, IMAGE_ABLATION: {"drop": {"catalogue": [{"method": "DPO", "hit3 HR@3": {"mean": None}}]}}}
    rows = image_use(damaged)
    assert "could not be computed" in rows[0]["reading"] and "| DPO |" in image_use_table(damaged)
    assert "Uses the images?" not in comparison_tables(old)


def test_the_meter_is_off_by_default_and_a_config_switch():
    from hanorec.config import load_config

    assert load_config().eval.image_ablation is False
    assert load_config(overrides=["--eval.image_ablation=true"]).eval.image_ablation is True


def test_a_compare_form_may_switch_the_meter_on_and_nothing_else_like_it():
    from hanorec.jobs import JobError, checked_overrides

    assert checked_overrides("--eval.image_ablation=True") == {"eval": {"image_ablation": "true"}}
    with pytest.raises(JobError, match="eval.image_ablation = 'yes please' must be true or false"):
        checked_overrides(["--eval.image_ablation=yes please"])
    with pytest.raises(JobError, match="eval.split cannot be set here"):
        checked_overrides("--eval.split=val")


def test_the_compare_tab_shows_the_panel_and_says_how_to_get_it(tmp_path):
    import types

    from app.tabs import compare as tab

    plain, dark = _meter_result()
    old = {"per_example": plain, "summary": [], "seeds": [0, 1], "rows": [], "paired_protocol": "catalogue"}
    new = {**old, IMAGE_ABLATION: image_ablation_section(plain, dark, ["catalogue"])}
    for name, result in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "comparison.json").write_text(json.dumps(result))
    cache = types.SimpleNamespace(get=lambda key, make: make())
    ctx = types.SimpleNamespace(runs_dir=tmp_path, _extra=cache, resolve_path=lambda p: tmp_path / p)
    assert "--eval.image_ablation=true" in tab.show_images(ctx, "old", "hit3 HR@3")
    panel = tab.show_images(ctx, "new", "hit3 MRR")
    assert "hit3 MRR with images" in panel and "- DPO uses the images" in panel and "| random |" in panel
    assert tab.show_images(ctx, "", None) == ""


def test_merged_comparisons_keep_the_meter_when_every_part_ran_it():
    from hanorec.report import merge_comparisons

    plain, dark = _meter_result()

    def part(seed, meter=True):
        pe = [e for e in plain if e["seed"] == seed]
        out = {"rows": [], "per_example": pe, "seeds": [seed], "paired_protocol": "catalogue", "protocol": "catalogue"}
        if meter:
            out[IMAGE_ABLATION] = image_ablation_section(pe, [e for e in dark if e["seed"] == seed], ["catalogue"])
        return out

    merged = merge_comparisons([part(0), part(1)], n_boot=2000)
    assert merged[IMAGE_ABLATION]["drop"] == image_ablation_section(plain, dark, ["catalogue"])["drop"]
    assert IMAGE_ABLATION not in merge_comparisons([part(0), part(1, meter=False)], n_boot=200)
