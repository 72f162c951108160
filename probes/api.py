"""The probing API a study reads like: prompts in, tidy rank trajectories out.

>>> import lens
>>> model = lens.load_model("tiny-arith")
>>> prompts = ["Question: What is (2 * 3) + 1?\\nAnswer:", "Question: What is (4 + 4) - 5?\\nAnswer:"]
>>> answers = [model.tokenizer.encode(" 7")[0], model.tokenizer.encode(" 3")[0]]
>>> result = probe_prompts(model, prompts, targets={"final": answers}, num_steps=16, lenses=["logit", "coda"])
>>> medians = result.ranks.query("lens == 'coda' and target_kind == 'final'").groupby("unrolled_index")["rank"]
>>> len(medians.median()) == model.layout.at(16).n_unrolled  # one median per unrolled block layer
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from lens.exit_criteria import ExitCriterion
from lens.model import InitState, LoopedLM
from lens.stream import Positions
from probes.batching import Batch, forward_batches
from probes.dynamics import DynamicsRecorder
from probes.exit_gate import ExitGateRecorder
from probes.lenses import Lens, applicable_lenses, make_lens
from probes.recorder import LensRecorder
from probes.records import records


@dataclass
class ProbeResult:
    """Tidy tables: ``ranks`` (one row per prompt, position, site, iteration, lens, target), ``topk``,
    ``dynamics`` and ``verdicts`` (latent trajectory per prompt), the model's greedy next token per
    prompt (``predictions``), the iterations each prompt ran (``steps_used``; below the cap only with
    an exit criterion), and for exit-gated families ``exit_gate`` (λ_t, p_t, cumulative per prompt,
    position, iteration)."""

    ranks: pd.DataFrame
    topk: pd.DataFrame
    dynamics: pd.DataFrame = field(default_factory=pd.DataFrame)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)
    predictions: list[int] = field(default_factory=list)
    steps_used: list[int] = field(default_factory=list)
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
    exit_criterion: str | ExitCriterion | None = None,
) -> ProbeResult:
    """Probe a batch of prompts at ``num_steps`` iterations with each lens, streaming (never all states).

    ``targets`` maps a target kind to one token id per prompt (``"final"``, ``"intermediate"``,
    ``"control"``, …); ``predicted_target`` adds the model's own greedy token at each position (the
    reference study's target). Prompts are left-padded; ``positions`` count within each prompt's own
    tokens (``0`` its first token, ``-1`` or ``"last"`` its last; ``"all"`` every token of each
    prompt), and a position a prompt lacks is refused. ``exit_criterion`` (``"kl"``, ``"cosine"``, …)
    gives adaptive depth: each prompt stops once its last position converged (``num_steps`` is then
    the cap), and records of iterations past a prompt's own exit are left out. ``lenses`` defaults to
    every built-in lens the model's family supports (Logit, and Coda where a coda exists).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list (of strings or token-id lists), not one string")
    if isinstance(lenses, str | Lens):
        raise TypeError(f"lenses must be a list of lenses, e.g. [{lenses!r}], not one lens")
    token_lists = [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if lenses is None:
        lenses = applicable_lenses(model)
    built = [make_lens(model, lens) for lens in lenses]
    ids_all = list(prompt_ids) if prompt_ids is not None else list(range(len(token_lists)))
    if len(ids_all) != len(token_lists):
        raise ValueError(f"{len(ids_all)} prompt ids for {len(token_lists)} prompts")
    targets = {k: list(v) for k, v in (targets or {}).items()}
    for kind, ids in targets.items():
        if len(ids) != len(token_lists):
            raise ValueError(f"{kind!r} has {len(ids)} target ids for {len(token_lists)} prompts")

    def consumers(batch: Batch) -> list:
        window = slice(batch.start, batch.start + len(batch.lengths))
        built_consumers: list = [
            LensRecorder(
                model,
                built,
                sites,
                positions,
                {k: v[window] for k, v in targets.items()},
                topk,
                attention_mask=batch.attention_mask,
            )
        ]
        if dynamics:
            built_consumers.append(
                DynamicsRecorder(model, positions=positions, attention_mask=batch.attention_mask)
            )
        if model.layout.exit_gate:
            built_consumers.append(ExitGateRecorder(model, positions, attention_mask=batch.attention_mask))
        return built_consumers

    collected: dict[str, list[pd.DataFrame]] = {}
    predictions: list[int] = []
    steps_used: list[int] = []
    for batch, out, (recorder, *rest) in forward_batches(
        model,
        token_lists,
        consumers,
        num_steps=num_steps,
        batch_size=batch_size,
        init_state=init_state,
        seed=seed,
        logits="last" if positions == "last" else "all",
        exit_criterion=exit_criterion,
        progress=progress,
        desc="probe",
    ):
        assert out.logits is not None
        r, t = recorder.finalize(out.logits, predicted_target)
        predictions += out.logits[:, -1].argmax(-1).tolist()
        used = out.steps_used.tolist() if out.steps_used is not None else [out.num_steps] * len(batch.lengths)
        steps_used += used
        batch_ids = [ids_all[i] for i in batch.indices]
        frames = {"ranks": r, "topk": t}
        for extra in rest:
            if isinstance(extra, DynamicsRecorder):
                frames["dynamics"], frames["verdicts"] = extra.finalize()
            else:
                frames["exit_gate"] = extra.finalize()
        for name, frame in frames.items():
            if not len(frame):
                continue
            if exit_criterion is not None and "iteration" in frame and "site" in frame:
                # past its own exit a prompt's looped states are not its own (the batch ran on)
                own_steps = pd.Series(used).to_numpy()[frame["prompt_index"].to_numpy()]
                looped = frame["site"].str.match(r"^(adapter|core\.)")
                frame = frame[~(looped & (frame["iteration"] > own_steps))].reset_index(drop=True)
            frame.insert(0, "prompt_id", [batch_ids[k] for k in frame.pop("prompt_index")])
            collected.setdefault(name, []).append(frame)
    tables = {
        name: pd.concat(collected[name], ignore_index=True) if collected.get(name) else pd.DataFrame()
        for name in ("ranks", "topk", "dynamics", "verdicts", "exit_gate")
    }
    for frame in (tables["ranks"], tables["topk"]):
        if "token_id" in frame:  # decoded text; empty for a model without a tokenizer
            decode = model.tokenizer.decode if model.tokenizer is not None else lambda ids: ""
            vocab = {int(i): decode([int(i)]) for i in frame["token_id"].unique()}
            frame["token"] = frame["token_id"].map(vocab)
    # records are checked against their schema here, where they are made, not first when a run stores them
    return ProbeResult(
        **{name: records(name, frame) for name, frame in tables.items()},
        predictions=predictions,
        steps_used=steps_used,
    )
