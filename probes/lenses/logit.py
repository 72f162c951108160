"""The Logit Lens: decode a state with the model's own final norm and unembedding."""

from __future__ import annotations

from torch import Tensor

from probes.lenses.base import NORMED_SITES, Lens


class LogitLens(Lens):
    """``lm_head(ln_f(h))``; at ``latent``/``final`` (already normalised) just ``lm_head(h)``.

    At ``final`` it reproduces the model's logits exactly.
    """

    name = "logit"

    def transform_hidden(
        self, h: Tensor, site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Tensor:
        return h

    def applies_norm(self, site: str) -> bool:
        return site not in NORMED_SITES
