"""Intensity-prior-guided cross-modal feature enhancement (CMFE) on bottleneck features.

Each MR sequence (bSSFP, LGE, T2w) shows the myocardium with its own intensity signature; the
text prior of a sequence says what to look for ("scar is bright on LGE"). CMFE uses that prior to
gate the sequence's own features (channel and spatial attention), lets the sequences exchange
information, then fuses them into one map. Two exchanges (``cross_attention``):

* ``"sequence"`` (ours): attention over the three sequence tokens at each pixel;
* ``"pixel"`` (the release's): every pixel of one sequence against every pixel of each other
  sequence (``N x N`` absolute-cosine similarity, softmax over the partner's pixels), which can
  reach across a residual misregistration; the release aggregates the query sequence's *own*
  features with those weights (``pixel_values="own"``), ``"partner"`` aggregates the partner's
  (ordinary cross-attention). See :class:`PixelPairAttention`.

Everything is computed from the input's own ``h x w``, so any image size works; a missing
sequence can be masked out of the exchange and the fusion (training with sequence dropout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import check_int

#: The exchanges between sequences CMFE offers (see the module docstring).
CROSS_ATTENTION: tuple[str, ...] = ("sequence", "pixel")


def check_sequence_mask(mask: Tensor | None, batch: int, num_sequences: int) -> Tensor | None:
    """Validate a ``[B, S]`` bool mask (True = sequence present); every sample needs one."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"sequence_mask must be a bool tensor, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (batch, num_sequences):
        raise ValueError(f"sequence_mask must be [{batch}, {num_sequences}], got "
                         f"{tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("sequence_mask leaves a sample without any sequence")
    return mask


def presence_weights(mask: Tensor | None, num_sequences: int) -> Tensor | None:
    """``[B, S]`` weights: 0 for absent sequences, ``S / present`` for present ones.

    Zeroing absent inputs and rescaling the rest keeps the input scale of a fusion layer the same
    whatever the number of present sequences; with all present every weight is exactly 1.
    """
    if mask is None:
        return None
    m = mask.float()
    return m * (num_sequences / m.sum(dim=1, keepdim=True))


class PriorGuidedAttention(nn.Module):
    """Channel gate and spatial map for one sequence, conditioned on its text prior.

    The prior and the globally pooled features are projected to ``embed_dim``, layer-normalised
    (a unit-norm sentence embedding would otherwise be drowned by the image features) and mixed
    by an MLP. The mix gives a sigmoid channel gate and a query whose dot product with a 1x1
    projection of the map gives a sigmoid spatial map at the map's own size. The output
    ``f + f * gate * spatial`` keeps a residual path so the block cannot block gradients.
    """

    def __init__(self, channels: int, prior_dim: int, embed_dim: int) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("prior_dim", prior_dim),
                            ("embed_dim", embed_dim)):
            check_int(name, value)
        self.prior_dim = prior_dim
        self.prior_proj = nn.Linear(prior_dim, embed_dim)
        self.prior_norm = nn.LayerNorm(embed_dim)
        self.pool_proj = nn.Linear(channels, embed_dim)
        self.pool_norm = nn.LayerNorm(embed_dim)
        self.mix = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU())
        self.channel_gate = nn.Linear(embed_dim, channels)
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Conv2d(channels, embed_dim, kernel_size=1)
        self.scale = 1.0 / math.sqrt(embed_dim)

    def forward(self, features: Tensor, prior: Tensor) -> Tensor:
        """``features`` [B, C, h, w]; ``prior`` [P] (shared by the batch) or [B, P]."""
        batch = features.shape[0]
        if prior.shape[-1] != self.prior_dim or prior.ndim not in (1, 2):
            raise ValueError(f"prior must be [{self.prior_dim}] or [B, {self.prior_dim}], got "
                             f"{tuple(prior.shape)}")
        text = self.prior_norm(self.prior_proj(prior)).expand(batch, -1)
        image = self.pool_norm(self.pool_proj(features.mean(dim=(2, 3))))
        context = self.mix(torch.cat([text, image], dim=1))
        gate = torch.sigmoid(self.channel_gate(context))[:, :, None, None]
        keys = self.key(features)
        spatial = torch.sigmoid(
            torch.einsum("be,behw->bhw", self.query(context), keys) * self.scale
        )[:, None]
        return features + features * gate * spatial


class CrossSequenceAttention(nn.Module):
    """Multi-head attention over the sequence axis, independently at every pixel.

    Tokens are the S sequence vectors of one pixel (batch ``B*h*w``), tagged with a learned
    sequence embedding so the attention knows which token is LGE and which is T2w. Absent
    sequences are removed from the keys; post-norm residual keeps the ViT's feature scale.
    """

    def __init__(self, channels: int, num_sequences: int, num_heads: int) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("num_sequences", num_sequences),
                            ("num_heads", num_heads)):
            check_int(name, value)
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.sequence_embedding = nn.Parameter(torch.empty(num_sequences, channels))
        nn.init.normal_(self.sequence_embedding, std=0.02)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, features: Tensor, sequence_mask: Tensor | None = None) -> Tensor:
        """``features`` [B, S, C, h, w] -> same shape; ``sequence_mask`` [B, S] bool or None."""
        batch, seqs, channels, height, width = features.shape
        tokens = features.permute(0, 3, 4, 1, 2).reshape(-1, seqs, channels)  # [B*h*w, S, C]
        q, k, v = self.qkv(tokens + self.sequence_embedding).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if sequence_mask is not None:
            attn_mask = sequence_mask[:, None, None, None, :].expand(
                batch, height, width, 1, seqs
            ).reshape(-1, 1, 1, seqs)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        tokens = self.norm(tokens + self.out(mixed.transpose(1, 2).flatten(2)))
        return tokens.reshape(batch, height, width, seqs, channels).permute(0, 3, 4, 1, 2)


class PixelPairAttention(nn.Module):
    """The release's non-local exchange between sequences, at any bottleneck size.

    For sequence ``m`` and each other sequence ``p``: ``A[i, j] = softmax_j |cos(g_m[i], g_p[j])|``
    over the ``N = h * w`` pixels (no temperature, as released), then ``e_mp[i] = sum_j A[i, j]
    v[j]`` with ``v = g_m`` (``values="own"``, as released) or ``g_p`` (``"partner"``). Each
    sequence's map and its enhanced maps are concatenated and reduced by a 1x1 conv + BN + ReLU
    of its own (the release's ``mix``), no residual. An absent partner's enhanced map is zero.
    """

    VALUES = ("own", "partner")

    def __init__(self, channels: int, num_sequences: int, values: str = "own") -> None:
        super().__init__()
        for name, value in (("channels", channels), ("num_sequences", num_sequences)):
            check_int(name, value)
        if values not in self.VALUES:
            raise ValueError(f"values must be one of {self.VALUES}, got {values!r}")
        self.values = values
        self.mix = nn.ModuleList(nn.Sequential(
            nn.Conv2d(num_sequences * channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) for _ in range(num_sequences))

    @staticmethod
    def attention(query: Tensor, key: Tensor) -> Tensor:
        """``[B, N, N]``: softmax over ``key``'s pixels of the absolute cosine similarity between
        the pixels of ``query`` and ``key`` (``[B, C, N]`` each)."""
        q = F.normalize(query, dim=1, eps=1e-8)
        k = F.normalize(key, dim=1, eps=1e-8)
        return torch.softmax(torch.einsum("bci,bcj->bij", q, k).abs(), dim=-1)

    def forward(self, features: Tensor, sequence_mask: Tensor | None = None) -> Tensor:
        """``features`` [B, S, C, h, w] -> same shape; ``sequence_mask`` [B, S] bool or None."""
        seqs, height, width = features.shape[1], features.shape[3], features.shape[4]
        flat = features.flatten(3)  # [B, S, C, N]
        out = []
        for m in range(seqs):
            parts = [features[:, m]]
            for p in range(seqs):
                if p == m:
                    continue
                weights = self.attention(flat[:, m], flat[:, p])
                values = flat[:, m] if self.values == "own" else flat[:, p]
                enhanced = torch.einsum("bij,bcj->bci", weights, values).unflatten(
                    2, (height, width))
                if sequence_mask is not None:
                    enhanced = enhanced * sequence_mask[:, p, None, None, None].to(
                        enhanced.dtype)
                parts.append(enhanced)
            out.append(self.mix[m](torch.cat(parts, dim=1)))
        return torch.stack(out, dim=1)


class CrossModalFeatureEnhancement(nn.Module):
    """CMFE: prior-guided attention per sequence, cross-sequence attention, 1x1 fusion.

    ``shared=True`` uses one prior-guided block for all sequences (the prior alone tells them
    apart), matching a shared encoder. ``forward`` returns ``(enhanced, fused)``: a list of S
    maps [B, C, h, w] and the fused map [B, C, h, w].
    """

    def __init__(
        self,
        channels: int,
        num_sequences: int,
        prior_dim: int,
        embed_dim: int,
        num_heads: int,
        shared: bool = False,
        cross_attention: str = "sequence",
        pixel_values: str = "own",
    ) -> None:
        super().__init__()
        check_int("num_sequences", num_sequences)
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION}, got "
                             f"{cross_attention!r}")
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be a bool, got {shared!r}")
        self.channels = channels
        self.num_sequences = num_sequences
        self.prior_dim = prior_dim
        first = PriorGuidedAttention(channels, prior_dim, embed_dim)
        self.prior_attention = nn.ModuleList(
            [first] * num_sequences if shared
            else [first, *(PriorGuidedAttention(channels, prior_dim, embed_dim)
                           for _ in range(num_sequences - 1))]
        )
        self.cross_attention = (
            CrossSequenceAttention(channels, num_sequences, num_heads)
            if cross_attention == "sequence"
            else PixelPairAttention(channels, num_sequences, pixel_values))
        self.fusion = nn.Sequential(
            nn.Conv2d(num_sequences * channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(
        self,
        features: Sequence[Tensor],
        priors: Tensor,
        sequence_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """``features``: S maps [B, C, h, w]; ``priors`` [S, P]; ``sequence_mask`` [B, S]."""
        if len(features) != self.num_sequences:
            raise ValueError(f"expected {self.num_sequences} feature maps, got {len(features)}")
        shape = tuple(features[0].shape)
        if len(shape) != 4 or shape[1] != self.channels or any(
            tuple(f.shape) != shape for f in features
        ):
            raise ValueError(f"feature maps must all be [B, {self.channels}, h, w], got "
                             f"{[tuple(f.shape) for f in features]}")
        if tuple(priors.shape) != (self.num_sequences, self.prior_dim):
            raise ValueError(f"priors must be [{self.num_sequences}, {self.prior_dim}], got "
                             f"{tuple(priors.shape)}")
        sequence_mask = check_sequence_mask(sequence_mask, shape[0], self.num_sequences)
        gated = torch.stack(
            [block(f, p) for block, f, p in zip(self.prior_attention, features, priors,
                                                strict=True)],
            dim=1,
        )
        enhanced = self.cross_attention(gated, sequence_mask)
        weights = presence_weights(sequence_mask, self.num_sequences)
        to_fuse = enhanced if weights is None else enhanced * weights[:, :, None, None, None]
        fused = self.fusion(to_fuse.flatten(1, 2))
        return list(enhanced.unbind(dim=1)), fused
