"""``LensRecorder``: a stream consumer that decodes states with lenses and emits tidy rank records.

Each state is reduced on arrival to what the unembedding needs (the lens-transformed state at the
chosen positions, ``[B, P, d]``), so memory grows with states × positions × d, never × V. When the
forward pass ends, everything is decoded in one call of the fused statistics kernel, with the model's
own final distribution as the reference for KL. Coda Lens states are decoded in batches of
iterations (one coda pass per batch), since the coda needs every position of a state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lens.model import LoopedLM
from lens.stream import Positions, State, Trace
from probes.batching import PositionSelection, select_positions
from probes.lenses.base import Lens
from probes.statistics import check_token_ids, final_logprobs, token_statistics


@dataclass(slots=True)
class _Entry:
    lens: str
    site: str
    iteration: int
    block: int
    unrolled_index: int
    store: tuple  # the RowStore holding this entry's lens-transformed state [B, P, d] ...
    slot: int  # ... at this slot
    normalize: bool


class RowStore:
    """Kept rows of one shape and dtype (``[B, P, d]`` each) in one preallocated tensor.

    A recorder keeps a few rows of every state of a long forward pass. Kept as separate small tensors,
    they fragment the C heap: each lands above activations that are freed right after, which then
    cannot be returned to the system (peak memory at 512 tokens grew from 22 MiB at T = 1 to 245 MiB at
    T = 64 with one Logit Lens row per state). Reserving the space of every row once, when the first one
    arrives, keeps the peak flat in T. A store that turns out too small doubles (a copy, rarely).
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.size = 0

    def append(self, row: Tensor, capacity: int) -> int:
        """Copy ``row`` into the next slot (reserving ``capacity`` slots the first time); return the slot."""
        if self.buffer is None or self.size == self.buffer.shape[0]:
            grown = torch.empty(
                (max(capacity, 2 * self.size, 1), *row.shape), dtype=row.dtype, device=row.device
            )
            if self.buffer is not None:
                grown[: self.size].copy_(self.buffer[: self.size])
            self.buffer = grown
        self.buffer[self.size].copy_(row)
        self.size += 1
        return self.size - 1

    @property
    def rows(self) -> Tensor:
        """The reserved rows (only read after a first ``append``)."""
        assert self.buffer is not None, "no row was appended to this store"
        return self.buffer


def default_sites(model: LoopedLM) -> list[str]:
    """Every block output plus ``latent`` and ``final``: the unrolled trajectory."""
    return model.layout.block_sites() + ["latent", "final"]


class LensRecorder:
    """Subscribe it to a forward pass, then call ``finalize(out.logits)`` for the records.

    ``targets`` maps a target kind (``"final"``, ``"intermediate"``, ``"control"``, …) to token ids
    per prompt ``[B]`` (or per prompt and position ``[B, P]``).
    """

    def __init__(
        self,
        model: LoopedLM,
        lenses: Sequence[Lens],
        sites: Sequence[str] | None = None,
        positions: Positions = "last",
        targets: Mapping[str, Tensor | Sequence[int]] | None = None,
        topk: int = 5,
        kl_to_final: bool = True,
        attention_mask: Tensor | None = None,
        coda_batch: int = 32,
    ) -> None:
        if not lenses:
            raise ValueError("LensRecorder needs at least one lens")
        self.model = model
        self.lenses = list(lenses)
        self.sites = list(sites) if sites is not None else default_sites(model)
        for site in self.sites:
            if site not in ("prelude", "core", "coda"):
                model.layout.parse(site)
        self.wanted_positions = positions
        self.positions: Positions = "all"  # we select ourselves: the Coda Lens needs whole sequences
        if isinstance(positions, str) and positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}")
        if not isinstance(positions, str) and len(positions) == 0:
            raise ValueError("positions=[] selects no token; give at least one position, 'last' or 'all'")
        self.targets = {k: torch.as_tensor(v, dtype=torch.long) for k, v in (targets or {}).items()}
        for kind, ids in self.targets.items():
            check_token_ids(ids, model.config.padded_vocab_size, f"{kind!r} target")
        if not 0 <= topk <= 10:
            raise ValueError(f"topk must be between 0 and 10, got {topk}")
        self.topk = topk
        self.kl_to_final = kl_to_final
        self.attention_mask = attention_mask
        self.coda_batch = coda_batch
        self._entries: list[
            _Entry | None
        ] = []  # reserved with the rows (a growing list lands on the heap too)
        self._count = 0
        self._stores: dict[tuple, RowStore] = {}
        self._pending: dict[str, list[State]] = {}
        self._selection: PositionSelection | None = None

    # ---- streaming ---------------------------------------------------------------------------------
    def _select(self, batch: int, seq_len: int) -> PositionSelection:
        """Positions relative to each prompt's own tokens (left padding is never decoded)."""
        if self._selection is None:
            self._selection = select_positions(self.wanted_positions, self.attention_mask, batch, seq_len)
        return self._selection

    def __call__(self, state: State) -> None:
        selection = self._select(state.tensor.shape[0], state.tensor.shape[1])
        with torch.no_grad():
            for lens in self.lenses:
                if not lens.supports(state.site):
                    continue
                if lens.needs_sequence:
                    queue = self._pending.setdefault(lens.name, [])
                    queue.append(state)
                    if len(queue) >= self.coda_batch:
                        self._flush(lens)
                    continue
                h = lens.transform_hidden(selection.gather(state.tensor), state.site, state.iteration)
                self._add(lens, state, h)

    def _add(self, lens: Lens, state: State, hidden: Tensor) -> None:
        key = (lens.name, hidden.dtype, tuple(hidden.shape), hidden.device)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = RowStore()
        slot = store.append(hidden.detach(), self._expected_rows(lens, state.num_steps))
        if self._count == len(self._entries):
            expected = sum(self._expected_rows(each, state.num_steps) for each in self.lenses)
            self._entries.extend([None] * max(expected, self._count))
        self._entries[self._count] = _Entry(
            lens.name,
            state.site,
            state.iteration,
            state.block,
            state.unrolled_index,
            key,
            slot,
            lens.applies_norm(state.site),
        )
        self._count += 1

    @property
    def entries(self) -> list[_Entry]:
        """What was recorded so far, in arrival order (one entry per lens and state)."""
        return self._entries[: self._count]  # type: ignore[return-value]

    def _expected_rows(self, lens: Lens, num_steps: int) -> int:
        """Rows ``lens`` keeps in a forward pass of ``num_steps`` iterations (fewer when rows exit early)."""
        layout = self.model.layout
        return sum(
            max(num_steps, 1) if layout.is_recurrent(site) else 1
            for site in layout.sites()
            if (site in self.sites or site.split(".")[0] in self.sites) and lens.supports(site)
        )

    def _hidden(self, entries: list[_Entry]) -> Tensor:
        """The kept rows of ``entries`` in their order, ``[len(entries) * B * P, d]``."""
        first = entries[0]
        store = self._stores[first.store].rows
        assert store is not None
        if all(e.store == first.store and e.slot == first.slot + i for i, e in enumerate(entries)):
            rows = store[first.slot : first.slot + len(entries)]
            return rows.reshape(-1, rows.shape[-1])
        return torch.cat(
            [self._stores[e.store].rows[e.slot].reshape(-1, store.shape[-1]) for e in entries], 0
        )

    def _flush(self, lens: Lens) -> None:
        """Decode queued whole-sequence states in one batched pass (iterations stacked on the batch axis)."""
        queue = self._pending.pop(lens.name, [])
        if not queue:
            return
        by_site: dict[str, list[State]] = {}
        for state in queue:
            by_site.setdefault(state.site, []).append(state)
        for site, states in by_site.items():
            stacked = torch.cat([s.tensor for s in states], dim=0)
            mask = None
            if self.attention_mask is not None:
                mask = self.attention_mask.repeat(len(states), 1)
            out = lens.transform_hidden(stacked, site, states[0].iteration, mask)
            selected = self._select(states[0].tensor.shape[0], stacked.shape[1]).gather(out)
            for i, part in enumerate(selected.chunk(len(states), dim=0)):
                self._add(lens, states[i], part)

    def replay(self, trace: Trace, num_steps: int) -> LensRecorder:
        """Apply the lenses to a cached trace after the fact (same records as streaming)."""
        for site in trace.sites():
            if site not in self.sites and site.split(".")[0] not in self.sites:
                continue
            kind, block = self.model.layout.parse(site)
            for tensor, iteration in zip(trace.states[site], trace.iterations[site], strict=True):
                unrolled = self.model.layout.unrolled_index(site, iteration, num_steps)
                self(State(site, iteration, block, unrolled, tensor, None, num_steps))
        return self

    # ---- decoding ------------------------------------------------------------------------------------
    def finalize(
        self, final_logits: Tensor | None = None, predicted_target: str | None = None
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Decode everything; returns ``(ranks, topk)`` tidy DataFrames.

        ``final_logits`` ``[B, S, V]`` (or ``[B, 1, V]`` when only the last position was kept) is
        the model's output, the reference of ``kl_to_final``. ``predicted_target`` names an extra
        target kind holding the model's own greedy prediction at each recorded position.
        """
        for lens in self.lenses:
            self._flush(lens)
        if not self.entries:
            raise ValueError("nothing was recorded: no subscribed site was produced")
        B, P, _ = self._stores[self.entries[0].store].rows.shape[1:]
        selection = self._selection
        assert selection is not None
        rows = None
        if final_logits is not None:
            last_only = final_logits.shape[1] == 1 and self.wanted_positions == "last"
            rows = final_logits[:, -1:] if last_only else selection.gather(final_logits)
        if predicted_target is not None:
            if rows is None:
                raise ValueError("predicted_target needs the final logits")
            self.targets = {predicted_target: rows.argmax(-1).cpu(), **self.targets}
        targets, kinds = self._target_matrix(B, P)
        ref = None
        if self.kl_to_final and rows is not None:
            ref = final_logprobs(rows.reshape(B * P, -1))
        rank_frames, topk_frames = [], []
        for normalize in (True, False):
            group = [e for e in self.entries if e.normalize == normalize]
            if not group:
                continue
            hidden = self._hidden(group)
            n = len(group)
            tgt = targets.repeat(n, 1) if targets is not None else None
            ref_index = torch.arange(B * P).repeat(n) if ref is not None else None
            stats = token_statistics(
                self.model,
                hidden,
                normalize,
                tgt,
                self.topk,
                ref,
                ref_index.to(hidden.device) if ref_index is not None else None,
            )
            rank_frames.append(self._rank_frame(group, stats, kinds, targets, B, P))
            if self.topk:
                topk_frames.append(self._topk_frame(group, stats, B, P))
        ranks = pd.concat(rank_frames, ignore_index=True)
        topk = pd.concat(topk_frames, ignore_index=True) if topk_frames else pd.DataFrame()
        if not bool(selection.valid.all()):  # a shorter prompt's padding under positions="all"
            ranks = ranks[ranks.pop("_valid")].reset_index(drop=True)
            if len(topk):
                topk = topk[topk.pop("_valid")].reset_index(drop=True)
        else:
            ranks = ranks.drop(columns="_valid")
            topk = topk.drop(columns="_valid", errors="ignore")
        return ranks, topk

    def _target_matrix(self, B: int, P: int) -> tuple[Tensor | None, list[str]]:
        if not self.targets:
            return None, []
        columns = []
        for kind, ids in self.targets.items():
            if ids.dim() == 1:
                if ids.shape[0] != B:
                    raise ValueError(f"{kind!r} targets have {ids.shape[0]} ids for {B} prompts")
                ids = ids[:, None].expand(B, P)
            if tuple(ids.shape) != (B, P):
                raise ValueError(
                    f"{kind!r} targets must be [prompts] or [prompts, positions], got {tuple(ids.shape)}"
                )
            columns.append(ids.reshape(B * P))
        return torch.stack(columns, dim=1).to(self.model.device), list(self.targets)

    def _meta(self, group: list[_Entry], B: int, P: int) -> dict[str, np.ndarray]:
        """Per-row identifiers, rows ordered entry-major, then prompt, then position."""
        reps = B * P
        selection = self._selection
        assert selection is not None
        return {
            "prompt_index": np.tile(np.repeat(np.arange(B), P), len(group)),
            "position": np.tile(selection.own.reshape(-1).numpy(), len(group)).astype(np.int32),
            "site": np.repeat([e.site for e in group], reps),
            "iteration": np.repeat([e.iteration for e in group], reps).astype(np.int32),
            "block": np.repeat([e.block for e in group], reps).astype(np.int32),
            "unrolled_index": np.repeat([e.unrolled_index for e in group], reps).astype(np.int32),
            "lens": np.repeat([e.lens for e in group], reps),
            "_valid": np.tile(selection.valid.reshape(-1).numpy(), len(group)),
        }

    def _rank_frame(
        self, group: list[_Entry], stats, kinds: list[str], targets: Tensor | None, B: int, P: int
    ) -> pd.DataFrame:
        meta = self._meta(group, B, P)
        entropy = stats.entropy.float().cpu().numpy()
        kl = (
            stats.kl.float().cpu().numpy()
            if stats.kl is not None
            else np.full(len(entropy), np.nan, np.float32)
        )
        if not kinds:
            return pd.DataFrame({**meta, "entropy": entropy, "kl_to_final": kl})
        assert targets is not None  # kinds were asked for, so their target ids were given
        frames = []
        for k, kind in enumerate(kinds):
            frames.append(
                pd.DataFrame(
                    {
                        **meta,
                        "target_kind": kind,
                        "token_id": np.tile(targets[:, k].cpu().numpy().astype(np.int64), len(group)),
                        "rank": stats.require("target_ranks")[:, k].cpu().numpy().astype(np.int64),
                        "logprob": stats.require("target_logprobs")[:, k].float().cpu().numpy(),
                        "entropy": entropy,
                        "kl_to_final": kl,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _topk_frame(self, group: list[_Entry], stats, B: int, P: int) -> pd.DataFrame:
        meta = self._meta(group, B, P)
        k = stats.topk_ids.shape[1]
        return pd.DataFrame(
            {
                **{name: np.repeat(col, k) for name, col in meta.items()},
                "k": np.tile(np.arange(1, k + 1, dtype=np.int8), len(meta["site"])),
                "token_id": stats.topk_ids.cpu().numpy().reshape(-1).astype(np.int64),
                "logprob": stats.topk_logprobs.float().cpu().numpy().reshape(-1),
            }
        )
