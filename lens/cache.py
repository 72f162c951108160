"""Key/value cache kept per (slot, position), with Huginn's lookup strategies and truncation.

Slots come from the model's layout (:meth:`lens.layout.UnrolledLayout.cache_index`): prelude blocks
``0 .. P-1``; core block ``j`` at iteration ``t`` (1-based) ``P + (t - 1) * J + j``; coda blocks
``-1, -2, …`` (the numbering of Huginn's and Ouro's own code). Each slot holds, per batch row, one
key/value entry per position — or none: a token that exited early (adaptive depth) never computed
the deeper iterations, a row that has stopped does not write, and truncation drops the last entries.

What attention at a slot sees for a position the slot lacks is the **lookup strategy**
(``cache_lookup_strategy``):

``full``
    only the entries present (the default of the Huginn authors' ``generate_with_adaptive_compute``):
    an earlier token that exited shallower is left out of attention at the deeper iterations.
``latest-m4``
    Huginn's fallback exactly as the authors' code computes it: for slot ``s >= 2`` the largest slot
    ``s' <= s`` with ``s' >= 2`` and ``s' ≡ s (mod 4)`` that holds the position; for ``s < 2`` slot
    ``s``, else slot 0. The numbers hard-code Huginn-3.5B (2 prelude and 4 core layers), where the
    rule means "the same core layer at the deepest iteration the token reached". On other shapes
    the same arithmetic pairs other slots (for 1 prelude and 2 core layers: the same layer at
    iterations of the same parity), and where it finds no slot — the authors' code then fails with
    ``ValueError: max() arg is an empty sequence`` — looplens raises :class:`CacheLookupError`,
    pointing to ``deepest``.
``deepest``
    looplens's rule, the generalisation of ``latest-m4`` to any layout: the same core block at the
    deepest earlier iteration that holds the position (on Huginn-3.5B's shape identical to
    ``latest-m4``). An early-exited token contributes the keys of its exit iteration, as if it had
    stopped computing there.

A ``-compress-s4`` suffix (``latest-m4-compress-s4``, the default of the authors' diffusion sampler)
renames every slot ``s > 1`` to ``(s - 2) mod 4 + 2`` before storing, so a later write overwrites
an earlier one in place: on Huginn-3.5B one slot per core layer, the newest iteration wins. The
arithmetic is the authors', whatever the shape (1 prelude and 2 core layers: slot 1 keeps
iteration 1's layer 0, slots 2–5 cycle with a period of two iterations; 2 prelude and 3 core layers:
layers share slots). The ``-compress`` suffix is its generalisation: one slot per core block on any
layout (equal to ``-compress-s4`` on Huginn-3.5B's shape).

With every entry present (fixed depth, no exit), every strategy without compression gives the same
attention, computed exactly as a plain cache does (one concatenation per slot and step).

Rows can also be **ragged** (:meth:`KVCache.set_lengths`): each row has its own length and writes at
its own positions, which the diffusion sampler needs for batches of sequences whose windows start at
different positions. :meth:`clear_last` drops the last entries (the authors' ``clear_last_k_entries``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lens.errors import InputError
from lens.layout import UnrolledLayout

__all__ = [
    "COMPRESSIONS",
    "LOOKUPS",
    "STRATEGIES",
    "CacheLookupError",
    "CacheStrategy",
    "KVCache",
    "compress_s4",
]

LOOKUPS = ("full", "latest-m4", "deepest")
COMPRESSIONS = {"": None, "-compress-s4": "s4", "-compress": "block"}
STRATEGIES = tuple(name + suffix for suffix in COMPRESSIONS for name in LOOKUPS)


class CacheLookupError(InputError):
    """A lookup strategy found no entry for a position it needs (``latest-m4`` on a shape it does not fit)."""


def compress_s4(index: int) -> int:
    """The authors' ``compress-s4`` renaming: slots ``> 1`` to ``(s - 2) mod 4 + 2``; others unchanged."""
    return (index - 2) % 4 + 2 if index > 1 else index


@dataclass(frozen=True)
class CacheStrategy:
    """A lookup rule (``full``, ``latest-m4``, ``deepest``) and a slot compression (None, ``"s4"``, ``"block"``).

    Example:
        >>> CacheStrategy.parse("latest-m4-compress-s4")
        CacheStrategy(lookup='latest-m4', compress='s4')
        >>> CacheStrategy.parse("deepest-compress").name
        'deepest-compress'
    """

    lookup: str = "deepest"
    compress: str | None = None

    @property
    def name(self) -> str:
        suffix = next(k for k, v in COMPRESSIONS.items() if v == self.compress)
        return self.lookup + suffix

    @classmethod
    def parse(cls, strategy: str | CacheStrategy) -> CacheStrategy:
        if isinstance(strategy, CacheStrategy):
            return strategy
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise InputError(
                f"unknown cache_lookup_strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
            )
        for suffix, compress in sorted(COMPRESSIONS.items(), key=lambda kv: -len(kv[0])):
            if suffix and strategy.endswith(suffix):
                return cls(strategy.removesuffix(suffix), compress)
        return cls(strategy, None)


class KVCache:
    """Per-slot keys and values ``[B, H, L, D]``, which positions each row holds, and the padding mask.

    ``keys[slot]`` / ``values[slot]`` are the stored tensors (zeros where a row holds no entry);
    ``present[slot]`` is ``None`` when every row holds every column, else a ``[B, L]`` mask.
    ``seq_len`` is the number of committed positions (the longest row's, when rows are ragged).
    ``active`` (``[B]`` bool, or None for all) names the rows that compute in the current forward
    pass: the others write nothing (an exited token stops computing).
    """

    def __init__(self, layout: UnrolledLayout, strategy: str | CacheStrategy = "deepest") -> None:
        self.layout = layout
        self.strategy = CacheStrategy.parse(strategy)
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.present: dict[int, Tensor | None] = {}
        self.key_mask: Tensor | None = None
        self.seq_len = 0  # committed positions (set by ``commit``)
        self.lengths: Tensor | None = None  # per-row committed positions when rows are ragged
        self.active: Tensor | None = None

    # ---- slots ---------------------------------------------------------------------------------------
    def slot(self, index: int) -> int:
        """Where the entries of cache index ``index`` are stored (after compression)."""
        if self.strategy.compress == "s4":
            return compress_s4(index)
        if self.strategy.compress == "block" and index >= self.layout.prelude:
            return self.layout.prelude + (index - self.layout.prelude) % self.layout.core
        return index

    def _candidates(self, slot: int) -> list[int]:
        """Other slots a missing entry of ``slot`` may be read from, best first."""
        lookup = self.strategy.lookup
        if lookup == "latest-m4":
            if slot < 2:
                return [0] if slot != 0 else []
            return [s for s in range(slot - 4, 1, -4)]
        if lookup == "deepest":
            block = self.layout.cache_core_block(slot) if slot >= 0 else None
            if block is None:
                return []
            same = [s for s in self.keys if 0 <= s < slot and self.layout.cache_core_block(s) == block]
            return sorted(same, reverse=True)
        return []

    # ---- positions -------------------------------------------------------------------------------------
    @property
    def ragged(self) -> bool:
        return self.lengths is not None

    def set_lengths(self, lengths: Tensor | list[int]) -> None:
        """Give each row its own committed length (ragged rows; drops every entry past a row's length)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.dim() != 1 or (lengths < 0).any():
            raise InputError("cache lengths must be one non-negative count per row")
        self.lengths = lengths
        self.truncate(lengths)

    def row_lengths(self, batch: int, device: torch.device) -> Tensor:
        """Committed length per row ``[B]``."""
        if self.lengths is not None:
            return self.lengths.to(device)
        return torch.full((batch,), self.seq_len, dtype=torch.long, device=device)

    def positions(self, batch: int, new: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Positions ``[B, new]`` of the next forward's tokens and its causal mask ``[B, new, seq_len + new]``
        (each query sees its own row's keys up to its position)."""
        start = self.row_lengths(batch, device)
        positions = start[:, None] + torch.arange(new, device=device)
        keys = torch.arange(self.seq_len + new, device=device)
        return positions, keys[None, None, :] <= positions[:, :, None]

    # ---- writing -------------------------------------------------------------------------------------------
    def _presence(self, slot: int, batch: int, width: int, device: torch.device) -> Tensor:
        """The presence mask of ``slot`` as ``[B, width]`` (columns past the stored ones absent)."""
        stored = self.keys[slot].shape[2] if slot in self.keys else 0
        present = self.present.get(slot)
        if present is None:
            present = torch.ones(batch, stored, dtype=torch.bool, device=device)
        if stored < width:
            pad = torch.zeros(batch, width - stored, dtype=torch.bool, device=device)
            present = torch.cat([present, pad], 1)
        return present[:, :width]

    def _padded(self, tensor: Tensor | None, shape: tuple[int, int, int, int], like: Tensor) -> Tensor:
        if tensor is None:
            return like.new_zeros(shape)
        if tensor.shape[2] < shape[2]:
            pad = tensor.new_zeros(*tensor.shape[:2], shape[2] - tensor.shape[2], tensor.shape[3])
            return torch.cat([tensor, pad], 2)
        return tensor[:, :, : shape[2]]

    def write(self, index: int, k: Tensor, v: Tensor) -> None:
        """Store this forward's ``k, v`` ``[B, H, S, D]`` at the rows' next ``S`` positions."""
        slot = self.slot(index)
        B, H, S, D = k.shape
        active = self.active
        if active is not None and bool(active.all()):
            active = None
        old_k, old_v = self.keys.get(slot), self.values.get(slot)
        stored = old_k.shape[2] if old_k is not None else 0
        if self.lengths is None:
            start = self.seq_len
            if active is None and stored == start and self.present.get(slot) is None:
                # the common case: every row holds every column, append (bit for bit a plain cache)
                if old_k is None:
                    self.keys[slot], self.values[slot] = k, v
                else:
                    assert old_v is not None  # a slot's keys and values are stored together
                    self.keys[slot] = torch.cat([old_k, k], 2)
                    self.values[slot] = torch.cat([old_v, v], 2)
                return
            if active is None and stored >= start and self.present.get(slot) is None:
                # re-running the same slot in one forward (a check's coda, compression): replace
                # (stored > start >= 0 here, so the slot holds columns, keys and values alike)
                assert old_k is not None and old_v is not None
                self.keys[slot] = torch.cat([old_k[:, :, :start], k, old_k[:, :, start + S :]], 2)
                self.values[slot] = torch.cat([old_v[:, :, :start], v, old_v[:, :, start + S :]], 2)
                return
            index_cols = torch.arange(start, start + S, device=k.device)[None].expand(B, S)
        else:
            index_cols = self.lengths.to(k.device)[:, None] + torch.arange(S, device=k.device)
        width = max(stored, int(index_cols.max()) + 1)
        present = self._presence(slot, B, width, k.device)
        keys = self._padded(old_k, (B, H, width, D), k)
        values = self._padded(old_v, (B, H, width, D), v)
        gather = index_cols[:, None, :, None].expand(B, H, S, D)
        written = torch.ones(B, S, dtype=torch.bool, device=k.device)
        if active is not None:  # rows that stopped keep what they had (or nothing)
            keep = ~active.to(k.device)
            k = torch.where(keep[:, None, None, None], keys.gather(2, gather), k)
            v = torch.where(keep[:, None, None, None], values.gather(2, gather), v)
            written = torch.where(keep[:, None], present.gather(1, index_cols), written)
        self.keys[slot] = keys.scatter(2, gather, k)
        self.values[slot] = values.scatter(2, gather, v)
        present = present.scatter(1, index_cols, written)
        self.present[slot] = None if bool(present.all()) else present

    # ---- reading ---------------------------------------------------------------------------------------------
    def lookup(self, index: int, new: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys and values ``[B, H, seq_len + new, D]`` attention at ``index`` reads, and which columns it may
        see (``[B, K]``, None = all), after the lookup strategy has filled or left out missing entries."""
        slot = self.slot(index)
        keys, values = self.keys[slot], self.values[slot]
        B, H, _, D = keys.shape
        K = self.seq_len + new
        present = self.present.get(slot)
        if present is None and keys.shape[2] == K:
            return keys, values, None
        keys = self._padded(keys, (B, H, K, D), keys)
        values = self._padded(values, (B, H, K, D), values)
        present = self._presence(slot, B, K, keys.device)
        columns = torch.arange(K, device=keys.device)[None]
        start = self.row_lengths(B, keys.device)[:, None]
        committed = columns < start  # earlier positions; the current ones were just written
        current = (columns >= start) & (columns < start + new)
        if self.strategy.lookup != "full":
            have = present.clone()
            for source in self._candidates(slot):
                if bool((have | ~committed).all()):
                    break
                if source not in self.keys:
                    continue
                src_present = self._presence(source, B, K, keys.device)
                take = ~have & src_present
                if not bool(take.any()):
                    continue
                shape = (B, H, K, D)
                take4 = take[:, None, :, None]
                keys = torch.where(take4, self._padded(self.keys[source], shape, keys), keys)
                values = torch.where(take4, self._padded(self.values[source], shape, values), values)
                have = have | take
            rows = torch.ones(B, dtype=torch.bool, device=keys.device)
            if self.active is not None:
                rows = self.active.to(keys.device)
            lacking = committed & ~have & rows[:, None]
            if bool(lacking.any()):
                b, p = (int(i) for i in lacking.nonzero()[0])
                raise CacheLookupError(self._lookup_failure(index, slot, b, p))
            present = have
        visible = present | current
        return keys, values, None if bool(visible.all()) else visible

    def _lookup_failure(self, index: int, slot: int, row: int, position: int) -> str:
        if self.strategy.lookup == "latest-m4":
            return (
                f"cache_lookup_strategy {self.strategy.name!r}: position {position} (row {row}) has no key/value "
                f"entry at slot {slot} nor at any slot s' <= {slot} with s' ≡ {slot} (mod 4), s' >= 2: the rule "
                "hard-codes Huginn-3.5B's 2 prelude and 4 core layers and does not fit this model "
                f"({self.layout.describe()}); the authors' code fails here too (max() of an empty sequence). "
                "Use 'deepest' (the same rule for any layout) or 'full'"
            )
        return (
            f"cache_lookup_strategy {self.strategy.name!r}: position {position} (row {row}) has no key/value "
            f"entry at cache index {index} and no earlier iteration of the same block to read instead"
        )

    def attend(
        self, index: int, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this forward's ``k, v`` at ``index``; return the keys, values and attention mask to use.

        ``mask`` is the forward's own mask ``[B, 1, S, K]`` (None: causal, the queries being the last ``S``
        keys); the columns the lookup leaves out are removed from it.
        """
        S = k.shape[2]
        self.write(index, k, v)
        keys, values, visible = self.lookup(index, S)
        if visible is not None:
            if mask is None:
                from lens.layers import causal_mask  # the one causal mask; layers imports this module

                mask = causal_mask(S, keys.shape[2], keys.device)[None, None]
            mask = mask & visible[:, None, None, :]
        return keys, values, mask

    # ---- length bookkeeping ---------------------------------------------------------------------------------
    def commit(self, new_tokens: int, mask: Tensor | None = None) -> None:
        """Mark ``new_tokens`` more positions as committed; ``mask`` ``[B, new_tokens]`` marks padding
        (left padding: kept as the key padding mask; ragged rows: right padding, not committed)."""
        if self.lengths is not None:
            added = mask.long().sum(1).to(self.lengths.device) if mask is not None else new_tokens
            self.lengths = self.lengths + added
            self.seq_len = int(self.lengths.max())
            return
        if mask is not None:
            mask = mask.bool()
            self.key_mask = mask if self.key_mask is None else torch.cat([self.key_mask, mask], dim=1)
        elif self.key_mask is not None:
            B = self.key_mask.shape[0]
            ones = torch.ones(B, new_tokens, dtype=torch.bool, device=self.key_mask.device)
            self.key_mask = torch.cat([self.key_mask, ones], dim=1)
        self.seq_len += new_tokens

    def truncate(self, lengths: int | Tensor) -> None:
        """Keep the first ``lengths`` positions (one count, or one per row); drop every later entry in every slot."""
        if isinstance(lengths, int):
            if self.lengths is not None:
                lengths = torch.full_like(self.lengths, lengths)
            else:
                keep = max(0, min(lengths, self.seq_len))
                for slot in list(self.keys):
                    self.keys[slot] = self.keys[slot][:, :, :keep]
                    self.values[slot] = self.values[slot][:, :, :keep]
                    present = self.present.get(slot)
                    self.present[slot] = None if present is None else present[:, :keep]
                if self.key_mask is not None:
                    self.key_mask = self.key_mask[:, :keep]
                self.seq_len = keep
                return
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths is not None and lengths.shape != self.lengths.shape:
            raise InputError(f"{lengths.shape[0]} lengths for a cache of {self.lengths.shape[0]} rows")
        self.lengths = lengths.clamp(min=0)
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        for slot in list(self.keys):
            B = self.keys[slot].shape[0]
            device = self.keys[slot].device
            present = self._presence(slot, B, width, device)
            present = present & (torch.arange(width, device=device)[None] < self.lengths.to(device)[:, None])
            self.keys[slot] = self.keys[slot][:, :, :width]
            self.values[slot] = self.values[slot][:, :, :width]
            self.present[slot] = None if bool(present.all()) else present
        self.seq_len = width

    def clear_last(self, n: int | Tensor) -> None:
        """Drop each row's last ``n`` entries in every slot (the authors' ``clear_last_k_entries``)."""
        if self.lengths is None:
            if isinstance(n, Tensor):
                self.lengths = torch.full_like(n, self.seq_len, dtype=torch.long)
            else:
                self.truncate(self.seq_len - int(n))
                return
        self.truncate(self.lengths - torch.as_tensor(n, dtype=torch.long))

    def select_rows(self, rows: Tensor) -> None:
        """Keep only ``rows`` (indices), e.g. to drop sequences that have finished."""
        for store in (self.keys, self.values):
            for slot in store:
                store[slot] = store[slot][rows.to(store[slot].device)]
        for slot, present in self.present.items():
            kept = None if present is None else present[rows.to(present.device)]
            self.present[slot] = None if kept is not None and bool(kept.all()) else kept
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows.to(self.key_mask.device)]
        if self.lengths is not None:
            self.lengths = self.lengths[rows.to(self.lengths.device)]
            self.seq_len = int(self.lengths.max()) if self.lengths.numel() else 0
            self.truncate(self.lengths)

    def __len__(self) -> int:
        return self.seq_len
