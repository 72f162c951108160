"""TransformerLens-style hook points, without the TransformerLens dependency.

A ``HookPoint`` is an identity module placed on an activation; a hook ``fn(tensor, hook)`` may read it
or return a replacement (an intervention). Names, ``run_with_hooks`` and the ``hooks()`` context
manager follow TransformerLens, so code written for a ``HookedTransformer`` reads the same here. In a
recurrent model one hook point fires once per iteration: ``hook.iteration`` tells which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

HookFunction = Callable[[Tensor, "HookPoint"], Tensor | None]


class HookPoint(nn.Module):
    """Identity on the forward pass; carries its name and the current recurrent iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.iteration: int = 0
        self.ctx: dict[str, Any] = {}
        self._handles: list[tuple[Any, bool]] = []

    def add_hook(self, fn: HookFunction, dir: str = "fwd", is_permanent: bool = False) -> Any:
        """Register ``fn(activation, hook)``; a non-None return value replaces the activation."""
        if dir != "fwd":
            raise ValueError("only forward hooks are supported on recurrent hook points (dir='fwd')")

        def torch_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            return fn(output, self)

        handle = self.register_forward_hook(torch_hook)
        self._handles.append((handle, is_permanent))
        return handle

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False) -> None:
        kept = []
        for handle, permanent in self._handles:
            if permanent and not including_permanent:
                kept.append((handle, permanent))
            else:
                handle.remove()
        self._handles = kept

    def clear_context(self) -> None:
        self.ctx.clear()

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HookedModule(nn.Module):
    """Mixin for a root module: names its hook points and runs with temporary hooks."""

    def setup_hooks(self) -> None:
        """Give every hook point its dotted module path as name (call at the end of ``__init__``)."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def set_hook_iteration(self, iteration: int) -> None:
        for hook in self.hook_dict.values():
            hook.iteration = iteration

    def _resolve(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if callable(name):
            return [h for n, h in self.hook_dict.items() if name(n)]
        if name not in self.hook_dict:
            close = [n for n in self.hook_dict if name.split(".")[-1] in n][:5]
            raise KeyError(f"no hook point named {name!r}; similar: {close}")
        return [self.hook_dict[name]]

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        fn: HookFunction,
        dir: str = "fwd",
        is_permanent: bool = False,
    ) -> None:
        for hook in self._resolve(name):
            hook.add_hook(fn, dir=dir, is_permanent=is_permanent)

    def reset_hooks(self, including_permanent: bool = False) -> None:
        for hook in self.hook_dict.values():
            hook.remove_hooks(including_permanent=including_permanent)
            hook.clear_context()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFunction]] = (),
        reset_hooks_end: bool = True,
    ) -> Iterator[HookedModule]:
        """Context manager: hooks added on entry are removed on exit, even after an error."""
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks()

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFunction]] = (),
        reset_hooks_end: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run ``forward`` with temporary hooks, as ``HookedTransformer.run_with_hooks`` does."""
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*args, **kwargs)
