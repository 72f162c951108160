"""The record schema: what one row of each table a study writes means, as Arrow schemas.

Every analyzer emits tidy rows; the run store (``probes.store``) only accepts tables that pass
``to_table``, so the explorer, the studies and DuckDB queries can rely on column names, types and
the few invariants checked here (ranks start at 1, sites follow the model's site grammar, …).

Tables (one row is …):

- ``ranks``: one prompt × position × site × iteration × lens × target token.
- ``topk``: one of the ``k`` best tokens of a lens at one prompt × position × site × iteration.
- ``answers``: one prompt's generated answer and whether it is correct; ``purpose`` says why it was
  generated (``probe``: a probed prompt at the probed depth, ``depth``: the depth-scaling sample,
  ``eval``: an evaluation run), so no reader decodes it from prompt ids.
- ``dynamics``: one latent state's movement (step norm, cosine to the last iteration, PCA).
- ``prompts``: one prompt as it was built from a task.
- ``linear_probes``: one linear probe's held-out accuracy at one site × iteration.
- ``exit_gate``: one exit-gate reading (λ_t, p_t, cumulative) at one prompt × position × iteration
  (exit-gated families: Ouro).
- ``patching``: one patched forward pass (exact) or its gradient estimate (attribution): a prompt pair
  × experiment × direction × site × iteration × position, with the answers' logit difference, ranks
  and probabilities and the patched run's top tokens (``probes.patching``).
- ``patch_pairs``: one prompt pair of a patching experiment and its unpatched clean and corrupted runs.
- ``prompt_meta``: one input prompt of ``looplens probe``: its token count, depth, targets and
  metadata as given, or why it could not be probed.

Records are checked where they are made (``records``: the probes, the answer evaluation and the
studies return frames that passed it) and again when a run stores them (``to_table``).

Example:
    >>> table = to_table("prompts", [{"run": "r", "prompt_id": 0, "task": "add", "context": "2+3",
    ...                               "completion": "5", "prompt_text": "Q: 2+3\\nA:"}])
    >>> table.num_rows, table.schema.field("intermediate").nullable
    (1, True)
    >>> records("prompts", [{"prompt_id": 0, "task": "add", "context": "2+3", "completion": "5",
    ...                      "prompt_text": "Q: 2+3\\nA:"}]).dtypes["prompt_id"]
    dtype('int64')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lens.layout import SITE_PATTERN

__all__ = [
    "DIRECTIONS",
    "METHODS",
    "OUTCOMES",
    "PURPOSES",
    "SCHEMAS",
    "SITE_PATTERN",
    "TABLE_DOCS",
    "records",
    "to_table",
]

#: Why an answer was generated (the ``purpose`` column of ``answers``).
PURPOSES = ("probe", "depth", "eval")
#: Patching directions: clean states into the corrupted run (denoise) or corrupted into the clean (noise).
DIRECTIONS: tuple[Literal["denoise", "noise"], ...] = ("denoise", "noise")
#: How a patching row was obtained: a patched forward pass, or the gradient (attribution) estimate.
METHODS = ("exact", "attribution")
#: The patched run's top-1 token: the recipient's own answer, the source's, the hypothesis's, another.
OUTCOMES = ("base", "source", "follow", "other")


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


_RUN = _f("run", pa.string(), "name of the run that wrote the row")
_PROMPT = _f("prompt_id", pa.int64(), "prompt index within the run (joins to prompts/answers)")
_POSITION = _f("position", pa.int32(), "token position in the prompt; -1 means the last token")
_SITE = _f("site", pa.string(), "embed, prelude.i, adapter, core.j, latent, coda.i or final")
_ITERATION = _f("iteration", pa.int32(), "0 for non-recurrent sites, 1..T for adapter/core, T for latent")
_BLOCK = _f("block", pa.int32(), "block index within its stage; -1 where the site is not a block")
_UNROLLED = _f(
    "unrolled_index", pa.int32(), "prelude blocks, then core blocks t-major, then coda; -1 off-block"
)
_LENS = _f("lens", pa.string(), "decoder applied to the state: logit, coda, tuned")
_TOKEN_ID = _f("token_id", pa.int64(), "vocabulary id")
_TOKEN = _f("token", pa.string(), "decoded text of token_id")
_LOGPROB = _f("logprob", pa.float32(), "log-probability of the token under the lens")
_TASK = _f("task", pa.string(), "task family the prompt was drawn from")
_INTERMEDIATE = _f("intermediate", pa.string(), "intermediate result of the task, if any", nullable=True)

_PAIR = _f("pair_id", pa.int64(), "prompt pair index within the run (joins patching to patch_pairs)")
_EXPERIMENT = _f("experiment", pa.string(), "which patching experiment the pair belongs to")

_STATE_KEY = [_RUN, _PROMPT, _POSITION, _SITE, _ITERATION]
_LENS_KEY = [*_STATE_KEY, _BLOCK, _UNROLLED, _LENS]

TABLE_DOCS: dict[str, str] = {
    "ranks": "one prompt × position × site × iteration × lens × target token",
    "topk": "one of the k best tokens of a lens at one prompt × position × site × iteration",
    "answers": "one prompt's generated answer and whether it is correct",
    "dynamics": "one latent state's movement across iterations",
    "prompts": "one prompt as built from its task",
    "verdicts": "one latent trajectory's classification (fixed point, cycle, drift)",
    "linear_probes": "one linear probe: a target read from one site × iteration at one anchor position",
    "exit_gate": "one exit-gate reading at one prompt × position × iteration",
    "patching": "one patched run: prompt pair × experiment × direction × method × site × iteration × position",
    "patch_pairs": "one prompt pair of a patching experiment and its unpatched runs",
    "wavefront": "one diffusion-sampler window position at one step × site × iteration × lens",
    "sampler": "one prompt generated by one sampler setting",
    "prompt_meta": "one input prompt's token count, depth, targets and metadata, or why it was not probed",
}

_FIELDS: dict[str, list[pa.Field]] = {
    "ranks": [
        *_LENS_KEY,
        _f("target_kind", pa.string(), "final, intermediate, control, digit_baseline or id"),
        _TOKEN_ID,
        _TOKEN,
        _f("rank", pa.int64(), "1 + number of tokens with a strictly larger logit (1 = top)"),
        _LOGPROB,
        _f("entropy", pa.float32(), "entropy (nats) of the lens distribution"),
        _f("kl_to_final", pa.float32(), "KL(final ‖ lens) in nats", nullable=True),
    ],
    "topk": [
        *_LENS_KEY,
        _f("k", pa.int8(), "place among the top tokens, 1 = best"),
        _TOKEN_ID,
        _TOKEN,
        _LOGPROB,
    ],
    "answers": [
        _RUN,
        _PROMPT,
        _TASK,
        _f("purpose", pa.string(), "probe (a probed prompt), depth (depth-scaling sample) or eval"),
        _f("num_steps", pa.int32(), "recurrent iterations used for generation"),
        _f("prompt", pa.string(), "the prompt text fed to the model"),
        _f("expected", pa.string(), "the correct answer"),
        _f("generated", pa.string(), "what the model produced"),
        _f("correct", pa.bool_(), "whether generated matches expected"),
        _f("first_token_id", pa.int64(), "id of the first generated token"),
        _INTERMEDIATE,
    ],
    "dynamics": [
        *_STATE_KEY,
        _f("step_norm", pa.float32(), "‖h_t − h_{t−1}‖ / ‖h_t‖; null at t = 1", nullable=True),
        _f("cos_to_last", pa.float32(), "cosine similarity to the last iteration's state"),
        _f("norm", pa.float32(), "‖h_t‖"),
        _f("pc1", pa.float32(), "first principal component of the latent trajectory", nullable=True),
        _f("pc2", pa.float32(), "second principal component", nullable=True),
        _f("pc3", pa.float32(), "third principal component", nullable=True),
    ],
    "verdicts": [
        _RUN,
        _PROMPT,
        _POSITION,
        _SITE,
        _f("verdict", pa.string(), "fixed-point, cycle-k or drift"),
    ],
    "linear_probes": [
        _RUN,
        _TASK,
        _f("target", pa.string(), "what the probe reads, e.g. value_2 (the chain's third value)"),
        _f(
            "anchor",
            pa.string(),
            "where in each prompt: last (token) or statement (of the target's variable)",
        ),
        _SITE,
        _ITERATION,
        _UNROLLED,
        _f("train_accuracy", pa.float32(), "accuracy on the probe's training prompts"),
        _f("test_accuracy", pa.float32(), "accuracy on held-out prompts"),
        _f("majority_baseline", pa.float32(), "held-out accuracy of always answering the commonest label"),
        _f("n_train", pa.int32(), "training prompts"),
        _f("n_test", pa.int32(), "held-out prompts"),
    ],
    "exit_gate": [
        _RUN,
        _PROMPT,
        _POSITION,
        _ITERATION,
        _f("num_steps", pa.int32(), "iterations run (T): the last one holds the remaining exit mass"),
        _f(
            "gate_lambda", pa.float32(), "λ_t = sigmoid(gate(h_t)): chance to stop at t if not stopped before"
        ),
        _f("exit_prob", pa.float32(), "p_t = λ_t · Π_{j<t}(1 − λ_j); p_T = the remaining mass"),
        _f("exit_cdf", pa.float32(), "Σ_{j≤t} p_j: probability of having exited by iteration t"),
    ],
    "patching": [
        _RUN,
        _PAIR,
        _EXPERIMENT,
        _f("direction", pa.string(), "denoise: source = clean, recipient = corrupted; noise: the reverse"),
        _f("method", pa.string(), "exact (a patched forward pass) or attribution (gradient estimate)"),
        _SITE,
        _f(
            "iteration",
            pa.int32(),
            "patched iteration (1..T at recurrent sites, 0 elsewhere); re-injections: the first re-injected one",
        ),
        _BLOCK,
        _UNROLLED,
        _f("position", pa.int32(), "patched token position in the recipient prompt"),
        _f("source_position", pa.int32(), "the source prompt's position whose state was patched in"),
        _f(
            "positions",
            pa.string(),
            "every recipient position patched together (JSON list) when a patch covers several; position is the first",
            nullable=True,
        ),
        _f("logit_diff", pa.float32(), "logit(clean answer) − logit(corrupted answer) at the last position"),
        _f(
            "effect",
            pa.float32(),
            "(logit_diff − recipient's) / (source's − recipient's): 0 = no effect, 1 = the source's",
            nullable=True,
        ),
        _f("clean_rank", pa.int64(), "rank of the clean answer in the patched run", nullable=True),
        _f("clean_prob", pa.float32(), "probability of the clean answer", nullable=True),
        _f("corrupt_rank", pa.int64(), "rank of the corrupted answer", nullable=True),
        _f("corrupt_prob", pa.float32(), "probability of the corrupted answer", nullable=True),
        _f(
            "follow_rank",
            pa.int64(),
            "rank of the hypothesis's answer (patch_pairs.follow_answer_id)",
            nullable=True,
        ),
        _f("follow_prob", pa.float32(), "probability of the hypothesis's answer", nullable=True),
        _f("top_token_id", pa.int64(), "the patched run's top-1 token", nullable=True),
        _f("top_prob", pa.float32(), "its probability", nullable=True),
        _f("top_tokens", pa.string(), "the patched run's top tokens with probabilities", nullable=True),
        _f(
            "outcome",
            pa.string(),
            "top-1 is the recipient's answer (base), the source's, follow or other",
            nullable=True,
        ),
        _f(
            "exit_step",
            pa.float32(),
            "expected exit iteration Σ t·p_t at the last position (exit gate)",
            nullable=True,
        ),
    ],
    "patch_pairs": [
        _RUN,
        _PAIR,
        _EXPERIMENT,
        _f(
            "group", pa.string(), "what differs between the prompts (e.g. the changed operand)", nullable=True
        ),
        _f("clean_prompt", pa.string(), "the clean prompt's text"),
        _f("corrupt_prompt", pa.string(), "the corrupted prompt's text"),
        _f("clean_tokens", pa.string(), "the clean prompt's tokens, a JSON list of strings"),
        _f("corrupt_tokens", pa.string(), "the corrupted prompt's tokens, a JSON list of strings"),
        _f("clean_answer_id", pa.int64(), "the clean prompt's answer token"),
        _f("corrupt_answer_id", pa.int64(), "the corrupted prompt's answer token"),
        _f("follow_answer_id", pa.int64(), "a third answer a hypothesis predicts", nullable=True),
        _f("clean_logit_diff", pa.float32(), "logit difference of the unpatched clean run"),
        _f("corrupt_logit_diff", pa.float32(), "logit difference of the unpatched corrupted run"),
        _f("clean_top_id", pa.int64(), "the unpatched clean run's top-1 token at the last position"),
        _f("corrupt_top_id", pa.int64(), "the unpatched corrupted run's top-1 token"),
        _f("clean_exit_step", pa.float32(), "expected exit iteration of the clean run", nullable=True),
        _f("corrupt_exit_step", pa.float32(), "expected exit iteration of the corrupted run", nullable=True),
    ],
    "wavefront": [
        _RUN,
        _PROMPT,
        _f("setting", pa.string(), "the sampler setting that generated it (a study's label; may be empty)"),
        _f("diffusion_step", pa.int32(), "diffusion step, -1 for the prefill over the prompt"),
        _POSITION,
        _SITE,
        _ITERATION,
        _LENS,
        _f("token_id", pa.int64(), "the finally generated token at position + 1 (the target)"),
        _f("token", pa.string(), "decoded text of token_id", nullable=True),
        _f("rank", pa.int64(), "1 + number of tokens with a strictly larger logit (1 = top)"),
        _LOGPROB,
        _f("frozen", pa.bool_(), "the position was already frozen at this step"),
        _f("recurrence", pa.int32(), "core iterations the position had received before this step"),
        _f("guess_id", pa.int64(), "the token the working sequence held at the position"),
        _f("guess", pa.string(), "decoded text of guess_id", nullable=True),
        _f("stability", pa.int32(), "steps on which the position's proposal agreed with its guess"),
    ],
    "sampler": [
        _RUN,
        _PROMPT,
        _TASK,
        _f("setting", pa.string(), "setting name (sampler and its main options)"),
        _f("sampler", pa.string(), "autoregressive or diffusion"),
        _f("options", pa.string(), "every option of the setting, as JSON"),
        _f("expected", pa.string(), "the reference completion"),
        _f("generated", pa.string(), "what the sampler produced"),
        _f("token_ids", pa.string(), "the generated token ids, space-separated"),
        _f("correct", pa.bool_(), "generated equals expected over the scored tokens"),
        _f("token_agreement", pa.float32(), "share of scored tokens equal to the reference"),
        _f("answer_correct", pa.bool_(), "the task's answer (text before the first end-of-text) is right"),
        _f("new_tokens", pa.int32(), "tokens generated"),
        _f(
            "stopped",
            pa.string(),
            "why generation ended (max_new_tokens; max_diffusion_steps: a stalled window hit the cap)",
            nullable=True,
        ),
        _f("model_calls", pa.int32(), "sequential forward passes (prefill included)"),
        _f(
            "core_iterations",
            pa.int32(),
            "sequential core-block applications (iterations along the critical path)",
        ),
        _f("core_passes", pa.int64(), "core-block applications summed over tokens (the compute)"),
        _f("seconds", pa.float32(), "wall time of the prompt's batch divided by its size"),
    ],
    "prompts": [
        _RUN,
        _PROMPT,
        _TASK,
        _f("context", pa.string(), "the task's question part"),
        _f("completion", pa.string(), "the expected completion"),
        _INTERMEDIATE,
        _f("prompt_text", pa.string(), "the full prompt after templating"),
    ],
    "prompt_meta": [
        _RUN,
        _PROMPT,
        _f("n_tokens", pa.int32(), "tokens of the prompt as fed to the model"),
        _f("steps_used", pa.int32(), "recurrent iterations run (below the cap with adaptive depth)", True),
        _f("error", pa.string(), "why the prompt was not probed (null when it was)", nullable=True),
        _f("targets", pa.string(), "the given targets as JSON, kind -> text or token id", nullable=True),
        _f("metadata", pa.string(), "the input row's other columns as JSON", nullable=True),
    ],
}

#: Arrow schema of every table a run may hold, keyed by table name.
SCHEMAS: dict[str, pa.Schema] = {
    name: pa.schema(fields, metadata={"looplens.table": name, "looplens.row": TABLE_DOCS[name]})
    for name, fields in _FIELDS.items()
}


def _one_of(array: Any, values: tuple[str, ...]) -> Any:
    """True where ``array`` holds one of ``values`` or a null (a required column has no nulls anyway)."""
    return pc.or_kleene(pc.is_null(array), pc.is_in(array, value_set=pa.array(values)))


# Invariants checked after casting: (column, predicate on the array, what must hold).
_CHECKS: list[tuple[str, Any, str]] = [
    ("rank", lambda a: pc.greater_equal(a, 1), "rank must be >= 1"),
    ("k", lambda a: pc.greater_equal(a, 1), "k must be >= 1"),
    ("position", lambda a: pc.greater_equal(a, -1), "position must be >= 0, or -1 for the last token"),
    ("iteration", lambda a: pc.greater_equal(a, 0), "iteration must be >= 0"),
    ("site", lambda a: pc.match_substring_regex(a, SITE_PATTERN), "site must match " + SITE_PATTERN),
    (
        "gate_lambda",
        lambda a: pc.and_(pc.greater_equal(a, 0), pc.less_equal(a, 1)),
        "gate_lambda must be a probability in [0, 1]",
    ),
    ("purpose", lambda a: pc.is_in(a, value_set=pa.array(PURPOSES)), f"purpose must be one of {PURPOSES}"),
    ("direction", lambda a: _one_of(a, DIRECTIONS), f"direction must be one of {DIRECTIONS}"),
    ("method", lambda a: _one_of(a, METHODS), f"method must be one of {METHODS}"),
    ("outcome", lambda a: _one_of(a, OUTCOMES), f"outcome must be one of {OUTCOMES} (or null)"),
    ("clean_rank", lambda a: pc.greater_equal(a, 1), "clean_rank must be >= 1"),
    ("corrupt_rank", lambda a: pc.greater_equal(a, 1), "corrupt_rank must be >= 1"),
    ("source_position", lambda a: pc.greater_equal(a, 0), "source_position must be >= 0"),
]

Data: TypeAlias = pa.Table | pd.DataFrame | Sequence[Mapping[str, Any]]


def _compatible(src: pa.DataType, dst: pa.DataType) -> bool:
    """Types that cast without changing meaning (casts are still checked for overflow/truncation)."""
    if pa.types.is_null(src):
        return True
    if pa.types.is_dictionary(src):
        src = src.value_type
    if pa.types.is_integer(dst):
        return pa.types.is_integer(src) or pa.types.is_floating(src)  # floats only if integral
    if pa.types.is_floating(dst):
        return pa.types.is_integer(src) or pa.types.is_floating(src)
    if pa.types.is_string(dst):
        is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
        return pa.types.is_string(src) or pa.types.is_large_string(src) or is_view(src)
    return src == dst


def _columns(name: str, data: Data) -> dict[str, pa.ChunkedArray | pa.Array]:
    """Turn any accepted input into named Arrow columns, blaming the column that fails to convert."""
    if isinstance(data, pa.Table):
        return {col: data.column(col) for col in data.column_names}
    if isinstance(data, pd.DataFrame):
        if data.columns.duplicated().any():
            dup = data.columns[data.columns.duplicated()].tolist()
            raise ValueError(f"table {name!r}: duplicated columns {dup}")
        items = [(str(col), data[col]) for col in data.columns]
    elif isinstance(data, Sequence) and not isinstance(data, str | bytes):
        keys: dict[str, None] = {}
        for row in data:
            if not isinstance(row, Mapping):
                raise ValueError(f"table {name!r}: rows must be mappings, got {type(row).__name__}")
            keys.update(dict.fromkeys(row))
        items = [(str(k), [row.get(k) for row in data]) for k in keys]
    else:
        raise TypeError(
            f"table {name!r}: expected a pyarrow Table, a DataFrame or a list of dicts, "
            f"got {type(data).__name__}"
        )
    out: dict[str, pa.Array] = {}
    for col, values in items:
        try:
            out[col] = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"table {name!r}, column {col!r}: cannot convert values ({exc})") from exc
    return out


def to_table(name: str, data: Data, *, run: str | None = None) -> pa.Table:
    """Validate ``data`` as table ``name`` and return it with exactly the schema ``SCHEMAS[name]``.

    Accepts a pyarrow Table, a DataFrame or a list of row dicts. Compatible types are cast
    (int64 → int32, float64 → float32, categorical → string) with overflow and truncation checked;
    a missing required column, an unknown column, a wrong type, a null in a required column or a
    broken invariant raises ``ValueError`` naming the table and the column. Absent nullable columns
    are filled with nulls. ``run``, when given, fills a missing ``run`` column and must match a
    present one (a run never stores another run's rows).
    """
    if name not in SCHEMAS:
        raise ValueError(f"unknown table {name!r}; tables are {sorted(SCHEMAS)}")
    schema = SCHEMAS[name]
    columns = _columns(name, data)
    num_rows = len(data) if not isinstance(data, pa.Table) else data.num_rows
    if num_rows == 0 and not columns:  # e.g. a batch that produced no records: [] or pd.DataFrame()
        return schema.empty_table()

    unknown = [col for col in columns if schema.get_field_index(col) < 0]
    if unknown:
        raise ValueError(f"table {name!r}: unknown column(s) {unknown}; columns are {schema.names}")

    arrays = []
    for field in schema:
        col = columns.get(field.name)
        if col is None:
            if field.name == "run" and run is not None:
                col = pa.array([run] * num_rows, pa.string())
            elif field.nullable:
                col = pa.nulls(num_rows, field.type)
            else:
                raise ValueError(f"table {name!r}: missing required column {field.name!r} ({field.type})")
        if not _compatible(col.type, field.type):
            raise ValueError(f"table {name!r}, column {field.name!r}: expected {field.type}, got {col.type}")
        try:
            col = col.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"table {name!r}, column {field.name!r}: cannot cast to {field.type} ({exc})"
            ) from exc
        if not field.nullable and col.null_count:
            raise ValueError(
                f"table {name!r}, column {field.name!r}: {col.null_count} null value(s) in a required column"
            )
        arrays.append(col)
    table = pa.Table.from_arrays(arrays, schema=schema)

    if run is not None and table.num_rows and not pc.all(pc.equal(table.column("run"), run)).as_py():
        others = sorted(set(pc.unique(table.column("run")).to_pylist()) - {run})
        raise ValueError(f"table {name!r}, column 'run': rows belong to run(s) {others}, not {run!r}")
    for col, predicate, message in _CHECKS:
        if col in schema.names and table.num_rows:
            ok = predicate(table.column(col))
            if not pc.all(ok, min_count=0).as_py():  # nulls (in nullable columns) pass
                bad = pc.filter(table.column(col), pc.invert(ok), null_selection_behavior="drop")[0].as_py()
                raise ValueError(f"table {name!r}, column {col!r}: {message} (found {bad!r})")
    return table


def records(name: str, data: Data) -> pd.DataFrame:
    """``data`` checked as rows of table ``name`` where they are made, before a run is known.

    The same checks as ``to_table`` (columns, types, nulls, invariants; ``ValueError`` naming the
    table and column); returns a DataFrame with the schema's columns in order and its types, without
    the ``run`` column unless ``data`` has one (the store fills it when the rows are written).
    """
    has_run = isinstance(data, pa.Table | pd.DataFrame) and "run" in data.columns
    if not isinstance(data, pa.Table | pd.DataFrame) and isinstance(data, Sequence):
        has_run = any(isinstance(row, Mapping) and "run" in row for row in data)
    table = to_table(name, data, run=None if has_run else "")
    frame = table.to_pandas()
    return frame if has_run else frame.drop(columns="run")
