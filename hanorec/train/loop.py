"""The one training loop (SFT and preference training share it).

accelerate handles device placement, mixed precision, gradient accumulation and multi-GPU, so
`accelerate launch -m hanorec sft ...` works with the same entry point. The data order is a seeded
permutation per epoch, so a resumed run skips exactly the micro-batches already consumed and, with the
restored optimizer, scheduler and RNG state, reaches the same weights as an uninterrupted run.

`train_loop` reads as its steps: plan the number of optimizer steps (refusing zero items), resume from the
newest checkpoint or say why it starts over (trimming metrics.jsonl to the resumed step), announce the plan,
then per epoch build the seeded loader and per micro-batch take one accumulation step; after each optimizer
step log (every event: stage, step, total_steps, epoch, elapsed_s, lr and the loss metrics), checkpoint when
due (every save_every steps, at each epoch end, and every save_every_minutes) and honour should_stop.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hanorec.errors import UserError
from hanorec.progress import make_event
from hanorec.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    stopped_early: bool
    last_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    skipped_examples: int = 0  # longer than model.max_length, left out before training
    validation: list[dict] = field(default_factory=list)  # one record per validation (see Validation)
    best: dict | None = None  # the best validation record (step, epoch, metric, value)
    early_stopped: bool = False  # ended by patience, not by should_stop: nothing left to resume
    kept: str = "last"  # which weights the stage's final checkpoint holds: "last" or "best" (by validation)

    def summary(self, stage: str = "sft") -> str:
        """One line on validation and which adapter the stage keeps (empty when there was no validation)."""
        if not self.validation:
            return ""
        b = self.best
        metric = b["metric"]
        curve = ", ".join(f"{r['value']:.4f}" for r in self.validation)
        how = (
            f"stopped early after {len(self.validation)} validations (val {metric} did not improve)"
            if self.early_stopped
            else f"{len(self.validation)} validations"
        )
        kept = (
            f"the stage's adapter is the best validation's (step {b['step']}, epoch {b['epoch']:g})"
            if self.kept == "best"
            else "the stage's adapter is the last step's"
        )
        return f"{stage}: {how}; val {metric} per validation: {curve}; best {b['value']:.4f} at step {b['step']}; {kept}"


@dataclass
class Validation:
    """Validation after every epoch and at the end of training, with optional early stopping.

    evaluate(model) returns metrics (fractions, higher is better) including `metric`; it runs with the model
    in eval mode and the global RNG restored afterwards, so validating never changes the training trajectory
    (a run with validation reaches the same weights step for step as one without, until early stopping ends
    it). patience: stop when `metric` has not improved for this many validations; the stage's final
    checkpoint then holds the best validation's weights. The history, the best record and the best weights
    are in every checkpoint, so a killed run resumes with the same history.
    """

    evaluate: Callable[[torch.nn.Module], dict]
    metric: str
    patience: int | None = None


class _Items(torch.utils.data.Dataset):
    def __init__(self, items, order):
        self.items, self.order = items, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.items[self.order[i]]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return value


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches and optimizer steps a run takes (printed before training starts)."""

    n_items: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    max_steps: int | None
    dropped_per_epoch: int = 0  # items left out of each epoch's order when the last partial micro-batch is dropped

    def describe(self, stage: str) -> str:
        how = f"max_steps={self.max_steps}" if self.max_steps else f"{self.epochs:g} epochs x {self.steps_per_epoch}"
        text = f"{stage}: {self.total_steps} optimizer steps ({how}) over {self.n_items} examples"
        if self.dropped_per_epoch:
            text += (
                f"; the last partial micro-batch of each epoch ({self.dropped_per_epoch} examples of the epoch's "
                "shuffled order) is dropped, as the authors' trainer does"
            )
        return text


LONG_RUN_STEPS = 5000  # above this a CPU run takes hours; the plan says so before it starts


def plan_steps(n_items: int, train_cfg, num_processes: int = 1, drop_last: bool = False) -> StepPlan:
    """drop_last: each epoch leaves out its last partial micro-batch (preference training, where the
    responsiveness eta is a trimmed mean over the micro-batch and a short one would distort it)."""
    if n_items <= 0:
        raise EmptyTrainingSet("there are no training examples, so there is nothing to train on")
    per_micro = train_cfg.batch_size * num_processes
    micro = n_items // per_micro if drop_last else math.ceil(n_items / per_micro)
    if micro == 0:
        raise EmptyTrainingSet(
            f"{n_items} examples do not fill one micro-batch of {per_micro} ({train_cfg.batch_size} per process x "
            f"{num_processes}), and the last partial micro-batch is dropped; lower batch_size or use more examples"
        )
    per_epoch = max(1, math.ceil(micro / train_cfg.grad_accum))
    total = train_cfg.max_steps or max(1, math.ceil(per_epoch * train_cfg.epochs))
    dropped = n_items - micro * per_micro if drop_last else 0
    return StepPlan(n_items, micro, per_epoch, total, train_cfg.epochs, train_cfg.max_steps, dropped)


class EmptyTrainingSet(UserError, ValueError):
    """Training was asked to run over zero items (it would never reach a step)."""


def trim_metrics_log(log_path: Path, through_step: int) -> int:
    """Keep the lines of metrics.jsonl up to `through_step` (a resumed run rewrites what follows); returns
    how many lines were dropped. Lines a killed process left half-written are dropped too."""
    if not log_path.is_file():
        return 0
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= through_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, log_path)
    return dropped


def drop_unrecorded_validations(log_path: Path, history: list[dict]) -> int:
    """Drop validation lines (keys val/...) of steps the resumed checkpoint's history does not hold (a run
    killed between a validation and its checkpoint validates again after resuming); returns how many."""
    if not log_path.is_file():
        return 0
    steps = {r["step"] for r in history}
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if any(k.startswith("val/") for k in row) and row["step"] not in steps:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, log_path)
    return dropped


def config_changes(saved_yaml: Path, current_yaml: str) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config.yaml and the current configuration
    (keys that never change results, like threads and progress_bar, are left out)."""
    import yaml

    if not saved_yaml.is_file() or not current_yaml:
        return []
    try:
        saved, current = yaml.safe_load(saved_yaml.read_text()) or {}, yaml.safe_load(current_yaml) or {}
    except yaml.YAMLError:
        return []
    quiet = {"threads", "progress_bar", "log_with", "keep_checkpoints", "save_every", "save_every_minutes"}

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else []):
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            elif k not in quiet:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(current)
    # a key the checkpoint predates, now at an empty default (pref.plugins = [], pref.hars = false), changes nothing
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and (k in a or b.get(k)))


def nodo_clean_backward(train_cfg) -> bool:
    """Whether stage 2 back-propagates NoDO's LoRA noise as the authors' run does (pref.nodo_backward=clean):
    each decoder layer is checkpointed reentrantly and re-run during backward after the noise hooks are gone."""
    return (
        getattr(train_cfg, "nodo_backward", "noisy") == "clean"
        and getattr(train_cfg, "noise_target", "none") == "lora"
        and getattr(train_cfg, "noise_sigma", 0) > 0
    )


class _Run:
    """The state of one training run and its steps: resume, one micro-batch, log, checkpoint."""

    def __init__(self, *, model, items, collate, loss_fn, train_cfg, seed, output_dir, config_yaml,
                 accelerator, on_log, should_stop, stage, drop_last=False, validation=None, step_eval=None,
                 eval_every=0):  # fmt: skip
        self.items, self.collate, self.loss_fn, self.cfg, self.seed = items, collate, loss_fn, train_cfg, seed
        self.output_dir, self.config_yaml, self.stage = Path(output_dir), config_yaml, stage
        self.acc, self.on_log, self.should_stop = accelerator, on_log, should_stop
        if nodo_clean_backward(train_cfg):  # the authors' NoDO backward: a reentrant, noise-free re-run per layer
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()  # a reentrant segment passes gradients only to inputs that need them
        elif getattr(train_cfg, "gradient_checkpointing", False):  # the model's own layers, non-reentrant
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from hanorec.train.sharding import cpu_fsdp_requested, shard_model

        # accelerate 1.15 ignores an FSDP launch on CPU (runs DDP): shard with torch's FSDP2 ourselves,
        # before the optimizer sees the parameters (hanorec/train/sharding.py says why)
        self.sharded_here = cpu_fsdp_requested(accelerator)
        if validation is not None and (self.sharded_here or accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")):
            # the best-validation weights are copied from this process's parameters, which are shards here
            raise ValueError(
                f"{stage}: early stopping (sft.patience / sft.val_every_epoch) keeps the best epoch's weights from "
                "unsharded parameters and does not run under FSDP or DeepSpeed; drop those settings or train unsharded"
            )
        if self.sharded_here:
            units = shard_model(model)
            accelerator.print(
                f"{stage}: the launch asked for FSDP, which accelerate does not apply to CPU processes; the model "
                f"is sharded with torch FSDP2 instead ({units} transformer blocks + the root)"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (was LoRA added?)")
        self.drop_last = drop_last
        self.plan = plan_steps(len(items), train_cfg, accelerator.num_processes, drop_last)
        self.total_steps = self.plan.total_steps
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        warmup = int(train_cfg.warmup_ratio * self.total_steps)
        scheduler = cosine_with_warmup(optimizer, warmup, self.total_steps)
        if self.sharded_here:  # accelerate would wrap the sharded model in DDP
            self.model = model
            self.optimizer, self.scheduler = accelerator.prepare(optimizer, scheduler)
        else:
            self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        # total_steps already counts optimizer steps over all processes; accelerate's scheduler wrapper would
        # otherwise step num_processes times per optimizer step, ending the schedule N times too early
        self.scheduler.split_batches = True
        self.state = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0, "stage": stage}
        self.validation = validation
        self.step_eval, self.eval_every = step_eval, eval_every
        self.best_weights: dict | None = None  # trainable tensors of the best validation (CPU copies)
        if validation is not None:
            self.state["val"] = {"history": [], "best": None, "since_best": 0, "early_stopped": False, "kept": "last"}
        self.log_path = self.output_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.running: dict[str, list[float]] = {}
        self.last_ckpt: Path | None = None
        self.last_save_time = time.time()
        self.start = time.time()
        self.bar = None

    # ---- start --------------------------------------------------------------------------------------
    def resume(self, enabled: bool) -> None:
        """Continue from the newest checkpoint, or say why the run starts at step 0; the metrics log keeps
        each step once either way."""
        ckpt = latest_checkpoint(self.output_dir) if enabled else None
        if ckpt is not None:
            self.state.update(
                load_checkpoint(
                    ckpt, model=self.acc.unwrap_model(self.model), optimizer=self.optimizer,
                    scheduler=self.scheduler, process_index=self.acc.process_index,
                    num_processes=self.acc.num_processes,
                )  # fmt: skip
            )
            # the metrics of steps since the last log line, so the next line averages the same steps
            self.running = self.state.pop("running", {})
            method_state = self.state.pop("method_state", None)  # a loss's state across batches (beta-DPO)
            if method_state is not None and getattr(self.loss_fn, "method_state", None) is not None:
                self.loss_fn.method_state.clear()
                self.loss_fn.method_state.update(method_state)
            self.last_ckpt = ckpt
            if self.validation is not None:
                self.state.setdefault(
                    "val", {"history": [], "best": None, "since_best": 0, "early_stopped": False, "kept": "last"}
                )
                best_file = ckpt / "best_weights.pt"
                if best_file.is_file():
                    self.best_weights = torch.load(best_file, weights_only=True)
            self.acc.print(f"{self.stage}: resumed from {ckpt} at step {self.state['global_step']}/{self.total_steps}")
            changed = config_changes(ckpt / "config.yaml", self.config_yaml)
            if changed:
                self.acc.print(
                    f"warning: this configuration differs from the checkpoint's in {', '.join(changed[:6])}; "
                    "to start a separate run, give it another --output_dir"
                )
        elif self.log_path.is_file() and self.log_path.stat().st_size:
            why = "resume is off" if not enabled else f"no complete checkpoint under {self.output_dir / 'checkpoints'}"
            self.acc.print(
                f"{self.stage}: starting over at step 0 ({why}); the earlier attempt's logged steps are discarded"
            )
        if self.acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            trim_metrics_log(self.log_path, self.state["global_step"])
            if self.validation is not None:
                drop_unrecorded_validations(self.log_path, self.state["val"]["history"])

    def announce(self) -> None:
        if self.state["global_step"] == 0:
            self.acc.print(self.plan.describe(self.stage))
            if self.total_steps > LONG_RUN_STEPS:
                self.acc.print(
                    f"warning: {self.total_steps} steps is a long run (hours on a CPU); for a quick one set "
                    f"--{'sft' if self.stage == 'sft' else 'pref'}.max_steps=N, or fewer examples with --data.max_users=N or --task.max_train_examples=N"
                )
        if self.cfg.progress_bar and self.acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc=self.stage, dynamic_ncols=True)

    # ---- one epoch's data ------------------------------------------------------------------------
    def epoch_loader(self):
        epoch = self.state["epoch"]
        # The loader's own generator: creating its iterator must not draw from the global torch RNG, or a
        # resumed run (which creates it mid-epoch) would see different dropout masks than an uninterrupted one.
        loader = DataLoader(
            _Items(self.items, epoch_order(len(self.items), self.seed, epoch)),
            batch_size=self.cfg.batch_size,
            shuffle=False,
            drop_last=self.drop_last,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed * 1000 + epoch),
        )
        loader = self.acc.prepare(loader)
        if self.state["micro_in_epoch"]:
            loader = self.acc.skip_first_batches(loader, self.state["micro_in_epoch"])
        return loader

    # ---- one micro-batch -------------------------------------------------------------------------
    def micro_step(self, batch) -> None:
        with self.acc.accumulate(self.model):
            loss, metrics = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss.detach()).all():
                self.diverged(loss)
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.cfg.max_grad_norm:
                self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.state["micro_in_epoch"] += 1
        for k, v in {"loss": loss.detach().float().item(), **metrics}.items():
            self.running.setdefault(k, []).append(float(v))

    def diverged(self, loss) -> None:
        where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"{self.stage} loss became {loss.item()} at step {self.state['global_step'] + 1} "
            f"(epoch {self.state['epoch']}); training stopped and {where}. Lower the learning rate or check the data."
        )

    # ---- after an optimizer step ----------------------------------------------------------------
    @property
    def epoch_progress(self) -> float:
        return self.state["epoch"] + self.state["micro_in_epoch"] / max(1, self.plan.micro_per_epoch)

    def log_step(self) -> None:
        step = self.state["global_step"]
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every and step != self.total_steps:
            return
        record = make_event(
            self.stage, step, self.total_steps, start=self.start, epoch=self.epoch_progress,
            lr=self.scheduler.get_last_lr()[0], **{k: sum(v) / len(v) for k, v in self.running.items()},
        )  # fmt: skip
        self.running = {}
        self.history.append(record)
        if self.acc.is_main_process:
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if self.cfg.log_with:
            self.acc.log(record, step=step)
        if self.on_log is not None:
            self.on_log(record)

    def checkpoint_due(self) -> bool:
        """Every save_every steps, and whenever save_every_minutes have passed since the last checkpoint.

        Saving reads the RNG state but never draws from it, so when checkpoints happen does not change
        training; under several processes the main process's clock decides for all."""
        step = self.state["global_step"]
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            return True
        if not self.cfg.save_every_minutes:
            return False
        due = time.time() - self.last_save_time >= 60 * self.cfg.save_every_minutes
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            due = broadcast_object_list([due])[0]
        return due

    def saved_state(self) -> dict:
        """What a checkpoint records of the run: step, epoch, the metrics not yet logged, and the state a
        loss function carries across batches (``loss_fn.method_state``, e.g. beta-DPO's moving averages)."""
        state = {**self.state, "running": self.running} if self.running else dict(self.state)
        method_state = getattr(self.loss_fn, "method_state", None)
        if method_state is not None:
            state["method_state"] = dict(method_state)
        return state

    def checkpoint(self) -> Path | None:
        """Every process calls it: sharded weights and optimizer state are gathered collectively, then
        the main process alone writes; every process learns the checkpoint's path."""
        from hanorec.train.sharding import gather_for_checkpoint

        self.acc.wait_for_everyone()
        model_state, optimizer_state = gather_for_checkpoint(self.acc, self.model, self.optimizer)
        extra = {"best_weights": self.best_weights} if self.best_weights is not None else {}
        if self.acc.num_processes > 1:  # each process's own RNG: their dropout masks differ (batch shapes)
            from accelerate.utils import gather_object

            from hanorec.train.checkpoint import PROCESS_RNG, rng_state

            extra[PROCESS_RNG] = gather_object([rng_state()])
        if self.acc.is_main_process:
            self.last_ckpt = save_checkpoint(
                self.output_dir,
                model=self.acc.unwrap_model(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state=self.saved_state(),
                config_yaml=self.config_yaml,
                keep=self.cfg.keep_checkpoints,
                model_state_dict=model_state,
                optimizer_state=optimizer_state,
                extra=extra or None,
            )
        else:  # the same name save_checkpoint gives it, so every process decides alike whether a save is due
            self.last_ckpt = self.output_dir / "checkpoints" / f"step-{self.state['global_step']:06d}"
        self.acc.wait_for_everyone()
        self.last_save_time = time.time()
        return self.last_ckpt

    # ---- the whole run --------------------------------------------------------------------------
    def run_epoch(self) -> bool:
        """Train until the epoch ends, the last step, or a stop request; True when training must end."""
        for batch in self.epoch_loader():
            self.micro_step(batch)
            if not self.acc.sync_gradients:
                continue
            self.state["global_step"] += 1
            self.log_step()
            self.evaluate_step()
            if self.checkpoint_due():
                self.checkpoint()
            if self.should_stop is not None and self.should_stop():
                self.stopped = True
                return True
            if self.state["global_step"] >= self.total_steps:
                return True
        self.state["epoch"] += 1
        self.state["micro_in_epoch"] = 0
        validated = self.validate()
        if not self.cfg.save_every or validated:
            self.checkpoint()
        return self.early_stopped

    def evaluate_step(self, force: bool = False) -> None:
        """step_eval at this step when due (every eval_every steps and at the last; force: now, at step 0): the
        model in eval mode under no_grad, the RNG restored after; one metrics.jsonl row of its values."""
        step = self.state["global_step"]
        if self.step_eval is None:
            return
        if not force and step != self.total_steps and (not self.eval_every or step % self.eval_every):
            return
        values = self._evaluate_aside(self.step_eval)
        self._emit(make_event(self.stage, step, self.total_steps, start=self.start, epoch=self.epoch_progress,
                              **{k: float(v) for k, v in values.items()}), step)  # fmt: skip

    def _evaluate_aside(self, evaluate):
        """evaluate(model) with the model in eval mode under no_grad and the RNG restored after, so training
        (and a resume) continues exactly as if it had not run."""
        from hanorec.train.checkpoint import rng_state, set_rng_state

        model = self.acc.unwrap_model(self.model)
        saved, was = rng_state(), model.training
        model.eval()
        try:
            with torch.no_grad():
                return evaluate(model)
        finally:
            model.train(was)
            set_rng_state(saved)

    def _emit(self, event: dict, step: int) -> None:
        """One metrics.jsonl row (main process), the tracker's log and the on_log callback."""
        if self.acc.is_main_process:
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(event) + "\n")
        if self.cfg.log_with:
            self.acc.log(event, step=step)
        if self.on_log is not None:
            self.on_log(event)

    # ---- validation and early stopping ------------------------------------------------------------
    @property
    def early_stopped(self) -> bool:
        return self.validation is not None and self.state["val"]["early_stopped"]

    def validate(self) -> bool:
        """Validate at this step unless already done; True when it ran. Updates the best record and weights,
        counts validations since the best, and sets early_stopped when patience has run out."""
        if self.validation is None:
            return False
        val, step = self.state["val"], self.state["global_step"]
        if val["history"] and val["history"][-1]["step"] == step:
            return False
        model = self.acc.unwrap_model(self.model)
        metrics = self._evaluate_aside(self.validation.evaluate)
        name = self.validation.metric
        value = float(metrics[name])
        record = {"step": step, "epoch": round(self.epoch_progress, 6), "metric": name, "value": value,
                  "metrics": {k: float(v) for k, v in metrics.items()}}  # fmt: skip
        val["history"].append(record)
        best = val["best"]
        if best is None or value > best["value"]:
            val["best"], val["since_best"] = record, 0
            self.best_weights = {
                n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
            }
        else:
            val["since_best"] += 1
        patience = self.validation.patience
        if patience is not None and val["since_best"] >= patience and step < self.total_steps:
            val["early_stopped"] = True
        event = make_event(
            self.stage, step, self.total_steps, start=self.start, epoch=self.epoch_progress,
            **{f"val/{k}": float(v) for k, v in metrics.items()}, **{f"val/best_{name}": val["best"]["value"]},
        )  # fmt: skip
        self._emit(event, step)
        return True

    def keep_best(self) -> bool:
        """With patience: put the best validation's weights in the model (the stage's final adapter); True
        when this changed the run's state (the final checkpoint must then be written again)."""
        if self.validation is None or self.validation.patience is None or self.best_weights is None:
            return False
        val = self.state["val"]
        if val["kept"] == "best":
            return False
        val["kept"] = "best"
        model = self.acc.unwrap_model(self.model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.best_weights:
                    p.copy_(self.best_weights[n].to(p.device, p.dtype))
        return True

    def run(self) -> TrainResult:
        self.stopped = False
        self.model.train()
        if self.state["global_step"] == 0:
            self.evaluate_step(force=True)  # where the curve starts (a resumed run logged it already)
        while self.state["global_step"] < self.total_steps and not self.early_stopped and not self.run_epoch():
            pass
        step = self.state["global_step"]
        changed = False
        if not self.stopped:
            changed = self.validate()
            changed = self.keep_best() or changed
        if changed or self.last_ckpt is None or int(self.last_ckpt.name.split("-")[1]) != step:
            self.checkpoint()
        if self.bar is not None:
            self.bar.close()
        result = TrainResult(step, self.total_steps, self.stopped, self.last_ckpt, self.history, time.time() - self.start)
        if self.validation is not None:
            val = self.state["val"]
            result.validation, result.best = list(val["history"]), val["best"]
            result.early_stopped, result.kept = val["early_stopped"], val["kept"]
        return result


def train_loop(
    *,
    model: torch.nn.Module,
    items: Sequence,
    collate: Callable[[list], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    train_cfg,
    seed: int,
    output_dir: str | Path,
    config_yaml: str,
    accelerator=None,
    resume: bool = True,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "sft",
    drop_last: bool = False,
    validation: Validation | None = None,
    step_eval: Callable[[torch.nn.Module], dict] | None = None,
    eval_every: int = 0,
) -> TrainResult:
    """Train `model` on `items`; loss_fn(model, batch) returns (scalar loss, metrics of floats).

    train_cfg has: epochs, max_steps, lr, batch_size, grad_accum, warmup_ratio, weight_decay,
    max_grad_norm, log_every, save_every, save_every_minutes, keep_checkpoints, progress_bar.
    on_log receives every logged record (stage, step, total_steps, epoch, elapsed_s, lr and the loss
    metrics; the app streams these); should_stop() is polled after every optimizer step and ends the run
    with a checkpoint. Zero items raise EmptyTrainingSet before anything is built. drop_last leaves out each
    epoch's last partial micro-batch (see plan_steps). validation: score after every epoch and at the end,
    with optional early stopping (see Validation); its events carry val/<metric> keys instead of the loss.
    step_eval(model) -> {key: value}: evaluated at step 0, every ``eval_every`` optimizer steps and at the last
    step, in eval mode under no_grad with the RNG restored afterwards (so it never changes training, and a
    resumed run trains the same weights); each call's values go to metrics.jsonl as a row of their own.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if len(items) == 0:
        raise EmptyTrainingSet(f"{stage} has no training examples, so there is nothing to train on")
    output_dir = Path(output_dir)
    if accelerator is None:
        accelerator = Accelerator(
            gradient_accumulation_steps=train_cfg.grad_accum,
            mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision),
            log_with=train_cfg.log_with,
            project_dir=str(output_dir),
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate sees one process: every process would train "
            "alone into the same folder. On CPU launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ..."
        )
    set_seed(seed)
    if train_cfg.log_with:
        accelerator.init_trackers(stage)
    run = _Run(
        model=model, items=items, collate=collate, loss_fn=loss_fn, train_cfg=train_cfg, seed=seed,
        output_dir=output_dir, config_yaml=config_yaml, accelerator=accelerator, on_log=on_log,
        should_stop=should_stop, stage=stage, drop_last=drop_last, validation=validation,
        step_eval=step_eval, eval_every=eval_every,
    )  # fmt: skip
    run.resume(resume)
    run.announce()
    result = run.run()
    if train_cfg.log_with:
        accelerator.end_training()
    return result
