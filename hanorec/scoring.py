"""Scoring: the one place that runs the model to get completion log-probs given a prompt.

SFT, preference training, evaluation, the hardness inspector and the noise lab all call this.
logp(y|x) is the SUM of the completion tokens' log-probs (method.md section 7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from hanorec.models import EncodedPrompt, ModelBundle

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_logits(model, batch: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the model on a collated batch; returns logits (N, L, V)."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model(**inputs, use_cache=False).logits


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
    shift_labels = labels[:, 1:]  # (N, L-1)
    mask = shift_labels != -100  # (N, L-1)
    picked = logits[:, :-1][mask].float()  # (T, V) only the completion positions
    if logits_transform is not None:
        picked = logits_transform(picked)
    token_logps = torch.gather(F.log_softmax(picked, dim=-1), 1, shift_labels[mask].unsqueeze(1)).squeeze(
        1
    )  # (T,)
    row = mask.nonzero()[:, 0]  # (T,) which row each completion token belongs to
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=logits.device).index_add(
        0, row, token_logps
    )
    counts = mask.sum(dim=1)
    return sums, counts


def batch_logps(model, batch: dict, logits_transform=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward_logits(model, batch, dtype)
    return completion_logps(logits, batch["labels"], logits_transform)


@torch.no_grad()
def score_options(
    bundle: ModelBundle,
    prompts: Sequence[EncodedPrompt],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    device=None,
    eos: bool = False,
) -> list[torch.Tensor]:
    """Log-likelihood of every option given its prompt: one (C_i,) tensor per prompt.

    This is the ranking protocol's score (method.md section 4). Options are scored without EOS by default:
    an option is a first answer line, not necessarily the whole answer.
    """
    model = bundle.model
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    flat: list[tuple[int, EncodedPrompt, list[int]]] = []
    for i, (p, opts) in enumerate(zip(prompts, options)):
        for o in opts:
            flat.append((i, p, bundle.encode_completion(o, eos=eos)))
    scores = torch.empty(len(flat))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        batch = to_device(bundle.collate([c[1] for c in chunk], [c[2] for c in chunk]), device)
        sums, _ = batch_logps(model, batch, dtype=dtype)
        scores[start : start + len(chunk)] = sums.float().cpu()
    model.train(was_training)
    out, k = [], 0
    for opts in options:
        out.append(scores[k : k + len(opts)])
        k += len(opts)
    return out


@torch.no_grad()
def generate(bundle: ModelBundle, prompt: EncodedPrompt, *, max_new_tokens: int = 64, device=None) -> str:
    """Greedy decoding of one answer (the generative protocol)."""
    model = bundle.model
    device = device or next(model.parameters()).device
    batch = bundle.collate([prompt], [[]])
    batch.pop("labels")
    batch = to_device(batch, device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=bundle.pad_token_id,
        eos_token_id=bundle.eos_token_id,
    )
    model.train(was_training)
    new = out[0, batch["input_ids"].shape[1] :]
    return bundle.tokenizer.decode(new, skip_special_tokens=True)
