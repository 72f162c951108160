"""Lens ranks across a diffusion sampler's wavefront: how every window position converges, step by step.

:class:`WavefrontRecorder` subscribes to the diffusion sampler's forward passes (each state carries the
window's :class:`lens.stream.Wavefront`), decodes each window state with the lenses as it arrives, and
once the sampler is done ranks the *finally generated* token of the next position under every lens:
one tidy ``wavefront`` row per prompt × diffusion step × position × site × iteration × lens, with the
position's frozen flag, recurrence count, token guess and stability count.

The Coda Lens needs whole sequences; here it sees what the model's own coda sees in that step — the
frozen positions' latents from the last step they spent in the window (the cache's coda keys), then the
window's states — so at the step's last iteration it reproduces the sampler's own proposals.

Example:
    >>> import lens
    >>> from probes.wavefront import WavefrontRecorder
    >>> model = lens.load_model("tests/data/fixtures/huginn-tiny/checkpoint")
    >>> recorder = WavefrontRecorder(model)
    >>> res = model.generate([[5, 17, 300]], 4, 4, sampler="diffusion", consumers=[recorder], seed=0)
    >>> rows = recorder.finalize(res)
    >>> sorted(rows["lens"].unique()), int(rows["diffusion_step"].min())
    (['coda', 'logit'], -1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lens.generation import GenerationResult
from lens.model import LoopedLM
from lens.stream import State, Wavefront
from probes.lenses import Lens, applicable_lenses, make_lens
from probes.records import records
from probes.statistics import token_statistics

__all__ = ["WavefrontRecorder"]


@dataclass
class _Decoded:
    lens: str
    site: str
    iteration: int
    hidden: Tensor  # [B, P, d] in the unembedding's input space
    normalize: bool
    front: Wavefront  # on the CPU


class WavefrontRecorder:
    """Stream consumer for :mod:`lens.diffusion`; ``finalize(result)`` gives the ``wavefront`` rows.

    ``sites`` defaults to the last core block (every inner iteration of every step) and ``latent`` (the
    state each step ends with); ``lenses`` to every built-in lens the family supports (or pass a trained
    ``TunedLens``). States of ordinary forward passes (no wavefront) are ignored.
    """

    positions = "all"

    def __init__(
        self, model: LoopedLM, lenses: Sequence[str | Lens] | None = None, sites: Sequence[str] | None = None
    ) -> None:
        self.model = model
        self.lenses = [make_lens(model, lens) for lens in (lenses or applicable_lenses(model))]
        wanted = list(sites) if sites is not None else [f"core.{model.layout.core - 1}", "latent"]
        for site in wanted:
            model.layout.parse(site)
        self.recorded = wanted
        self.sites = sorted(set(wanted) | {"latent"})  # the latent updates the Coda Lens's context
        self.entries: list[_Decoded] = []
        self._context: dict[int, dict[int, Tensor]] = {}  # sequence -> position -> its latest latent

    def __call__(self, state: State) -> None:
        front = state.wavefront
        if front is None:
            return
        with torch.no_grad():
            if state.site in self.recorded:
                self._decode(state, front)
            if state.site == "latent":
                positions = front.positions.tolist()
                for row, cols in enumerate(positions):
                    known = self._context.setdefault(int(front.sequence[row]), {})
                    for p, col in enumerate(cols):
                        if col >= 0:
                            known[col] = state.tensor[row, p].detach()

    def _decode(self, state: State, front: Wavefront) -> None:
        pos, rec, tok, frozen, stab = (t.cpu() for t in front._tensors())
        cpu_front = Wavefront(front.step, pos, rec, tok, frozen, stab, front.sequence.cpu())
        for lens in self.lenses:
            if not lens.supports(state.site):
                continue
            if lens.needs_sequence:
                hidden = self._in_context(lens, state, front)
            else:
                hidden = lens.transform_hidden(state.tensor, state.site, state.iteration)
            self.entries.append(
                _Decoded(
                    lens.name,
                    state.site,
                    state.iteration,
                    hidden.detach(),
                    lens.applies_norm(state.site),
                    cpu_front,
                )
            )

    def _in_context(self, lens: Lens, state: State, front: Wavefront) -> Tensor:
        """A sequence lens (the Coda Lens) over [frozen positions' latents ‖ the window], window read back."""
        model = self.model
        latent = state.tensor if state.site == "latent" else model.to_latent(state.tensor)
        starts = [int(row[0]) if int(row[0]) >= 0 else 0 for row in front.positions]
        W = latent.shape[1]
        width = max(starts) + W
        B, d = latent.shape[0], latent.shape[-1]
        seq = latent.new_zeros(B, width, d)
        mask = torch.zeros(B, width, dtype=torch.long, device=latent.device)
        for row, start in enumerate(starts):
            known = self._context.get(int(front.sequence[row]), {})
            if start:
                seq[row, :start] = torch.stack([known[p] for p in range(start)])
            seq[row, start : start + W] = latent[row]
            mask[row, : start + W] = 1
        out = lens.transform_hidden(seq, "latent", state.iteration, mask)
        index = torch.tensor(starts, device=out.device)[:, None] + torch.arange(W, device=out.device)
        return out.gather(1, index[..., None].expand(B, W, out.shape[-1]))

    def finalize(self, result: GenerationResult, setting: str = "") -> pd.DataFrame:
        """Rank each position's finally generated next token under every recorded lens state.

        Rows without a next token (the last position, padding) are left out. ``setting`` labels the rows
        (a study's sampler setting).
        """
        finals = [list(p) + list(t) for p, t in zip(result.prompts, result.tokens, strict=True)]
        frames = []
        for normalize in (True, False):
            group = [e for e in self.entries if e.normalize == normalize]
            if not group:
                continue
            hidden, targets, meta = [], [], []
            for entry in group:
                pos, sequence = entry.front.positions, entry.front.sequence
                B, P = pos.shape
                nxt = torch.full((B, P), -1, dtype=torch.long)
                for b in range(B):
                    final = finals[int(sequence[b])]
                    for p in range(P):
                        q = int(pos[b, p])
                        if 0 <= q and q + 1 < len(final):
                            nxt[b, p] = final[q + 1]
                keep = nxt >= 0
                if not bool(keep.any()):
                    continue
                hidden.append(entry.hidden[keep.to(entry.hidden.device)])
                targets.append(nxt[keep])
                rows, cols = keep.nonzero(as_tuple=True)
                meta.append(
                    pd.DataFrame(
                        {
                            "prompt_id": sequence[rows].numpy(),
                            "setting": setting,
                            "diffusion_step": entry.front.step,
                            "position": pos[rows, cols].numpy(),
                            "site": entry.site,
                            "iteration": entry.iteration,
                            "lens": entry.lens,
                            "token_id": nxt[rows, cols].numpy(),
                            "frozen": entry.front.frozen[rows, cols].numpy(),
                            "recurrence": entry.front.recurrence[rows, cols].numpy(),
                            "guess_id": entry.front.token[rows, cols].numpy(),
                            "stability": entry.front.stability[rows, cols].numpy(),
                        }
                    )
                )
            if not hidden:
                continue
            stats = token_statistics(
                self.model, torch.cat(hidden), normalize, torch.cat(targets)[:, None].to(self.model.device)
            )
            frame = pd.concat(meta, ignore_index=True)
            # the targets were passed, so the kernel computed their ranks and log-probabilities
            frame["rank"] = stats.require("target_ranks")[:, 0].cpu().numpy().astype(np.int64)
            frame["logprob"] = stats.require("target_logprobs")[:, 0].float().cpu().numpy()
            frames.append(frame)
        if not frames:
            return records("wavefront", [])
        frame = pd.concat(frames, ignore_index=True)
        tok = self.model.tokenizer
        if tok is not None:  # decoded once per distinct id
            ids = pd.unique(pd.concat([frame["token_id"], frame["guess_id"]]))
            text = {int(i): tok.decode([int(i)]) for i in ids}
            frame["token"] = frame["token_id"].map(text)
            frame["guess"] = frame["guess_id"].map(text)
        return records("wavefront", frame)
