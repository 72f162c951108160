"""The arithmetic study end to end on a small random model: tables behind every figure, resume, errors."""

from __future__ import annotations

import errno
import io
import os
import shutil

import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import lens
import probes
import probes.api
from lens.tokenizer import Tokenizer
from looplens.cli import app
from probes.records import SCHEMAS
from probes.store import Run, RunMismatchError
from studies.arithmetic import control_token, run_arithmetic_study
from tests.conftest import HUGINN_0125, save_arith_model

SETTINGS = dict(n=12, steps=3, batch_size=4, depths=(1, 3), depth_n=4, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_arith_model(tmp_path_factory.mktemp("model") / "tiny-random")


@pytest.fixture(scope="module")
def study(model_dir, tmp_path_factory):
    """The study's run and what it printed on an 80-column terminal."""
    console = Console(width=80, record=True, file=io.StringIO())
    run = run_arithmetic_study(
        model=str(model_dir), out=tmp_path_factory.mktemp("runs"), console=console, **SETTINGS
    )
    return run, console.export_text()


@pytest.fixture(scope="module")
def run(study):
    return study[0]


def test_ranks_table_covers_every_unrolled_layer(run):
    ranks = run.table("ranks")
    assert (ranks["rank"] >= 1).all()
    layers = ranks.query("unrolled_index >= 0 and lens == 'logit'")["unrolled_index"]
    assert sorted(layers.unique()) == list(range(1 + 3 * 2 + 1))  # prelude + T x core + coda
    assert set(ranks["lens"]) == {"logit", "coda", "tuned"}
    assert {"predicted", "final", "intermediate", "control", "digit_0"} <= set(ranks["target_kind"])
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()
    predicted = ranks.query("target_kind == 'predicted'")
    # the Coda Lens at the last latent and the Logit Lens at the output are the model itself
    assert (predicted.query("lens == 'coda' and site == 'latent'")["rank"] == 1).all()
    assert (predicted.query("lens == 'logit' and site == 'final'")["rank"] == 1).all()


def test_figure_tables(run):
    figures = run.figures_dir
    # a random model answers nothing correctly, so intermediate-vs-final (correct problems only) is skipped;
    # tests/studies/test_embedded_study.py checks it on the trained tiny-arith
    assert not (figures / "intermediate_vs_final.png").exists()
    for name in (
        "rank_trajectory",
        "numeric_prefix",
        "depth_scaling",
        "latent_dynamics",
        "reference_overlay",
    ):
        assert (figures / f"{name}.png").stat().st_size > 10_000
        assert (figures / f"{name}.html").is_file()
    traj = pd.read_parquet(figures / "rank_trajectory.parquet")
    assert (traj["median"] >= 1).all() and (traj["ci_low"] <= traj["median"]).all()
    assert (traj["median"] <= traj["ci_high"]).all()
    assert sorted(traj.query("lens == 'logit'")["unrolled_index"]) == list(range(8))
    coda_last = traj.query("lens == 'coda'").sort_values("unrolled_index").iloc[-1]
    assert coda_last["median"] == 1 and coda_last["top1"] == 1.0
    share = pd.read_parquet(figures / "numeric_prefix.parquet")["share"]
    assert share.between(0, 1).all()
    depth = pd.read_parquet(figures / "depth_scaling.parquet")
    assert set(depth["num_steps"]) == {1, 3} and depth["accuracy"].between(0, 1).all()
    assert run.manifest["prompt_template"]["name"] and run.status == "complete"


def test_killed_study_resumes_without_duplicates(model_dir, tmp_path, monkeypatch):
    real = probes.api.probe_prompts
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr("studies.arithmetic.probe_prompts", dying)
    with pytest.raises(KeyboardInterrupt):
        run_arithmetic_study(model=str(model_dir), out=tmp_path, **SETTINGS)
    monkeypatch.setattr("studies.arithmetic.probe_prompts", real)
    path = next(tmp_path.iterdir())
    first = Run.open(path)
    assert first.shards("ranks") == ["shard-00000"]
    written = (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns
    finished = run_arithmetic_study(model=str(model_dir), out=tmp_path, **SETTINGS)
    assert (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns == written
    ranks = finished.table("ranks")
    assert sorted(ranks["prompt_id"].unique()) == list(range(12))
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()
    assert finished.status == "complete"


def test_bad_inputs_give_one_clear_error(model_dir, tmp_path):
    runner = CliRunner()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    cases = [
        (["study", "arithmetic", "--model", str(no_weights), "--out", str(tmp_path)], "no weights"),
        (
            [
                "study",
                "arithmetic",
                "--model",
                str(model_dir),
                "--template",
                "Q: what?",
                "--out",
                str(tmp_path),
            ],
            "{question}",
        ),
        (
            ["study", "arithmetic", "--model", str(model_dir), "--steps", "0", "--out", str(tmp_path)],
            "--steps",
        ),
        (["study", "geometry"], "unknown study"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_study_sized_run_on_the_embedded_model_resumes_after_a_kill(tmp_path, monkeypatch):
    """200 held-out problems × 16 iterations × both lenses on tiny-arith, killed after two shards."""
    real = probes.api.probe_prompts
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    settings = dict(
        model="tiny-arith",
        n=200,
        steps=16,
        batch_size=50,
        depths=(16,),
        depth_n=2,
        tuned_lens=False,
        out=tmp_path,
    )
    monkeypatch.setattr("studies.arithmetic.probe_prompts", dying)
    with pytest.raises(KeyboardInterrupt):
        run_arithmetic_study(**settings)
    monkeypatch.setattr("studies.arithmetic.probe_prompts", real)
    path = next(tmp_path.iterdir())
    written = {p.name: p.stat().st_mtime_ns for p in (path / "ranks").glob("*.parquet")}
    assert len(written) == 2
    run = run_arithmetic_study(**settings)
    assert {
        p.name: p.stat().st_mtime_ns for p in (path / "ranks").glob("*.parquet") if p.name in written
    } == written
    ranks = run.table("ranks")
    layout = lens.load_model("tiny-arith").layout
    layers = layout.prelude + 16 * layout.core + layout.coda
    per_prompt = ranks.query("target_kind == 'predicted' and unrolled_index >= 0").groupby("prompt_id").size()
    assert (
        len(per_prompt) == 200 and (per_prompt == 2 * layers - 1).all()
    )  # the Coda Lens stops before the coda
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()


# ------------------------------------------------------------------------------------------ runs cannot lie


@pytest.mark.parametrize(
    ("change", "section"),
    [({"template": "Q: {question}\nA:"}, "prompt_template"), ({"dtype": torch.bfloat16}, "model")],
)
def test_resume_with_another_template_or_dtype_is_refused(run, model_dir, change, section):
    shards = run.shards("ranks")
    with pytest.raises(RunMismatchError) as info:
        run_arithmetic_study(model=str(model_dir), out=run.path.parent, **SETTINGS, **change)
    assert info.value.keys and all(k.startswith(section) for k in info.value.keys), info.value.keys
    again = Run.open(run.path)
    assert again.status == "complete" and again.shards("ranks") == shards  # nothing was touched


def test_template_mismatch_is_one_line_on_the_command_line(run, model_dir):
    args = ["study", "arithmetic", "--model", str(model_dir), "--out", str(run.path.parent)]
    args += ["--n", "12", "--steps", "3", "--batch-size", "4", "--depths", "1,3", "--name", run.name]
    result = CliRunner().invoke(app, [*args, "--template", "Q: {question}\nA:"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "prompt_template" in result.output and "overwrite" in result.output


def test_manifest_records_every_setting_that_changes_results(run):
    manifest = run.manifest
    settings = manifest["settings"]
    assert {"n", "steps", "batch_size", "seed", "lenses", "targets", "control", "depths", "depth_n"} <= set(
        settings
    )
    assert settings["tuned_lens"]["epochs"] > 0 and "control" in settings["targets"]
    assert manifest["model"]["device"] == "cpu" and manifest["model"]["dtype"] == "float32"
    assert len(manifest["model"]["weights"]) == 16 and manifest["prompt_template"]["name"]


def test_a_study_that_fails_marks_its_run_failed(model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in depth scaling")

    monkeypatch.setattr("studies.arithmetic._depth_answers", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_arithmetic_study(model=str(model_dir), out=tmp_path, **{**SETTINGS, "n": 4})
    [info] = probes.list_runs(tmp_path)
    assert info.status == "failed" and "RuntimeError: out of memory in depth scaling" in info.error


class _FullDisk:
    """A file whose first write stores half the data, then fails as a full disk does."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_a_figure_that_cannot_be_written_fails_the_study(run, model_dir, tmp_path, monkeypatch):
    """The disk fills up while plotly.min.js is written: the study fails and no partial file is kept."""
    copy = tmp_path / run.name
    shutil.copytree(run.path, copy)
    (copy / "figures" / "plotly.min.js").unlink()
    real_open = io.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and "plotly.min.js" in os.fspath(file) and "w" in mode:
            return _FullDisk(handle)
        return handle

    monkeypatch.setattr("builtins.open", full_disk_open)
    monkeypatch.setattr("io.open", full_disk_open)
    with pytest.raises(OSError, match="No space left"):
        run_arithmetic_study(model=str(model_dir), out=tmp_path, **SETTINGS)
    monkeypatch.undo()
    failed = Run.open(copy)
    assert failed.status == "failed" and "No space left on device" in failed.manifest["error"]
    assert not [p.name for p in (copy / "figures").iterdir() if "plotly.min.js" in p.name]


def test_a_partial_plotly_bundle_is_replaced(tmp_path):
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from studies.figures.style import save_html

    (tmp_path / "plotly.min.js").write_text(get_plotlyjs()[:1000])  # left by a writer that died
    save_html(go.Figure(), tmp_path / "fig.html")
    assert (tmp_path / "plotly.min.js").read_text() == get_plotlyjs()
    assert 'src="plotly.min.js"' in (tmp_path / "fig.html").read_text()


# ------------------------------------------------------------------------------------------ the control token


def test_control_token_is_the_reference_studys_where_the_vocabulary_has_it(run):
    huginn = Tokenizer.from_dir(HUGINN_0125)
    control = control_token(huginn)
    assert control["id"] == huginn.token_to_id("the") == 633 and control["text"] == "the"
    assert control["id"] != huginn.encode(" the")[0]  # not " the" (264)
    assert "reference" in control["source"]
    tiny = control_token(lens.load_model("tiny-arith").tokenizer)  # word-level: " the" only
    assert tiny["text"] == " the" and "no entry 'the'" in tiny["source"]
    recorded = run.manifest["settings"]["control"]
    assert recorded["text"] == " the" and recorded["source"]
    ranks = run.table("ranks")
    assert set(ranks.query("target_kind == 'control'")["token_id"]) == {recorded["id"]}


# ------------------------------------------------------------------------------------------ the summary


def test_summary_names_each_accuracy_and_fits_80_columns(study):
    run, text = study
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "accuracy at T=3" in text
    probed = next(line for line in lines if line.strip().startswith("probed problems"))
    depth = next(line for line in lines if line.strip().startswith("depth-scaling sample"))
    assert "/12 the problems the lenses decode" in probed and "/4 other held-out problems" in depth
    footer = {line.split()[0]: line for line in lines[-6:] if line.strip()}
    assert f"looplens explore {run.path.parent}" in footer["explore"]
    assert footer["tables"].split(None, 1)[1].startswith("answers, dynamics, prompts")
    assert "time" in footer


def test_card_accuracy_reads_the_embedded_models_card():
    from studies.evaluation import card_accuracy

    assert card_accuracy("tiny-arith", "arithmetic_1dc", 16) == (0.95, 1870)
    assert card_accuracy("tiny-arith", "arithmetic_1dc", 3) is None  # no such column
    assert card_accuracy("no-such-model", "arithmetic_1dc", 16) is None


# ------------------------------------------------------------------------------------------ records


def test_answers_say_why_they_were_generated(run):
    answers = run.table("answers")
    assert set(answers["purpose"]) == {"probe", "depth"}
    probed = answers[answers["purpose"] == "probe"]
    assert sorted(probed["prompt_id"]) == list(range(12)) and set(probed["num_steps"]) == {3}
    depth = pd.read_parquet(run.figures_dir / "depth_scaling.parquet")
    measured = answers[answers["purpose"] == "depth"].groupby(["task", "num_steps"]).size()
    assert depth.set_index(["task", "num_steps"])["n"].equals(measured.rename("n").astype(depth["n"].dtype))


def test_records_are_checked_where_they_are_made(model_dir):
    from studies.evaluation import evaluate_answers
    from studies.tasks import arithmetic

    model = lens.load_model(model_dir)
    result = probes.probe_prompts(model, ["Question: What is 1 + 2?\nAnswer:"], {"final": [3]}, num_steps=2)
    for name in ("ranks", "topk", "dynamics", "verdicts"):
        frame = getattr(result, name)
        schema = SCHEMAS[name]
        assert frame.columns.tolist() == [c for c in schema.names if c != "run"], name
        assert str(frame["prompt_id"].dtype) == "int64" and str(frame["position"].dtype) == "int32"
    problems = arithmetic.sample("arithmetic_1dc", 2, split="test", seed=0)
    ids = [model.tokenizer.encode(p.context) for p in problems]
    with pytest.raises(ValueError, match="answers.*purpose"):
        evaluate_answers(model, problems, ids, 2, purpose="because")
