"""Sections shared by several pages: the live prompt form, the views of one probed prompt, top-k tables.

Each function draws one block of widgets and figures; pages compose them. Every chart comes with a
download of the data behind it (``ui.chart(..., data=...)``). Views that are expensive to draw are
meant to sit in lazy tabs (``lazy_tabs``): only the open one runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, live, ui
from probes.lenses import applicable_lenses
from probes.palette import lens_order, target_label

DEFAULT_PROMPT = "Question: What is (2 * 3) + 1?\nAnswer:"
GRID_WINDOW = 24  # positions shown at once in the lens grid (a window slides over longer prompts)
TYPED, ARITHMETIC, FROM_RUN = "Type a prompt", "Arithmetic problem", "Prompt from the run"
TRAIN_LABEL = "train one now (the study's recipe: about 10 s for a small model on a CPU)"


@dataclass(frozen=True)
class LiveArgs:
    """What the live probe was asked (hashable: the cache key of ``live.cached_probe``)."""

    prompt: str
    num_steps: int
    lenses: tuple[str, ...]
    targets: tuple[tuple[str, str], ...] = ()
    tuned: str | None = None  # where the Tuned Lens comes from: a run's tuned_lens folder or live.TRAINED


@dataclass
class LiveSession:
    """The live model and the last probe a page asked for."""

    name: str
    model: Any
    args: LiveArgs
    probe: live.LiveProbe

    def probe_at(self, num_steps: int) -> live.LiveProbe:
        """The same question at another depth (cached): the model as if it stopped after ``num_steps``."""
        a = self.args
        if num_steps == a.num_steps:
            return self.probe
        return live.cached_probe(self.name, a.prompt, num_steps, a.lenses, a.targets, a.tuned)


def model_caption(model: Any, name: str) -> None:
    st.caption(f"Live model: {live.describe_model(model, name)}")


def _problem_label(p: Any) -> str:
    question = p.context.replace("Question:", "").replace("Answer:", "").strip()
    return f"{' '.join(question.split())}  →{p.completion}"


@st.cache_data(ttl=30, show_spinner=False)
def _tuned_sources(model_name: str, runs_root: str) -> list[tuple[str, str]]:
    return live.tuned_lens_sources(model_name, runs_root)


def live_session(
    key: str, *, run_prompts: pd.DataFrame | None = None, choose_lenses: bool = True
) -> LiveSession | None:
    """Load the live model, show its caption and the prompt form, and probe what was last submitted
    (with a spinner); ``None`` (with a message shown) until then or when the model cannot load."""
    name = ui.settings().model
    model = ui.load_model_or_explain(name)
    if model is None:
        return None
    model_caption(model, name)
    args = live_prompt_form(key, model, run_prompts=run_prompts, choose_lenses=choose_lenses)
    if args is None:
        st.info(
            "Type a prompt (or pick a problem) and press **Probe**: a small model answers in about a "
            "second on a CPU."
        )
        return None
    spinner = "Training a Tuned Lens, then probing…" if args.tuned == live.TRAINED else "Probing…"
    with st.spinner(spinner):
        probe = live.cached_probe(name, args.prompt, args.num_steps, args.lenses, args.targets, args.tuned)
    return LiveSession(name, model, args, probe)


def live_prompt_form(
    key: str, model: Any, *, run_prompts: pd.DataFrame | None = None, choose_lenses: bool = True
) -> LiveArgs | None:
    """Prompt source, prompt (with a token counter against the model's context and a warning for
    characters outside the vocabulary), iterations, lenses and an expected answer; returns the last
    request submitted with **Probe** (or ``None``). Nothing the form cannot probe is submitted."""
    examples = live.arithmetic_examples()
    if run_prompts is not None:
        run_prompts = run_prompts[run_prompts["prompt_text"].notna()]
    sources = (
        [TYPED]
        + ([ARITHMETIC] if examples else [])
        + ([FROM_RUN] if run_prompts is not None and not run_prompts.empty else [])
    )
    source = TYPED
    if len(sources) > 1:
        source = st.segmented_control("Prompt source", sources, default=TYPED, key=f"{key}_source") or TYPED
    default_steps = int(model.default_steps)
    targets: dict[str, str] = {}
    with st.container(border=True):
        if source == ARITHMETIC:
            index = st.selectbox(
                "Problem (held-out test split)",
                range(len(examples)),
                key=f"{key}_problem",
                format_func=lambda i: _problem_label(examples[i]),
            )
            problem = examples[index]
            prompt = live.render_question(model, problem.context)
            targets = {"final": problem.completion}
            if problem.intermediate:
                targets["intermediate"] = " " + str(problem.intermediate).strip()
        elif source == FROM_RUN:
            labels = dict(zip(run_prompts["prompt_id"], run_prompts["label"], strict=False))
            pid = st.selectbox(
                "Prompt of the selected run",
                list(labels),
                key=f"{key}_run_prompt",
                format_func=lambda i: labels[i],
            )
            row = run_prompts[run_prompts["prompt_id"] == pid].iloc[0]
            prompt = str(row["prompt_text"])
            if isinstance(row.get("expected"), str) and row["expected"]:
                targets["final"] = row["expected"]
            if isinstance(row.get("intermediate"), str) and row["intermediate"]:
                targets["intermediate"] = " " + row["intermediate"].strip()
        else:
            prompt = st.text_area(
                "Prompt",
                value=DEFAULT_PROMPT,
                key=f"{key}_text",
                height=90,
                help="Probed at every position; the last position is the next-token prediction. "
                "The token count updates when you leave the box (or press Ctrl+Enter).",
            )
        check = live.check_prompt(model, prompt)
        problems = [check.error] if check.error else []
        st.caption(
            f"**{check.n_tokens:,} token{'s' if check.n_tokens != 1 else ''}** of the model's "
            f"{check.limit:,}-token context"
        )
        if check.unknown:
            chars = ", ".join(f"`{c}`" for c in check.unknown)
            st.warning(
                f"Not in the model's vocabulary: {chars}. Each is read as the unknown token "
                f"`{check.unk_token}`, so the model does not see what you typed there."
            )
        cols = st.columns(3 if choose_lenses else 2)
        steps = ui.int_slider(
            "Iterations",
            1,
            max(64, 2 * default_steps),
            default_steps,
            key=f"{key}_steps",
            container=cols[0],
            help="T, the number of times the core block runs (T = 1 against many is the paper's comparison)",
        )
        lenses, tuned = _lens_picker(key, model, cols[1] if choose_lenses else None)
        if source == TYPED:
            expected = cols[-1].text_input(
                "Expected answer (optional)",
                key=f"{key}_expected",
                placeholder="e.g.  7 (with its leading space)",
                help="Text whose token is tracked as the `final` target at every layer (of an answer of "
                "several tokens, the first)",
            )
            if expected:
                targets["final"] = expected
        for text in targets.values():
            target = live.check_target(model, text)
            if target.error:
                problems.append(target.error)
            elif target.note and source == TYPED:
                st.info(target.note)
        for problem in problems:
            st.error(problem)
        submitted = st.button(
            "Probe", type="primary", icon=":material/play_arrow:", key=f"{key}_probe", disabled=bool(problems)
        )
    current = LiveArgs(prompt, int(steps), tuple(lenses), tuple(sorted(targets.items())), tuned)
    if submitted and not problems:
        st.session_state[f"{key}_args"] = current
    args = st.session_state.get(f"{key}_args")
    if args is not None and args != current:
        st.caption("The form has changed since this probe: press **Probe** to probe the new question.")
    return args


def _lens_picker(key: str, model: Any, where: Any) -> tuple[list[str], str | None]:
    """Lenses (the Tuned Lens from a run of this model, or trained on request) and the Tuned Lens source."""
    name = ui.settings().model
    available = applicable_lenses(model)  # the Coda Lens only where the family has a coda
    saved = _tuned_sources(name, str(ui.settings().runs))
    if where is None:
        return available, None
    options = [*available, "tuned"]
    default = [*available, *(["tuned"] if saved else [])]
    lenses = (
        where.multiselect(
            "Lenses",
            options,
            default=default,
            key=f"{key}_lenses",
            help="logit: the final norm and head on each state; coda: the model's coda first; tuned: a learned "
            "affine translator per layer, then the Logit Lens",
        )
        or available[-1:]
    )
    tuned = None
    if "tuned" in lenses:
        labels = [label for label, _ in saved] + [TRAIN_LABEL]
        choice = where.selectbox(
            "Tuned Lens",
            labels,
            key=f"{key}_tuned",
            help="Tuned Lenses saved by runs of this very model (same weights), or one trained now",
        )
        tuned = dict(saved).get(choice, live.TRAINED)
    return lens_order(lenses), tuned


def probe_summary(probe: live.LiveProbe) -> None:
    cols = st.columns(4)
    cols[0].metric(
        "next token",
        charts.token_label(probe.prediction) or "∅",
        help="the model's greedy prediction after the last prompt token (␣ is a space, ↵ a newline)",
    )
    cols[1].metric("prompt tokens", len(probe.token_ids))
    cols[2].metric("iterations", probe.num_steps)
    cols[3].metric("probe time", f"{probe.seconds:.2f} s")


def lazy_tabs(names: Sequence[str], key: str) -> list[Any]:
    """``st.tabs`` whose hidden tabs do not run: draw into a tab only when ``tab.open`` (the tab
    switch reruns the page, from caches)."""
    return list(st.tabs(list(names), key=key, on_change="rerun"))


def _position_picker(probe: live.LiveProbe, key: str, where: Any = st) -> int:
    return int(
        where.selectbox(
            "Position (the lens predicts the token after it)",
            list(range(len(probe.tokens))),
            index=probe.last_position,
            key=key,
            format_func=lambda p: (
                f"{p}: {charts.token_label(probe.tokens[p])}"
                + ("  (last)" if p == probe.last_position else "")
            ),
        )
    )


def _target_text(probe: live.LiveProbe, kind: str) -> str:
    return probe.targets.get(kind, probe.prediction if kind == "predicted" else "")


def live_rank_view(probe: live.LiveProbe, key: str) -> None:
    kinds = probe.target_kinds()
    c1, c2 = st.columns([2, 3])
    with c1:
        chosen = (
            st.pills(
                "Targets",
                kinds,
                default=kinds[: min(2, len(kinds))],
                selection_mode="multi",
                key=f"{key}_kinds",
                help="predicted: the model's own next token; final: the expected answer; intermediate: the "
                "parenthesised result",
            )
            or kinds[:1]
        )
    with c2:
        pos = _position_picker(probe, f"{key}_pos")
    rows = probe.rank_rows(target_kinds=chosen, position=pos)
    hover = probe.hover(pos)
    label = ", ".join(f"{k} = {charts.token_html(_target_text(probe, k))}" for k in chosen)
    ui.chart(
        charts.rank_trajectory(
            rows, hover, title=f"Rank at position {pos} · {label}", height=440, layout=probe.layout
        ),
        key=f"{key}_traj",
        data=rows,
        file_name=f"live-ranks-position-{pos}",
    )
    st.caption(
        "Hover for the top-5 tokens of each lens at that layer. Heat map below: rank at each core block "
        "of each iteration."
    )
    ui.heatmaps(
        rows,
        list(probe.lenses),
        chosen[0],
        lambda lens: hover[hover["lens"] == lens][["unrolled_index", "top"]],
        key=key,
        layout=probe.layout,
    )


def probability_view(probe: live.LiveProbe, key: str) -> None:
    """The probability each lens gives a target, and the entropy of its distribution, at every layer."""
    kinds = probe.target_kinds()
    c1, c2 = st.columns([2, 3])
    kind = (
        c1.segmented_control(
            "Target", kinds, default="final" if "final" in kinds else kinds[0], key=f"{key}_kind"
        )
        or kinds[0]
    )
    pos = _position_picker(probe, f"{key}_pos", c2)
    rows = probe.ranks[
        (probe.ranks["position"] == pos)
        & (probe.ranks["target_kind"] == kind)
        & (probe.ranks["unrolled_index"] >= 0)
    ].assign(prob=lambda f: np.exp(f["logprob"].astype(float)))
    ui.chart(
        charts.probability_entropy(
            rows,
            title=f"p({target_label(kind)} = {charts.token_html(_target_text(probe, kind))}) and entropy at "
            f"position {pos}",
            layout=probe.layout,
        ),
        key=f"{key}_pe",
        data=rows[
            ["lens", "unrolled_index", "site", "iteration", "block", "token", "rank", "prob", "entropy"]
        ],
        file_name=f"live-probability-entropy-{kind}-position-{pos}",
    )
    st.caption(
        "Top: the probability the lens gives the target token; bottom: the entropy (nats) of the lens's "
        "whole next-token distribution: low entropy means the lens is sure of something (not necessarily "
        "the target)."
    )


def lens_grid_view(session: LiveSession, key: str) -> None:
    """The logit-lens picture for the probed prompt; the iteration slider shows the grid as if the loop
    had stopped after that iteration (every row, the coda and the output included)."""
    probe = session.probe
    c1, c2, c3 = st.columns([1, 3, 1], vertical_alignment="bottom")
    with c1:
        lens = (
            st.segmented_control("Lens", probe.lenses, default=probe.lenses[-1], key=f"{key}_lens")
            or probe.lenses[-1]
        )
    with c3:
        every = st.toggle(
            "all iterations",
            value=False,
            key=f"{key}_all",
            help="one row per core block of every iteration (the coda and output at the last)",
        )
    iteration = probe.num_steps
    if not every:
        iteration = ui.int_slider(
            "Stop the loop after iteration",
            1,
            probe.num_steps,
            probe.num_steps,
            key=f"{key}_iter",
            container=c2,
            help="the grid of the model run with this many iterations: core, latent, coda and output all "
            "follow",
        )
    shown = session.probe_at(iteration) if iteration != probe.num_steps else probe
    window = None
    n = len(shown.tokens)
    if n > GRID_WINDOW:
        window = st.select_slider(
            "Positions shown",
            list(range(n)),
            value=(n - GRID_WINDOW, n - 1),
            key=f"{key}_window",
            format_func=lambda p: f"{p}: {charts.token_label(shown.tokens[p])}",
        )
    cells = live.grid_cells(shown, lens, every, window)
    which = (
        f"every iteration of {probe.num_steps}"
        if every
        else f"the loop stopped after {iteration} of {probe.num_steps}"
    )
    ui.chart(
        charts.lens_grid(
            cells, shown.tokens, title=f"{lens} lens · top-1 token per layer and position · {which}"
        ),
        key=f"{key}_grid",
        data=lambda: cells.drop(columns=["hover"]).assign(
            input_token=[shown.tokens[p] for p in cells["position"]]
        ),
        file_name=f"lens-grid-{lens}-T{iteration}",
    )
    st.caption(
        "Each cell: the lens's most likely next token at that layer and position, shaded by its "
        "probability; hover for the top-5. Bottom to top, in the order of the forward pass: prelude, core "
        "blocks, `latent` (the state handed to the coda), coda, final output (the Coda Lens ends at "
        "`latent`, where it equals the model's output). ⟨…⟩ is a special token."
    )


def live_dynamics_view(probe: live.LiveProbe, key: str) -> None:
    dyn = probe.dynamics
    if dyn is None or dyn.empty:
        st.info("No dynamics were recorded for this prompt.")
        return
    positions = sorted(dyn["position"].unique())
    labels = {
        p: f"{p}: {charts.token_label(probe.tokens[p]) if 0 <= p < len(probe.tokens) else p}"
        for p in positions
    }
    default = positions[-min(6, len(positions)) :]
    chosen = (
        st.multiselect(
            "Positions", positions, default=default, key=f"{key}_positions", format_func=lambda p: labels[p]
        )
        or positions[-1:]
    )
    sub = dyn[dyn["position"].isin(chosen)]
    if probe.num_steps < 2:
        st.info(
            "One iteration: the latent has taken no step yet, so there is no step size, cosine or path to "
            "draw. Probe with 2 iterations or more."
        )
        return
    trajectory_views(
        sub, key=key, color_by="position", labels={p: charts.token_html(v) for p, v in labels.items()}
    )


def trajectory_views(
    dyn: pd.DataFrame, key: str, color_by: str = "prompt_id", labels: dict | None = None
) -> None:
    """Step-norm and cosine curves, and the PCA trajectory (2-D or 3-D), for a set of latent trajectories."""
    a, b = st.columns(2, gap="large")
    with a:
        ui.chart(
            charts.step_curves(
                dyn, "step_norm", color_by=color_by, labels=labels, title="Relative step ‖hₜ − hₜ₋₁‖ / ‖hₜ‖"
            ),
            key=f"{key}_step",
            data=dyn,
            file_name=f"{key}-latent-dynamics",
        )
    with b:
        ui.chart(
            charts.step_curves(
                dyn, "cos_to_last", color_by=color_by, labels=labels, title="Cosine to the last iteration"
            ),
            key=f"{key}_cos",
            data=dyn,
            file_name=f"{key}-latent-dynamics",
        )
    st.fragment(pca_view)(dyn, key=key, color_by=color_by, labels=labels)


def pca_view(dyn: pd.DataFrame, key: str, color_by: str = "prompt_id", labels: dict | None = None) -> None:
    """The PCA trajectory with its 2-D / 3 projections / 3-D switch (drawn as a fragment by
    ``trajectory_views``: the switch reruns and redraws this chart only, not the step curves above)."""
    views = ["2-D", "3 projections", "3-D"]
    dims = (
        st.segmented_control(
            "PCA",
            views,
            default="2-D",
            key=f"{key}_dims",
            help="2-D: the first two components; 3 projections: the first three, two at a time; 3-D: a "
            "rotatable scene (WebGL: slow in a browser without a graphics card)",
        )
        or "2-D"
    )
    ends = (
        "PC1–PC3; pale at the first iteration, full colour at the last"
        if dims == "3-D"
        else "○ first iteration, ◆ last"
    )
    title = f"Latent trajectory across iterations (first principal components; {ends})"
    if dims == "3 projections":
        figure = charts.pca_projections(dyn, color_by=color_by, labels=labels, title=title)
    else:
        figure = charts.pca_trajectories(
            dyn, 3 if dims == "3-D" else 2, color_by=color_by, labels=labels, title=title
        )
    ui.chart(figure, key=f"{key}_pca", data=dyn, file_name=f"{key}-latent-dynamics")
    st.caption(
        "Each trajectory is projected on its own principal components (computed per trajectory when "
        "it was recorded), so compare shapes — spirals, fixed points, cycles — rather than positions. "
        f"Verdicts: **fixed-point**, {charts.verdict_help('fixed-point')}; **cycle-k**, "
        f"{charts.verdict_help('cycle-k')}; **drift**, {charts.verdict_help('drift')}."
    )


def exit_gate_view(probe: live.LiveProbe, key: str) -> None:
    """Where each token of the prompt would leave the loop (families with an exit gate)."""
    if probe.exit_gate is None or probe.exit_gate.empty:
        st.info("This model has no exit gate.")
        return
    st.caption(
        "Ouro's learned exit gate at every position: colour, the probability of having exited by "
        "iteration t; text, λ_t (the chance to stop there if not stopped before); outlined, where the "
        "threshold exit mode (0.5) stops each token. The p-weighted exit mixes every row's readout."
    )
    ui.chart(
        charts.exit_gate_heatmap(probe.exit_gate, probe.tokens),
        key=f"{key}_gate_map",
        data=probe.exit_gate,
        file_name="live-exit-gate",
    )
    last = probe.exit_gate[probe.exit_gate["position"] == probe.last_position]
    ui.chart(
        charts.exit_gate_curves(last.assign(prompt_id=0), height=340),
        key=f"{key}_gate_curves",
        data=last,
        file_name="live-exit-gate-last-position",
    )


def adaptive_view(session: LiveSession, key: str, criteria: tuple[str, ...] = live.EXIT_CRITERIA) -> None:
    """Why a token exits where it does: the exit criterion's value at every iteration for the prompt's
    next token, with the threshold drawn; then adaptive-depth generation."""
    crit = st.selectbox(
        "Exit criterion",
        [c for c in criteria if c != "none"],
        key=f"{key}_trace_crit",
        help="kl: KL divergence between the output distributions of two successive iterations (Huginn's "
        "default); entropy-diff, latent-diff, cosine, argmax-stability: the other adaptive-depth rules; "
        "gate: an exit-gated model's cumulative exit probability",
    )
    a = session.args
    trace = live.cached_exit_trace(session.name, a.prompt, a.num_steps, crit)
    ui.chart(
        charts.exit_trace_chart(
            trace, crit, title=f"exit criterion {crit} at every iteration · the prompt's next token"
        ),
        key=f"{key}_trace",
        data=trace,
        file_name=f"exit-trace-{crit}",
    )
    stops = trace[trace["exits"]]
    st.caption(
        (
            f"With `{crit}` the next token would leave the loop after iteration {int(stops['iteration'].iloc[0])} "
            f"of {a.num_steps} (dashed: the threshold {float(trace['threshold'].iloc[0]):g})."
            if len(stops)
            else f"With `{crit}` the next token would run all {a.num_steps} iterations (never below the threshold)."
        )
        + " Generation below stops each new token the same way."
    )
    generation_view(session.name, a.prompt, a.num_steps, key=key, criteria=criteria)


def generation_view(
    model_name: str,
    prompt: str,
    default_steps: int,
    key: str,
    criteria: tuple[str, ...] = live.EXIT_CRITERIA,
) -> None:
    with st.form(f"{key}_gen_form", border=True):
        c1, c2, c3 = st.columns(3)
        max_new = c1.slider("New tokens", 1, 32, 6, key=f"{key}_gen_n")
        cap = default_steps  # the probed depth: the exit criterion may stop each token earlier
        steps = c2.slider(
            "Iteration cap",
            1,
            max(64, 2 * default_steps),
            cap,
            key=f"{key}_gen_steps",
            help="Most iterations a token may use; the exit criterion stops earlier",
        )
        crit = c3.selectbox(
            "Exit criterion",
            criteria,
            key=f"{key}_gen_crit",
            help="gate (exit-gated models): stop once the cumulative exit probability reaches 0.5; "
            "Huginn's adaptive-depth rules: stop iterating a token once KL between "
            "successive iterations (or entropy, latent change, …) falls below a threshold",
        )
        sampler = "autoregressive"
        if live.diffusion_applies(model_name):
            sampler = (
                st.segmented_control(
                    "Sampler",
                    live.SAMPLERS,
                    default="autoregressive",
                    key=f"{key}_gen_sampler",
                    help="diffusion: the diffusion-forcing sampler refines a window of positions at once (the "
                    "iteration cap is its prefill depth; each bar counts the iterations a position received)",
                )
                or "autoregressive"
            )
        go = st.form_submit_button("Generate", icon=":material/auto_awesome:")
    if go:
        st.session_state[f"{key}_gen_args"] = (prompt, int(max_new), int(steps), str(crit), str(sampler))
    args = st.session_state.get(f"{key}_gen_args")
    if not args or args[0] != prompt:
        st.caption("Generate from the probed prompt to see how many iterations each new token needs.")
        return
    with st.spinner("Generating…"):
        gen = live.cached_generation(model_name, *args)
    mean = sum(gen.steps_used) / max(len(gen.steps_used), 1)
    st.markdown(
        f"**Generated** ({gen.seconds:.2f} s, `{gen.criterion}`, mean {mean:.1f} of {gen.max_steps} "
        f"iterations per token):"
    )
    st.code(gen.text or "∅", language=None)
    ui.chart(
        charts.steps_used_bar(
            gen.tokens, gen.steps_used, gen.max_steps, title="Iterations used per generated token"
        ),
        key=f"{key}_gen_bar",
        data=pd.DataFrame({"token": gen.tokens, "iterations_used": gen.steps_used, "cap": gen.max_steps}),
        file_name="generation-iterations",
    )


# ---------------------------------------------------------------------------------------------- top-k tables


def topk_table(topk: pd.DataFrame, layout: Any = None) -> pd.DataFrame:
    """One prompt's top-k decodings as the paper's qualitative tables: one row per layer, in the order of
    the forward pass (``latent`` before the coda, ``final`` last), one column per rank ``1.`` … ``k.``
    holding ``token (p)``; plain text (a table, not HTML)."""
    if topk is None or topk.empty:
        return pd.DataFrame(columns=["layer", "site", "t"])
    df = topk.copy()
    order = df["unrolled_index"].astype(float)
    order[df["site"] == "final"] = 1e9
    latent = df["site"] == "latent"
    if layout is not None and latent.any():
        order[latent] = [
            layout.unrolled_index("core", int(t), layout.core - 1) + 0.5 for t in df.loc[latent, "iteration"]
        ]
    df["order"] = order
    prob = df["prob"] if "prob" in df else pd.Series(float("nan"), index=df.index)
    df["cell"] = [
        charts.token_label(t) + ("" if pd.isna(p) else f"  ({p:.3f})")
        for t, p in zip(df["token"], prob, strict=True)
    ]
    wide = df.pivot_table(
        index=["order", "unrolled_index", "site", "iteration"], columns="k", values="cell", aggfunc="first"
    )
    wide.columns = [f"{int(k)}." for k in wide.columns]
    wide = wide.reset_index().sort_values("order")
    wide.insert(
        0, "layer", pd.array([int(u) if u >= 0 else None for u in wide["unrolled_index"]], dtype="Int64")
    )
    recurrent = [str(s).startswith("core") or s == "latent" for s in wide["site"]]
    wide["t"] = pd.array(
        [int(t) if r else None for r, t in zip(recurrent, wide["iteration"], strict=True)], dtype="Int64"
    )
    ranks = [c for c in wide.columns if str(c).endswith(".")]
    return wide[["layer", "site", "t", *ranks]].reset_index(drop=True)


def show_topk_table(table: pd.DataFrame, key: str, file_name: str, height: int = 420) -> None:
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=height,
        column_config={
            "layer": st.column_config.NumberColumn(
                "layer", help="unrolled index (prelude, core t-major, coda)"
            ),
            "t": st.column_config.NumberColumn("t", help="iteration of a core block"),
        },
        key=key,
    )
    ui.download(table, file_name, key=f"{key}_csv", label="Table (CSV)")


def chosen_prompt(event: Any) -> int | None:
    """The prompt id a click on a per-prompt line (``customdata[0]``) selected, if any."""
    try:
        points = event.selection.points if event is not None else []
    except AttributeError:
        return None
    for point in points or []:
        custom = point.get("customdata") if isinstance(point, dict) else None
        if custom is not None and len(custom) and custom[0] == custom[0]:  # not NaN (a gap between prompts)
            return int(custom[0])
    return None


def open_prompt(prompt_id: int) -> None:
    """Go to the prompt page showing ``prompt_id`` of the selected run."""
    st.session_state["prompt_id"] = int(prompt_id)
    st.switch_page("views/prompt.py")
