"""diffusers -> original (LDM) single-file layout for Stable Diffusion 1.x checkpoints.

Custom SD1.5 fine-tunes ship as one ``.safetensors`` in the original CompVis layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), which
diffusers reads with ``from_single_file``. diffusers only ships the reading direction; this module writes
it, so any diffusers-format model (the tiny preset included) can be exported as such a file. The layout
is derived from the model configs, so it holds for any number of blocks and layers per block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ip_adapter.atomic_files import atomic_write

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _replace_prefix(key: str, old: str, new: str) -> str | None:
    return new + key[len(old) :] if key.startswith(old) else None


def unet_key_map(config: dict) -> dict[str, str]:
    """diffusers UNet prefix -> LDM prefix, for every block of this config."""
    per = config["layers_per_block"]
    per = per[0] if isinstance(per, (list, tuple)) else per
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    m: dict[str, str] = dict(_UNET_TOP)
    for b in range(len(down_types)):
        for j in range(per):
            slot = 1 + b * (per + 1) + j
            m[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{slot}.0."
            m[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{slot}.1."
        if b < len(down_types) - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (per + 1) + per}.0.op."
    m["mid_block.resnets.0."] = "middle_block.0."
    m["mid_block.attentions.0."] = "middle_block.1."
    m["mid_block.resnets.1."] = "middle_block.2."
    for b, kind in enumerate(up_types):
        for j in range(per + 1):
            slot = b * (per + 1) + j
            m[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{slot}.0."
            m[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{slot}.1."
        if b < len(up_types) - 1:
            upsampler = 2 if kind.startswith("CrossAttn") else 1
            m[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * (per + 1) + per}.{upsampler}.conv."
    return m


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    mapping = sorted(unet_key_map(config).items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, value in state.items():
        for old, new in mapping:
            if key.startswith(old if old.endswith(".") else old + "."):
                rest = key[len(old) :].lstrip(".")
                if ".resnets." in old or old.startswith("mid_block.resnets"):
                    for a, b in _UNET_RESNET:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                out[UNET_PREFIX + new.rstrip(".") + "." + rest] = value
                break
        else:
            raise KeyError(f"no LDM name for UNet weight {key!r}: unsupported UNet layout")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        k = key
        for old, new in (
            ("encoder.conv_norm_out.", "encoder.norm_out."),
            ("decoder.conv_norm_out.", "decoder.norm_out."),
        ):
            k = _replace_prefix(k, old, new) or k
        parts = k.split(".")
        if parts[1] == "down_blocks":  # encoder.down_blocks.i.resnets.j / downsamplers.0.conv
            i = parts[2]
            rest = ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.", 1).replace("downsamplers.0.conv", "downsample.conv")
            k = f"encoder.down.{i}.{rest}"
        elif parts[1] == "up_blocks":  # LDM numbers the decoder's up blocks in reverse
            i = n_up - 1 - int(parts[2])
            rest = ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.", 1).replace("upsamplers.0.conv", "upsample.conv")
            k = f"decoder.up.{i}.{rest}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                k = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:  # attentions.0: 1x1 convolutions in LDM
                rest = ".".join(parts[4:])
                for a, b in _VAE_ATTENTION:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
                k = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        k = k.replace("conv_shortcut", "nin_shortcut")
        out[VAE_PREFIX + k] = value
    return out


def text_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # the original files hold the transformers CLIPTextModel under its ``text_model.`` prefix
    return {
        TEXT_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()
    }


def export_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a pipeline's UNet, VAE and text encoder as one original-layout ``.safetensors`` file
    (atomically; an attached adapter is left out). ``StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)`` reads it."""
    # attention processors hold adapter weights (an attached IP-Adapter), not the base model's
    unet = {k: v for k, v in pipe.unet.state_dict().items() if ".processor." not in k}
    tensors = {
        **unet_to_ldm(unet, dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
        **text_to_ldm(pipe.text_encoder.state_dict()),
    }
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    out = Path(path)
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return out


__all__ = ["export_single_file", "text_to_ldm", "unet_key_map", "unet_to_ldm", "vae_to_ldm"]
