"""The Coda Lens: decode a state by running the model's own coda on it.

``lm_head(norm(coda(latent(h))))`` over the whole sequence of states from one site and iteration
(coda attention needs every position), where ``latent(h)`` is what the coda receives after the
recurrence (Huginn: ``ln_f(h)``; retrofits: ``h`` itself). Many states are decoded in one batched
coda pass: stacking iterations along the batch axis costs one forward, never a Python loop with a
copied cache. Families without a coda (Ouro) refuse it.
"""

from __future__ import annotations

from torch import Tensor

from lens.model import LoopedLM
from probes.lenses.base import Lens, LensNotApplicableError


class CodaLens(Lens):
    """At the last iteration's ``latent`` it reproduces the model's logits."""

    name = "coda"
    needs_sequence = True

    def __init__(self, model: LoopedLM) -> None:
        if not model.layout.coda:
            raise LensNotApplicableError(
                f"the Coda Lens does not apply to {model.layout.family} models: they have no coda "
                f"(lenses that apply: {', '.join(model.layout.lenses())})"
            )
        super().__init__(model)

    def supports(self, site: str) -> bool:
        return site != "final" and not site.startswith("coda")

    def transform_hidden(
        self, h: Tensor, site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Tensor:
        if not self.supports(site):
            raise ValueError(f"the Coda Lens decodes states before the coda; {site!r} is not one")
        x = h if site == "latent" else self.model.to_latent(h)
        return self.model.run_coda(x, attention_mask)

    def applies_norm(self, site: str) -> bool:
        return self.model.layout.norm_after_coda
