"""The lens pass: per-state statistics of the vocabulary distribution, streamed over vocabulary chunks.

Modules: :mod:`.result` (the :class:`LensStatistics` dataclass), :mod:`.inputs` (validation shared by
every path), :mod:`.reference` (materialise the logits; the definition), :mod:`.chunked` (the
streaming PyTorch path and the online-merge formulas), :mod:`.api` (the dispatching entry point). The
Triton kernel lives in :mod:`kernels.triton_lens`.
"""

from kernels.lens_stats.api import lens_statistics
from kernels.lens_stats.chunked import lens_statistics_chunked
from kernels.lens_stats.inputs import MAX_TOPK, LensInputs, prepare_lens_inputs
from kernels.lens_stats.reference import lens_logits_reference, lens_statistics_reference
from kernels.lens_stats.result import LensStatistics

__all__ = [
    "MAX_TOPK",
    "LensInputs",
    "LensStatistics",
    "lens_logits_reference",
    "lens_statistics",
    "lens_statistics_chunked",
    "lens_statistics_reference",
    "prepare_lens_inputs",
]
