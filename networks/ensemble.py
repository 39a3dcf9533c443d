"""Several trained networks as one: the mean of their softmax outputs.

Cross-validation leaves K models; on a new patient or an external test set they are used
together (nnU-Net's default too). :class:`Ensemble` is an ``nn.Module`` whose forward returns
``log(mean_k softmax(model_k(x)))``: every consumer of logits (sliding-window localisation, the
ROI pass, flip TTA, the native mapping) takes a softmax of it and so receives exactly the mean of
the members' probabilities, with no ensemble-specific path anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from networks.capabilities import Capabilities, capabilities_of
from networks.sequences import forward_with_sequences
from networks.variants import input_size


class Ensemble(nn.Module):
    """Members must share the input size and the classes; they may differ in variant."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        sizes = {input_size(member) for member in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members differ in input size: {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        first = members[0]
        # What test.py and predict.py read off a model (see networks.variants.describe). Masks
        # are routed to each member as it declares; a single-sequence first member makes the
        # ensemble need that sequence (members of one cross-validation share a variant).
        self.config = first.config
        self.name = f"ensemble of {len(members)} x {first.name}"
        self.variant = first.variant
        self.sequence = getattr(first, "sequence", None)
        self.capabilities = Capabilities(
            sequence_mask=True, single_sequence=capabilities_of(first).single_sequence)

    def forward(self, images: Tensor, sequence_mask: Tensor | None = None) -> Tensor:
        probabilities = torch.stack([
            torch.softmax(forward_with_sequences(member, images, sequence_mask).float(), dim=1)
            for member in self.members]).mean(dim=0)
        # log of the mean: a softmax of it gives the mean back (the floor keeps log finite).
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))
