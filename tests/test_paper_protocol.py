"""The paper's evaluation protocol (method.md section 4): the authors' rules on hand-made strings, seeded
sampling, the 3,000-example cap, and tables that name their protocol and split. Tiny models built from config."""

from __future__ import annotations

import pytest
import torch

from hanorec import metrics as M
from hanorec.config import ConfigError, load_config
from hanorec.data import make_splits
from hanorec.eval import (
    PAPER_MAX_EXAMPLES,
    PAPER_SAMPLING,
    evaluate,
    format_results,
    paper_examples,
    paper_metrics,
    sampling_seed,
)
from hanorec.models import build_tiny
from hanorec.scoring import generate
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, render


def test_paper_lines_strip_double_quotes_and_spaces_only():
    text = '\n  "Heat"\n\n""Up" \n “Alien”\n\t"Jaws"\t\n'
    assert M.paper_lines(text) == ["Heat", "Up", "“Alien”", '\t"Jaws']  # a tab stops the stripping
    assert M.paper_lines("") == [] and M.paper_lines(' \n" "\n') == [""]


def test_paper_hit3_exact_case_sensitive_match_in_the_first_3_lines():
    cands = ["Heat", "Up", "Alien", "Jaws", "Big", "Cars", "Ran"]
    gens = [
        '"Heat"\n"Up"\n"Alien"',  # rank 0
        '""Up"\n"Heat""',  # the label's own doubled quotes are stripped too: rank 1
        "heat\nUp\nAlien",  # case differs: no hit
        "Up\nAlien\nJaws\nHeat",  # 4th line: outside the first 3
        "“Heat”\nUp",  # curly quotes are not stripped: no hit, and not a candidate
        "1. Heat",  # a list marker is not stripped: no hit
    ]
    out = M.paper_hit3_metrics(gens, ["Heat"] * len(gens), [cands] * len(gens))
    assert out["n"] == 6
    assert out["HR@3"] == pytest.approx(2 / 6)
    assert out["NDCG@3"] == pytest.approx((1.0 + 1 / torch.log2(torch.tensor(3.0)).item()) / 6)
    assert out["ValidRatio"] == pytest.approx(3 / 6)  # the first, second and fourth name only candidates


def test_paper_hit1_drops_answers_that_are_neither_yes_nor_no():
    gens = ["Yes", " no \n", "Yes.", "maybe", "YES", "No, because"]
    labels = [True, False, True, False, False, True]
    out = M.paper_hit1_metrics(gens, labels)
    # kept: (1, T), (0, F), (1, F) -> positives {1}, negatives {0, 1}: AUC = (1 + 0.5) / 2
    assert out["dropped"] == 3 and out["n"] == 6 and out["ValidRatio"] == pytest.approx(0.5)
    assert out["AUC"] == pytest.approx(0.75) and out["Accuracy"] == pytest.approx(2 / 3)
    assert M.paper_yes_no(" Yes\n") is True and M.paper_yes_no("Yes.") is None
    assert M.paper_hit1_metrics(["Yes", "Yes"], [True, True])["AUC"] is None  # one class kept: undefined
    assert M.paper_hit1_metrics(["Sure", "Nope"], [True, False])["AUC"] == 0.0  # none kept: the authors' 0


def test_paper_metrics_look_for_the_most_recent_true_item(ds):
    """Our hit3 answer lists the targets most recent first, like the authors' label; the paper protocol's true
    item is its first line, i.e. the window's last (most recent) item, and not the other two targets."""
    splits = make_splits(ds, n_history=3, n_target=3)
    examples = build_examples("hit3", splits.test[:4], ds, seed=0)
    for e, w in zip(examples, splits.test[:4]):
        assert e.targets[0] == w.targets[-1]
        assert M.paper_lines(e.answer)[0] == ds.items[w.targets[-1]].title.strip('" ')
    title = lambda i: ds.items[i].title  # noqa: E731
    recent = [f'"{title(e.targets[0])}"' for e in examples]
    older = [f'"{title(e.targets[2])}"\n"{title(e.targets[1])}"' for e in examples]
    assert paper_metrics(examples, ds, recent)["HR@3"] == 1.0
    assert paper_metrics(examples, ds, older)["HR@3"] == 0.0


@pytest.fixture(scope="module")
def tiny(ds):
    b = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, seed=0)
    b.model.float().eval()
    return b


def _examples(ds, task, n):
    s = TASK_SHAPES[task]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples(task, splits.test, ds, seed=0, max_examples=n)


def test_sampling_is_seeded_per_example(ds, tiny):
    """Same seed -> the same answers; another seed -> different ones; an example's answer is the same decoded
    alone as inside the whole evaluation (it depends on (seed, index) only), and torch's RNG is left alone."""
    examples = _examples(ds, "hit3", 4)
    kw = dict(protocols=("paper",), baselines=(), max_new_tokens=6, progress=False)
    a = evaluate(tiny, ds, examples, seed=0, **kw).paper_generations
    b = evaluate(tiny, ds, examples, seed=0, **kw).paper_generations
    c = evaluate(tiny, ds, examples, seed=1, **kw).paper_generations
    assert a == b and len(a) == 4
    assert a != c
    r = render(examples[2], ds)
    state = torch.get_rng_state()
    alone = generate(tiny, tiny.encode_prompt(r.text, r.images), max_new_tokens=6, sampling=PAPER_SAMPLING,
                     seed=sampling_seed(0, 2))  # fmt: skip
    assert alone == a[2] and torch.equal(torch.get_rng_state(), state)
    greedy = generate(tiny, tiny.encode_prompt(r.text, r.images), max_new_tokens=6)
    assert greedy == generate(tiny, tiny.encode_prompt(r.text, r.images), max_new_tokens=6)
    assert sampling_seed(0, 2) != sampling_seed(2, 0) and sampling_seed(0, 2) == sampling_seed(0, 2)


def test_paper_protocol_caps_the_examples_and_tables_name_protocol_and_split(ds, tiny):
    assert PAPER_MAX_EXAMPLES == 3000 and load_config().eval.paper_max_examples == 3000
    many = list(range(4500))
    assert paper_examples(many) == many[:3000] and paper_examples(many, None) == many
    examples = _examples(ds, "hit1", 5)
    ev = evaluate(tiny, ds, examples, protocols=("ranking", "paper"), baselines=(), max_new_tokens=3,
                  progress=False, paper_max_examples=3)  # fmt: skip
    rows = {r["protocol"]: r for r in ev.rows}
    assert rows["ranking"]["n"] == 5 and rows["paper"]["n"] == 3 and len(ev.paper_generations) == 3
    assert rows["paper"]["dropped"] + round(rows["paper"]["ValidRatio"] * 3) == 3
    table = format_results("hit1", ev.rows, split="test", split_policy="last_window_by_user")
    assert {tuple(line.split()[:2]) for line in table.splitlines()} >= {("model", "ranking"), ("model", "paper")}
    assert "evaluated on the test split (last_window_by_user windows)" in table
    assert "protocol ranking = every candidate scored by the likelihood of its title" in table
    assert "protocol paper = the authors' protocol: sampled (temperature 0.95, top-p 0.7, top-k 50)" in table
    assert "the first 3 examples at most" in table


def test_config_accepts_the_paper_protocol_and_checks_its_settings():
    cfg = load_config(overrides=["--eval.protocols=[ranking,paper]", "--eval.sample_top_p=0.9"])
    assert cfg.eval.protocols == ["ranking", "paper"]
    assert cfg.eval.sampling() == {**PAPER_SAMPLING, "top_p": 0.9}
    assert load_config().eval.protocols == ["ranking"]  # the default stays the ranking protocol
    with pytest.raises(ConfigError, match="sample_top_p"):
        load_config(overrides=["--eval.sample_top_p=1.5"])
    with pytest.raises(ConfigError, match="paper"):
        load_config(overrides=["--eval.protocols=[papers]"])
