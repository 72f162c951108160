"""The Tuned Lens: a learned affine translator per site, then the Logit Lens.

``h ↦ h + A h + b`` with ``A = 0, b = 0`` at initialisation (so an untrained Tuned Lens *is* the
Logit Lens), trained to minimise KL(final ‖ lens). For core blocks the translators are either one
per block position shared over iterations (``mode="shared"``) or one per block and iteration
(``mode="per-iteration"``); comparing the two asks whether iterations speak one "language".
Saved as safetensors + JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lens.errors import InputError
from lens.layout import UnrolledLayout
from lens.model import LoopedLM
from probes.lenses.base import Lens

Mode = Literal["shared", "per-iteration"]


class TunedLens(Lens):
    """Affine translators keyed by site (and iteration in ``per-iteration`` mode)."""

    name = "tuned"

    def __init__(
        self,
        model: LoopedLM,
        mode: Mode = "shared",
        num_steps: int | None = None,
        sites: list[str] | None = None,
    ) -> None:
        super().__init__(model)
        if mode not in ("shared", "per-iteration"):
            raise ValueError(f"mode must be 'shared' or 'per-iteration', got {mode!r}")
        self.mode = mode
        self.num_steps = num_steps or model.config.mean_recurrence
        self.sites = sites or model.layout.block_sites()
        for site in self.sites:
            model.layout.parse(site)
        d = model.config.n_embd
        self.translators = nn.ModuleDict()
        for key in self.keys():
            layer = nn.Linear(d, d, bias=True, device=model.device)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            self.translators[key] = layer

    def keys(self) -> list[str]:
        keys = []
        for site in self.sites:
            if site.startswith("core") and self.mode == "per-iteration":
                keys += [self._key(site, t) for t in range(1, self.num_steps + 1)]
            else:
                keys.append(self._key(site, 0))
        return keys

    def _key(self, site: str, iteration: int) -> str:
        base = site.replace(".", "_")
        if site.startswith("core") and self.mode == "per-iteration":
            return f"{base}_t{min(max(iteration, 1), self.num_steps)}"  # deeper iterations reuse the last
        return base

    def supports(self, site: str) -> bool:
        return site in self.sites

    def applies_norm(self, site: str) -> bool:
        return not self.is_normed(site)

    def transform_hidden(
        self, h: Tensor, site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Tensor:
        if site not in self.sites:
            raise ValueError(f"the Tuned Lens has no translator for site {site!r}; it has {self.sites}")
        layer = self.translators[self._key(site, iteration)]
        weight: Tensor = layer.weight  # type: ignore[assignment]  # an nn.Linear's
        return h + layer(h.to(weight.dtype)).to(h.dtype)

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.translators.state_dict().items()}
        save_file(tensors, str(directory / "tuned_lens.safetensors"))
        meta = {
            "mode": self.mode,
            "num_steps": self.num_steps,
            "sites": self.sites,
            "n_embd": self.model.config.n_embd,
            "model": self.model.config.name,
            "layout": self.model.layout.to_dict(),
        }
        (directory / "tuned_lens.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: LoopedLM) -> TunedLens:
        directory = Path(directory)
        meta_path = directory / "tuned_lens.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no tuned_lens.json in {directory}")
        meta = json.loads(meta_path.read_text())
        if meta["n_embd"] != model.config.n_embd:
            raise ValueError(
                f"tuned lens was trained for width {meta['n_embd']}, the model has {model.config.n_embd}"
            )
        if "layout" in meta and UnrolledLayout.from_dict(meta["layout"]) != model.layout:
            raise InputError(
                f"tuned lens in {directory} was trained for a {meta['layout'].get('family')} model with another "
                f"layout than this {model.layout.family} model's ({model.layout.describe()})"
            )
        lens = cls(model, meta["mode"], meta["num_steps"], meta["sites"])
        lens.translators.load_state_dict(load_file(str(directory / "tuned_lens.safetensors")))
        return lens
