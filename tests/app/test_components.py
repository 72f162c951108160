"""The explorer's building blocks without a page: settings, DuckDB queries, figure builders, live helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app import charts, data, live
from app.settings import parse_settings
from lens.errors import InputError
from lens.layout import UnrolledLayout
from probes.store import CorruptRunError, Run
from studies.synthetic import write_run


def test_settings_arguments_then_environment_then_defaults():
    s = parse_settings(["--runs", "/r", "--model", "m", "--unrelated"], env={"LOOPLENS_RUNS": "/env"})
    assert (str(s.runs), s.model) == ("/r", "m")
    s = parse_settings(["-q", "tests"], env={"LOOPLENS_RUNS": "/env", "LOOPLENS_MODEL": "x"})
    assert (str(s.runs), s.model) == ("/env", "x")
    s = parse_settings([], env={})
    assert (str(s.runs), s.model) == ("runs", "tiny-arith")


# ------------------------------------------------------------------------------------------ queries


@pytest.fixture(scope="module")
def small(runs_dir):
    return data.run_ref(runs_dir / "arith-small")


def test_choices_and_prompts(small):
    opts = data.q_choices(*small)
    assert opts["lenses"] == ["logit", "coda"]
    assert opts["target_kinds"] == ["predicted", "final", "intermediate", "control"]
    prompts = data.q_prompt_table(*small)
    assert prompts["prompt_id"].tolist() == list(range(6))
    assert prompts["label"].str.startswith("#").all()
    assert prompts["correct"].notna().all() and prompts["verdict"].notna().all()
    assert prompts["expected"].str.startswith(" ").all()


def test_rank_rows_and_hover(small):
    rows = data.q_rank_rows(*small, ("logit", "coda"), ("final",))
    assert len(rows) == 6 * (
        10 + 9
    )  # prompts × unrolled layers (1 + 2×4 + 1; the Coda Lens stops before the coda)
    assert rows["unrolled_index"].between(0, 9).all() and (rows["rank"] >= 1).all()
    some = data.q_rank_rows(*small, ("coda",), ("final", "control"), (1, 4))
    assert set(some["prompt_id"]) == {1, 4} and set(some["target_kind"]) == {"final", "control"}
    assert data.q_rank_rows(*small, ("coda",), ("final",), ()).empty
    assert data.q_rank_rows(*small, ("coda') OR TRUE --",), ("final",)).empty  # values are bound, not pasted
    hover = data.q_hover_per_prompt(*small, ("logit",), (0,))
    assert len(hover) == 10 and hover["top"].str.count("<br>").eq(4).all()  # 5 tokens per layer
    assert hover["top"].str.contains(r"p = 0\.\d{3}").all()
    agg = data.q_hover_aggregate(*small, ("coda",))
    assert len(agg) == 9 and agg["top"].str.contains("top-1 in [0-9]+ of [0-9]+ prompts").all()


def test_headline_and_summaries(small):
    head = data.q_headline(*small)
    assert head["prompts"] == 6 and head["answered"] == 6
    assert 0 <= head["accuracy"] <= 1
    assert set(head["settle"]) == {"logit", "coda"}
    coda, logit = head["settle"]["coda"], head["settle"]["logit"]
    assert coda["first_top1_layer"] <= logit["first_top1_layer"]  # the coda lens decodes earlier
    depth = data.q_depth_accuracy(*small)
    assert set(depth["num_steps"]) == {1, 2, 4, 8} and set(depth["n"]) == {10}  # not the probed answers
    assert data.q_verdict_counts(*small)["n"].sum() == 6
    med = data.q_median_trajectories(*small)
    assert (med["ci_low"] <= med["median"]).all() and (med["median"] <= med["ci_high"]).all()
    dyn = data.q_dynamics_rows(*small, (0, 1))
    assert set(dyn["prompt_id"]) == {0, 1} and dyn["verdict"].notna().all()
    files = data.figure_files(small[0])
    assert [p.name for p in files["png"]] == ["rank_trajectory.png"]


def test_overview_medians_are_the_study_figures_numbers(small):
    """The explorer's median-with-interval is the study's (one implementation), equal to the last digit."""
    from studies.figures import rank_trajectory
    from studies.figures.layout import Layout

    med = data.q_median_trajectories(*small)
    figure = rank_trajectory.table(
        {"ranks": Run.open(small[0]).table("ranks")}, Layout(UnrolledLayout(prelude=1, core=2, coda=1), 4)
    )
    ours = med[med["target_kind"] == "predicted"].merge(figure, on=["lens", "unrolled_index"])
    assert len(ours) == len(figure) == 10 + 9  # the Coda Lens stops before the coda
    for column in ("median", "ci_low", "ci_high"):
        np.testing.assert_array_equal(ours[f"{column}_x"], ours[f"{column}_y"])


def test_cached_queries_follow_the_manifest(tmp_path):
    """A run still being written: the cache key changes as soon as a new shard is recorded."""
    path = write_run(tmp_path, "growing", n_prompts=6, status="running", figures=False)
    ref = data.run_ref(path)
    assert data.rank_rows(*ref, ("coda",), ("final",))["prompt_id"].nunique() == 3
    assert data.rank_rows(*ref, ("coda",), ("final",))["prompt_id"].nunique() == 3  # from the cache
    full = write_run(tmp_path / "other", "growing", n_prompts=6, figures=False)
    manifest = Run.open(path).manifest
    writer = Run.create(
        tmp_path, "growing", {k: manifest[k] for k in ("model", "config", "prompt_template", "settings")}
    )  # resumes the run
    second = Run.open(full).table("ranks")
    writer.write_shard("ranks", 1, second[second["prompt_id"] >= 3].drop(columns=["run"]))
    new_ref = data.run_ref(path)
    assert new_ref != ref
    assert data.rank_rows(*new_ref, ("coda",), ("final",))["prompt_id"].nunique() == 6


def test_a_damaged_shard_is_named(corrupt_runs_dir):
    root, shard = corrupt_runs_dir
    ref = data.run_ref(root / "arith-corrupt")
    with pytest.raises(CorruptRunError, match="shard-00000.parquet"):
        data.q_rank_rows(*ref, ("coda",), ("final",))
    from app.ui import corrupt_message

    try:
        data.q_headline(*ref)
    except CorruptRunError as exc:
        message = corrupt_message(exc, ref[0])
    assert "`ranks/shard-00000.parquet`" in message and "checksum" in message


# ------------------------------------------------------------------------------------------ figures


def _rows(prompts=3, steps=4, prelude=1, core=2, coda=1, lenses=("logit", "coda")):
    sites = (
        [(f"prelude.{i}", 0, i) for i in range(prelude)]
        + [(f"core.{j}", t, j) for t in range(1, steps + 1) for j in range(core)]
        + [(f"coda.{i}", 0, i) for i in range(coda)]
    )
    out = []
    for lens in lenses:
        for p in range(prompts):
            for u, (site, it, block) in enumerate(sites):
                out.append(
                    {
                        "prompt_id": p,
                        "lens": lens,
                        "target_kind": "final",
                        "unrolled_index": u,
                        "site": site,
                        "iteration": it,
                        "block": block,
                        "rank": max(1, 500 // (u + 1) - p),
                    }
                )
    return pd.DataFrame(out)


def test_rank_trajectory_figure():
    rows = _rows()
    hover = pd.DataFrame({"lens": "coda", "prompt_id": 0, "unrolled_index": [0], "top": ["1. ␣7  0.9"]})
    fig = charts.rank_trajectory(rows, hover, title="t")
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == 4  # per lens: thin prompt lines (one trace) + the median
    medians = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in medians] == ["logit lens · final", "coda lens · final"]
    assert list(medians[0].y) == list(rows[rows.lens == "logit"].groupby("unrolled_index")["rank"].median())
    thin = fig.data[0]
    assert np.isnan(np.asarray(thin.x, dtype=float)).sum() == 2  # a gap between prompts
    assert not fig.layout.shapes  # without the model's layout, no stages are guessed from the rows
    staged = charts.rank_trajectory(rows, hover, layout=UnrolledLayout(prelude=1, core=2, coda=1).at(4))
    bands = [s for s in staged.layout.shapes if s.type == "rect"]
    assert [(b.x0, b.x1) for b in bands] == [(-0.5, 0.5), (8.5, 9.5)]  # prelude and coda shaded
    assert [a.text for a in staged.layout.annotations] == ["prelude", "core × 4", "coda"]
    single = charts.rank_trajectory(rows[rows.prompt_id == 0], hover)
    assert any("␣7" in h for t in single.data for h in (t.hovertemplate or []) if isinstance(h, str))


def test_explorer_and_study_figures_share_lens_and_target_colours_and_order(small):
    """One set of lens/target colours and one target order (probes.palette), not one per package."""
    from matplotlib.colors import to_hex

    from probes import palette
    from studies.figures import rank_trajectory as study_rank_trajectory
    from studies.figures import style
    from studies.figures.layout import Layout

    fig = charts.rank_trajectory(_rows(), None)
    colours = {t.name.split()[0]: t.line.color for t in fig.data if t.mode == "lines+markers"}
    assert colours == {"logit": palette.LENS_COLORS["logit"], "coda": palette.LENS_COLORS["coda"]}
    rows = _rows().assign(target_kind="predicted", position=-1)
    layout = Layout(UnrolledLayout(prelude=1, core=2, coda=1), steps=4)
    mpl, _ = study_rank_trajectory.draw(study_rank_trajectory.table({"ranks": rows}, layout), layout, "t")
    drawn = {to_hex(line.get_color()).lower() for ax in mpl.axes for line in ax.get_lines()}
    assert {palette.LENS_COLORS["logit"].lower(), palette.LENS_COLORS["coda"].lower()} <= drawn
    assert style.TARGET_ORDER is palette.TARGET_ORDER and style.LENS_COLORS is palette.LENS_COLORS
    kinds = data.q_choices(*small)["target_kinds"]
    assert kinds[:4] == ["predicted", "final", "intermediate", "control"]


def test_heatmap_layout():
    rows = _rows(steps=3, prelude=2, core=4, coda=2)
    cells, row_labels, col_labels = charts.heatmap_grid(rows[rows.lens == "coda"])
    assert row_labels == ["prelude", "t=1", "t=2", "t=3", "coda"]
    assert col_labels == ["b0", "b1", "b2", "b3"]
    fig = charts.rank_heatmap(rows[rows.lens == "coda"])
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (5, 4)
    assert np.isnan(z[0, 2:]).all() and np.isfinite(z[1:4]).all()  # prelude has 2 blocks, core 4
    assert fig.data[0].colorbar.ticktext[0] == "1"
    # with the model's layout every iteration is a row, recorded or not
    layout = UnrolledLayout(prelude=2, core=4, coda=2).at(4)
    assert charts.heatmap_grid(rows[rows.lens == "coda"], layout)[1] == [
        "prelude",
        "t=1",
        "t=2",
        "t=3",
        "t=4",
        "coda",
    ]
    looped = UnrolledLayout(family="ouro", core=2, adapter=False, feedback="latent", norm_after_coda=False)
    assert charts.heatmap_grid(rows[rows.site.str.startswith("core")], looped.at(3))[1] == [
        "t=1",
        "t=2",
        "t=3",
    ]


def test_lens_grid_and_token_text():
    assert charts.token_html(" 7\n<b>") == "␣7↵&lt;b&gt;"  # for plotly, which reads markup
    assert charts.token_label(" 7\n<b>") == "␣7↵<b>"  # for widgets, which show text as it is
    assert charts.short_token("<|end_text|>", 6) == "⟨end_…"  # cut before escaping: no half entity
    assert charts.short_token("a<b>c", 4) == "a&lt;b…"
    assert charts.cell_budget(60) == 2 and charts.cell_budget(4) == 10
    cells = pd.DataFrame(
        {
            "row": ["prelude.0", "prelude.0", "core.0 · t=2"],
            "position": [0, 1, 0],
            "token": [" 7", "x", "y"],
            "prob": [0.9, 0.2, 0.5],
        }
    )
    fig = charts.lens_grid(cells, ["Q", ":"])
    assert list(fig.layout.xaxis.ticktext) == ["Q", ":"]
    assert list(fig.layout.yaxis.ticktext) == ["prelude.0", "core.0 · t=2"]
    assert fig.data[0].text[0][0] == "␣7"


def test_other_figures_and_empty_inputs():
    dyn = pd.DataFrame(
        {
            "prompt_id": np.repeat([0, 1], 4),
            "position": -1,
            "iteration": np.tile(np.arange(1, 5), 2),
            "step_norm": [np.nan, 0.5, 0.2, 0.1] * 2,
            "cos_to_last": [0.2, 0.5, 0.8, 1.0] * 2,
            "pc1": np.arange(8.0),
            "pc2": np.arange(8.0),
            "pc3": np.arange(8.0),
            "verdict": "fixed-point",
        }
    )
    fig = charts.step_curves(dyn)
    assert fig.layout.yaxis.type == "log" and len(fig.data) == 3  # two prompts and the median
    # steps 0.1-0.5 lie within one decade, where plotly's own log ticks would label nothing
    assert fig.layout.yaxis.ticktext == ("0.1", "0.2", "0.5")
    wide = dyn.assign(step_norm=[np.nan, 0.5, 0.02, 0.001] * 2)
    assert charts.step_curves(wide).layout.yaxis.dtick == 1  # three decades: one tick per power of ten
    tiny = charts.step_curves(dyn.assign(step_norm=[np.nan, 3.1e-5, 3.0e-5, 2.9e-5] * 2)).layout.yaxis
    assert tiny.ticktext == ("2.9×10⁻⁵", "3.1×10⁻⁵")  # narrower than a digit step: the two ends, no "μ"
    damaged = dyn.assign(step_norm=[np.nan, np.inf, 0.2, 0.1] * 2)  # a zero-norm state: an infinite step
    assert charts.step_curves(damaged).layout.yaxis.ticktext == ("0.1", "0.2")
    scene3d = charts.pca_trajectories(dyn, 3)
    (trace,) = scene3d.data  # one trace for every trajectory: each WebGL object costs in software rendering
    assert trace.type == "scatter3d" and trace.mode == "lines"
    assert scene3d.layout.scene.xaxis.visible is False and scene3d.layout.scene.zaxis.visible is False
    # each trajectory fades from pale at t=1 to its full colour at t=T; a NaN row breaks the line
    first, last = trace.line.color[0], trace.line.color[3]
    assert first != last and last == charts._faded(charts._palette(2)[0], 1.0)
    assert np.isnan(trace.x[4]) and trace.line.color[5] == charts._faded(charts._palette(2)[1], 0.0)
    assert charts.pca_trajectories(dyn, 2).layout.yaxis.scaleanchor == "x"
    bar = charts.steps_used_bar([" 7", "\n"], [3, 16], 16)
    assert list(bar.data[0].y) == [3, 16]
    cmp = charts.compare_trajectories(
        [("a", _rows()), ("b", _rows(steps=8, prelude=2, core=4, coda=2))], relative_depth=True
    )
    assert cmp.layout.yaxis2.matches == "y" and np.nanmax(
        np.asarray(cmp.data[-1].x, dtype=float)
    ) == pytest.approx(1.0)
    empty = pd.DataFrame(
        columns=["prompt_id", "lens", "target_kind", "unrolled_index", "site", "iteration", "block", "rank"]
    )
    for fig in (
        charts.rank_trajectory(empty),
        charts.rank_heatmap(empty),
        charts.step_curves(None),
        charts.lens_grid(None, []),
        charts.accuracy_by_depth(pd.DataFrame()),
        charts.verdict_bar(None),
        charts.exit_gate_curves(None),
        charts.exit_gate_heatmap(pd.DataFrame(), []),
    ):
        assert fig.layout.annotations  # a note instead of an error


# ------------------------------------------------------------------------------------------ live


@pytest.fixture(scope="module")
def model(model_dir):
    return live.load_model(str(model_dir))


def test_probe_text_every_position(model):
    prompt = "Question: What is (2 * 3) + 1?\nAnswer:"
    result = live.probe_text(model, prompt, 3, ("logit", "coda"), {"final": " 7"})
    n = len(model.tokenizer.encode(prompt))
    assert result.tokens and len(result.tokens) == n == result.last_position + 1
    assert set(result.ranks["position"]) == set(range(n))
    assert set(result.target_kinds()) == {"predicted", "final"}
    rows = result.rank_rows(target_kinds=["final"])
    assert len(rows) == (1 + 2 * 3 + 1) + (
        1 + 2 * 3
    )  # unrolled layers per lens (the coda lens skips the coda)
    assert set(result.hover()["lens"]) == {"logit", "coda"}
    cells = live.grid_cells(result, "coda")
    assert set(cells["position"]) == set(range(n))
    assert list(dict.fromkeys(cells["row"])) == ["prelude.0", "core.0 · t=3", "core.1 · t=3", "latent · t=3"]
    assert cells["prob"].between(0, 1).all()
    logit = live.grid_cells(result, "logit")
    assert list(dict.fromkeys(logit["row"]))[-3:] == ["latent · t=3", "coda.0", "final"]  # the pass's order
    every = live.grid_cells(result, "logit", True, (n - 3, n - 1))
    assert every["row"].nunique() == 1 + 2 * 3 + 1 + 2 and set(every["position"]) == {n - 3, n - 2, n - 1}
    assert len(result.dynamics) == n * 3
    with pytest.raises(InputError, match="The prompt is empty"):
        live.probe_text(model, "", 3)
    with pytest.raises(InputError, match="context holds 256"):
        live.probe_text(model, "1 + 1 " * 200, 3)
    with pytest.raises(InputError, match="Tuned Lens needs"):
        live.probe_text(model, prompt, 3, ("logit", "tuned"))


def test_prompt_and_answer_checks(model):
    check = live.check_prompt(model, "What is 2 € 3?")
    assert check.unknown == ("€",) and check.unk_token == "<|unk|>" and check.error is None
    assert check.limit == 256 and check.n_tokens == len(model.tokenizer.encode("What is 2 € 3?"))
    assert live.check_prompt(model, "").error.startswith("The prompt is empty")
    answer = live.check_target(model, " 12")
    assert answer.ids[0] == model.tokenizer.encode(" 12")[0] and "first token" in answer.note
    assert live.check_target(model, " 7").note is None


def test_exit_trace_is_the_criterion_generation_uses(model):
    """The adaptive-exit curve: the KL the criterion reads at each iteration, and the exit it implies."""
    import torch

    from probes.adaptive import exit_trace

    ids = model.tokenizer.encode("Question: What is (2 * 3) + 1?\nAnswer:")
    trace = exit_trace(model, ids, 12, "kl", threshold=1e-2)
    assert (
        list(trace["iteration"]) == list(range(1, 13)) and np.isfinite(trace["value"]).all()
    )  # t = 1 vs uniform
    assert (trace["exits"] == (trace["value"] < 1e-2)).all()
    gen = model.generate(
        [ids],
        max_new_tokens=1,
        num_steps=12,
        exit_criterion="kl",
        exit_threshold=1e-2,
        generator=torch.Generator().manual_seed(0),  # the initial state exit_trace draws (seed 0)
    )
    first = int(trace.loc[trace["exits"], "iteration"].iloc[0]) if trace["exits"].any() else 12
    assert gen.steps_used[0][0] == first
    fig = charts.exit_trace_chart(trace, "kl")
    assert fig.layout.yaxis.type == "log" and any("threshold" in a.text for a in fig.layout.annotations)
    with pytest.raises(InputError, match="exit gate"):
        exit_trace(model, ids, 4, "gate")


def test_adaptive_generation(model):
    gen = live.generate_adaptive(model, "Question: What is (2 * 3) + 1?\nAnswer:", 4, 8, "kl")
    assert 1 <= len(gen.tokens) == len(gen.steps_used) <= 4
    assert all(1 <= s <= 8 for s in gen.steps_used)
    fixed = live.generate_adaptive(model, "Question:", 2, 3, "none")
    assert fixed.steps_used == [3] * len(fixed.steps_used)
    diffusion = live.generate_adaptive(model, "Question:", 5, 3, "none", sampler="diffusion")
    assert diffusion.criterion.startswith("diffusion (") and "model calls" in diffusion.criterion
    assert 1 <= len(diffusion.tokens) == len(diffusion.steps_used) <= 5
    assert all(s >= 1 for s in diffusion.steps_used) and diffusion.max_steps >= max(diffusion.steps_used)
    # the same tokens as the sampler called directly (seed 0, zero initial states)
    direct = model.generate(["Question:"], 5, 3, sampler="diffusion", init_scale=0.0, seed=0)
    assert diffusion.text == direct.texts[0]


def test_load_model_errors_are_plain_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model"):
        live.load_model(str(tmp_path / "nothing-here"))


def test_exit_gate_charts():
    lam = np.array([[0.6, 0.5, 0.2], [0.1, 0.2, 0.9]])  # two tokens × three iterations
    import torch

    from lens.exit_gate import exit_distribution

    pdf, cdf = (x.numpy() for x in exit_distribution(torch.tensor(lam)))
    rows = pd.DataFrame(
        {
            "prompt_id": 0,
            "position": np.repeat([0, 1], 3),
            "iteration": np.tile([1, 2, 3], 2),
            "gate_lambda": lam.ravel(),
            "exit_prob": pdf.ravel(),
            "exit_cdf": cdf.ravel(),
        }
    )
    heat = charts.exit_gate_heatmap(rows, ["a", "b"])
    outlined = [(s.x0 + 0.5, s.y0 + 0.5) for s in heat.layout.shapes]
    assert outlined == [(0, 0), (1, 2)]  # token a exits at t=1 (0.6 >= 0.5); token b only at the last step
    curves = charts.exit_gate_curves(rows.assign(prompt_id=rows["position"]))
    bars = [t for t in curves.data if t.type == "bar"]
    assert np.allclose(bars[0].y, pdf.mean(0))
