"""The live probe: load the model named on the command line, probe a typed prompt, generate adaptively.

``probe_text`` runs ``probes.probe_prompts`` on one prompt at every position (``positions="all"``)
with the chosen lenses and returns plain DataFrames in the run tables' shapes, so the same chart
builders draw a run and a live prompt. ``check_prompt`` and ``check_target`` say, before anything
runs, how many tokens a prompt has against the model's context, which characters the vocabulary
lacks, and which token of an expected answer is tracked. ``generate_adaptive`` runs
``model.generate`` with an exit criterion and reports the iterations each new token used;
``cached_exit_trace`` is the criterion's value at every iteration (why a token exits where it does).
The Streamlit-cached entry points are ``cached_model`` (``st.cache_resource``: one model per
process) and ``cached_probe`` / ``cached_generation`` (``st.cache_data``: a repeated question is
answered from memory). Mistakes in what was typed raise ``lens.errors.InputError``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from lens.errors import InputError

__all__ = [
    "EXIT_CRITERIA",
    "TRAINED",
    "GenerationView",
    "LiveProbe",
    "PromptCheck",
    "TargetCheck",
    "arithmetic_examples",
    "cached_exit_trace",
    "cached_generation",
    "cached_model",
    "cached_probe",
    "check_prompt",
    "check_target",
    "context_limit",
    "exit_criteria",
    "generate_adaptive",
    "grid_cells",
    "load_model",
    "probe_text",
    "render_question",
    "tuned_lens_sources",
]

#: Exit criteria ``model.generate`` accepts for every family (Huginn's), the default first.
EXIT_CRITERIA = ("kl", "entropy-diff", "latent-diff", "argmax-stability", "cosine", "none")


def exit_criteria(model: Any) -> tuple[str, ...]:
    """The criteria that apply to ``model``: its learned exit gate first where it has one (Ouro)."""
    return (("gate",) if model.layout.exit_gate else ()) + EXIT_CRITERIA


def load_model(name: str) -> Any:
    """``lens.load_model(name)`` on the CPU (an embedded name or a checkpoint directory)."""
    import lens
    from lens.runtime import configure_threads

    model = lens.load_model(str(name))
    configure_threads(model.num_parameters())  # the server process serves this one model
    if model.tokenizer is None:
        raise InputError(
            f"model {name!r} has no tokenizer.json next to its weights; the live probe needs one "
            "to turn typed text into tokens"
        )
    return model


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(name: str) -> Any:
    """One loaded model per name for the whole server (failures are not cached: the next run retries)."""
    return load_model(name)


def context_limit(model: Any) -> int:
    """The most tokens the model reads at once (its ``block_size``): the one limit of the live probe."""
    return int(model.config.block_size)


@dataclass(frozen=True)
class PromptCheck:
    """A typed prompt as the model will read it: its tokens against the context, and what is lost."""

    ids: tuple[int, ...]
    limit: int
    unknown: tuple[str, ...] = ()  # characters the vocabulary lacks (each becomes the unknown token)
    unk_token: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def error(self) -> str | None:
        """Why the prompt cannot be probed, or ``None``."""
        if not self.ids:
            return "The prompt is empty: type a prompt (or pick one) first."
        if self.n_tokens > self.limit:
            return (
                f"The prompt has {self.n_tokens:,} tokens; the model's context holds {self.limit:,}. "
                f"Shorten it by {self.n_tokens - self.limit:,} tokens."
            )
        return None


def check_prompt(model: Any, prompt: str) -> PromptCheck:
    """Tokenise ``prompt`` as the probe will and list the characters outside the vocabulary (a tokenizer
    with an unknown token turns each into it, silently: ``é`` → ``<|unk|>``)."""
    tok = model.tokenizer
    ids = tuple(tok.encode(prompt)) if prompt else ()
    unk = getattr(tok, "unk_token_id", None)
    unknown: list[str] = []
    if unk is not None and unk in ids:
        for ch in dict.fromkeys(prompt):
            if not ch.isspace() and unk in tok.encode(ch):
                unknown.append(ch)
    return PromptCheck(ids, context_limit(model), tuple(unknown), str(getattr(tok, "unk_token", "") or ""))


@dataclass(frozen=True)
class TargetCheck:
    """An expected answer as tokens: the probe tracks the first one at every layer."""

    text: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]

    @property
    def tracked(self) -> str:
        return self.pieces[0] if self.pieces else ""

    @property
    def error(self) -> str | None:
        return (
            f"The expected answer {self.text!r} encodes to no token." if self.text and not self.ids else None
        )

    @property
    def note(self) -> str | None:
        """Said when the answer is longer than one token: which token stands for it."""
        if len(self.ids) < 2:
            return None
        from app.charts import token_label

        pieces = " · ".join(f"`{token_label(p)}`" for p in self.pieces)
        return (
            f"The expected answer is {len(self.ids)} tokens ({pieces}): its first token "
            f"`{token_label(self.tracked)}` is the one tracked at every layer."
        )


def check_target(model: Any, text: str) -> TargetCheck:
    tok = model.tokenizer
    ids = tuple(tok.encode(text)) if text else ()
    return TargetCheck(text, ids, tuple(tok.decode([i]) for i in ids))


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
        from app.charts import token_html

        pos = self.last_position if position is None else position
        df = self.topk[(self.topk["unrolled_index"] >= 0) & (self.topk["position"] == pos)].sort_values("k")
        if df.empty:
            return pd.DataFrame(columns=["lens", "prompt_id", "unrolled_index", "top"])
        lines = [
            f"{k}. {token_html(t)}  {p:.3f}"
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
    tuned: Any = None,
) -> LiveProbe:
    """Probe ``prompt`` at ``num_steps`` iterations at every position.

    ``targets`` maps a target kind (``"final"``, ``"intermediate"``, …) to text whose first token is
    tracked at every position besides the model's own prediction (``"predicted"``); an answer of several
    tokens is tracked by its first (``check_target`` says so). ``lenses`` defaults to every lens the
    model's family supports; ``"tuned"`` needs ``tuned``, a ``probes.lenses.TunedLens`` for the model.
    An empty or too long prompt raises ``InputError``.
    """
    from probes import applicable_lenses, probe_prompts

    check = check_prompt(model, prompt)
    if check.error:
        raise InputError(check.error)
    ids = list(check.ids)
    if lenses is None:
        lenses = applicable_lenses(model)
    if not lenses:
        raise InputError("choose at least one lens")
    wanted: dict[str, list[int]] = {}  # one target id per prompt; probe_prompts tracks it at every position
    for kind, text in (targets or {}).items():
        target = check_target(model, text)
        if target.error:
            raise InputError(target.error)
        if target.ids:
            wanted[kind] = [target.ids[0]]
    built = [tuned if name == "tuned" and tuned is not None else name for name in lenses]
    if "tuned" in lenses and tuned is None:
        raise InputError("the Tuned Lens needs trained translators: load them from a run or train them first")
    started = time.perf_counter()
    result = probe_prompts(
        model,
        [ids],
        targets=wanted,
        num_steps=int(num_steps),
        lenses=built,
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


#: The ``tuned`` source of a Tuned Lens trained in this server process (``trained_tuned_lens``).
TRAINED = "trained here"


def tuned_lens_sources(model_name: str, runs_root: str | Path) -> list[tuple[str, str]]:
    """``(label, directory)`` of the Tuned Lenses saved by runs of this very model (the same weights
    fingerprint in the run's manifest), newest first: a study trains one for every run."""
    from lens.loading import weights_fingerprint
    from probes.store import list_runs

    try:
        weights = weights_fingerprint(model_name)
    except (OSError, ValueError):
        return []
    found = []
    for info in list_runs(runs_root):
        folder = Path(info.path) / "tuned_lens"
        if info.status == "corrupt" or not (folder / "tuned_lens.json").is_file():
            continue
        try:
            manifest = json.loads((Path(info.path) / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and (manifest.get("model") or {}).get("weights") == weights:
            found.append((info.created or "", f"from run {info.name}", str(folder)))
    return [(label, folder) for _, label, folder in sorted(found, reverse=True)]


@st.cache_resource(show_spinner=False, max_entries=4)
def _saved_tuned_lens(model_name: str, folder: str) -> Any:
    from probes.lenses import TunedLens

    return TunedLens.load(folder, cached_model(model_name))


@st.cache_resource(show_spinner=False, max_entries=2)
def trained_tuned_lens(model_name: str) -> Any:
    """The study's Tuned Lens recipe fitted for the live model, once per server process (about 10 s for
    tiny-arith on two CPU cores)."""
    from studies.arithmetic import fit_study_tuned_lens
    from studies.tasks.prompts import resolve_template

    model = cached_model(model_name)
    template = resolve_template(None, model.tokenizer)
    return fit_study_tuned_lens(model, template, model.default_steps)


def tuned_lens(model_name: str, source: str | None) -> Any:
    """The Tuned Lens of ``source`` (a run's ``tuned_lens`` folder, or ``TRAINED``), or ``None``."""
    if not source:
        return None
    if source == TRAINED:
        return trained_tuned_lens(model_name)
    return _saved_tuned_lens(model_name, source)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_probe(
    model_name: str,
    prompt: str,
    num_steps: int,
    lenses: tuple[str, ...],
    targets: tuple[tuple[str, str], ...] = (),
    tuned: str | None = None,
) -> LiveProbe:
    """``probe_text`` with the cached model (and the Tuned Lens of source ``tuned``); identical questions
    come from memory."""
    model = cached_model(model_name)
    return probe_text(model, prompt, num_steps, lenses, dict(targets), tuned=tuned_lens(model_name, tuned))


@st.cache_data(show_spinner=False, max_entries=32)
def cached_exit_trace(model_name: str, prompt: str, num_steps: int, criterion: str) -> pd.DataFrame:
    """``probes.adaptive.exit_trace`` of the prompt's next token (the criterion's value per iteration)."""
    from probes.adaptive import exit_trace

    model = cached_model(model_name)
    return exit_trace(model, check_prompt(model, prompt).ids, num_steps, criterion)


def grid_cells(
    probe: LiveProbe, lens: str, every_iteration: bool = False, positions: tuple[int, int] | None = None
) -> pd.DataFrame:
    """Cells of the lens grid: one row per layer × position with the top-1 token and its probability.

    Rows, bottom to top, in the order of the forward pass (the model's layout): prelude blocks, the core
    blocks of the probe's last iteration (of every iteration with ``every_iteration``; Ouro's per-iteration
    ``latent`` after each), then ``latent`` (the state handed to the coda), the coda blocks and ``final``
    where the lens decodes them (the Coda Lens stops at ``latent``, which it decodes as the model does).
    To see the grid as if the loop had stopped after iteration t, probe at ``num_steps = t``.
    """
    from app.charts import token_html

    df = probe.topk[probe.topk["lens"] == lens]
    if positions is not None:
        df = df[(df["position"] >= positions[0]) & (df["position"] <= positions[1])]
    if df.empty:
        return pd.DataFrame(columns=["row", "position", "token", "prob", "hover"])
    u = probe.layout
    kind = df["site"].str.split(".").str[0]
    per_iteration = {"core"} | ({"latent"} if u is not None and u.layout.latent_per_iteration else set())
    last = df["iteration"] == probe.num_steps
    df = df[~kind.isin(per_iteration) | (last if not every_iteration else True)].copy()
    kind = df["site"].str.split(".").str[0]
    order = df["unrolled_index"].astype(float)
    final = kind == "final"
    order[final] = 10.0**9
    latent = kind == "latent"
    if u is not None and latent.any():  # right after the last core block of its iteration, before the coda
        order[latent] = [
            u.unrolled_index("core", int(t), u.core - 1) + 0.5 for t in df.loc[latent, "iteration"]
        ]
    df["order"] = order
    df["row"] = [
        s if k not in ("core", "latent") else f"{s} · t={t}"
        for s, k, t in zip(df["site"], kind, df["iteration"], strict=True)
    ]
    df["prob"] = df["logprob"].map(_prob)
    df = df.sort_values(["order", "position", "k"])
    lines = [
        f"{k}. {token_html(t)}  {p:.3f}" for k, t, p in zip(df["k"], df["token"], df["prob"], strict=True)
    ]
    df["line"] = lines
    hover = df.groupby(["row", "position"], sort=False)["line"].agg("<br>".join)
    top1 = df[df["k"] == 1].copy()
    top1["hover"] = [
        f"<b>{r}</b> · position {p} ({token_html(probe.tokens[p])})<br>{hover[(r, p)]}"
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
    seed: int = 0,
) -> GenerationView:
    """Greedy generation with an exit criterion (``"none"`` runs every token at full depth), or with the
    diffusion sampler (its defaults, zero initial states; ``num_steps`` is its prefill depth) where
    ``steps_used`` counts the iterations each generated position received. The autoregressive initial
    state is drawn from ``seed`` as ``probes.adaptive.exit_trace`` draws it, so the first token exits
    where the criterion's curve says it does."""
    if not prompt:
        raise InputError("The prompt is empty: type a prompt (or pick one) first.")
    import torch

    started = time.perf_counter()
    if sampler == "diffusion":
        res = model.generate(
            [prompt], int(max_new_tokens), int(num_steps), sampler="diffusion", init_scale=0.0, seed=seed
        )
        exit_criterion = f"diffusion ({res.stats[0].model_calls} model calls)"
    else:
        crit = None if exit_criterion == "none" else exit_criterion
        res = model.generate(
            [prompt],
            max_new_tokens=int(max_new_tokens),
            num_steps=int(num_steps),
            exit_criterion=crit,
            generator=torch.Generator(device=model.device).manual_seed(seed),
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
