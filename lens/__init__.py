"""looplens models: recurrent-depth LMs that stream every per-iteration hidden state.

>>> import lens
>>> model = lens.load_model("tiny-arith")  # doctest: +SKIP
"""

from lens.cache import KVCache
from lens.config import RecurrentDepthConfig
from lens.errors import CheckpointError, ConfigError, InputError, LooplensError, ModelNotFoundError
from lens.hooks import HookPoint
from lens.loading import EMBEDDED_MODELS, load_model, save_model
from lens.model import RecurrentDepthLM, RecurrentDepthOutput
from lens.stream import SiteLayout, State, Subscription, Trace, TraceCollector

__all__ = [
    "EMBEDDED_MODELS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LooplensError",
    "ModelNotFoundError",
    "HookPoint",
    "KVCache",
    "RecurrentDepthConfig",
    "RecurrentDepthLM",
    "RecurrentDepthOutput",
    "SiteLayout",
    "State",
    "Subscription",
    "Trace",
    "TraceCollector",
    "load_model",
    "save_model",
]
