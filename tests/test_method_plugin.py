"""A preference method defined in this file, outside the package: registering it is all it takes for it to
train through the CLI path and through the app's job path (a subprocess that imports this file because the
run's config names it in pref.plugins), and for it to appear in the run list under its label.

The method is a hinge DPO: loss_n = max(0, margin - beta * h_n).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hanorec import methods
from hanorec.methods import Knob, LossOutput, Method
from hanorec.methods.knobs import BETA

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def hinge_loss(b, pref, beta, state) -> LossOutput:
    r_w = b.policy_chosen - b.ref_chosen
    r_l = b.policy_rejected[:, 0] - b.ref_rejected[:, 0]
    margin = METHOD.option(pref, "margin")
    losses = torch.relu(margin - beta * (r_w - r_l))
    return LossOutput(losses, (beta * r_w).detach(), (beta * r_l).detach(), torch.full_like(r_w, beta))


METHOD = methods.register(
    Method(
        name="hinge_test",
        label="Hinge DPO (test)",
        paper="SLiC-HF (Zhao et al. 2023), hinge form",
        equation="max(0, margin - beta * h)",
        loss_fn=hinge_loss,
        knobs=(BETA, Knob("margin", 1.0, "the hinge's margin", check=methods.positive)),
        variant={"noise_target": "none"},
        beyond_paper=True,
    )
)


def fast(run: Path) -> list[str]:
    return [
        f"--data.path={DEMO}", "--data.max_users=30", f"--output_dir={run}", "--model.name=tiny-llava",
        "--model.tiny_hidden_size=64", "--model.tiny_vocab_size=400", "--lora.r=4", "--lora.alpha=8",
        "--task.max_train_examples=12", "--task.max_eval_examples=2", "--sft.max_steps=2", "--sft.batch_size=2",
        "--sft.progress_bar=false", "--pref.max_steps=2", "--pref.batch_size=3", "--pref.progress_bar=false",
        "--pref.log_every=1", "--eval.baselines=[]",
    ]  # fmt: skip


def test_registering_makes_it_a_stage_a_row_and_a_configurable_method():
    from hanorec.config import load_config
    from hanorec.jobs import stages

    assert "hinge_test" in methods.names() and "Hinge DPO (test)" in stages()
    assert any(r["name"] == "Hinge DPO (test)" for r in methods.table())
    assert load_config(overrides=["--pref.method=hinge_test"]).pref.options == {"margin": 1.0}
    assert methods.label_of({"method": "hinge_test", "noise_target": "none"}) == "Hinge DPO (test)"


@pytest.mark.slow  # SFT, then the method through the CLI and through a job subprocess: ~50 s on 2 shared cores
def test_a_method_from_a_test_module_trains_from_the_cli_and_a_job_and_is_listed(tmp_path):
    from hanorec import cli, runs
    from hanorec.jobs import JobManager
    root = tmp_path / "runs"
    cli_run = root / "from-cli"
    assert cli.main(["run", *fast(cli_run)]) == 0
    plugin = f"--pref.plugins=[{__file__}]"
    assert cli.main(["pref", *fast(cli_run), "--pref.method=hinge_test", "--pref.noise_target=none",
                     "--pref.options.margin=0.5", plugin]) == 0  # fmt: skip  (no NoDO add-on: the method alone)
    logged = runs.read_metrics(cli_run, "hinge_test")
    assert [r["step"] for r in logged] == [1, 2] and all(r["loss"] >= 0 for r in logged)

    # the app's job path: a subprocess of the CLI that knows the method only through pref.plugins
    jobs = JobManager(root, poll_s=0.2, env={"OMP_NUM_THREADS": "1"})
    try:
        job = jobs.submit([*fast(root / "from-job"), plugin], stage="Hinge DPO (test)", name="from-job",
                          sft_run=str(cli_run))  # fmt: skip
        st = jobs.wait(job, timeout=300)
        assert st.state == "finished", (st.message, st.log_tail)
    finally:
        jobs.close()
    assert [r["step"] for r in runs.read_metrics(root / "from-job", "hinge_test")] == [1, 2]

    listed = {i.name: i for i in runs.list_runs(root)}
    assert {"from-cli", "from-job"} <= set(listed)
    for name in ("from-cli", "from-job"):
        info = listed[name]
        assert "hinge_test" in info.stages
        assert info.label("hinge_test") == "Hinge DPO (test)", name
