"""TransformerLens-style hook points, without the TransformerLens dependency.

A ``HookPoint`` is an identity module placed on an activation; a hook is called as TransformerLens
calls it, ``fn(tensor, hook=hook_point)`` (so ``def f(act, *, hook)`` works), and may read the tensor or
return a replacement (an intervention). Names, ``run_with_hooks``, ``run_with_cache`` and the ``hooks()``
context manager follow TransformerLens, so code written for a ``HookedTransformer`` reads the same here.
In a recurrent model one hook point fires once per iteration: ``hook.iteration`` tells which, and
``run_with_cache`` stacks every iteration of a looped hook point on a leading axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

#: torch's process-wide module hooks (``register_module_forward_hook`` and friends): dicts mutated in place.
_GLOBAL_HOOKS = tuple(
    getattr(_torch_module, name)
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    if hasattr(_torch_module, name)
)

HookFunction = Callable[..., Tensor | None]  # fn(tensor, *, hook: HookPoint) -> replacement or None
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


class IterationClock:
    """The recurrent iteration the forward pass is in, shared by every hook point of a model.

    Setting it is one attribute store on a plain object (not ``nn.Module.__setattr__`` on every hook
    point, which cost about a tenth of a small model's decoding time).
    """

    __slots__ = ("iteration",)

    def __init__(self) -> None:
        self.iteration = 0


class HookPoint(nn.Module):
    """Identity on the forward pass; carries its name and the current recurrent iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.clock = IterationClock()  # replaced by the model's shared clock in ``setup_hooks``
        self.ctx: dict[str, Any] = {}
        self._handles: list[tuple[Any, bool]] = []

    @property
    def iteration(self) -> int:
        """The recurrent iteration (1-based) of the activation passing through; 0 outside the loop."""
        return self.clock.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.clock.iteration = value

    def add_hook(self, fn: HookFunction, dir: str = "fwd", is_permanent: bool = False) -> Any:
        """Register ``fn(activation, hook=self)``; a non-None return value replaces the activation."""
        if dir != "fwd":
            raise ValueError("only forward hooks are supported on recurrent hook points (dir='fwd')")

        def torch_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            return fn(output, hook=self)

        handle = self.register_forward_hook(torch_hook)
        self._handles.append((handle, is_permanent))
        return handle

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False) -> None:
        kept: list[tuple[Any, bool]] = []
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The identity, without ``nn.Module``'s call machinery when nothing is attached.

        A block passes its activations through four hook points; with no hook on them (the common
        case) the call costs one check instead of the module call path. Any hook (here, global, or a
        ``forward`` replaced on the instance, as tracing tools do) takes the full path.
        """
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or "forward" in self.__dict__
            or any(_GLOBAL_HOOKS)
            or len(args) != 1
            or kwargs
        ):
            return super().__call__(*args, **kwargs)
        return args[0]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HookedModule(nn.Module):
    """Mixin for a root module: names its hook points and runs with temporary hooks."""

    def setup_hooks(self) -> None:
        """Give every hook point its dotted module path as name and the model's one iteration clock
        (call at the end of ``__init__``)."""
        self.hook_dict: dict[str, HookPoint] = {}
        self.hook_clock = IterationClock()
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                module.clock = self.hook_clock
                self.hook_dict[name] = module

    def set_hook_iteration(self, iteration: int) -> None:
        """Tell every hook point which recurrent iteration runs now (one store on the shared clock)."""
        self.hook_clock.iteration = iteration

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

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: str | Any = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run ``forward`` and cache activations by hook name, as ``HookedTransformer.run_with_cache`` does.

        Returns ``(logits, cache)``. ``names_filter`` is a name, a list of names or a predicate (default:
        every hook point). A hook point inside the loop fires once per iteration: its cache entry stacks
        them, ``[T, *shape]`` in iteration order; hook points outside the loop keep their plain shape.

        Example:
            >>> import torch, lens
            >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
            >>> logits, cache = model.run_with_cache(
            ...     torch.tensor([[1, 2, 3]]), num_steps=4, init_state="zeros",
            ...     names_filter=lambda name: name.endswith("hook_resid_post"))
            >>> tuple(cache["transformer.core_block.0.hook_resid_post"].shape)  # [T, B, S, d]
            (4, 1, 3, 32)
            >>> tuple(cache["transformer.prelude.0.hook_resid_post"].shape)
            (1, 3, 32)
        """
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if names_filter is None:
            wanted = list(self.hook_dict)
        elif callable(names_filter):
            wanted = [n for n in self.hook_dict if names_filter(n)]
        else:
            wanted = list(names_filter)
            for name in wanted:
                self._resolve(name)  # an unknown name is an error, not an empty cache
        seen: dict[str, list[tuple[int, Tensor]]] = {name: [] for name in wanted}

        def keep(tensor: Tensor, *, hook: HookPoint) -> None:
            kept = tensor.detach()
            seen[hook.name or ""].append((hook.iteration, kept.to(device) if device is not None else kept))

        with self.hooks([(name, keep) for name in wanted]):
            out = self(*args, **kwargs)
        cache = ActivationCache()
        for name, items in seen.items():
            if not items:
                continue
            looped = any(iteration > 0 for iteration, _ in items)
            cache[name] = torch.stack([t for _, t in items]) if looped or len(items) > 1 else items[0][1]
        return getattr(out, "logits", out), cache


class ActivationCache(dict):
    """Activations by hook name (a plain ``dict``), as ``run_with_cache`` returns them."""

    def __getitem__(self, name: str) -> Tensor:
        if name not in self:
            raise KeyError(
                f"{name!r} was not cached; cached: {sorted(self)[:8]}{' …' if len(self) > 8 else ''}"
            )
        return super().__getitem__(name)
