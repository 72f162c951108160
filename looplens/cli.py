"""The ``looplens`` command line: studies, training and evaluation of the embedded model, the explorer.

Every command prints a short summary and exits non-zero with one clear line on bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="looplens: probe latent reasoning in recurrent-depth language models.",
)
console = Console()

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {name!r}; choose from {sorted(set(DTYPES.values()))}")
    return getattr(torch, DTYPES[name])


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)  # one line; the terminal wraps it
    raise typer.Exit(code=2)


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="the study to run: arithmetic or chains")] = "arithmetic",
    model: Annotated[
        str | None,
        typer.Option(help="embedded model name or checkpoint directory (default: tiny-arith / tiny-chains)"),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option(help="problems to probe (arithmetic: 100 one-digit composite; chains: 60 per hops)"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="recurrent iterations (arithmetic: 16; chains: the model's default)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="prompts per forward pass")] = None,
    seed: Annotated[int, typer.Option(help="seed for problems and initial states")] = 0,
    out: Annotated[Path, typer.Option(help="directory holding runs")] = Path("runs"),
    run_name: Annotated[str | None, typer.Option("--name", help="run name (default: derived)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16")] = None,
    template: Annotated[str | None, typer.Option(help="chat, plain, or a template with {question}")] = None,
    tuned_lens: Annotated[bool, typer.Option(help="train and add a Tuned Lens")] = True,
    depths: Annotated[
        str | None,
        typer.Option(
            help="iterations for the depth-scaling figure (arithmetic: 1,2,4,8,16,32,64; chains: powers of "
            "two up to 4x the default depth, and the default depth)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of other settings")] = False,
) -> None:
    """Run a batch study and write its run (tables + figures)."""
    from lens.errors import LooplensError
    from studies import STUDIES

    if name not in STUDIES:
        _fail(ValueError(f"unknown study {name!r}; available: {', '.join(STUDIES)}"))
    given = {"model": model, "n": n, "steps": steps, "batch_size": batch_size}
    if depths is not None:
        try:
            given["depths"] = [int(x) for x in depths.split(",") if x.strip()]
        except ValueError:
            _fail(ValueError(f"--depths must be integers separated by commas, got {depths!r}"))
    try:
        STUDIES[name](
            **{k: v for k, v in given.items() if v is not None},
            seed=seed,
            out=out,
            name=run_name,
            device=device,
            dtype=_dtype(dtype),
            template=template,
            tuned_lens=tuned_lens,
            overwrite=overwrite,
            console=console,
        )
    except (LooplensError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        _fail(err)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="which embedded model's recipe: tiny-arith or tiny-chains")] = (
        "tiny-arith"
    ),
    out: Annotated[
        Path | None,
        typer.Option(
            help="checkpoint directory, resumed if it holds a checkpoint (default: checkpoints/MODEL)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the whole run (data, initialisation, depths)")] = 0,
    steps: Annotated[int | None, typer.Option(help="override the recipe's number of steps")] = None,
    export: Annotated[Path | None, typer.Option(help="also write the final model here")] = None,
) -> None:
    """Train an embedded model from scratch (reproducible from its seed; Ctrl-C saves a checkpoint).

    tiny-arith took 29.8 min and tiny-chains about 60 min, one thread each, on a 2-core CPU machine.
    """
    from lens.errors import LooplensError
    from studies.training import TrainingInterrupted, preset
    from studies.training import train as run_training

    out = out or Path("checkpoints") / model
    try:
        cfg = preset(model, seed=seed, steps=steps)
        run_training(cfg, out, export)
    except TrainingInterrupted as stop:
        console.print(f"[bold yellow]stopped:[/] {stop}")
        console.print(
            f"resume: looplens train --model {model} --out {out} --seed {seed}"
            + (f" --steps {steps}" if steps is not None else "")
        )
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:
        console.print("[bold yellow]stopped[/] before the first training step; nothing to save")
        raise typer.Exit(code=130) from None
    except LooplensError as err:
        _fail(err)
    console.print(f"model written to {out / 'model'}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="embedded model name or checkpoint directory")] = "tiny-arith",
    depths: Annotated[
        str,
        typer.Option(
            help="iterations to evaluate (default: powers of two up to 4x the model's default depth, and the "
            "default depth)"
        ),
    ] = "",
    n: Annotated[
        int | None,
        typer.Option(
            help="problems per task, every task (default: 400, and the whole held-out split of 1,870 for "
            "arithmetic_1dc, as the tiny-arith card)"
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="a task family (arithmetic, chains) or task names separated by commas "
            "(default: the model's own family)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="directory holding runs")] = Path("runs"),
    seed: Annotated[int, typer.Option(help="seed of the problem sample and initial states")] = 0,
    card: Annotated[bool, typer.Option(help="rewrite the accuracy table of the model card")] = False,
) -> None:
    """Exact-match accuracy per task format and number of iterations, written as a run with a figure."""
    from lens.errors import LooplensError
    from studies.evaluation import run_evaluation
    from studies.tasks import resolve_tasks

    try:
        run_evaluation(
            model,
            [int(x) for x in depths.split(",") if x.strip()] or None,
            n=n,
            out=out,
            seed=seed,
            card=card,
            console=console,
            tasks=resolve_tasks(tasks) if tasks else None,
        )
    except (LooplensError, ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command("tuned-lens")
def tuned_lens_cmd(
    model: Annotated[str, typer.Option()] = "tiny-arith",
    steps: Annotated[int, typer.Option(help="recurrent iterations")] = 16,
    n: Annotated[int, typer.Option(help="prompts (a quarter held out)")] = 200,
    epochs: Annotated[int, typer.Option()] = 30,
    save: Annotated[Path | None, typer.Option(help="directory to save the lenses")] = None,
) -> None:
    """Train Tuned Lenses (shared and per-iteration) and print held-out KL against the Logit Lens."""
    from studies.tuned import train_tuned_lenses

    try:
        train_tuned_lenses(model, steps, n, epochs, save, console)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command()
def explore(
    runs: Annotated[Path, typer.Argument(help="directory holding runs")] = Path("runs"),
    model: Annotated[str, typer.Option(help="model for the live probe")] = "tiny-arith",
    port: Annotated[int, typer.Option()] = 8501,
    host: Annotated[str, typer.Option(help="bind address (localhost only by default)")] = "127.0.0.1",
) -> None:
    """Start the Streamlit explorer on localhost."""
    from importlib.util import find_spec

    spec = find_spec("app.main")
    script = Path(spec.origin)  # type: ignore[union-attr, arg-type]
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--runs",
        str(runs),
        "--model",
        model,
    ]
    console.print(f"looplens explorer on http://{host}:{port}  (runs: {runs})")
    sys.stdout.flush()
    os.execv(sys.executable, cmd)  # become the server: signals reach Streamlit directly


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="embedded model name or checkpoint directory")] = "tiny-arith",
) -> None:
    """Print a model's architecture and size."""
    import lens

    try:
        m = lens.load_model(model)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        _fail(err)
    cfg = m.config
    console.print(f"{cfg.name}: {m.num_parameters():,} parameters, width {cfg.n_embd}, {cfg.n_heads} heads")
    console.print(
        f"prelude {cfg.n_layers_in_prelude} · core {cfg.n_layers_in_recurrent_block} × "
        f"{cfg.mean_recurrence} (mean) · coda {cfg.n_layers_in_coda}; vocabulary {cfg.vocab_size}"
    )


if __name__ == "__main__":
    app()
