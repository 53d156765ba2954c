"""Scoring: the one place that runs the model to get completion log-probs given a prompt.

SFT, preference training, evaluation, the hardness inspector and the noise lab all call this.
logp(y|x) is the SUM of the completion tokens' log-probs (method.md section 7).

Several completions of one prompt (chosen + K rejected in DPO, the candidate titles in ranking
evaluation) can be scored two ways, with the same results up to float rounding:

- ``"naive"``: one row per (prompt, completion) pair; every row repeats the prompt, images included
  (like TRL). :func:`naive_logps`.
- ``"shared_prefix"`` (default): one row per prompt, packed as ``[prompt, c_1, c_2, ...]`` with a
  4-D attention mask in which every completion sees the whole prompt and its own earlier tokens
  only, and position ids that restart after the prompt for every completion (for M-RoPE families
  the 3-D ids of the prompt come from the model's own ``get_rope_index``, and completion token j of
  prompt i gets ``next_i + j`` on all three axes, exactly what the naive row gives it; a family whose
  plain forward attends otherwise, e.g. bidirectionally within an image or in a sliding window, adapts
  the mask through its adapter). The prompt and its images go through the model once.
  :func:`shared_prefix_logps`.

Forwards that score the same batch more than once (the reference and the policy forward of a preference
step) pack it once with :func:`pack_shared_prefix`, which also runs the frozen vision tower once and hands
its image features to every forward; results are bit-identical to packing per forward.

The shared-prefix row of a prompt holds each completion's tokens except its last one (a last token
is only ever a target); the first token of every completion is predicted from the prompt's last
position. Only the needed positions go through the LM head (``logits_to_keep`` as a boolean mask).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from hanorec.backbones import vision_module_names
from hanorec.models import EncodedPrompt, ModelBundle
from hanorec.noise import LoRANoise, NoiseSpec, add_logit_noise, noise_summary

MODEL_KEYS = (
    "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids",
    "pixel_attention_mask",
)  # fmt: skip
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask")  # what get_image_features reads
SCORING_MODES = ("shared_prefix", "naive")
# Attention implementations that honour an explicit 4-D mask (flash-attention kernels do not).
PACKED_ATTENTION = ("sdpa", "eager")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_logits(model, batch: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the model on a collated batch; returns logits (N, L, V)."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model(**inputs, use_cache=False).logits


def _sum_token_logps(
    picked: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, n: int, logits_transform=None
) -> torch.Tensor:
    """sum over a completion's tokens of log softmax(z_t)[y_t]: picked (T, V) prediction logits z_t,
    targets (T,) y_t, owner (T,) completion index of each token -> (n,) summed log-probs."""
    if logits_transform is not None:
        picked = logits_transform(picked)
    token_logps = torch.gather(F.log_softmax(picked, dim=-1), 1, targets.unsqueeze(1)).squeeze(1)  # (T,)
    return torch.zeros(n, dtype=token_logps.dtype, device=picked.device).index_add(0, owner, token_logps)


def _naive_predictions(logits: torch.Tensor, labels: torch.Tensor):
    """(picked (T, V) float, targets (T,), owning row (T,), completion mask (N, L-1)) of a plain batch."""
    shift_labels = labels[:, 1:]  # (N, L-1)
    mask = shift_labels != -100  # (N, L-1)
    picked = logits[:, :-1][mask].float()  # (T, V) only the completion positions
    return picked, shift_labels[mask], mask.nonzero()[:, 0], mask


def completion_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logits_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens and their count, per row.

    logits (N, L, V) predict token t+1 at position t; labels (N, L) hold -100 outside the completion.
    logits_transform (e.g. NoDO logit noise) is applied to the completion positions only.
    Returns (sum_logps (N,), n_tokens (N,)).
    """
    picked, targets, row, mask = _naive_predictions(logits, labels)
    sums = _sum_token_logps(picked, targets, row, labels.shape[0], logits_transform)
    return sums, mask.sum(dim=1)


def batch_logps(model, batch: dict, logits_transform=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward_logits(model, batch, dtype)
    return completion_logps(logits, batch["labels"], logits_transform)


# ------------------------------------------------------------------------------------------------
# Several completions per prompt
# ------------------------------------------------------------------------------------------------
def _model_device(model):
    return next(model.parameters()).device


def _base(model):
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attn_implementation(model) -> str | None:
    cfg = _base(model).config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)


def _check_inputs(prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[list[int]]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
    for i, p in enumerate(prompts):
        if not p.input_ids:
            raise ValueError(f"prompt {i} has no tokens")


def _split(values: torch.Tensor, completions: Sequence[Sequence[list[int]]]) -> list[torch.Tensor]:
    return list(values.split([len(c) for c in completions]))


def naive_logps(
    model,
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[list[int]]],
    *,
    logits_transform=None,
    dtype=None,
    device=None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Like :func:`shared_prefix_logps`, one row per (prompt, completion): every row repeats the prompt.

    Rows are ordered prompt by prompt, completion by completion (LoRA noise ``group_ids`` then have
    one entry per completion). Returns per prompt (summed log-probs (C_i,), token counts (C_i,)).
    """
    _check_inputs(prompts, completions)
    device = device or _model_device(model)
    flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
    flat_c = [list(c) for cs in completions for c in cs]
    if not flat_c:
        empty = torch.zeros(0, device=device)
        return [empty for _ in prompts], [empty.long() for _ in prompts]
    batch = to_device(bundle.collate(flat_p, flat_c), device)
    sums, counts = batch_logps(model, batch, logits_transform=logits_transform, dtype=dtype)
    return _split(sums, completions), _split(counts, completions)


def _prompt_positions(
    model, bundle: ModelBundle, batch: dict, prompt_mask: torch.Tensor, lengths: torch.Tensor
):
    """Position ids of the prompt tokens and the position of the first token after each prompt.

    Returns (positions, next_pos): positions (P, L) for 1-D RoPE families, (3, P, L) for M-RoPE,
    correct on the prompt tokens (0 elsewhere); next_pos (P,) is the position that the token right
    after prompt i gets in a plain prompt+completion sequence.
    """
    return bundle.prompt_positions(
        _base(model), batch["input_ids"], prompt_mask, lengths, batch.get("image_grid_thw")
    )


def _packed_batch(model, bundle: ModelBundle, prompts, completions, device, mask_dtype) -> dict:
    """One row per prompt: [prompt, c_1[:-1], c_2[:-1], ...], right-padded, with its 4-D mask.

    Also returns, per target token, the index (in the flattened kept logits) of the position that
    predicts it, the target id and the global index of its completion.
    """
    P = len(prompts)
    rows_ids, rows_seg, rows_off = [], [], []  # token ids; segment (0 prompt, k>0 completion k); offset in it
    pred_flat, targets, comp_index = [], [], []  # per target token (row * L + position filled in below)
    k_global = 0
    for i, (p, cs) in enumerate(zip(prompts, completions)):
        n = len(p.input_ids)
        ids, seg, off = list(p.input_ids), [0] * n, list(range(n))
        for k, c in enumerate(cs, start=1):
            m = len(c)
            if m:
                targets += list(c)
                comp_index += [k_global] * m
                start = len(ids)
                pred_flat += [(i, n - 1)] + [(i, start + j) for j in range(m - 1)]
                ids += list(c[:-1])
                seg += [k] * (m - 1)
                off += list(range(m - 1))
            k_global += 1
        rows_ids.append(ids)
        rows_seg.append(seg)
        rows_off.append(off)
    L = max(len(r) for r in rows_ids)
    input_ids = torch.full((P, L), bundle.pad_token_id, dtype=torch.long)
    seg = torch.full((P, L), -1, dtype=torch.long)
    off = torch.zeros((P, L), dtype=torch.long)
    for i in range(P):
        w = len(rows_ids[i])
        input_ids[i, :w] = torch.tensor(rows_ids[i], dtype=torch.long)
        seg[i, :w] = torch.tensor(rows_seg[i], dtype=torch.long)
        off[i, :w] = torch.tensor(rows_off[i], dtype=torch.long)
    is_comp = seg > 0
    keep = (
        is_comp.clone()
    )  # positions whose logits are needed: completion inputs and each prompt's last token
    for i, j in {pf for pf in pred_flat if pf[1] < len(prompts[pf[0]].input_ids)}:
        keep[i, j] = True
    flat_rank = keep.flatten().long().cumsum(0) - 1  # row of each kept position in the flattened logits
    pred = flat_rank[torch.tensor([i * L + j for i, j in pred_flat], dtype=torch.long)]

    batch = {"input_ids": input_ids}
    batch.update(bundle.pixel_inputs(prompts))
    batch = to_device(batch, device)
    seg, off, is_comp = seg.to(device), off.to(device), is_comp.to(device)
    prompt_mask = (seg == 0).long()
    lengths = torch.tensor([len(p.input_ids) for p in prompts], dtype=torch.long, device=device)
    positions, next_pos = _prompt_positions(model, bundle, batch, prompt_mask, lengths)
    comp_positions = (next_pos[:, None] + off) * is_comp  # (P, L)
    positions = positions.to(device) + comp_positions.to(positions.dtype)  # broadcasts over mRoPE's 3 axes

    # query q sees key k <= q of its own segment or of the prompt; padding sees padding only
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones((L, L), dtype=torch.bool, device=device).tril()
    allowed = (causal & ((q_seg == k_seg) | ((k_seg == 0) & (q_seg >= 0)))).unsqueeze(1)  # (P, 1, L, L)
    allowed = bundle.packed_mask(allowed, batch["input_ids"], positions)
    if isinstance(allowed, dict):  # one mask per attention-layer type
        mask = {k: _attention_mask(v, mask_dtype) for k, v in allowed.items()}
    else:
        mask = _attention_mask(allowed, mask_dtype)
    return {
        "inputs": dict(batch, attention_mask=mask, position_ids=positions, logits_to_keep=keep.to(device)),
        "pred": pred.to(device),
        "targets": torch.tensor(targets, dtype=torch.long, device=device),
        "comp_index": torch.tensor(comp_index, dtype=torch.long, device=device),
        "n_completions": k_global,
    }


def _attention_mask(allowed: torch.Tensor, mask_dtype):
    """A boolean mask as the attention takes it: as is (sdpa), or additive float (eager)."""
    if mask_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(mask_dtype).min)


def _pack(model, bundle, prompts, completions, dtype, device) -> dict:
    """:func:`_packed_batch` for ``model`` (its mask dtype), pixel values cast to ``dtype``."""
    attn = _attn_implementation(model)
    mask_dtype = None if attn == "sdpa" else next(model.parameters()).dtype
    packed = _packed_batch(model, bundle, prompts, completions, device, mask_dtype)
    inputs = packed["inputs"]
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return packed


# Modules that turn pixels into the vectors the language model reads (every family's adapter names its own).
_VISION_MODULE = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, vision_module_names())) + r")(?:\.|$)")


def vision_is_frozen(model) -> bool:
    """Whether the image features are the same in every forward of ``model``: no parameter of the vision
    tower or projector is trained, no adapter layer (LoRA, modules_to_save) sits in them, and no dropout
    with p > 0 is active there. Then the features can be computed once and reused (LoRA on the language
    model only, :func:`hanorec.models.add_lora`, keeps them frozen)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    seen = False
    for name, module in _base(model).named_modules():
        if not _VISION_MODULE.search(name):
            continue
        seen = True
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            return False
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return False
        if module.training and _dropout_p(module) > 0:
            return False
    return seen


def _dropout_p(module) -> float:
    """The dropout probability a module applies in training (nn.Dropout, or an attention's float rate)."""
    if isinstance(module, torch.nn.Dropout):
        return module.p
    rates = [getattr(module, a, 0.0) for a in ("dropout", "attention_dropout")]
    return max((float(r) for r in rates if isinstance(r, (int, float))), default=0.0)


@torch.no_grad()
def encode_images(model, pixel_inputs: dict, bundle: ModelBundle | None = None) -> dict:
    """The image features of ``pixel_inputs`` (the pixel tensors of :meth:`ModelBundle.pixel_inputs`),
    computed by the model's own ``get_image_features`` exactly as its forward does, as
    ``mm_encoder_outputs`` for the forward: ``model(input_ids=..., mm_encoder_outputs=encode_images(...))``
    then scatters them into the image-token positions itself, with no vision-tower pass. What the forward
    reads from them is the family's business (``bundle.encode_images``). Only for a model whose vision part
    is frozen (:func:`vision_is_frozen`)."""
    if bundle is None:
        from hanorec.backbones import for_model_type

        return for_model_type(_base(model).config.model_type).encode_images(_base(model).model, pixel_inputs)
    # the base module whose forward calls get_image_features (the conditional-generation model's .model)
    return bundle.encode_images(_base(model).model, pixel_inputs)


def pack_shared_prefix(
    model,
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[list[int]]],
    *,
    dtype=None,
    device=None,
    encode=True,
) -> dict | None:
    """Pack prompts and completions once for several shared-prefix forwards of the same model (the
    reference forward, adapter disabled, and the policy forward of a preference step): the packed row,
    its 4-D mask and positions are built once, and with ``encode`` and a frozen vision part
    (:func:`vision_is_frozen`) the images go through the vision tower once, their features then passed
    to every forward in place of the pixels (:func:`encode_images`). Results are bit-identical to
    packing per forward. Returns None where shared-prefix scoring falls back to naive (attention
    without 4-D masks, or no completion at all); pass the result as ``packed=`` to
    :func:`shared_prefix_logps` / :func:`multi_completion_logps`.
    """
    _check_inputs(prompts, completions)
    if _attn_implementation(model) not in PACKED_ATTENTION or not any(len(cs) for cs in completions):
        return None
    device = device or _model_device(model)
    packed = _pack(model, bundle, prompts, completions, dtype, device)
    inputs = packed["inputs"]
    if encode and "pixel_values" in inputs and vision_is_frozen(model):
        pixels = {k: inputs[k] for k in PIXEL_KEYS if k in inputs}  # the pixel tensors, as packed
        inputs.pop("pixel_values")
        inputs["mm_encoder_outputs"] = encode_images(model, pixels, bundle)
    return packed


_FALLBACK_WARNED: set[str] = set()


def shared_prefix_logps(
    model,
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[list[int]]],
    *,
    logits_transform=None,
    dtype=None,
    device=None,
    packed: dict | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Summed log-probs of several completions per prompt, running each prompt (and its images) once.

    prompts[i] is followed by the token-id lists completions[i] (EOS included if the caller wants it).
    Returns per prompt (summed log-probs (C_i,), token counts (C_i,)); differentiable, so the
    policy's training forward can use it. The model sees ONE row per prompt, so LoRA noise
    ``group_ids`` must have one entry per prompt here (not one per completion as in the naive path).
    logits_transform is applied to each completion's own (T, V) prediction logits, as in
    :func:`completion_logps`. dtype: the dtype pixel values are cast to.

    Needs an attention implementation that accepts a 4-D mask ("sdpa", "eager"); with any other
    (e.g. flash attention) it warns once and falls back to :func:`naive_logps`.
    packed: these prompts and completions from :func:`pack_shared_prefix` (built once, reused by
    several forwards); None packs them here.
    """
    _check_inputs(prompts, completions)
    attn = _attn_implementation(model)
    if attn not in PACKED_ATTENTION:
        if str(attn) not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(str(attn))
            warnings.warn(
                f"shared-prefix scoring needs sdpa or eager attention, the model uses {attn!r}: "
                "falling back to naive scoring",
                stacklevel=2,
            )
        return naive_logps(
            model, bundle, prompts, completions, logits_transform=logits_transform, dtype=dtype, device=device
        )
    device = device or _model_device(model)
    if not any(len(cs) for cs in completions):
        empty = torch.zeros(0, device=device)
        return [empty for _ in prompts], [empty.long() for _ in prompts]
    picked, targets, owner, n = _shared_prefix_predictions(
        model, bundle, prompts, completions, dtype, device, packed
    )
    counts = torch.zeros(n, dtype=torch.long, device=device)
    if targets.numel() == 0:  # every completion is empty
        return _split(torch.zeros(n, device=device), completions), _split(counts, completions)
    sums = _sum_token_logps(picked, targets, owner, n, logits_transform)
    counts = counts.index_add(0, owner, torch.ones_like(owner))
    return _split(sums, completions), _split(counts, completions)


def _shared_prefix_predictions(model, bundle, prompts, completions, dtype, device, packed=None):
    """One packed forward: (picked (T, V) float prediction logits, targets (T,), owner (T,), n completions).

    packed: the same prompts and completions already packed by :func:`pack_shared_prefix` (reused, e.g.
    by the reference and the policy forward of one preference step); None packs them here."""
    if packed is None:
        packed = _pack(model, bundle, prompts, completions, dtype, device)
    inputs = dict(packed["inputs"])
    if "mm_encoder_outputs" in inputs:  # a fresh dict per forward: the model may add entries to it
        inputs["mm_encoder_outputs"] = dict(inputs["mm_encoder_outputs"])
    n = packed["n_completions"]
    if packed["targets"].numel() == 0:
        return None, packed["targets"], packed["comp_index"], n
    logits = model(**inputs, use_cache=False).logits  # (kept positions, V)
    picked = logits[packed["pred"]].float()  # (T, V): the prediction of every completion token
    return picked, packed["targets"], packed["comp_index"], n


def multi_completion_logps(
    model,
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[list[int]]],
    *,
    mode: str = "shared_prefix",
    logits_transform=None,
    dtype=None,
    device=None,
    packed: dict | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Summed log-probs and token counts of several completions per prompt, by ``mode`` (see the module doc).

    packed (shared_prefix only): the result of :func:`pack_shared_prefix` for these prompts and
    completions, to reuse one packing (and one vision-tower pass) across forwards."""
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; use one of {list(SCORING_MODES)}")
    if packed is not None:
        if mode != "shared_prefix":
            raise ValueError("a packed batch is for shared_prefix scoring only")
        return shared_prefix_logps(
            model, bundle, prompts, completions, logits_transform=logits_transform, dtype=dtype,
            device=device, packed=packed,
        )  # fmt: skip
    fn = shared_prefix_logps if mode == "shared_prefix" else naive_logps
    return fn(
        model, bundle, prompts, completions, logits_transform=logits_transform, dtype=dtype, device=device
    )


def _chunks(sizes: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive prompt ranges whose completion counts sum to at most budget (at least one prompt each)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > budget:
            out.append((start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


@torch.no_grad()
def score_options(
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    device=None,
    eos: bool = False,
    mode: str = "shared_prefix",
    noise: NoiseSpec | None = None,
) -> list[torch.Tensor]:
    """Log-likelihood of every option given its prompt: one (C_i,) tensor per prompt.

    This is the ranking protocol's score (method.md section 4): s_c = logp(y_c | x), summed over the
    option's tokens. Options are scored without EOS by default: an option is a first answer line,
    not necessarily the whole answer. mode "shared_prefix" runs each prompt once for all its options
    (several prompts per forward while their options fit in batch_size); "naive" runs batch_size
    (prompt, option) rows per forward. The model is put in eval mode for the call (no dropout, no
    training-time NoDO) and restored after.

    noise: score under noise at inference instead (see :class:`hanorec.noise.NoiseSpec`); then one
    (draws, C_i) tensor per prompt, row d being the scores under draw d (one noisy model per draw,
    shared by every prompt). "logits": one forward, then z' = z + eps per draw on every completion
    token's prediction logits. "lora": draws_per_forward copies of each prompt per forward, each
    under its own (eps_A, eps_B) via LoRANoise group_ids. At sigma 0 every row equals the clean scores.
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; use one of {list(SCORING_MODES)}")
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    model = bundle.model
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    encoded = [[bundle.encode_completion(o, eos=eos) for o in opts] for opts in options]
    with bundle.lock:
        return _score_options_locked(bundle, prompts, encoded, batch_size, device, dtype, mode, noise)


def _score_options_locked(bundle, prompts, encoded, batch_size, device, dtype, mode, noise):
    model = bundle.model
    was_training = model.training
    model.eval()
    try:
        if noise is not None and noise.target == "lora":
            return _scores_under_lora_noise(model, bundle, prompts, encoded, noise, mode, dtype, device)
        gen = noise.make_generator() if noise is not None else None
        n_draws = noise.draws if noise is not None else 1
        out: list[torch.Tensor] = []
        for a, b in _chunks([len(o) for o in encoded], batch_size):
            picked, targets, owner, n = _predictions(
                model, bundle, prompts[a:b], encoded[a:b], mode, batch_size, dtype, device
            )
            draws = []
            for _ in range(n_draws):
                transform = None
                if noise is not None:
                    transform = lambda z: add_logit_noise(z, noise.sigma, gen)  # noqa: E731
                if picked is None:  # every option is empty
                    draws.append(torch.zeros(n))
                else:
                    draws.append(_sum_token_logps(picked, targets, owner, n, transform).float().cpu())
            per_prompt = [_split(d, encoded[a:b]) for d in draws]  # draws x prompts
            for i in range(b - a):
                out.append(per_prompt[0][i] if noise is None else torch.stack([d[i] for d in per_prompt]))
        return out
    finally:
        model.train(was_training)


def _predictions(model, bundle, prompts, completions, mode, batch_size, dtype, device):
    """(picked (T, V), targets (T,), owner (T,), n) for all completions of ``prompts`` (see scoring)."""
    n = sum(len(c) for c in completions)
    if mode == "shared_prefix" and _attn_implementation(model) in PACKED_ATTENTION:
        return _shared_prefix_predictions(model, bundle, prompts, completions, dtype, device)
    flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
    flat_c = [list(c) for cs in completions for c in cs]
    parts, offset = [], 0
    for start in range(0, len(flat_c), batch_size):
        batch = to_device(
            bundle.collate(flat_p[start : start + batch_size], flat_c[start : start + batch_size]), device
        )
        picked, targets, row, _ = _naive_predictions(forward_logits(model, batch, dtype), batch["labels"])
        parts.append((picked, targets, row + offset))
        offset += batch["input_ids"].shape[0]
    if not parts or all(p[1].numel() == 0 for p in parts):
        return None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), n
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        n,
    )


def _scores_under_lora_noise(model, bundle, prompts, encoded, spec: NoiseSpec, mode, dtype, device):
    """(draws, C_i) per prompt under LoRA noise: draws_per_forward copies of a prompt per forward."""
    noise = LoRANoise(model, spec.sigma)
    gen = spec.make_generator()
    if mode == "shared_prefix" and _attn_implementation(model) not in PACKED_ATTENTION:
        mode = "naive"  # the packed path would fall back anyway, with another row layout
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for d0 in range(0, spec.draws, spec.draws_per_forward):
        g = min(spec.draws_per_forward, spec.draws - d0)
        draw_ids = torch.arange(g)
        with noise.active(group_ids=draw_ids, generator=gen, inference=True):
            for i, (p, comps) in enumerate(zip(prompts, encoded)):
                if not comps:
                    rows[i].append(torch.zeros(g, 0))
                    continue
                # shared_prefix: one row per copy; naive: one row per (copy, option)
                noise.set_group_ids(
                    draw_ids if mode == "shared_prefix" else draw_ids.repeat_interleave(len(comps))
                )
                sums, _ = multi_completion_logps(
                    model, bundle, [p] * g, [comps] * g, mode=mode, dtype=dtype, device=device
                )
                rows[i].append(torch.stack(sums).float().cpu())  # (g, C_i)
    return [torch.cat(r) for r in rows]


def sigma_sweep(
    bundle: ModelBundle,
    prompt: EncodedPrompt,
    options: Sequence[str],
    *,
    target: str,
    sigmas: Sequence[float],
    draws: int = 100,
    seed: int = 0,
    draws_per_forward: int = 8,
):
    """How the candidate distribution drifts from the clean one as sigma grows (the noise lab's curve).

    For each sigma: :func:`score_options` under ``draws`` draws of NoDO noise (method.md section 8),
    summarised by :func:`hanorec.noise.noise_summary` (KL(p_noisy || p_clean) over the candidates,
    top-1 / top-3 change rates, mean |score shift|). The same seed at every sigma rescales one set of
    standard normals, so the curve is smooth. Returns a pandas DataFrame, one row per sigma.
    """
    import pandas as pd

    clean = score_options(bundle, [prompt], [options])[0]
    rows = []
    for sigma in sigmas:
        spec = NoiseSpec(target, float(sigma), draws=draws, seed=seed, draws_per_forward=draws_per_forward)
        noisy = score_options(bundle, [prompt], [options], noise=spec)[0]
        rows.append({"sigma": float(sigma), "target": target, **noise_summary(clean, noisy).as_dict()})
    return pd.DataFrame(rows)


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    prompt: EncodedPrompt,
    *,
    max_new_tokens: int = 64,
    device=None,
    sampling: dict | None = None,
    seed: int | None = None,
) -> str:
    """Decode one answer: greedy (the generative protocol), or sampled when ``sampling`` is given.

    sampling: keyword arguments of ``model.generate`` for sampled decoding (the paper protocol passes
    temperature, top_p, top_k and repetition_penalty; do_sample is set here). The draw is seeded with
    ``seed`` inside a forked RNG state (torch's global generators are left as they were), so the same
    prompt and seed give the same answer whatever else was decoded before.
    """
    model = bundle.model
    device = device or next(model.parameters()).device
    batch = bundle.collate([prompt], [[]])
    batch.pop("labels")
    batch = to_device(batch, device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    with bundle.lock:
        return _generate_locked(bundle, model, batch, max_new_tokens, sampling, seed)


def _generate_locked(bundle, model, batch, max_new_tokens, sampling=None, seed=None):
    was_training = model.training
    model.eval()
    kwargs = {"do_sample": False} if sampling is None else {**sampling, "do_sample": True}
    device = batch["input_ids"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=sampling is not None):
        if sampling is not None and seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=bundle.pad_token_id,
            eos_token_id=bundle.eos_token_id,
            **kwargs,
        )
    model.train(was_training)
    new = out[0, batch["input_ids"].shape[1] :]
    return bundle.tokenizer.decode(new, skip_special_tokens=True)
