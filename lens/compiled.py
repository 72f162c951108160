"""An opt-in compiled core loop: ``torch.compile`` of every block's two halves around the key/value cache.

``model.compile_blocks()`` (or ``lens.load_model(path, compile=True)``) swaps each block's ``forward``
for :class:`CompiledBlockForward`: the part before the cache (norm, projections, qk bias, rotary) and
the part after it (output projection, residuals, norms, MLP, hook points) run as compiled graphs;
the cache update and the attention itself stay eager between them. So the iteration index, the
cache object and the growing key length never enter a graph: one graph per block class serves every
block, every iteration and every decoding step (dimensions are symbolic; PyTorch specialises a
dimension of size 1, so a prefill and a one-token step are two graphs, once). Prelude and coda blocks
share the graphs of their class.

What stays exact: the stream, the consumers, the hook points' names and iterations, the cache, exit
criteria. What changes: the compiled kernels fuse elementwise work and reductions, so results differ
from the eager path by float rounding (the eager path is the reference, bit for bit stable on CPU).
A block with a hook attached runs eagerly (hooks may read or replace activations in Python).
``model.uncompile_blocks()`` restores the eager blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lens.cache import KVCache
from lens.errors import InputError
from lens.hooks import _GLOBAL_HOOKS
from lens.layers import LoopBlock, attend

if TYPE_CHECKING:
    from lens.looped import LoopedLM

#: Compiled halves, one pair per (block class, backend, mode, dynamic): every block of that class in any
#: model calls the same compiled functions (their parameters are graph inputs, not constants).
_COMPILED: dict[tuple, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _halves(
    cls: type[LoopBlock], backend: str, mode: str | None, dynamic: bool | None
) -> tuple[Callable, Callable]:
    key = (cls, backend, mode, dynamic)
    if key not in _COMPILED:
        options: dict[str, Any] = {"backend": backend, "mode": mode, "dynamic": dynamic}
        _COMPILED[key] = (
            torch.compile(cls.attention_inputs, **options),
            torch.compile(cls.attention_finish, **options),
        )
    return _COMPILED[key]


class CompiledBlockForward:
    """A block's ``forward`` as compiled halves with the eager cache update and attention between them."""

    def __init__(self, block: LoopBlock, backend: str, mode: str | None, dynamic: bool | None) -> None:
        self.block = block
        self.inputs, self.finish = _halves(type(block), backend, mode, dynamic)
        self.points = block.hook_points()

    def hooked(self) -> bool:
        """A hook on one of the block's hook points (or a process-wide module hook): run eagerly."""
        return any(p._forward_hooks or p._forward_pre_hooks for p in self.points) or any(_GLOBAL_HOOKS)

    def __call__(
        self,
        x: Tensor,
        rope: Tensor,
        cache_index: int,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        block = self.block
        if self.hooked():
            return type(block).forward(block, x, rope, cache_index, mask, cache)
        q, k, v = self.inputs(block, x, rope)
        return self.finish(block, x, attend(q, k, v, cache_index, mask, cache))


def blocks_of(model: LoopedLM) -> list[nn.Module]:
    """Every block of the model's stages (prelude, core, coda), in that order."""
    return [block for stage in ("prelude", "core", "coda") for block in model.stage(stage)]


def compile_blocks(
    model: LoopedLM, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = True
) -> LoopedLM:
    """Compile every block of ``model`` in place (see the module docstring); returns the model."""
    blocks = []
    for block in blocks_of(model):
        if not isinstance(block, LoopBlock):
            raise InputError(f"cannot compile {type(block).__name__}: not a looplens block")
        blocks.append(block)
    for block in blocks:
        block.forward = CompiledBlockForward(block, backend, mode, dynamic)  # type: ignore[method-assign]
    return model


def uncompile_blocks(model: LoopedLM) -> LoopedLM:
    """Back to the eager blocks."""
    for block in blocks_of(model):
        block.__dict__.pop("forward", None)
    return model


def is_compiled(model: LoopedLM) -> bool:
    return any(isinstance(block.__dict__.get("forward"), CompiledBlockForward) for block in blocks_of(model))


__all__ = ["CompiledBlockForward", "compile_blocks", "is_compiled", "uncompile_blocks"]
