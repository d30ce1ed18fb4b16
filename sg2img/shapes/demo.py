"""``make demo``: the IP-Adapter core end to end on the tiny preset, with no downloads.

1. write the tiny base model as a diffusers folder;
2. build a CLS IP-Adapter on it and save the flat adapter file;
3. load base + adapter with *stock* diffusers (``load_ip_adapter``) and generate from an image prompt;
4. run the same UNet step through sg2img's processors and print how far apart the two are.

The weights are random, so the picture is noise: the demo shows the plumbing and the file format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ip_adapter import IPAdapter, Stream
from sg2img.base.components import build_components, get_preset, save_tiny_model
from sg2img.model.parameter_counts import format_rows, info_rows


def reference_image(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((6, 10, 30, 34), fill=(220, 40, 40))
    d.rectangle((36, 30, 58, 52), fill=(40, 60, 220))
    return img


@torch.no_grad()
def run_demo(out: Path, seed: int = 0) -> dict[str, float]:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    for lib in (diffusers, transformers):  # loading/saving bars would bury the four lines below
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()
    out.mkdir(parents=True, exist_ok=True)
    base_dir = save_tiny_model(out / "tiny-sd", seed=seed)
    print(f"[1/4] tiny base model   -> {base_dir}")

    parts = build_components("tiny", seed=seed)
    torch.manual_seed(seed + 1)
    adapter = IPAdapter(parts.unet, get_preset("tiny").adapter_config("cls"))
    for p in adapter.image_proj.parameters():  # give the projection non-trivial weights
        p.add_(torch.randn_like(p) * 0.1)
    adapter_file = adapter.save(out / "ip-adapter.safetensors")
    print(f"[2/4] IP-Adapter file   -> {adapter_file}")

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name="ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(1.0)
    pipe.set_progress_bar_config(disable=True)
    ref = reference_image()
    ref.save(out / "reference.png")
    image = pipe(
        prompt="a red circle and a blue square",
        ip_adapter_image=ref,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    image.save(out / "stock-diffusers.png")
    print(f"[3/4] stock diffusers   -> {out / 'stock-diffusers.png'}")

    # The same UNet step through both implementations.
    features = parts.image_encoder.encode_images(ref)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    text = pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
    t = torch.tensor([500])
    ref_out = pipe.unet(
        latents, t, text, added_cond_kwargs={"image_embeds": [features.embeds[:, None]]}
    ).sample
    adapter.attach(parts.unet)
    ours = parts.unet(
        latents, t, text, cross_attention_kwargs={"streams": {"ip": adapter.image_stream(features)}}
    ).sample
    adapter.set_scale(0.0)
    plain = parts.unet(
        latents, t, text, cross_attention_kwargs={"streams": {"ip": Stream(adapter.image_tokens(features))}}
    ).sample
    adapter.detach(parts.unet)
    base = parts.unet(latents, t, text).sample
    figures = {
        "max |ours - diffusers|": (ours - ref_out).abs().max().item(),
        "max |scale 0 - plain UNet|": (plain - base).abs().max().item(),
        "max |scale 1 - plain UNet|": (ours - base).abs().max().item(),
    }
    print("[4/4] one UNet step, sg2img processors vs stock diffusers:")
    for k, v in figures.items():
        print(f"      {k:<28} {v:.3e}")
    print()
    print(format_rows(info_rows(str(base_dir))))
    return figures
