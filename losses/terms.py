"""The loss terms of one training step, as the paper names them.

LLM4GEN's objective is ``L = L_diffusion + lambda_entity * L_entity``: the denoising loss plus the
entity-guided loss on cross-attention maps (``losses/entity.py``). ``LossTerms`` carries the two
terms separately so the training step writes the sum itself and every term is logged under its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm4gen.losses.entity import EntityLossOutput


@dataclass
class LossTerms:
    """One step's loss terms, each a scalar tensor attached to the graph.

    ``entity`` is zero (and ``entity_parts`` None) when the step computed no entity loss: the
    objective has ``lambda_entity = 0``, or the batch carries no parsed entities.
    """

    diffusion: torch.Tensor                         # () L_diffusion, min-SNR weighted when configured
    entity: torch.Tensor                            # () L_entity = positive + negative_weight * negative
    entity_parts: EntityLossOutput | None = None    # its positive and negative parts and pair count

    @classmethod
    def diffusion_only(cls, diffusion: torch.Tensor) -> "LossTerms":
        return cls(diffusion=diffusion, entity=diffusion.new_zeros(()))

    def logs(self) -> dict[str, torch.Tensor]:
        """The terms, detached, by the names the logger shows (``train/<name>``)."""
        logs = {"diffusion": self.diffusion.detach()}
        if self.entity_parts is not None:
            parts = self.entity_parts
            logs.update(entity=self.entity.detach(), entity_positive=parts.positive.detach(),
                        entity_negative=parts.negative.detach(),
                        entity_pairs=torch.tensor(float(parts.num_pairs), device=self.diffusion.device))
        return logs
