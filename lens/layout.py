"""The unrolled layout of a looped language model: the one description every other part reads.

A looped LM is read as stages: an optional **prelude** (blocks run once), a **core** of blocks run
``T`` times (the recurrence), an optional **coda** (blocks run once after the loop), then a final
norm and the LM head. How the iterations are chained and how a state is decoded differs per family;
:class:`UnrolledLayout` says it in data (JSON), so that the stream, the key/value cache, the probes,
the studies' figures and the explorer all derive site names and indices from this one object, and a
run's manifest carries it to every reader.

Sites (the stream's names for states; block indices 0-based like the module paths, iterations 1-based):

``embed``          the embedded input
``prelude.{i}``    prelude block outputs
``adapter``        the input injection opening each iteration (families with an adapter)
``core.{j}``       core block outputs, once per iteration
``latent``         the state the recurrence hands on: the coda's input after the last iteration, or
                   (families that normalise and feed back the state, Ouro) the normalised state
                   after every iteration
``coda.{i}``       coda block outputs
``final``          the state the LM head reads

The **unrolled order** numbers block outputs: prelude blocks, then core blocks iteration by iteration
(t-major), then coda blocks (Huginn-3.5B at 16 iterations: 2 + 16 × 4 + 2 = 68). Sites that are not
block outputs have ``unrolled_index = -1``.

Example:
    >>> layout = UnrolledLayout(prelude=2, core=4, coda=2)  # Huginn-3.5B's stages
    >>> layout.num_unrolled(16), layout.unrolled_index("core.3", 16, 16), layout.locate(67, 16)
    (68, 65, ('coda', 0, 1))
    >>> UnrolledLayout.from_dict(layout.to_dict()) == layout
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lens.errors import ConfigError, InputError

__all__ = ["SITE_PATTERN", "STAGES", "ModulePaths", "Unrolled", "UnrolledLayout"]

#: Every site name any family emits (which of them a model has is its layout's business).
SITE_PATTERN = r"^(embed|adapter|latent|final|(prelude|core|coda)\.[0-9]+)$"
STAGES = ("prelude", "core", "coda")
_SITE_RE = re.compile(r"^(embed|adapter|latent|final)$|^(prelude|core|coda)\.(\d+)$")
_BLOCK_STAGES = {"prelude", "core", "coda"}


@dataclass(frozen=True)
class ModulePaths:
    """Where each part lives in the module tree (the checkpoint's own names; pyvene-style map).

    Stage entries name a ``ModuleList`` of blocks; ``None`` where the family has no such part.
    """

    embed: str = "transformer.wte"
    prelude: str | None = "transformer.prelude"
    adapter: str | None = "transformer.adapter"
    core: str = "transformer.core_block"
    coda: str | None = "transformer.coda"
    norm: str = "transformer.ln_f"
    head: str = "lm_head"
    exit_gate: str | None = None


@dataclass(frozen=True)
class UnrolledLayout:
    """Stages, blocks per stage, how iterations are chained and how a state is decoded.

    Huginn, the first family, gives the defaults (old manifests that recorded only block counts
    read as Huginn).

    Attributes:
        family: registry name of the family (``huginn``, ``retrofit``, ``ouro``).
        prelude, core, coda: blocks per stage (``core`` blocks are iterated).
        adapter: an adapter mixes the state with the prelude output at the start of each iteration
            (site ``adapter``).
        feedback: what the next iteration receives: ``"state"``, the last core block's raw output
            (Huginn, retrofit); ``"latent"``, its final norm (Ouro), emitted as ``latent`` every iteration.
        latent_norm: the final norm sits between the recurrence and the coda, so ``latent`` is
            normalised (Huginn's ``ln_f``, Ouro's ``model.norm``); retrofits hand the raw state on.
        norm_after_coda: the final norm is applied to the coda output before the head (Huginn,
            retrofit); false when the head reads the latent as it is (Ouro).
        exit_gate: a learned exit gate reads each iteration's latent (Ouro's λ_t).
        modules: module paths of each part, for nnsight users and for the loader's error messages.
    """

    family: str = "huginn"
    prelude: int = 0
    core: int = 1
    coda: int = 0
    adapter: bool = True
    feedback: Literal["state", "latent"] = "state"
    latent_norm: bool = True
    norm_after_coda: bool = True
    exit_gate: bool = False
    modules: ModulePaths = field(default_factory=ModulePaths)

    def __post_init__(self) -> None:
        for name in ("prelude", "core", "coda"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "core" else 0):
                raise ConfigError(
                    f"layout field {name!r} must be an integer >= {int(name == 'core')}, got {value!r}"
                )
        if self.feedback not in ("state", "latent"):
            raise ConfigError(f"layout field 'feedback' must be 'state' or 'latent', got {self.feedback!r}")
        if self.feedback == "latent" and not self.latent_norm:
            raise ConfigError(
                "layout: a normalised latent fed back (feedback='latent') needs latent_norm=True"
            )
        for name in ("adapter", "latent_norm", "norm_after_coda", "exit_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"layout field {name!r} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.family, str) or not re.match(r"^[a-z][a-z0-9_-]*$", self.family):
            raise ConfigError(f"layout field 'family' must be a lower-case name, got {self.family!r}")

    # ---- sites ---------------------------------------------------------------------------------------
    @property
    def latent_per_iteration(self) -> bool:
        """``latent`` is emitted after every iteration (the state fed back is normalised)."""
        return self.feedback == "latent"

    def stage_blocks(self, stage: str) -> int:
        """Number of blocks in ``stage`` (``prelude``, ``core`` or ``coda``)."""
        if stage not in _BLOCK_STAGES:
            raise InputError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return getattr(self, stage)

    def sites(self) -> list[str]:
        """Every site the model emits, in the order of the forward pass."""
        out = ["embed"] + [f"prelude.{i}" for i in range(self.prelude)]
        out += ["adapter"] if self.adapter else []
        out += [f"core.{j}" for j in range(self.core)] + ["latent"]
        return out + [f"coda.{i}" for i in range(self.coda)] + ["final"]

    def block_sites(self) -> list[str]:
        """Sites that are block outputs (those with an unrolled index)."""
        return [s for s in self.sites() if "." in s]

    def describe_sites(self) -> str:
        parts = ["embed"]
        if self.prelude:
            parts.append(f"prelude.0..{self.prelude - 1}")
        if self.adapter:
            parts.append("adapter")
        parts += [f"core.0..{self.core - 1}", "latent"]
        if self.coda:
            parts.append(f"coda.0..{self.coda - 1}")
        return ", ".join(parts + ["final"])

    def parse(self, site: str) -> tuple[str, int]:
        """``"core.2"`` -> ``("core", 2)``; ``"latent"`` -> ``("latent", -1)``; a site this model lacks raises."""
        match = _SITE_RE.match(site) if isinstance(site, str) else None
        if not match:
            raise InputError(f"unknown site {site!r}; sites are {self.describe_sites()}")
        if match.group(1):
            if match.group(1) == "adapter" and not self.adapter:
                raise InputError(f"site 'adapter' does not exist: {self.family} models have no adapter")
            return match.group(1), -1
        kind, block = match.group(2), int(match.group(3))
        limit = getattr(self, kind)
        if block >= limit:
            raise InputError(f"site {site!r} does not exist: the model has {limit} {kind} block(s)")
        return kind, block

    def is_recurrent(self, site: str) -> bool:
        """Whether ``site`` is emitted once per iteration."""
        kind, _ = self.parse(site)
        return kind in ("adapter", "core") or (kind == "latent" and self.latent_per_iteration)

    def is_normed(self, site: str) -> bool:
        """Whether the state at ``site`` has already been through the final norm (lenses must not repeat it)."""
        kind, _ = self.parse(site)
        return kind == "final" or (kind == "latent" and self.latent_norm)

    def hook_name(self, site: str) -> str:
        """The TransformerLens-style hook point whose output is the state at ``site`` (interventions edit it).

        >>> UnrolledLayout(prelude=2, core=4, coda=2).hook_name("core.3")
        'transformer.core_block.3.hook_resid_post'
        """
        kind, block = self.parse(site)
        if block < 0:
            return f"hook_{kind}"
        return f"{getattr(self.modules, kind)}.{block}.hook_resid_post"

    def lenses(self) -> tuple[str, ...]:
        """The lenses that apply: the Logit Lens and the Tuned Lens always, the Coda Lens where a coda exists."""
        return ("logit",) + (("coda",) if self.coda else ()) + ("tuned",)

    # ---- unrolled order --------------------------------------------------------------------------------
    def num_unrolled(self, num_steps: int) -> int:
        """Block outputs in the unrolled order at ``num_steps`` iterations."""
        return self.prelude + num_steps * self.core + self.coda

    def unrolled_index(self, site: str, iteration: int, num_steps: int) -> int:
        """Position of a block output in the unrolled order; -1 for sites that are not block outputs."""
        kind, block = self.parse(site)
        if kind == "prelude":
            return block
        if kind == "core":
            return self.prelude + (iteration - 1) * self.core + block
        if kind == "coda":
            return self.prelude + num_steps * self.core + block
        return -1

    def locate(self, unrolled: int, num_steps: int) -> tuple[str, int, int]:
        """``(stage, iteration, block)`` of unrolled layer ``unrolled`` (iteration 0 outside the core)."""
        n = self.num_unrolled(num_steps)
        if not 0 <= unrolled < n:
            raise IndexError(f"unrolled index {unrolled} outside 0..{n - 1}")
        if unrolled < self.prelude:
            return "prelude", 0, unrolled
        core_end = self.prelude + num_steps * self.core
        if unrolled < core_end:
            t, j = divmod(unrolled - self.prelude, self.core)
            return "core", t + 1, j
        return "coda", 0, unrolled - core_end

    def index_of(self, stage: str, iteration: int, block: int, num_steps: int) -> int:
        """Inverse of :meth:`locate`."""
        if stage in _BLOCK_STAGES and 0 <= block < getattr(self, stage):
            if stage == "prelude":
                return block
            if stage == "coda":
                return self.prelude + num_steps * self.core + block
            if 1 <= iteration <= num_steps:
                return self.prelude + (iteration - 1) * self.core + block
        raise IndexError(
            f"no unrolled layer for stage={stage!r}, iteration={iteration}, block={block} "
            f"in {self.describe()} at T={num_steps}"
        )

    def layers(self, num_steps: int) -> list[dict[str, Any]]:
        """One row per unrolled layer: ``unrolled_index, stage, iteration, block, site``."""
        rows = []
        for u in range(self.num_unrolled(num_steps)):
            stage, t, j = self.locate(u, num_steps)
            rows.append(
                {"unrolled_index": u, "stage": stage, "iteration": t, "block": j, "site": f"{stage}.{j}"}
            )
        return rows

    def at(self, num_steps: int) -> Unrolled:
        """This layout unrolled to ``num_steps`` iterations (what a figure's x axis shows)."""
        return Unrolled(self, num_steps)

    # ---- key/value cache indices -------------------------------------------------------------------------
    def cache_index(self, stage: str, iteration: int, block: int) -> int:
        """The key/value cache slot of a block: prelude ``i``; core block ``j`` at iteration ``t``:
        ``prelude + (t - 1) * core + j`` (Huginn's and Ouro's own layouts); coda ``-1 - i``."""
        if stage == "prelude":
            return block
        if stage == "core":
            return self.prelude + (iteration - 1) * self.core + block
        if stage == "coda":
            return -1 - block
        raise InputError(f"unknown stage {stage!r}")

    def cache_core_block(self, index: int) -> int | None:
        """The core block position ``j`` of a cache slot; None for prelude and coda slots."""
        if index < self.prelude:
            return None
        return (index - self.prelude) % self.core

    # ---- description and (de)serialisation ---------------------------------------------------------------
    def describe(self) -> str:
        """``prelude 2 · core 4 × T · coda 2`` (plus what is peculiar to the family)."""
        parts = []
        if self.prelude:
            parts.append(f"prelude {self.prelude}")
        parts.append(
            f"core {self.core} × T" if (self.prelude or self.coda) else f"looped stack of {self.core} × T"
        )
        if self.coda:
            parts.append(f"coda {self.coda}")
        if self.exit_gate:
            parts.append("exit gate")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (what run manifests store under ``model.layout``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnrolledLayout:
        """Read :meth:`to_dict`'s output back; a missing key takes Huginn's default, an unknown one raises."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a layout must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown layout field(s) {unknown}; fields are {sorted(known)}")
        values = dict(data)
        if "modules" in values:
            modules = values["modules"]
            paths = {f.name for f in dataclasses.fields(ModulePaths)}
            if not isinstance(modules, Mapping) or set(modules) - paths:
                raise ConfigError(f"layout field 'modules' must map some of {sorted(paths)} to module paths")
            for key, path in modules.items():
                if path is not None and (
                    not isinstance(path, str) or not re.match(r"^[A-Za-z_][\w.]*$", path)
                ):
                    raise ConfigError(f"layout module path {key!r} = {path!r} is not a dotted module path")
            values["modules"] = ModulePaths(**modules)
        return cls(**values)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> UnrolledLayout:
        """The layout a run recorded (``manifest["model"]["layout"]``); raises if it recorded none."""
        model = manifest.get("model") if isinstance(manifest, Mapping) else None
        layout = model.get("layout") if isinstance(model, Mapping) else None
        if layout is None:
            raise InputError("this run's manifest records no model layout (model.layout)")
        return cls.from_dict(layout)


@dataclass(frozen=True)
class Unrolled:
    """A layout unrolled to ``steps`` iterations: one deep network of ``prelude + steps × core + coda`` layers.

    Example:
        >>> u = UnrolledLayout(prelude=2, core=4, coda=2).at(16)
        >>> u.n_unrolled, u.core_start, u.coda_start, u.locate(2)
        (68, 2, 66, ('core', 1, 0))
    """

    layout: UnrolledLayout
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise InputError(f"an unrolled layout needs steps >= 1, got {self.steps!r}")

    @property
    def prelude(self) -> int:
        return self.layout.prelude

    @property
    def core(self) -> int:
        return self.layout.core

    @property
    def coda(self) -> int:
        return self.layout.coda

    @property
    def n_unrolled(self) -> int:
        """Number of unrolled layers: prelude + steps × core + coda."""
        return self.layout.num_unrolled(self.steps)

    @property
    def core_start(self) -> int:
        """Unrolled index of the first core block of iteration 1."""
        return self.layout.prelude

    @property
    def coda_start(self) -> int:
        """Unrolled index of the first coda block (one past the last core block)."""
        return self.layout.prelude + self.steps * self.layout.core

    def locate(self, u: int) -> tuple[str, int, int]:
        """``(stage, iteration, block)`` of unrolled layer ``u``."""
        return self.layout.locate(u, self.steps)

    def unrolled_index(self, stage: str, iteration: int, block: int) -> int:
        """Inverse of :meth:`locate`."""
        return self.layout.index_of(stage, iteration, block, self.steps)

    def layers(self) -> list[dict[str, Any]]:
        return self.layout.layers(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "steps": self.steps}
