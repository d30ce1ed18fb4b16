"""The IP-Adapter: image projection + decoupled cross-attention branches for a frozen UNet.

    image -> CLIP -> ImageFeatures -> image_proj -> c_i (B, N, d) -> K'_i, V'_i in every cross-attn layer

Only ``image_proj`` and the new ``to_k_ip``/``to_v_ip`` weights train. One adapter works on any UNet with
the same attention layout (all SD1.5 fine-tunes).

``Adapter`` is the general form: named ``Branch``es, each a module that makes one stream's tokens, saved
under its own section, plus the decoupled K/V of every stream. ``IPAdapter`` is the adapter with the
``ImageBranch`` alone; sg2img adds a graph branch beside it, saved as ``sg_encoder.*`` and
``sg_adapter.{i}.*`` in the same file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from .attention import DecoupledAttention, Scale, Stream
from .checkpoint import (
    CONFIG_KEY,
    AdapterFile,
    CheckpointError,
    check_state_dict,
    read_adapter_file,
    write_adapter_file,
)
from .image_encoder import ImageFeatures
from .pretrained import PretrainedMixin
from .projection import ImageProjection, Resampler, ResamplerConfig

IMAGE_STREAM = "ip"
IMAGE_PROJ = "image_proj"


def layer_prefix(stream: str) -> str:
    """Checkpoint section of a stream's K/V weights: "ip" -> "ip_adapter" (official), "sg" -> "sg_adapter"."""
    return f"{stream}_adapter"


@dataclass
class IPAdapterConfig:
    """What defines an image adapter. ``image_tokens``: "cls" = global embedding, 4 tokens (IP-Adapter);
    "patch" = penultimate patch tokens through a 16-query Resampler (IP-Adapter Plus)."""

    image_tokens: Literal["cls", "patch"] = "cls"
    cross_attention_dim: int = 768
    clip_embeddings_dim: int = 1024  # CLIP projection dim (ViT-H/14: 1024)
    clip_hidden_dim: int = 1280  # CLIP tower width (ViT-H/14: 1280), the Resampler input
    num_tokens: int = 4  # "cls" only; the Resampler's count is resampler.num_queries
    resampler: dict = field(default_factory=dict)  # overrides of ResamplerConfig (dim defaults to cross dim)

    def __post_init__(self) -> None:
        if self.image_tokens not in ("cls", "patch"):
            raise ValueError(f"image_tokens must be 'cls' or 'patch', got {self.image_tokens!r}")
        unknown = set(self.resampler) - set(ResamplerConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown resampler options {sorted(unknown)}")

    def resampler_config(self) -> ResamplerConfig:
        base = {
            "dim": self.cross_attention_dim,
            "embedding_dim": self.clip_hidden_dim,
            "output_dim": self.cross_attention_dim,
        }
        return ResamplerConfig(**{**base, **self.resampler})

    @property
    def tokens(self) -> int:
        return self.num_tokens if self.image_tokens == "cls" else self.resampler_config().num_queries

    def build_projection(self) -> ImageProjection | Resampler:
        if self.image_tokens == "cls":
            return ImageProjection(self.clip_embeddings_dim, self.cross_attention_dim, self.num_tokens)
        return Resampler(self.resampler_config())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> IPAdapterConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def infer(cls, image_proj: Mapping[str, torch.Tensor]) -> IPAdapterConfig:
        """Recover the config from an official checkpoint's ``image_proj`` tensors."""
        if "proj.weight" in image_proj:
            w = image_proj["proj.weight"]
            cross = image_proj["norm.weight"].shape[0] if "norm.weight" in image_proj else 768
            return cls(
                "cls",
                cross_attention_dim=cross,
                clip_embeddings_dim=w.shape[1],
                num_tokens=w.shape[0] // cross,
            )
        if "latents" in image_proj and "proj_in.weight" in image_proj:
            latents = image_proj["latents"]
            depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
            inner = image_proj["layers.0.0.to_q.weight"].shape[0]
            ff_inner = image_proj["layers.0.1.1.weight"].shape[0]
            dim = latents.shape[2]
            heads = inner // 64
            return cls(
                "patch",
                cross_attention_dim=image_proj["proj_out.weight"].shape[0],
                clip_hidden_dim=image_proj["proj_in.weight"].shape[1],
                resampler={"dim": dim, "depth": depth, "dim_head": 64, "heads": heads,
                           "num_queries": latents.shape[1], "ff_mult": ff_inner // dim},
            )  # fmt: skip
        raise CheckpointError(
            f"unrecognised image projection keys {sorted(image_proj)[:6]}: expected 'proj.weight' "
            "(IP-Adapter) or 'latents' + 'proj_in.weight' (IP-Adapter Plus)"
        )


class Branch:
    """One named source of an adapter's tokens.

    ``stream`` names the tokens' path through the UNet (its K/V are ``<stream>_adapter.{i}.*`` in the file),
    ``section`` the checkpoint section of ``module``, the trainable part that makes the tokens (for the image
    branch ``image_proj``, as in the official files). A branch owns no K/V itself: the adapter's
    ``DecoupledAttention`` holds those of every stream."""

    stream: str
    section: str

    def __init__(self, module: nn.Module):
        self.module = module

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return prefixed(self.section, self.module)


class ImageBranch(Branch):
    """IP-Adapter's image branch: CLIP features -> ``image_proj`` -> ``config.tokens`` tokens."""

    stream, section = IMAGE_STREAM, IMAGE_PROJ

    def __init__(self, config: IPAdapterConfig):
        super().__init__(config.build_projection())
        self.config = config

    def tokens(self, features: ImageFeatures) -> torch.Tensor:
        """(B, N, cross_attention_dim) from CLIP features: the global embed or the patch tokens."""
        x = features.embeds if self.config.image_tokens == "cls" else features.patch_tokens
        return self.module(x)

    def stream_of(self, features: ImageFeatures) -> Stream:
        return Stream(self.tokens(features))


class Adapter(PretrainedMixin, nn.Module):
    """Named branches on a frozen UNet, and the decoupled K/V of every cross-attention layer for their
    streams.

    Each branch's module is registered under its checkpoint section (``adapter.image_proj``), so module
    paths and files read the same whatever the set of branches. ``own_attention=False`` builds no K/V (an
    injection that feeds the tokens through the UNet's own, such as concatenation to the text);
    ``extra_streams`` adds K/V for streams whose tokens come from elsewhere."""

    def __init__(
        self,
        unet: nn.Module,
        branches: Sequence[Branch],
        *,
        own_attention: bool = True,
        extra_streams: Sequence[str] = (),
        init_from_base: bool = True,
        positional: Sequence[str] = (),
        soft_regions: Sequence[str] = (),
        region_width: float = 0.1,
        region_bias: Sequence[str] = (),
    ):
        super().__init__()
        if not branches:
            raise ValueError("an adapter needs at least one branch")
        self.branches: dict[str, Branch] = {}
        for b in branches:
            if b.stream in self.branches or b.stream in extra_streams:
                raise ValueError(f"two branches on the stream {b.stream!r}")
            self.branches[b.stream] = b
            self.add_module(b.section, b.module)
        self.attention = (
            DecoupledAttention(
                unet,
                (*self.branches, *extra_streams),
                init_from_base,
                positional=positional,
                soft_regions=soft_regions,
                region_width=region_width,
                region_bias=region_bias,
            )
            if own_attention
            else None
        )

    branch_kinds: ClassVar[Mapping[str, str]] = {
        IMAGE_STREAM: "image"
    }  # what a user calls the branch of a stream

    def branch(self, stream: str) -> Branch:
        if stream not in self.branches:
            raise ValueError(f"this adapter has no {self.branch_kinds.get(stream, repr(stream))} branch")
        return self.branches[stream]

    # --- UNet ------------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        if self.attention is not None:
            self.attention.attach(unet)

    def detach(self, unet: nn.Module) -> None:
        DecoupledAttention.detach(unet)

    def set_scale(self, scale: Scale, stream: str = IMAGE_STREAM) -> None:
        if self.attention is None:
            raise ValueError("this adapter has no attention processors of its own, so no branch scales")
        self.attention.set_scale(scale, stream)

    # --- the file layout -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors: each branch's module under its section (``image_proj.*`` in the official layout)
        and ``<stream>_adapter.{i}.*`` for the K/V of every stream (``ip_adapter.{i}.to_{k,v}_ip.weight``)."""
        out: dict[str, torch.Tensor] = {}
        for b in self.branches.values():
            out |= b.state_tensors()
        if self.attention is not None:
            out |= attention_tensors(self.attention)
        return out

    def load_adapter_state_dict(
        self,
        tensors: Mapping[str, torch.Tensor],
        source: str = "<state dict>",
        streams: Sequence[str] | None = None,
    ) -> None:
        """Load flat tensors, checking keys and shapes first. ``streams`` limits which streams' K/V are read
        (default: all of this adapter's); every branch module is read; tensors of other sections are
        ignored."""
        own = self.adapter_state_dict()
        if streams is None:
            sections = {k.split(".", 1)[0] for k in own}
        else:
            sections = {b.section for b in self.branches.values()} | {layer_prefix(s) for s in streams}
        load_sections(own, tensors, tuple(sorted(sections)), source)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata ``save`` writes: the adapter's config."""
        raise NotImplementedError

    def save(self, path: str | Path, **metadata: object) -> Path:
        """Write the flat adapter file (atomically), config in the metadata."""
        meta = self.metadata()
        if metadata:
            meta = {CONFIG_KEY: json.dumps({**json.loads(meta[CONFIG_KEY]), **metadata}, sort_keys=True)}
        return write_adapter_file(path, self.adapter_state_dict(), meta)


class IPAdapter(Adapter):
    """The adapter with the image branch alone: image projection + decoupled K/V for every cross-attention
    layer of ``unet``. ``extra_streams`` adds more decoupled branches (same processors, their own K/V and
    scale) whose tokens the caller supplies."""

    def __init__(
        self,
        unet: nn.Module,
        config: IPAdapterConfig | None = None,
        extra_streams: Sequence[str] = (),
        init_from_base: bool = True,
    ):
        config = config or IPAdapterConfig(cross_attention_dim=unet.config.cross_attention_dim)
        check_cross_attention_dim(config, unet)
        if IMAGE_STREAM in extra_streams:
            raise ValueError(f"stream name {IMAGE_STREAM!r} is the image branch itself")
        super().__init__(
            unet, [ImageBranch(config)], extra_streams=extra_streams, init_from_base=init_from_base
        )
        self.config = config

    # --- tokens ---------------------------------------------------------------------------------
    def image_tokens(self, features: ImageFeatures) -> torch.Tensor:
        """(B, N, cross_attention_dim) from CLIP features: the global embed or the patch tokens."""
        return self.branch(IMAGE_STREAM).tokens(features)

    def image_stream(self, features: ImageFeatures) -> Stream:
        return self.branch(IMAGE_STREAM).stream_of(features)

    # --- the file layout -------------------------------------------------------------------------
    def official_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The nested form of ``ip-adapter_sd15.bin`` (image branch only)."""
        flat = self.adapter_state_dict()
        return {
            IMAGE_PROJ: {
                k[len(IMAGE_PROJ) + 1 :]: v for k, v in flat.items() if k.startswith(IMAGE_PROJ + ".")
            },
            "ip_adapter": {
                k[len("ip_adapter.") :]: v for k, v in flat.items() if k.startswith("ip_adapter.")
            },
        }

    def metadata(self) -> dict[str, str]:
        return adapter_metadata(self.config)

    @classmethod
    def from_file(cls, path: str | Path, unet: nn.Module, extra_streams: Sequence[str] = ()) -> IPAdapter:
        """Our flat file or an official ``ip-adapter*.bin``/``.safetensors``; the config comes from the
        file's metadata or, for official files, from the tensor shapes."""
        f = read_adapter_file(path)
        adapter = cls(unet, config_from_file(f), extra_streams=extra_streams)
        present = [s for s in adapter.attention.stream_names if layer_prefix(s) in f.prefixes()]
        if IMAGE_STREAM not in present:
            raise CheckpointError(f"{path}: no 'ip_adapter.*' tensors: not an IP-Adapter file")
        adapter.load_adapter_state_dict(f.tensors, source=str(path), streams=present)
        return adapter


def check_cross_attention_dim(config: IPAdapterConfig, unet: nn.Module) -> None:
    if config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(
            f"adapter cross_attention_dim {config.cross_attention_dim} does not match the UNet's "
            f"{unet.config.cross_attention_dim}"
        )


def load_sections(
    own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], sections: Sequence[str], source: str
) -> None:
    """Copy ``tensors`` of the named top-level sections into ``own`` (live parameters), after checking
    that keys and shapes match exactly; other sections are ignored. Dtypes may be mixed (fp16/fp32)."""
    expected = {k: v.shape for k, v in own.items() if k.split(".", 1)[0] in sections}
    found = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in sections}
    check_state_dict(expected, found, source)
    with torch.no_grad():
        for k, v in found.items():
            own[k].copy_(v.to(dtype=own[k].dtype))


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def attention_tensors(attention: DecoupledAttention) -> dict[str, torch.Tensor]:
    """``<stream>_adapter.{i}.to_{k,v}_<stream>.weight`` for every stream and cross-attention layer, and
    ``<stream>_adapter.{i}.pos_<stream>.{weight,bias}`` for a positional stream and
    ``<stream>_adapter.{i}.region_width_<stream>`` (the log width) for a softly confined one, and
    ``<stream>_adapter.{i}.region_bias_{in,out}_<stream>.{weight,bias}`` for one with a learned spatial bias."""
    out = {}
    for idx, proc in attention.layers.items():
        for s in attention.stream_names:
            k, v = proc.branch(s)
            out[f"{layer_prefix(s)}.{idx}.to_k_{s}.weight"] = k.weight
            out[f"{layer_prefix(s)}.{idx}.to_v_{s}.weight"] = v.weight
            if s in proc.positional:
                pos = getattr(proc, f"pos_{s}")
                out[f"{layer_prefix(s)}.{idx}.pos_{s}.weight"] = pos.weight
                out[f"{layer_prefix(s)}.{idx}.pos_{s}.bias"] = pos.bias
            if s in proc.soft_regions:
                out[f"{layer_prefix(s)}.{idx}.region_width_{s}"] = getattr(proc, f"region_width_{s}")
            if s in proc.region_bias:
                for part in ("in", "out"):
                    layer = getattr(proc, f"region_bias_{part}_{s}")
                    out[f"{layer_prefix(s)}.{idx}.region_bias_{part}_{s}.weight"] = layer.weight
                    out[f"{layer_prefix(s)}.{idx}.region_bias_{part}_{s}.bias"] = layer.bias
    return out


def config_from_file(f: AdapterFile) -> IPAdapterConfig:
    meta = f.config
    if meta is not None:
        section = meta.get("ip_adapter", meta)
        return IPAdapterConfig.from_dict(section)
    image_proj = f.section(IMAGE_PROJ)
    if not image_proj:
        raise CheckpointError(f"{f.path}: no 'image_proj' tensors: not an IP-Adapter file")
    return IPAdapterConfig.infer(image_proj)


def adapter_metadata(config: IPAdapterConfig, **extra: object) -> dict[str, str]:
    return {CONFIG_KEY: json.dumps({"ip_adapter": json.loads(config.to_json()), **extra}, sort_keys=True)}
