"""looplens probes: lenses and analyzers that consume a model's state stream and emit tidy records.

>>> import lens, probes
>>> model = lens.load_model("tiny-arith")
>>> ids = model.tokenizer.encode("Question: What is (2 * 3) + 1?\\nAnswer:")
>>> result = probes.probe_prompts(model, [ids], targets={"final": model.tokenizer.encode(" 7")}, num_steps=16)
>>> sorted(result.ranks["lens"].unique())  # every lens the family supports
['coda', 'logit']
"""

from probes.api import ProbeResult, probe_prompts
from probes.dataset import probe_dataset, probe_summary
from probes.dynamics import DynamicsRecorder, classify_trajectory
from probes.exit_gate import ExitGateRecorder
from probes.inputs import PromptSet, read_prompts
from probes.lenses import (
    CodaLens,
    Lens,
    LensNotApplicableError,
    LogitLens,
    TunedLens,
    applicable_lenses,
    make_lens,
)
from probes.linear import LatentCollector, collect_for_probe, linear_probe
from probes.recorder import LensRecorder
from probes.records import SCHEMAS, to_table
from probes.statistics import token_statistics
from probes.store import CorruptRunError, Run, RunInfo, RunMismatchError, list_runs
from probes.trajectory import RankTrajectory

__all__ = [
    "SCHEMAS",
    "CodaLens",
    "CorruptRunError",
    "DynamicsRecorder",
    "ExitGateRecorder",
    "LatentCollector",
    "Lens",
    "LensNotApplicableError",
    "LensRecorder",
    "LogitLens",
    "ProbeResult",
    "PromptSet",
    "RankTrajectory",
    "Run",
    "RunInfo",
    "RunMismatchError",
    "TunedLens",
    "applicable_lenses",
    "classify_trajectory",
    "collect_for_probe",
    "linear_probe",
    "list_runs",
    "make_lens",
    "probe_dataset",
    "probe_prompts",
    "probe_summary",
    "read_prompts",
    "to_table",
    "token_statistics",
]
