"""Sections shared by several pages: the live prompt form and the views of one probed prompt.

Each function draws one block of widgets and figures; pages compose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from app import charts, live, ui
from probes.lenses import applicable_lenses

DEFAULT_PROMPT = "Question: What is (2 * 3) + 1?\nAnswer:"
GRID_WINDOW = 24  # positions shown at once in the lens grid (a window slides over longer prompts)
TYPED, ARITHMETIC, FROM_RUN = "Type a prompt", "Arithmetic problem", "Prompt from the run"


@dataclass(frozen=True)
class LiveArgs:
    """What the live probe was asked (hashable: the cache key of ``live.cached_probe``)."""

    prompt: str
    num_steps: int
    lenses: tuple[str, ...]
    targets: tuple[tuple[str, str], ...] = ()


def model_caption(model: Any, name: str) -> None:
    st.caption(f"Live model: {live.describe_model(model, name)}")


def _problem_label(p: Any) -> str:
    question = p.context.replace("Question:", "").replace("Answer:", "").strip()
    return f"{' '.join(question.split())}  →{p.completion}"


def live_prompt_form(
    key: str, model: Any, *, run_prompts: pd.DataFrame | None = None, choose_lenses: bool = True
) -> LiveArgs | None:
    """Prompt source, prompt, iterations and lenses; returns the last submitted request (or ``None``)."""
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
    default_steps = int(getattr(model.config, "mean_recurrence", 16) or 16)
    with st.form(f"{key}_form", border=True):
        targets: dict[str, str] = {}
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
                help="Probed at every position; the last position is the next-token prediction.",
            )
        c1, c2, c3 = st.columns([2, 2, 2]) if choose_lenses else (*st.columns([3, 3]), None)
        steps = c1.slider("Iterations", 1, max(64, 2 * default_steps), default_steps, key=f"{key}_steps")
        available = applicable_lenses(model)  # the Coda Lens only where the family has a coda
        lenses: list[str] = list(available)
        if choose_lenses:
            lenses = (
                c2.multiselect("Lenses", available, default=available, key=f"{key}_lenses") or available[-1:]
            )
        if source == TYPED:
            expected = (c3 or c2).text_input(
                "Expected answer (optional)",
                key=f"{key}_expected",
                placeholder="e.g.  7 (with its leading space)",
                help="Text whose first token is tracked as the `final` target",
            )
            if expected:
                targets["final"] = expected
        submitted = st.form_submit_button("Probe", type="primary", icon=":material/play_arrow:")
    if submitted:
        st.session_state[f"{key}_args"] = LiveArgs(
            prompt, int(steps), tuple(lenses), tuple(sorted(targets.items()))
        )
    return st.session_state.get(f"{key}_args")


def probe_summary(probe: live.LiveProbe) -> None:
    cols = st.columns(4)
    cols[0].metric(
        "next token",
        charts.token_text(probe.prediction) or "∅",
        help="the model's greedy prediction after the last prompt token",
    )
    cols[1].metric("prompt tokens", len(probe.token_ids))
    cols[2].metric("iterations", probe.num_steps)
    cols[3].metric("probe time", f"{probe.seconds:.2f} s")


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
            )
            or kinds[:1]
        )
    with c2:
        positions = list(range(len(probe.tokens)))
        pos = st.selectbox(
            "Position (the lens predicts the token after it)",
            positions,
            index=probe.last_position,
            key=f"{key}_pos",
            format_func=lambda p: (
                f"{p}: {charts.token_text(probe.tokens[p])}"
                + ("  (last)" if p == probe.last_position else "")
            ),
        )
    rows = probe.rank_rows(target_kinds=chosen, position=pos)
    hover = probe.hover(pos)
    label = ", ".join(
        f"{k} = {charts.token_text(probe.targets.get(k, probe.prediction if k == 'predicted' else ''))}"
        for k in chosen
    )
    ui.chart(
        charts.rank_trajectory(
            rows, hover, title=f"Rank at position {pos} · {label}", height=440, layout=probe.layout
        ),
        key=f"{key}_traj",
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


def lens_grid_view(probe: live.LiveProbe, key: str) -> None:
    c1, c2, c3 = st.columns([1, 3, 1], vertical_alignment="bottom")
    with c1:
        lens = (
            st.segmented_control("Lens", probe.lenses, default=probe.lenses[-1], key=f"{key}_lens")
            or probe.lenses[-1]
        )
    with c3:
        every = st.toggle(
            "all iterations", value=False, key=f"{key}_all", help="one row per core block of every iteration"
        )
    with c2:
        iteration = None
        if not every:
            iteration = st.slider(
                "Core iteration",
                1,
                probe.num_steps,
                probe.num_steps,
                key=f"{key}_iter",
                help="which iteration's core blocks fill the middle rows",
            )
    window = None
    n = len(probe.tokens)
    if n > GRID_WINDOW:
        window = st.select_slider(
            "Positions shown",
            list(range(n)),
            value=(n - GRID_WINDOW, n - 1),
            key=f"{key}_window",
            format_func=lambda p: f"{p}: {charts.token_text(probe.tokens[p])}",
        )
    cells = live.grid_cells(probe, lens, iteration, window)
    which = "every iteration" if iteration is None else f"iteration {iteration} of {probe.num_steps}"
    ui.chart(
        charts.lens_grid(
            cells, probe.tokens, title=f"{lens} lens · top-1 token per layer and position · core at {which}"
        ),
        key=f"{key}_grid",
    )
    st.caption(
        "Each cell: the lens's most likely next token at that layer and position, shaded by its "
        "probability; hover for the top-5. Bottom to top: prelude, core blocks, coda, final output "
        "(the Coda Lens ends at `latent`, where it equals the model's output)."
    )


def live_dynamics_view(probe: live.LiveProbe, key: str) -> None:
    dyn = probe.dynamics
    if dyn is None or dyn.empty:
        st.info("No dynamics were recorded for this prompt.")
        return
    positions = sorted(dyn["position"].unique())
    labels = {
        p: f"{p}: {charts.token_text(probe.tokens[p]) if 0 <= p < len(probe.tokens) else p}"
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
    trajectory_views(sub, key=key, color_by="position", labels=labels)


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
        )
    with b:
        ui.chart(
            charts.step_curves(
                dyn, "cos_to_last", color_by=color_by, labels=labels, title="Cosine to the last iteration"
            ),
            key=f"{key}_cos",
        )
    dims = st.segmented_control("PCA", ["2-D", "3-D"], default="2-D", key=f"{key}_dims") or "2-D"
    ui.chart(
        charts.pca_trajectories(
            dyn,
            3 if dims == "3-D" else 2,
            color_by=color_by,
            labels=labels,
            title="Latent trajectory across iterations (first principal components; "
            "○ first iteration, ◆ last)",
        ),
        key=f"{key}_pca",
    )
    st.caption(
        "Each trajectory is projected on its own principal components (computed per trajectory when "
        "it was recorded), so compare shapes — spirals, fixed points, cycles — rather than positions."
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
    ui.chart(charts.exit_gate_heatmap(probe.exit_gate, probe.tokens), key=f"{key}_gate_map")
    last = probe.exit_gate[probe.exit_gate["position"] == probe.last_position]
    ui.chart(charts.exit_gate_curves(last.assign(prompt_id=0), height=340), key=f"{key}_gate_curves")


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
        cap = min(max(64, 2 * default_steps), max(2 * default_steps, 16))  # room for the exit to fire early
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
    )
