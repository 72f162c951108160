"""What a lens is: a map from a hidden state at some site to the unembedding's input space.

A lens's ``transform_hidden`` returns the state *before* the final norm; the final norm and the
unembedding are applied by the fused statistics kernel (``probes.statistics``) or by ``forward``.
Which sites have already been through the final norm (``final`` always, ``latent`` where the layout
puts the norm before the coda) is the model's layout's business; lenses ask it. A lens that does not
apply to a family (the Coda Lens without a coda) refuses to be built with :class:`LensNotApplicableError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from jaxtyping import Float
from torch import Tensor, nn

from lens.errors import InputError
from lens.model import LoopedLM


class LensNotApplicableError(InputError):
    """The lens needs a part this model's family does not have (the Coda Lens on Ouro)."""


class Lens(nn.Module, ABC):
    """Decode intermediate states of a recurrent-depth model into vocabulary distributions."""

    name: str = "lens"
    needs_sequence: bool = False  # True: decoding a position needs the states of all positions
    model: LoopedLM

    def __init__(self, model: LoopedLM) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the lens must not own the model

    @abstractmethod
    def transform_hidden(
        self, h: Float[Tensor, "B S d"], site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Float[Tensor, "B S d"]:
        """The state in the unembedding's input space, before the final norm."""

    def applies_norm(self, site: str) -> bool:
        """Whether the final norm must still be applied to ``transform_hidden``'s output."""
        return True

    def is_normed(self, site: str) -> bool:
        """Whether the state at ``site`` has already been through the final norm (per the layout)."""
        return self.model.layout.is_normed(site)

    def supports(self, site: str) -> bool:
        return True

    def forward(
        self, h: Float[Tensor, "B S d"], site: str, iteration: int = 0, attention_mask: Tensor | None = None
    ) -> Float[Tensor, "B S V"]:
        """Full float32 logits (materialised: use ``probes.token_statistics`` for many states)."""
        x = self.transform_hidden(h, site, iteration, attention_mask)
        if self.applies_norm(site):
            x = self.model.final_norm(x)
        return self.model.head(x)
