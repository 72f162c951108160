"""Fast kernels for looplens: the fused lens-statistics pass and the recurrent core loop's ops.

Each op has a PyTorch reference that defines it, a Triton kernel for CUDA tensors and a CPU path
(chunked PyTorch for the lens pass, the eager expressions for the core ops); :func:`backend_for`
picks, :func:`force_reference` or ``LOOPLENS_KERNELS=reference`` force the reference for debugging.
Triton is imported only when a CUDA tensor needs it.
"""

from kernels.core_ops import adapter_injection, adapter_step, rms_norm, swiglu
from kernels.dispatch import backend_for, force_reference
from kernels.lens_stats import LensStatistics, lens_statistics

__all__ = [
    "LensStatistics",
    "adapter_injection",
    "adapter_step",
    "backend_for",
    "force_reference",
    "lens_statistics",
    "rms_norm",
    "swiglu",
]
