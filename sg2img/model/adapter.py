"""The scene-graph adapter: IP-Adapter's image branch plus a decoupled graph branch.

    Z = Attn(Q, K, V) + lambda_i * Attn(Q, K'_i, V'_i) + lambda_g * Attn(Q, K'_g, V'_g, mask_g)

``SceneGraphAdapter`` is ``ip_adapter.Adapter`` with two named branches, the ``ImageBranch`` (stream "ip")
and the ``GraphBranch`` (stream "sg"); either may be off. The graph tokens come from ``SceneGraphEncoder``
and reach every cross-attention layer as the stream "sg", with their own ``to_k_sg``/``to_v_sg`` (initialised from ``to_k``/``to_v``) and scale.
How the streams reach the UNet is the config's ``injection``, a strategy of ``sg2img.model.injection``:
``decoupled`` as above, or the ``concat`` ablation (graph and image tokens appended to the text tokens).

Saved as one flat file: ``image_proj.*`` and ``ip_adapter.*`` in the official layout (stock diffusers
loads that part), plus ``sg_adapter.{i}.to_{k,v}_sg.weight`` and ``sg_encoder.*``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch_geometric.data import Batch

from ip_adapter import IMAGE_STREAM, IPAdapterConfig, Stream
from ip_adapter.adapter import (
    IMAGE_PROJ,
    Adapter,
    Branch,
    ImageBranch,
    check_cross_attention_dim,
    config_from_file,
    layer_prefix,
    load_sections,
)
from ip_adapter.attention import Scale
from ip_adapter.checkpoint import CONFIG_KEY, CheckpointError, read_adapter_file
from ip_adapter.image_encoder import ImageFeatures
from sg2img.model.gnn import GNNConfig, GraphTokens, SceneGraphEncoder, TokenConfig
from sg2img.model.injection import Injection, injection

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


class GraphBranch(Branch):
    """The scene-graph branch: a graph batch -> ``SceneGraphEncoder`` -> tokens, mask, regions, layout."""

    stream, section = SG_STREAM, SG_ENCODER

    def __init__(self, encoder: SceneGraphEncoder):
        super().__init__(encoder)

    def tokens(self, graphs: Batch) -> GraphTokens:
        return self.module(graphs)  # tokens (B, L, C), mask (B, L), regions, layout

    def stream_of(self, graphs: Batch | GraphTokens) -> Stream:
        return (graphs if isinstance(graphs, GraphTokens) else self.tokens(graphs)).stream()


class SceneGraphAdapter(Adapter):
    """The image branch and the graph branch (either may be off), fed to the UNet by the config's
    injection."""

    branch_kinds: ClassVar[Mapping[str, str]] = {IMAGE_STREAM: "image", SG_STREAM: "graph"}

    def __init__(self, unet: nn.Module, config: SGAdapterConfig, init_from_base: bool = True):
        branches: list[Branch] = []
        if config.image_branch:
            check_cross_attention_dim(config.image, unet)
            branches.append(ImageBranch(config.image))
        if config.graph_branch:
            cross = unet.config.cross_attention_dim
            branches.append(
                GraphBranch(SceneGraphEncoder(config.label_dim, cross, config.gnn, config.tokens))
            )
        strategy = injection(config.injection)
        confined = config.graph_branch and config.tokens.confine_objects
        soft = confined and config.tokens.confinement in ("soft", "learned")
        learned = confined and config.tokens.confinement == "learned"
        super().__init__(
            unet,
            branches,
            own_attention=strategy.has_attention,
            init_from_base=init_from_base,
            positional=(SG_STREAM,) if config.positional_graph_query else (),
            soft_regions=(SG_STREAM,) if soft else (),
            region_width=config.tokens.region_width,
            region_bias=(SG_STREAM,) if learned else (),
        )
        self.config = config
        self.injection: Injection = strategy

    # --- tokens ------------------------------------------------------------------------------------
    def image_tokens(self, features: ImageFeatures) -> torch.Tensor:
        return self.branch(IMAGE_STREAM).tokens(features)  # (B, N, C)

    def graph_tokens(self, graphs: Batch) -> GraphTokens:
        return self.branch(SG_STREAM).tokens(graphs)

    def streams(
        self, image_features: ImageFeatures | None = None, graphs: Batch | GraphTokens | None = None
    ) -> dict[str, Stream]:
        """The named streams of the given conditions: ``graphs`` is a graph batch or what ``graph_tokens``
        made of one."""
        given = {IMAGE_STREAM: image_features, SG_STREAM: graphs}
        return {s: self.branch(s).stream_of(c) for s, c in given.items() if c is not None}

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
    def set_scale(self, image_scale: Scale | None = None, sg_scale: Scale | None = None) -> None:
        """The branch scales for the next calls (None: unchanged); with ``concat``, 0 or 1 only."""
        scales = {IMAGE_STREAM: image_scale, SG_STREAM: sg_scale}
        self.injection.set_scales(self.attention, {s: v for s, v in scales.items() if v is not None})

    # --- the file ----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        cfg = self.config.to_dict()
        return {CONFIG_KEY: json.dumps({"ip_adapter": cfg.pop("image"), "sg": cfg}, sort_keys=True)}

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
