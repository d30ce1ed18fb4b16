"""Base-model presets: the SD1.5 architecture and a tiny twin that everything tests and demos run on.

``build_components(preset)`` builds every SD1.5 part from configs with random weights and a fixed seed:
UNet, VAE, CLIP text encoder, CLIP image encoder (transformers and open_clip backends), DDPM/DDIM
schedulers, and the real CLIP tokenizer. ``build_on_meta`` builds the same parts on the meta device,
so the SD1.5 architecture can be inspected without allocating or downloading anything.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ip_adapter import IPAdapterConfig
from ip_adapter.image_encoder import (
    TINY_VIT,
    VIT_H_14,
    OpenClipImageEncoder,
    TransformersImageEncoder,
    VisionTowerSpec,
)
from sg2img.base.tokenizer import clip_tokenizer, write_clip_tokenizer_files
from sg2img.errors import ConfigurationError

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5) component configs.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# The schedule SD1.5 was trained with; DDIM is the paper's sampler (50 steps, guidance 7.5).
SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SD15_DDIM = {**SD15_SCHEDULE, "set_alpha_to_one": False, "steps_offset": 1}

# Tiny: every cross-attention position of SD1.5 is kept (down, mid, up), so the official key layout
# (odd indices, mid block last) is exercised; widths are all different so mix-ups raise.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}
TINY_TEXT = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 48,
}


# The shapes world's base (sg2img.shapes.world): a pixel-space model at 32 px (no VAE: the UNet denoises
# RGB directly), cross-attention at 16 and 8 px (and the mid block; the shipped base, v5, has it at 8 px only,
# configs/experiments/shapes/base_attention_8px.yaml). Its text and image encoders have the
# sizes of the world's tiny CLIP (sg2img.shapes.tiny_clip.TinyClipConfig, whose trained towers a shapes base
# reads): a causal text tower of width 48 with exact GELU, and a ViT on 32 px with 4 px patches. A cosine
# schedule suits pixels.
SHAPES_TEXT = {
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
}
SHAPES_VIT = VisionTowerSpec(64, 4, 4, 4, 32, 64, 256)
SHAPES_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
# DDIM as diffusers expects it for SD (no x0 clipping, steps_offset 1); on the shapes base, clipping x0 to
# [-1, 1] found fewer objects.
SHAPES_DDIM = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
}


@dataclass(frozen=True)
class Preset:
    """Configs of one base-model size, plus the matching IP-Adapter configs. ``vae=None``: a pixel-space
    model (the UNet's sample is the image in [-1, 1])."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any] | None
    text_encoder: dict[str, Any]
    image_encoder: VisionTowerSpec
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_DDIM))
    resampler: dict[str, Any] = field(default_factory=dict)  # IP-Adapter Plus overrides
    # DDIM's eta this base is sampled with unless a call says otherwise (its recipe's; 0: deterministic)
    eta: float = 0.0

    def adapter_config(self, image_tokens: str = "cls") -> IPAdapterConfig:
        return IPAdapterConfig(
            image_tokens=image_tokens,
            cross_attention_dim=self.unet["cross_attention_dim"],
            clip_embeddings_dim=self.image_encoder.projection_dim,
            clip_hidden_dim=self.image_encoder.hidden_size,
            resampler=dict(self.resampler),
        )


# The tiny Resampler keeps dim_head 64: diffusers infers its head count as to_q rows // 64.
PRESETS: dict[str, Preset] = {
    "sd15": Preset("sd15", SD15_UNET, SD15_VAE, SD15_TEXT, VIT_H_14),
    "tiny": Preset("tiny", TINY_UNET, TINY_VAE, TINY_TEXT, TINY_VIT, resampler={"heads": 2}),
    "shapes": Preset(
        "shapes", SHAPES_UNET, None, SHAPES_TEXT, SHAPES_VIT, scheduler=SHAPES_DDIM, resampler={"heads": 2}
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class Components:
    """The parts of a Stable Diffusion base model (diffusers' names)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: DDIMScheduler
    image_encoder: TransformersImageEncoder | OpenClipImageEncoder | None = None
    eta: float = 0.0  # the sampler's default DDIM eta (a base file's ``Preset.eta``; 0 for every other model)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Arguments for ``diffusers.StableDiffusionPipeline(...)``."""
        encoder = self.image_encoder
        hf = encoder.model if isinstance(encoder, TransformersImageEncoder) else None
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "safety_checker": None,
            "feature_extractor": encoder.processor if encoder is not None else None,
            "image_encoder": hf,
            "requires_safety_checker": False,
        }


def build_components(
    preset: str | Preset = "tiny", seed: int = 0, image_backend: str = "transformers"
) -> Components:
    """Every base part at the preset's size, random weights, deterministic for a seed, in eval mode."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if image_backend not in ("transformers", "open_clip"):
        raise ValueError(f"image_backend must be 'transformers' or 'open_clip', got {image_backend!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**p.unet)
    vae = AutoencoderKL(**p.vae) if p.vae is not None else None
    text_encoder = CLIPTextModel(CLIPTextConfig(**p.text_encoder))
    image_encoder = (
        TransformersImageEncoder.from_spec(p.image_encoder)
        if image_backend == "transformers"
        else OpenClipImageEncoder.from_spec(p.image_encoder)
    )
    for m in (unet, vae, text_encoder, image_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(**p.scheduler),
        image_encoder=image_encoder,
        eta=p.eta,
    )


def ddpm_scheduler(preset: str | Preset = "tiny") -> DDPMScheduler:
    """The training-time noise schedule of a preset."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    keys = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    return DDPMScheduler(**{k: v for k, v in p.scheduler.items() if k in keys})


FOLDER_MARKER = "sg2img.json"  # in a diffusers folder: what this package knows of it (origin preset, eta)


def read_folder_marker(model_dir: str | Path) -> dict[str, Any]:
    """The marker of a diffusers folder (``{}`` when it has none: a folder another tool wrote)."""
    marker = Path(model_dir) / FOLDER_MARKER
    if not marker.is_file():
        return {}
    try:
        fields = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ConfigurationError(f"{marker}: not JSON ({e})") from e
    if not isinstance(fields, dict):
        raise ConfigurationError(f"{marker}: expected a JSON object, got {type(fields).__name__}")
    eta = fields.get("eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ConfigurationError(f"{marker}: field 'eta' must be a number in [0, 1], got {eta!r}")
    return fields


def write_folder_marker(model_dir: str | Path, **fields: Any) -> Path:
    """Merge ``fields`` into the folder's marker (kept: what it already records)."""
    marker = Path(model_dir) / FOLDER_MARKER
    marker.write_text(json.dumps({**read_folder_marker(model_dir), **fields}, indent=2) + "\n")
    return marker


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny preset as a diffusers-format folder that ``StableDiffusionPipeline`` loads."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    pipe = StableDiffusionPipeline(**build_components("tiny", seed=seed).pipeline_kwargs())
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; SD folders also carry the BPE pair older readers need.
    write_clip_tokenizer_files(out / "tokenizer")
    write_folder_marker(out, preset="tiny", seed=seed)
    return out


# A base model in one safetensors file: every part's weights under its diffusers name (``unet.``, ``vae.``,
# ``text_encoder.``, ``image_encoder.``) and the Preset that builds them in the metadata. This is how the
# small trained bases ship (see ``EMBEDDED``); SD1.5-size models use diffusers folders or single files.
BASE_FILE_FORMAT = "sg2img-base"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = "embedded"  # the trained shapes-world base that ships with the package
EMBEDDED_BASE_FILE = ASSETS / "shapes-base.safetensors"


def preset_to_json(p: Preset) -> str:
    return json.dumps(asdict(p), sort_keys=True)


def preset_from_json(text: str, source: str = "<string>") -> Preset:
    try:
        d = json.loads(text)
        d["image_encoder"] = VisionTowerSpec(**d["image_encoder"])
        return Preset(**d)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{source}: the metadata field 'preset' does not describe a base model: {e}") from e


def _base_file_modules(parts: Components) -> dict[str, torch.nn.Module | None]:
    """The modules a base file holds, under the key prefixes it stores them with."""
    encoder = parts.image_encoder
    return {
        "unet": parts.unet,
        "vae": parts.vae,
        "text_encoder": parts.text_encoder,
        "image_encoder": encoder.model if encoder is not None else None,
    }


def save_base_file(
    parts: Components, preset: Preset, path: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write ``parts`` as one base file (floating weights stored as ``dtype``), atomically."""
    from safetensors.torch import save_file

    from ip_adapter.atomic_files import atomic_write

    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: base files are written as .safetensors")
    encoder = parts.image_encoder
    if encoder is not None and not isinstance(encoder, TransformersImageEncoder):
        raise ValueError("base files hold a transformers CLIP image encoder (or none)")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _base_file_modules(parts).items():
        if module is None:
            continue
        for k, v in module.state_dict().items():
            v = v.detach().to("cpu")
            tensors[f"{name}.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    meta = {"format": BASE_FILE_FORMAT, "preset": preset_to_json(preset)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return out


def is_base_file(path: str | Path) -> bool:
    from safetensors import safe_open

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == BASE_FILE_FORMAT
    except Exception:
        return False


def base_file_preset(path: str | Path) -> Preset:
    """The Preset a base file records (no weights read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return preset_from_json((f.metadata() or {}).get("preset", ""), str(path))


def convert_base_file(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite a base file with its floating weights stored as ``dtype`` (fp16 halves a shipped file)."""
    return save_base_file(read_base_file(src), base_file_preset(src), dst, dtype=dtype)


def read_base_file(path: str | Path, dtype: torch.dtype = torch.float32) -> Components:
    """The parts a base file holds, in eval mode, frozen, as ``dtype``."""
    from ip_adapter.checkpoint import check_state_dict, read_formatted_file

    p = Path(path)
    meta, tensors = read_formatted_file(p, BASE_FILE_FORMAT)
    preset = preset_from_json(meta.get("preset", ""), str(p))
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's random stream
        parts = build_components(preset, image_backend="transformers")
    for name, module in _base_file_modules(parts).items():
        if module is None:
            continue
        found = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        own = module.state_dict()
        check_state_dict({k: v.shape for k, v in own.items()}, found, str(p), what=f"{name} of this preset")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in found.items()})
        if next(module.parameters()).dtype != dtype:
            module.to(dtype)
    return parts


def build_on_meta(preset: str | Preset) -> dict[str, torch.nn.Module]:
    """The preset's modules on the meta device: shapes and parameter counts, no memory, no download."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        unet = UNet2DConditionModel(**p.unet)
        parts: dict[str, torch.nn.Module] = {
            "unet": unet,
            **({"vae": AutoencoderKL(**p.vae)} if p.vae is not None else {}),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**p.text_encoder)),
            "image_encoder": TransformersImageEncoder.from_spec(p.image_encoder).model,
        }
    return parts


def read_preset_from_folder(model_dir: str | Path) -> Preset:
    """A Preset from the configs of a local diffusers-format folder (no weights read)."""
    from transformers import CLIPVisionConfig

    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root}: not a diffusers model folder (no model_index.json). Write one with "
            "`sg2img make-tiny --out DIR`, or pass a folder saved by `pipe.save_pretrained`."
        )

    def cfg(sub: str) -> dict[str, Any]:
        f = root / sub / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing component config")
        return {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}

    unet_cfg, vae_cfg, text_cfg = cfg("unet"), cfg("vae"), cfg("text_encoder")
    if (root / "image_encoder" / "config.json").is_file():
        vision = VisionTowerSpec.from_transformers(CLIPVisionConfig(**cfg("image_encoder")))
    else:
        vision = VIT_H_14
    text_keys = set(CLIPTextConfig().to_dict())
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    origin = read_folder_marker(root).get("preset")  # written by save_tiny_model: the folder's preset
    return Preset(
        name=str(root),
        unet=unet_cfg,
        vae=vae_cfg,
        text_encoder={k: v for k, v in text_cfg.items() if k in text_keys},
        image_encoder=vision,
        scheduler={k: v for k, v in sched.items() if not k.startswith("_")},
        resampler=dict(PRESETS[origin].resampler) if origin in PRESETS else {},
    )


IP_ADAPTER_IMAGE_ENCODER = (
    "h94/IP-Adapter",
    "models/image_encoder",
)  # ViT-H/14 as the SD1.5 adapters ship it
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def base_components(
    source: str | Path, single_file_config: str | None = None, dtype: torch.dtype | None = None, seed: int = 0
) -> Components:
    """The parts of the base ``source`` names, the one answer to "which base is this?": a preset name (random
    weights from ``seed``), ``embedded``, a base file, a diffusers folder, a single-file checkpoint or a hub
    id (``load_pipeline_parts``)."""
    source = str(source)
    if source in PRESETS:
        return build_components(source, seed=seed)
    return load_pipeline_parts(source, single_file_config, dtype)


def load_base(
    source: str | Path = "tiny",
    image_encoder: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    single_file_config: str | None = None,
    image_encoder_required: bool = True,
) -> Components:
    """A frozen base model, every part in eval mode with ``requires_grad=False``.

    ``source`` is a preset name (``tiny``, ``shapes``: random weights, no download), ``embedded`` (the
    trained shapes-world base shipped with the package), a base file (``save_base_file``), a local
    diffusers folder, a single-file SD1.5 checkpoint (``.safetensors``/``.ckpt``; ``single_file_config`` names the diffusers
    folder or hub id whose configs describe it), or a hub id.

    ``image_encoder`` is a local folder or hub id of a transformers ``CLIPVisionModelWithProjection``
    (``hub_id:subfolder`` picks a subfolder), or ``open_clip:MODEL[:PRETRAINED]``. Left out, the model
    folder's ``image_encoder/`` is used, else the preset's tower (tiny) or IP-Adapter's ViT-H/14; with
    ``image_encoder_required=False`` (no image branch) a base without one is left without one.
    """
    source = str(source)
    parts = base_components(source, single_file_config, dtype, seed)
    if image_encoder is not None:
        parts.image_encoder = load_image_encoder(image_encoder)
    elif source not in PRESETS and parts.image_encoder is None and image_encoder_required:
        default = ":".join(IP_ADAPTER_IMAGE_ENCODER)
        try:
            parts.image_encoder = load_image_encoder(default)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigurationError(
                f"model.image.enabled is on, but no image encoder is configured: the base {source} has no "
                f"image_encoder/ folder, model.base.image_encoder is not set, and IP-Adapter's ({default}) "
                f"could not be loaded ({first}). Set model.base.image_encoder to a local "
                "CLIPVisionModelWithProjection folder or open_clip:MODEL:FILE, or set "
                "model.image.enabled: false."
            ) from e
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.image_encoder):
        if m is None:
            continue
        if next(m.parameters()).dtype != dtype:
            m.to(dtype)
        m.eval().requires_grad_(False)
    return parts


def load_image_encoder(spec: str) -> TransformersImageEncoder | OpenClipImageEncoder:
    """``open_clip:MODEL[:PRETRAINED]``, a local folder, ``hub_id`` or ``hub_id:subfolder``."""
    if spec.startswith("open_clip:"):
        _, model, *rest = spec.split(":", 2)
        return OpenClipImageEncoder.from_open_clip(model, pretrained=rest[0] if rest else None)
    if Path(spec).is_dir():
        return TransformersImageEncoder.from_pretrained(spec)
    repo, _, sub = spec.partition(":")
    return TransformersImageEncoder.from_pretrained(repo, subfolder=sub or None)


HOW_TO_PROVIDE_A_MODEL = (
    "Provide a local diffusers folder (written by `pipe.save_pretrained` or `sg2img make-tiny --out DIR`), "
    "a single-file SD1.5 checkpoint (.safetensors/.ckpt, with the folder or hub id of its configs), or a "
    "hub id this machine can reach; `embedded` names the shipped shapes-world model (`sg2img generate` "
    "without --model uses it, and so does `model.base.source: embedded` in a training config)."
)


class ModelNotFoundError(FileNotFoundError):
    """A base model that is neither a local folder, a single file, nor loadable from the hub."""


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix in SINGLE_FILE_SUFFIXES


def load_pipeline_parts(
    source: str | Path, single_file_config: str | None = None, dtype: torch.dtype | None = None
) -> Components:
    """The parts of a diffusers folder, a single-file checkpoint or a hub id (no image encoder is
    fetched: ``image_encoder`` is the folder's, or None)."""
    from diffusers import StableDiffusionPipeline

    source = str(source)
    if source == EMBEDDED:
        source = str(EMBEDDED_BASE_FILE)
    path = Path(source).expanduser()
    if is_base_file(path):
        return read_base_file(path, dtype or torch.float32)
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    encoder = None
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such single-file checkpoint. {HOW_TO_PROVIDE_A_MODEL}")
        if single_file_config:
            kwargs["config"] = single_file_config
        # A single file holds UNet, VAE and text encoder only; the image encoder comes from the config
        # folder when it has one (else from the adapter's side, see SG2ImgPipeline.load_sg_adapter).
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), image_encoder=None, feature_extractor=None, **kwargs
        )
        config_dir = Path(single_file_config) if single_file_config else None
        if config_dir is not None and (config_dir / "image_encoder" / "config.json").is_file():
            encoder = TransformersImageEncoder.from_pretrained(config_dir / "image_encoder")
    elif path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path}: not a diffusers model folder (no model_index.json) and not a single-file "
                f"checkpoint. {HOW_TO_PROVIDE_A_MODEL}"
            )
        pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    elif _looks_local(source):
        raise ModelNotFoundError(f"{source}: no such model folder or file. {HOW_TO_PROVIDE_A_MODEL}")
    else:  # a hub id
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(
                f"{source}: not a local path, and loading it as a hub id failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). {HOW_TO_PROVIDE_A_MODEL}"
            ) from e
    if encoder is None and getattr(pipe, "image_encoder", None) is not None:
        encoder = TransformersImageEncoder(pipe.image_encoder)
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        image_encoder=encoder,
        eta=float(read_folder_marker(path).get("eta", 0.0)) if path.is_dir() else 0.0,
    )


__all__ = [
    "EMBEDDED",
    "FOLDER_MARKER",
    "PRESETS",
    "Components",
    "ModelNotFoundError",
    "Preset",
    "base_components",
    "base_file_preset",
    "build_components",
    "build_on_meta",
    "convert_base_file",
    "ddpm_scheduler",
    "get_preset",
    "is_base_file",
    "load_base",
    "load_image_encoder",
    "load_pipeline_parts",
    "read_base_file",
    "read_folder_marker",
    "read_preset_from_folder",
    "save_base_file",
    "save_tiny_model",
    "write_folder_marker",
]
