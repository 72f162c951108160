"""Core-loop ops: bit-identical eager results on CPU, Triton kernels (interpreted) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import core_ops
from tests.kernels.reference64 import rms_norm64, swiglu64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Output tolerance in units of the dtype's epsilon. The interpreter converts fp32 -> bf16 by truncation
#: (a GPU rounds to nearest), so bf16 results may sit one more ulp away under it.
ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 4}


def assert_close_ulps(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    tol = ULPS[dtype] * torch.finfo(dtype).eps
    torch.testing.assert_close(actual.double(), expected64, rtol=tol, atol=tol)


def huginn_rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The expression the model's parity fixture was made with."""
    return (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * w


# --- CPU: the dispatcher's result is the eager expression, bit for bit -----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_ops_are_bit_identical_to_eager(gen, dtype):
    d = 96
    x = torch.randn(2, 5, d, generator=gen).to(dtype)
    r = torch.randn(2, 5, d, generator=gen).to(dtype)
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    assert kernels.backend_for(x) == "torch"
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), huginn_rms_norm(x, w, 1e-6))
    assert torch.equal(kernels.rms_norm(x, w, 1e-5, residual=r), huginn_rms_norm(x + r, w, 1e-5))
    fc = torch.randn(2, 5, 2 * 77, generator=gen).to(dtype)
    assert torch.equal(kernels.swiglu(fc), F.silu(fc[..., :77]) * fc[..., 77:])
    adapter = (torch.randn(d, 2 * d, generator=gen) / d).to(dtype)
    e = torch.randn(2, 5, d, generator=gen).to(dtype)
    bias = torch.randn(d, generator=gen).to(dtype)
    inj = kernels.adapter_injection(e, adapter)
    assert torch.equal(inj, e @ adapter[:, d:].T)
    assert torch.equal(kernels.adapter_step(x, adapter, inj), x @ adapter[:, :d].T + inj)
    assert torch.equal(kernels.adapter_step(x, adapter, inj, bias), x @ adapter[:, :d].T + inj + bias)


def test_adapter_split_equals_linear_on_concat(gen):
    d = 64
    linear = torch.nn.Linear(2 * d, d, bias=True)
    x, e = torch.randn(3, 7, d, generator=gen), torch.randn(3, 7, d, generator=gen)
    with torch.no_grad():
        split = kernels.adapter_step(
            x, linear.weight, kernels.adapter_injection(e, linear.weight), linear.bias
        )
        torch.testing.assert_close(split, linear(torch.cat([x, e], dim=-1)), atol=1e-5, rtol=1e-5)


def test_core_ops_reject_malformed_inputs():
    with pytest.raises(ValueError, match="odd"):
        kernels.swiglu(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(torch.zeros(3, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(torch.zeros(3, 8), torch.ones(8), residual=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\[d, 2d\]"):
        kernels.adapter_injection(torch.zeros(3, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="width"):
        kernels.adapter_step(torch.zeros(3, 4), torch.zeros(8, 16), torch.zeros(3, 8))


# --- Triton kernels under the interpreter ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm_matches_float64(gen, dtype, with_residual):
    from kernels.triton_core import rms_norm_triton

    d = 523
    x = (torch.randn(3, 11, d, generator=gen) * 4).to(dtype)
    r = torch.randn(3, 11, d, generator=gen).to(dtype) if with_residual else None
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    out = torch.full((3, 11, d), float("nan"), dtype=dtype)
    y = rms_norm_triton(x, w, 1e-6, r, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == x.shape
    assert_close_ulps(y, rms_norm64(x, w, 1e-6, r), dtype)


def test_triton_rms_norm_promotes_like_eager(gen):
    from kernels.triton_core import rms_norm_triton

    x = torch.randn(4, 40, generator=gen).half()
    w = torch.rand(40, generator=gen) + 0.5  # fp32 gain on fp16 states: eager gives fp32
    y = rms_norm_triton(x, w)
    assert y.dtype == torch.float32
    assert_close_ulps(y, rms_norm64(x, w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_swiglu_matches_float64(gen, dtype):
    from kernels.triton_core import swiglu_triton

    fc = (torch.randn(5, 3, 2 * 1501, generator=gen) * 3).to(dtype)  # 1501 > one 1024-wide block
    out = torch.full((5, 3, 1501), float("nan"), dtype=dtype)
    y = swiglu_triton(fc, out=out)
    assert y.data_ptr() == out.data_ptr()
    expected = swiglu64(fc)
    tol = ULPS[dtype] * torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * fc.double().abs().max().item())


def test_triton_launchers_check_out_buffers(gen):
    from kernels.triton_core import rms_norm_triton, swiglu_triton

    x = torch.randn(4, 16, generator=gen)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_triton(x, torch.ones(16), out=torch.empty(4, 15))
    with pytest.raises(ValueError, match="out must be"):
        swiglu_triton(x, out=torch.empty(4, 8, dtype=torch.float16))


# --- the dispatcher sending CPU tensors to Triton (as it sends CUDA ones) ---------------------------


def test_dispatch_uses_triton_and_falls_back(gen, triton_on_cpu, monkeypatch):
    from kernels import triton_core

    calls = []
    real = triton_core.rms_norm_triton
    monkeypatch.setattr(triton_core, "rms_norm_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(6, 64, generator=gen).half()
    w = torch.rand(64, generator=gen).half() + 0.5
    assert kernels.backend_for(x) == "triton"
    assert_close_ulps(kernels.rms_norm(x, w), rms_norm64(x, w, 1e-6), torch.float16)
    assert calls == [1]
    # non-contiguous input: made contiguous, same result
    xt = torch.randn(64, 6, generator=gen).half().T
    assert_close_ulps(kernels.rms_norm(xt, w), rms_norm64(xt, w, 1e-6), torch.float16)
    assert calls == [1, 1]
    # each of these takes the eager path: float64, mixed residual dtype, too wide a row, autograd
    wide = triton_core.MAX_NORM_WIDTH + 1
    x64 = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    assert torch.equal(kernels.rms_norm(x64, w), huginn_rms_norm(x64, w, 1e-6))
    assert torch.equal(kernels.rms_norm(x, w, residual=x.float()), huginn_rms_norm(x + x.float(), w, 1e-6))
    xw, ww = torch.randn(2, wide, generator=gen), torch.ones(wide)
    assert torch.equal(kernels.rms_norm(xw, ww), huginn_rms_norm(xw, ww, 1e-6))
    wg = torch.ones(64, requires_grad=True)
    kernels.rms_norm(x.float(), wg).sum().backward()
    assert wg.grad is not None
    assert calls == [1, 1]


def test_dispatch_swiglu_and_adapter_on_triton_path(gen, triton_on_cpu):
    fc = torch.randn(4, 2 * 33, generator=gen)
    assert_close_ulps(kernels.swiglu(fc), swiglu64(fc), torch.float32)
    d = 32
    adapter = torch.randn(d, 2 * d, generator=gen) / d
    x, e = torch.randn(2, 3, d, generator=gen), torch.randn(2, 3, d, generator=gen)
    inj = kernels.adapter_injection(e, adapter)
    step = kernels.adapter_step(x, adapter, inj, bias=torch.ones(d))
    expected = torch.cat([x, e], -1).double() @ adapter.double().T + 1
    torch.testing.assert_close(step.double(), expected, atol=1e-5, rtol=1e-5)
    assert step.shape == x.shape


def test_force_reference_wins_over_triton(gen, triton_on_cpu):
    x = torch.randn(3, 16, generator=gen)
    with kernels.force_reference():
        assert kernels.backend_for(x) == "reference"
        assert torch.equal(
            kernels.rms_norm(x, torch.ones(16)), core_ops.rms_norm_reference(x, torch.ones(16))
        )
    assert kernels.backend_for(x) == "triton"
