"""Triton kernels of the core loop: RMSNorm fused with the sandwich residual add, and SwiGLU.

Both are memory-bound row-wise kernels; fusing them removes the temporaries the eager expressions write
(``x + residual``, ``silu(x1)``). They reproduce the eager rounding steps of
:mod:`kernels.core_ops` (sum rounded to the input dtype, normalised value cast back before the gain,
``silu`` rounded before the product), so results agree with the reference to an ulp of the dtype.

Launchers take any device Triton can run on (CUDA, or CPU under ``TRITON_INTERPRET=1`` in tests);
:func:`rms_norm_supported` / :func:`swiglu_supported` say which inputs they cover.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

#: Largest row the one-block-per-row RMSNorm kernel keeps in registers (Huginn's d = 5280 fits).
MAX_NORM_WIDTH = 16384
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Y,
    stride_x,
    stride_r,
    stride_y,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # eager rounds the sum to the dtype
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    normed = (h * rstd).to(X.dtype.element_ty)  # Huginn casts back before the gain
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(F_, Y, stride_f, stride_y, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    gate = tl.load(F_ + row * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(F_ + row * stride_f + H + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty)  # eager rounds silu(gate) first
    tl.store(Y + row * stride_y + cols, (silu.to(tl.float32) * up).to(Y.dtype.element_ty), mask=mask)


def rms_norm_supported(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> bool:
    """Inputs the fused RMSNorm kernel covers; anything else takes the eager path."""
    return (
        x.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and x.shape[-1] <= MAX_NORM_WIDTH
        and x.numel() > 0
        and weight.device == x.device
        and (residual is None or (residual.dtype == x.dtype and residual.device == x.device))
    )


def _output(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> Tensor:
    """``out`` checked against the expected layout, or a fresh tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if (
        tuple(out.shape) != tuple(shape)
        or out.dtype != dtype
        or out.device != like.device
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {like.device}")
    return out


def rms_norm_triton(
    x: Float[Tensor, "... d"],
    weight: Float[Tensor, " d"],
    eps: float = 1e-6,
    residual: Tensor | None = None,
    out: Tensor | None = None,
) -> Float[Tensor, "... d"]:
    """Launch the fused ``RMSNorm(x + residual)`` kernel; output dtype follows eager type promotion."""
    if not rms_norm_supported(x, weight, residual):
        raise ValueError(
            f"rms_norm_triton: unsupported input (x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}, "
            f"d <= {MAX_NORM_WIDTH} in {KERNEL_DTYPES})"
        )
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    r2 = residual.reshape(-1, d).contiguous() if residual is not None else x2
    w = weight.contiguous()
    y = _output(out, tuple(x.shape), torch.promote_types(x.dtype, weight.dtype), x).view(x2.shape)
    block = triton.next_power_of_2(d)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        w,
        y,
        x2.stride(0),
        r2.stride(0),
        y.stride(0),
        d,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=block,
        num_warps=num_warps,
    )
    return y.view(x.shape)


def swiglu_supported(fc_out: Tensor) -> bool:
    """Inputs the SwiGLU kernel covers; anything else takes the eager path."""
    return fc_out.dtype in KERNEL_DTYPES and fc_out.shape[-1] % 2 == 0 and fc_out.numel() > 0


def swiglu_triton(fc_out: Float[Tensor, "... two_h"], out: Tensor | None = None) -> Float[Tensor, "... h"]:
    """Launch the SwiGLU kernel on ``[gate | up]``."""
    if not swiglu_supported(fc_out):
        raise ValueError(f"swiglu_triton: unsupported input {fc_out.dtype} {tuple(fc_out.shape)}")
    two_h = fc_out.shape[-1]
    h = two_h // 2
    f2 = fc_out.reshape(-1, two_h).contiguous()
    y = _output(out, (*fc_out.shape[:-1], h), fc_out.dtype, fc_out).view(f2.shape[0], h)
    block = min(1024, triton.next_power_of_2(h))
    _swiglu_kernel[(f2.shape[0], triton.cdiv(h, block))](f2, y, f2.stride(0), y.stride(0), h, BLOCK=block)
    return y.view(*fc_out.shape[:-1], h)


__all__ = [
    "MAX_NORM_WIDTH",
    "rms_norm_supported",
    "rms_norm_triton",
    "swiglu_supported",
    "swiglu_triton",
]
