"""The last gaps between the paper presets and the authors' code: the pixel cap a loaded checkpoint gets,
the baselines a preference command trains, their drawn SFT files, and ids without a title."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    bundle.save(tmp_path / "again")  # the processor's saved settings are its own, nothing of ours in them
    assert "hanorec" not in (tmp_path / "again" / "preprocessor_config.json").read_text()
    assert set_max_pixels(bundle, 0)
    assert pixels() == 64 * 64  # the saved processor's own cap (max_pixels 64 x 64)


PAPER = REPO / "configs" / "paper-qwen2.5-vl-3b-movielens.yaml"
DEMO = REPO / "assets" / "demo"


def test_a_baseline_named_on_the_command_line_gets_no_nodo_unless_asked():
    """`pref --config paper.yaml --pref.method=dpo` is the DPO row, not DPO with the preset's NoDO."""

    assert load_config(PAPER).pref.noise_target == "lora"  # HaNo-DPO, as the preset says
    for method in ("dpo", "sdpo", "ipo", "simpo"):
        assert load_config(PAPER, [f"--pref.method={method}"]).pref.noise_target == "none", method
    assert load_config(PAPER, ["--pref.method=dpo", "--pref.noise_target=lora"]).pref.noise_target == "lora"
    assert load_config(PAPER, ["--pref.method=hano_dpo"]).pref.noise_target == "lora"
    assert load_config(overrides={"pref": {"method": "dpo", "noise_target": "lora"}}).pref.noise_target == "lora"


def test_compare_on_a_paper_preset_trains_the_papers_rows_with_seed_42(monkeypatch, tmp_path):
    from hanorec import cli, methods, pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_comparison", lambda cfg, **k: seen.update(k, cfg=cfg))
    argv = ["compare", "--config", str(PAPER), f"--output_dir={tmp_path / 'cmp'}", "--model.name=tiny-qwen2.5-vl"]
    assert cli.main(argv) == 0
    assert seen["seeds"] == [42] and seen["tasks"] == ["hit3", "hit1"]
    assert seen["variants"] == list(methods.paper_variants()) == [
        "DPO", "S-DPO", "HaNo-DPO", "HaNo-DPO w/o HaRS", "HaNo-DPO w/o NoDO"
    ]  # fmt: skip
    assert cli.main([*argv, "--seeds=1,2"]) == 0 and seen["seeds"] == [1, 2]
    cfg = seen["cfg"]
    assert (cfg.pref.hars_inputs, cfg.pref.nodo_backward, cfg.pref.pair_seed) == ("authors", "clean", 2025)
    readme = (REPO / "README.md").read_text()
    assert "compare --config configs/paper-qwen2.5-vl-3b-movielens.yaml" in readme


def test_untitled_ids_render_as_the_authors_loader_does(tmp_path):
    from hanorec.data import DataError, load_dataset

    root = tmp_path / "ml"
    root.mkdir()
    (root / "train.tsv").write_text("1\t1 2 3 4 5 99\n")
    (root / "val.tsv").write_text("")
    (root / "test.tsv").write_text("")
    (root / "Movielens_titles.csv").write_text("item,title\n1,A\n2,B\n3,C\n4,D\n5,E\n")
    try:
        load_dataset(root, split_files=True)
        raise AssertionError("an untitled id must stop the default load")
    except DataError as e:
        assert "99" in str(e) and "train.tsv" in str(e)
    ds = load_dataset(root, split_files=True, untitled="unknown")
    assert ds.items["99"].title == "[unknown 99]" and ds.split_rows["train"][0].items[-1] == "99"
    assert ds.summary.untitled == 1 and "1 ids without a title shown as [unknown N]" in str(ds.summary)

    assert load_config(PAPER).data.untitled == "unknown"


def _authors_layout(tmp_path):
    from hanorec.data import load_dataset, write_split_files

    return write_split_files(load_dataset(DEMO), tmp_path / "movielens", name="Movielens")


def _write_their_files(folder, task: str, seed: int) -> dict:
    """Drawn SFT files of every split in file order, drawn with `seed` (unshuffled, as their loader writes them)."""
    from hanorec.authors_files import write_sft_files
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data
    from hanorec.tasks import build_examples

    over = [f"--data.path={folder}", f"--task.name={task}", "--task.max_item_id=null", "--data.prompts=ours"]
    data = prepare_data(load_config(PAPER, [*over, f"--seed={seed}"]))
    splits = {"train": data.splits.train, "val": data.splits.val, "test": data.splits.test}
    written = {
        split: build_examples(task, w, data.dataset, seed=seed + k, template_set="authors", outer_quotes=True,
                              negatives="id_range", domain="movies")
        for k, (split, w) in enumerate(splits.items())
    }  # fmt: skip
    write_sft_files(written, folder, task)
    return written


def test_the_authors_drawn_sft_files_give_each_rows_candidates_label_and_text(tmp_path):
    """data.prompts=authors reads <split>-mllm_sft_<hit>.json: their candidates, order and hit1 labels (here
    drawn with another seed than the run's, so a redraw would differ), their text verbatim."""
    import json

    from hanorec.config import load_config
    from hanorec.data import DataError
    from hanorec.pipeline import prepare_data

    folder = _authors_layout(tmp_path)
    for task in ("hit3", "hit1"):
        over = [f"--data.path={folder}", f"--task.name={task}", "--task.max_item_id=null"]
        written = _write_their_files(folder, task, seed=7)
        ours = prepare_data(load_config(PAPER, [*over, "--data.prompts=ours"]))
        read = prepare_data(load_config(PAPER, over))  # the preset: prompts=authors
        assert [e.candidates for e in read.test] == [e.candidates for e in written["test"]]
        assert [e.candidates for e in read.test] != [e.candidates for e in ours.test]
        assert [(e.prompt, e.answer, e.options, e.correct_option, e.label) for e in read.test] == [
            (e.prompt, e.answer, e.options, e.correct_option, e.label) for e in written["test"]
        ]
        assert sorted(e.candidates for e in read.train) == sorted(e.candidates for e in written["train"])
        sample = json.loads((folder / f"test-mllm_sft_{task[-1]}.json").read_text())[0]
        assert sample["messages"][0]["content"] == read.test[0].prompt
        if task == "hit1":
            assert {e.label for e in read.test} == {True, False}
    path = folder / "test-mllm_sft_1.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    with pytest.raises(DataError, match="test-mllm_sft_1.json holds"):
        prepare_data(load_config(PAPER, [f"--data.path={folder}", "--task.name=hit1", "--task.max_item_id=null"]))


@pytest.mark.slow
def test_compare_on_a_paper_preset_runs_the_papers_table_end_to_end_shortened(tmp_path):
    """`compare --config paper.yaml` on the demo in the authors' layout, their drawn SFT files beside it, with a
    tiny model and one step per stage: every row of the paper's table, seed 42, their options."""
    import json

    from hanorec.cli import main
    from hanorec.config import load_config

    folder = _authors_layout(tmp_path)
    _write_their_files(folder, "hit3", seed=7)
    out = tmp_path / "cmp"
    tiny = [
        "--config", str(PAPER), f"--data.path={folder}", f"--output_dir={out}", "--model.name=tiny-qwen2.5-vl",
        "--model.dtype=float32", "--model.tiny_hidden_size=64", "--task.max_item_id=null",
        "--task.max_train_examples=16", "--task.max_eval_examples=4", "--sft.max_steps=1", "--sft.batch_size=2",
        "--sft.grad_accum=1", "--sft.mixed_precision=no", "--sft.progress_bar=false", "--pref.max_steps=1",
        "--pref.grad_accum=1", "--pref.mixed_precision=no", "--pref.progress_bar=false", "--eval.max_new_tokens=4",
        "--eval.batch_size=4", "--eval.baselines=[]", "--tasks=hit3",
    ]  # fmt: skip
    assert main(["compare", *tiny]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["seeds"] == [42]
    assert {r["method"] for r in result["rows"]} == {"SFT", "DPO", "S-DPO", "HaNo-DPO", "HaNo-DPO w/o HaRS",
                                                     "HaNo-DPO w/o NoDO"}  # fmt: skip
    stages = out / "hit3" / "seed42"
    configs = {d.name: load_config(d / "checkpoints" / "step-000001" / "config.yaml") for d in stages.iterdir()
               if (d / "checkpoints" / "step-000001" / "config.yaml").is_file() and d.name != "sft"}  # fmt: skip
    noise = {name: c.pref.noise_target for name, c in configs.items()}
    assert noise == {"dpo": "none", "s-dpo": "none", "hano-dpo": "lora", "hano-dpo_wo_hars": "lora",
                     "hano-dpo_wo_nodo": "none"}  # fmt: skip
    assert all(c.pref.hars_inputs == "authors" and c.seed == 42 for c in configs.values())
