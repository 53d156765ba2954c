"""Stage 2: any registered preference method (hanorec.methods; DPO, S-DPO, HaNo-DPO, the baselines) on the
shared training loop (method.md sections 6-9).

- The SFT adapter is merged into the base weights and a fresh LoRA is trained on top; the reference
  model is that same network with the adapter disabled (`disable_adapter()`), never a second copy.
- HaRS: lambda_n per pair is computed once from the SFT model's item embeddings (cached on disk);
  the responsiveness eta is computed per micro-batch over the batch gathered across processes.
- NoDO: Gaussian noise on the policy's LoRA factors (or logits) on training forwards only; by default
  one draw per forward of the micro-batch, shared by all its rows (pref.noise_draw=micro_batch, as the
  authors' code does), or one draw per example, shared by its chosen and rejected rows (=example).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hanorec.data import RecDataset
from hanorec.models import ModelBundle, add_lora
from hanorec.noise import LoRANoise, add_logit_noise
from hanorec.pairs import PreferencePair
from hanorec.scoring import multi_completion_logps, pack_shared_prefix
from hanorec.tasks import render
from hanorec.train.checkpoint import load_adapter_weights
from hanorec.train.loop import TrainResult, train_loop
from hanorec.train.refcache import pair_key


@dataclass
class PrefItem:
    """One training item: the pair, its hardness weight, and (optionally) precomputed reference log-probs."""

    pair: PreferencePair
    hardness_lambda: float = 1.0
    ref_logps: tuple[float, ...] | None = None  # (chosen, rejected_1..K[, chosen with the images blanked])


def build_preference_items(
    cfg, bundle: ModelBundle, ds: RecDataset, examples, cache_dir: Path, *, on_log=None, should_stop=None
) -> list[PrefItem]:
    """Pairs (seeded or embedding-nearest negatives) from training examples, with HaRS lambdas (eq. 6-8).

    lambda_n comes from the SFT model's item embeddings (cached under cache_dir, keyed by the SFT weights);
    it is 1 unless the method uses HaRS with hardness on (hanorec.methods.uses_hardness).
    """
    from hanorec import methods
    from hanorec.hardness import item_embeddings, pair_hardness
    from hanorec.pairs import build_pairs

    p = cfg.pref
    emb = None
    if p.negative_sampling == "embedding":
        ids, e = item_embeddings(bundle, ds, on_log=on_log, should_stop=should_stop)
        emb = dict(zip(ids, e))
    pairs = build_pairs(
        list(examples[: p.max_pairs]),  # format only the examples paired
        ds,
        seed=cfg.seed if p.pair_seed is None else p.pair_seed,
        k_negatives=p.k_negatives,
        sampling=p.negative_sampling,
        item_embeddings=emb,
        swap=ds.scenario.get("preference_noise", 0.0),  # a teaching scenario (hanorec.data.SCENARIOS)
    )
    if methods.uses_hardness(p):
        lam = pair_hardness(
            bundle,
            ds,
            pairs,
            k=p.hardness_k,
            temperature=getattr(p, "hars_temperature", 1.0),
            cache_dir=cache_dir,
            model_key=bundle.meta.get("sft_checkpoint", bundle.name),
            on_log=on_log,
            should_stop=should_stop,
        )["lambda"].tolist()
    else:
        lam = [1.0] * len(pairs)
    return [PrefItem(pair, float(x)) for pair, x in zip(pairs, lam)]


def merge_sft_adapter(bundle: ModelBundle, lora_cfg, adapter_dir: str | Path, seed: int = 0) -> ModelBundle:
    """Load the SFT adapter, merge it into the base weights, then add a fresh LoRA for stage 2 (its init
    seeded by `seed`, so a variant's result does not depend on what ran before it in the process)."""
    add_lora(bundle, lora_cfg, seed=seed)
    load_adapter_weights(bundle.model, Path(adapter_dir))
    bundle.model = bundle.model.merge_and_unload()
    add_lora(bundle, lora_cfg, seed=seed)
    return bundle


def _encode(bundle: ModelBundle, ds: RecDataset, items: Sequence[PrefItem]):
    prompts, completions = [], []
    for it in items:
        r = render(it.pair.example, ds)
        prompts.append(bundle.encode_prompt(r.text, r.images))
        completions.append([bundle.encode_completion(c) for c in (it.pair.chosen, *it.pair.rejected)])
    return prompts, completions


def make_pref_collate(bundle: ModelBundle, ds: RecDataset):
    def collate(items: list[PrefItem]) -> dict:
        prompts, completions = _encode(bundle, ds, items)
        return {
            "prompts": prompts,
            "completions": completions,
            "lambda": torch.tensor([it.hardness_lambda for it in items], dtype=torch.float32),
            "ref": torch.tensor([it.ref_logps for it in items]) if items[0].ref_logps is not None else None,
            "keys": [pair_key(it.pair) for it in items],  # what a shared reference cache keys the batch by
        }

    return collate


def _stack(logps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    all_ = torch.stack(logps)  # (B, 1+K)
    return all_[:, 0], all_[:, 1:]


@torch.no_grad()
def reference_logps(model, bundle, prompts, completions, mode: str, dtype=None, packed=None) -> torch.Tensor:
    """Log-probs under the reference: the policy with its adapter disabled. (B, 1+K).

    packed: the step's :func:`hanorec.scoring.pack_shared_prefix` batch, shared with the policy forward."""
    return torch.stack(_reference_sums(model, bundle, prompts, completions, mode, dtype, packed))


@torch.no_grad()
def _reference_sums(model, bundle, prompts, completions, mode: str, dtype=None, packed=None) -> list:
    """:func:`reference_logps` as one (C_i,) tensor per prompt (prompts may hold different counts)."""
    with _adapter_disabled(model):
        sums, _ = multi_completion_logps(
            model, bundle, prompts, completions, mode=mode, dtype=dtype, packed=packed
        )
    return sums


def imageless_prompt(prompt):
    """The prompt with every image blanked: its normalised pixel values set to 0 (the image processor's
    mean colour); the image tokens, the image grid and so the positions and the attention stay as they are
    (mDPO's image-conditional term, hanorec/methods/mdpo.py). A prompt without images is returned as is."""
    from dataclasses import replace

    if prompt.pixel_values is None:
        return prompt
    return replace(prompt, pixel_values=torch.zeros_like(prompt.pixel_values))


def with_imageless(prompts: list, completions: list) -> tuple[list, list]:
    """The rows of a step whose method declares ``needs_imageless``: the B examples as they are, then B
    more prompts with their images blanked, each followed by its example's chosen answer only. They are
    packed, scored by the reference and the policy, and noised together (the shared-prefix path)."""
    return [*prompts, *(imageless_prompt(p) for p in prompts)], [*completions, *([cs[0]] for cs in completions)]


def _split_rows(sums: list, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the B examples' (B, 1+K) values, the imageless chosen rows' (B,) values or None)."""
    main = torch.stack(list(sums[:n]))
    return main, (torch.stack([s[0] for s in sums[n:]]) if len(sums) > n else None)


@contextlib.contextmanager
def _adapter_disabled(model):
    """``model.disable_adapter()``, minus peft's model-status survey on every call (a few ms of a tiny
    model's step) where it is known to be moot: a LoRA-type PeftModel whose adapters are enabled, without
    trained biases. The layers are switched off and back on by the same peft calls."""
    from peft import PeftModel

    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    plain = (
        isinstance(model, PeftModel)
        and config is not None
        and not config.is_prompt_learning
        and not config.is_adaption_prompt
        and getattr(config, "bias", "none") == "none"
        and not model._adapters_disabled
    )
    if not plain:
        with model.disable_adapter():
            yield
        return
    model.base_model.disable_adapter_layers()
    model._adapters_disabled = True
    try:
        yield
    finally:
        model.base_model.enable_adapter_layers()
        model._adapters_disabled = False


def make_pref_loss(
    cfg, bundle: ModelBundle, accelerator, noise: LoRANoise | None, reference_cache=None
) -> Callable:
    """loss_fn(model, batch) -> (loss, metrics) for cfg.pref's registered method. A method that carries state
    across batches keeps it in ``loss_fn.method_state`` (saved in checkpoints by the training loop).
    reference_cache: a :class:`hanorec.train.refcache.ReferenceScope`; a micro-batch whose reference sums it
    keeps skips the reference forward (the kept values are a step's own), one it lacks is stored there."""
    from hanorec import methods
    from hanorec.methods.hars import hars_beta

    p = cfg.pref
    method = methods.get(p.method)
    hars_addon = method.hars == "addon" and methods.hars_active(p)
    peft_model = bundle.model
    state = method.init_state() if method.stateful else None

    pending = [contextlib.ExitStack()]  # the last step's NoDO context while its backward has not run

    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict]:
        pending[0].close()  # a step whose backward never ran (its loss was not finite) left it open
        stack = contextlib.ExitStack()
        try:
            loss, metrics = step(model, batch, stack)
        except BaseException:
            stack.close()
            raise
        if loss.requires_grad and p.nodo_backward != "clean":
            _close_after_backward(loss, stack)
            pending[0] = stack
        else:
            stack.close()
        return loss, metrics

    def step(model, batch: dict, noise_context: contextlib.ExitStack) -> tuple[torch.Tensor, dict]:
        device = accelerator.device
        dtype = next(peft_model.parameters()).dtype
        prompts = [_to(pr, device) for pr in batch["prompts"]]
        completions = batch["completions"]
        n_ex = len(prompts)
        if method.needs_imageless:  # one more row per example: its chosen answer, the images blanked
            prompts, completions = with_imageless(prompts, completions)
        packed = None
        if p.scoring == "shared_prefix":
            # one packing and one pass of the frozen vision tower serve the reference and the policy forward
            # (under the autocast the prepared model's forward runs in, so mixed precision sees the same)
            with getattr(accelerator, "autocast", contextlib.nullcontext)():
                packed = pack_shared_prefix(peft_model, bundle, prompts, completions, dtype=dtype, device=device)
        ref_imageless = None
        if batch["ref"] is not None:  # precomputed: (B, 1+K), then the imageless chosen when needed
            ref = batch["ref"].to(device)
            if method.needs_imageless:
                ref, ref_imageless = ref[:, :-1], ref[:, -1]
        elif method.needs_reference:
            keys = batch.get("keys") if reference_cache is not None else None
            sums = None
            if keys is not None:
                sums = reference_cache.lookup(keys, method.needs_imageless, [len(c) for c in completions])
            if sums is None:
                sums = _reference_sums(peft_model, bundle, prompts, completions, p.scoring, dtype, packed)
                if keys is not None:
                    reference_cache.store(keys, method.needs_imageless, sums)
            else:
                sums = [s.to(device) for s in sums]
            ref, ref_imageless = _split_rows(sums, n_ex)
        else:  # a reference-free loss: no reference forward
            ref = torch.zeros(n_ex, len(completions[0]), device=device)
            ref_imageless = torch.zeros(n_ex, device=device) if method.needs_imageless else None
        transform = None
        if p.noise_target == "logits" and p.noise_sigma > 0:

            def transform(z):
                return add_logit_noise(z, p.noise_sigma)

        if noise is not None:
            groups = None  # micro_batch: one draw for every row of the forward (method.md section 8)
            if p.noise_draw == "example":
                # one draw per example, shared by its chosen and rejected completions: shared-prefix packs
                # one row per example, naive has one row per completion
                groups = torch.arange(len(prompts), device=device) % n_ex  # an imageless row: its example's
                if p.scoring != "shared_prefix":
                    groups = groups.repeat_interleave(torch.tensor([len(c) for c in completions], device=device))
            # noisy: open until backward has run (gradient checkpointing re-runs the forward then, under the same
            # draw); clean: closed when the forward ends, drawn up front, so the reentrant re-run is noise-free
            clean = p.nodo_backward == "clean"
            noise_context.enter_context(noise.active(group_ids=groups, eager=clean))
        sums, counts = multi_completion_logps(
            model, bundle, prompts, completions, mode=p.scoring, logits_transform=transform, dtype=dtype,
            packed=packed,
        )  # fmt: skip
        pol_all, pol_imageless = _split_rows(sums, n_ex)
        pol_c, pol_r = pol_all[:, 0], pol_all[:, 1:]  # (B,), (B, K)
        ref_c, ref_r = ref[:, 0].to(pol_c.dtype), ref[:, 1:].to(pol_c.dtype)
        lengths = torch.stack(counts[:n_ex]).float()  # (B, 1+K) completion token counts
        lb = methods.LossBatch(
            policy_chosen=pol_c, policy_rejected=pol_r, ref_chosen=ref_c, ref_rejected=ref_r,
            chosen_lengths=lengths[:, 0].to(device), rejected_lengths=lengths[:, 1:].to(device),
            hardness_lambda=batch["lambda"].to(device), gather=accelerator.gather,
            policy_imageless=pol_imageless,
            ref_imageless=None if ref_imageless is None else ref_imageless.to(pol_c.dtype),
        )  # fmt: skip
        beta, eta = (hars_beta(lb, p) if hars_addon else (p.beta, None))
        out = method.loss(lb, p, beta, state)
        if eta is not None and out.eta is None:
            out.eta = eta
        loss = out.total()
        # the KL needs reference log-probs: a reference-free loss (SimPO) has none unless they were precomputed
        has_ref = batch["ref"] is not None or method.needs_reference
        kl = completion_kl(pol_all.detach(), ref.to(pol_c.dtype)).mean().item() if has_ref else None
        metrics = step_metrics(out, pol_c, pol_r, batch["lambda"] if methods.uses_hardness(p) else None,
                               p.noise_sigma if p.noise_target != "none" else 0.0, kl=kl)  # fmt: skip
        return loss, metrics

    loss_fn.close_noise = lambda: pending[0].close()
    loss_fn.method_state = state
    return loss_fn


def completion_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per prompt over its scored completions: (B, 1+K) summed log-probs of the chosen
    and rejected completions under each model -> (B,).

    Each model's probabilities are renormalised over the prompt's completions (a softmax of the summed
    log-probs), so the value is the KL between the two models' choices among those answers: 0 when the
    policy ranks them with the reference's relative odds, whatever it does elsewhere. It costs nothing beyond
    the step's own forwards. For one rejected completion it is the KL of two Bernoullis whose log-odds are
    the policy's and the reference's chosen-minus-rejected margins (docs/method.md section 6)."""
    log_p = torch.log_softmax(policy.double(), dim=-1)
    log_q = torch.log_softmax(reference.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def step_metrics(
    out, pol_c: torch.Tensor, pol_r: torch.Tensor, lam: torch.Tensor | None, sigma: float, kl: float | None = None
) -> dict:
    """The logged values of one preference step (their names: hanorec.logkeys); kl: the mean
    :func:`completion_kl` of the step (None for a reference-free loss: the key is left out)."""
    from hanorec import logkeys as K

    rej_reward = out.rejected_rewards if out.rejected_rewards.dim() == 1 else out.rejected_rewards.mean(1)
    extra = {} if kl is None else {K.KL_REFERENCE: kl}
    return {
        K.REWARD_CHOSEN: out.chosen_rewards.mean().item(),
        K.REWARD_REJECTED: rej_reward.mean().item(),
        K.REWARD_ACCURACY: (out.chosen_rewards > rej_reward).float().mean().item(),
        K.REWARD_MARGIN: (out.chosen_rewards - rej_reward).mean().item(),
        K.LOGP_CHOSEN: pol_c.detach().mean().item(),
        K.LOGP_REJECTED: pol_r.detach().mean().item(),
        K.BETA_MEAN: out.beta.mean().item(),
        K.LAMBDA_MEAN: lam.mean().item() if lam is not None else 1.0,
        K.ETA: float(out.eta) if out.eta is not None else 1.0,
        K.NOISE_SIGMA: sigma,
        **extra,
        **out.logged,
    }


TIE_NATS = 1e-6  # held-out pairs whose two log-ratios differ by less than this count as ties (half right)


def pair_accuracy(
    policy: torch.Tensor, reference: torch.Tensor, tie: float = TIE_NATS
) -> tuple[float, float]:
    """(accuracy, mean KL) of held-out pairs from (N, 1+K) summed log-probs under the policy and the reference.

    A pair is right when its chosen completion's log-ratio log pi/pi_ref exceeds a rejected one's (DPO's
    implicit reward with beta = 1; every rejected completion is compared, ties count half), so the policy at
    step 0, which equals the reference, scores exactly 0.5. The KL is :func:`completion_kl`'s mean."""
    ratio = policy.double() - reference.double()
    diff = ratio[:, :1] - ratio[:, 1:]  # (N, K)
    right = (diff > tie).double() + 0.5 * (diff.abs() <= tie).double()
    return float(right.mean()), float(completion_kl(policy, reference).mean())


class HeldOutPairs:
    """pref.eval_pairs fixed validation pairs, their reference log-probs scored once (adapter disabled); calling
    it with the policy returns {eval/pair_accuracy, eval/kl_reference, eval/logps/chosen, eval/logps/rejected}. Scored in eval mode without noise or
    gradients; the training loop restores the RNG afterwards, so evaluating never changes training."""

    def __init__(self, bundle: ModelBundle, ds: RecDataset, items: Sequence[PrefItem], mode: str, batch_size: int = 8):
        self.bundle, self.mode, self.batch_size = bundle, mode, batch_size
        self.encoded = [_encode(bundle, ds, items[k : k + batch_size]) for k in range(0, len(items), batch_size)]
        self.reference = self._score(bundle.model, reference=True)

    def _score(self, model, reference: bool = False) -> torch.Tensor:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        was = model.training
        model.eval()
        rows = []
        try:
            for prompts, completions in self.encoded:
                moved = [_to(pr, device) for pr in prompts]
                if reference:
                    rows.append(reference_logps(model, self.bundle, moved, completions, self.mode, dtype).cpu())
                else:
                    with torch.no_grad():
                        sums, _ = multi_completion_logps(
                            model, self.bundle, moved, completions, mode=self.mode, dtype=dtype
                        )
                    rows.append(torch.stack(sums).cpu())
        finally:
            model.train(was)
        return torch.cat(rows).double()

    def __call__(self, model) -> dict:
        from hanorec import logkeys as K

        policy = self._score(model)
        acc, kl = pair_accuracy(policy, self.reference)
        return {K.EVAL_PAIR_ACCURACY: acc, K.EVAL_KL_REFERENCE: kl, K.EVAL_LOGP_CHOSEN: float(policy[:, 0].mean()),
                K.EVAL_LOGP_REJECTED: float(policy[:, 1:].mean())}  # fmt: skip


def _close_after_backward(loss: torch.Tensor, context: contextlib.ExitStack) -> None:
    """Close ``context`` (the step's NoDO context) when the backward pass through ``loss`` has finished.

    With gradient checkpointing, backward re-runs the policy's forward; inside the still open context the
    LoRA noise hooks reuse (and replay) the step's draw, so the re-run computes what the original forward
    did. Without checkpointing nothing runs forward during backward and keeping the context open changes
    nothing."""

    def at_backward_start(grad):
        torch.autograd.Variable._execution_engine.queue_callback(context.close)

    loss.register_hook(at_backward_start)


def disable_dropout(model: torch.nn.Module) -> Callable[[], None]:
    """Set every ``nn.Dropout`` of ``model`` (LoRA's lora_dropout included) to p = 0, as TRL's
    ``disable_dropout_in_model`` (which LLaMA-Factory's DPO trainer calls by default); returns the function
    that puts the old values back."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0

    def restore() -> None:
        for m, value in saved:
            m.p = value

    return restore


def _to(prompt, device):
    from dataclasses import replace

    return replace(
        prompt,
        pixel_values=None if prompt.pixel_values is None else prompt.pixel_values.to(device),
        image_grid_thw=None if prompt.image_grid_thw is None else prompt.image_grid_thw.to(device),
    )


def precompute_reference(
    bundle, ds, items: list[PrefItem], mode: str, batch_size: int = 8, imageless: bool = False
) -> list[PrefItem]:
    """Score every pair once under the reference (adapter disabled), so training skips that forward.
    imageless: also the chosen answer with the prompt's images blanked, stored last (mDPO)."""
    from dataclasses import replace

    model = bundle.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts, completions = _encode(bundle, ds, chunk)
        prompts = [_to(p, device) for p in prompts]
        if imageless:
            prompts, completions = with_imageless(prompts, completions)
        ref, ref_imageless = _split_rows(_reference_sums(model, bundle, prompts, completions, mode, dtype), len(chunk))
        if ref_imageless is not None:
            ref = torch.cat([ref, ref_imageless.unsqueeze(-1)], -1)
        out += [replace(it, ref_logps=tuple(r.tolist())) for it, r in zip(chunk, ref.cpu())]
    model.train(was)
    return out


def train_preference(
    cfg,
    bundle: ModelBundle,
    ds: RecDataset,
    items: list[PrefItem],
    output_dir: str | Path,
    *,
    resume: bool = True,
    on_log=None,
    should_stop=None,
    reference_cache=None,
    eval_items: Sequence[PrefItem] | None = None,
) -> TrainResult:
    """Train bundle.model (merged SFT + fresh LoRA) on preference items with cfg.pref's method.

    reference_cache: a :class:`hanorec.train.refcache.ReferenceCache` shared by the stages of one comparison
    seed (same SFT model): the reference sums of each micro-batch are computed by the first stage that sees it
    and reused, bit for bit, by the others (not with pref.precompute_ref, several processes, or a dropout
    outside the LoRA layers).
    eval_items: held-out pairs (:class:`HeldOutPairs`) scored at step 0, every pref.eval_every steps and at
    the end; their eval/ keys go to metrics.jsonl as rows of their own."""
    from accelerate import Accelerator

    from hanorec.train.loop import resolve_mixed_precision

    p = cfg.pref
    accelerator = Accelerator(
        gradient_accumulation_steps=p.grad_accum,
        mixed_precision=resolve_mixed_precision(p.mixed_precision),
        log_with=p.log_with,
        project_dir=str(output_dir),
    )
    bundle.model.to(accelerator.device)
    if p.precompute_ref:
        from hanorec import methods

        items = precompute_reference(bundle, ds, items, p.scoring, imageless=methods.get(p.method).needs_imageless)
    noise = (
        LoRANoise(bundle.model, p.noise_sigma, scale=p.noise_scale) if (p.noise_target == "lora" and p.noise_sigma > 0) else None
    )
    scope = None
    if reference_cache is not None and not p.precompute_ref and accelerator.num_processes == 1:
        from hanorec import methods
        from hanorec.train.refcache import dropout_active

        if methods.get(p.method).needs_reference and not dropout_active(bundle.model):
            context = (
                f"{bundle.name}|{p.scoring}|{next(bundle.model.parameters()).dtype}|{p.mixed_precision}|"
                f"{accelerator.device.type}|pixels={p.max_pixels}/{cfg.model.max_pixels}"
            )
            sft_key = bundle.meta.get("sft_checkpoint", bundle.name)
            scope = reference_cache.scope(sft_key, context, [pair_key(it.pair) for it in items])
    held_out = HeldOutPairs(bundle, ds, eval_items, p.scoring) if eval_items else None
    loss_fn = make_pref_loss(cfg, bundle, accelerator, noise, reference_cache=scope)
    restore_dropout = disable_dropout(bundle.model) if p.disable_dropout else None
    try:
        return train_loop(
            model=bundle.model,
            items=items,
            collate=make_pref_collate(bundle, ds),
            loss_fn=loss_fn,
            train_cfg=p,
            seed=cfg.seed,
            output_dir=output_dir,
            config_yaml=cfg.to_yaml(),
            accelerator=accelerator,
            resume=resume,
            on_log=on_log,
            should_stop=should_stop,
            stage=p.method,
            drop_last=True,  # as the authors' trainer: eta's trimmed mean never sees a short micro-batch
            step_eval=held_out,
            eval_every=p.eval_every,
        )
    finally:
        if scope is not None:
            reference_cache.save()
        if restore_dropout is not None:
            restore_dropout()
        close = getattr(loss_fn, "close_noise", None)  # a wrapped loss function (benchmarks) may not have it
        if close is not None:
            close()
