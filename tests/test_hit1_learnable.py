"""hit1 on a hand-made dataset whose answer is known (issue 8: is hit1 at chance a bug or a property?).

The dataset, written in the package's own layout: every user interacts with all the "Sunny Meadow" items in a
random order and never with a "Gloomy Cellar" item. A hit1 Yes target is the true next item (always Sunny), a
No target a random unseen item (always Gloomy), so the target's title alone gives the answer.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hanorec import pipeline
from hanorec.config import load_config
from hanorec.eval import metrics_from_scores, rank_options
from hanorec.tasks import render
from hanorec.train.sft import make_sft_collate


def write_known_answer_dataset(root: Path, n_users: int = 30, n_seen: int = 12, n_unseen: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    seen = [str(i) for i in range(1, n_seen + 1)]
    unseen = [str(i) for i in range(n_seen + 1, n_seen + n_unseen + 1)]
    titles = [f"{i},Sunny Meadow {i}" for i in seen] + [f"{i},Gloomy Cellar {i}" for i in unseen]
    (root / "titles.csv").write_text("item,title\n" + "\n".join(titles) + "\n")
    for i in seen + unseen:
        Image.new("RGB", (16, 16), (200, 200, 200)).save(root / "images" / f"{i}.jpg")
    rows = []
    for u in range(n_users):
        order = seen[:]
        rng.shuffle(order)
        rows.append(f"u{u:03d}\t{' '.join(order)}")
    (root / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return root


def known_config(tmp_path: Path, **sft) -> object:
    root = write_known_answer_dataset(tmp_path / "data")
    return load_config(
        overrides={
            "seed": 0,
            "output_dir": str(tmp_path / "run"),
            "data": {"path": str(root), "max_train_windows_per_user": None, "image_size": 16},
            "task": {"name": "hit1"},
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
            "sft": {
                "lr": 5e-3, "batch_size": 8, "grad_accum": 1, "log_every": 5, "save_every_minutes": 0,
                "progress_bar": False, **sft,
            },
            "eval": {"baselines": ["popularity"]},
        }
    )  # fmt: skip


def test_the_known_answer_data_is_what_it_claims(tmp_path):
    data = pipeline.prepare_data(known_config(tmp_path, epochs=1))
    for examples in (data.train, data.val, data.test):
        labels = [e.label for e in examples]
        assert 0.3 < np.mean(labels) < 0.7, "hit1 draws Yes and No 50/50"
        for e in examples:
            title = data.dataset.items[e.candidates[0]].title
            assert title.startswith("Sunny" if e.label else "Gloomy")
            assert e.answer == ("Yes" if e.label else "No") and e.options == ("Yes", "No")


def test_hit1_scores_are_logp_yes_minus_logp_no_at_the_answer_position_of_the_trained_tokens(tmp_path):
    """The ranking score of an option is log p(option tokens | prompt), summed over the option's tokens at the
    positions right after the prompt; for hit1 the options are exactly the tokens SFT trains on (the answer
    before EOS) and Yes and No differ at the first answer token. AUC ranks by Yes minus No, label Yes =
    positive. (The tiny presets' BPE splits both words in two: Y+es and N+o.)"""
    cfg = known_config(tmp_path, epochs=1)
    data = pipeline.prepare_data(cfg)
    bundle = pipeline.prepare_model(cfg, data.dataset, tmp_path / "run" / "sft")
    from hanorec.models import add_lora

    add_lora(bundle, cfg.lora, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():  # a random, not-yet-trained head still gives distinct Yes and No scores
        for p in bundle.model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    examples = data.val[:6]
    assert {e.label for e in examples} == {True, False}
    scores = rank_options(bundle, data.dataset, examples, batch_size=3)
    yes, no = (bundle.encode_completion(o, eos=False) for o in ("Yes", "No"))
    assert yes[0] != no[0], "Yes and No differ at the first answer token"
    collate = make_sft_collate(bundle, data.dataset, cfg.model.max_length)
    bundle.model.eval()
    for i, e in enumerate(examples):
        batch = collate([e])
        answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
        assert answer == (yes if e.label else no) + [bundle.eos_token_id], "trained tokens = scored tokens + EOS"
        r = render(e, data.dataset)
        p = bundle.encode_prompt(r.text, r.images)
        manual = []
        for option in (yes, no):
            enc = bundle.collate([p], [option])
            with torch.no_grad():
                out = bundle.model(**{k: v for k, v in enc.items() if k != "labels"})
            logp = torch.log_softmax(out.logits[0].float(), -1)
            start = len(p.input_ids)  # the first answer token is predicted at the prompt's last position
            manual.append(sum(logp[start - 1 + j, t] for j, t in enumerate(option)))
        torch.testing.assert_close(scores[i].float(), torch.stack(manual), rtol=1e-4, atol=1e-4)
    labels = np.array([e.label for e in examples])
    perfect = np.stack([np.where(labels, 1.0, 0.0), np.where(labels, 0.0, 1.0)], 1)
    assert metrics_from_scores(examples, perfect)["AUC"] == 1.0
    assert metrics_from_scores(examples, perfect[:, ::-1])["AUC"] == 0.0


@pytest.mark.slow
def test_sft_learns_hit1_when_the_answer_is_predictable(tmp_path):
    """A short SFT run on the known-answer data: validation and test AUC far above chance (0.5)."""
    cfg = known_config(tmp_path, epochs=3, val_every_epoch=True)
    data = pipeline.prepare_data(cfg)
    bundle, r = pipeline.run_sft(cfg, data)
    assert r.best["metric"] == "AUC" and r.best["value"] > 0.8, r.summary()
    test = pipeline.run_eval(cfg, bundle, data).rows[0]
    assert test["method"] == "SFT" and test["AUC"] > 0.8, test
