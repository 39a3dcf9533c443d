"""Class feature modulation (CFM) and the dynamic segmentation head it drives.

Class text priors ("scar", "edema", ...) are generic; the same class looks different in each
image and each sequence. CFM therefore modulates every class embedding with the image context and
the sequence context (FiLM: ``c * (1 + gamma) + beta``), and the dynamic head turns each modulated
class embedding, per sample, into the weights of a tiny two-layer 1x1-conv classifier. The class
logits are thus produced by text-derived, image-adapted filters rather than by a fixed conv.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import check_int

#: Scale of the last FiLM layer at init: gamma, beta start small (near identity) but non-zero so
#: every layer of the MLP receives gradient from the first step.
FILM_INIT_SCALE = 0.1


class ModulatedClasses(NamedTuple):
    """CFM output: class embeddings [B, K, E] and the image context embedding [B, E]."""

    classes: Tensor
    context: Tensor


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of ``values`` [B, S, E] keeping only ``mask`` [B, S] True entries."""
    if mask is None:
        return values.mean(dim=1)
    weights = mask.to(values.dtype)[:, :, None]
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ClassFeatureModulation(nn.Module):
    """FiLM of projected class priors by image context and sequence context.

    One MLP, shared by all classes, reads ``[c_k, image, sequence]`` and emits ``gamma_k,
    beta_k``: conditioning on the class embedding itself keeps the parameter count independent of
    K and lets the modulation depend on what the class text says. Every projected vector is
    layer-normalised so unit-norm text embeddings and O(1) image features weigh alike.
    """

    def __init__(self, prior_dim: int, feature_dim: int, embed_dim: int) -> None:
        super().__init__()
        for name, value in (("prior_dim", prior_dim), ("feature_dim", feature_dim),
                            ("embed_dim", embed_dim)):
            check_int(name, value)
        self.prior_dim = prior_dim
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.class_proj = nn.Linear(prior_dim, embed_dim)
        self.class_norm = nn.LayerNorm(embed_dim)
        self.sequence_proj = nn.Linear(prior_dim, embed_dim)
        self.sequence_norm = nn.LayerNorm(embed_dim)
        self.image_proj = nn.Linear(feature_dim, embed_dim)
        self.image_norm = nn.LayerNorm(embed_dim)
        self.film = nn.Sequential(
            nn.Linear(3 * embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 2 * embed_dim)
        )
        with torch.no_grad():
            self.film[-1].weight.mul_(FILM_INIT_SCALE)
            self.film[-1].bias.zero_()

    def forward(
        self,
        class_priors: Tensor,
        image_features: Tensor,
        sequence_priors: Tensor,
        sequence_mask: Tensor | None = None,
    ) -> ModulatedClasses:
        """``class_priors`` [K, P]; ``image_features`` pooled [B, D]; ``sequence_priors``
        [S, P] (rows of the present sequences are averaged per sample using ``sequence_mask``
        [B, S], all rows when None)."""
        if class_priors.ndim != 2 or class_priors.shape[1] != self.prior_dim:
            raise ValueError(f"class_priors must be [K, {self.prior_dim}], got "
                             f"{tuple(class_priors.shape)}")
        if image_features.ndim != 2 or image_features.shape[1] != self.feature_dim:
            raise ValueError(f"image_features must be [B, {self.feature_dim}], got "
                             f"{tuple(image_features.shape)}")
        if sequence_priors.ndim != 2 or sequence_priors.shape[1] != self.prior_dim:
            raise ValueError(f"sequence_priors must be [S, {self.prior_dim}], got "
                             f"{tuple(sequence_priors.shape)}")
        batch, num_classes = image_features.shape[0], class_priors.shape[0]
        if sequence_mask is not None and tuple(sequence_mask.shape) != (
            batch, sequence_priors.shape[0]
        ):
            raise ValueError(f"sequence_mask must be [{batch}, {sequence_priors.shape[0]}], "
                             f"got {tuple(sequence_mask.shape)}")
        classes = self.class_norm(self.class_proj(class_priors)).expand(batch, -1, -1)
        image = self.image_norm(self.image_proj(image_features))
        projected = self.sequence_proj(sequence_priors).expand(batch, -1, -1)
        sequence = self.sequence_norm(masked_mean(projected, sequence_mask))
        context = torch.cat([image, sequence], dim=1)[:, None].expand(-1, num_classes, -1)
        gamma, beta = self.film(torch.cat([classes, context], dim=2)).chunk(2, dim=2)
        return ModulatedClasses(classes * (1.0 + gamma) + beta, image)


class DynamicHead(nn.Module):
    """Per-sample, per-class two-layer 1x1-conv classifier with generated weights.

    A linear controller reads ``LayerNorm([c'_k, context])`` and emits ``W1 [C_in, m]``,
    ``b1 [m]``, ``W2 [m]``, ``b2`` for class k; the logit of class k at a pixel is
    ``W2 . relu(W1^T f + b1) + b2``. The controller is initialised so that, for unit-variance
    controller inputs, the generated weights have He (layer 1) and LeCun (layer 2) scale and the
    biases start at zero: logits at init are O(1), not O(sqrt(C_in * m)).
    """

    def __init__(self, in_channels: int, embed_dim: int, hidden: int = 8) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embed_dim", embed_dim),
                            ("hidden", hidden)):
            check_int(name, value)
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.splits = (in_channels * hidden, hidden, hidden, 1)
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.controller = nn.Linear(2 * embed_dim, sum(self.splits))
        self._init_controller()

    def _init_controller(self) -> None:
        fan_in = 2 * self.embed_dim
        w1, b1, w2, _ = self.splits
        with torch.no_grad():
            weight = self.controller.weight
            nn.init.normal_(weight[:w1], std=math.sqrt(2.0 / self.in_channels / fan_in))
            nn.init.normal_(weight[w1:w1 + b1], std=0.01 / math.sqrt(fan_in))
            nn.init.normal_(weight[w1 + b1:w1 + b1 + w2],
                            std=math.sqrt(1.0 / self.hidden / fan_in))
            nn.init.normal_(weight[w1 + b1 + w2:], std=0.01 / math.sqrt(fan_in))
            self.controller.bias.zero_()

    def forward(self, features: Tensor, classes: Tensor, context: Tensor) -> Tensor:
        """``features`` [B, C_in, H, W], ``classes`` [B, K, E], ``context`` [B, E] ->
        logits [B, K, H, W]."""
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"features must be [B, {self.in_channels}, H, W], got "
                             f"{tuple(features.shape)}")
        batch = features.shape[0]
        if classes.ndim != 3 or classes.shape[0] != batch or classes.shape[2] != self.embed_dim:
            raise ValueError(f"classes must be [{batch}, K, {self.embed_dim}], got "
                             f"{tuple(classes.shape)}")
        if tuple(context.shape) != (batch, self.embed_dim):
            raise ValueError(f"context must be [{batch}, {self.embed_dim}], got "
                             f"{tuple(context.shape)}")
        num_classes = classes.shape[1]
        z = torch.cat([classes, context[:, None].expand(-1, num_classes, -1)], dim=2)
        w1, b1, w2, b2 = self.controller(self.norm(z)).split(self.splits, dim=2)
        w1 = w1.unflatten(2, (self.in_channels, self.hidden))  # [B, K, C_in, m]
        hidden = torch.einsum("bchw,bkcm->bkmhw", features, w1)
        hidden = F.relu(hidden + b1[:, :, :, None, None])
        return torch.einsum("bkmhw,bkm->bkhw", hidden, w2) + b2[:, :, :, None]
