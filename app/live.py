"""The live probe: load the model named on the command line, probe a typed prompt, generate adaptively.

``probe_text`` runs ``probes.probe_prompts`` on one prompt at every position (``positions="all"``)
with the chosen lenses and returns plain DataFrames in the run tables' shapes, so the same chart
builders draw a run and a live prompt. ``generate_adaptive`` runs ``model.generate`` with an exit
criterion and reports the iterations each new token used. The Streamlit-cached entry points are
``cached_model`` (``st.cache_resource``: one model per process) and ``cached_probe`` /
``cached_generation`` (``st.cache_data``: a repeated question is answered from memory).

Example:
    >>> model = load_model("tiny-arith")                                  # doctest: +SKIP
    >>> probe = probe_text(model, "Question: What is (2 * 3) + 1?\\nAnswer:", 16)  # doctest: +SKIP
    >>> probe.prediction                                                  # doctest: +SKIP
    ' 7'
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

__all__ = [
    "EXIT_CRITERIA",
    "GenerationView",
    "LiveProbe",
    "arithmetic_examples",
    "cached_generation",
    "cached_model",
    "cached_probe",
    "exit_criteria",
    "generate_adaptive",
    "grid_cells",
    "load_model",
    "probe_text",
    "render_question",
]

#: Exit criteria ``model.generate`` accepts for every family (Huginn's), the default first.
EXIT_CRITERIA = ("kl", "entropy-diff", "latent-diff", "argmax-stability", "cosine", "none")


def exit_criteria(model: Any) -> tuple[str, ...]:
    """The criteria that apply to ``model``: its learned exit gate first where it has one (Ouro)."""
    return (("gate",) if model.layout.exit_gate else ()) + EXIT_CRITERIA


MAX_PROMPT_TOKENS = 512


def load_model(name: str) -> Any:
    """``lens.load_model(name)`` on the CPU (an embedded name or a checkpoint directory)."""
    import lens
    from lens.runtime import configure_threads

    model = lens.load_model(str(name))
    configure_threads(model.num_parameters())  # the server process serves this one model
    if model.tokenizer is None:
        raise ValueError(
            f"model {name!r} has no tokenizer.json next to its weights; the live probe needs one "
            "to turn typed text into tokens"
        )
    return model


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(name: str) -> Any:
    """One loaded model per name for the whole server (failures are not cached: the next run retries)."""
    return load_model(name)


@dataclass
class LiveProbe:
    """One probed prompt: its tokens, and ranks/top-k/dynamics at every position, in run-table shape."""

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    num_steps: int
    lenses: list[str]
    ranks: pd.DataFrame
    topk: pd.DataFrame
    dynamics: pd.DataFrame
    prediction: str
    prediction_id: int
    targets: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    layout: Any = None  # the model's lens.layout.Unrolled at num_steps: stages of the unrolled axis
    exit_gate: pd.DataFrame = field(default_factory=pd.DataFrame)  # λ_t, p_t, cumulative per position

    @property
    def last_position(self) -> int:
        return len(self.token_ids) - 1

    def rank_rows(
        self,
        lenses: Sequence[str] | None = None,
        target_kinds: Sequence[str] | None = None,
        position: int | None = None,
    ) -> pd.DataFrame:
        """Block-output ranks at one position (default: the last), shaped like ``app.data.rank_rows``."""
        pos = self.last_position if position is None else position
        df = self.ranks[(self.ranks["unrolled_index"] >= 0) & (self.ranks["position"] == pos)]
        if lenses is not None:
            df = df[df["lens"].isin(list(lenses))]
        if target_kinds is not None:
            df = df[df["target_kind"].isin(list(target_kinds))]
        return df.assign(prompt_id=0)[
            [
                "prompt_id",
                "lens",
                "target_kind",
                "unrolled_index",
                "site",
                "iteration",
                "block",
                "rank",
                "logprob",
            ]
        ]

    def hover(self, position: int | None = None) -> pd.DataFrame:
        """``lens, prompt_id, unrolled_index, top``: the top-k tokens at one position as hover text."""
        from app.charts import token_text

        pos = self.last_position if position is None else position
        df = self.topk[(self.topk["unrolled_index"] >= 0) & (self.topk["position"] == pos)].sort_values("k")
        if df.empty:
            return pd.DataFrame(columns=["lens", "prompt_id", "unrolled_index", "top"])
        lines = [
            f"{k}. {token_text(t)}  {p:.3f}"
            for k, t, p in zip(df["k"], df["token"], df["logprob"].map(_prob), strict=True)
        ]
        df = df.assign(line=lines)
        out = df.groupby(["lens", "unrolled_index"], sort=False)["line"].agg("<br>".join).reset_index()
        return out.rename(columns={"line": "top"}).assign(prompt_id=0)

    def target_kinds(self) -> list[str]:
        from probes.palette import target_order

        return target_order(self.ranks["target_kind"])


def _prob(logprob: float) -> float:
    import math

    return math.exp(float(logprob))


def render_question(model: Any, question: str) -> str:
    """A task question as the model's prompt template writes it (the studies' default template)."""
    try:
        from studies.tasks.prompts import resolve_template
    except ImportError:
        return question
    return resolve_template(None, model.tokenizer).render(question, model.tokenizer)


def arithmetic_examples(n: int = 24, seed: int = 0) -> list[Any]:
    """Held-out one-digit composite problems for the picker ([] when ``studies.tasks`` is absent)."""
    try:
        from studies.tasks import arithmetic
    except ImportError:
        return []
    try:
        return arithmetic.sample("arithmetic_1dc", n, split="test", seed=seed, single_digit=True)
    except TypeError:  # an older generator without ``single_digit``
        return arithmetic.sample("arithmetic_1dc", n, split="test", seed=seed)


def _first_token(model: Any, text: str) -> int | None:
    if not text:
        return None
    ids = model.tokenizer.encode(text)
    return ids[0] if ids else None


def probe_text(
    model: Any,
    prompt: str,
    num_steps: int,
    lenses: Sequence[str] | None = None,
    targets: dict[str, str] | None = None,
    topk: int = 5,
) -> LiveProbe:
    """Probe ``prompt`` at ``num_steps`` iterations at every position.

    ``targets`` maps a target kind (``"final"``, ``"intermediate"``, …) to text whose first token is
    tracked at every position besides the model's own prediction (``"predicted"``). ``lenses``
    defaults to every lens the model's family supports.
    """
    from probes import applicable_lenses, probe_prompts

    if not prompt:
        raise ValueError("type a prompt first")
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the live probe takes at most {MAX_PROMPT_TOKENS}"
        )
    limit = getattr(model.config, "block_size", None)
    if limit and len(ids) > limit:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is {limit}")
    if lenses is None:
        lenses = applicable_lenses(model)
    if not lenses:
        raise ValueError("choose at least one lens")
    wanted: dict[str, list[int]] = {}  # one target id per prompt; probe_prompts tracks it at every position
    for kind, text in (targets or {}).items():
        tid = _first_token(model, text)
        if tid is not None:
            wanted[kind] = [tid]
    started = time.perf_counter()
    result = probe_prompts(
        model,
        [ids],
        targets=wanted,
        num_steps=int(num_steps),
        lenses=list(lenses),
        positions="all",
        topk=topk,
        batch_size=1,
    )
    seconds = time.perf_counter() - started
    tok = model.tokenizer
    prediction_id = int(result.predictions[0])
    return LiveProbe(
        prompt=prompt,
        token_ids=list(ids),
        tokens=[tok.decode([i]) for i in ids],
        num_steps=int(num_steps),
        lenses=list(lenses),
        ranks=result.ranks,
        topk=result.topk,
        dynamics=result.dynamics,
        prediction=tok.decode([prediction_id]),
        prediction_id=prediction_id,
        targets={k: v for k, v in (targets or {}).items() if k in wanted},
        seconds=seconds,
        layout=model.layout.at(int(num_steps)),
        exit_gate=result.exit_gate,
    )


@st.cache_data(show_spinner=False, max_entries=32)
def cached_probe(
    model_name: str,
    prompt: str,
    num_steps: int,
    lenses: tuple[str, ...],
    targets: tuple[tuple[str, str], ...] = (),
) -> LiveProbe:
    """``probe_text`` with the cached model; identical questions come from memory."""
    return probe_text(cached_model(model_name), prompt, num_steps, lenses, dict(targets))


def grid_cells(
    probe: LiveProbe, lens: str, iteration: int | None, positions: tuple[int, int] | None = None
) -> pd.DataFrame:
    """Cells of the lens grid: one row per layer × position with the top-1 token and its probability.

    Layers, bottom to top: prelude blocks, the core blocks of ``iteration`` (every iteration when
    ``None``), coda blocks, then ``latent`` and ``final`` where the lens recorded them (the Coda Lens
    stops at ``latent``, which it decodes exactly as the model does).
    """
    from app.charts import token_text

    df = probe.topk[probe.topk["lens"] == lens]
    if positions is not None:
        df = df[(df["position"] >= positions[0]) & (df["position"] <= positions[1])]
    if df.empty:
        return pd.DataFrame(columns=["row", "position", "token", "prob", "hover"])
    kind = df["site"].str.split(".").str[0]
    per_iteration = {"core"}
    if probe.layout is not None and probe.layout.layout.latent_per_iteration:
        per_iteration.add("latent")  # Ouro: a latent after every iteration, shown with its iteration
    this_iteration = (df["iteration"] == iteration) if iteration is not None else True
    keep = (kind.isin(["prelude", "coda", "latent", "final"]) & ~kind.isin(per_iteration)) | (
        kind.isin(per_iteration) & this_iteration
    )
    df = df[keep].copy()
    kind = df["site"].str.split(".").str[0]
    df["order"] = df["unrolled_index"].where(df["unrolled_index"] >= 0, 10**6 + (df["site"] == "final"))
    if "latent" in per_iteration:  # right after the last block of its iteration
        u, latent = probe.layout, kind == "latent"
        df["order"] = df["order"].astype(float)
        df.loc[latent, "order"] = [
            u.unrolled_index("core", int(t), u.core - 1) + 0.5 for t in df.loc[latent, "iteration"]
        ]
    df["row"] = [
        s if k not in ("core", "latent") else f"{s} · t={t}"
        for s, k, t in zip(df["site"], kind, df["iteration"], strict=True)
    ]
    df["prob"] = df["logprob"].map(_prob)
    df = df.sort_values(["order", "position", "k"])
    lines = [
        f"{k}. {token_text(t)}  {p:.3f}" for k, t, p in zip(df["k"], df["token"], df["prob"], strict=True)
    ]
    df["line"] = lines
    hover = df.groupby(["row", "position"], sort=False)["line"].agg("<br>".join)
    top1 = df[df["k"] == 1].copy()
    top1["hover"] = [
        f"<b>{r}</b> · position {p} ({token_text(probe.tokens[p])})<br>{hover[(r, p)]}"
        for r, p in zip(top1["row"], top1["position"], strict=True)
    ]
    return top1[["row", "position", "token", "prob", "hover"]].reset_index(drop=True)


@dataclass
class GenerationView:
    """Generated text, each new token, and how many iterations it used."""

    text: str
    tokens: list[str]
    steps_used: list[int]
    max_steps: int
    criterion: str
    seconds: float


SAMPLERS = ("autoregressive", "diffusion")


def diffusion_applies(model_name: str) -> bool:
    """Whether the diffusion sampler runs on this model (a prelude / core / coda layout)."""
    from lens.diffusion import diffusion_applies

    return diffusion_applies(cached_model(model_name).layout)


def generate_adaptive(
    model: Any,
    prompt: str,
    max_new_tokens: int,
    num_steps: int,
    exit_criterion: str = "kl",
    sampler: str = "autoregressive",
) -> GenerationView:
    """Greedy generation with an exit criterion (``"none"`` runs every token at full depth), or with the
    diffusion sampler (its defaults, zero initial states; ``num_steps`` is its prefill depth) where
    ``steps_used`` counts the iterations each generated position received."""
    if not prompt:
        raise ValueError("type a prompt first")
    started = time.perf_counter()
    if sampler == "diffusion":
        res = model.generate(
            [prompt], int(max_new_tokens), int(num_steps), sampler="diffusion", init_scale=0.0, seed=0
        )
        exit_criterion = f"diffusion ({res.stats[0].model_calls} model calls)"
    else:
        crit = None if exit_criterion == "none" else exit_criterion
        res = model.generate(
            [prompt], max_new_tokens=int(max_new_tokens), num_steps=int(num_steps), exit_criterion=crit
        )
    tok = model.tokenizer
    new = res.tokens[0]
    text = res.texts[0] if res.texts else tok.decode(new)
    return GenerationView(
        text=text,
        tokens=[tok.decode([t]) for t in new],
        steps_used=list(res.steps_used[0]),
        max_steps=max(int(num_steps), max(res.steps_used[0], default=0)),
        criterion=exit_criterion,
        seconds=time.perf_counter() - started,
    )


@st.cache_data(show_spinner=False, max_entries=32)
def cached_generation(
    model_name: str,
    prompt: str,
    max_new_tokens: int,
    num_steps: int,
    exit_criterion: str,
    sampler: str = "autoregressive",
) -> GenerationView:
    return generate_adaptive(
        cached_model(model_name), prompt, max_new_tokens, num_steps, exit_criterion, sampler
    )


def describe_model(model: Any, name: str) -> str:
    """``tiny-arith · huginn · 1.2M parameters · prelude 1 · core 2 × T · coda 1 · T = 4 by default``."""
    layout = model.layout
    params = model.num_parameters() if hasattr(model, "num_parameters") else 0
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    return (
        f"{Path(str(name)).name} · {layout.family} · {size} parameters · {layout.describe()} · "
        f"T = {model.default_steps} by default · lenses: {', '.join(layout.lenses())}"
    )
