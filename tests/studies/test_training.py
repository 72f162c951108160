"""The training loop is deterministic from its seed and resumes after an interruption without changing
the result (checked bit for bit on a small configuration); the shipped recipes reproduce their logs;
Ctrl-C saves a checkpoint and the command line says how to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import studies.training as training
from lens.errors import InputError
from lens.loading import EMBEDDED_DIR
from looplens.cli import app
from studies.tiny_arith.tokenizer import build_tokenizer
from studies.training import TrainConfig, preset, sample_depth, train


def small() -> TrainConfig:
    return TrainConfig(
        steps=6,
        batch_size=16,
        n_embd=32,
        n_heads=2,
        intermediate_size=64,
        mean_recurrence=4,
        backprop_depth=2,
        warmup_steps=2,
        checkpoint_minutes=0.0,
        eval_every=1000,
    )


def weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_same_seed_same_weights_and_resume_is_exact(tmp_path, monkeypatch):
    train(small(), tmp_path / "a")
    train(small(), tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_after_three(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(small(), tmp_path / "c")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(small(), tmp_path / "c")  # resumes from the step-3 checkpoint
    c = weights(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_different_recipe(tmp_path):
    train(small(), tmp_path / "a")
    other = small()
    other.lr = 1e-2
    with pytest.raises(ValueError, match="different training config"):
        train(other, tmp_path / "a")


def test_depth_sampler_follows_the_mean_above_its_floor():
    cfg = TrainConfig()
    gen = torch.Generator().manual_seed(0)
    depths = [sum(sample_depth(cfg, gen)) for _ in range(2000)]
    assert abs(sum(depths) / len(depths) - (cfg.mean_recurrence + 1)) < 0.6
    assert min(depths) == cfg.min_recurrence  # never fewer iterations than the floor, and the floor is hit
    huginn = TrainConfig(min_recurrence=1)
    gen = torch.Generator().manual_seed(0)
    unfloored = [sum(sample_depth(huginn, gen)) for _ in range(2000)]
    assert depths == [max(d, cfg.min_recurrence) for d in unfloored]  # the floor only raises short draws
    assert min(unfloored) < cfg.min_recurrence
    no_grad, with_grad = sample_depth(cfg, torch.Generator().manual_seed(1))
    assert with_grad == min(cfg.backprop_depth, no_grad + with_grad)
    assert training.lr_at(cfg, 0) < training.lr_at(cfg, cfg.warmup_steps) > training.lr_at(cfg, cfg.steps - 1)


# ---------------------------------------------------------------------------- the shipped recipes
def shipped_log(name: str) -> list[dict]:
    return json.loads((EMBEDDED_DIR / name / "training_log.json").read_text())["log"]


@pytest.mark.parametrize("name", ["tiny-arith", "tiny-chains"])
def test_the_shipped_recipes_reproduce_their_logged_first_steps(name, tmp_path):
    """The one training loop, generalised to any task mix, still trains each shipped model exactly as
    logged (loss to 5 decimals and sampled depth of the first steps; within warm-up, so the shortened
    schedule does not change the learning rate)."""
    cfg = preset(name, steps=3)
    assert cfg.warmup_steps > 3
    train(cfg, tmp_path)
    log = json.loads((tmp_path / "model" / "training_log.json").read_text())["log"]
    keys = ("step", "loss", "depth")
    assert [{k: r[k] for k in keys} for r in log] == [{k: r[k] for k in keys} for r in shipped_log(name)[:3]]


def test_micro_batches_give_the_whole_batch_gradient():
    """Accumulating length-sorted groups is the same mean loss over the batch's answer tokens."""
    cfg = preset("tiny-chains")
    cfg.batch_size, cfg.micro_batches = 12, 3
    tok = build_tokenizer()
    groups = training.make_micro_batches(cfg, tok, step=5)
    assert len(groups) == 3 and sum(len(ids) for ids, _ in groups) == 12
    widths = [ids.shape[1] for ids, _ in groups]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # less padding than one batch
    whole_ids, whole_labels = training.make_batch(cfg, tok, step=5)
    assert sorted(int((lab != -100).sum()) for lab in whole_labels) == sorted(
        int((lab != -100).sum()) for _, labels in groups for lab in labels
    )


def test_preset_errors():
    with pytest.raises(InputError, match="no training recipe"):
        preset("tiny-poetry")
    with pytest.raises(InputError, match="--steps"):
        preset("tiny-arith", steps=0)


# ---------------------------------------------------------------------------- the command line
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny-arith", "--steps", "8", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "looplens", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    seen = bytearray()

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read1(256), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"train tiny-arith" not in seen and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)  # the progress bar is up: the loop has started
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    output = seen.decode()
    assert proc.returncode == 130, output
    assert "checkpoint saved in" in output and f"looplens train --model tiny-arith --out {out}" in output
    assert "Traceback" not in output
    stopped = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert 1 <= stopped < 8
    # a different recipe in the same folder is one clear line; the same command resumes exactly
    result = CliRunner().invoke(app, ["train", "--model", "tiny-arith", "--steps", "9", "--out", str(out)])
    assert result.exit_code == 2 and "different training config" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    log = json.loads((out / "model" / "training_log.json").read_text())["log"]
    keys = ("step", "loss", "depth")
    assert [{k: r[k] for k in keys} for r in log] == [
        {k: r[k] for k in keys} for r in shipped_log("tiny-arith")[:8]
    ]


def test_curriculum_phases_switch_the_task_mix():
    cfg = TrainConfig(steps=100, task_mix={"chains_1hop": 1.0})
    assert training.mix_at(cfg, 0) == {"chains_1hop": 1.0}
    cfg.curriculum = [(0.0, {"chains_0hop": 1.0}), (0.5, {"chains_2hop": 1.0})]
    assert [next(iter(training.mix_at(cfg, s))) for s in (0, 49, 50, 99)] == [
        "chains_0hop",
        "chains_0hop",
        "chains_2hop",
        "chains_2hop",
    ]
    tok = build_tokenizer()
    cfg.batch_size = 4
    prompts = [tok.decode(row) for row, _ in training.batch_rows(cfg, tok, 60)]
    assert all(p.count(";") == 6 for p in prompts)  # two chains of two hops: six statements
