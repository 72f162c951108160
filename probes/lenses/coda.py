"""The Coda Lens: decode a state by running the model's own coda on it.

``lm_head(ln_f(coda(ln_f(h))))`` over the whole sequence of states from one site and iteration
(coda attention needs every position). Many states are decoded in one batched coda pass: stacking
iterations along the batch axis costs one forward, never a Python loop with a copied cache.
"""

from __future__ import annotations

from torch import Tensor

from probes.lenses.base import Lens


class CodaLens(Lens):
    """At the last iteration's ``latent`` it reproduces the model's logits."""

    name = "coda"
    needs_sequence = True

    def supports(self, site: str) -> bool:
        return site != "final" and not site.startswith("coda")

    def transform_hidden(
        self, h: Tensor, site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Tensor:
        if not self.supports(site):
            raise ValueError(f"the Coda Lens decodes states before the coda; {site!r} is not one")
        x = h if site == "latent" else self.model.final_norm(h)
        return self.model.run_coda(x, attention_mask)
