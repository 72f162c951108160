"""The models: the forward pass every family shares (:class:`LoopedLM`) and the family module trees.

``RecurrentDepthLM`` is Huginn's (``lens.families.huginn``), ``RetrofitLM`` a retrofitted-recurrence
model's, ``OuroLM`` Ouro's; :func:`lens.load_model` picks the right one from a checkpoint.
"""

from lens.families.huginn import RecurrentDepthLM
from lens.families.ouro import OuroLM
from lens.families.retrofit import RetrofitLM
from lens.looped import InitState, LoopedLM, RecurrentDepthOutput, Steps

__all__ = [
    "InitState",
    "LoopedLM",
    "OuroLM",
    "RecurrentDepthLM",
    "RecurrentDepthOutput",
    "RetrofitLM",
    "Steps",
]
