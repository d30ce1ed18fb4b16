"""The scene-graph adapter: IP-Adapter's image branch plus a decoupled graph branch.

    Z = Attn(Q, K, V) + lambda_i * Attn(Q, K'_i, V'_i) + lambda_g * Attn(Q, K'_g, V'_g, mask_g)

The graph tokens come from ``SceneGraphEncoder`` and reach every cross-attention layer as the named
stream "sg", with their own ``to_k_sg``/``to_v_sg`` (initialised from ``to_k``/``to_v``) and scale.
How the streams reach the UNet is the config's ``injection``, a strategy of ``sg2img.injection``:
``decoupled`` as above, or the ``concat`` ablation (graph and image tokens appended to the text tokens).

Saved as one flat file: ``image_proj.*`` and ``ip_adapter.*`` in the official layout (stock diffusers
loads that part), plus ``sg_adapter.{i}.to_{k,v}_sg.weight`` and ``sg_encoder.*``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch_geometric.data import Batch

from ip_adapter import IMAGE_STREAM, IPAdapterConfig, Stream
from ip_adapter.adapter import (
    IMAGE_PROJ,
    attention_tensors,
    config_from_file,
    layer_prefix,
    load_sections,
    prefixed,
)
from ip_adapter.attention import DecoupledAttention, Scale
from ip_adapter.checkpoint import CONFIG_KEY, CheckpointError, read_adapter_file, write_adapter_file
from ip_adapter.image_encoder import ImageFeatures
from ip_adapter.pretrained import PretrainedMixin

from .gnn import GNNConfig, GraphTokens, SceneGraphEncoder, TokenConfig
from .injection import Injection, injection

SG_STREAM = "sg"
SG_ENCODER = "sg_encoder"


@dataclass
class SGAdapterConfig:
    """``injection``: "decoupled" (own K/V per stream) or "concat" (append to the text tokens)."""

    label_dim: int = 768  # width of the label embeddings (the text encoder's hidden size)
    injection: Literal["decoupled", "concat"] = "decoupled"
    image_branch: bool = True
    graph_branch: bool = True
    image: IPAdapterConfig = field(default_factory=IPAdapterConfig)
    gnn: GNNConfig = field(default_factory=GNNConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    # The graph branch's query gets a learned position term (ip_adapter.attention: positional streams), so
    # its tokens can place what they describe; decoupled injection only.
    positional_graph_query: bool = False

    def __post_init__(self) -> None:
        own_attention = injection(self.injection).has_attention  # also: a known strategy
        if not (self.image_branch or self.graph_branch):
            raise ValueError("at least one of image_branch and graph_branch must be on")
        if self.positional_graph_query and not (self.graph_branch and own_attention):
            raise ValueError("positional_graph_query needs graph_branch: true and injection: decoupled")
        for name, cls in (("image", IPAdapterConfig), ("gnn", GNNConfig), ("tokens", TokenConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        if self.tokens.confine_objects and not own_attention:
            raise ValueError(
                "tokens.confine_objects needs injection: decoupled (concat shares the text's attention, which "
                "has no per-query mask); give concat the layout with gnn.boxes_after_gnn instead"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(s for s, on in ((IMAGE_STREAM, self.image_branch), (SG_STREAM, self.graph_branch)) if on)


class SceneGraphAdapter(PretrainedMixin, nn.Module):
    def __init__(self, unet: nn.Module, config: SGAdapterConfig, init_from_base: bool = True):
        super().__init__()
        self.config = config
        self.injection: Injection = injection(config.injection)
        cross = unet.config.cross_attention_dim
        if config.image_branch and config.image.cross_attention_dim != cross:
            raise ValueError(
                f"image.cross_attention_dim {config.image.cross_attention_dim} does not match the UNet's {cross}"
            )
        self.image_proj = config.image.build_projection() if config.image_branch else None
        self.sg_encoder = (
            SceneGraphEncoder(config.label_dim, cross, config.gnn, config.tokens)
            if config.graph_branch
            else None
        )
        soft = config.tokens.confine_objects and config.tokens.confinement == "soft"
        self.attention = (
            DecoupledAttention(
                unet,
                config.streams,
                init_from_base,
                positional=(SG_STREAM,) if config.positional_graph_query else (),
                soft_regions=(SG_STREAM,) if config.graph_branch and soft else (),
                region_width=config.tokens.region_width,
            )
            if self.injection.has_attention
            else None
        )

    # --- tokens ------------------------------------------------------------------------------------
    def image_tokens(self, features: ImageFeatures) -> torch.Tensor:
        if self.image_proj is None:
            raise ValueError("this adapter has no image branch (image_branch: false)")
        x = features.embeds if self.config.image.image_tokens == "cls" else features.patch_tokens
        return self.image_proj(x)  # (B, N, C)

    def graph_tokens(self, graphs: Batch) -> GraphTokens:
        if self.sg_encoder is None:
            raise ValueError("this adapter has no graph branch (graph_branch: false)")
        return self.sg_encoder(graphs)  # tokens (B, L, C), mask (B, L), regions, layout

    def streams(
        self, image_features: ImageFeatures | None = None, graphs: Batch | GraphTokens | None = None
    ) -> dict[str, Stream]:
        """The named streams of the given conditions: ``graphs`` is a graph batch or what ``graph_tokens``
        made of one."""
        out = {}
        if image_features is not None:
            out[IMAGE_STREAM] = Stream(self.image_tokens(image_features))
        if graphs is not None:
            sg = graphs if isinstance(graphs, GraphTokens) else self.graph_tokens(graphs)
            out[SG_STREAM] = sg.stream()
        return out

    def unet_kwargs(
        self,
        text_embeds: torch.Tensor,
        image_features: ImageFeatures | None = None,
        graphs: Batch | GraphTokens | None = None,
    ) -> dict[str, Any]:
        """The conditioning arguments of ``unet(latents, t, **kwargs)``, as this adapter's injection makes
        them from the text and the given conditions (see ``streams``)."""
        return self.injection.unet_kwargs(text_embeds, self.streams(image_features, graphs))

    # --- UNet --------------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        if self.attention is not None:
            self.attention.attach(unet)

    def detach(self, unet: nn.Module) -> None:
        DecoupledAttention.detach(unet)

    def set_scale(self, image_scale: Scale | None = None, sg_scale: Scale | None = None) -> None:
        """The branch scales for the next calls (None: unchanged); with ``concat``, 0 or 1 only."""
        scales = {IMAGE_STREAM: image_scale, SG_STREAM: sg_scale}
        self.injection.set_scales(self.attention, {s: v for s, v in scales.items() if v is not None})

    # --- the file ----------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.image_proj is not None:
            out |= prefixed(IMAGE_PROJ, self.image_proj)
        if self.attention is not None:
            out |= attention_tensors(self.attention)
        if self.sg_encoder is not None:
            out |= prefixed(SG_ENCODER, self.sg_encoder)
        return out

    def metadata(self) -> dict[str, str]:
        cfg = self.config.to_dict()
        return {CONFIG_KEY: json.dumps({"ip_adapter": cfg.pop("image"), "sg": cfg}, sort_keys=True)}

    def save(self, path: str | Path) -> Path:
        return write_adapter_file(path, self.adapter_state_dict(), self.metadata())

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        sections = {k.split(".", 1)[0] for k in self.adapter_state_dict()}
        load_sections(self.adapter_state_dict(), tensors, tuple(sections), source)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        unet: nn.Module,
        label_dim: int | None = None,
        add_graph_branch: bool = True,
        **overrides: Any,
    ) -> SceneGraphAdapter:
        """Our adapter file, or an official IP-Adapter file: its image branch, plus (with
        ``add_graph_branch``, the default, and ``label_dim`` given) a fresh graph branch to train."""
        f = read_adapter_file(path)
        meta = f.config or {}
        if "sg" in meta:
            sg = dict(meta["sg"])
            config = SGAdapterConfig(**{**sg, "image": meta["ip_adapter"], **overrides})
            adapter = cls(unet, config)
            adapter.load_adapter_state_dict(f.tensors, source=str(path))
            return adapter
        if add_graph_branch and label_dim is None:
            raise CheckpointError(
                f"{path}: an IP-Adapter file without a graph branch; pass label_dim to add one"
            )
        overrides.setdefault("graph_branch", add_graph_branch)
        config = SGAdapterConfig(label_dim=label_dim or 768, image=config_from_file(f), **overrides)
        adapter = cls(unet, config)
        load_sections(
            adapter.adapter_state_dict(), f.tensors, (IMAGE_PROJ, layer_prefix(IMAGE_STREAM)), str(path)
        )
        return adapter
