"""NoDO: Gaussian noise on the policy during preference training (method.md section 8).

Two targets, chosen elsewhere by ``noise_target`` (one of :data:`NOISE_TARGETS`):

- "lora" (the authors' code, default): :class:`LoRANoise`. Inside ``with noise.active():``
  every TRAINING forward of an active LoRA pair (A, B) computes the adapter as
  ``scale * (B + eps_B) (A + eps_A) dropout(x)`` with eps ~ N(0, sigma^2) elementwise. Stored
  weights are never touched and gradients flow through the perturbed product to A and B.
- "logits" (the abstract's wording): :func:`add_logit_noise`, z' = z + eps, eps ~ N(0, sigma^2).
- "none": no noise.

How big sigma is (``scale``, one of :data:`NOISE_SCALES`): "absolute" (the paper's, default) draws
eps ~ N(0, sigma^2) on every factor; "relative" (an extension beyond the paper) draws each factor's eps with
standard deviation sigma * RMS(that factor), see :class:`LoRANoise`.

Noise is for the policy's training forwards only: the reference forward (adapter disabled) and
evaluation (model.eval()) stay clean.

Noise at inference (the noise lab, notebook 05) is explicit and separate: a :class:`NoiseSpec` given to
``hanorec.scoring.score_options(..., noise=spec)`` scores the candidates under ``draws`` independent
draws (``LoRANoise.active(inference=True)`` lets the LoRA hooks fire in eval mode for that call only).
Pure summaries of such draws: :func:`noise_summary` (score shift per candidate, top-1 / top-3 change
rate, KL from the clean distribution over candidates) and :func:`lora_factor_scale` (the size of the
LoRA factors sigma is added to).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

__all__ = [
    "NOISE_SCALES",
    "NOISE_TARGETS",
    "LoRADraw",
    "LoRANoise",
    "LoRAScale",
    "NoiseSpec",
    "NoiseSummary",
    "add_logit_noise",
    "lora_factor_scale",
    "noise_summary",
]

NOISE_TARGETS = ("lora", "logits", "none")
NOISE_SCALES = ("absolute", "relative")
INFERENCE_TARGETS = ("lora", "logits")


@dataclass(frozen=True)
class NoiseSpec:
    """Noise at inference: score candidates under ``draws`` independent NoDO draws (method.md section 8).

    target: "lora" (eps_A, eps_B ~ N(0, sigma^2) on every LoRA factor: scale (B + eps_B)(A + eps_A) x)
        or "logits" (z' = z + eps, eps ~ N(0, sigma^2), on each completion token's prediction logits).
    sigma: the noise standard deviation (>= 0; 0 gives the clean scores in every draw).
    draws: number of independent draws (one noisy model per draw, shared by every prompt and option).
    seed: seeds a CPU torch.Generator for reproducible draws (None: torch's global generator);
        ``generator`` overrides it. The same seed gives the same standard normals for every sigma, so
        a sweep over sigma rescales one set of draws (common random numbers).
    draws_per_forward: "lora": how many draws share one batched forward (each row of the batch uses
        its own draw through LoRANoise group_ids); draws depend on (seed, draws_per_forward).
        Memory grows with it; 8 is plenty on CPU, raise it on a GPU.
    """

    target: str
    sigma: float
    draws: int = 1
    seed: int | None = 0
    generator: torch.Generator | None = None
    draws_per_forward: int = 8

    def __post_init__(self):
        if self.target not in INFERENCE_TARGETS:
            raise ValueError(f"noise target must be one of {list(INFERENCE_TARGETS)}, got {self.target!r}")
        if not self.sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.sigma}")
        if self.draws < 1:
            raise ValueError(f"the number of noise draws must be >= 1, got {self.draws}")
        if self.draws_per_forward < 1:
            raise ValueError(f"draws_per_forward must be >= 1, got {self.draws_per_forward}")

    def make_generator(self) -> torch.Generator | None:
        """The generator the draws come from: ``generator``, else a CPU one seeded with ``seed``."""
        if self.generator is not None:
            return self.generator
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed))


def _randn(shape: tuple[int, ...], sigma: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """sigma * N(0, 1) of ``shape`` in like's dtype and device, drawn on the generator's device in float32."""
    device = generator.device if generator is not None else like.device
    eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * sigma
    return eps.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _rms(weight: Tensor) -> float:
    """Root mean square of a factor's entries, in float32 (the scale "relative" noise multiplies sigma by)."""
    return weight.detach().float().square().mean().sqrt().item()


def add_logit_noise(logits: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """NoDO on the output logits (method.md section 8, the abstract's wording): z' = z + eps, eps ~ N(0, sigma^2).

    Apply to the policy's training forward only; log-probs then come from softmax(z'). Gradients
    flow through z unchanged. sigma = 0 returns ``logits`` itself.
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return logits
    return logits + _randn(tuple(logits.shape), sigma, logits, generator)


@dataclass
class LoRADraw:
    """The noise of one LoRA pair for one ``active()`` context.

    eps_A: (G, r, in_features) and eps_B: (G, out_features, r), G = number of independent draws
    (1 unless ``group_ids`` were given). Row i of a batch uses draw ``group_ids[i]`` (0 by default).
    """

    eps_A: Tensor
    eps_B: Tensor


_EVERY_THREAD = object()  # LoRANoise._owner of a training context


class _Pair:
    """One hooked (LoraLayer, adapter) pair."""

    def __init__(self, name: str, layer: nn.Module, adapter: str):
        self.name = name
        self.layer = layer
        self.adapter = adapter
        self.lora_A: nn.Linear = layer.lora_A[adapter]
        self.lora_B: nn.Linear = layer.lora_B[adapter]

    def enabled(self, module: nn.Module, inference: bool = False) -> bool:
        """Noise applies only to a training forward (or, with inference=True, any forward) of an
        enabled, active, unmerged adapter."""
        layer = self.layer
        return (
            (inference or (module.training and layer.training))
            and not layer.disable_adapters
            and not layer.merged
            and self.adapter in layer.active_adapters
        )


class LoRANoise:
    """NoDO on LoRA adapters (method.md section 8, as the authors' code does it).

    Usage, once per training step::

        noise = LoRANoise(policy, sigma=0.1)
        with noise.active(group_ids=None):
            chosen_logps, rejected_logps = forward(policy, batch)      # noisy, one shared draw
            with policy.disable_adapter():
                ref_chosen, ref_rejected = forward(policy, batch)     # clean
            loss = ...
            loss.backward()   # inside the context when gradient checkpointing re-runs the forward

    Inside one ``active()`` context, eps_A and eps_B of every LoRA pair are drawn once, lazily at the
    pair's first noisy forward, and reused by every later forward in that context, so a step's chosen
    and rejected completions share one draw; the next context draws afresh. Forward hooks on
    ``lora_A[adapter]`` and ``lora_B[adapter]`` implement it without touching the weights::

        (A + eps_A) d(x) = A d(x) + d(x) eps_A^T        (hook on lora_A; d = peft's lora_dropout)
        (B + eps_B) a    = B a    + a eps_B^T           (hook on lora_B, a = the perturbed A output)

    peft multiplies by the LoRA scale afterwards, giving scale * (B + eps_B)(A + eps_A) d(x).

    The hooks do nothing when the module is in eval mode, the adapter is disabled
    (``with model.disable_adapter():``), inactive or merged. Hooks exist only inside ``active()``
    and are removed on exit, also when the body raises. With gradient checkpointing the forward is
    re-run during backward, so call ``backward()`` inside the same context: the re-run then reuses
    the same draws, and (draws from the global RNG) draws again without using the result, so the RNG
    advances as in the original forward and LoRA dropout masks come back the same.

    Only LoRA layers whose lora_A / lora_B are ``nn.Linear`` are perturbed (Linear and its
    quantised kin); Embedding / Conv LoRA layers are left clean and listed in ``skipped``. LoRA
    variants (DoRA and others) raise NotImplementedError when sigma > 0. ``group_ids`` assumes the
    plain forward (peft's mixed-adapter ``adapter_names`` batches are not supported).

    scale: "absolute" (the paper's, default): eps_A, eps_B ~ N(0, sigma^2). "relative" (an extension beyond
    the paper): for each pair, eps_A ~ N(0, (sigma * RMS(A))^2) and eps_B ~ N(0, (sigma * RMS(B))^2), where
    RMS(W) = sqrt(mean of W's squared entries) of that pair's own stored factor, measured (without gradient)
    when the context draws, i.e. at the pair's first noisy forward of each ``active()`` block, from the
    weights as they are at that step. Each factor then gets the same noise-to-signal ratio sigma whatever the
    model's width. A factor that is all zeros gets no noise: a fresh adapter's B (initialised to 0) is
    unperturbed until training moves it, and while B = 0 the product (B + eps_B)(A + eps_A) is 0 too.
    """

    def __init__(self, model: nn.Module, sigma: float, scale: str = "absolute"):
        if sigma < 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma}")
        if scale not in NOISE_SCALES:
            raise ValueError(f"noise scale must be one of {list(NOISE_SCALES)}, got {scale!r}")
        from peft.tuners.lora.layer import LoraLayer

        self.model = model
        self.sigma = float(sigma)
        self.scale = scale
        self.pairs: list[_Pair] = []
        self.skipped: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.lora_A.keys():
                lora_A = module.lora_A[adapter]
                lora_B = module.lora_B[adapter] if adapter in module.lora_B else None
                if not (isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear)):
                    self.skipped.append(f"{name}:{adapter}")
                    continue
                if self.sigma > 0 and adapter in getattr(module, "lora_variant", {}):
                    variant = type(module.lora_variant[adapter]).__name__
                    raise NotImplementedError(
                        f"LoRA noise supports plain LoRA only, but {name} adapter '{adapter}' uses {variant}"
                    )
                self.pairs.append(_Pair(name, module, adapter))
        if self.sigma > 0 and not self.pairs:
            raise ValueError("LoRA noise found no LoRA layer with nn.Linear lora_A / lora_B in the model")
        self.last_draws: dict[tuple[str, str], LoRADraw] = {}
        self._replay: set[tuple[str, str]] = set()  # draws a checkpointed re-run must replay (see _draw)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._is_active = False
        self._group_ids: Tensor | None = None
        self._in_order = False  # group_ids are 0, 1, ..., G-1 for a context of G draws
        self._num_groups = 1
        # whose forwards the open context perturbs: _EVERY_THREAD (training), one thread's id (inference), or
        # None while no context is open (then a hook that fires late perturbs nothing, see _owns_forward)
        self._owner: int | object | None = None

    def metrics(self) -> dict[str, float]:
        """Values to log beside the TRL metrics."""
        from hanorec.logkeys import NOISE_SIGMA

        return {NOISE_SIGMA: self.sigma}

    @contextmanager
    def active(
        self,
        group_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        inference: bool = False,
        eager: bool = False,
    ) -> Iterator[LoRANoise]:
        """Perturb every training forward inside the block with one draw per LoRA pair (see the class doc).

        group_ids: optional (N,) integer tensor; batch row i uses the independent draw group_ids[i]
            (rows of one example, e.g. its chosen and rejected completions, share an id). Every
            noisy forward inside the block must then have N rows. None: all rows share one draw.
        generator: optional torch.Generator for reproducible draws (draws are made on its device).
        inference: also perturb forwards in eval mode (noise at inference, see :class:`NoiseSpec`);
            the default False keeps NoDO a training-only perturbation. An inference context perturbs
            only the forwards of the thread that opened it: another thread may score the same model
            clean, or under its own context, at the same time.
        eager: draw every pair's noise now, on entry, in pair order (as the authors' hooks do before the
            forward), instead of at each pair's first noisy forward. Then no draw happens inside the forward,
            so a forward re-run without the hooks (``pref.nodo_backward=clean``) consumes the global RNG as the
            original did and LoRA dropout gets its original masks.
        """
        if self._is_active:
            raise RuntimeError("LoRANoise.active() is already open; contexts cannot be nested")
        self.last_draws = {}
        self._replay = set()
        if self.sigma == 0:
            yield self
            return
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids).long().flatten()
            if group_ids.numel() == 0 or int(group_ids.min()) < 0:
                raise ValueError("group_ids must be a non-empty tensor of non-negative integers")
        num_groups = 1 if group_ids is None else int(group_ids.max()) + 1
        self._num_groups = num_groups
        self._set_rows(group_ids)
        self._owner = threading.get_ident() if inference else _EVERY_THREAD
        self._is_active = True
        try:
            if eager:
                for pair in self.pairs:
                    self.last_draws[(pair.name, pair.adapter)] = self._fresh_draw(pair, num_groups, generator)
            for pair in self.pairs:
                a_hook, b_hook = self._make_hooks(pair, num_groups, generator, inference)
                self._hooks.append(pair.lora_A.register_forward_hook(a_hook))
                self._hooks.append(pair.lora_B.register_forward_hook(b_hook))
            yield self
        finally:
            self._owner = None  # first: a hook already picked up by another thread's forward now does nothing
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            self._is_active = False
            self._set_rows(None)

    def set_group_ids(self, group_ids: Tensor | None) -> None:
        """Inside ``active(group_ids=...)``: the rows of the NEXT forwards use these draws instead.

        The draws of the context stay the same (draw g is one noisy model throughout), so batches of
        different sizes (e.g. one prompt after another) can reuse them. Ids must be < the number of
        draws the context was opened with. A no-op at sigma 0.
        """
        if self.sigma == 0:
            return
        if not self._is_active:
            raise RuntimeError("set_group_ids() needs an open LoRANoise.active() context")
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids).long().flatten()
            if group_ids.numel() == 0 or int(group_ids.min()) < 0 or int(group_ids.max()) >= self._num_groups:
                raise ValueError(
                    f"group_ids must be non-empty integers in [0, {self._num_groups}) for this context"
                )
        elif self._num_groups != 1:
            raise ValueError("group_ids=None needs a context opened with one draw")
        self._set_rows(group_ids)

    def _set_rows(self, group_ids: Tensor | None) -> None:
        self._group_ids = group_ids
        self._in_order = group_ids is not None and bool(
            group_ids.numel() == self._num_groups and torch.equal(group_ids, torch.arange(self._num_groups, device=group_ids.device))
        )

    def _rows_in_order(self, n: int) -> bool:
        """Whether row i of an n-row batch uses draw i of the context's n draws (no per-row indexing needed)."""
        return self._in_order and n == self._num_groups

    def _owns_forward(self) -> bool:
        """Training contexts perturb every forward (gradient checkpointing may re-run one on another thread);
        an inference context only its own thread's, so other threads can score the same model clean; no
        forward once the context has closed. (A forward reads the module's hooks when it calls them: another
        thread's forward may call this context's hook after the context closed, or between two contexts of
        this object, and must then get its own output back, not this context's draws.)"""
        owner = self._owner
        return owner is _EVERY_THREAD or (owner is not None and owner == threading.get_ident())

    def _draw(
        self, pair: _Pair, num_groups: int, generator: torch.Generator | None
    ) -> LoRADraw:  # drawn lazily, once per context
        key = (pair.name, pair.adapter)
        draw = self.last_draws.get(key)
        in_backward = torch._C._current_graph_task_id() != -1  # a forward re-run by gradient checkpointing
        if draw is None:
            draw = self._fresh_draw(pair, num_groups, generator)
            self.last_draws[key] = draw
            if generator is None and not in_backward:
                self._replay.add(key)
        elif in_backward and key in self._replay:
            # Gradient checkpointing re-runs this forward during backward from the RNG state its segment
            # began with. Drawing again (and keeping the cached draw) advances the global RNG exactly as the
            # original forward did, so LoRA dropout after this point gets its original masks too.
            self._replay.discard(key)
            self._fresh_draw(pair, num_groups, generator)
        return draw

    def _fresh_draw(self, pair: _Pair, num_groups: int, generator: torch.Generator | None) -> LoRADraw:
        wA, wB = pair.lora_A.weight, pair.lora_B.weight
        sigma_A, sigma_B = self.sigma, self.sigma
        if self.scale == "relative":  # sigma x the factor's own RMS, measured now (extension beyond the paper)
            sigma_A, sigma_B = self.sigma * _rms(wA), self.sigma * _rms(wB)
        return LoRADraw(
            eps_A=_randn((num_groups, *wA.shape), sigma_A, wA, generator),  # (G, r, in)
            eps_B=_randn((num_groups, *wB.shape), sigma_B, wB, generator),  # (G, out, r)
        )

    def _make_hooks(self, pair: _Pair, num_groups: int, generator, inference):
        def add_perturbation(output: Tensor, x: Tensor, eps: Tensor) -> Tensor:
            """output + x @ eps^T per row: output (N, ..., out), x (N, ..., in), eps (G, out, in).

            Row i uses draw group_ids[i]: one batched matrix product, fused with the addition, over the
            rows (the draws are indexed only when the rows do not already use draws 0, 1, ..., N-1 in order).
            """
            eps = eps.to(x.dtype)
            group_ids = self._group_ids
            if group_ids is None:
                return output + x @ eps[0].T
            n = x.shape[0]
            if n != group_ids.numel():
                raise ValueError(f"group_ids has {group_ids.numel()} rows but a LoRA forward got a batch of {n}")
            per_row = eps if self._rows_in_order(n) else eps[group_ids.to(eps.device)]  # (N, out, in)
            flat = torch.baddbmm(
                output.reshape(n, -1, output.shape[-1]), x.reshape(n, -1, x.shape[-1]), per_row.transpose(1, 2)
            )
            return flat.reshape(output.shape)

        def a_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not pair.enabled(module, inference) or not self._owns_forward():
                return None
            draw = self._draw(pair, num_groups, generator)
            return add_perturbation(output, args[0], draw.eps_A)

        def b_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not pair.enabled(module, inference) or not self._owns_forward():
                return None
            draw = self._draw(pair, num_groups, generator)
            return add_perturbation(output, args[0], draw.eps_B)

        return a_hook, b_hook


# ------------------------------------------------------------------------------------------------
# Summaries of noise at inference (pure: tensors in, plain values out)
# ------------------------------------------------------------------------------------------------
@dataclass
class LoRAScale:
    """How big the LoRA factors are, to read sigma against: eps ~ N(0, sigma^2) is added to every entry.

    a_rms / b_rms: root mean square of all entries of every lora_A / lora_B (over all pairs);
    a_std / b_std: their standard deviations; per_pair: one row per (module, adapter) with the same.
    sigma / a_rms is the noise-to-signal ratio on A. A fresh adapter has B = 0 (b_rms 0).
    """

    a_rms: float
    b_rms: float
    a_std: float
    b_std: float
    n_pairs: int
    per_pair: pd.DataFrame


@torch.no_grad()
def lora_factor_scale(model: nn.Module) -> LoRAScale:
    """The scale of the LoRA factors A and B that NoDO perturbs (method.md section 8).

    Raises ValueError when the model has no LoRA layer (then only logit noise applies).
    """
    pairs = LoRANoise(model, 0.0).pairs
    if not pairs:
        raise ValueError("the model has no LoRA adapter, so there are no LoRA factors to perturb")
    rows, all_a, all_b = [], [], []
    for p in pairs:
        a = p.lora_A.weight.detach().float().flatten()
        b = p.lora_B.weight.detach().float().flatten()
        all_a.append(a)
        all_b.append(b)
        rows.append(
            {
                "module": p.name,
                "adapter": p.adapter,
                "A_rms": a.square().mean().sqrt().item(),
                "B_rms": b.square().mean().sqrt().item(),
                "A_std": a.std().item(),
                "B_std": b.std().item(),
                "A_shape": tuple(p.lora_A.weight.shape),
                "B_shape": tuple(p.lora_B.weight.shape),
            }
        )
    a, b = torch.cat(all_a), torch.cat(all_b)
    return LoRAScale(
        a_rms=a.square().mean().sqrt().item(),
        b_rms=b.square().mean().sqrt().item(),
        a_std=a.std().item(),
        b_std=b.std().item(),
        n_pairs=len(pairs),
        per_pair=pd.DataFrame(rows),
    )


@dataclass
class NoiseSummary:
    """How noise moved the candidate scores (from :func:`noise_summary`).

    per_candidate: one row per candidate: option, clean score, noisy mean / std, shift mean / std
        (shift = noisy - clean), clean and mean noisy probability, and how often it was top-1 under noise.
    top1_change_rate: fraction of draws whose top-1 candidate differs from the clean top-1.
    top3_change_rate: fraction of draws whose top-3 SET differs from the clean top-3 (order ignored).
    kl: (draws,) KL(p_noisy || p_clean) of the softmax over candidates, per draw; kl_mean its mean.
    """

    per_candidate: pd.DataFrame
    top1_change_rate: float
    top3_change_rate: float
    kl: Tensor
    kl_mean: float
    draws: int

    def as_dict(self) -> dict:
        """The scalars, for a table or a JSON log."""
        return {
            "draws": self.draws,
            "top1_change_rate": self.top1_change_rate,
            "top3_change_rate": self.top3_change_rate,
            "kl_mean": self.kl_mean,
            "kl_std": float(self.kl.std()) if self.draws > 1 else 0.0,
            "mean_abs_shift": float(self.per_candidate["shift_mean"].abs().mean()),
        }


def _top_sets(scores: Tensor, k: int) -> Tensor:
    """(D, C) -> (D, C) bool: membership of each candidate in the draw's top-k."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def noise_summary(clean: Tensor, noisy: Tensor, options: list[str] | None = None) -> NoiseSummary:
    """Summaries the noise lab shows, from clean scores (C,) and per-draw noisy scores (D, C).

    Scores are candidate log-likelihoods logp(y_c | x) (the ranking protocol, method.md section 4);
    the distribution over candidates is p = softmax(scores). Per draw d:
    top-1 change = [argmax noisy_d != argmax clean]; top-3 change = [top3(noisy_d) != top3(clean)] as sets;
    KL_d = sum_c p_d(c) (log p_d(c) - log p_clean(c)) = KL(p_noisy || p_clean), the direction of
    DPO's KL(pi_theta || pi_ref) with the clean model as the reference.
    """
    clean = torch.as_tensor(clean).double().reshape(-1)  # (C,)
    noisy = torch.as_tensor(noisy).double()
    if noisy.dim() == 1:
        noisy = noisy[None]
    if noisy.dim() != 2 or noisy.shape[1] != clean.shape[0]:
        raise ValueError(
            f"noisy scores must be (draws, {clean.shape[0]}) to match {clean.shape[0]} clean scores, "
            f"got shape {tuple(noisy.shape)}"
        )
    n_draws, n_cand = noisy.shape
    if n_cand == 0:
        raise ValueError("noise_summary needs at least one candidate")
    if options is not None and len(options) != n_cand:
        raise ValueError(f"{len(options)} option names for {n_cand} candidates")
    shift = noisy - clean  # (D, C)
    log_p_clean = torch.log_softmax(clean, -1)  # (C,)
    log_p_noisy = torch.log_softmax(noisy, -1)  # (D, C)
    kl = (log_p_noisy.exp() * (log_p_noisy - log_p_clean)).sum(-1).clamp(min=0.0)  # (D,)
    top1 = noisy.argmax(-1)  # (D,)
    k3 = min(3, n_cand)
    top3_changed = (_top_sets(noisy, k3) != _top_sets(clean[None], k3)).any(-1)  # (D,)
    std = noisy.std(0) if n_draws > 1 else torch.zeros(n_cand, dtype=noisy.dtype)
    shift_std = shift.std(0) if n_draws > 1 else torch.zeros(n_cand, dtype=noisy.dtype)
    table = pd.DataFrame(
        {
            "option": options if options is not None else [str(c) for c in range(n_cand)],
            "clean": clean.numpy(),
            "noisy_mean": noisy.mean(0).numpy(),
            "noisy_std": std.numpy(),
            "shift_mean": shift.mean(0).numpy(),
            "shift_std": shift_std.numpy(),
            "p_clean": log_p_clean.exp().numpy(),
            "p_noisy_mean": log_p_noisy.exp().mean(0).numpy(),
            "top1_rate": torch.bincount(top1, minlength=n_cand).double().div(n_draws).numpy(),
        }
    )
    return NoiseSummary(
        per_candidate=table,
        top1_change_rate=float((top1 != clean.argmax()).double().mean()),
        top3_change_rate=float(top3_changed.double().mean()),
        kl=kl.float(),
        kl_mean=float(kl.mean()),
        draws=n_draws,
    )
