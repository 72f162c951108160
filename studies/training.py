"""Train the embedded models (``tiny-arith``, ``tiny-chains``): Huginn's recipe scaled down to a 2-core CPU.

Prelude, recurrent core and coda; a random initial latent; a randomised number of iterations per
step (Huginn's log-normal Poisson sampler) with truncated backpropagation through the last few;
AdamW with warm-up and cosine decay. One loop for every model: a :class:`TrainConfig` names the
model, its task mix (any task of :mod:`studies.tasks`) and its size, and :data:`PRESETS` holds the
recipes of the shipped models. Deterministic from its seed; checkpoints every few minutes
(safetensors + JSON, never pickle) and on Ctrl-C, and resumes after an interruption without
changing the result.

    python -m studies.training --model tiny-chains --out checkpoints/tiny-chains
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lens
from lens.config import RecurrentDepthConfig
from lens.errors import InputError, LooplensError
from lens.model import RecurrentDepthLM
from studies import tasks as task_registry
from studies.tiny_arith.tokenizer import build_tokenizer

DEFAULT_MIX = {
    "arithmetic_1dc": 0.9,
    "arithmetic_2da": 0.03,
    "arithmetic_2ds": 0.03,
    "arithmetic_2dm": 0.02,
    "arithmetic_3da": 0.01,
    "arithmetic_3ds": 0.01,
}


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (recorded in the model card)."""

    seed: int = 0
    steps: int = 4500
    batch_size: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    beta2: float = 0.95
    mean_recurrence: int = 16
    min_recurrence: int = 5
    backprop_depth: int = 4
    lognormal_sigma: float = 0.5
    task_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    n_embd: int = 128
    n_heads: int = 4
    intermediate_size: int = 160
    n_layers_in_prelude: int = 1
    n_layers_in_recurrent_block: int = 1
    n_layers_in_coda: int = 1
    block_size: int = 256
    threads: int = 1
    checkpoint_minutes: float = 3.0
    eval_every: int = 200
    name: str = "tiny-arith"
    eval_task: str = "arithmetic_1dc"
    micro_batches: int = 1
    curriculum: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    """Phases ``(start, mix)``: from ``start × steps`` on, batches are drawn from ``mix`` instead of
    ``task_mix`` (the last phase that has started wins); empty: ``task_mix`` throughout."""


CHAINS_MIX = {
    "chains_0hop": 0.12,
    "chains_1hop": 0.2,
    "chains_2hop": 0.2,
    "chains_3hop": 0.18,
    "chains_4hop": 0.18,
    "chains_1hop_trace": 0.06,
    "chains_2hop_trace": 0.06,
}
"""tiny-chains: short answers up to four hops, long answers at one and two (longer chains are evaluated,
never trained)."""

PRESETS: dict[str, TrainConfig] = {
    "tiny-arith": TrainConfig(),
    "tiny-chains": TrainConfig(
        name="tiny-chains",
        eval_task="chains_4hop",
        task_mix=dict(CHAINS_MIX),
        steps=5000,
        batch_size=32,
        micro_batches=2,
        intermediate_size=256,
        mean_recurrence=8,
        min_recurrence=5,
    ),
}
"""The recipes of the shipped embedded models."""


def preset(name: str, seed: int = 0, steps: int | None = None) -> TrainConfig:
    """A fresh copy of a shipped model's recipe, optionally with another seed or number of steps."""
    if name not in PRESETS:
        raise InputError(f"no training recipe for {name!r}; recipes: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg.seed = seed
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be >= 1, got {steps}")
        cfg.steps = steps
    return cfg


class TrainingInterrupted(LooplensError):
    """Training stopped on Ctrl-C after saving a checkpoint it resumes from."""


def model_config(cfg: TrainConfig, tokenizer: lens.tokenizer.Tokenizer) -> RecurrentDepthConfig:
    return RecurrentDepthConfig(
        name=cfg.name,
        n_embd=cfg.n_embd,
        n_heads=cfg.n_heads,
        intermediate_size=cfg.intermediate_size,
        vocab_size=tokenizer.vocab_size,
        padded_vocab_size=tokenizer.vocab_size,
        block_size=cfg.block_size,
        n_layers_in_prelude=cfg.n_layers_in_prelude,
        n_layers_in_recurrent_block=cfg.n_layers_in_recurrent_block,
        n_layers_in_coda=cfg.n_layers_in_coda,
        mean_recurrence=cfg.mean_recurrence,
        mean_backprop_depth=cfg.backprop_depth,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sample_depth(cfg: TrainConfig, gen: torch.Generator) -> tuple[int, int]:
    """Huginn's sampler: total depth ~ Poisson(LogNormal) + 1 around the mean; gradients through the last few.

    Depths below ``min_recurrence`` are raised to it, so that nothing rewards answering in fewer iterations.
    """
    s = cfg.backprop_depth
    mu = math.log(cfg.mean_recurrence) - cfg.lognormal_sigma**2 / 2
    rate = float(torch.empty(1).log_normal_(mu, cfg.lognormal_sigma, generator=gen))
    total = max(int(torch.poisson(torch.tensor([rate]), generator=gen)) + 1, cfg.min_recurrence)
    return max(total - s, 0), min(s, total)


def batch_rows(cfg: TrainConfig, tokenizer, step: int) -> list[tuple[list[int], list[int]]]:
    """The step's ``(prompt ids, answer ids + end-of-text)`` rows, drawn from the task mix (seeded by step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    mix = mix_at(cfg, step)
    tasks = list(mix)
    weights = torch.tensor([mix[t] for t in tasks])
    picks = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen).tolist()
    rows = []
    for task_index in sorted(set(picks)):
        count = picks.count(task_index)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        for problem in task_registry.sample(tasks[task_index], count, split="train", seed=seed):
            prompt = tokenizer.encode(problem.context)
            answer = tokenizer.encode(problem.completion) + [tokenizer.eos_token_id]
            rows.append((prompt, answer))
    return rows


def mix_at(cfg: TrainConfig, step: int) -> dict[str, float]:
    """The task mix of ``step``: the curriculum's phase that has started last, else ``task_mix``."""
    mix = cfg.task_mix
    for start, phase in cfg.curriculum:
        if step >= start * cfg.steps:
            mix = phase
    return mix


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` and next-token ``labels`` (-100 except on the answer and end-of-text)."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return ids, labels


def make_batch(cfg: TrainConfig, tokenizer, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch, right-padded to its longest row."""
    return pad_rows(batch_rows(cfg, tokenizer, step), tokenizer.pad_token_id)


def make_micro_batches(cfg: TrainConfig, tokenizer, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's batch as ``cfg.micro_batches`` groups of rows of similar length (sorted by length,
    each padded to its own longest row): the same examples with far less padding when lengths vary."""
    rows = sorted(batch_rows(cfg, tokenizer, step), key=lambda r: len(r[0]) + len(r[1]))
    size = math.ceil(len(rows) / cfg.micro_batches)
    return [pad_rows(rows[i : i + size], tokenizer.pad_token_id) for i in range(0, len(rows), size)]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(cfg: TrainConfig, model: RecurrentDepthLM) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name or "qk_bias" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, cfg.beta2),
    )


# ---- checkpoints: safetensors for tensors, JSON for the rest ---------------------------------------
def save_checkpoint(
    out: Path, model: RecurrentDepthLM, opt: torch.optim.AdamW, step: int, cfg: TrainConfig, log: list[dict]
) -> None:
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"opt.{names[id(p)]}.{key}"] = state[key].detach().clone()
            if "step" in state:
                tensors[f"opt.{names[id(p)]}.step"] = torch.as_tensor(state["step"]).reshape(1).float()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(ckpt / "state.safetensors.tmp"))
    (ckpt / "state.safetensors.tmp").replace(ckpt / "state.safetensors")
    meta = {"step": step, "train_config": asdict(cfg), "log": log}
    (ckpt / "progress.json.tmp").write_text(json.dumps(meta, indent=1))
    (ckpt / "progress.json.tmp").replace(ckpt / "progress.json")


def load_checkpoint(
    out: Path, model: RecurrentDepthLM, opt: torch.optim.AdamW, cfg: TrainConfig
) -> tuple[int, list[dict]]:
    ckpt = out / "checkpoint"
    if not (ckpt / "progress.json").is_file():
        return 0, []
    meta = json.loads((ckpt / "progress.json").read_text())
    if not isinstance(meta, dict) or meta.get("train_config") != json.loads(json.dumps(asdict(cfg))):
        raise InputError(
            f"{ckpt} was written with a different training config; use a fresh --out "
            "(or the same model, seed and steps as that run)"
        )
    tensors = load_file(str(ckpt / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if f"opt.{n}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": tensors[f"opt.{n}.step"].reshape(()),
                    "exp_avg": tensors[f"opt.{n}.exp_avg"],
                    "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"],
                }
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), list(meta["log"])


@torch.no_grad()
def quick_accuracy(
    model: RecurrentDepthLM,
    tokenizer,
    n: int = 256,
    num_steps: int | None = None,
    seed: int = 1234,
    eval_task: str = "arithmetic_1dc",
) -> float:
    """First-answer-token accuracy on validation problems of ``eval_task`` (a cheap training signal)."""
    problems = task_registry.sample(eval_task, n, split="validation", seed=seed)
    from lens.generation import pad_left

    ids, mask = pad_left([tokenizer.encode(p.context) for p in problems], tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    out = model(ids, num_steps=num_steps, attention_mask=mask, logits="last", generator=gen)
    predicted = out.logits[:, -1].argmax(-1).tolist()
    expected = [tokenizer.encode(p.completion)[0] for p in problems]
    return sum(int(a == b) for a, b in zip(predicted, expected, strict=True)) / n


class _StopOnInterrupt:
    """Turns Ctrl-C (SIGINT) into a request the loop honours between two steps, so the checkpoint it
    saves is exactly a step boundary; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def train(cfg: TrainConfig, out: Path, export: Path | None = None) -> RecurrentDepthLM:
    """Train (or resume) into ``out``; write the final model to ``out/model`` (and ``export``).

    Ctrl-C saves a checkpoint after the step in progress and raises :class:`TrainingInterrupted`
    (calling ``train`` again with the same config and ``out`` resumes with the same result).
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = RecurrentDepthLM(model_config(cfg, tokenizer), tokenizer=tokenizer)
    opt = make_optimizer(cfg, model)
    start, log = load_checkpoint(out, model, opt, cfg)
    model.train()
    last_save = time.monotonic()
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.name}", mininterval=5
    )
    depth_gen = torch.Generator().manual_seed(cfg.seed + 17)
    for _ in range(start):  # keep the depth sequence identical after a resume
        sample_depth(cfg, depth_gen)
    t0, cpu0 = time.monotonic(), time.process_time()
    with _StopOnInterrupt() as interrupt:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            if cfg.micro_batches == 1:
                groups = [make_batch(cfg, tokenizer, step)]
            else:
                groups = make_micro_batches(cfg, tokenizer, step)
            depth = sample_depth(cfg, depth_gen)
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            if cfg.micro_batches == 1:
                ids, labels = groups[0]
                out_ = model(ids, num_steps=depth, generator=gen)
                loss = F.cross_entropy(out_.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                loss_value = loss.item()
            else:  # the same mean loss over the batch's answer tokens, accumulated group by group
                n_targets = sum(int((labels != -100).sum()) for _, labels in groups)
                opt.zero_grad(set_to_none=True)
                loss_value = 0.0
                for ids, labels in groups:
                    out_ = model(ids, num_steps=depth, generator=gen)
                    loss = F.cross_entropy(
                        out_.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
                    )
                    (loss / n_targets).backward()
                    loss_value += loss.item() / n_targets
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            record = {"step": step + 1, "loss": round(loss_value, 5), "depth": sum(depth)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                model.eval()
                record["val_first_token_acc"] = quick_accuracy(model, tokenizer, eval_task=cfg.eval_task)
                model.train()
            log.append(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=log[-1].get("val_first_token_acc", ""))
            if (
                interrupt.requested
                or time.monotonic() - last_save > cfg.checkpoint_minutes * 60
                or step + 1 == cfg.steps
            ):
                save_checkpoint(out, model, opt, step + 1, cfg, log)
                last_save = time.monotonic()
            if interrupt.requested and step + 1 < cfg.steps:
                bar.close()
                raise TrainingInterrupted(
                    f"interrupted after step {step + 1} of {cfg.steps}; checkpoint saved in "
                    f"{out / 'checkpoint'}. Resume with the same command (same --model, --out, --seed, "
                    "--steps); the result is the same as an uninterrupted run."
                )
    model.eval()
    final = out / "model"
    lens.save_model(model, final)
    (final / "training_log.json").write_text(
        json.dumps(
            {
                "train_config": asdict(cfg),
                "log": log,
                "seconds_this_session": round(time.monotonic() - t0, 1),
                "cpu_seconds_this_session": round(time.process_time() - cpu0, 1),
            },
            indent=1,
        )
    )
    if export is not None:
        lens.save_model(model, export)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m studies.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny-arith", help="which recipe")
    parser.add_argument(
        "--out", type=Path, default=None, help="checkpoint directory (default: checkpoints/MODEL)"
    )
    parser.add_argument("--export", type=Path, default=None, help="also write the final model here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = preset(args.model, seed=args.seed, steps=args.steps)
    try:
        train(cfg, args.out or Path("checkpoints") / args.model, args.export)
    except LooplensError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
