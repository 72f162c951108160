"""Core-loop ops of the recurrent block: sandwich RMSNorm, SwiGLU, and the adapter without the concat.

Each op has a ``*_reference`` that is the plain eager expression (it defines the result, and on CPU it
*is* the result: the model's parity fixture needs bit-identical CPU outputs), and a public function
that dispatches: CUDA tensors go to the Triton kernels in :mod:`kernels.triton_core` when the inputs are
ones the kernels cover, everything else runs the eager expression. Autograd always takes the eager
path (the kernels have no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from kernels.dispatch import use_triton


def _needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- RMSNorm (with the sandwich residual) ---------------------------------------------------------


def rms_norm_reference(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], eps: float = 1e-6, residual: Tensor | None = None
) -> Float[Tensor, "... d"]:
    """Huginn's RMSNorm of ``x (+ residual)``: normalise in float32, cast back to the input dtype, times the gain."""
    if residual is not None:
        x = x + residual
    h = x if x.dtype == torch.float32 else x.float()  # (no call at all where it would be the identity)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (normed if normed.dtype == x.dtype else normed.type_as(x)) * weight


def rms_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], eps: float = 1e-6, residual: Tensor | None = None
) -> Float[Tensor, "... d"]:
    """``RMSNorm(x + residual)`` (or of ``x``), the sum fused into the norm on GPU.

    The sandwich block normalises every sublayer output added to its residual stream; fusing the add
    saves one read and one write of the stream per norm. Same result as :func:`rms_norm_reference`
    (bit-identical on CPU, where that expression is what runs).
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if use_triton(x) and not _needs_autograd(x, weight, residual):
        from kernels import triton_core

        if triton_core.rms_norm_supported(x, weight, residual):
            return triton_core.rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


# --- SwiGLU --------------------------------------------------------------------------------------


def swiglu_reference(fc_out: Float[Tensor, "... two_h"]) -> Float[Tensor, "... h"]:
    """``silu(x1) * x2`` where ``fc_out = [x1 | x2]`` along the last dim (Huginn's gated MLP)."""
    gate, up = fc_out.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(fc_out: Float[Tensor, "... two_h"]) -> Float[Tensor, "... h"]:
    """Gated SiLU of the fused ``fc`` output, in one pass on GPU (no ``silu(x1)`` temporary)."""
    if fc_out.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {fc_out.shape[-1]} is odd; expected the fused [gate | up] output")
    if use_triton(fc_out) and not _needs_autograd(fc_out):
        from kernels import triton_core

        if triton_core.swiglu_supported(fc_out):
            return triton_core.swiglu_triton(fc_out)
    return swiglu_reference(fc_out)


# --- adapter (input injection) -------------------------------------------------------------------


def _adapter_width(adapter_weight: Tensor) -> int:
    if adapter_weight.dim() != 2 or adapter_weight.shape[1] != 2 * adapter_weight.shape[0]:
        raise ValueError(
            f"adapter weight {tuple(adapter_weight.shape)}: expected Linear(2d -> d).weight of shape [d, 2d]"
        )
    return adapter_weight.shape[0]


def adapter_injection(
    embedded: Float[Tensor, "... d"], adapter_weight: Float[Tensor, "d two_d"]
) -> Float[Tensor, "... d"]:
    """The embedded-input half of the adapter, ``embedded @ W[:, d:].T``.

    It does not change across recurrent iterations, so it is computed once per forward pass instead of
    once per iteration (half the adapter's FLOPs, and no ``cat``).
    """
    d = _adapter_width(adapter_weight)
    if embedded.shape[-1] != d:
        raise ValueError(f"adapter_injection: embedded width {embedded.shape[-1]} != d = {d}")
    return embedded @ adapter_weight[:, d:].T


def adapter_step_reference(
    x: Float[Tensor, "... d"],
    adapter_weight: Float[Tensor, "d two_d"],
    injection: Float[Tensor, "... d"],
    bias: Float[Tensor, " d"] | None = None,
) -> Float[Tensor, "... d"]:
    """``x @ W[:, :d].T + injection (+ bias)``, the eager expression."""
    d = adapter_weight.shape[0]
    out = x @ adapter_weight[:, :d].T + injection
    if bias is not None:
        out = out + bias
    return out


def adapter_step(
    x: Float[Tensor, "... d"],
    adapter_weight: Float[Tensor, "d two_d"],
    injection: Float[Tensor, "... d"],
    bias: Float[Tensor, " d"] | None = None,
) -> Float[Tensor, "... d"]:
    """One iteration's adapter: equals ``Linear(2d -> d)(cat[x, embedded])`` with ``injection`` from
    :func:`adapter_injection`.

    On GPU the add of the injection rides in the matmul's epilogue (``addmm``), so each iteration is one
    GEMM with no concat and no separate add. A constant ``bias`` can equally be added to the injection
    once, outside the loop.
    """
    d = _adapter_width(adapter_weight)
    if x.shape[-1] != d or injection.shape[-1] != d:
        raise ValueError(
            f"adapter_step: x {tuple(x.shape)} / injection {tuple(injection.shape)} width != d = {d}"
        )
    if (
        use_triton(x)
        and injection.shape == x.shape
        and injection.dtype == x.dtype == adapter_weight.dtype
        and injection.device == x.device
        and not _needs_autograd(x, adapter_weight, injection, bias)
    ):
        x2 = x.reshape(-1, d)
        out = torch.addmm(injection.reshape(-1, d), x2, adapter_weight[:, :d].T).view(x.shape)
        if bias is not None:
            out = out + bias
        return out
    return adapter_step_reference(x, adapter_weight, injection, bias)


__all__ = [
    "adapter_injection",
    "adapter_step",
    "adapter_step_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
