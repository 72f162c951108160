"""Every explorer page under Streamlit's AppTest: complete, empty, partial and corrupt runs, the live model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"
PAGES = [
    "overview",
    "trajectories",
    "prompt",
    "analyses",
    "lens_grid",
    "dynamics",
    "wavefront",
    "live_probe",
    "compare",
]
RUN_PAGES = ["overview", "trajectories", "prompt", "analyses", "dynamics", "compare"]


def start(monkeypatch, runs: Path, model: Path | str) -> AppTest:
    monkeypatch.setenv("LOOPLENS_RUNS", str(runs))
    monkeypatch.setenv("LOOPLENS_MODEL", str(model))
    at = AppTest.from_file(str(MAIN), default_timeout=90)
    at.run()
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    return at


def texts(at: AppTest) -> str:
    parts = [
        e.value
        for kind in ("markdown", "caption", "info", "warning", "error", "subheader", "header", "code")
        for e in getattr(at, kind)
    ]
    return "\n".join(str(p) for p in parts)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "Traceback" not in texts(at)


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def probe(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Probe").click().run()
    return at


def open_tab(at: AppTest, label: str, key: str = "live_tab") -> AppTest:
    """Open a lazy tab of the live probe (only the open tab is drawn)."""
    at.session_state[key] = label
    return at.run()


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def downloads(at: AppTest) -> int:
    return len(at.get("download_button"))


# ------------------------------------------------------------------------------------------ complete runs


def test_overview(monkeypatch, runs_dir, model_dir):
    at = start(monkeypatch, runs_dir, model_dir)  # the default page
    assert_clean(at)
    assert charts(at) >= 3  # median trajectories, accuracy vs depth, verdicts
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["prompts probed"] == "6"
    assert "tiny-arith" in texts(at)
    assert metrics["accuracy"].endswith("%")
    assert any(label.startswith("coda lens") for label in metrics)
    assert "arith-small" in [s.value for s in at.subheader]
    assert at.sidebar.selectbox(key="run").value == "arith-small"
    assert len(at.dataframe) >= 2  # all runs, prompts (+ manifest facts)
    assert not at.image  # the study's PNGs are read only when their expander is opened
    at.session_state["overview_figures"] = True
    at.run()
    assert at.image  # the study's PNG


def test_trajectories_hover_and_heatmaps(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "trajectories")
    assert_clean(at)
    assert charts(at) == 3  # trajectory + one heat map per lens
    fig = at.get("plotly_chart")[0].proto.spec
    assert '"type":"log"' in fig.replace(" ", "")
    assert "top-1 in" in fig and "of 6 prompts" in fig  # the median's hover: most frequent top-1 tokens
    assert "click to open this prompt" in fig  # thin per-prompt lines ship only their ids, no token text
    # two targets, one prompt: per-prompt hover and a heat-map target picker
    at.multiselect(key="traj_targets").set_value(["final", "intermediate"]).run()
    at.multiselect(key="traj_prompts").set_value([2]).run()
    assert_clean(at)
    assert "1. " in at.get("plotly_chart")[0].proto.spec  # the prompt's own top-5 tokens
    assert at.segmented_control(key="traj_heat_kind").value == "final"
    at.segmented_control(key="traj_heat_kind").set_value("intermediate").run()
    assert_clean(at)
    assert charts(at) == 3
    at.toggle(key="traj_thin").set_value(False).run()
    assert_clean(at)


def test_dynamics_from_run(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "dynamics")
    assert_clean(at)
    assert charts(at) >= 4  # step norms, cosine, PCA, verdicts
    at.segmented_control(key="dyn_run_dims").set_value("3-D").run()
    assert_clean(at)
    assert '"scatter3d"' in "".join(c.proto.spec for c in at.get("plotly_chart"))


def test_compare_two_runs(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "compare")
    assert_clean(at)
    assert at.selectbox(key="cmp_left_run").value == "arith-small"
    assert at.selectbox(key="cmp_right_run").value == "huginn-ref"
    assert at.toggle(key="cmp_relative").value is True  # 10 vs 36 unrolled layers
    # overlay (the default): one axis, a legend naming both runs, distinct colours, stage marks
    assert at.segmented_control(key="cmp_mode").value == "overlay"
    assert charts(at) == 3
    overlay = figures(at)[0]
    lines = [t for t in overlay["data"] if t.get("mode") == "lines+markers"]
    assert len(lines) == 2 and lines[0]["line"]["color"] != lines[1]["line"]["color"]
    assert {"arith-small", "huginn-ref"} <= {t["name"].split(" · ")[0] for t in lines}
    assert overlay["layout"].get("showlegend", True)
    assert any("prelude | core" in a["text"] for a in overlay["layout"]["annotations"])
    # side by side: a shared y axis, the stages named in each panel
    at.segmented_control(key="cmp_mode").set_value("side by side").run()
    assert_clean(at)
    spec = at.get("plotly_chart")[0].proto.spec
    assert '"matches":"y"' in spec.replace(" ", "")
    assert sum(a["text"] == "prelude" for a in figures(at)[0]["layout"]["annotations"]) == 2
    # two lenses of one run
    at.selectbox(key="cmp_right_run").set_value("arith-small").run()
    at.selectbox(key="cmp_right_lens").set_value("coda").run()
    assert_clean(at)
    assert at.toggle(key="cmp_relative").value in (True, False)


def test_the_reference_study_is_a_run_on_every_page(monkeypatch, runs_dir, model_dir):
    """The released Huginn-3.5B results are selectable like a run: trajectories, compare, analyses."""
    from app.reference import REFERENCE_NAME

    at = start(monkeypatch, runs_dir, model_dir)
    assert REFERENCE_NAME in at.sidebar.selectbox(key="run").options[-1]
    at.sidebar.selectbox(key="run").set_value(REFERENCE_NAME).run()
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["prompts probed"] == "167"
    assert {m.label: m.value for m in at.metric}["accuracy"] == "—"  # selected problems: not a measurement
    for page in RUN_PAGES:
        goto(at, page)
        assert_clean(at)
    goto(at, "trajectories")
    assert at.pills(key="traj_lenses").options == ["logit", "coda"]
    rows = figures(at)[0]
    assert rows["layout"]["xaxis"]["range"][1] > 67  # Huginn-3.5B's 68 unrolled layers
    goto(at, "compare")
    assert REFERENCE_NAME in at.selectbox(key="cmp_right_run").options[-1]
    goto(at, "analyses")
    assert charts(at) == 2  # intermediate vs final, numeric share


def test_switching_runs_keeps_every_page_clean(monkeypatch, runs_dir, model_dir):
    at = start(monkeypatch, runs_dir, model_dir)
    at.sidebar.selectbox(key="run").set_value("huginn-ref").run()
    for page in ["overview", "trajectories", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert charts(at) >= 3, page
    assert at.sidebar.selectbox(key="run").value == "huginn-ref"


def test_every_chart_has_its_data_to_download(monkeypatch, runs_dir, model_dir):
    at = start(monkeypatch, runs_dir, model_dir)
    for page in ["overview", "trajectories", "analyses", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert downloads(at) >= charts(at) - 2, page  # heat maps side by side share one download
    goto(at, "overview")
    button = at.get("download_button")[0]
    assert button.proto.label == "Data (CSV)"


def test_prompt_drill_down(monkeypatch, runs_dir, model_dir):
    """The paper's qualitative table: top-5 tokens with probabilities at every layer, per lens."""
    at = start(monkeypatch, runs_dir, model_dir)
    at.session_state["prompt_id"] = 3  # what a click in the overview or on a trajectory sets
    goto(at, "prompt")
    assert_clean(at)
    assert at.selectbox(key="prompt_id").value == 3
    table = at.dataframe[-1].value
    assert list(table.columns) == ["layer", "site", "t", "1.", "2.", "3.", "4.", "5."]
    sites = table["site"].tolist()
    assert sites[0] == "prelude.0" and sites[-1] == "final"
    assert sites.index("latent") < sites.index("coda.0")  # the order of the forward pass
    assert len(table) == 10 + 2  # 10 unrolled layers, latent and final
    assert table["1."].str.contains(r"\(0\.\d{3}\)").all()  # each token with its probability
    at.segmented_control(key="prompt_lens").set_value("coda").run()
    assert_clean(at)
    assert charts(at) == 1 and downloads(at) >= 2


def test_latent_cot_analyses(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "analyses")
    assert_clean(at)
    assert charts(at) == 2
    ivf, numeric = figures(at)
    names = {t.get("name") for t in ivf["data"]}
    assert {"intermediate result", "final answer", "control token"} <= names
    assert numeric["layout"]["yaxis"]["tickformat"] == ".0%"
    at.segmented_control(key="ivf_lens").set_value("coda").run()
    at.pills(key="ivf_targets").set_value(["intermediate", "final"]).run()
    assert_clean(at)
    assert {t.get("name") for t in figures(at)[0]["data"]} - {None} == {"intermediate result", "final answer"}


def test_rank_one_has_room_below_it_and_bands_carry_no_markers(monkeypatch, tmp_path, model_dir):
    """Issue #17 points 2 and 3: rank 1 is not drawn on the axis's bottom edge; a run with T <= 8 has no
    stray markers on its overview bands."""
    from studies.synthetic import write_run

    write_run(tmp_path, "arith-t4", n_prompts=4, figures=False)
    at = start(monkeypatch, tmp_path, model_dir)
    overview = figures(at)[0]
    assert overview["layout"]["yaxis"]["range"][0] <= -0.3  # log10 of the axis bottom: rank ~0.5
    bands = [t for t in overview["data"] if t.get("fill") == "toself"]
    assert bands and all(t.get("mode") == "lines" for t in bands)
    goto(at, "trajectories")
    assert figures(at)[0]["layout"]["yaxis"]["range"][0] <= -0.3
    assert "k" not in "".join(figures(at)[0]["layout"]["yaxis"]["ticktext"])  # 1,000, never "1k"


def test_jargon_is_explained(monkeypatch, runs_dir, model_dir):
    at = start(monkeypatch, runs_dir, model_dir)
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "one-digit composite" in specs and "2-digit plus" in specs  # task codes in words
    depth = next(f for f in figures(at) if f["layout"].get("yaxis", {}).get("tickformat") == ".0%")
    assert depth["layout"]["legend"]["x"] > 1  # the legend sits beside the lines, not over them
    assert "fixed-point" in texts(at) and "stopped moving" in texts(at)  # verdicts explained
    goto(at, "trajectories")
    assert (
        "p̄" not in at.get("plotly_chart")[0].proto.spec and "mean p" in at.get("plotly_chart")[0].proto.spec
    )
    goto(at, "dynamics")
    step = figures(at)[0]
    assert step["layout"]["yaxis"]["exponentformat"] == "power"  # 10⁻⁴, not "100μ"


# ------------------------------------------------------------------------------------------ the live model


def test_live_probe_and_generation(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    assert_clean(at)
    assert charts(at) == 0
    at.text_area(key="live_text").input("Question: What is (4 + 3) - 2?\nAnswer:")
    at.text_input(key="live_expected").input(" 5")
    probe(at)
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["iterations"] == "4"
    assert int(metrics["prompt tokens"]) > 5
    assert charts(at) == 3  # only the open tab is drawn: trajectory and 2 heat maps
    assert "final" in at.pills(key="live_rank_kinds").options
    at.selectbox(key="live_rank_pos").set_value(3).run()
    assert_clean(at)
    open_tab(at, "Probability & entropy")
    assert charts(at) == 1
    pe = figures(at)[0]
    assert {t["name"] for t in pe["data"]} == {"logit lens", "coda lens"}
    open_tab(at, "Lens grid")
    assert charts(at) == 1
    at.slider(key="live_grid_iter").set_value(2).run()
    at.toggle(key="live_grid_all").set_value(True).run()
    at.segmented_control(key="live_grid_lens").set_value("logit").run()
    assert_clean(at)
    open_tab(at, "Latent dynamics")
    assert charts(at) == 3
    # why adaptive depth exits where it does, then generation
    open_tab(at, "Adaptive exit")
    trace = figures(at)[0]
    assert trace["layout"]["yaxis"]["type"] == "log"
    assert any("threshold" in a["text"] for a in trace["layout"]["annotations"])
    at.selectbox(key="live_gen_crit").set_value("kl")
    at.slider(key="live_gen_steps").set_value(8)
    next(b for b in at.button if b.label == "Generate").click().run()
    assert_clean(at)
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"type":"bar"' in s.replace(" ", "") for s in specs)
    assert at.code  # the generated text


def test_live_generation_with_the_diffusion_sampler(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    at.text_area(key="live_text").input("Question: What is (4 + 3) - 2?\nAnswer:")
    probe(at)
    open_tab(at, "Adaptive exit")  # tabs are drawn when opened
    assert at.segmented_control(key="live_gen_sampler").options == ["autoregressive", "diffusion"]
    at.segmented_control(key="live_gen_sampler").set_value("diffusion")
    next(b for b in at.button if b.label == "Generate").click().run()
    assert_clean(at)
    assert "diffusion (" in texts(at) and at.code
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"type":"bar"' in s.replace(" ", "") for s in specs)


def test_wavefront_page(monkeypatch, sampler_runs_dir, model_dir):
    at = goto(start(monkeypatch, sampler_runs_dir, model_dir), "wavefront")
    assert_clean(at)
    assert at.sidebar.selectbox(key="run").value == "sampler-small"
    step = at.slider(key="wave_step")
    first = at.dataframe[0].value
    assert {"guess", "final next token", "frozen", "iterations so far", "logit rank"} <= set(first.columns)
    assert charts(at) == 2  # the wavefront heat maps and the speed-accuracy frontier
    assert step.max > step.min
    step.set_value(step.max).run()
    assert_clean(at)
    last = at.dataframe[0].value
    assert last["iterations so far"].max() >= 1 and f"step {int(step.max)}:" in texts(at)


def test_wavefront_page_on_a_run_without_one(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "wavefront")
    assert_clean(at)
    assert "no wavefront records" in " ".join(i.value for i in at.info)


def test_live_probe_with_one_iteration(monkeypatch, runs_dir, model_dir):
    """Issue #17 point 1: T = 1 (the paper's central comparison) probes, draws and grids without a slider
    whose min equals its max."""
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    at.slider(key="live_steps").set_value(1).run()
    probe(at)
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["iterations"] == "1"
    for tab in ("Lens grid", "Probability & entropy", "Latent dynamics", "Adaptive exit"):
        open_tab(at, tab)
        assert_clean(at)
    open_tab(at, "Lens grid")
    assert "the only one" in texts(at)
    open_tab(at, "Latent dynamics")
    assert "One iteration: the latent has taken no step yet" in texts(at)
    goto(at, "lens_grid")
    at.slider(key="grid_steps").set_value(1).run()
    probe(at)
    assert_clean(at)
    assert charts(at) == 1


def test_live_probe_input_mistakes(monkeypatch, runs_dir, model_dir):
    """Issue #17 point 6: one limit (the model's context), a token counter, an out-of-vocabulary warning,
    an answer cut to its first token said so, and no probe of what cannot be probed."""
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    assert "tokens** of the model's 256-token context" in texts(at)
    at.text_area(key="live_text").input("").run()
    assert "The prompt is empty" in at.error[0].value
    assert next(b for b in at.button if b.label == "Probe").disabled
    at.text_area(key="live_text").input("1 + 1 " * 200).run()
    message = at.error[0].value
    assert "tokens; the model's context holds 256" in message and "Something went wrong" not in message
    at.text_area(key="live_text").input("Question: What is 2 € 3?\nAnswer:").run()
    assert "€" in at.warning[0].value and "<|unk|>" in at.warning[0].value
    at.text_input(key="live_expected").input(" 12").run()
    assert "first token" in at.info[0].value
    probe(at)
    assert not at.exception and not at.error


def test_lens_grid_page(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "lens_grid")
    assert_clean(at)
    assert "Prompt from the run" in at.segmented_control(key="grid_source").options
    at.segmented_control(key="grid_source").set_value("Prompt from the run").run()
    at.selectbox(key="grid_run_prompt").set_value(3).run()
    probe(at)
    assert_clean(at)
    assert charts(at) == 1
    spec = at.get("plotly_chart")[0].proto.spec
    assert '"type":"heatmap"' in spec.replace(" ", "") and "texttemplate" in spec
    # bottom to top in the order of the forward pass (the Coda Lens ends at the latent it decodes exactly)
    ticks = figures(at)[0]["layout"]["yaxis"]["ticktext"]
    assert ticks == ["prelude.0", "core.0 · t=4", "core.1 · t=4", "latent · t=4"]
    at.segmented_control(key="grid_lens").set_value("logit").run()
    ticks = figures(at)[0]["layout"]["yaxis"]["ticktext"]
    assert ticks == ["prelude.0", "core.0 · t=4", "core.1 · t=4", "latent · t=4", "coda.0", "final"]
    at.slider(key="grid_iter").set_value(1).run()
    assert_clean(at)
    # the iteration slider moves every row: the grid of the model stopped after iteration 1
    figure = figures(at)[0]
    assert figure["layout"]["yaxis"]["ticktext"] == [
        "prelude.0",
        "core.0 · t=1",
        "core.1 · t=1",
        "latent · t=1",
        "coda.0",
        "final",
    ]
    assert "stopped after 1 of 4" in figure["layout"]["title"]["text"]


def test_widget_labels_are_not_html_escaped(monkeypatch, runs_dir, model_dir):
    """Issue #17 point 4: a special token reads ``<|end_text|>`` in a widget, never ``&lt;|end_text|&gt;``."""
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    at.text_area(key="live_text").input("Question: 1<|end_text|>2\nAnswer:")
    probe(at)
    assert_clean(at)
    labels = at.selectbox(key="live_rank_pos").options
    assert any("<|end_text|>" in label for label in labels)
    assert not any("&lt;" in label for label in labels)


def test_heat_maps_follow_the_lens_order_and_line_up(monkeypatch, runs_dir, model_dir):
    """Issue #17 point 5: panels in the lenses' reading order whatever the click order, with the same rows;
    the Coda Lens's coda row is there, grey, and says why."""
    at = goto(start(monkeypatch, runs_dir, model_dir), "trajectories")
    at.pills(key="traj_lenses").set_value(["coda", "logit"]).run()  # clicked coda first
    assert_clean(at)
    heat = [f for f in figures(at) if f["data"][0]["type"] == "heatmap"]
    assert [f["layout"]["title"]["text"].split(" ")[0] for f in heat] == ["logit", "coda"]
    assert heat[0]["data"][0]["y"] == heat[1]["data"][0]["y"]
    assert heat[1]["data"][0]["y"][-1] == "coda"
    coda_row = heat[1]["data"][0]["customdata"][-1][0]
    assert "no coda rows" in coda_row


def test_live_probe_tuned_lens(monkeypatch, tmp_path):
    """The Tuned Lens in the live probe, from a run of the same model (its tuned_lens folder)."""
    from lens.loading import weights_fingerprint
    from probes.lenses import TunedLens
    from studies.synthetic import write_run
    from tests.conftest import save_arith_model

    model = save_arith_model(tmp_path / "tiny-random", block_size=256)
    run = write_run(tmp_path / "runs", "with-tuned", n_prompts=2, figures=False)
    doc = json.loads((run / "manifest.json").read_text())
    doc["model"]["weights"] = weights_fingerprint(model)
    (run / "manifest.json").write_text(json.dumps(doc))
    import lens

    TunedLens(lens.load_model(str(model)), "shared", 4).save(run / "tuned_lens")
    at = goto(start(monkeypatch, tmp_path / "runs", model), "live_probe")
    assert at.multiselect(key="live_lenses").value == ["logit", "coda", "tuned"]
    assert at.selectbox(key="live_tuned").value == "from run with-tuned"
    probe(at)
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["iterations"] == "4"
    lines = [t["name"] for t in figures(at)[0]["data"]]
    assert any(name.startswith("tuned lens") for name in lines)


def test_live_probe_arithmetic_picker(monkeypatch, runs_dir, model_dir):
    pytest.importorskip("studies.tasks.arithmetic")
    at = goto(start(monkeypatch, runs_dir, model_dir), "live_probe")
    at.segmented_control(key="live_source").set_value("Arithmetic problem").run()
    assert at.selectbox(key="live_problem").options
    probe(at)
    assert_clean(at)
    kinds = at.pills(key="live_rank_kinds").options
    assert {"predicted", "final", "intermediate"} <= set(kinds)


def test_dynamics_live(monkeypatch, runs_dir, model_dir):
    at = goto(start(monkeypatch, runs_dir, model_dir), "dynamics")
    at.segmented_control(key="dyn_page_source").set_value("Live prompt").run()
    probe(at)
    assert_clean(at)
    assert charts(at) == 3
    assert at.multiselect(key="dyn_live_positions").value


def test_model_that_fails_to_load(monkeypatch, runs_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    at = start(monkeypatch, runs_dir, missing)
    for page in ["live_probe", "lens_grid"]:
        goto(at, page)
        assert not at.exception
        assert len(at.error) == 1
        message = at.error[0].value
        assert "Could not load the model" in message and str(missing) in message
        assert "Traceback" not in texts(at)
    at = start(monkeypatch, runs_dir, "tiny-arith-that-is-not-shipped")
    goto(at, "live_probe")
    assert not at.exception and "unknown model" in at.error[0].value


# ------------------------------------------------------------------------------------------ friendly states


def test_no_runs_yet(monkeypatch, empty_runs_dir, model_dir):
    """An empty runs folder: every page says how to make a run, and shows the reference study meanwhile."""
    at = start(monkeypatch, empty_runs_dir, model_dir)
    for page in ["overview", "trajectories", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert "looplens study arithmetic" in " ".join(i.value for i in at.info), page
    goto(at, "trajectories")
    assert charts(at) >= 3  # the reference study's trajectories
    goto(at, "live_probe")
    probe(at)
    assert_clean(at)
    assert charts(at) >= 3  # the live model needs no run


def test_run_still_being_written(monkeypatch, partial_runs_dir, model_dir):
    at = start(monkeypatch, partial_runs_dir, model_dir)
    for page in ["overview", "trajectories", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert "still being written" in " ".join(i.value for i in at.info), page
        assert charts(at) >= 1, page
    goto(at, "overview")
    assert {m.label: m.value for m in at.metric}["prompts probed"] == "3"  # one of two shards so far


def test_corrupt_runs(monkeypatch, corrupt_runs_dir, model_dir):
    root, shard = corrupt_runs_dir
    at = start(monkeypatch, root, model_dir)
    assert at.sidebar.selectbox(key="run").value == "arith-corrupt"
    for page in ["overview", "trajectories", "compare"]:
        goto(at, page)
        assert not at.exception, page
        assert at.error, page
        message = at.error[0].value
        assert "damaged" in message and "ranks/shard-00000.parquet" in message, message
        assert "Traceback" not in texts(at)
    # a manifest that is not JSON
    at.sidebar.selectbox(key="run").set_value("broken-manifest").run()
    for page in ["overview", "trajectories", "dynamics"]:
        goto(at, page)
        assert not at.exception
        assert "manifest.json" in at.error[0].value


def test_failed_run_shows_its_error(monkeypatch, tmp_path, model_dir):
    from studies.synthetic import write_run

    write_run(tmp_path, "arith-failed", n_prompts=4, status="failed", figures=False)
    at = start(monkeypatch, tmp_path, model_dir)
    assert not at.exception and not at.error
    assert "out of memory" in at.warning[0].value
    assert charts(at) >= 3


def test_page_errors_never_show_a_traceback():
    def script():
        from app import ui

        def broken():
            raise RuntimeError("the kernel exploded")

        ui.guarded(broken)

    at = AppTest.from_function(script, default_timeout=30).run()
    assert not at.exception
    assert "RuntimeError: the kernel exploded" in at.error[0].value


def test_answers_only_run(monkeypatch, tmp_path, model_dir):
    """An evaluation run (answers at several depths, no probes): the overview shows accuracy vs depth."""
    import numpy as np

    from probes.store import Run
    from studies.synthetic import _depth_answers

    run = Run.create(tmp_path, "eval-only", {"model": {"name": "tiny-arith"}, "settings": {"study": "eval"}})
    run.write_shard("answers", 0, _depth_answers(np.random.default_rng(0), 16))
    run.mark_complete()
    at = start(monkeypatch, tmp_path, model_dir)
    assert_clean(at)
    assert '"accuracy"' in "".join(c.proto.spec for c in at.get("plotly_chart"))
    for page in ["trajectories", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert "no rank records" in " ".join(i.value for i in at.info) or page == "dynamics"


# ------------------------------------------------------------------------------------------ other families


def test_every_page_on_an_ouro_run_and_model(monkeypatch, ouro_runs_dir, ouro_model_dir):
    """The explorer reads an Ouro run (layout from its manifest, no Coda Lens, an exit gate) and probes an
    Ouro model live: every page clean, the exit gate drawn."""
    at = start(monkeypatch, ouro_runs_dir, ouro_model_dir)
    assert_clean(at)
    assert "ouro: looped stack of 2 × T · exit gate" in texts(at)
    assert "Exit gate" in [s.value for s in at.subheader]
    labels = {m.label for m in at.metric}
    assert any(label.startswith("logit lens") for label in labels)
    assert not any(label.startswith("coda lens") for label in labels)
    for page in ["trajectories", "dynamics", "compare"]:
        goto(at, page)
        assert_clean(at)
        assert charts(at) >= 2, page
    goto(at, "trajectories")
    assert at.pills(key="traj_lenses").options == ["logit"]
    goto(at, "live_probe")
    assert at.multiselect(key="live_lenses").options == ["logit", "tuned"]
    probe(at)
    assert_clean(at)
    open_tab(at, "Exit gate")
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("P(exited)" in s for s in specs)  # the exit-gate map of the live prompt
    open_tab(at, "Adaptive exit")
    assert "gate" in at.selectbox(key="live_trace_crit").options
    at.selectbox(key="live_trace_crit").set_value("gate").run()
    assert_clean(at)
    assert "gate" in at.selectbox(key="live_gen_crit").options
    assert not at.get("segmented_control") or all(
        c.key != "live_gen_sampler" for c in at.segmented_control
    )  # no diffusion sampler for Ouro
    at.selectbox(key="live_gen_crit").set_value("gate")
    next(b for b in at.button if b.label == "Generate").click().run()
    assert_clean(at)
    goto(at, "lens_grid")
    probe(at)
    assert_clean(at)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["yaxis"]["ticktext"] == ["core.0 · t=4", "core.1 · t=4", "latent · t=4", "final"]
    for page in ["prompt", "analyses"]:
        goto(at, page)
        assert_clean(at)


def test_live_probe_on_a_retrofit_model(monkeypatch, runs_dir, tmp_path):
    from tests.conftest import save_arith_model

    model = save_arith_model(tmp_path / "tiny-retrofit", family="retrofit", block_size=256)
    at = goto(start(monkeypatch, runs_dir, model), "live_probe")
    assert "retrofit" in texts(at)
    assert at.multiselect(key="live_lenses").options == ["logit", "coda", "tuned"]
    probe(at)
    assert_clean(at)
    assert charts(at) >= 3
    open_tab(at, "Adaptive exit")
    assert "gate" not in at.selectbox(key="live_gen_crit").options


# ------------------------------------------------------------------------------------------ damaged runs


def _damage(path: Path, change) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def test_damaged_runs_are_shown_as_damaged_and_the_rest_stay_usable(monkeypatch, tmp_path, model_dir):
    from studies.synthetic import write_run

    good = write_run(tmp_path, "arith-good", n_prompts=4)
    (good / "figures" / "notes.png").write_text("not an image")  # a non-image PNG beside a real one
    pwned = tmp_path / "pwned.csv"
    damages = {
        "bad-rows": lambda d: d["shards"]["ranks"]["shard-00000"].update(rows="abc"),
        "bad-model": lambda d: d.update(model=["tiny-arith"]),
        "bad-shards": lambda d: d["shards"].update(ranks=[1, 2]),
        "bad-sql": lambda d: d["shards"].update(
            {f"ranks\" AS SELECT 1; COPY (SELECT 42) TO '{pwned}'; CREATE VIEW \"z": d["shards"]["ranks"]}
        ),
        "bad-path": lambda d: d["shards"].update(ranks={"../../x": d["shards"]["ranks"]["shard-00000"]}),
    }
    for name, change in damages.items():
        _damage(write_run(tmp_path, name, n_prompts=2, figures=False), change)

    at = start(monkeypatch, tmp_path, model_dir)
    picker = at.sidebar.selectbox(key="run")
    assert picker.value == "arith-good" and set(picker.options) >= {f"✗ {n}" for n in damages}
    for page in RUN_PAGES:
        goto(at, page)
        assert_clean(at)
        assert charts(at) >= 1, page
    goto(at, "overview")
    at.session_state["overview_figures"] = True
    at.run()
    assert at.image and "figures/notes.png" in texts(at)  # named, the real figure still shown
    for name in damages:
        at.sidebar.selectbox(key="run").set_value(name).run()
        for page in ["overview", "trajectories"]:
            goto(at, page)
            assert not at.exception, (name, page)
            assert "damaged" in at.error[0].value and "manifest.json" in at.error[0].value, (name, page)
    assert not pwned.exists()


def test_runs_with_the_same_manifest_name_open_their_own_folder(monkeypatch, tmp_path, model_dir):
    """A copied run folder keeps its original's manifest name; each folder still opens itself."""
    from studies.synthetic import write_run

    write_run(tmp_path, "arith-a", n_prompts=6)
    b = write_run(tmp_path, "arith-b", n_prompts=4)
    _damage(b, lambda d: d.update(name="arith-a"))  # as after `cp -r runs/arith-a runs/arith-b` and a rerun
    at = start(monkeypatch, tmp_path, model_dir)
    prompts = {}
    for folder in ("arith-a", "arith-b"):
        at.sidebar.selectbox(key="run").set_value(folder).run()
        assert_clean(at)
        assert folder in [s.value for s in at.subheader]
        prompts[folder] = {m.label: m.value for m in at.metric}["prompts probed"]
    assert prompts == {"arith-a": "6", "arith-b": "4"}
