"""The chunked PyTorch lens pass: stream the vocabulary in blocks, never holding the ``[N, V]`` logits.

For each vocabulary chunk the logits of a block of rows are written by one ``mm`` into a preallocated
buffer and reduced in place into running per-row state (an online log-sum-exp with the matching entropy
term, strict-greater counts for the target ranks, a running top-k, the KL sums). Peak extra memory is a
few ``[row_block, chunk]`` buffers; the time is close to the bare matmul because every reduction runs
on a block that is still in cache and no ``[N, V]`` temporary is ever allocated.

With more than one torch thread on the CPU, blocks of rows are shared out to Python threads whose ops
run single-threaded (:func:`_run_in_threads`): the dozen reductions per block then end in no OpenMP
barrier, which is what made the pass 5-10x slower than the matmul on a loaded machine. The row blocks are
smaller there (``WORK_ITEMS_PER_THREAD`` per thread), so the logits' fp32 rounding can differ from a
one-thread pass (equal bit for bit at equal row blocks). Each chunk's maximum is read off its top-k
values when top-k is asked for, saving a pass over the block.

The Triton kernel's vocabulary splits are merged with the same formulas, in batch form
(:func:`merge_softmax`, :func:`merge_topk`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kernels.core_ops import rms_norm
from kernels.lens_stats.inputs import LensInputs
from kernels.lens_stats.result import LensStatistics

#: Vocabulary columns per block. With ``DEFAULT_ROW_BLOCK`` tuned on a 2-core CPU (N=2048, d=512,
#: V=32768): ``mm`` runs at the rate of one big matmul, and the 8 MiB fp32 block stays in the last-level
#: cache between the reduction passes; smaller blocks cost more op launches (and thread barriers, which
#: hurt most on a shared machine), larger ones fall out of cache.
DEFAULT_CHUNK_SIZE = 2048
#: Rows per block (see ``DEFAULT_CHUNK_SIZE``).
DEFAULT_ROW_BLOCK = 1024
#: Running maximum before any logit was seen: finite, so ``exp(m_old - m_new)`` and ``s * (m_old - m_new)``
#: stay well defined (0) without special cases.
_NO_MAX = torch.finfo(torch.float32).min


def merge_softmax(
    m: Float[Tensor, "S N"], s: Float[Tensor, "S N"], t: Float[Tensor, "S N"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"], Float[Tensor, " N"]]:
    """Merge partial softmax sums over ``S`` disjoint vocabulary parts.

    Part ``i`` holds ``m_i = max z``, ``s_i = sum exp(z - m_i)`` and ``t_i = sum exp(z - m_i) (z - m_i)``;
    the merged triple refers to the overall maximum ``M``. Then ``logsumexp = M + log s`` and
    ``entropy = log s - t / s``.
    """
    big = m.amax(0)
    delta = m - big
    scale = delta.exp()
    s_all = (scale * s).sum(0)
    t_all = (scale * (t + s * delta)).sum(0)
    return big, s_all, t_all


def merge_topk(
    values: Float[Tensor, "N c"], ids: Int[Tensor, "N c"], k: int, *, sorted: bool = False
) -> tuple[Float[Tensor, "N k"], Int[Tensor, "N k"]]:
    """The ``k`` largest of a set of candidate (value, id) pairs per row."""
    best, where = values.topk(k, dim=1, sorted=sorted)
    return best, ids.gather(1, where)


def _view(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A contiguous ``shape`` view on the front of a flat preallocated buffer."""
    numel = 1
    for size in shape:
        numel *= size
    return buf[:numel].view(shape)


class _RunningStats:
    """Per-row running state of the chunked pass, updated block by block in place."""

    def __init__(self, inputs: LensInputs, device: torch.device, chunk: int) -> None:
        n = inputs.num_states
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.inputs = inputs
        self.m = torch.full((n,), _NO_MAX, **f32)
        self.s = torch.zeros(n, **f32)
        self.t = torch.zeros(n, **f32)
        self.k = inputs.topk
        self.chunk = chunk
        if self.k:  # top-k candidates of every chunk: [N, num_chunks * k], O(N) for a fixed chunking
            num_chunks = -(-inputs.vocab_size // chunk)
            self.top_values = torch.full((n, num_chunks * self.k), float("-inf"), **f32)
            self.top_ids = torch.zeros((n, num_chunks * self.k), dtype=torch.int64, device=device)
        self.targets = inputs.targets
        if self.targets is not None:
            self.target_logits = torch.empty(self.targets.shape, **f32)
            self.greater = torch.zeros(self.targets.shape, **f32)  # exact: counts stay far below 2**24
        self.has_ref = inputs.ref_logprobs is not None
        if self.has_ref:
            self.kl_sum = torch.zeros(n, **f32)  # sum_v q_v (r_v - z_v)
            self.q_sum = torch.zeros(n, **f32)  # sum_v q_v (1 up to the reference's rounding)
            assert inputs.ref_logprobs is not None and inputs.ref_index is not None
            self.ref_rows_are_states = bool(
                inputs.ref_logprobs.shape[0] == n
                and torch.equal(inputs.ref_index, torch.arange(n, device=device))
            )

    def update(self, block: Tensor, rows: slice, v0: int, scratch: Tensor, scratch2: Tensor) -> None:
        """Fold the logits ``block = z[rows, v0 : v0 + cols]`` into the state (``block`` is overwritten).

        ``scratch`` and ``scratch2`` are flat fp32 buffers of at least ``block.numel()`` elements.
        """
        cols = block.shape[1]
        m_old = self.m[rows]
        if self.k:  # each chunk's top-k are kept as candidates and merged once at the end
            kc = min(self.k, cols)
            c0 = (v0 // self.chunk) * self.k
            top_values = self.top_values[rows, c0 : c0 + kc]
            torch.topk(block, kc, dim=1, sorted=False, out=(top_values, self.top_ids[rows, c0 : c0 + kc]))
            self.top_ids[rows, c0 : c0 + kc] += v0
            block_max = top_values.amax(1)  # the chunk's maximum is among its top k: no pass over the block
        else:
            block_max = block.amax(1)
        m_new = torch.maximum(m_old, block_max)
        if self.targets is not None:
            self._count_greater(block, rows, v0, scratch)
        shifted = block.sub_(m_new[:, None])  # z - m_new
        if self.has_ref:
            self._kl_terms(shifted, rows, v0, m_new, scratch, scratch2)
        e = torch.exp(shifted, out=_view(scratch, shifted.shape))
        s_blk = e.sum(1)
        t_blk = shifted.mul_(e).sum(1)
        delta = m_old - m_new  # <= 0; huge negative before the first block, where s = t = 0
        alpha = delta.exp()
        s_old = self.s[rows]
        self.t[rows] = alpha * (self.t[rows] + s_old * delta) + t_blk
        self.s[rows] = alpha * s_old + s_blk
        self.m[rows] = m_new

    def _count_greater(self, block: Tensor, rows: slice, v0: int, scratch: Tensor) -> None:
        """Add ``#{v in block : z_v > z_target}`` per target, the target's own column excluded."""
        tz = self.target_logits[rows]
        flags = _view(scratch, block.shape)
        greater = self.greater[rows]
        for j in range(tz.shape[1]):
            # a float 0/1 buffer: summing it is ~10x faster than summing a bool one, and exact below 2**24
            greater[:, j] += torch.gt(block, tz[:, j : j + 1], out=flags).sum(1)
        assert self.targets is not None  # only called when targets were asked for
        rel = self.targets[rows] - v0
        inside = (rel >= 0) & (rel < block.shape[1])
        if bool(inside.any()):
            own = block.gather(1, rel.clamp(0, block.shape[1] - 1))
            greater -= (inside & (own > tz)).float()

    def _kl_terms(
        self, shifted: Tensor, rows: slice, v0: int, m_new: Tensor, scratch: Tensor, scratch2: Tensor
    ) -> None:
        """Accumulate ``sum q (r - z)`` and ``sum q`` for ``KL(q || p) = sum q (r - z) + lse * sum q``."""
        ref_logprobs, ref_index = self.inputs.ref_logprobs, self.inputs.ref_index
        assert ref_logprobs is not None and ref_index is not None  # only called with a reference
        ref = ref_logprobs[:, v0 : v0 + shifted.shape[1]]
        ref = ref[rows] if self.ref_rows_are_states else ref[ref_index[rows]]
        # -inf (q = 0) becomes a huge finite number: q = exp(r) = 0 and 0 * (r - z) = 0 instead of nan
        r = torch.clamp(ref, min=_NO_MAX / 4, out=_view(scratch2, shifted.shape))
        q = torch.exp(r, out=_view(scratch, shifted.shape))
        q_blk = q.sum(1)
        kl_blk = r.sub_(shifted).mul_(q).sum(1)  # sum q (r - (z - m_new))
        self.kl_sum[rows] += kl_blk - m_new * q_blk
        self.q_sum[rows] += q_blk

    def finish(self) -> LensStatistics:
        log_s = self.s.log()
        lse = self.m + log_s
        out: dict[str, Any] = {"logsumexp": lse, "entropy": log_s - self.t / self.s}
        if self.targets is not None:
            out.update(
                target_logits=self.target_logits,
                target_ranks=self.greater.to(torch.int64) + 1,
                target_logprobs=self.target_logits - lse[:, None],
            )
        if self.k:
            top_v, top_i = merge_topk(self.top_values, self.top_ids, self.k, sorted=True)
            out.update(topk_ids=top_i, topk_logits=top_v, topk_logprobs=top_v - lse[:, None])
        if self.has_ref:
            out["kl"] = self.kl_sum + lse * self.q_sum
        return LensStatistics(**out)


def normed_states(inputs: LensInputs) -> Tensor:
    """``rmsnorm(hidden)`` in the input dtype (Huginn's rounding), or ``hidden`` without a norm."""
    if inputs.norm_weight is None:
        return inputs.hidden
    return rms_norm(inputs.hidden, inputs.norm_weight, inputs.eps)


def lens_statistics_chunked(
    inputs: LensInputs, chunk_size: int | None = None, row_block: int | None = None, poison: bool = False
) -> LensStatistics:
    """Lens statistics streamed over ``[row_block, chunk_size]`` logit blocks (any device, fp32 math).

    ``poison`` fills the reused block buffers with nan first (tests: no stale value may leak into a result).
    """
    chunk = int(chunk_size or DEFAULT_CHUNK_SIZE)
    rb = int(row_block or DEFAULT_ROW_BLOCK)
    if chunk <= 0 or rb <= 0:
        raise ValueError(f"lens_statistics: chunk_size and row_block must be positive, got {chunk}, {rb}")
    x = normed_states(inputs).float().contiguous()
    w = inputs.unembedding
    n, v = inputs.num_states, inputs.vocab_size
    chunk, rb = min(chunk, v), max(1, min(rb, n))
    state = _RunningStats(inputs, x.device, chunk)
    if state.targets is not None:  # separate dot products; the rank count excludes the target's own column
        for r0 in range(0, n, rb):
            rows = slice(r0, r0 + rb)
            ids = state.targets[rows]
            tw = w.index_select(0, ids.flatten()).view(*ids.shape, -1).float()  # [rows, K, d]
            state.target_logits[rows] = torch.bmm(tw, x[rows, :, None])[..., 0]
    threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    if threads > 1 and row_block is None:  # enough row blocks that the workers stay busy to the end
        rb = max(1, min(rb, -(-n // (WORK_ITEMS_PER_THREAD * threads))))

    def buffers() -> tuple[Tensor, Tensor, Tensor]:
        new = torch.full if poison else torch.empty
        fill = (float("nan"),) if poison else ()
        block_buf = new((rb * chunk,), *fill, dtype=torch.float32, device=x.device)
        scratch = new((rb * chunk,), *fill, dtype=torch.float32, device=x.device)
        scratch2 = (
            new((rb * chunk,), *fill, dtype=torch.float32, device=x.device) if state.has_ref else scratch
        )
        return block_buf, scratch, scratch2

    def run_rows(rows: slice, bufs: tuple[Tensor, Tensor, Tensor]) -> None:
        """Every vocabulary chunk for one block of rows (each row's chunks in order, as a serial pass)."""
        block_buf, scratch, scratch2 = bufs
        x_rows = x[rows]
        for v0 in range(0, v, chunk):
            w_chunk = w[v0 : v0 + chunk]
            w_t = (w_chunk if w_chunk.dtype == torch.float32 else w_chunk.float()).T
            block = torch.mm(x_rows, w_t, out=_view(block_buf, (x_rows.shape[0], w_t.shape[1])))
            state.update(block, rows, v0, scratch, scratch2)

    row_blocks = [slice(r0, min(n, r0 + rb)) for r0 in range(0, n, rb)]
    if threads > 1 and len(row_blocks) > 1:
        _run_in_threads(row_blocks, run_rows, buffers, threads)
    else:
        bufs = buffers()
        for rows in row_blocks:
            run_rows(rows, bufs)
    return state.finish()


#: Row blocks per worker thread in the threaded CPU pass (load balance on a machine other jobs share).
WORK_ITEMS_PER_THREAD = 4


def _run_in_threads(
    row_blocks: list[slice],
    run_rows: Callable[[slice, tuple[Tensor, Tensor, Tensor]], None],
    buffers: Callable[[], tuple[Tensor, Tensor, Tensor]],
    threads: int,
) -> None:
    """Row blocks on ``threads`` Python threads whose ops each run single-threaded (torch's thread count
    is set to 1 for the duration of the pass, then restored).

    Every op of the pass is its own OpenMP region; with torch's threads, each of the dozen reductions per
    block ends in a barrier, and on a machine whose cores other jobs also use, a barrier waits for a
    descheduled thread (5-10x slower than the one big matmul at a load of 8 on 2 cores). Disjoint rows on
    separate threads need no barrier: each thread runs its blocks at its own pace (torch ops release the
    GIL), the threads share the remaining blocks, and the result is the serial pass's, bit for bit (each
    row still sees its vocabulary chunks in order).
    """
    pending = list(reversed(row_blocks))
    lock = threading.Lock()
    errors: list[BaseException] = []
    # autograd modes are thread-local: a new thread would record a graph (and refuse ``out=``) under a
    # caller's no_grad, or refuse in-place work on inference tensors; the workers run in the caller's modes
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def work() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            run_pending()

    def run_pending() -> None:
        bufs = buffers()
        while not errors:
            with lock:
                if not pending:
                    return
                rows = pending.pop()
            try:
                run_rows(rows, bufs)
            except BaseException as err:  # re-raised in the caller's thread
                errors.append(err)

    with _THREADS_LOCK:  # the thread count is process-wide: one threaded pass at a time sets and restores it
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            workers = [threading.Thread(target=work, name=f"lens-stats-{i}") for i in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
        finally:
            torch.set_num_threads(previous)
    if errors:
        raise errors[0]


_THREADS_LOCK = threading.Lock()


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_ROW_BLOCK",
    "lens_statistics_chunked",
    "merge_softmax",
    "merge_topk",
    "normed_states",
]
