"""Realistic synthetic runs, written through ``probes.store.Run``: the explorer's tests and benchmark use them.

The tables follow ``probes.records`` exactly as the arithmetic study writes them (last position
only, block outputs plus ``latent``/``final`` rows off the unrolled axis, the Coda Lens ending at
``latent``, top-5 tokens, answers
including depth-scaling rows, latent dynamics with verdicts). Numbers are drawn so the figures
look like a real study: the answer's rank falls over the iterations (earlier under the Coda
Lens), the intermediate result surfaces mid-way and fades, the control token stays far down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from probes.store import Run

PIECES = [
    " the",
    " of",
    " and",
    " to",
    " in",
    " number",
    " sum",
    " product",
    " result",
    " value",
    " two",
    " three",
    " four",
    " five",
    " six",
    " seven",
    " eight",
    " nine",
    " zero",
    " one",
    " answer",
    " so",
    " then",
    " first",
    " add",
    " minus",
    " times",
    " we",
    " it",
    "ation",
    "ist",
    " calc",
    " equal",
    " total",
    " digit",
    " step",
    " let",
    " now",
    " get",
    " find",
    " half",
    " twice",
    " more",
    " less",
    " left",
]
WORDS = [
    "Question",
    ":",
    " What",
    " is",
    " (",
    ")",
    " *",
    " +",
    " -",
    "?",
    "\n",
    "Answer",
    " the",
    " =",
    " a",
]


def vocabulary(size: int = 512) -> list[str]:
    """Tokens: spaced and bare digits, the prompt's words, then filler word pieces."""
    tokens = [f" {d}" for d in range(10)] + [str(d) for d in range(10)] + WORDS
    pieces = [p + q for p in PIECES for q in ("", "s", "ing", "ed", "er")]
    tokens += [pieces[i] if i < len(pieces) else f"w{i}" for i in range(size - len(tokens))]
    return tokens


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    c: int
    op1: str
    op2: str

    @property
    def intermediate(self) -> int:
        return _apply(self.a, self.op1, self.b)

    @property
    def answer(self) -> int:
        return _apply(self.intermediate, self.op2, self.c)

    @property
    def context(self) -> str:
        return f"What is ({self.a} {self.op1} {self.b}) {self.op2} {self.c}?"


def _apply(x: int, op: str, y: int) -> int:
    return x * y if op == "*" else x + y if op == "+" else x - y


def problems(n: int, seed: int = 0) -> list[Problem]:
    """One-digit composite problems whose intermediate result and answer are single digits."""
    rng = np.random.default_rng(seed)
    out: list[Problem] = []
    while len(out) < n:
        p = Problem(
            int(rng.integers(1, 10)),
            int(rng.integers(1, 10)),
            int(rng.integers(1, 10)),
            str(rng.choice(["*", "+", "-"])),
            str(rng.choice(["+", "-"])),
        )
        if 0 <= p.intermediate <= 9 and 0 <= p.answer <= 9:
            out.append(p)
    return out


def write_run(
    root: str | Path,
    name: str = "arith-small",
    *,
    n_prompts: int = 6,
    prelude: int = 1,
    core: int = 2,
    coda: int = 1,
    steps: int = 4,
    lenses: tuple[str, ...] = ("logit", "coda"),
    target_kinds: tuple[str, ...] = ("predicted", "final", "intermediate", "control"),
    vocab_size: int = 512,
    model_name: str = "tiny-arith",
    status: str = "complete",
    batches: int = 2,
    seed: int = 0,
    figures: bool = True,
) -> Path:
    """Write a run under ``root/name`` and return its path.

    ``status``: ``"complete"``, ``"running"`` (only the first of ``batches`` shards written, no
    figures) or ``"failed"``.
    """
    rng = np.random.default_rng(seed)
    vocab = vocabulary(vocab_size)
    probs = problems(n_prompts, seed)
    settings = {
        "study": "arithmetic",
        "task": "arithmetic_1dc",
        "n": n_prompts,
        "steps": steps,
        "batch_size": -(-n_prompts // batches),
        "seed": seed,
        "lenses": list(lenses),
        "control": " the",
        "depths": [1, 2, 4, steps],
    }
    manifest = {
        "model": {
            "name": model_name,
            "config_name": model_name,
            "parameters": 1_234_567,
            "dtype": "float32",
            "device": "cpu",
            "layout": {"prelude": prelude, "core": core, "coda": coda},
        },
        "config": {
            "n_embd": 64,
            "n_layers_in_prelude": prelude,
            "n_layers_in_recurrent_block": core,
            "n_layers_in_coda": coda,
            "mean_recurrence": steps,
            "vocab_size": vocab_size,
        },
        "prompt_template": {
            "name": "plain",
            "template": "Question: {question}\nAnswer:",
            "answer_prefix": "",
        },
        "settings": settings,
    }
    run = Run.create(root, name, manifest, resume=False, overwrite=True)
    texts = [f"Question: {p.context}\nAnswer:" for p in probs]
    run.write_shard(
        "prompts",
        0,
        pd.DataFrame(
            {
                "prompt_id": range(n_prompts),
                "task": "arithmetic_1dc",
                "context": [p.context for p in probs],
                "completion": [f" {p.answer}" for p in probs],
                "intermediate": [str(p.intermediate) for p in probs],
                "prompt_text": texts,
            }
        ),
    )
    size = -(-n_prompts // batches)
    written = batches if status != "running" else 1
    for b in range(written):
        ids = list(range(b * size, min(n_prompts, (b + 1) * size)))
        if not ids:
            continue
        tables = _batch_tables(
            rng, probs, ids, texts, vocab, prelude, core, coda, steps, lenses, target_kinds
        )
        for table, frame in tables.items():
            run.write_shard(table, b, frame)
    if status != "running":
        run.write_shard("answers", "depth", _depth_answers(rng, steps))
        if figures:
            _figures(run)
    if status == "complete":
        run.mark_complete()
    elif status == "failed":
        run.mark_failed("RuntimeError: out of memory in batch 3")
    return run.path


def _layers(prelude: int, core: int, coda: int, steps: int) -> pd.DataFrame:
    rows = [(f"prelude.{i}", 0, i) for i in range(prelude)]
    rows += [(f"core.{j}", t, j) for t in range(1, steps + 1) for j in range(core)]
    rows += [(f"coda.{i}", 0, i) for i in range(coda)]
    frame = pd.DataFrame(rows, columns=["site", "iteration", "block"])
    frame["unrolled_index"] = np.arange(len(frame))
    extra = pd.DataFrame(
        {"site": ["latent", "final"], "iteration": [steps, 0], "block": [-1, -1], "unrolled_index": [-1, -1]}
    )
    return pd.concat([frame, extra], ignore_index=True)


def _curve(
    kind: str, lens: str, depth: np.ndarray, correct: bool, V: int, rng: np.random.Generator
) -> np.ndarray:
    """log-rank along depth in [0, 1] (latent/final get depth 1)."""
    noise = rng.normal(0, 0.35, size=depth.shape)
    top = np.log(V / 3)
    centre = {"logit": 0.72, "coda": 0.42, "tuned": 0.5}.get(lens, 0.6) + rng.normal(0, 0.05)
    if kind in ("predicted", "final"):
        settle = 1 / (1 + np.exp(-(depth - centre) / 0.07))
        floor = 0.0 if (kind == "predicted" or correct) else np.log(3)
        return top * (1 - settle) + floor * settle + noise * (1 - settle)
    if kind in ("intermediate", "intermediate_alt"):
        bump = np.exp(-(((depth - centre + 0.15) / 0.12) ** 2))
        return top * (1 - 0.9 * bump) + 0.6 * noise + np.log(4) * (depth > centre)
    if kind == "control":
        return top - 0.5 + noise
    return top - 1 + 1.2 * noise  # digit baselines and others


def _batch_tables(rng, probs, ids, texts, vocab, prelude, core, coda, steps, lenses, target_kinds):
    V = len(vocab)
    layers = _layers(prelude, core, coda, steps)
    L = int((layers["unrolled_index"] >= 0).sum())
    depth = np.where(layers["unrolled_index"] >= 0, layers["unrolled_index"] / max(L - 1, 1), 1.0)
    pool = np.arange(20, V)  # prompt words and word pieces (no spaced digits)
    vocab_arr = np.array(vocab, dtype=object)
    ranks, topk, dyn, verdicts, answers = [], [], [], [], []
    for pid in ids:
        p = probs[pid]
        correct = pid % 5 != 3
        answer_id = p.answer  # " d" tokens are ids 0..9
        predicted_id = answer_id if correct else (answer_id + 1) % 10
        target_ids = {
            "predicted": predicted_id,
            "final": answer_id,
            "intermediate": p.intermediate,
            "intermediate_alt": 10 + p.intermediate,
            "control": vocab.index(" the"),
        }
        for d in range(10):
            target_ids[f"digit_{d}"] = d
        for lens in lenses:
            final_curve = None
            for kind in target_kinds:
                logr = _curve(
                    kind, lens, depth.to_numpy() if hasattr(depth, "to_numpy") else depth, correct, V, rng
                )
                rank = np.clip(np.round(np.exp(logr)), 1, V).astype(np.int64)
                if kind == "predicted":
                    rank[-1] = rank[-2] = 1  # latent / final rows: the model's own token is top-1
                    final_curve = rank
                logprob = -np.log(rank) - rng.uniform(0.05, 0.6, size=rank.shape)
                ranks.append(
                    pd.DataFrame(
                        {
                            "prompt_id": pid,
                            "position": -1,
                            **{c: layers[c].to_numpy() for c in layers},
                            "lens": lens,
                            "target_kind": kind,
                            "token_id": target_ids.get(kind, 0),
                            "token": vocab[target_ids.get(kind, 0)],
                            "rank": rank,
                            "logprob": logprob.astype(np.float32),
                            "entropy": (
                                np.log(V) * (0.2 + 0.8 * (1 - depth)) + rng.normal(0, 0.1, len(rank))
                            ).clip(0.01),
                            "kl_to_final": (4 * (1 - depth) ** 2 + rng.uniform(0, 0.05, len(rank))).astype(
                                np.float32
                            ),
                        }
                    )
                )
            # top-5 tokens: the predicted token once it is top-1, otherwise word pieces and prompt words
            if final_curve is None:
                final_curve = np.full(len(layers), 50)
            order = pool[np.argsort(rng.random((len(layers), len(pool))), axis=1)[:, :5]]
            settled = final_curve == 1
            order[settled, 0] = predicted_id
            lp = -np.sort(rng.uniform(0.05, 6, size=(len(layers), 5)), axis=1)
            lp[settled, 0] = -rng.uniform(0.01, 0.4, size=int(settled.sum()))
            topk.append(
                pd.DataFrame(
                    {
                        "prompt_id": pid,
                        "position": -1,
                        **{
                            c: np.repeat(layers[c].to_numpy(), 5)
                            for c in ("site", "iteration", "block", "unrolled_index")
                        },
                        "lens": lens,
                        "k": np.tile(np.arange(1, 6), len(layers)),
                        "token_id": order.ravel(),
                        "token": vocab_arr[order.ravel()],
                        "logprob": lp.ravel().astype(np.float32),
                    }
                )
            )
        # latent dynamics of the last core block: a damped spiral into a fixed point
        verdict = "fixed-point" if pid % 7 != 5 else ("cycle-2" if pid % 2 else "drift")
        t = np.arange(1, steps + 1)
        decay = np.exp(-0.35 * t) if verdict == "fixed-point" else 0.3 + 0.1 * np.cos(np.pi * t)
        step = 0.8 * decay * rng.uniform(0.8, 1.2)
        phase = rng.uniform(0, 2 * np.pi)
        radius = 6 * np.exp(-0.25 * t) + (0 if verdict == "fixed-point" else 1.5)
        dyn.append(
            pd.DataFrame(
                {
                    "prompt_id": pid,
                    "position": -1,
                    "site": f"core.{core - 1}",
                    "iteration": t,
                    "step_norm": np.where(t == 1, np.nan, step),
                    "cos_to_last": np.where(
                        t == steps, 1.0, 1 - rng.uniform(0.5, 0.8) * np.exp(-0.4 * (t - 1))
                    ),
                    "norm": 8 + rng.normal(0, 0.05, steps),
                    "pc1": radius * np.cos(phase + 0.9 * t),
                    "pc2": radius * np.sin(phase + 0.9 * t),
                    "pc3": 0.5 * radius * np.cos(0.5 * t),
                }
            )
        )
        verdicts.append({"prompt_id": pid, "position": -1, "site": f"core.{core - 1}", "verdict": verdict})
        answers.append(
            {
                "prompt_id": pid,
                "task": "arithmetic_1dc",
                "purpose": "probe",
                "num_steps": steps,
                "prompt": texts[pid],
                "expected": f" {p.answer}",
                "generated": f" {predicted_id}",
                "correct": correct,
                "first_token_id": predicted_id,
                "intermediate": str(p.intermediate),
            }
        )
    return {
        "ranks": _coda_lens_stops_at_latent(pd.concat(ranks, ignore_index=True)),
        "topk": _coda_lens_stops_at_latent(pd.concat(topk, ignore_index=True)),
        "dynamics": pd.concat(dyn, ignore_index=True),
        "verdicts": pd.DataFrame(verdicts),
        "answers": pd.DataFrame(answers),
    }


def _coda_lens_stops_at_latent(frame: pd.DataFrame) -> pd.DataFrame:
    """As a study records it: the Coda Lens decodes a state through the coda, so it has no rows at the
    coda blocks nor at ``final`` (at ``latent`` it already equals the model's output)."""
    site = frame["site"].astype(str)
    beyond = (frame["lens"] == "coda") & (site.str.startswith("coda.") | (site == "final"))
    return frame[~beyond].reset_index(drop=True)


def _depth_answers(rng: np.random.Generator, steps: int) -> pd.DataFrame:
    rows = []
    for task in ("arithmetic_1dc", "arithmetic_2da"):
        for depth in sorted({1, 2, 4, 8, steps}):
            p_correct = min(0.95, 0.1 + 0.2 * np.log2(depth) * (1.2 if task == "arithmetic_1dc" else 0.8))
            for i in range(10):
                rows.append(
                    {
                        # ids overlap the probed prompts' on purpose: readers go by the purpose column
                        "prompt_id": i,
                        "task": task,
                        "purpose": "depth",
                        "num_steps": depth,
                        "prompt": "Question: …\nAnswer:",
                        "expected": " 1",
                        "generated": " 1",
                        "correct": bool(rng.random() < p_correct),
                        "first_token_id": 1,
                    }
                )
    return pd.DataFrame(rows)


def _figures(run: Run) -> None:
    """A small PNG and HTML as the study would leave in ``figures/``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2.5), dpi=80)
    ax = fig.add_subplot()
    ax.plot([1, 2, 3, 4], [300, 40, 3, 1])
    ax.set_yscale("log")
    ax.set_title("rank of the answer")
    fig.savefig(run.figures_dir / "rank_trajectory.png")
    (run.figures_dir / "rank_trajectory.html").write_text("<html><body>figure</body></html>")


def corrupt_shard(run_path: str | Path, table: str = "ranks") -> Path:
    """Truncate the first shard of ``table`` (its checksum no longer matches); returns the file."""
    shard = sorted((Path(run_path) / table).glob("shard-*.parquet"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard
