"""The ``looplens`` command line: studies, training and evaluation of the embedded model, the explorer.

Every command prints a short summary and exits with status 2 and one clear line on bad input: a
``lens.errors.LooplensError`` (the common base of looplens's user errors) or an operating-system error on
a path the user gave (a read-only ``--out``, a missing file). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lens.errors import LooplensError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="looplens: probe latent reasoning in recurrent-depth language models.",
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"looplens {importlib.metadata.version('looplens')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """looplens: probe latent reasoning in recurrent-depth language models."""


def _fail(err: Exception) -> None:
    from rich.markup import escape

    # one line, never wrapped; messages may hold brackets (looplens[scale]) that are not markup
    console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def _user_errors() -> Iterator[None]:
    """One line for a user error (bad input, a damaged file, a path that cannot be written); bugs keep
    their traceback. ``ValueError`` is still caught while the library's last plain ``ValueError``s are
    converted to ``LooplensError`` subclasses."""
    try:
        yield
    except (LooplensError, ValueError) as err:
        _fail(err)
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        _fail(OSError(f"{err.strerror or err}{where}"))


def _check_device(device: str) -> None:
    import torch

    from lens.errors import InputError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu"
        )
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise InputError(f"--device {device!r}: use cpu or cuda (cuda:N)")


def _numbers(text: str, kind: type, option: str) -> list:
    from lens.errors import InputError

    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option} must be comma-separated numbers, got {text!r}") from None


@app.command(context_settings={"allow_extra_args": True})
def study(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(help="the study to run: arithmetic, chains, patching or sampler")
    ] = "arithmetic",
    model: Annotated[
        str | None,
        typer.Option(
            help="embedded model name or checkpoint directory (default: tiny-arith; chains: tiny-chains)"
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option(
            help="one-digit composite problems (arithmetic, default 100), problems per hop count (chains, "
            "60), prompt pairs (patching, 50) or prompts (sampler, 48)"
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="recurrent iterations (default 16; chains: the model's default; sampler: the reference)"
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="prompts per forward pass (default 25; chains 60)")
    ] = None,
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
    init_state: Annotated[
        str, typer.Option(help="patching: the loop's start, 'random' (seeded per pair) or 'zeros'")
    ] = "random",
    keep_incorrect: Annotated[
        bool, typer.Option(help="patching: keep prompt pairs the model answers wrongly (weak models)")
    ] = False,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="run shards on Ray: a local cluster, or the address given after --ray"),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (default: one per GPU, else per CPU)")
    ] = None,
    new_tokens: Annotated[
        int | None, typer.Option(help="sampler: tokens per prompt (>= 16; default 24 or the longest answer)")
    ] = None,
    thresholds: Annotated[str, typer.Option(help="sampler: exit thresholds (latent-diff)")] = "0.01,0.03,0.1",
    inner: Annotated[str, typer.Option(help="sampler: inner recurrences of the diffusion sampler")] = "2,4,8",
    headways: Annotated[str, typer.Option(help="sampler: headways of the diffusion sampler")] = "1,2,4",
    wavefront_n: Annotated[int, typer.Option(help="sampler: prompts whose wavefront is traced")] = 2,
    task: Annotated[
        str | None,
        typer.Option(
            help="sampler: arithmetic_1dc, … (default), or chains_2hop_trace (default for tiny-chains)"
        ),
    ] = None,
) -> None:
    """Run a batch study and write its run (tables + figures).

    ``arithmetic``: the latent chain-of-thought analysis. ``patching``: activation patching across
    iterations (operand pairs, state and re-injection sweeps, the chain-of-thought check). ``sampler``: autoregressive decoding (fixed depth,
    adaptive exit) against the diffusion sampler over its main settings (``--thresholds``, ``--inner``,
    ``--headways``), on ``--new-tokens`` long continuations.
    """
    from studies import STUDIES

    if name not in STUDIES:
        _fail(ValueError(f"unknown study {name!r}; available: {', '.join(STUDIES)}"))
    given = {"model": model, "n": n, "steps": steps, "batch_size": batch_size}
    with _user_errors():
        from lens.errors import InputError
        from lens.loading import resolve_dtype

        if depths is not None:
            try:
                given["depths"] = [int(x) for x in depths.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--depths must be integers separated by commas, got {depths!r}") from None
        _check_device(device)
        address, _ = _ray_address(ray, list(ctx.args))
        chains = name == "chains"
        common = dict(
            model=model or ("tiny-chains" if chains else "tiny-arith"),
            seed=seed,
            out=out,
            name=run_name,
            device=device,
            dtype=resolve_dtype(dtype),
            template=template,
            overwrite=overwrite,
            console=console,
        )
        if not chains or steps is not None:
            common["steps"] = 16 if steps is None else steps
        if name != "arithmetic" and (address is not None or workers is not None):
            raise InputError(
                f"--ray / --workers run the arithmetic study's shards; the {name} study runs in one process"
            )
        if name == "patching":
            STUDIES[name](
                **common, n=50 if n is None else n, init_state=init_state, keep_incorrect=keep_incorrect
            )
            return
        if name == "sampler":
            STUDIES[name](
                **common,
                batch_size=25 if batch_size is None else batch_size,
                n=48 if n is None else n,
                new_tokens=new_tokens,
                thresholds=_numbers(thresholds, float, "--thresholds"),
                inner=_numbers(inner, int, "--inner"),
                headways=_numbers(headways, int, "--headways"),
                wavefront_n=wavefront_n,
                task=task,
            )
            return
        optional = {k: v for k, v in given.items() if k in ("n", "batch_size", "depths") and v is not None}
        if chains:
            STUDIES[name](**common, **optional, tuned_lens=tuned_lens)
            return
        STUDIES[name](
            **common,
            n=optional.get("n", 100),
            batch_size=optional.get("batch_size", 25),
            tuned_lens=tuned_lens,
            depths=optional.get("depths", [1, 2, 4, 8, 16, 32, 64]),
            ray=address,
            num_workers=workers,
        )


def _ray_address(ray: bool, extra: list[str], prompts: str | None = None) -> tuple[str | None, str | None]:
    """``--ray`` alone is a local cluster; an argument right after it is the cluster's address."""
    if extra and not ray:
        raise typer.BadParameter(f"unexpected argument(s) {extra}")
    if len(extra) > 1:
        raise typer.BadParameter(f"--ray takes at most one address, got {extra}")
    if not ray:
        return None, prompts
    if not extra:
        return "local", prompts
    address = extra[0]
    if prompts is not None and not Path(prompts).exists() and Path(address).exists():
        address, prompts = prompts, address  # `--ray ADDRESS PROMPTS`
    return address, prompts


def _print_probe_summary(run, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"probe: {run.name}", show_lines=False)
    for col in (
        "lens",
        "target",
        "median rank (last layer)",
        "top-1 share",
        "median rank 1 from layer",
        "prompts",
    ):
        table.add_column(col)
    for row in summary["ranks"]:
        first = row["first_layer_median_rank_1"]
        table.add_row(
            row["lens"],
            row["target_kind"],
            f"{row['median_rank_last_layer']:g}",
            f"{row['top1_share_last_layer']:.1%}",
            "never" if first is None else f"{first + 1} of {row['layers']}",
            str(row["prompts"]),
        )
    console.print(table)
    console.print(
        f"prompts: {summary['prompts']} ({summary['probed']} probed, {summary['errors']} with an error)"
        + (
            f"  ·  mean iterations used: {summary['mean_steps_used']}"
            if summary.get("mean_steps_used")
            else ""
        )
    )
    for err in summary["first_errors"]:
        console.print(f"  prompt {err['prompt_id']}: {err['error']}")
    shards = summary["shards"]
    console.print(
        f"shards: {shards['computed']} computed, {shards['resumed']} resumed  ·  "
        f"{shards['workers']} worker(s) ({shards['backend']})  ·  time: {summary['seconds']:.0f} s"
    )
    if summary["figures"]:
        console.print(f"figures: {run.figures_dir}")
    console.print(f"explore: looplens explore {run.path.parent}")


def _split_list(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _parse_positions(text: str) -> str | list[int]:
    if text in ("last", "all"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--positions is last, all or a comma-separated list of ints, not {text!r}"
        ) from None


@app.command(context_settings={"allow_extra_args": True})
def probe(
    ctx: typer.Context,
    prompts: Annotated[
        str,
        typer.Argument(help="prompt file (.jsonl, .json, .csv, .parquet) or a saved Hugging Face dataset"),
    ],
    model: Annotated[str, typer.Option(help="embedded model name or checkpoint directory")] = "tiny-arith",
    lens: Annotated[
        list[str] | None,
        typer.Option("--lens", help="lenses: logit, coda, tuned=DIR (repeat or comma-separate)"),
    ] = None,
    site: Annotated[
        list[str] | None, typer.Option("--site", help="sites to decode (default: every block, latent, final)")
    ] = None,
    positions: Annotated[str, typer.Option(help="last, all, or positions within each prompt: 0,-1")] = "last",
    steps: Annotated[int | None, typer.Option(help="recurrent iterations (the cap with --adaptive)")] = None,
    adaptive: Annotated[
        str | None,
        typer.Option(help="adaptive depth: exit criterion kl, cosine, latent-diff, entropy-diff, …"),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="the exit criterion's threshold")] = None,
    chat: Annotated[bool, typer.Option(help="wrap each prompt in the model's chat template")] = False,
    system: Annotated[str | None, typer.Option(help="system message with --chat")] = None,
    topk: Annotated[int, typer.Option(help="best tokens kept per lens and layer (0-10)")] = 5,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 16,
    shard_size: Annotated[
        int, typer.Option(help="prompts per shard (the unit of resume and of a Ray task)")
    ] = 256,
    seed: Annotated[int, typer.Option(help="seed of the random initial states")] = 0,
    init_state: Annotated[str | None, typer.Option(help="random (default) or zeros")] = None,
    dynamics: Annotated[bool, typer.Option(help="record latent dynamics")] = True,
    prompt_column: Annotated[str, typer.Option(help="column holding the prompt text")] = "prompt",
    split: Annotated[str | None, typer.Option(help="split of a saved DatasetDict")] = None,
    out: Annotated[Path, typer.Option(help="directory holding runs")] = Path("runs"),
    run_name: Annotated[str | None, typer.Option("--name", help="run name (default: derived)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16")] = None,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="run shards on Ray: a local cluster, or the address given after --ray"),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (default: one per GPU, else per CPU)")
    ] = None,
    figures: Annotated[bool, typer.Option(help="draw the standard figures")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of other settings")] = False,
) -> None:
    """Probe your own prompts: rank trajectories, top-k, dynamics and figures in a resumable run."""
    from probes.dataset import probe_dataset
    from studies.figures.runs import render_probe_figures

    with _user_errors():
        _check_device(device)
        address, prompts = _ray_address(ray, list(ctx.args), prompts)
        run = probe_dataset(
            prompts,
            model,
            out=out,
            name=run_name,
            lenses=_split_list(lens) or ["logit", "coda"],
            sites=_split_list(site),
            positions=_parse_positions(positions),
            num_steps=steps,
            exit_criterion=adaptive,
            exit_threshold=threshold,
            chat=chat,
            system=system,
            topk=topk,
            batch_size=batch_size,
            shard_size=shard_size,
            seed=seed,
            init_state=init_state,
            dynamics=dynamics,
            prompt_column=prompt_column,
            split=split,
            device=device,
            dtype=dtype,
            ray=address,
            num_workers=workers,
            overwrite=overwrite,
            figures=render_probe_figures if figures else None,
        )
    import json

    _print_probe_summary(run, json.loads((run.path / "summary.json").read_text(encoding="utf-8")))


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

    tiny-arith took 29.8 min and tiny-chains 33.5 CPU-minutes, one thread each, on a 2-core CPU machine.
    """
    from studies.training import TrainingInterrupted, preset
    from studies.training import train as run_training

    out = out or Path("checkpoints") / model
    with _user_errors():  # a mismatched --out, a read-only folder: one line
        try:
            run_training(preset(model, seed=seed, steps=steps), out, export)
        except TrainingInterrupted as stop:
            console.print(f"[bold yellow]stopped:[/] {stop}", soft_wrap=True)
            console.print(
                f"resume: looplens train --model {model} --out {out} --seed {seed}"
                + (f" --steps {steps}" if steps is not None else ""),
                soft_wrap=True,
            )
            raise typer.Exit(code=130) from None
        except KeyboardInterrupt:
            console.print("[bold yellow]stopped[/] before the first training step; nothing to save")
            raise typer.Exit(code=130) from None
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
            help="problems per task, every task (default: the card's counts: 400 per arithmetic task and "
            "the whole held-out split of 1,870 for arithmetic_1dc; 300 per chains task)"
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
    from studies.evaluation import run_evaluation
    from studies.tasks import resolve_tasks

    with _user_errors():
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


@app.command("tuned-lens")
def tuned_lens_cmd(
    model: Annotated[str, typer.Option(help="embedded model name or checkpoint directory")] = "tiny-arith",
    steps: Annotated[int, typer.Option(help="recurrent iterations")] = 16,
    n: Annotated[int, typer.Option(help="prompts (a quarter held out)")] = 200,
    epochs: Annotated[int, typer.Option(help="passes over the training prompts")] = 30,
    save: Annotated[Path | None, typer.Option(help="directory to save the lenses")] = None,
) -> None:
    """Train Tuned Lenses (shared and per-iteration) and print held-out KL against the Logit Lens."""
    from studies.tuned import train_tuned_lenses

    with _user_errors():
        train_tuned_lenses(model, steps, n, epochs, save, console)


@app.command()
def explore(
    runs: Annotated[Path, typer.Argument(help="directory holding runs")] = Path("runs"),
    model: Annotated[str, typer.Option(help="model for the live probe")] = "tiny-arith",
    port: Annotated[int, typer.Option(help="TCP port of the server", min=1, max=65535)] = 8501,
    host: Annotated[str, typer.Option(help="bind address (localhost only by default)")] = "127.0.0.1",
) -> None:
    """Start the Streamlit explorer on localhost."""
    from importlib.util import find_spec

    if not runs.is_dir():
        _fail(FileNotFoundError(f"runs folder {runs} does not exist (run a study first, or pass the folder)"))

    spec = find_spec("app.main")
    script = Path(spec.origin)  # type: ignore[union-attr, arg-type]
    options = {
        "server.address": host,
        "server.port": str(port),
        "server.headless": "true",
        "browser.gatherUsageStats": "false",
        "client.toolbarMode": "minimal",
        # No source watcher: it exists to reload the app when its code is edited, and it costs every new
        # browser session a scan of all of sys.modules (torch, pandas, ...: ~0.5 s of the server's event
        # loop on each full page load, measured with py-spy on a 2-core machine).
        "server.fileWatcherType": "none",
        # No forced full garbage collection after every script run (Streamlit's default): with torch,
        # pandas and plotly loaded the heap holds ~450,000 objects and ``gc.collect(2)`` took 0.23 CPU s
        # per rerun, more than the rerun itself (a toggle, a tab: py-spy, 2-core machine). Python's own
        # generational collector still runs; the warm-up freezes the start-up objects out of it.
        "runner.postScriptGC": "false",
    }
    argv = ["run", str(script), *[f"--{k}={v}" for k, v in options.items()], "--", "--runs", str(runs)]
    argv += ["--model", model]
    console.print(f"looplens explorer on http://{host}:{port}  (runs: {runs})")
    sys.stdout.flush()
    import threading

    from streamlit.web import cli as streamlit_cli

    # The server answers at once; meanwhile this thread pays the one-time costs (imports, the live
    # model, the reference study's tables) so that the first page a browser opens is already warm.
    threading.Thread(target=_warm_explorer, args=(model,), name="warm-explorer", daemon=True).start()
    streamlit_cli.main(args=argv, prog_name="streamlit", standalone_mode=True)


def _warm_explorer(model: str) -> None:
    """Import what every page needs and load the live model (in the server's process, shared caches)."""
    import gc
    import logging

    try:
        from app import charts, data, live, sections  # noqa: F401
        from app.reference import ReferenceRun
        from studies import figures  # noqa: F401

        ReferenceRun.get()
        live.cached_model(model)
        # Modules, the model and the reference tables live as long as the server: move them out of the
        # collector's generations (``gc.freeze``) so that its automatic full collections stay cheap.
        gc.collect()
        gc.freeze()
    except Exception:  # noqa: BLE001 - a warm-up failure is shown by the page that needs it
        logging.getLogger("looplens.app").debug("warm-up failed", exc_info=True)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt text (or token ids with --ids: '5 17 300')")],
    model: Annotated[str, typer.Option(help="embedded model name or checkpoint directory")] = "tiny-arith",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 16,
    steps: Annotated[int | None, typer.Option(help="iterations (diffusion: the prefill's depth)")] = None,
    sampler: Annotated[str, typer.Option(help="autoregressive or diffusion")] = "autoregressive",
    ids: Annotated[bool, typer.Option(help="the prompt is space-separated token ids")] = False,
    exit_criterion: Annotated[
        str | None, typer.Option(help="autoregressive: kl, minp-kl, entropy-diff, latent-diff, cosine, …")
    ] = None,
    exit_threshold: Annotated[
        float | None, typer.Option(help="autoregressive: the criterion's threshold")
    ] = None,
    cache_lookup_strategy: Annotated[
        str | None, typer.Option(help="full, latest-m4, deepest, …-compress-s4, …-compress")
    ] = None,
    warm_start: Annotated[bool, typer.Option(help="autoregressive: continuous compute")] = False,
    headway: Annotated[int, typer.Option(help="diffusion: new positions per step")] = 1,
    inner_recurrence: Annotated[int, typer.Option(help="diffusion: core iterations per step")] = 4,
    freeze_strategy: Annotated[
        str, typer.Option(help="diffusion: latent-diff, token-stability, fixed, …")
    ] = ("latent-diff"),
    exit_t: Annotated[float, typer.Option(help="diffusion: latent convergence threshold")] = 0.03,
    max_wavefront: Annotated[
        int, typer.Option(help="diffusion: most positions in the window (0: none)")
    ] = 128,
    init_scale: Annotated[
        float, typer.Option(help="diffusion: scale of random initial states (0: zeros)")
    ] = 1.0,
    state_noise_mixing: Annotated[
        float, typer.Option(help="diffusion: noise mixed into states per step")
    ] = 0.5,
    ema_embeds: Annotated[float, typer.Option(help="diffusion: moving average of prelude outputs")] = 0.1,
    continuous_compute: Annotated[
        bool, typer.Option(help="diffusion: new positions copy the last states")
    ] = (False),
    full_prefill: Annotated[
        bool, typer.Option(help="diffusion: run the prompt once at --steps first")
    ] = True,
    faithful: Annotated[
        bool, typer.Option(help="diffusion: reproduce the original's defects (see docs)")
    ] = True,
    seed: Annotated[int, typer.Option(help="seed of random states and guesses")] = 0,
) -> None:
    """Generate a continuation autoregressively (fixed or adaptive depth) or with the diffusion sampler."""
    import torch

    import lens
    from lens.errors import InputError

    with _user_errors():
        net = lens.load_model(model)
        if ids:
            try:
                prompts: list = [[int(t) for t in prompt.split()]]
            except ValueError:
                raise InputError(
                    f"--ids: the prompt must be space-separated integers, got {prompt!r}"
                ) from None
        else:
            prompts = [prompt]
        given = {
            "--exit-criterion": exit_criterion,
            "--exit-threshold": exit_threshold,
            "--warm-start": warm_start,
        }
        if sampler == "diffusion" and any(given.values()):
            named = ", ".join(k for k, v in given.items() if v)
            raise InputError(f"{named}: an autoregressive option, not one of the diffusion sampler")
        diffusion_only = {
            "--headway": headway != 1,
            "--inner-recurrence": inner_recurrence != 4,
            "--freeze-strategy": freeze_strategy != "latent-diff",
            "--exit-t": exit_t != 0.03,
            "--max-wavefront": max_wavefront != 128,
            "--init-scale": init_scale != 1.0,
            "--state-noise-mixing": state_noise_mixing != 0.5,
            "--ema-embeds": ema_embeds != 0.1,
            "--continuous-compute": continuous_compute,
            "--no-full-prefill": not full_prefill,
            "--no-faithful": not faithful,
        }
        if sampler != "diffusion" and any(diffusion_only.values()):
            named = ", ".join(k for k, v in diffusion_only.items() if v)
            raise InputError(f"{named}: an option of the diffusion sampler; add --sampler diffusion")
        if sampler == "diffusion":
            res = net.generate(
                prompts,
                max_new_tokens,
                steps,
                sampler="diffusion",
                cache_lookup_strategy=cache_lookup_strategy,
                headway=headway,
                inner_recurrence=inner_recurrence,
                freeze_strategy=freeze_strategy,
                exit_t=exit_t,
                max_wavefront=max_wavefront,
                init_scale=init_scale,
                state_noise_mixing=state_noise_mixing,
                ema_embeds=ema_embeds,
                continuous_compute=continuous_compute,
                full_prefill=full_prefill,
                faithful=faithful,
                seed=seed,
            )
        else:
            res = net.generate(
                prompts,
                max_new_tokens,
                steps,
                sampler=sampler,
                exit_criterion=exit_criterion,
                exit_threshold=exit_threshold,
                cache_lookup_strategy=cache_lookup_strategy,
                warm_start=warm_start,
                generator=torch.Generator().manual_seed(seed),
            )
    text = res.texts[0] if res.texts is not None else " ".join(map(str, res.tokens[0]))
    console.print(text, markup=False, highlight=False)
    used = res.steps_used[0]
    console.print(
        f"[dim]{len(res.tokens[0])} tokens ({res.stopped[0]}); iterations per token: "
        f"mean {sum(used) / max(len(used), 1):.1f}, min {min(used, default=0)}, max {max(used, default=0)}[/]"
    )
    if sampler == "diffusion":
        stats = res.stats[0]
        console.print(
            f"[dim]diffusion steps {stats.diffusion_steps}, model calls {stats.model_calls}, core forward "
            f"passes {stats.num_core_forward_passes}, tokens forwarded {stats.num_tokens_forward}, cache clears "
            f"{stats.num_cache_clears}, standing waves {stats.num_standing_waves}[/]"
        )


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="embedded model name or checkpoint directory")] = "tiny-arith",
) -> None:
    """Print a model's family, unrolled layout, size and the lenses that apply."""
    import lens

    with _user_errors():
        m = lens.load_model(model)
    cfg, layout = m.config, m.layout
    console.print(
        f"{cfg.name} ({layout.family} family): {m.num_parameters():,} parameters, width {cfg.n_embd}, "
        f"{cfg.n_heads} heads; vocabulary {cfg.vocab_size}"
    )
    console.print(f"layout: {layout.describe()}, T = {m.default_steps} by default")
    console.print(f"sites: {layout.describe_sites()}")
    decode = "final norm → head" if not layout.coda else "coda → final norm → head"
    if layout.coda and layout.latent_norm:
        decode = "final norm → " + decode
    console.print(f"decoding a state: {decode}; fed back between iterations: {layout.feedback}")
    missing = "" if layout.coda else " (no coda: the Coda Lens does not apply)"
    console.print(f"lenses that apply: {', '.join(layout.lenses())}{missing}")
    if layout.exit_gate:
        console.print("exit gate: λ_t recorded per iteration; exit modes threshold / step / weighted")


if __name__ == "__main__":
    app()
