"""NoDO: Gaussian noise on the policy during preference training (method.md section 8).

Two targets, chosen elsewhere by ``noise_target`` (one of :data:`NOISE_TARGETS`):

- "lora" (the reference implementation, default): :class:`LoRANoise`. Inside ``with noise.active():``
  every TRAINING forward of an active LoRA pair (A, B) computes the adapter as
  ``scale * (B + eps_B) (A + eps_A) dropout(x)`` with eps ~ N(0, sigma^2) elementwise. Stored
  weights are never touched and gradients flow through the perturbed product to A and B.
- "logits" (the abstract's wording): :func:`add_logit_noise`, z' = z + eps, eps ~ N(0, sigma^2).
- "none": no noise.

Noise is for the policy's training forwards only: the reference forward (adapter disabled) and
evaluation (model.eval()) stay clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["NOISE_TARGETS", "LoRADraw", "LoRANoise", "add_logit_noise"]

NOISE_TARGETS = ("lora", "logits", "none")


def _randn(shape: tuple[int, ...], sigma: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """sigma * N(0, 1) of ``shape`` in like's dtype and device, drawn on the generator's device in float32."""
    device = generator.device if generator is not None else like.device
    eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * sigma
    return eps.to(device=like.device, dtype=like.dtype)


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


class _Pair:
    """One hooked (LoraLayer, adapter) pair."""

    def __init__(self, name: str, layer: nn.Module, adapter: str):
        self.name = name
        self.layer = layer
        self.adapter = adapter
        self.lora_A: nn.Linear = layer.lora_A[adapter]
        self.lora_B: nn.Linear = layer.lora_B[adapter]

    def enabled(self, module: nn.Module) -> bool:
        """Noise applies only to a training forward of an enabled, active, unmerged adapter."""
        layer = self.layer
        return (
            module.training
            and layer.training
            and not layer.disable_adapters
            and not layer.merged
            and self.adapter in layer.active_adapters
        )


class LoRANoise:
    """NoDO on LoRA adapters (method.md section 8, the reference implementation).

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
    re-run during backward, so call ``backward()`` inside the same context (the re-run then reuses
    the same draws).

    Only LoRA layers whose lora_A / lora_B are ``nn.Linear`` are perturbed (Linear and its
    quantised kin); Embedding / Conv LoRA layers are left clean and listed in ``skipped``. LoRA
    variants (DoRA and others) raise NotImplementedError when sigma > 0. ``group_ids`` assumes the
    plain forward (peft's mixed-adapter ``adapter_names`` batches are not supported).
    """

    def __init__(self, model: nn.Module, sigma: float):
        if sigma < 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma}")
        from peft.tuners.lora.layer import LoraLayer

        self.model = model
        self.sigma = float(sigma)
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
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._is_active = False

    def metrics(self) -> dict[str, float]:
        """Values to log beside the TRL metrics."""
        return {"noise/sigma": self.sigma}

    @contextmanager
    def active(
        self, group_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Iterator[LoRANoise]:
        """Perturb every training forward inside the block with one draw per LoRA pair (see the class doc).

        group_ids: optional (N,) integer tensor; batch row i uses the independent draw group_ids[i]
            (rows of one example, e.g. its chosen and rejected completions, share an id). Every
            noisy forward inside the block must then have N rows. None: all rows share one draw.
        generator: optional torch.Generator for reproducible draws (draws are made on its device).
        """
        if self._is_active:
            raise RuntimeError("LoRANoise.active() is already open; contexts cannot be nested")
        self.last_draws = {}
        if self.sigma == 0:
            yield self
            return
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids).long().flatten()
            if group_ids.numel() == 0 or int(group_ids.min()) < 0:
                raise ValueError("group_ids must be a non-empty tensor of non-negative integers")
        num_groups = 1 if group_ids is None else int(group_ids.max()) + 1
        self._is_active = True
        try:
            for pair in self.pairs:
                a_hook, b_hook = self._make_hooks(pair, group_ids, num_groups, generator)
                self._hooks.append(pair.lora_A.register_forward_hook(a_hook))
                self._hooks.append(pair.lora_B.register_forward_hook(b_hook))
            yield self
        finally:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            self._is_active = False

    def _draw(
        self, pair: _Pair, num_groups: int, generator: torch.Generator | None
    ) -> LoRADraw:  # drawn lazily, once per context
        key = (pair.name, pair.adapter)
        draw = self.last_draws.get(key)
        if draw is None:
            wA, wB = pair.lora_A.weight, pair.lora_B.weight
            draw = LoRADraw(
                eps_A=_randn((num_groups, *wA.shape), self.sigma, wA, generator),  # (G, r, in)
                eps_B=_randn((num_groups, *wB.shape), self.sigma, wB, generator),  # (G, out, r)
            )
            self.last_draws[key] = draw
        return draw

    def _make_hooks(self, pair: _Pair, group_ids: Tensor | None, num_groups: int, generator):
        def perturb(x: Tensor, eps: Tensor) -> Tensor:
            """x @ eps^T per row: x (N, ..., in), eps (G, out, in) -> (N, ..., out)."""
            eps = eps.to(x.dtype)
            if group_ids is None:
                return x @ eps[0].T
            if x.shape[0] != group_ids.numel():
                raise ValueError(
                    f"group_ids has {group_ids.numel()} rows but a LoRA forward got a batch of {x.shape[0]}"
                )
            per_row = eps[group_ids.to(eps.device)]  # (N, out, in)
            return torch.einsum("n...i,noi->n...o", x, per_row)

        def a_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not pair.enabled(module):
                return None
            draw = self._draw(pair, num_groups, generator)
            return output + perturb(args[0], draw.eps_A)

        def b_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not pair.enabled(module):
                return None
            draw = self._draw(pair, num_groups, generator)
            return output + perturb(args[0], draw.eps_B)

        return a_hook, b_hook
