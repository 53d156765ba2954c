"""The reference presets configs/paper-qwen2.5-vl-3b-*.yaml: the authors' settings, the honest split and the paper
protocol, loadable through the command line, and a dry run of their data pipeline on the bundled demo with the model
swapped for a tiny preset (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hanorec.cli import main
from hanorec.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
SIGMA = {"microlens": 0.05, "netflix": 0.1, "movielens": 0.1}
WORDING = {
    "microlens": "description.The user has watched the following micro-videos:\n<image> ",
    "netflix": "Please write a movie that the user may watch. Below are the candidate TV shows:\n\"",
    "movielens": "Please write a movie that the user may watch. Below are the candidate movies:\n\"",
}
MAX_ITEM_ID = {"microlens": 19379, "netflix": 17700, "movielens": 3953}  # their main_mllm.py defaults
PAPER_PRESETS = {k: REPO / "configs" / f"paper-qwen2.5-vl-3b-{k}.yaml" for k in SIGMA}


@pytest.mark.parametrize("dataset", list(PAPER_PRESETS))
def test_paper_preset_loads_through_the_cli_and_holds_the_authors_settings(dataset, capsys):
    path = PAPER_PRESETS[dataset]
    code = main(["config", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    shown = yaml.safe_load(out)  # the resolved configuration the CLI prints
    cfg = load_config(path)
    assert shown == cfg.to_dict()
    assert cfg.data.split_policy == "files" and cfg.eval.protocols[0] == "paper"
    assert cfg.eval.split == "test" and cfg.eval.paper_max_examples == 3000 and cfg.eval.max_new_tokens == 512
    assert cfg.eval.sampling() == {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "repetition_penalty": 1.0}
    assert cfg.model.name == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.model.max_pixels == 262144
    # every authors' option (method.md section 10)
    assert cfg.seed == 42 and cfg.pref.pair_seed == 2025
    assert (cfg.sft.max_pixels, cfg.eval.max_pixels, cfg.pref.max_pixels) == (589824, 589824, 262144)
    t = cfg.task
    assert (t.template_set, t.hit3_outer_quotes, t.negatives, t.max_item_id) == (
        "authors", True, "id_range", MAX_ITEM_ID[dataset]
    )
    assert (cfg.pref.disable_dropout, cfg.pref.nodo_backward, cfg.pref.hars_inputs) == (True, "clean", "authors")
    assert cfg.model.dtype == "bfloat16" and cfg.sft.mixed_precision == cfg.pref.mixed_precision == "bf16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.05)
    assert (cfg.sft.lr, cfg.sft.epochs, cfg.sft.batch_size, cfg.sft.grad_accum) == (1e-4, 5, 2, 8)
    p = cfg.pref
    assert (p.method, p.beta, p.hardness_k, p.lr, p.epochs, p.batch_size, p.grad_accum) == (
        "hano_dpo", 0.1, 10, 1e-4, 5, 4, 8
    )
    assert (p.noise_target, p.noise_sigma, p.noise_draw, p.noise_scale) == (
        "lora", SIGMA[dataset], "micro_batch", "absolute"
    )
    header = path.read_text().split("\nseed:")[0]
    for words in ("paper's setup", "data.path", "not shipped", "Qwen/Qwen2.5-VL-3B-Instruct",
                  "accelerate launch -m hanorec run", "train.tsv", "last_window_by_user"):  # fmt: skip
        assert words in header, f"{path.name}: the header does not say {words!r}"


@pytest.fixture(scope="module")
def authors_demo(tmp_path_factory):
    """The demo written in the authors' layout (train/val/test.tsv, Demo_titles.csv, images/)."""
    from hanorec.data import load_dataset, write_split_files

    return write_split_files(load_dataset(DEMO), tmp_path_factory.mktemp("authors-layout"))


@pytest.mark.parametrize("dataset", list(PAPER_PRESETS))
def test_paper_preset_dry_run_on_the_demo_with_a_tiny_model(dataset, tmp_path, authors_demo):
    """The preset's data pipeline (its split, task, prompts and the paper protocol's evaluation path) runs on the
    demo in the authors' layout with the model swapped for tiny-qwen2.5-vl: one window per row of each file, in
    file order, their prompts, the first test examples decoded by seeded sampling."""
    from hanorec.eval import evaluate
    from hanorec.pipeline import prepare_data, prepare_model

    cfg = load_config(
        PAPER_PRESETS[dataset],
        [f"--data.path={authors_demo}", "--model.name=tiny-qwen2.5-vl", "--model.dtype=float32",
         "--model.tiny_hidden_size=64", f"--output_dir={tmp_path}", "--task.max_item_id=null"],  # fmt: skip
    )
    data = prepare_data(cfg)
    s = data.splits
    assert s.policy == "files"
    rows = {name: (authors_demo / f"{name}.tsv").read_text().splitlines() for name in ("train", "val", "test")}
    assert [w.user for w in s.test] == [r.split("\t")[0] for r in rows["test"]]  # file order, one per row
    assert len(s.train) == len(rows["train"]) and all(len(w.history) == 3 for w in s.test)
    assert data.test[0].prompt.startswith("Given the title of a list of the user's recently enjoyed")
    assert WORDING[dataset] in data.test[0].prompt  # their prompt file for this dataset, verbatim
    assert data.test[0].answer.startswith('""') and data.test[0].answer.endswith('""')
    bundle = prepare_model(cfg, data.dataset, tmp_path / "sft")
    ev = evaluate(bundle, data.dataset, data.test[:2], protocols=cfg.eval.protocols, baselines=(),
                  max_new_tokens=4, seed=cfg.seed, sampling=cfg.eval.sampling(),
                  paper_max_examples=cfg.eval.paper_max_examples, progress=False)  # fmt: skip
    assert [r["protocol"] for r in ev.rows] == ["ranking", "paper"] and len(ev.paper_generations) == 2
