"""Export: a stage as a self-contained model (plain transformers + peft load it and score exactly like the
project's own loaded stage), its model card, the refusals, and the preference pairs in TRL's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hanorec import runs
from hanorec.config import load_config
from hanorec.export import (
    ExportError,
    chance_level,
    export_pairs,
    export_stage,
    load_export,
    write_pairs_jsonl,
)
from hanorec.scoring import score_options
from hanorec.tasks import render

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"


def tiny_cfg(out: Path, preset: str, **over):
    return load_config(
        overrides={
            "seed": 0,
            "output_dir": str(out),
            "data": {"path": str(DEMO), "max_users": 30},
            "model": {"name": preset, "tiny_hidden_size": 48, "tiny_vocab_size": 400, "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
            "task": {"name": "hit3", "max_train_examples": 6, "max_eval_examples": 3, **over.get("task", {})},
            "sft": {"max_steps": 2, "lr": 1e-2, "batch_size": 3, "progress_bar": False},
            "pref": {"method": "hano_dpo", "max_steps": 2, "lr": 1e-2, "batch_size": 3, "progress_bar": False},
        }
    )


def scores(bundle, data) -> torch.Tensor:
    ex = data.test[:3]
    prompts = [bundle.encode_prompt(r.text, r.images) for r in (render(e, data.dataset) for e in ex)]
    return torch.cat(score_options(bundle, prompts, [e.options for e in ex]))


def train_run(out: Path, preset: str):
    from hanorec.pipeline import prepare_data, run_preference, run_sft

    cfg = tiny_cfg(out, preset)
    data = prepare_data(cfg)
    run_sft(cfg, data)
    run_preference(cfg, data)
    for where, method in ((out, "SFT"), (out / "hano_dpo", "hano_dpo")):  # what `run` and `pref` record
        (where / "results.json").write_text(json.dumps({
            "task": "hit3", "split": "test", "split_policy": "leave_one_out", "protocols": ["ranking"],
            "rows": [{"method": method, "protocol": "ranking", "HR@1": 0.25, "HR@3": 0.5, "NDCG@3": float("nan"),
                      "n": 3, "candidates": 7}]}))  # fmt: skip
    return cfg, data


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llava"
    return out, *train_run(out, "tiny-llava")


def check_family(out: Path, data, tmp_path: Path) -> None:
    for stage in ("hano_dpo", "sft"):
        want = scores(runs.load_stage(out, stage), data)
        exported = export_stage(out, stage, tmp_path / f"{stage}-adapter")
        assert (exported / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((exported / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == ".."
        got = scores(load_export(exported), data)
        assert got.dtype == torch.float32
        assert torch.equal(got, want), f"{stage}: exported scores differ from the loaded stage"
        merged = export_stage(out, stage, tmp_path / f"{stage}-merged", merge=True)
        assert not (merged / "adapter").exists()
        torch.testing.assert_close(scores(load_export(merged), data), want, rtol=0, atol=1e-4)
    # the stage-2 adapter on the plain base model is not the trained model (why the export carries the SFT)
    from peft import PeftModel

    base = runs.base_model(runs.read_config(out, "hano_dpo"), out / "sft")
    base.model = PeftModel.from_pretrained(base.model, tmp_path / "hano_dpo-adapter" / "adapter").eval()
    want_pref = scores(runs.load_stage(out, "hano_dpo"), data)
    assert (scores(base, data) - want_pref).abs().max() > 1e-4


def test_llava_export_scores_bit_for_bit_and_merged_close(llava_run, tmp_path):
    out, _, data = llava_run
    check_family(out, data, tmp_path)


@pytest.mark.slow
def test_qwen_export_scores_bit_for_bit_and_merged_close(tmp_path):
    out = tmp_path / "qwen"
    _, data = train_run(out, "tiny-qwen2.5-vl")
    check_family(out, data, tmp_path)


def test_export_loads_with_plain_transformers_and_has_a_model_card(llava_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    out, _, _ = llava_run
    exported = export_stage(out, "hano_dpo", tmp_path / "m", command="python -m hanorec export ...")
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(exported), exported / "adapter")
    assert model.peft_config["default"].r == 4
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template and AutoProcessor.from_pretrained(exported).tokenizer.chat_template == tok.chat_template
    card = (exported / "README.md").read_text()
    for text in ("HaNo-DPO", "leave_one_out", "7 candidates", "| chance |", "0.4286", "seed: 0", "lr=0.01",
                 "python -m hanorec", "without its SFT", "NaN"):  # fmt: skip
        assert text in card, text


def test_refusals_are_one_sentence(llava_run, tmp_path):
    out, _, _ = llava_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (lambda: export_stage(out, "dpo", tmp_path / "a"), "has no stage 'dpo'; its stages are sft, hano_dpo"),
        (lambda: export_stage(out, "sft", tmp_path / "full"), "already exists and is not empty"),
        (lambda: export_stage(out, "sft", out / "inside"), "inside the run folder"),
        (lambda: export_stage(tmp_path / "nope", "sft", tmp_path / "b"), "does not exist"),
        (lambda: export_pairs(out, "sft", tmp_path / "p.jsonl"), "not preference pairs"),
    ]
    for call, text in cases:
        with pytest.raises(ExportError, match=text) as e:
            call()
        assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)
    assert not (tmp_path / "a").exists() and not (out / "inside").exists()


def test_chance_levels():
    assert chance_level("hit3", "HR@3", 7) == pytest.approx(3 / 7)
    assert chance_level("next1", "HR@1", 20) == pytest.approx(0.05)
    assert chance_level("hit3", "NDCG@3", 7) == pytest.approx((1 + 1 / 1.5849625 + 0.5) / 7, rel=1e-6)
    assert chance_level("hit1", "AUC", 5) == 0.5


def test_pairs_export_matches_the_stage_pairs(llava_run, tmp_path):
    from datasets import load_dataset

    out, cfg, data = llava_run
    path, n = export_pairs(out, "hano_dpo", tmp_path / "pairs.jsonl")
    rows = load_dataset("json", data_files=str(path), split="train")
    assert len(rows) == n == 6
    lambdas = [r["lambda"] for r in rows]
    assert all(lam > 0 for lam in lambdas) and len(set(lambdas)) > 1  # HaRS lambdas, not all 1
    cached = sorted((out / "hardness_cache").glob("*"))
    assert cached, "the lambdas come from the cache the stage wrote (keyed by the SFT weights)"
    for r, e in zip(rows, data.train):
        assert r["user"] == e.user and r["chosen"][0]["content"] == e.answer
        parts = r["prompt"][0]["content"]
        assert sum(p["type"] == "image" for p in parts) == len(r["images"]) == len(e.image_items) == 3
        assert "".join(p["text"] or "" for p in parts if p["type"] == "text") == e.prompt.replace("<image>", "")
        assert all(Path(p).is_file() for p in r["images"])
        assert len(r["positive_item_ids"]) == len(r["negative_item_ids"]) == 3


def _one_trl_dpo_step(model, rows, processing_class, tmp_path, before_train=None) -> None:
    """One step of TRL's DPOTrainer (LoRA on q/v, CPU, batch 2) on exported pairs; before_train(trainer) may
    inspect it first. Asserts the step ran with a finite loss; TRL's accelerator state is reset after."""
    from accelerate.state import AcceleratorState
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from hanorec.models import lora_target_regex

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=2, max_steps=1,
                     max_length=None, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(["q_proj", "v_proj"]),
                             task_type="CAUSAL_LM")  # fmt: skip
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=processing_class,
                             peft_config=peft_config)  # fmt: skip
        if before_train is not None:
            before_train(trainer)
        result = trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))


def test_text_only_pairs_train_one_trl_dpo_step(ds, tmp_path):
    pytest.importorskip("trl")
    from datasets import load_dataset

    from hanorec.data import make_splits
    from hanorec.models import build_tiny
    from hanorec.pairs import build_pairs
    from hanorec.tasks import build_examples, corpus_text
    from hanorec.train.preference import PrefItem

    examples = build_examples("hit3", make_splits(ds, n_history=3, n_target=3).train, ds, seed=0,
                              max_examples=4, images="never")  # fmt: skip
    assert all(not e.image_items and "<image>" not in e.prompt for e in examples)
    items = [PrefItem(p, 0.5 + k) for k, p in enumerate(build_pairs(examples, ds, seed=0))]
    path = write_pairs_jsonl(items, ds, tmp_path / "pairs.jsonl")
    rows = load_dataset("json", data_files=str(path), split="train")
    assert "images" not in rows.column_names and rows["lambda"] == [0.5, 1.5, 2.5, 3.5]
    bundle = build_tiny("tiny-llava", corpus_text(ds), hidden_size=32, vocab_size=400, seed=0)
    tok = bundle.tokenizer
    for r, e in zip(rows, examples):  # TRL applies the model's chat template: the prompt our trainer sees
        assert tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) == bundle.chat_text(e.prompt)
    _one_trl_dpo_step(bundle.model, rows.select_columns(["prompt", "chosen", "rejected"]), tok, tmp_path)


@pytest.mark.slow
def test_image_pairs_train_one_trl_dpo_step_with_the_tiny_smolvlm(ds, tmp_path):
    """Exported pairs with images train TRL's DPOTrainer offline: the tiny SmolVLM (Idefics3 family) with an
    Idefics3Processor over its own tokenizer and PIL image processor (the SmolVLM processor would need a video
    processor, and Qwen2.5-VL's processor torchvision, which is not installed). TRL's prompt tokens are the
    ones our trainer feeds the model (the same image token runs)."""
    pytest.importorskip("trl")
    import datasets as hfd
    from transformers import Idefics3Processor

    from hanorec.data import make_splits
    from hanorec.models import build_tiny
    from hanorec.pairs import build_pairs
    from hanorec.tasks import build_examples, corpus_text
    from hanorec.train.preference import PrefItem

    windows = make_splits(ds, n_history=3, n_target=3).train
    examples = build_examples("hit3", windows, ds, seed=0, max_examples=4)
    assert all(len(e.image_items) == 3 for e in examples)
    items = [PrefItem(p, 0.5 + k) for k, p in enumerate(build_pairs(examples, ds, seed=0))]
    path = write_pairs_jsonl(items, ds, tmp_path / "pairs.jsonl")
    rows = hfd.load_dataset("json", data_files=str(path), split="train")
    rows = rows.select_columns(["prompt", "chosen", "rejected", "images"])
    rows = rows.cast_column("images", hfd.Sequence(hfd.Image()))  # file paths -> PIL images
    bundle = build_tiny("tiny-smolvlm", corpus_text(ds), hidden_size=32, vocab_size=400, seed=0)
    per_image = bundle.adapter.tokens_per_image(bundle)
    proc = Idefics3Processor(image_processor=bundle.image_processor, tokenizer=bundle.tokenizer,
                             image_seq_len=per_image, chat_template=bundle.tokenizer.chat_template)  # fmt: skip
    for r, e in zip(rows, examples):  # the prompt as TRL tokenizes it = the prompt our trainer encodes
        text = proc.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        theirs = proc(text=[text], images=[r["images"]], add_special_tokens=False)["input_ids"][0]
        assert list(theirs) == list(bundle.encode_prompt(e.prompt, render(e, ds).images).input_ids)

    def check_batch(trainer) -> None:  # 2 pairs (a chosen and a rejected row each), 3 images per row
        batch = next(iter(trainer.get_train_dataloader()))
        assert tuple(batch["pixel_values"].shape[:2]) == (4, 3)
        assert ((batch["input_ids"] == bundle.image_token_id).sum(1) == 3 * per_image).all()

    _one_trl_dpo_step(bundle.model, rows, proc, tmp_path, before_train=check_batch)


def test_cli_export_and_its_refusal(llava_run, tmp_path, capsys):
    from hanorec.cli import main

    out, _, _ = llava_run
    assert main(["export", "--run", str(out), "--stage", "hano_dpo", "--out", str(tmp_path / "e"), "--merge"]) == 0
    assert "all adapters merged" in capsys.readouterr().out and (tmp_path / "e" / "README.md").is_file()
    assert main(["export", "--run", str(out), "--stage", "hano_dpo", "--out", str(tmp_path / "e")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export-pairs", "--run", str(out), "--stage", "hano_dpo", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert "wrote 6 preference pairs" in capsys.readouterr().out
    assert main(["export", "--stage", "sft"]) == 2 and "needs --run" in capsys.readouterr().err


def test_app_export_button_and_table_downloads(llava_run, tmp_path):
    import csv
    import zipfile

    import pandas as pd

    from app.common import AppContext, table_download
    from app.tabs.train import export_choices, export_model

    out, _, _ = llava_run
    ctx = AppContext(data_dirs=[DEMO], runs_dir=out.parent, device="cpu")
    assert {"llava::sft", "llava::hano_dpo"} <= set(export_choices(ctx)["choices"])
    text, button = export_model(ctx, "llava::hano_dpo", False)
    assert "Exported **llava::hano_dpo**" in text and button["interactive"]
    names = zipfile.ZipFile(button["value"]).namelist()
    assert any(n.endswith("adapter/adapter_model.safetensors") for n in names) and any(n.endswith("README.md") for n in names)
    assert "llava" not in [p.name for p in (out.parent / ".exports").iterdir() if p.is_dir()]  # named run-stage
    assert export_model(ctx, "llava::hano_dpo", False)[1]["value"] == button["value"]  # the same export, reused
    df = pd.DataFrame({"candidate": ['"A"', "=1+2"], "log-prob": [-1.5, float("nan")]})
    update = table_download("candidates", df)
    with open(update["value"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["candidate", "log-prob"], ['"A"', "-1.5"], ["'=1+2", "NaN"]]
    assert table_download("candidates", pd.DataFrame())["interactive"] is False
