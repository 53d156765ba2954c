"""HaNoRec Studio explorer: `python app/main.py` (see app/README.md).

Runs from a fresh clone without installing the package: the repository root goes on sys.path first.
Offline: nothing is fetched from a model hub; the bundled demo data is the default data folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# background runs are CLI subprocesses: they find the package the same way, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import warnings  # noqa: E402

DEFAULT_DATA = ROOT / "assets" / "demo"
TABS = ("data", "train", "hardness", "noise")
TAB_TITLES = {"data": "Data", "train": "Train", "hardness": "Hardness", "noise": "Noise lab"}
INTRO = (
    "# HaNoRec Studio\n"
    "Multimodal-LLM sequential recommendation with SFT and **HaNo-DPO** (DPO with hardness-aware beta, HaRS, "
    "and Gaussian noise on the policy, NoDO; arXiv 2511.18740). "
    "**Data**: a user's history and the task's prompt. **Train**: launch and watch small runs. "
    "**Hardness**: the negatives' lambda and beta. **Noise lab**: how noise moves the candidates' scores."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app/main.py",
        description="HaNoRec Studio explorer (Gradio). Host and port come from GRADIO_SERVER_NAME and "
        "GRADIO_SERVER_PORT (default 127.0.0.1:7860).",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help="a data folder the app may read (a dataset, or a folder of datasets); repeatable; "
        f"default: the bundled demo ({DEFAULT_DATA.relative_to(ROOT)})",
    )
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of training runs (default: runs/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads for scoring (default 0 = auto: 1 on machines with up to 4 cores, where the tiny "
        "models run as fast on one thread and more threads spin-wait when the cores are shared)",
    )
    p.add_argument("--share", action="store_true", help="also open a public Gradio link (needs internet)")
    return p.parse_args(argv)


def make_context(data_dirs=None, runs_dir="runs", device="auto", threads=0):
    """The AppContext for these folders: missing data folders are an error, the runs folder is created.
    torch is imported only when the first model loads, so the page is served sooner."""
    dirs = [Path(d).expanduser().resolve() for d in (data_dirs or [DEFAULT_DATA])]
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"The data folder {d} does not exist.")
    from app.common import AppContext  # gradio: imported once the arguments are known to be good
    runs = Path(runs_dir).expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    jobs = _job_manager(runs, None if device == "auto" else device)
    return AppContext(data_dirs=dirs, runs_dir=runs, device=device, jobs=jobs, threads=threads)


def _job_manager(runs: Path, device: str | None):
    from hanorec.jobs import JobManager

    return JobManager(runs, device=device)


def build_app(ctx):
    import gradio as gr

    import app.tabs as tabs

    gr.set_static_paths([str(d) for d in ctx.data_dirs])  # item images are served from their files directly
    with gr.Blocks(title="HaNoRec Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        for name in TABS:
            with gr.Tab(TAB_TITLES[name], id=name, elem_id=f"tab-{name}"):
                tabs.build(name, ctx)
    demo.queue(default_concurrency_limit=2)
    return demo


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        ctx = make_context(args.data, args.runs, args.device, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    demo = build_app(ctx)
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    device = "auto (cuda when available, chosen when the first model loads)" if args.device == "auto" else args.device
    print(f"HaNoRec Studio: data {', '.join(map(str, ctx.data_dirs))}; runs {ctx.runs_dir}; device {device}")
    demo.launch(server_name=host, server_port=port, share=args.share, allowed_paths=[str(d) for d in ctx.data_dirs])


if __name__ == "__main__":
    main()
