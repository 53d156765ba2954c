"""Configuration: YAML presets, dotted overrides, one-sentence errors naming the key and the value."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from hanorec.config import ConfigError, RunConfig, describe, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def leaf_fields(cls=RunConfig, prefix=""):
    """(dotted key, field) for every non-section field, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_defaults_match_the_reference():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.05)
    assert (cfg.sft.lr, cfg.sft.batch_size, cfg.sft.grad_accum, cfg.sft.epochs) == (1e-4, 2, 8, 5)
    assert cfg.task.name == "hit3"


def test_yaml_preset_then_dotted_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "seed": 3,
                "data": {"path": "somewhere", "max_users": 10},
                "sft": {"lr": 0.002, "batch_size": 4},
                "eval": {"protocols": ["ranking", "generative"]},
            }
        )
    )
    cfg = load_config(
        preset,
        [
            "--sft.lr=3e-4",
            "--task.name=next1",
            "--data.max_users=none",
            "--lora.target_modules=q_proj,v_proj",
            "--sft.progress_bar=false",
            "--output_dir=/tmp/x",
        ],
    )
    assert cfg.seed == 3  # from the preset
    assert cfg.data.path == "somewhere"  # preset kept where not overridden
    assert cfg.sft.batch_size == 4
    assert cfg.sft.lr == pytest.approx(3e-4)  # override beats the preset
    assert isinstance(cfg.sft.lr, float)
    assert cfg.task.name == "next1"
    assert cfg.data.max_users is None  # "none" -> None for optional fields
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.sft.progress_bar is False
    assert cfg.eval.protocols == ["ranking", "generative"]
    assert cfg.output_dir == "/tmp/x"
    # untouched sections keep their defaults
    assert cfg.lora.r == 8


def test_dict_overrides_and_int_strings():
    cfg = load_config(overrides={"sft": {"max_steps": "7", "batch_size": 3}, "seed": "5"})
    assert (cfg.sft.max_steps, cfg.sft.batch_size, cfg.seed) == (7, 3, 5)
    assert all(isinstance(v, int) for v in (cfg.sft.max_steps, cfg.sft.batch_size, cfg.seed))


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["--a.b=1", "--a.c=x=y", "--d=2"]) == {"a": {"b": "1", "c": "x=y"}, "d": "2"}
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["sft.lr=1"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["--sft.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["--sft.lr=0.01", "--task.name=hit1", "--eval.baselines=random"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one sentence on one line"
    return msg


def test_unknown_key_names_the_key_and_value():
    msg = _error(["--sft.lrr=0.1"])
    assert "sft.lrr" in msg and "0.1" in msg
    assert "lr" in msg.split("known")[-1]  # lists the keys that do exist
    msg = _error(["--nosuchsection.x=1"])
    assert "nosuchsection" in msg


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sft:\n  learning_rate: 0.5\n")
    msg = _error(None, p)
    assert "sft.learning_rate" in msg and "0.5" in msg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("--sft.batch_size=two", "sft.batch_size", "two"),
        ("--sft.lr=fast", "sft.lr", "fast"),
        ("--seed=1.5", "seed", "1.5"),
        ("--sft.progress_bar=maybe", "sft.progress_bar", "maybe"),
        ("--data.max_users=many", "data.max_users", "many"),
    ],
)
def test_bad_value_type_names_key_and_value(override, key, value):
    msg = _error([override])
    assert key in msg and value in msg


def test_bad_value_type_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sft:\n  batch_size: [1, 2]\n")
    msg = _error(None, p)
    assert "sft.batch_size" in msg and "[1, 2]" in msg
    p.write_text("model:\n  tiny_layers: 2.5\n")
    msg = _error(None, p)
    assert "model.tiny_layers" in msg and "2.5" in msg
    p.write_text("sft: 3\n")
    assert "sft" in _error(None, p)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("--task.name=hit5", "task.name", "hit5"),
        ("--data.domain=books", "data.domain", "books"),
        ("--model.dtype=int8", "model.dtype", "int8"),
        ("--eval.split=train", "eval.split", "train"),
        ("--eval.protocols=ranking,guessing", "eval.protocols", "guessing"),
        ("--eval.baselines=oracle", "eval.baselines", "oracle"),
    ],
)
def test_bad_choice_names_key_and_value(override, key, value):
    msg = _error([override])
    assert key in msg and value in msg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("--sft.lr=-1e-4", "sft.lr", "-0.0001"),
        ("--sft.batch_size=-2", "sft.batch_size", "-2"),
        ("--sft.batch_size=0", "sft.batch_size", "0"),
        ("--sft.max_steps=0", "sft.max_steps", "0"),
        ("--sft.save_every=-1", "sft.save_every", "-1"),
        ("--data.max_users=-5", "data.max_users", "-5"),
        ("--lora.r=-8", "lora.r", "-8"),
        ("--lora.dropout=1.5", "lora.dropout", "1.5"),
        ("--sft.warmup_ratio=-0.1", "sft.warmup_ratio", "-0.1"),
        ("--task.n_negatives=-1", "task.n_negatives", "-1"),
        ("--model.max_length=-10", "model.max_length", "-10"),
    ],
)
def test_negative_or_out_of_range_names_key_and_value(override, key, value):
    msg = _error([override])
    assert key in msg and value in msg


def test_zero_allowed_where_documented():
    cfg = load_config(overrides=["--sft.save_every=0", "--sft.max_grad_norm=0", "--lora.dropout=0"])
    assert (cfg.sft.save_every, cfg.sft.max_grad_norm, cfg.lora.dropout) == (0, 0.0, 0.0)


def test_missing_or_malformed_config_file(tmp_path):
    msg = _error(None, tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    assert "bad.yaml" in _error(None, bad)
    bad.write_text("- a\n- b\n")
    assert "mapping" in _error(None, bad)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(preset.read_text())
    # every value the preset sets is the one the config holds
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert getattr(getattr(cfg, section), k) == v, f"{preset.name}: {section}.{k}"
        else:
            assert getattr(cfg, section) == values


def test_there_is_a_tiny_cpu_preset():
    assert REPO / "configs" / "tiny-cpu.yaml" in PRESETS


def test_describe_lists_every_field_with_help():
    text = describe()
    lines = text.splitlines()
    keys = list(leaf_fields())
    assert len(keys) > 40
    for key, f in keys:
        help_text = f.metadata.get("help")
        assert help_text, f"{key} has no help text"
        line = next((ln for ln in lines if ln.strip().startswith(f"--{key}=")), None)
        assert line is not None, f"describe() does not list --{key}"
        assert help_text in line
        for choice in f.metadata.get("choices") or ():
            assert str(choice) in line
    for section in ("data", "task", "model", "lora", "sft", "eval"):
        assert f"[{section}]" in text
