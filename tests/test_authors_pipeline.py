"""The authors' pipeline from their own files (method.md section 10): split_policy=files on a folder in their
layout, their prompt templates, the hit3 outer quotes, id-range negatives, dropout off in stage 2 and the
pair-construction seed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hanorec.config import load_config
from hanorec.data import DataError, load_dataset, make_splits, write_split_files
from hanorec.metrics import paper_lines
from hanorec.pairs import build_pair
from hanorec.tasks import AUTHORS_HIT3_INSTRUCTION, TaskError, build_example, build_examples, corpus_text

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
TITLES = "item,title\n1,Alpha\n2,Beta\n3,Gamma\n4,Delta\n5,Epsilon\n6,Zeta\n7,Eta\n8,Theta\n9,Iota\n10,Kappa\n"


def authors_folder(root: Path, train: str, val: str, test: str, titles: str = TITLES) -> Path:
    """A folder as the authors lay it out: train/val/test.tsv, <Name>_titles.csv, images/<id>.jpg."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("val", val), ("test", test)):
        (root / f"{name}.tsv").write_text(text)
    (root / "Movielens_titles.csv").write_text(titles)
    (root / "images").mkdir(exist_ok=True)
    for i in (1, 2, 3):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / "images" / f"{i}.jpg")
    return root


def test_files_policy_reads_each_file_as_given(tmp_path):
    root = authors_folder(
        tmp_path / "ml",
        train="7\t1 2 3 4 5 6 7\n3\t1 2 3\n5\t2 3 4 5 6 7 8 9\n",
        val="5\t2 3 4 5 6 7 8 9 10\n",
        test="9\t10 9 8 7 6 5\n5\t1 2 3 4 5 6 7 8 9 10\n8\t1 2\n",
    )
    ds = load_dataset(root, split_files=True)
    assert ds.items["4"].title == "Delta" and ds.items["1"].image_path.name == "1.jpg"
    assert ds.items["4"].image_path is None and ds.summary.missing_images == 7
    s = make_splits(ds, n_history=3, n_target=3, policy="files")
    # one window per row of 6+ items, from its last 6, in file order; rows under 6 skipped and counted
    assert [w.user for w in s.train] == ["7", "5"] and [w.user for w in s.test] == ["9", "5"]
    assert s.n_users_dropped == 2 and s.config["skipped_rows"] == {"train": 1, "val": 0, "test": 1}
    assert s.train[0].history == ("2", "3", "4") and s.train[0].targets == ("5", "6", "7")
    assert s.test[0].history == ("10", "9", "8") and s.test[0].targets == ("7", "6", "5")
    # user 5 is in all three files, each row its own window with its own items to avoid
    assert {w.user for w in s.train} & {w.user for w in s.val} & {w.user for w in s.test} == {"5"}
    assert s.val[0].seen == ("2", "3", "4", "5", "6", "7", "8", "9", "10")
    assert "2 rows under 6 items skipped" in s.describe()
    # hit1 keeps a row's last 6 too (5 history items + the target)
    h1 = make_splits(ds, n_history=5, n_target=1, policy="files")
    assert h1.test[0].history == ("10", "9", "8", "7", "6") and h1.test[0].targets == ("5",)


def test_negatives_avoid_only_the_rows_own_items(tmp_path):
    """The authors draw a row's negatives from ids outside that row; another row of the same user (in another
    file) may hold them."""
    root = authors_folder(
        tmp_path / "ml", train="1\t1 2 3 4 5 6\n", val="1\t1 2 3 4 5 6 7 8 9\n", test="2\t4 5 6 7 8 9\n"
    )
    ds = load_dataset(root, split_files=True)
    s = make_splits(ds, n_history=3, n_target=3, policy="files")
    drawn = set()
    for seed in range(30):
        ex = build_example("hit3", s.train[0], ds, random.Random(seed), n_negatives=4)
        assert not set(ex.negatives) & set("123456")
        drawn |= set(ex.negatives)
    assert drawn == {"7", "8", "9", "10"}  # the val row's 7, 8, 9 are fair game for the train row


@pytest.mark.parametrize(
    "bad, words",
    [
        ("1 2 3 4 5 6\n", ["train.tsv", "Line 1", "no tab"]),
        ("1\t2 3\n\t1 2\n", ["train.tsv", "Line 2", "empty user id"]),
        ("1\t1 2 3 99 4 5\n", ["train.tsv", "Line 1", "'99'", "Movielens_titles.csv"]),
    ],
)
def test_a_malformed_row_stops_with_the_file_and_line(tmp_path, bad, words):
    root = authors_folder(tmp_path / "ml", train=bad, val="1\t1 2 3 4 5 6\n", test="1\t1 2 3 4 5 6\n")
    with pytest.raises(DataError) as e:
        load_dataset(root, split_files=True)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_split_file_and_wrong_policy_are_one_sentence(tmp_path):
    root = authors_folder(tmp_path / "ml", train="1\t1 2 3 4 5 6\n", val="", test="")
    (root / "test.tsv").unlink()
    with pytest.raises(DataError, match="test.tsv is not there"):
        load_dataset(root, split_files=True)
    with pytest.raises(DataError, match="split_files=True"):
        make_splits(load_dataset(DEMO), n_history=3, n_target=3, policy="files")


def test_empty_evaluated_split_names_the_file(tmp_path):
    from hanorec.data import require_windows

    root = authors_folder(tmp_path / "ml", train="1\t1 2 3 4 5 6\n", val="1\t1 2 3 4 5 6\n", test="2\t1 2\n")
    ds = load_dataset(root, split_files=True)
    s = make_splits(ds, n_history=3, n_target=3, policy="files")
    with pytest.raises(DataError, match=r"test.tsv has 1 row\(s\), 1 of them shorter"):
        require_windows(s, ds, eval_split="test")


def test_subset_users_keeps_the_chosen_users_rows(tmp_path):
    ds = load_dataset(write_split_files(load_dataset(DEMO), tmp_path / "files"), split_files=True)
    small = ds.subset_users(30, seed=0)
    users = set(small.sequences)
    assert len(users) == 30
    assert all(r.user in users for rows in small.split_rows.values() for r in rows)
    assert all(i in small.items for rows in small.split_rows.values() for r in rows for i in r.items)


def test_authors_templates_verbatim(tmp_path):
    ds = load_dataset(write_split_files(load_dataset(DEMO), tmp_path / "files"), split_files=True)
    s = make_splits(ds, n_history=3, n_target=3, policy="files")
    ex = build_examples("hit3", s.test[:1], ds, seed=0, template_set="authors")[0]
    t = {i: ds.items[i].title for i in ds.items}
    hist = "\n".join(f'<image> "{t[i]}"' for i in ex.history)
    cands = "\n".join(f'"{t[i]}"' for i in ex.candidates)
    assert ex.prompt == (
        AUTHORS_HIT3_INSTRUCTION + f"The user has watched the following movies:\n{hist}.\n\n"
        f"Please write a movie that the user may watch. Below are the candidate movies:\n{cands}."
    )
    h1 = make_splits(ds, n_history=5, n_target=1, policy="files")
    ex1 = build_examples("hit1", h1.test[:1], ds, seed=0, template_set="authors")[0]
    hist = "\n".join(f'<image> "{t[i]}"' for i in ex1.history)
    nw = "\n".join(f'"{t[i]}"' for i in ex1.not_watched)
    assert ex1.prompt == (
        f"The user has watched the following movies:\n{hist}\n\n"
        f"The movies the user has not watched, which may be those they do not prefer:\n{nw}\n\n"
        f'Whether the user will like the target movie:\n"{t[ex1.candidates[0]]}"'
    )
    assert "Yes or No" not in ex1.prompt
    # the netflix wording asks for "a movie" among TV shows, as their prompt file does
    tv = build_examples("hit3", s.test[:1], ds, seed=0, template_set="authors", domain="tv")[0]
    assert "following TV shows:\n" in tv.prompt and "Please write a movie that" in tv.prompt
    # their words reach a tiny tokenizer's corpus only when the run uses them
    assert AUTHORS_HIT3_INSTRUCTION in corpus_text(ds, template_set="authors")
    assert AUTHORS_HIT3_INSTRUCTION not in corpus_text(ds)


def test_hit3_outer_quotes_on_targets_and_chosen_only():
    ds = load_dataset(DEMO)
    s = make_splits(ds, n_history=3, n_target=3)
    plain = build_examples("hit3", s.test[:5], ds, seed=0)
    quoted = build_examples("hit3", s.test[:5], ds, seed=0, outer_quotes=True)
    for a, b in zip(plain, quoted):
        assert b.answer == f'"{a.answer}"' and b.answer.startswith('""') and b.answer.endswith('""')
        assert b.options == tuple('"' + o for o in a.options)
        pair = build_pair(b, ds, random.Random(0))
        assert pair.chosen == b.answer and not pair.rejected[0].startswith('""')
        # the paper protocol reads both forms the same way
        assert paper_lines(b.answer) == paper_lines(a.answer)


def test_id_range_negatives_include_ids_without_titles(tmp_path):
    root = authors_folder(
        tmp_path / "ml", train="1\t1 2 3 4 5 6\n", val="1\t1 2 3 4 5 6\n", test="1\t1 2 3 4 5 6\n",
        titles="item,title\n1,A\n2,B\n3,C\n4,D\n5,E\n6,F\n9,I\n",
    )  # fmt: skip
    ds = load_dataset(root, split_files=True)
    s = make_splits(ds, n_history=3, n_target=3, policy="files")
    exs = build_examples("hit3", s.train * 20, ds, seed=0, negatives="id_range", max_item_id=12)
    drawn = {n for e in exs for n in e.negatives}
    assert drawn == {"7", "8", "9", "10", "11", "12"}
    assert ds.items["8"].title == "[unknown 8]" and ds.items["8"].image_path is None
    assert any('"[unknown ' in e.prompt for e in exs)
    letters = "item,title\n" + "".join(f"{c},{c.upper()}\n" for c in "abcdefghij")
    root = authors_folder(tmp_path / "letters", train="1\ta b c d e f\n", val="", test="", titles=letters)
    ds = load_dataset(root, split_files=True)
    with pytest.raises(TaskError, match="not all integers"):
        build_examples("hit3", make_splits(ds, n_history=3, n_target=3, policy="files").train, ds,
                       negatives="id_range")  # fmt: skip


def test_disable_dropout_switches_every_dropout_off_and_back():
    from hanorec.train.preference import disable_dropout

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Dropout(0.05))
    model.train()
    restore = disable_dropout(model)
    x = torch.ones(2, 4)
    assert torch.equal(model(x), model(x)) and [m.p for m in model[1:]] == [0.0, 0.0]
    restore()
    assert [m.p for m in model[1:]] == [0.3, 0.05]


def test_train_preference_runs_with_dropout_off_and_pairs_from_pair_seed(monkeypatch, tmp_path):
    """pref.disable_dropout reaches every dropout module of the policy during stage 2 only; pref.pair_seed
    alone decides which negatives become the rejected answers."""
    from hanorec.train import preference as P

    seen = {}

    def fake_loop(*, model, **_):
        seen["p"] = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})
        raise KeyboardInterrupt

    from hanorec.models import add_lora, build_tiny

    ds = load_dataset(DEMO)
    cfg = load_config(overrides={"lora": {"dropout": 0.05}, "pref": {"noise_target": "none"}})
    b = build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, seed=0)
    add_lora(b, cfg.lora, seed=0)
    monkeypatch.setattr(P, "train_loop", fake_loop)
    for off, expected in ((True, [0.0]), (False, [0.05])):
        cfg.pref.disable_dropout = off
        with pytest.raises(KeyboardInterrupt):
            P.train_preference(cfg, b, ds, [], tmp_path / str(off), resume=False)
        assert seen["p"][-1:] == expected[-1:]
        assert 0.05 in {m.p for m in b.model.modules() if isinstance(m, torch.nn.Dropout)}  # restored

    s = make_splits(ds, n_history=3, n_target=3)
    exs = build_examples("hit3", s.train[:40], ds, seed=42)
    from hanorec.pairs import build_pairs

    by_pair_seed = build_pairs(exs, ds, seed=2025)
    cfg = load_config(overrides={"seed": 42, "pref": {"pair_seed": 2025, "method": "dpo"}})
    items = P.build_preference_items(cfg, b, ds, exs, tmp_path / "cache")
    assert [it.pair.rejected for it in items] == [p.rejected for p in by_pair_seed]
    assert [it.pair.rejected for it in items] != [p.rejected for p in build_pairs(exs, ds, seed=42)]


@pytest.mark.slow
def test_paper_preset_end_to_end_on_a_folder_in_the_authors_layout(tmp_path, monkeypatch):
    """`run` then `pref` with the MovieLens paper preset (every authors' option: their files, templates, quotes,
    id-range negatives, seeds, dropout off, clean NoDO backward, their HaRS inputs) on the demo written in their
    layout, the model swapped for a tiny one and the stages shortened (about 40 s on 2 shared cores)."""
    import json

    from hanorec.cli import main

    folder = write_split_files(load_dataset(DEMO), tmp_path / "movielens")
    out = tmp_path / "run"
    tiny = [
        "--config", str(REPO / "configs" / "paper-qwen2.5-vl-3b-movielens.yaml"), f"--data.path={folder}",
        f"--output_dir={out}", "--model.name=tiny-qwen2.5-vl", "--model.dtype=float32", "--model.tiny_hidden_size=64",
        "--task.max_item_id=null", "--task.max_train_examples=24", "--task.max_eval_examples=6",
        "--sft.max_steps=2", "--sft.batch_size=2", "--sft.grad_accum=1", "--sft.mixed_precision=no",
        "--sft.progress_bar=false", "--eval.max_new_tokens=8", "--eval.batch_size=6", "--eval.baselines=[]",
    ]  # fmt: skip
    assert main(["run", *tiny]) == 0
    import hanorec.hardness as H

    embedded = []
    real = H.item_embeddings

    def spy(bundle, ds, *a, **k):  # what HaRS embeds with (pref.hars_inputs=authors)
        embedded.append((hasattr(bundle.model, "peft_config"), bundle.meta.get("sft_checkpoint")))
        return real(bundle, ds, *a, **k)

    monkeypatch.setattr(H, "item_embeddings", spy)
    assert main(["pref", *tiny, "--pref.max_steps=2", "--pref.grad_accum=1", "--pref.mixed_precision=no",
                 "--pref.progress_bar=false"]) == 0  # fmt: skip
    for result in (json.loads((out / "results.json").read_text()), json.loads((out / "hano_dpo" / "results.json").read_text())):
        assert result["split_policy"] == "files" and result["seed"] == 42
        assert {r["protocol"] for r in result["rows"]} == {"paper", "ranking"}
        assert all(r["n"] == 6 for r in result["rows"])
    assert embedded == [(False, "tiny-qwen2.5-vl@base-authors-hars-inputs")]  # the base model, no adapter
    metrics = [json.loads(line) for line in (out / "hano_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2


def test_config_help_documents_the_dropout_and_nodo_backward_options(capsys):
    from hanorec.cli import main

    assert main(["config", "--help"]) == 0
    out = capsys.readouterr().out
    dropout = next(line for line in out.splitlines() if "--pref.disable_dropout=" in line)
    assert "True" in dropout and "LLaMA-Factory" in dropout and "w/o NoDO" in dropout
    backward = next(line for line in out.splitlines() if "--pref.nodo_backward=" in line)
    assert "'noisy'" in backward and "clean" in backward and "reentrant gradient checkpointing" in backward
    for key in ("--sft.max_pixels=", "--pref.max_pixels=", "--eval.max_pixels=", "--pref.hars_inputs=",
                "--pref.pair_seed=", "--task.template_set=", "--task.hit3_outer_quotes=", "--task.negatives="):  # fmt: skip
        assert key in out


def test_per_stage_pixel_caps():
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from hanorec.models import ModelBundle, cap_image_pixels, set_max_pixels
    from hanorec.pipeline import stage_max_pixels

    proc = Qwen2VLImageProcessor()
    default = proc.size["longest_edge"]
    bundle = ModelBundle(None, None, proc, "qwen2_5_vl", "real")
    cap_image_pixels(proc, 262144)  # as a real checkpoint is loaded (model.max_pixels)
    image = Image.new("RGB", (2000, 1500))
    pixels = {}
    for cap in (262144, 589824, 0):
        assert set_max_pixels(bundle, cap)
        t, h, w = proc(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        pixels[cap] = h * w * 14 * 14
    assert pixels[262144] <= 262144 < pixels[589824] <= 589824 < pixels[0] <= default
    assert not set_max_pixels(ModelBundle(None, None, proc, "qwen2_5_vl", "tiny", image_size=64), 100)
    cfg = load_config(overrides={"sft": {"max_pixels": 589824}, "model": {"max_pixels": 262144}})
    assert (stage_max_pixels(cfg, cfg.sft.max_pixels), stage_max_pixels(cfg, cfg.pref.max_pixels)) == (589824, 262144)
    assert stage_max_pixels(load_config(overrides={"model": {"max_pixels": None}}), None) == 0


def test_authors_hars_inputs_read_jpg_files_only(tmp_path):
    from PIL import Image

    from hanorec.pipeline import jpg_images_only

    root = authors_folder(tmp_path / "ml", train="1\t1 2 3 4 5 6\n", val="", test="")
    Image.new("RGB", (8, 8)).save(root / "images" / "4.png")
    ds = load_dataset(root, split_files=True)
    assert ds.items["4"].image_path.suffix == ".png"
    only = jpg_images_only(ds)
    assert only.items["4"].image_path is None and only.items["1"].image_path == ds.items["1"].image_path
    assert ds.items["4"].image_path is not None  # the run's own dataset is left as it was


def test_files_policy_caps_training_at_the_first_rows_of_train_tsv(tmp_path):
    """task.max_train_examples keeps train.tsv's first usable rows (LLaMA-Factory's max_samples), then shuffles."""
    from hanorec.pipeline import prepare_data

    folder = write_split_files(load_dataset(DEMO), tmp_path / "files")
    cfg = load_config(overrides={"data": {"path": str(folder), "split_policy": "files"},
                                 "task": {"max_train_examples": 10}})  # fmt: skip
    data = prepare_data(cfg)
    first = [(w.user, w.targets) for w in data.splits.train[:10]]
    got = [(e.user, tuple(reversed(e.targets))) for e in data.train]
    assert sorted(got) == sorted(first) and got != first  # those rows, shuffled
