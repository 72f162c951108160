"""The tiny-arith training recipe is deterministic from its seed and resumes after an interruption
without changing the result (checked bit for bit on a small configuration)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import studies.tiny_arith.train as training
from studies.tiny_arith.train import TrainConfig, sample_depth, train


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
