"""The fused lens-statistics kernel (Triton): unembedding matmul + all per-row statistics in one sweep.

Each program owns ``BLOCK_N`` states and a contiguous range of vocabulary tiles (a *split*). For every
``[BLOCK_N, BLOCK_V]`` logit tile, accumulated in fp32 over ``d`` with ``tl.dot``, it updates in
registers:

* an online log-sum-exp ``(m, s = sum e^{z-m})`` and the entropy term ``t = sum e^{z-m} (z-m)``
  (``entropy = log s - t / s``), rescaled whenever the running max grows;
* per target, the count of strictly larger logits, the target's own column excluded (the target logit
  comes from a separate fp32 dot product in the prologue, so it cannot count against itself);
* a running top-k: only tile entries above the current k-th value are inserted, one per row per round,
  so after the first tiles a tile costs one comparison and usually no round;
* ``sum q (r - z)`` and ``sum q`` of the reference log-probabilities ``r`` (``q = e^r``) for the KL.

Splits write ``O(N)`` partials that a few PyTorch ops merge with the same formulas as the chunked CPU
path (:mod:`kernels.lens_stats.chunked`). The logits never leave the registers. The states are
normalised first (Huginn's RMSNorm, rounded to the input dtype, exactly as the reference does), by the
fused norm kernel of :mod:`kernels.triton_core`: an ``O(N d)`` pass. Folding the gain into the
unembedding (``W' = diag(g) W``) and scaling rows by ``rstd`` after the matmul would skip it, but would
round differently from Huginn in bf16 and move ranks of near-tied tokens.

On a GPU, ``tl.dot`` on fp32 inputs defaults to tf32; this launcher asks for ``"ieee"`` with fp32 inputs
unless told otherwise, because tf32 tile logits would disagree with the fp32 target logits by ~1e-3 and
shift ranks. Under ``TRITON_INTERPRET=1`` (the CPU tests) ``tl.dot`` is exact fp32 whatever is asked;
bf16 ``tl.dot`` is not supported by the interpreter, so the tests use fp32 and fp16.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from kernels.core_ops import rms_norm_reference
from kernels.lens_stats.chunked import merge_softmax, merge_topk
from kernels.lens_stats.inputs import LensInputs, prepare_lens_inputs
from kernels.lens_stats.result import LensStatistics
from kernels.triton_core import KERNEL_DTYPES, rms_norm_supported, rms_norm_triton

#: Most targets per state the kernel keeps in registers; more fall back to the chunked path.
MAX_TARGETS = 8
#: "No logit seen yet": finite, so the first rescale ``exp(m_old - m_new)`` is 0 without nan.
_NO_MAX = tl.constexpr(-3.0e38)


@triton.jit
def _lens_stats_kernel(
    X,
    W,
    T,
    REF,
    REF_IDX,
    OUT_M,
    OUT_S,
    OUT_T,
    OUT_KL,
    OUT_Q,
    OUT_CNT,
    OUT_TZ,
    OUT_TOPV,
    OUT_TOPI,
    N,
    V,
    D,
    stride_x,
    stride_w,
    stride_ref,
    NUM_TARGETS: tl.constexpr,
    KP: tl.constexpr,
    TOPK: tl.constexpr,
    TKP: tl.constexpr,
    HAS_REF: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    dk = tl.arange(0, BLOCK_D)
    vc = tl.arange(0, BLOCK_V)
    kc = tl.arange(0, KP)
    tc = tl.arange(0, TKP)
    x_rows = X + rows64[:, None] * stride_x

    # prologue: target ids and their logits by separate fp32 dot products
    tgt = tl.load(
        T + rows64[:, None] * NUM_TARGETS + kc[None, :],
        mask=row_ok[:, None] & (kc[None, :] < NUM_TARGETS),
        other=0,
    ).to(tl.int32)
    tz = tl.zeros((BLOCK_N, KP), tl.float32)
    for j in tl.static_range(NUM_TARGETS):
        t_j = tl.sum(tl.where(kc[None, :] == j, tgt, 0), axis=1)
        w_rows = W + t_j.to(tl.int64)[:, None] * stride_w
        acc_j = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = row_ok[:, None] & ((d0 + dk) < D)[None, :]
            xv = tl.load(x_rows + d0 + dk[None, :], mask=d_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + d0 + dk[None, :], mask=d_ok, other=0.0).to(tl.float32)
            acc_j += tl.sum(xv * wv, axis=1)
        tz = tl.where(kc[None, :] == j, acc_j[:, None], tz)
    greater = tl.zeros((BLOCK_N, KP), tl.int32)

    m = tl.full((BLOCK_N,), _NO_MAX, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    kl = tl.zeros((BLOCK_N,), tl.float32)
    q_sum = tl.zeros((BLOCK_N,), tl.float32)
    # running top-k: slots >= TOPK hold +inf so the minimum (the slot to replace) is always a real one
    top_v = tl.where(tc[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, TKP), tl.float32)
    top_i = tl.zeros((BLOCK_N, TKP), tl.int32)
    if HAS_REF:
        ref_rows = REF + tl.load(REF_IDX + rows64, mask=row_ok, other=0).to(tl.int64)[:, None] * stride_ref

    num_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(num_tiles, tl.num_programs(1))
    tile_lo = pid_s * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)  # may be empty: the partials then stay neutral
    for tile in range(tile_lo, tile_hi):
        v0 = tile * BLOCK_V
        cols = v0 + vc
        col_ok = cols < V
        w_cols = W + cols.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + dk) < D
            xt = tl.load(x_rows + d0 + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_cols + d0 + dk[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        # columns past V get a huge finite negative logit: exp -> 0 and 0 * (z - m) = 0, no nan, no mask
        z = tl.where(col_ok[None, :], acc, _NO_MAX)

        # online log-sum-exp and entropy term
        m_new = tl.maximum(m, tl.max(z, axis=1))
        zs = z - m_new[:, None]
        e = tl.exp(zs)
        delta = m - m_new
        alpha = tl.exp(delta)
        t = alpha * (t + s * delta) + tl.sum(e * zs, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

        if HAS_REF:
            r = tl.load(ref_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=_NO_MAX).to(
                tl.float32
            )
            # r = -inf (q = 0) becomes huge finite: 0 * (r - z) = 0 instead of nan; a nan r stays nan
            r = tl.maximum(r, _NO_MAX, propagate_nan=tl.PropagateNan.ALL)
            q = tl.exp(r)
            kl += tl.sum(q * (r - z), axis=1)
            q_sum += tl.sum(q, axis=1)

        for j in tl.static_range(NUM_TARGETS):
            tz_j = tl.sum(tl.where(kc[None, :] == j, tz, 0.0), axis=1)
            t_j = tl.sum(tl.where(kc[None, :] == j, tgt, 0), axis=1)
            above = (z > tz_j[:, None]) & (cols[None, :] != t_j[:, None])
            greater += tl.where(kc[None, :] == j, tl.sum(above.to(tl.int32), axis=1)[:, None], 0)

        if TOPK > 0:
            kth = tl.min(top_v, axis=1)
            cand = tl.where(col_ok[None, :] & (z > kth[:, None]), z, float("-inf"))
            best = tl.max(cand, axis=1)
            while tl.max(best, axis=0) > float("-inf"):
                col = tl.min(tl.where(cand == best[:, None], vc[None, :], BLOCK_V), axis=1)
                slot = tl.min(tl.where(top_v == kth[:, None], tc[None, :], TKP), axis=1)
                put = (tc[None, :] == slot[:, None]) & (best > float("-inf"))[:, None]
                top_v = tl.where(put, best[:, None], top_v)
                top_i = tl.where(put, (v0 + col)[:, None], top_i)
                kth = tl.min(top_v, axis=1)
                cand = tl.where((vc[None, :] == col[:, None]) | (cand <= kth[:, None]), float("-inf"), cand)
                best = tl.max(cand, axis=1)

    out = pid_s * N + rows64
    tl.store(OUT_M + out, m, mask=row_ok)
    tl.store(OUT_S + out, s, mask=row_ok)
    tl.store(OUT_T + out, t, mask=row_ok)
    if HAS_REF:
        tl.store(OUT_KL + out, kl, mask=row_ok)
        tl.store(OUT_Q + out, q_sum, mask=row_ok)
    if NUM_TARGETS > 0:
        k_ok = row_ok[:, None] & (kc[None, :] < NUM_TARGETS)
        tl.store(OUT_CNT + out[:, None] * NUM_TARGETS + kc[None, :], greater, mask=k_ok)
        if pid_s == 0:
            tl.store(OUT_TZ + rows64[:, None] * NUM_TARGETS + kc[None, :], tz, mask=k_ok)
    if TOPK > 0:
        t_ok = row_ok[:, None] & (tc[None, :] < TOPK)
        tl.store(OUT_TOPV + out[:, None] * TOPK + tc[None, :], top_v, mask=t_ok)
        tl.store(OUT_TOPI + out[:, None] * TOPK + tc[None, :], top_i, mask=t_ok)


def lens_supported(inputs: LensInputs) -> bool:
    """Inputs the kernel covers (the dispatcher sends anything else to the chunked PyTorch path)."""
    return (
        inputs.hidden.dtype in KERNEL_DTYPES
        and inputs.unembedding.dtype in KERNEL_DTYPES
        and (inputs.norm_weight is None or inputs.norm_weight.dtype in KERNEL_DTYPES)
        and inputs.num_targets <= MAX_TARGETS
        and inputs.vocab_size < 2**31 - 2 * 1024
        and inputs.num_states > 0
    )


#: Candidate tiles for the GPU autotuner (first call per shape key). Compiled for sm_90 with every
#: statistic on (K = 8, top-10, KL), 64 x 64 tiles spill next to nothing and 64 x 128 spills a few hundred
#: bytes per thread for twice the operand reuse (``python -m tests.kernels.compile_sm90`` prints both);
#: which wins depends on d, V and the statistics asked for, so the GPU measures instead of a guess here.
_GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": 64}, num_warps=8, num_stages=stages)
    for bn, bv, stages in ((64, 128, 3), (128, 128, 3), (64, 64, 4), (128, 64, 3))
]
_GPU_CONFIGS_32BIT = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": 32}, num_warps=8, num_stages=3)
    for bn, bv in ((64, 128), (64, 64), (128, 64))
]
_TUNE_KEY = ["V", "D", "NUM_TARGETS", "TOPK", "HAS_REF", "UPCAST", "INPUT_PRECISION"]
_lens_stats_tuned_16bit = triton.autotune(_GPU_CONFIGS_16BIT, key=_TUNE_KEY)(_lens_stats_kernel)
_lens_stats_tuned_32bit = triton.autotune(_GPU_CONFIGS_32BIT, key=_TUNE_KEY)(_lens_stats_kernel)
#: Rows per program assumed when choosing the number of vocabulary splits (the grid's second axis).
_NOMINAL_BLOCK_N = 64


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> Tensor:
    """An output buffer the kernel must fill; ``poison`` pre-fills it with nan / a garbage id (tests)."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(
        shape, float("nan") if dtype.is_floating_point else -(2**30), dtype=dtype, device=device
    )


def lens_statistics_triton_inputs(
    inputs: LensInputs,
    *,
    input_precision: str | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    poison: bool = False,
) -> LensStatistics:
    """Run the fused kernel on validated inputs (see :func:`lens_statistics_triton`)."""
    if not lens_supported(inputs):
        raise ValueError(
            f"lens_statistics_triton: unsupported input (dtypes {inputs.hidden.dtype}/{inputs.unembedding.dtype} "
            f"in {KERNEL_DTYPES}, K = {inputs.num_targets} <= {MAX_TARGETS}, N > 0)"
        )
    x = inputs.hidden
    if inputs.norm_weight is not None:
        if rms_norm_supported(x, inputs.norm_weight):
            x = rms_norm_triton(x, inputs.norm_weight, inputs.eps)
        else:
            x = rms_norm_reference(x, inputs.norm_weight, inputs.eps)
    x = x.contiguous()
    w = inputs.unembedding if inputs.unembedding.stride(1) == 1 else inputs.unembedding.contiguous()
    n, d = x.shape
    v = w.shape[0]
    device = x.device
    upcast = x.dtype != w.dtype
    wide = upcast or x.dtype == torch.float32
    precision = input_precision or ("ieee" if wide else "tf32")

    tuned = device.type == "cuda" and block_n is None and block_v is None and block_d is None
    bn = block_n or _NOMINAL_BLOCK_N
    bv = block_v or 128
    if num_splits is None:  # about two waves of programs on the GPU; one split per row block elsewhere
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = triton.cdiv(2 * sms, triton.cdiv(n, bn))
    splits = max(1, min(num_splits, triton.cdiv(v, bv)))

    k_t, k = inputs.num_targets, inputs.topk
    f32, i32 = torch.float32, torch.int32
    has_ref = inputs.ref_logprobs is not None
    part_m = _buffer((splits, n), f32, device, poison)
    part_s = _buffer((splits, n), f32, device, poison)
    part_t = _buffer((splits, n), f32, device, poison)
    part_kl = _buffer((splits, n), f32, device, poison) if has_ref else part_m
    part_q = _buffer((splits, n), f32, device, poison) if has_ref else part_m
    part_cnt = _buffer((splits, n, k_t), i32, device, poison) if k_t else part_m
    target_logits = _buffer((n, k_t), f32, device, poison) if k_t else part_m
    part_topv = _buffer((splits, n, k), f32, device, poison) if k else part_m
    part_topi = _buffer((splits, n, k), i32, device, poison) if k else part_m
    targets = inputs.targets if k_t else x  # an unused pointer when there are no targets
    ref = x if inputs.ref_logprobs is None else inputs.ref_logprobs
    if has_ref and ref.stride(1) != 1:
        ref = ref.contiguous()
    ref_index = x if inputs.ref_index is None else inputs.ref_index

    args = (
        x,
        w,
        targets,
        ref,
        ref_index,
        part_m,
        part_s,
        part_t,
        part_kl,
        part_q,
        part_cnt,
        target_logits,
        part_topv,
        part_topi,
        n,
        v,
        d,
        x.stride(0),
        w.stride(0),
        ref.stride(0) if has_ref else 0,
    )
    flags = {
        "NUM_TARGETS": k_t,
        "KP": max(2, triton.next_power_of_2(k_t)),
        "TOPK": k,
        "TKP": max(2, triton.next_power_of_2(k)),
        "HAS_REF": has_ref,
        "UPCAST": upcast,
        "INPUT_PRECISION": precision,
    }
    if tuned:
        kernel = _lens_stats_tuned_32bit if wide else _lens_stats_tuned_16bit
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](*args, **flags)
    else:
        _lens_stats_kernel[(triton.cdiv(n, bn), splits)](
            *args,
            **flags,
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_D=block_d or (32 if wide else 64),
            num_warps=num_warps,
            num_stages=num_stages,
        )

    big, s_all, t_all = merge_softmax(part_m, part_s, part_t)
    log_s = s_all.log()
    lse = big + log_s
    out: dict[str, Any] = {"logsumexp": lse, "entropy": log_s - t_all / s_all}
    if k_t:
        out.update(
            target_logits=target_logits,
            target_ranks=part_cnt.sum(0, dtype=torch.int64) + 1,
            target_logprobs=target_logits - lse[:, None],
        )
    if k:
        cand_v = part_topv.permute(1, 0, 2).reshape(n, splits * k)
        cand_i = part_topi.permute(1, 0, 2).reshape(n, splits * k).to(torch.int64)
        top_v, top_i = merge_topk(cand_v, cand_i, k, sorted=True)
        out.update(topk_ids=top_i, topk_logits=top_v, topk_logprobs=top_v - lse[:, None])
    if has_ref:
        out["kl"] = part_kl.sum(0) + lse * part_q.sum(0)
    return LensStatistics(**out)


def lens_statistics_triton(
    hidden: Float[Tensor, "N d"],
    unembedding: Float[Tensor, "V d"],
    norm_weight: Float[Tensor, " d"] | None = None,
    eps: float = 1e-6,
    targets: Int[Tensor, "N K"] | None = None,
    topk: int = 0,
    ref_logprobs: Float[Tensor, "R V"] | None = None,
    ref_index: Int[Tensor, " N"] | None = None,
    **launch: object,
) -> LensStatistics:
    """The Triton lens pass, called directly (tests, benchmarks); same arguments as :func:`kernels.lens_statistics`.

    ``launch`` keywords: ``input_precision`` (``"ieee"`` | ``"tf32"`` | ``"tf32x3"``, default ``"ieee"`` for fp32
    inputs), ``block_n``/``block_v``/``block_d`` (on CUDA, leaving all three out autotunes the tiles),
    ``num_splits`` (vocabulary splits per row block), ``num_warps``, ``num_stages``, and ``poison=True`` to
    pre-fill every buffer the kernel writes with nan / garbage ids.
    """
    inputs = prepare_lens_inputs(
        hidden, unembedding, norm_weight, eps, targets, topk, ref_logprobs, ref_index
    )
    return lens_statistics_triton_inputs(inputs, **launch)  # type: ignore[arg-type]


__all__ = ["MAX_TARGETS", "lens_statistics_triton", "lens_statistics_triton_inputs", "lens_supported"]
