"""A minimal classifier-free-guided sampler over any conditioning kwargs of the UNet.

Conditional and unconditional passes run separately, so the two sides may carry token streams of
different lengths (a scene graph and the empty graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def sample_latents(
    unet,
    scheduler,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    shape: tuple[int, ...],
    steps: int,
    guidance: float,
    generator: torch.Generator,
) -> torch.Tensor:
    device, dtype = unet.device, unet.dtype
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = unet(x, t, **cond).sample
        if guidance != 1.0:
            eps_u = unet(x, t, **uncond).sample
            eps = eps_u + guidance * (eps - eps_u)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> list[Image.Image]:
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


def sample_images(
    unet, vae, scheduler, cond, uncond, n: int, steps: int, guidance: float, seed: int, size: int
) -> list[Image.Image]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (n, unet.config.in_channels, size // factor, size // factor)
    generator = torch.Generator(device=unet.device).manual_seed(seed)
    return decode_images(
        vae, sample_latents(unet, scheduler, cond, uncond, shape, steps, guidance, generator)
    )
