"""The IP-Adapter: image projection + decoupled cross-attention branches for a frozen UNet.

    image -> CLIP -> ImageFeatures -> image_proj -> c_i (B, N, d) -> K'_i, V'_i in every cross-attn layer

Only ``image_proj`` and the new ``to_k_ip``/``to_v_ip`` weights train. One adapter works on any UNet with
the same attention layout (all SD1.5 fine-tunes). Further named streams (the scene-graph branch of
sg2img) can be added beside "ip" and are saved as ``<stream>_adapter.{i}.*`` in the same file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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


class IPAdapter(PretrainedMixin, nn.Module):
    """Image projection + decoupled K/V weights for every cross-attention layer of ``unet``.

    ``extra_streams`` adds more decoupled branches (same processors, their own K/V and scale).
    """

    def __init__(
        self,
        unet: nn.Module,
        config: IPAdapterConfig | None = None,
        extra_streams: Sequence[str] = (),
        init_from_base: bool = True,
    ):
        super().__init__()
        self.config = config or IPAdapterConfig(cross_attention_dim=unet.config.cross_attention_dim)
        if self.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise ValueError(
                f"adapter cross_attention_dim {self.config.cross_attention_dim} does not match the UNet's "
                f"{unet.config.cross_attention_dim}"
            )
        if IMAGE_STREAM in extra_streams:
            raise ValueError(f"stream name {IMAGE_STREAM!r} is the image branch itself")
        self.image_proj = self.config.build_projection()
        self.attention = DecoupledAttention(unet, (IMAGE_STREAM, *extra_streams), init_from_base)

    # --- tokens ---------------------------------------------------------------------------------
    def image_tokens(self, features: ImageFeatures) -> torch.Tensor:
        """(B, N, cross_attention_dim) from CLIP features: the global embed or the patch tokens."""
        x = features.embeds if self.config.image_tokens == "cls" else features.patch_tokens
        return self.image_proj(x)

    def image_stream(self, features: ImageFeatures) -> Stream:
        return Stream(self.image_tokens(features))

    # --- UNet ------------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        self.attention.attach(unet)

    def detach(self, unet: nn.Module) -> None:
        self.attention.detach(unet)

    def set_scale(self, scale: Scale, stream: str = IMAGE_STREAM) -> None:
        self.attention.set_scale(scale, stream)

    # --- the file layout -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors in the official layout: ``image_proj.*`` and ``ip_adapter.{i}.to_{k,v}_ip.weight``,
        plus ``<stream>_adapter.{i}.*`` for extra streams."""
        return {**prefixed(IMAGE_PROJ, self.image_proj), **attention_tensors(self.attention)}

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

    def load_adapter_state_dict(
        self,
        tensors: Mapping[str, torch.Tensor],
        source: str = "<state dict>",
        streams: Sequence[str] | None = None,
    ) -> None:
        """Load flat tensors, checking keys and shapes first. ``streams`` limits which branches are read
        (default: all of this adapter's); tensors of other sections are ignored."""
        streams = self.attention.stream_names if streams is None else tuple(streams)
        load_sections(
            self.adapter_state_dict(), tensors, (IMAGE_PROJ, *(layer_prefix(s) for s in streams)), source
        )

    def save(self, path: str | Path, **metadata: object) -> Path:
        """Write the flat adapter file (atomically), config in the metadata."""
        return write_adapter_file(path, self.adapter_state_dict(), adapter_metadata(self.config, **metadata))

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
    ``<stream>_adapter.{i}.region_width_<stream>`` (the log width) for a softly confined one."""
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
