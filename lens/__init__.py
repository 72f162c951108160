"""looplens models: looped LMs (Huginn, retrofitted recurrence, Ouro) that stream every per-iteration state.

>>> import lens
>>> model = lens.load_model("tiny-arith")  # the embedded default; or a checkpoint directory
>>> model.layout.family, model.default_steps
('huginn', 16)
"""

from lens.cache import KVCache
from lens.config import RecurrentDepthConfig
from lens.errors import CheckpointError, ConfigError, InputError, LooplensError, ModelNotFoundError
from lens.exit_gate import GateExit
from lens.families import FAMILIES, detect_family
from lens.families.ouro import OuroConfig
from lens.families.retrofit import RetrofitConfig
from lens.hooks import HookPoint
from lens.layout import Unrolled, UnrolledLayout
from lens.loading import EMBEDDED_MODELS, load_model, save_model
from lens.model import LoopedLM, OuroLM, RecurrentDepthLM, RecurrentDepthOutput, RetrofitLM
from lens.stream import State, Subscription, Trace, TraceCollector

__all__ = [
    "EMBEDDED_MODELS",
    "FAMILIES",
    "CheckpointError",
    "ConfigError",
    "GateExit",
    "InputError",
    "LooplensError",
    "LoopedLM",
    "ModelNotFoundError",
    "HookPoint",
    "KVCache",
    "OuroConfig",
    "OuroLM",
    "RecurrentDepthConfig",
    "RecurrentDepthLM",
    "RecurrentDepthOutput",
    "RetrofitConfig",
    "RetrofitLM",
    "State",
    "Subscription",
    "Trace",
    "TraceCollector",
    "Unrolled",
    "UnrolledLayout",
    "detect_family",
    "load_model",
    "save_model",
]
