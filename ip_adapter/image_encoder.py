"""CLIP image encoders: the global ``image_embeds`` and the patch tokens, through two backends.

* transformers ``CLIPVisionModelWithProjection`` -- how the official SD1.5 adapters ship ViT-H/14.
* open_clip ``VisionTransformer`` -- ``encode_image(x, normalize=False)`` equals the HF ``image_embeds``.

Both give ``ImageFeatures(embeds (B, P), patch_tokens (B, 1 + L, D))`` where ``patch_tokens`` is the
penultimate layer's output (HF ``hidden_states[-2]``), the input of the IP-Adapter-Plus Resampler.
``open_clip_to_transformers`` converts weights between the two, so either can be cached or shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionTowerSpec:
    """The few numbers that define a CLIP ViT image tower."""

    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    projection_dim: int
    intermediate_size: int

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def transformers_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            projection_dim=self.projection_dim,
            hidden_act="gelu",  # ViT-H/14 (laion) uses exact GELU, not OpenAI's quick_gelu
            layer_norm_eps=1e-5,
        )

    def open_clip_config(self):
        from open_clip.model import CLIPVisionCfg

        return CLIPVisionCfg(
            layers=self.num_layers,
            width=self.hidden_size,
            head_width=self.hidden_size // self.num_heads,
            mlp_ratio=self.intermediate_size / self.hidden_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
        )

    @classmethod
    def from_transformers(cls, config: CLIPVisionConfig) -> VisionTowerSpec:
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            patch_size=config.patch_size,
            image_size=config.image_size,
            projection_dim=config.projection_dim,
            intermediate_size=config.intermediate_size,
        )


# OpenCLIP ViT-H/14 laion2B-s32B-b79K: the encoder of the official SD1.5 adapters.
VIT_H_14 = VisionTowerSpec(1280, 32, 16, 14, 224, 1024, 5120)
# Toy size for tests and demos; widths differ from every other tiny part so shape bugs cannot hide.
TINY_VIT = VisionTowerSpec(32, 2, 4, 8, 32, 24, 64)


def clip_image_processor(image_size: int = 224) -> CLIPImageProcessor:
    """Shortest edge -> ``image_size`` (bicubic), center crop, OpenAI mean/std."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


@dataclass
class ImageFeatures:
    embeds: torch.Tensor  # (B, projection_dim): projected CLS, not L2-normalised
    patch_tokens: torch.Tensor  # (B, 1 + L, hidden): penultimate layer, CLS first

    def __len__(self) -> int:
        return self.embeds.shape[0]


class ImageEncoder(nn.Module):
    """A frozen CLIP vision tower with its preprocessing."""

    spec: VisionTowerSpec

    def __init__(self, spec: VisionTowerSpec):
        super().__init__()
        self.spec = spec
        self.processor = clip_image_processor(spec.image_size)

    def preprocess(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values  # (B, 3, S, S)
        return pixels.to(device=self.device, dtype=self.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, pixel_values: torch.Tensor) -> ImageFeatures:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> ImageFeatures:
        expected = (3, self.spec.image_size, self.spec.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (B, {expected}), got {tuple(pixel_values.shape)}")
        return self.encode(pixel_values.to(self.dtype))

    @torch.no_grad()
    def negative_features(self, batch_size: int) -> ImageFeatures:
        """The unconditional image input, as both official recipes define it.

        IP-Adapter (global embedding): zeroed ``image_embeds``. IP-Adapter Plus (patch tokens): the
        penultimate hidden states of an all-zero pixel input. The adapter then projects these, so the
        negative tokens are ``proj(negative)``, not zeros.
        """
        s = self.spec.image_size
        zeros = torch.zeros(batch_size, 3, s, s, device=self.device, dtype=self.dtype)
        patch = self(zeros).patch_tokens
        return ImageFeatures(
            torch.zeros(batch_size, self.spec.projection_dim, device=self.device, dtype=self.dtype), patch
        )

    @torch.no_grad()
    def encode_images(self, images: Image.Image | list[Image.Image]) -> ImageFeatures:
        return self(self.preprocess(images))


class TransformersImageEncoder(ImageEncoder):
    """transformers ``CLIPVisionModelWithProjection``."""

    def __init__(self, model: CLIPVisionModelWithProjection):
        super().__init__(VisionTowerSpec.from_transformers(model.config))
        self.model = model

    @classmethod
    def from_spec(cls, spec: VisionTowerSpec) -> TransformersImageEncoder:
        return cls(CLIPVisionModelWithProjection(spec.transformers_config()).eval())

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, subfolder: str | None = None, **kwargs
    ) -> TransformersImageEncoder:
        """A hub id (e.g. ``h94/IP-Adapter``, subfolder ``models/image_encoder``) or a local folder."""
        kw = {"subfolder": subfolder} if subfolder else {}
        return cls(CLIPVisionModelWithProjection.from_pretrained(str(path_or_id), **kw, **kwargs).eval())

    def encode(self, pixel_values: torch.Tensor) -> ImageFeatures:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return ImageFeatures(embeds=out.image_embeds, patch_tokens=out.hidden_states[-2])


class OpenClipImageEncoder(ImageEncoder):
    """The vision tower (``model.visual``) of an open_clip model."""

    def __init__(self, visual: nn.Module):
        super().__init__(_spec_from_open_clip(visual))
        if len(visual.transformer.resblocks) < 2:
            raise ValueError("patch tokens come from the penultimate layer: the tower needs >= 2 layers")
        self.visual = visual

    @classmethod
    def from_spec(cls, spec: VisionTowerSpec) -> OpenClipImageEncoder:
        from open_clip.model import _build_vision_tower

        return cls(_build_vision_tower(spec.projection_dim, spec.open_clip_config()).eval())

    @classmethod
    def from_open_clip(
        cls, model_name: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k", **kwargs
    ) -> OpenClipImageEncoder:
        """Any open_clip model name, with a pretrained tag or a local checkpoint path."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        return cls(model.visual.eval())

    def encode(self, pixel_values: torch.Tensor) -> ImageFeatures:
        n = len(self.visual.transformer.resblocks)
        out = self.visual.forward_intermediates(
            pixel_values, indices=[n - 2], output_fmt="NLC", output_extra_tokens=True
        )
        prefix = out["image_intermediates_prefix"][0]  # (B, 1, D)
        patches = out["image_intermediates"][0]  # (B, L, D)
        return ImageFeatures(embeds=out["image_features"], patch_tokens=torch.cat([prefix, patches], dim=1))


def _spec_from_open_clip(visual: nn.Module) -> VisionTowerSpec:
    width = visual.conv1.out_channels
    block = visual.transformer.resblocks[0]
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    return VisionTowerSpec(
        hidden_size=width,
        num_layers=len(visual.transformer.resblocks),
        num_heads=block.attn.num_heads,
        patch_size=patch,
        image_size=image_size,
        projection_dim=visual.proj.shape[1],
        intermediate_size=block.mlp.c_fc.out_features,
    )


_BLOCK_PAIRS = {  # open_clip residual block -> transformers CLIP encoder layer
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def open_clip_blocks_to_transformers(
    sd: dict[str, torch.Tensor], num_layers: int, dst: str
) -> dict[str, torch.Tensor]:
    """The weights of an open_clip ``transformer.resblocks.*`` stack (text or vision) under the names of a
    transformers CLIP encoder at ``dst`` (``vision_model.encoder.layers``, ``text_model.encoder.layers``): the
    fused in-projection is split into q, k and v."""
    out: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        src, to = f"transformer.resblocks.{i}.", f"{dst}.{i}."
        weights, biases = sd[src + "attn.in_proj_weight"].chunk(3), sd[src + "attn.in_proj_bias"].chunk(3)
        for qkv, w, b in zip(("q", "k", "v"), weights, biases):
            out[f"{to}self_attn.{qkv}_proj.weight"], out[f"{to}self_attn.{qkv}_proj.bias"] = w, b
        for a, b in _BLOCK_PAIRS.items():
            out[f"{to}{b}.weight"], out[f"{to}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    return out


def open_clip_to_transformers(visual: nn.Module) -> CLIPVisionModelWithProjection:
    """Convert an open_clip ``VisionTransformer`` to an equivalent ``CLIPVisionModelWithProjection``.

    Supports the standard towers (learned positions, class token, ``ln_pre``, no layer scale, token
    pooling) -- ViT-H/14 among them.
    """
    unsupported = [
        name
        for name, ok in [
            ("layer scale", isinstance(visual.transformer.resblocks[0].ls_1, nn.Identity)),
            ("attentional pooling", getattr(visual, "attn_pool", None) is None),
            ("ln_pre", not isinstance(visual.ln_pre, nn.Identity)),
            ("token pooling", getattr(visual, "pool_type", "tok") == "tok"),
            ("projection", visual.proj is not None),
        ]
        if not ok
    ]
    if unsupported:
        raise ValueError(f"cannot convert this open_clip tower to transformers: {', '.join(unsupported)}")
    spec = _spec_from_open_clip(visual)
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        "visual_projection.weight": sd["proj"].t().contiguous(),  # x @ proj  ==  Linear(weight=proj.T)
    }
    out.update(open_clip_blocks_to_transformers(sd, spec.num_layers, "vision_model.encoder.layers"))
    model = CLIPVisionModelWithProjection(spec.transformers_config())
    result = model.load_state_dict(out, strict=False)
    # position_ids is a non-persistent buffer in recent transformers and a persistent one in older ones.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"conversion left missing {missing} / unexpected {result.unexpected_keys}")
    return model.eval()
