"""IP-Adapter for diffusers UNets: image encoders, projections, decoupled attention, checkpoints.

Works alone, on any SD1.5-style ``UNet2DConditionModel``; ``sg2img`` builds on it, never the reverse.
"""

from .adapter import IMAGE_STREAM, Adapter, Branch, ImageBranch, IPAdapter, IPAdapterConfig, layer_prefix
from .attention import DecoupledAttention, DecoupledAttnProcessor, Stream, expand_scale
from .checkpoint import AdapterFile, CheckpointError, read_adapter_file, write_adapter_file
from .image_encoder import (
    TINY_VIT,
    VIT_H_14,
    ImageEncoder,
    ImageFeatures,
    OpenClipImageEncoder,
    TransformersImageEncoder,
    VisionTowerSpec,
    clip_image_processor,
    open_clip_to_transformers,
)
from .pretrained import PretrainedMixin, resolve_adapter_file
from .projection import ImageProjection, Resampler, ResamplerConfig

__all__ = [
    "IMAGE_STREAM",
    "TINY_VIT",
    "VIT_H_14",
    "Adapter",
    "AdapterFile",
    "Branch",
    "CheckpointError",
    "DecoupledAttention",
    "DecoupledAttnProcessor",
    "IPAdapter",
    "IPAdapterConfig",
    "ImageBranch",
    "ImageEncoder",
    "ImageFeatures",
    "ImageProjection",
    "OpenClipImageEncoder",
    "PretrainedMixin",
    "Resampler",
    "ResamplerConfig",
    "Stream",
    "TransformersImageEncoder",
    "VisionTowerSpec",
    "clip_image_processor",
    "expand_scale",
    "layer_prefix",
    "open_clip_to_transformers",
    "read_adapter_file",
    "resolve_adapter_file",
    "write_adapter_file",
]
