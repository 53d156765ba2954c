"""Reference log-probs shared by the preference stages of one comparison seed.

Every preference method of a (task, seed) starts from the same SFT model on the same pairs, and the reference is
that SFT model (the stage-2 network with its fresh LoRA disabled, never noised: hanorec.train.preference), so
the reference log-probs of a micro-batch are the same for every method that sees it. The training order is
seeded by the run's seed alone (hanorec.train.loop.epoch_order), so methods with the same pairs and batch size
see the same micro-batches. This cache keeps each micro-batch's reference sums as the first method's training
step computed them and hands them to the next method's same step: the values are the per-step reference's bit
for bit (not a separate precomputation in other batches, which differs in the last float bits; TRL's
``precompute_ref_log_probs`` is that other design), and the later methods skip the reference forward.

A micro-batch is keyed by its pairs (prompt text, images, chosen and rejected answers: :func:`pair_key`) and
by whether its method adds mDPO's imageless chosen rows; a file by the SFT checkpoint digest and a digest of
the pair set and everything else the values depend on (scoring mode, dtype, precision, pixel cap, device).
K > 1 rejected answers (S-DPO, DMPO, DynamicPO) are other pairs, so another file. NoDO shares DPO's values:
the reference is noise-free. Files are safetensors (no pickle); each entry's shape is checked against the
micro-batch it is used for, and a damaged file or entry is ignored (recomputed and written again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

FORMAT = "hanorec-reference-logps-1"
FOLDER = "reference_logps"  # under a comparison's <task>/seed<N>/ folder, beside hardness_cache/


def _digest(text: str, n: int = 32) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def pair_key(pair) -> str:
    """What a pair's reference log-probs depend on besides the model: the prompt text, its images, the chosen
    answer and the rejected ones, in order."""
    e = pair.example
    return _digest(json.dumps([e.prompt, list(e.image_items), pair.chosen, list(pair.rejected)]))


def dropout_active(model: torch.nn.Module) -> bool:
    """True when a dropout outside the LoRA layers would make the reference forward random (then nothing is
    shared: two methods' steps would not have computed the same values)."""
    return any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 and "lora_dropout" not in name for name, m in model.named_modules()
    )


class ReferenceCache:
    """The shared reference log-probs of one comparison seed (one folder), one table per pair set."""

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder)
        self.tables: dict[str, dict[str, torch.Tensor]] = {}
        self.dirty: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.notes: list[str] = []  # one sentence per damaged file or entry that was ignored

    def scope(self, sft_key: str, context: str, pair_keys: Sequence[str]) -> ReferenceScope:
        """The table of one pair set under one SFT model and context (loaded from the folder when kept)."""
        name = f"{_digest(sft_key, 16)}-{_digest(context + '|' + '|'.join(pair_keys), 16)}"
        if name not in self.tables:
            self.tables[name] = self._load(name)
        return ReferenceScope(self, name)

    def _path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{name}.safetensors"

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self._path(name)
        if path is None or not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format") != FORMAT:
                    raise ValueError(f"its format is not {FORMAT}")
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged or foreign file: recompute, never trust it
            self.notes.append(f"the reference cache {path} was ignored ({str(e)[:120]}); it is computed again")
            return {}

    def save(self) -> None:
        """Write every table that changed (atomically: a temporary file, then a rename)."""
        from safetensors.torch import save_file

        if self.folder is None:
            return
        for name in sorted(self.dirty):
            path = self._path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in self.tables[name].items()}, str(tmp), metadata={"format": FORMAT})
            os.replace(tmp, path)
        self.dirty.clear()


class ReferenceScope:
    """One pair set's table: :meth:`lookup` the reference sums of a micro-batch, :meth:`store` them."""

    def __init__(self, cache: ReferenceCache, name: str):
        self.cache, self.name = cache, name

    @staticmethod
    def batch_key(keys: Sequence[str], imageless: bool) -> str:
        return _digest("|".join(keys) + f"|imageless={bool(imageless)}")

    def lookup(self, keys: Sequence[str], imageless: bool, rows: Sequence[int]) -> list[torch.Tensor] | None:
        """The micro-batch's reference sums, one (C_i,) tensor per row, as a step computed them; None when not
        kept, or when the kept entry does not have this micro-batch's shape (then it is ignored)."""
        table = self.cache.tables[self.name]
        k = self.batch_key(keys, imageless)
        values, lengths = table.get(k), table.get(f"{k}.rows")
        if values is None or lengths is None:
            self.cache.misses += 1
            return None
        if (
            values.dim() != 1
            or not values.is_floating_point()
            or lengths.dtype != torch.int64
            or lengths.tolist() != [int(r) for r in rows]
            or values.numel() != sum(rows)
        ):
            self.cache.notes.append(f"a reference cache entry of {self.name} has the wrong shape; computed again")
            self.cache.misses += 1
            return None
        self.cache.hits += 1
        return list(torch.split(values, [int(r) for r in rows]))

    def store(self, keys: Sequence[str], imageless: bool, sums: Sequence[torch.Tensor]) -> None:
        k = self.batch_key(keys, imageless)
        table = self.cache.tables[self.name]
        table[k] = torch.cat([s.detach().reshape(-1) for s in sums]).cpu().clone()
        table[f"{k}.rows"] = torch.tensor([s.numel() for s in sums], dtype=torch.int64)
        self.cache.dirty.add(self.name)
