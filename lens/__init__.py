"""looplens models: looped LMs (Huginn, retrofitted recurrence, Ouro) that stream every per-iteration state.

>>> import lens
>>> model = lens.load_model("tiny-arith")  # the embedded default; or a checkpoint directory
>>> model.layout.family, model.default_steps
('huginn', 16)
"""

from lens.cache import KVCache
from lens.config import RecurrentDepthConfig
from lens.diffusion import DiffusionResult, DiffusionSampler, DiffusionSettings
from lens.errors import CheckpointError, ConfigError, InputError, LooplensError, ModelNotFoundError
from lens.exit_gate import GateExit
from lens.families import FAMILIES, detect_family
from lens.families.ouro import OuroConfig
from lens.families.retrofit import RetrofitConfig
from lens.generation import GenerationResult
from lens.hooks import HookPoint
from lens.interventions import Ablate, Freeze, Intervention, Patch, Reinject, RowPatches, Steer
from lens.layout import Unrolled, UnrolledLayout
from lens.loading import EMBEDDED_MODELS, load_model, save_model
from lens.model import LoopedLM, OuroLM, RecurrentDepthLM, RecurrentDepthOutput, RetrofitLM
from lens.stream import State, Subscription, Trace, TraceCollector

__all__ = [
    "Ablate",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "CheckpointError",
    "DiffusionResult",
    "DiffusionSampler",
    "DiffusionSettings",
    "GenerationResult",
    "ConfigError",
    "Freeze",
    "GateExit",
    "InputError",
    "Intervention",
    "LooplensError",
    "LoopedLM",
    "ModelNotFoundError",
    "HookPoint",
    "KVCache",
    "OuroConfig",
    "OuroLM",
    "Patch",
    "Reinject",
    "RecurrentDepthConfig",
    "RecurrentDepthLM",
    "RecurrentDepthOutput",
    "RetrofitConfig",
    "RetrofitLM",
    "RowPatches",
    "State",
    "Steer",
    "Subscription",
    "Trace",
    "TraceCollector",
    "Unrolled",
    "UnrolledLayout",
    "detect_family",
    "load_model",
    "save_model",
]
