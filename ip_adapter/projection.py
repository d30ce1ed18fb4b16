"""Image projections: CLIP image features -> a short sequence of cross-attention tokens.

Two kinds, with module and parameter names chosen so the official checkpoints load as they are:

* ``ImageProjection`` (IP-Adapter, "CLS"/global): ``Linear(d_clip -> N*d)``, reshape, ``LayerNorm(d)``.
  Keys ``proj.{weight,bias}``, ``norm.{weight,bias}`` (paper Sec. 3.2, Fig. 2).
* ``Resampler`` (IP-Adapter Plus, patch tokens): a Perceiver resampler whose learned queries attend to
  the penultimate-layer patch tokens of the CLIP vision tower. Keys ``latents``, ``proj_in``,
  ``proj_out``, ``norm_out``, ``layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.{i}.1.{0,1,3}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResamplerConfig:
    """The IP-Adapter-Plus defaults for SD1.5 (DESIGN.md)."""

    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 768
    ff_mult: int = 4


class ImageProjection(nn.Module):
    """Global image embedding (B, d_clip) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, clip_embeddings_dim: int = 1024, cross_attention_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        self.clip_embeddings_dim = clip_embeddings_dim
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_embeddings_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.clip_embeddings_dim:
            raise ValueError(
                f"ImageProjection expects image embeddings of shape (B, {self.clip_embeddings_dim}), "
                f"got {tuple(image_embeds.shape)}"
            )
        x = self.proj(image_embeds.to(self.proj.weight.dtype))  # (B, N*d)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)  # (B, N, d)
        return self.norm(x)


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Perceiver / Flamingo resampler)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask``: optional (B, L) bool key-padding mask over ``x`` (True = real token)."""
        x = self.norm1(x)  # (B, L, dim)
        latents = self.norm2(latents)  # (B, Q, dim)
        b, q_len, _ = latents.shape
        q = self.to_q(latents)  # (B, Q, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, L+Q, inner) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, H, S, dh)

        attn_mask = None
        if mask is not None:  # latents always attend to themselves, so no row is ever empty
            keep = torch.ones(b, q_len, dtype=torch.bool, device=mask.device)
            attn_mask = torch.cat([mask, keep], dim=1)[:, None, None, :]  # (B, 1, 1, L+Q)
        out = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=attn_mask
        )  # (B, H, Q, dh)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Index layout 0 (LayerNorm), 1 (up), 2 (GELU), 3 (down) matches the official checkpoint keys.
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    """Patch tokens (B, L, embedding_dim) -> (B, num_queries, output_dim)."""

    def __init__(self, config: ResamplerConfig | None = None):
        super().__init__()
        c = config or ResamplerConfig()
        self.config = c
        self.num_tokens = c.num_queries
        self.embedding_dim = c.embedding_dim
        self.cross_attention_dim = c.output_dim
        # Official init: randn / sqrt(dim).
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), _feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )

    def forward(self, patch_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional (B, L) bool key-padding mask over the input tokens (True = real token)."""
        if patch_tokens.ndim != 3 or patch_tokens.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"Resampler expects tokens of shape (B, L, {self.embedding_dim}), "
                f"got {tuple(patch_tokens.shape)}"
            )
        x = self.proj_in(patch_tokens.to(self.proj_in.weight.dtype))  # (B, L, dim)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, Q, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents, mask) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, Q, output_dim)


ImageProjector = ImageProjection | Resampler
