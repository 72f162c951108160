"""The probing API a study reads like: prompts in, tidy rank trajectories out.

>>> result = probe_prompts(model, prompts, targets={"final": answer_ids}, num_steps=16,
...                        lenses=["logit", "coda"])                       # doctest: +SKIP
>>> result.ranks.query("lens == 'coda'").groupby("unrolled_index")["rank"].median()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm import tqdm

from lens.generation import pad_left
from lens.model import InitState, LoopedLM
from lens.stream import Positions
from probes.dynamics import DynamicsRecorder
from probes.exit_gate import ExitGateRecorder
from probes.lenses import Lens, applicable_lenses, make_lens
from probes.recorder import LensRecorder
from probes.records import records


@dataclass
class ProbeResult:
    """Tidy tables: ``ranks`` (one row per prompt, position, site, iteration, lens, target), ``topk``,
    ``dynamics`` and ``verdicts`` (latent trajectory per prompt), ``logits`` of the model's last position,
    and for exit-gated families ``exit_gate`` (λ_t, p_t, cumulative per prompt, position, iteration)."""

    ranks: pd.DataFrame
    topk: pd.DataFrame
    dynamics: pd.DataFrame = field(default_factory=pd.DataFrame)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)
    predictions: list[int] = field(default_factory=list)
    exit_gate: pd.DataFrame = field(default_factory=pd.DataFrame)

    def trajectory(self, lens: str, target_kind: str = "final") -> pd.DataFrame:
        """Ranks of one lens and target as a prompts × unrolled-layer table (unrolled order)."""
        rows = self.ranks[
            (self.ranks["lens"] == lens)
            & (self.ranks["target_kind"] == target_kind)
            & (self.ranks["unrolled_index"] >= 0)
        ]
        return rows.pivot_table(index="prompt_id", columns="unrolled_index", values="rank", aggfunc="first")


def probe_prompts(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    targets: Mapping[str, Sequence[int]] | None = None,
    num_steps: int | None = None,
    lenses: Sequence[str | Lens] | None = None,
    positions: Positions = "last",
    sites: Sequence[str] | None = None,
    topk: int = 5,
    batch_size: int = 16,
    init_state: InitState = None,
    seed: int = 0,
    dynamics: bool = True,
    prompt_ids: Sequence[int] | None = None,
    predicted_target: str | None = "predicted",
    progress: bool = False,
) -> ProbeResult:
    """Probe a batch of prompts at ``num_steps`` iterations with each lens, streaming (never all states).

    ``targets`` maps a target kind to one token id per prompt (``"final"``, ``"intermediate"``,
    ``"control"``, …); ``predicted_target`` adds the model's own greedy token at each position (the
    reference study's target). Prompts are left-padded so position -1 is every prompt's last token.
    ``lenses`` defaults to every built-in lens the model's family supports (Logit, and Coda where a
    coda exists).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list (of strings or token-id lists), not one string")
    token_lists = [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if isinstance(positions, str) and positions == "all" and len({len(t) for t in token_lists}) > 1:
        raise ValueError("positions='all' needs prompts of equal length (positions are per padded sequence)")
    if lenses is None:
        lenses = applicable_lenses(model)
    built = [make_lens(model, lens) for lens in lenses]
    ids_all = list(prompt_ids) if prompt_ids is not None else list(range(len(token_lists)))
    targets = {k: list(v) for k, v in (targets or {}).items()}
    for kind, ids in targets.items():
        if len(ids) != len(token_lists):
            raise ValueError(f"{kind!r} has {len(ids)} target ids for {len(token_lists)} prompts")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ranks, tops, dyn, verdicts, predictions, gates = [], [], [], [], [], []
    pad = model.config.pad_token_id or 0
    starts = range(0, len(token_lists), batch_size)
    for start in tqdm(starts, desc="probe", disable=not progress):
        batch = token_lists[start : start + batch_size]
        ids, mask = pad_left(batch, pad)
        ids, mask = ids.to(model.device), mask.to(model.device)
        padded = bool((mask == 0).any())
        recorder = LensRecorder(
            model,
            built,
            sites,
            positions,
            {k: v[start : start + batch_size] for k, v in targets.items()},
            topk,
            attention_mask=mask if padded else None,
        )
        consumers: list = [recorder]
        dyn_rec = DynamicsRecorder(model, positions=positions) if dynamics else None
        if dyn_rec is not None:
            consumers.append(dyn_rec)
        gate_rec = ExitGateRecorder(model, positions) if model.layout.exit_gate else None
        if gate_rec is not None:
            consumers.append(gate_rec)
        with torch.no_grad():
            out = model(
                ids,
                num_steps,
                init_state,
                mask if padded else None,
                consumers=consumers,
                logits="all" if positions != "last" else "last",
                generator=gen,
            )
        r, t = recorder.finalize(out.logits, predicted_target)
        predictions += out.logits[:, -1].argmax(-1).tolist()
        batch_ids = ids_all[start : start + batch_size]
        for frame in (r, t):
            if len(frame):
                frame.insert(0, "prompt_id", [batch_ids[i] for i in frame.pop("prompt_index")])
        ranks.append(r)
        tops.append(t)
        if dyn_rec is not None:
            d, v = dyn_rec.finalize()
            for frame in (d, v):
                frame.insert(0, "prompt_id", [batch_ids[i] for i in frame.pop("prompt_index")])
            dyn.append(d)
            verdicts.append(v)
        if gate_rec is not None:
            g = gate_rec.finalize()
            g.insert(0, "prompt_id", [batch_ids[i] for i in g.pop("prompt_index")])
            gates.append(g)
    frames = {
        "ranks": pd.concat(ranks, ignore_index=True),
        "topk": pd.concat(tops, ignore_index=True),
        "dynamics": pd.concat(dyn, ignore_index=True) if dyn else pd.DataFrame(),
        "verdicts": pd.concat(verdicts, ignore_index=True) if verdicts else pd.DataFrame(),
        "exit_gate": pd.concat(gates, ignore_index=True) if gates else pd.DataFrame(),
    }
    for frame in (frames["ranks"], frames["topk"]):
        if "token_id" in frame:  # decoded text; empty for a model without a tokenizer
            decode = model.tokenizer.decode if model.tokenizer is not None else lambda ids: ""
            vocab = {int(i): decode([int(i)]) for i in frame["token_id"].unique()}
            frame["token"] = frame["token_id"].map(vocab)
    # records are checked against their schema here, where they are made, not first when a run stores them
    return ProbeResult(
        **{name: records(name, frame) for name, frame in frames.items()}, predictions=predictions
    )
