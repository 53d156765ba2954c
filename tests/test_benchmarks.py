"""The benchmark scripts' own logic: the GPU script's code path at tiny size on a CPU, its FLOP count, the
quickstart's skip message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_step  # noqa: E402


def test_gpu_script_runs_its_path_at_tiny_size_and_both_modes_agree(capsys):
    rows = gpu_step.main(
        ["--tiny", "--ks", "1", "--repeats", "1", "--warmup", "0", "--text-tokens", "16", "--completion-tokens", "4"]
    )
    (row,) = rows
    assert row["naive"]["s"] > 0 and row["shared_prefix"]["s"] > 0
    assert row["loss"]["naive"] == pytest.approx(row["loss"]["shared_prefix"], abs=1e-4)
    out = capsys.readouterr().out
    assert "speed-up x" in out and "K=1" in out


def test_gpu_script_refuses_full_size_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        gpu_step.main([])
    assert e.value.code == 2
    assert "--tiny" in capsys.readouterr().err


def test_step_flops_by_hand():
    """One prompt of 10 tokens, two completions of 3; 1 matmul parameter, width 1, one layer.

    naive: two rows of 13: forward 2*1*26 + 2*1*1*(13^2 + 13^2) = 728, head 0; step = 3 x 728 = 2184
    shared: one row of 10 + 2 + 2 = 14: forward 2*14 + 2*14^2 = 420; step = 1260
    """
    import torch

    from hanorec.models import EncodedPrompt

    prompts = [EncodedPrompt(list(range(10)), pixel_values=torch.zeros(0, 1))]  # no image patches
    comps = [[[1, 2, 3], [4, 5, 6]]]
    cfg = {"num_hidden_layers": 1, "hidden_size": 1}
    assert gpu_step.step_flops("naive", prompts, comps, (1, 0, 0), cfg) == 2184
    assert gpu_step.step_flops("shared_prefix", prompts, comps, (1, 0, 0), cfg) == 1260
    # vision (1 matmul parameter, 4 patches): naive runs it on both rows in the reference and the policy
    # forward, 2 x 2 x (2 x 4) = 32; shared prefix once per step, 2 x 4 = 8
    prompts = [EncodedPrompt(list(range(10)), pixel_values=torch.zeros(4, 1))]
    assert gpu_step.step_flops("naive", prompts, comps, (1, 0, 1), cfg) == 2184 + 32
    assert gpu_step.step_flops("shared_prefix", prompts, comps, (1, 0, 1), cfg) == 1260 + 8


def test_quickstart_skips_without_the_app(tmp_path, capsys):
    import bench_quickstart

    assert bench_quickstart.main(["--no-job", "--root", str(tmp_path)]) == {}
    assert "SKIPPED" in capsys.readouterr().out


def test_catalogue_benchmark_grows_the_catalogue_and_times_each_size(capsys):
    import bench_catalogue

    rows = bench_catalogue.main(["--sizes", "310,400", "--users", "1", "--repeats", "1", "--hidden", "32",
                                 "--chunk", "128"])  # fmt: skip
    small, big = rows
    assert big["candidates"] - small["candidates"] == 90 and big["tokens_per_user"] > small["tokens_per_user"]
    assert small["forwards_per_user"] == -(-small["candidates"] // 128) and small["s_per_user"] > 0
    assert "ratio 400 / 310 items" in capsys.readouterr().out


def test_compare_benchmark_estimates_the_readme_comparison_from_the_variants_that_share():
    """Every registered variant that uses a reference, grouped by pair set (K rejected, mDPO's imageless rows):
    all but the first of each group read shared values, 3 seeds x their steps x the saving per step."""
    import bench_compare

    from hanorec import methods

    groups = {}
    for v in methods.variants():
        over = methods.variant_of(v)
        m = methods.get(over["method"])
        if m.needs_reference:
            groups.setdefault((over.get("k_negatives", 1), m.needs_imageless), []).append(v)
    readers = sum(len(g) - 1 for g in groups.values())
    text = bench_compare.readme_estimate(0.1)
    assert f"so {readers} per seed would read shared values" in text
    assert f"that is {3 * readers * 120 * 0.1 / 60:.1f} min of its 92.8 min" in text


@pytest.mark.slow
def test_compare_benchmark_runs_both_paths_at_tiny_size_and_they_agree(capsys):
    """About 40 s: the old and the new comparison path once each at tiny size; the same results."""
    import bench_compare

    assert bench_compare.main(["--users", "12", "--sft-steps", "2", "--pairs", "8", "--repeats", "1",
                               "--catalogue-items", "5", "--variants", "DPO,HaNo-DPO w/o NoDO"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "both sides gave the same rows and per-example values: True" in out and "ratio" in out
