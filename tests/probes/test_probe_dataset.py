"""``looplens probe`` / ``probes.probe_dataset``: your own prompts into a complete, resumable run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import probes
from lens.errors import InputError
from looplens.cli import app
from probes.dataset import ProbeWorker
from probes.store import Run, RunMismatchError
from tests.conftest import REPO, save_arith_model

LONG = "Question: What is 1 plus 1?\n" * 8  # longer than the small model's 64-token context
ROWS = [
    {"prompt": "Question: What is (2 * 3) + 1?\nAnswer:", "target": " 7", "source": "gsm-like"},
    {"prompt": "Question: What is 4 plus 5?\nAnswer:", "targets": {"correct": " 9", "wrong": " 8"}},
    {"prompt": "Grüße aus 日本 — what is 1 plus 1?", "target": 13},  # unicode, a token id target
    {"prompt": "Question: What is 3 minus 1?\nAnswer:"},  # no target
    {"prompt": LONG, "note": "too long"},
    {"prompt": "Question: What is 9 times 1?\nAnswer:", "targets": [" 9", " 1"]},
]
KEY = {
    "ranks": ["prompt_id", "position", "site", "iteration", "lens", "target_kind"],
    "topk": ["prompt_id", "position", "site", "iteration", "lens", "k"],
    "dynamics": ["prompt_id", "position", "site", "iteration"],
    "verdicts": ["prompt_id", "position", "site"],
    "prompts": ["prompt_id"],
    "prompt_meta": ["prompt_id"],
}
FAST = dict(num_steps=3, shard_size=2, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_arith_model(tmp_path_factory.mktemp("model") / "tiny-random", block_size=64)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(model_dir, jsonl, tmp_path_factory) -> Run:
    from studies.figures.runs import render_probe_figures  # the figures sit above probes: the CLI passes them

    return probes.probe_dataset(
        jsonl, str(model_dir), out=tmp_path_factory.mktemp("runs"), figures=render_probe_figures, **FAST
    )


def sorted_tables(run: Run) -> dict[str, pd.DataFrame]:
    return {
        name: run.table(name).drop(columns="run").sort_values(key).reset_index(drop=True)
        for name, key in KEY.items()
    }


def test_mixed_prompts_make_a_complete_run(run):
    assert run.status == "complete" and set(KEY) <= set(run.tables())
    meta = run.table("prompt_meta").set_index("prompt_id")
    assert meta["error"].notna().tolist() == [False, False, False, False, True, False]
    assert "longer than the model's context (64 tokens)" in meta.loc[4, "error"]
    assert json.loads(meta.loc[4, "metadata"]) == {"note": "too long"}
    assert json.loads(meta.loc[0, "metadata"]) == {"source": "gsm-like"}
    assert (meta.drop(index=4)["steps_used"] == 3).all()
    ranks = run.table("ranks")
    assert sorted(ranks["prompt_id"].unique()) == [0, 1, 2, 3, 5]  # everything but the long prompt
    kinds = ranks.groupby("prompt_id")["target_kind"].agg(lambda s: sorted(set(s)))
    assert kinds[0] == ["predicted", "target"] and kinds[3] == ["predicted"]
    assert kinds[1] == ["correct", "predicted", "wrong"] and kinds[5] == ["predicted", "target_0", "target_1"]
    assert (ranks.query("prompt_id == 2 and target_kind == 'target'")["token_id"] == 13).all()
    for name, key in KEY.items():
        assert not run.table(name).duplicated(key).any(), name
    assert (ranks["position"] == -1).all()
    prompts = run.table("prompts").set_index("prompt_id")
    assert prompts.loc[2, "context"] == ROWS[2]["prompt"] and prompts.loc[0, "completion"] == " 7"
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["errors"] == 1 and summary["probed"] == 5
    assert summary["figures"] == ["latent_dynamics", "rank_trajectory"]
    assert (run.figures_dir / "rank_trajectory.png").stat().st_size > 10_000
    assert run.verify() == run.rows()


def test_the_explorer_opens_a_probe_run(run, model_dir, monkeypatch):
    from tests.app.test_pages import assert_clean, charts, goto, start

    at = start(monkeypatch, run.path.parent, model_dir)
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["prompts probed"] == "5"
    table = next(df.value for df in at.dataframe if "prompt_text" in df.value.columns)
    assert (
        len(table) == 6 and "longer than the model's context" in table.set_index("prompt_id").loc[4, "error"]
    )
    for page in ("trajectories", "dynamics"):
        goto(at, page)
        assert_clean(at)
        assert charts(at) >= 1


def test_killed_probe_resumes_without_duplicates(model_dir, tmp_path):
    """A real kill (SIGKILL of the command) mid-run, then the same command again."""
    rows = [
        {"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "target": f" {a + b}"}
        for a in range(6)
        for b in range(4)
    ]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "probe",
        str(data),
        "--model",
        str(model_dir),
        "--steps",
        "16",
        "--shard-size",
        "1",
        "--no-figures",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "looplens", *args, "--out", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        recorded = 0
        while time.monotonic() < deadline and proc.poll() is None:
            manifests = list(out.glob("*/manifest.json"))
            if manifests:
                try:
                    recorded = len(json.loads(manifests[0].read_text())["shards"].get("ranks", {}))
                except (json.JSONDecodeError, OSError):
                    recorded = 0
                if recorded >= 2:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    path = next(out.iterdir())
    killed = Run.open(path)
    assert killed.status == "running" and 2 <= len(killed.shards("ranks")) < len(rows), "not killed mid-run"
    first = (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    resumed_count = int(re.search(r"(\d+) resumed", result.output).group(1))
    complete = set.intersection(*(set(killed.shards(t)) for t in KEY))  # a shard has all its tables
    assert resumed_count == len(complete) >= 1
    resumed = Run.open(path)
    assert (
        resumed.status == "complete" and (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns == first
    )
    assert len(resumed.shards("ranks")) == len(rows)
    fresh = probes.probe_dataset(
        data,
        str(model_dir),
        out=tmp_path / "fresh",
        num_steps=16,
        shard_size=1,
        progress=False,
    )
    a, b = sorted_tables(resumed), sorted_tables(fresh)
    for name in KEY:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


def test_resume_checks_settings_and_input(model_dir, jsonl, tmp_path):
    probes.probe_dataset(jsonl, str(model_dir), out=tmp_path, name="r", **FAST)
    with pytest.raises(RunMismatchError, match="settings.lenses"):
        probes.probe_dataset(jsonl, str(model_dir), out=tmp_path, name="r", lenses=["logit"], **FAST)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Question: What is 2 plus 2?\nAnswer:"}) + "\n")
    with pytest.raises(RunMismatchError, match="settings.input"):
        probes.probe_dataset(other, str(model_dir), out=tmp_path, name="r", **FAST)


def test_file_formats_read_the_same_prompts(jsonl, tmp_path):
    base = probes.read_prompts(jsonl)
    frame = pd.DataFrame(ROWS)
    csv = frame.assign(
        target=[str(t) if isinstance(t, str) else "" for t in frame["target"]],
        targets=[json.dumps(t) if isinstance(t, dict | list) else "" for t in frame["targets"]],
    )
    csv.to_csv(tmp_path / "p.csv", index=False)
    from_csv = probes.read_prompts(tmp_path / "p.csv")
    assert from_csv.texts == base.texts
    assert from_csv.targets[1] == base.targets[1] and from_csv.targets[5] == {
        "target_0": " 9",
        "target_1": " 1",
    }
    assert from_csv.targets[2] == {}  # the token id is not in this CSV
    parquet = pd.DataFrame(
        {"prompt": base.texts, "target": [" 7", None, 13, None, None, " 3"], "tag": range(6)}
    )
    parquet["target"] = parquet["target"].astype(object)
    parquet.drop(columns="target").assign(
        target=pd.array([11, None, 13, None, None, 12], dtype="Int64")
    ).to_parquet(tmp_path / "p.parquet")
    from_parquet = probes.read_prompts(tmp_path / "p.parquet")
    assert from_parquet.texts == base.texts and from_parquet.targets[0] == {"target": 11}
    assert from_parquet.targets[1] == {} and from_parquet.metadata[3] == {"tag": 3}


def test_a_saved_hugging_face_dataset(model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {
        "question": ["Question: What is 2 plus 3?\nAnswer:", "Question: What is 1 plus 1?\nAnswer:"],
        "target": [" 5", " 2"],
        "level": [1, 2],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "hf")
    run = probes.probe_dataset(
        tmp_path / "hf",
        str(model_dir),
        out=tmp_path / "runs",
        prompt_column="question",
        **FAST,
    )
    meta = run.table("prompt_meta").sort_values("prompt_id")
    assert [json.loads(m) for m in meta["metadata"]] == [{"level": 1}, {"level": 2}]
    assert set(run.table("ranks")["target_kind"]) == {"predicted", "target"}
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_dict(rows), "b": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(tmp_path / "two")
    with pytest.raises(InputError, match="choose one with --split"):
        probes.read_prompts(tmp_path / "two", "question")
    assert len(probes.read_prompts(tmp_path / "two", "question", split="b")) == 2


def test_positions_all_and_a_prompt_too_short_for_a_position(model_dir, tmp_path):
    rows = ["Question: What is 2 plus 3?\nAnswer:", "Answer:"]
    run = probes.probe_dataset(rows, str(model_dir), out=tmp_path, positions="all", **FAST)
    ranks = run.table("ranks").query("target_kind == 'predicted' and lens == 'logit' and site == 'final'")
    lengths = run.table("prompt_meta").set_index("prompt_id")["n_tokens"]
    for pid, group in ranks.groupby("prompt_id"):
        assert sorted(group["position"]) == list(range(lengths[pid]))
    short = probes.probe_dataset(rows, str(model_dir), out=tmp_path, name="short", positions=[5], **FAST)
    meta = short.table("prompt_meta").set_index("prompt_id")
    assert meta.loc[0, "error"] is None or pd.isna(meta.loc[0, "error"])
    assert "too few for positions [5]" in meta.loc[1, "error"]
    assert set(short.table("ranks")["position"]) == {5}


def test_adaptive_depth_records_each_prompts_own_depth(model_dir, tmp_path):
    rows = [f"Question: What is {a} plus 2?\nAnswer:" for a in range(4)]
    run = probes.probe_dataset(
        rows,
        str(model_dir),
        out=tmp_path,
        exit_criterion="latent-diff",
        exit_threshold=0.5,
        **{**FAST, "num_steps": 12},
    )
    used = run.table("prompt_meta").set_index("prompt_id")["steps_used"]
    assert used.between(1, 12).all() and used.min() < 12  # a loose threshold stops early
    core = run.table("ranks").query("site.str.startswith('core')", engine="python")
    deepest = core.groupby("prompt_id")["iteration"].max()
    assert (deepest <= used[deepest.index]).all()


BAD = [
    ("rows_no_prompt", {}, "has no 'prompt' column"),
    ("unreadable", {}, "cannot read prompts"),
    ("bad_json_line", {}, "line 2: not valid JSON"),
    ("missing_file", {}, "prompt file not found"),
    ("empty_target", {}, "tokenises to nothing"),
    ("target_id_out_of_vocab", {}, "outside the vocabulary"),
    ("good", {"lenses": ["x-ray"]}, "unknown lens 'x-ray'"),
    ("good", {"sites": ["core.9"]}, "does not exist"),
    ("good", {"positions": []}, "selects no token"),
    ("good", {"chat": True}, "chat template"),
    ("good", {"exit_criterion": "vibes"}, "unknown exit criterion"),
]


def _bad_file(kind: str, folder: Path) -> Path:
    lines = {
        "rows_no_prompt": [{"text": "hello"}],
        "empty_target": [{"prompt": "Question: hi"}, {"prompt": "Question: hi", "target": ""}],
        "target_id_out_of_vocab": [{"prompt": "Question: hi", "target": 10**6}],
        "good": [{"prompt": "Question: What is 1 plus 1?\nAnswer:"}],
    }
    if kind == "unreadable":
        path = folder / "broken.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
        return path
    if kind == "bad_json_line":
        path = folder / "broken.jsonl"
        path.write_text('{"prompt": "ok"}\n{"prompt": \n')
        return path
    if kind == "missing_file":
        return folder / "absent.jsonl"
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines[kind]))
    return path


@pytest.mark.parametrize(("kind", "options", "message"), BAD)
def test_bad_input_is_one_clear_error_before_any_work(model_dir, tmp_path, kind, options, message):
    source = _bad_file(kind, tmp_path)
    out = tmp_path / "runs"
    with pytest.raises(InputError, match=message):
        probes.probe_dataset(source, str(model_dir), out=out, **{**FAST, **options})
    assert not out.exists()  # nothing was started


def test_bad_input_on_the_command_line(model_dir, tmp_path):
    runner = CliRunner()
    for kind, extra, message in [
        ("rows_no_prompt", [], "has no 'prompt' column"),
        ("good", ["--lens", "logit,x-ray"], "unknown lens"),
        ("good", ["--positions", "first"], "--positions"),
        ("good", ["stray"], "unexpected argument"),
        ("good", ["--name", "../escape"], "run name"),
    ]:
        source = _bad_file(kind, tmp_path)
        result = runner.invoke(
            app, ["probe", str(source), "--model", str(model_dir), "--out", str(tmp_path / "r"), *extra]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_shards_hold_one_shards_records(model_dir, tmp_path, monkeypatch):
    """Each shard's records are written before the next shard is computed (never all at once)."""
    seen = []
    real = ProbeWorker.compute

    def spy(self, task):
        seen.append(
            (task.shard, sum(r["rows"] for r in _manifest(tmp_path)["shards"].get("ranks", {}).values()))
        )
        return real(self, task)

    monkeypatch.setattr(ProbeWorker, "compute", spy)
    probes.probe_dataset(
        [f"Question: What is {a} plus 1?\nAnswer:" for a in range(6)],
        str(model_dir),
        out=tmp_path,
        name="m",
        **FAST,
    )
    assert [s for s, _ in seen] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [n for _, n in seen] == sorted(n for _, n in seen) and seen[0][1] == 0 < seen[1][1] < seen[2][1]


def _manifest(root: Path) -> dict:
    path = root / "m" / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"shards": {}}


def test_chat_template_wraps_each_prompt(tmp_path):
    """A small random model with Huginn's tokenizer (which has a chat template)."""
    import torch

    import lens
    from lens.tokenizer import Tokenizer
    from tests.conftest import HUGINN_0125, small_config

    tok = Tokenizer.from_dir(HUGINN_0125)
    torch.manual_seed(0)
    cfg = small_config(vocab_size=tok.vocab_size, block_size=256, n_embd=32, n_heads=2)
    model_dir = lens.save_model(lens.RecurrentDepthLM(cfg, tokenizer=tok).eval(), tmp_path / "huginn-like")
    rows = [{"prompt": "What is 2 plus 3?", "target": "5"}]
    run = probes.probe_dataset(
        rows, str(model_dir), out=tmp_path, chat=True, system="Answer briefly.", **FAST
    )
    text = run.table("prompts")["prompt_text"].item()
    assert text == tok.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}]
    )
    assert run.table("prompt_meta")["n_tokens"].item() == len(tok.encode(text))
    assert run.manifest["settings"]["chat"] is True and run.manifest["prompt_template"]["name"] == "chat"
    plain = probes.probe_dataset(rows, str(model_dir), out=tmp_path, name="plain", **FAST)
    assert plain.table("prompts")["prompt_text"].item() == "What is 2 plus 3?"
