"""Key/value cache kept per (layer or iteration) index, as Huginn and Ouro keep it.

The slots come from the model's layout (:meth:`lens.layout.UnrolledLayout.cache_index`): prelude
blocks ``0 .. P-1``; core block ``j`` at iteration ``t`` (1-based) gets ``P + (t - 1) * J + j``; coda
blocks ``-1, -2, …``. Each recurrent iteration therefore attends to the keys that the same block
produced at the same iteration for earlier tokens. When an earlier token ran fewer iterations
(adaptive depth, an exit gate) an index is missing for it; the cache then uses the deepest iteration
that token reached for the same block position, exactly as if it had stopped computing there, so
lookups never misalign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens.layout import UnrolledLayout


class KVCache:
    """Per-index keys and values ``[B, H, S, D]`` plus the key padding mask ``[B, S]``."""

    def __init__(self, layout: UnrolledLayout) -> None:
        self.layout = layout
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.key_mask: Tensor | None = None
        self.seq_len = 0  # tokens whose entries are complete (set by ``commit``)

    # ---- index arithmetic -----------------------------------------------------------------------
    def _deepest_same_block(self, index: int, min_length: int = 0, below: int | None = None) -> int | None:
        """Deepest present core index of ``index``'s block position holding at least ``min_length`` tokens
        (and, with ``below``, earlier than it); None for prelude and coda indices."""
        block = self.layout.cache_core_block(index)
        if block is None:
            return None
        candidates = [
            i
            for i, k in self.keys.items()
            if self.layout.cache_core_block(i) == block
            and k.shape[2] >= min_length
            and (below is None or i < below)
        ]
        return max(candidates) if candidates else None

    # ---- updates -----------------------------------------------------------------------------------
    def update(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this forward's ``k, v`` at ``index``; return all keys/values for that index."""
        if index not in self.keys:
            if self.seq_len == 0:
                self.keys[index], self.values[index] = k, v
                return k, v
            source = self._deepest_same_block(index, below=index)
            if source is None:
                raise RuntimeError(f"key/value cache has no entries for index {index} of earlier tokens")
            self.keys[index] = self.keys[source][:, :, : self.seq_len]
            self.values[index] = self.values[source][:, :, : self.seq_len]
        past_k, past_v = self.keys[index], self.values[index]
        if past_k.shape[2] > self.seq_len:  # re-running the same iteration (e.g. frozen rows) replaces it
            past_k, past_v = past_k[:, :, : self.seq_len], past_v[:, :, : self.seq_len]
        self.keys[index] = torch.cat([past_k, k], dim=2)
        self.values[index] = torch.cat([past_v, v], dim=2)
        return self.keys[index], self.values[index]

    def commit(self, new_tokens: int, mask: Tensor | None = None) -> None:
        """Mark ``new_tokens`` positions as complete, filling indices this forward did not reach."""
        target = self.seq_len + new_tokens
        for index in sorted(self.keys):
            if self.keys[index].shape[2] < target:
                source = self._deepest_same_block(index, min_length=target)
                if source is None:
                    raise RuntimeError(f"cache index {index} is incomplete and has no fallback")
                self.keys[index] = torch.cat(
                    [self.keys[index], self.keys[source][:, :, self.seq_len : target]], 2
                )
                self.values[index] = torch.cat(
                    [self.values[index], self.values[source][:, :, self.seq_len : target]], 2
                )
        if mask is not None:
            mask = mask.bool()
            self.key_mask = mask if self.key_mask is None else torch.cat([self.key_mask, mask], dim=1)
        elif self.key_mask is not None:
            B = self.key_mask.shape[0]
            ones = torch.ones(B, new_tokens, dtype=torch.bool, device=self.key_mask.device)
            self.key_mask = torch.cat([self.key_mask, ones], dim=1)
        self.seq_len = target

    def freeze_rows(self, index: int, rows: Tensor, source_index: int) -> None:
        """Overwrite this forward's entries of ``rows`` at ``index`` with those at ``source_index``.

        Adaptive depth: a sequence that has exited keeps the keys of its exit iteration at every
        deeper index, exactly as if it had stopped computing there.
        """
        start = self.seq_len
        for store in (self.keys, self.values):
            store[index][rows, :, start:] = store[source_index][rows, :, start:]

    def __len__(self) -> int:
        return self.seq_len
