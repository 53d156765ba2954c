"""`python -m hanorec <command> [--config preset.yaml] [--section.key=value ...]`

Commands:
  make-demo   write the bundled demo dataset (deterministic): --out=assets/demo --seed=0; teaching scenarios
              (beyond the paper): --false-negatives=F --preference-noise=F --uneven-density=F --title-noise=F,
              fractions in [0, 1]
  run         data -> SFT -> evaluation, prints a metrics table (resumes an interrupted run)
  sft         stage 1 only
  pref        stage 2 (any registered method by --pref.method, its knobs by --pref.options.NAME=VALUE) from the
              run's SFT checkpoint, then evaluation
  compare     SFT, DPO, S-DPO, HaNo-DPO and its ablations over seeds and tasks: --seeds=0,1,2 (default: the
              configuration's compare_seeds, 42 in the paper presets) --tasks=hit3,hit1
              (--variants=DPO,IPO,... any rows of `methods`, or all; default: the paper's); --from-sft=RUN
              starts every seed from RUN's SFT model; SIGTERM stops it, the same command resumes it
              (--readme=README.md writes the table, command, machine and wall time into the README)
  methods     the registered preference methods and their ablations: loss in one line, needs, paper
  evaluate    evaluate the newest checkpoint of a run's stage (--stage=sft by default, or a preference stage
              folder such as --stage=hano_dpo; or --checkpoint=PATH) with baselines
  export      a stage as a self-contained model: `export --run DIR --stage NAME --out DIR [--merge]` writes the
              base weights with the SFT adapter merged plus the stage's LoRA as a PEFT adapter (or, with --merge,
              everything merged), the tokenizer, processor and chat template, and a model card (README.md)
  export-pairs  the preference pairs a stage trained on, as JSONL in TRL's format:
              `export-pairs --run DIR --stage NAME --out FILE.jsonl`
  estimate    peak GPU memory per device and time per epoch of a preset's SFT and preference stages, with
              gradient checkpointing on and off: activation memory measured on this machine at real width and
              cut depth (--layers=2,4), extrapolated to the full depth; time from FLOPs at an assumed MFU
              (--mfu=0.3) on --gpu=h100 (or h200, a100, l40s, a10g), --gpus=1
  models      list the backbone families: each one's tiny offline preset, the checkpoint types it loads
              (by id from the local cache, or from a folder), example checkpoints and its GPU preset
  --plugins DIR  (with run, sft, pref, compare) import the .py files in DIR, which register more preference
              methods (short for --pref.plugins=[DIR], recorded in the run's config so a resume finds them);
              only the training process imports them, never a command that reads a config
  space       the folder to push to a Hugging Face Space: `space --out DIR [--mode=zerogpu|cpu] [--org=ORG]`
              (README.md with the Space's front matter, requirements.txt, the app and the package; docs/space.md)
  config      print the resolved configuration as YAML: `config --config preset.yaml --sft.lr=3e-4`;
              `config --help` lists every key with its default and help text, and
              `config --config preset.yaml --help` the same with the preset's values

Without --config the built-in defaults are used (the bundled demo data, output in runs/demo).
A user error (bad key or value, missing file, unusable data) ends with one sentence and exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without torchvision (CPU installs) transformers uses its PIL image processors, which is what we want.
warnings.filterwarnings("ignore", message=".*requires torchvision.*")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _quiet_libraries() -> None:
    """Drop the notices a CPU install prints on every run (transformers without torchvision falls back to its
    PIL image processors, which is what we want) and the shard-writing progress bars."""
    import logging

    import transformers

    class _DropTorchvisionNotice(logging.Filter):
        def filter(self, record):
            return "requires torchvision" not in record.getMessage()

    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_DropTorchvisionNotice())
    transformers.utils.logging.disable_progress_bar()


class _StopFlag:
    """SIGINT/SIGTERM ask the training loop to checkpoint and stop; a second SIGINT aborts."""

    def __init__(self):
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def install(self):
        def handler(signum, frame):
            if self.stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop = True
            print(f"\nsignal {signum}: checkpointing and stopping after this step", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return self


def _int_list(name: str, value: str) -> list[int]:
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        from hanorec.config import ConfigError

        raise ConfigError(f"--{name}={value} must be comma-separated integers, e.g. --{name}=0,1,2") from None


def _describe_source(config_path: str | None, overrides: list[str]) -> str:
    src = f"configuration {config_path}" if config_path else "the built-in default configuration (no --config)"
    return src + (f" with {' '.join(overrides)}" if overrides else "")


def _split_args(argv: list[str]) -> tuple[str | None, list[str], dict]:
    config, overrides, extra = None, [], {}
    for arg in argv:
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--plugins="):  # the operator's plug-in folder (or file): short for --pref.plugins=[DIR]
            folder = Path(arg.split("=", 1)[1]).expanduser().resolve()  # absolute: a resume from elsewhere finds it
            overrides.append(f"--pref.plugins=[{folder}]")
        elif arg.startswith(
            ("--checkpoint=", "--out=", "--seeds=", "--tasks=", "--variants=", "--readme=", "--stage=", "--from-sft=",
             "--run=")
        ):
            k, v = arg[2:].split("=", 1)
            extra[k] = v
        else:
            overrides.append(arg)
    return config, overrides, extra


def _space(args: list[str]) -> int:
    from hanorec.config import ConfigError
    from hanorec.space_bundle import write_space

    opts = {}
    for a in args:
        flag, sep, value = a.partition("=")
        if flag not in ("--out", "--mode", "--org") or not sep or not value:
            raise ConfigError(f"space takes --out=DIR, --mode=zerogpu|cpu and --org=ORG, not {a!r}")
        opts[flag[2:]] = value
    if "out" not in opts:
        raise ConfigError("space needs --out DIR, a new folder to write the Space into")
    out = write_space(opts["out"], mode=opts.get("mode", "zerogpu"), org=opts.get("org"))
    print(f"Space folder written to {out} (mode {opts.get('mode', 'zerogpu')}); push it as docs/space.md says")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    # accept "--config path" as well as "--config=path"
    fixed = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--config", "--checkpoint", "--out", "--stage", "--run", "--plugins", "--mode", "--org") and i + 1 < len(rest):
            fixed.append(f"{rest[i]}={rest[i + 1]}")
            i += 2
        else:
            fixed.append(rest[i])
            i += 1
    from hanorec.config import ConfigError, describe, load_config
    from hanorec.errors import UserError
    from hanorec.models import check_model_name
    from hanorec.progress import StopRequested

    user_errors = (UserError, FileNotFoundError)  # every package error a user can fix, and a missing file

    try:
        if command == "make-demo":
            from hanorec.data import make_demo

            _, over, extra = _split_args(fixed)
            seed, planted = 0, {}
            scenario_flags = {"--false-negatives": "false_negatives", "--preference-noise": "preference_noise",
                              "--uneven-density": "uneven_density", "--title-noise": "title_noise"}  # fmt: skip
            for o in over:
                flag, _, value = o.partition("=")
                if flag == "--seed":
                    try:
                        seed = int(value)
                    except ValueError:
                        raise ConfigError(f"{o} must be an integer, e.g. --seed=0") from None
                elif flag in scenario_flags:
                    try:
                        planted[scenario_flags[flag]] = float(value)
                    except ValueError:
                        raise ConfigError(f"{o} must be a fraction in [0, 1], e.g. {flag}=0.3") from None
                    if not 0 <= planted[scenario_flags[flag]] <= 1:
                        raise ConfigError(f"{o} must be a fraction in [0, 1], e.g. {flag}=0.3")
                else:
                    raise ConfigError(
                        f"make-demo takes --out=DIR, --seed=N and the scenario fractions {list(scenario_flags)}, "
                        f"not {o!r}"
                    )
            out = make_demo(extra.get("out", "assets/demo"), seed=seed, **planted)
            print(f"demo dataset written to {out}")
            from hanorec.data import read_scenario, scenario_sentences

            for line in scenario_sentences(read_scenario(out)):
                print(line)
            return 0
        if command == "methods":
            from hanorec import methods

            print(methods.format_table())
            return 0
        if command == "models":
            from hanorec.models import format_models

            if fixed:
                raise ConfigError(f"models takes no options, not {fixed[0]!r}")
            print(format_models())
            return 0
        if command == "config" and any(a in ("--help", "-h") for a in fixed):
            config_path, overrides, _ = _split_args([a for a in fixed if a not in ("--help", "-h")])
            if config_path or overrides:
                print(f"# every key with its value in {_describe_source(config_path, overrides)}")
                print(describe(load_config(config_path, overrides)))
            else:
                print(describe())
            return 0
        if command in ("export", "export-pairs"):
            return _export(command, fixed, argv)
        if command == "estimate":
            return _estimate(fixed)
        if command == "space":
            return _space(fixed)
        config_path, overrides, extra = _split_args(fixed)
        cfg = load_config(config_path, overrides)
        if command == "config":
            print(cfg.to_yaml())
            return 0
        if command in ("run", "sft", "pref", "compare"):
            from hanorec import methods

            try:  # this process trains: the run's plug-ins (operator code) are imported now, never when read
                cfg.pref.options = methods.activate(cfg.pref)
            except methods.MethodError as e:
                raise ConfigError(str(e)) from None
        if command in ("run", "sft", "pref", "compare", "evaluate"):
            check_model_name(cfg.model.name, cfg.model.init)  # before any data is loaded
            _quiet_libraries()
            if cfg.threads:
                import torch

                torch.set_num_threads(cfg.threads)
            print(f"{command}: {_describe_source(config_path, overrides)}; output in {cfg.output_dir}")
        from hanorec import pipeline

        if command in ("run", "sft", "pref"):
            from hanorec.runs import track_status

            stop = _StopFlag().install()
            with track_status(cfg.output_dir, command, stop):
                if command == "run":
                    pipeline.run_pipeline(cfg, should_stop=stop)
                elif command == "pref":
                    pipeline.run_preference_pipeline(cfg, should_stop=stop)
                else:
                    _, result = pipeline.run_sft(cfg, should_stop=stop)
                    print(
                        f"SFT finished at step {result.global_step}/{result.total_steps}; "
                        f"checkpoint {result.last_checkpoint}"
                    )
            return 0
        if command == "compare":
            seeds = _int_list("seeds", extra["seeds"]) if "seeds" in extra else list(cfg.compare_seeds)
            tasks = [t for t in extra.get("tasks", "hit3,hit1").split(",") if t]
            from hanorec.tasks import TASKS

            bad = [t for t in tasks if t not in TASKS] or ([] if seeds and tasks else ["(none)"])
            if bad:
                raise ConfigError(f"--tasks names {bad[0]!r}; use some of {list(TASKS)}, comma-separated, and at least one seed")
            from hanorec import methods

            offered = methods.variants()
            if extra.get("variants") == "all":
                variants = list(offered)
            else:
                variants = extra["variants"].split(",") if "variants" in extra else list(methods.paper_variants())
            unknown = [v for v in variants if v not in offered]
            if unknown:
                raise ConfigError(
                    f"unknown variant {unknown[0]!r}; use some of {list(offered)} "
                    "(python -m hanorec methods lists them), or all"
                )
            from hanorec.runs import track_status, write_status

            stop = _StopFlag().install()

            def progress(p: dict) -> None:  # the job queue and the Compare tab read it from status.json
                write_status(cfg.output_dir, "running", command="compare", **p)

            with track_status(cfg.output_dir, "compare", stop):
                pipeline.run_comparison(
                    cfg,
                    seeds=seeds,
                    tasks=tasks,
                    variants=variants,
                    readme=extra.get("readme"),
                    command=".venv/bin/python -m hanorec " + " ".join(argv),
                    sft_run=extra.get("from-sft"),
                    should_stop=stop,
                    on_progress=progress,
                )
            return 0
        if command == "evaluate":
            from hanorec.eval import format_results
            from hanorec.runs import load_stage

            stage = extra.get("stage", "sft")
            data = pipeline.prepare_data(cfg, for_training=False)
            bundle = load_stage(cfg.output_dir, stage, extra.get("checkpoint"))
            print(f"scoring {stage} checkpoint {bundle.meta['checkpoint']}")
            ev = pipeline.run_eval(cfg, bundle, data, method="SFT" if stage == "sft" else stage)
            print(format_results(cfg.task.name, ev.rows, split=cfg.eval.split, split_policy=cfg.data.split_policy))
            return 0
        raise ConfigError(f"unknown command {command!r}; run `python -m hanorec --help`")
    except StopRequested as e:
        print(f"stopped during {e.stage} ({e.step}/{e.total_steps}); nothing is lost: run the same command again",
              file=sys.stderr)  # fmt: skip
        return 0
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _estimate(args: list[str]) -> int:
    """`estimate --config FILE [--layers=2,4] [--mfu=0.3] [--gpu=h100] [--gpus=1] [--section.key=value ...]`."""
    from hanorec.config import ConfigError, load_config
    from hanorec.estimate import GPUS, estimate

    opts = {"layers": "2,4", "mfu": "0.3", "gpu": "h100", "gpus": "1"}
    rest = []
    for a in args:
        key = a[2:].split("=", 1)[0] if a.startswith("--") and "=" in a else None
        if key in opts:
            opts[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    config_path, overrides, extra = _split_args(rest)
    if extra:
        raise ConfigError(f"estimate takes --config, --layers, --mfu, --gpu, --gpus and config keys, not --{next(iter(extra))}")
    layers = _int_list("layers", opts["layers"])
    if len(set(layers)) < 2 or min(layers) < 1:
        raise ConfigError(f"--layers={opts['layers']} must name at least two different depths, e.g. --layers=2,4")
    try:
        mfu, gpus = float(opts["mfu"]), int(opts["gpus"])
    except ValueError:
        raise ConfigError(f"--mfu={opts['mfu']} must be a fraction in (0, 1] and --gpus={opts['gpus']} a count") from None
    if not 0 < mfu <= 1 or gpus < 1 or opts["gpu"] not in GPUS:
        raise ConfigError(f"--mfu must be in (0, 1], --gpus at least 1 and --gpu one of {list(GPUS)}")
    cfg = load_config(config_path, overrides)
    _quiet_libraries()
    import torch

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    print(f"estimate: {_describe_source(config_path, overrides)}")
    estimate(cfg, layers=sorted(set(layers)), mfu=mfu, gpu=opts["gpu"], n_gpus=gpus)
    return 0


def _export(command: str, args: list[str], argv: list[str]) -> int:
    """`export` and `export-pairs` (hanorec.export): --run, --stage, --out [, --merge]."""
    from hanorec.config import ConfigError
    from hanorec.export import export_pairs, export_stage

    merge = "--merge" in args
    _, rest, extra = _split_args([a for a in args if a != "--merge"])
    if rest or (merge and command != "export"):
        bad = rest[0] if rest else "--merge"
        raise ConfigError(f"{command} takes --run=DIR, --stage=NAME and --out=PATH{' [--merge]' if command == 'export' else ''}, not {bad!r}")
    missing = [k for k in ("run", "out") if not extra.get(k)]
    if missing:
        raise ConfigError(f"{command} needs --{missing[0]}=..., e.g. `python -m hanorec {command} --run runs/demo "
                          f"--stage {'hano_dpo' if command == 'export-pairs' else 'sft'} --out exported`")  # fmt: skip
    _quiet_libraries()
    if command == "export":
        stage = extra.get("stage", "sft")
        out = export_stage(extra["run"], stage, extra["out"], merge=merge, checkpoint=extra.get("checkpoint"),
                           command="python -m hanorec " + " ".join(argv))  # fmt: skip
        how = "all adapters merged" if merge else "merged base + PEFT adapter in adapter/"
        print(f"exported {stage} of {extra['run']} to {out} ({how}); model card: {out / 'README.md'}")
        return 0
    path, n = export_pairs(extra["run"], extra.get("stage", "hano_dpo"), extra["out"])
    print(f"wrote {n} preference pairs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
