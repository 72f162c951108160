"""The Logit Lens: decode a state with the model's own final norm and unembedding.

It applies to every family. For Ouro it is the model's own per-step readout: at the last layer of
iteration ``t`` (and at ``latent``, ``t``) it equals ``lm_head(model.norm(h_t))``, the logits the
authors' code returns with ``exit_at_step=t-1``.
"""

from __future__ import annotations

from torch import Tensor

from probes.lenses.base import Lens


class LogitLens(Lens):
    """``lm_head(norm(h))``; at sites already normalised (``final``, a normed ``latent``) just ``lm_head(h)``.

    At ``final`` it reproduces the model's logits exactly.
    """

    name = "logit"

    def transform_hidden(
        self, h: Tensor, site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Tensor:
        return h

    def applies_norm(self, site: str) -> bool:
        return not self.is_normed(site)
