"""Inference overhead per UNet step, on the SD1.5 architecture with random weights.

    python experiments/bench/unet_step.py               # batch 2 (CFG), 64x64 latents, 77 text tokens
    python experiments/bench/unet_step.py --latent 32   # the small-latent setting, quick on a CPU

fp32 on CPU, fp16 on a GPU (``--dtype`` to change). Variants, each one UNet call on the same inputs:
  plain                      diffusers' AttnProcessor2_0 everywhere (the baseline)
  plain_cached               our processor without streams, the text K/V cached as within a generation:
                             the fair baseline of the cached variants (they cache the text K/V too)
  image4                     + our image branch (4 tokens), K/V of the constant streams cached as within
                             a generation (every step after the first)
  image4_uncached            the same, K/V projected at every call
  patch16+graph32            + image branch (16 patch tokens) and graph branch (32 tokens, padded), cached
  patch16+graph32_uncached   the same, uncached
  diffusers_ip4              diffusers' IPAdapterAttnProcessor2_0 on the same weights (4 tokens, loaded by
                             ``_load_ip_adapter_weights`` as ``load_ip_adapter`` does; it projects the image
                             embedding inside every UNet call, which is how diffusers runs it)
Runs alternate (the order rotating), after a warm-up; the figures are medians and ratios to ``plain``;
the cached variants also get their ratio to ``plain_cached`` (``ratio_to_plain_cached``).
Writes experiments/results/bench/unet_step[-<latent>][-<device>].json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, pick_device, pick_dtype, summarise, table, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px images)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with CFG)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    ap.add_argument("--graph-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ip_adapter import IMAGE_STREAM, ImageFeatures, IPAdapter, Stream
    from ip_adapter.attention import DecoupledAttnProcessor
    from sg2img.base.components import PRESETS

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    preset = PRESETS["sd15"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**preset.unet).eval().requires_grad_(False)
    ad4 = IPAdapter(unet, preset.adapter_config("cls"))
    adpg = IPAdapter(unet, preset.adapter_config("patch"), extra_streams=("sg",))
    unet_d = copy.deepcopy(unet)
    unet_d._load_ip_adapter_weights([ad4.official_state_dict()])
    for m in (unet, unet_d, ad4, adpg):
        m.to(device=device, dtype=dtype)

    g = torch.Generator().manual_seed(1)
    b, c = args.batch, preset.unet["cross_attention_dim"]
    latents = torch.randn(b, 4, args.latent, args.latent, generator=g).to(device, dtype)
    t = torch.tensor([500] * b, device=device)
    text = torch.randn(b, 77, c, generator=g).to(device, dtype)
    spec = preset.image_encoder
    feats = ImageFeatures(
        torch.randn(b, spec.projection_dim, generator=g).to(device, dtype),
        torch.randn(b, (spec.image_size // spec.patch_size) ** 2 + 1, spec.hidden_size, generator=g).to(
            device, dtype
        ),
    )
    n_graph = args.graph_tokens
    mask = torch.ones(b, n_graph, dtype=torch.bool, device=device)
    mask[0, n_graph * 3 // 4 :] = False  # one graph padded, as in a batch of graphs of different sizes
    with torch.no_grad():
        streams4 = {IMAGE_STREAM: ad4.image_stream(feats)}
        streams_pg = {
            IMAGE_STREAM: adpg.image_stream(feats),
            "sg": Stream(torch.randn(b, n_graph, c, generator=g).to(device, dtype), mask),
        }

    # one cache per processor and variant, kept across the calls: the state within a generation
    caches = {a: [{} for _ in a.attention.processors()] for a in (ad4, adpg)}

    def use(adapter, cached: bool):
        def setup():
            adapter.attach(unet)
            for p, cache in zip(adapter.attention.processors(), caches[adapter]):
                p.kv_cache = cache if cached else None

        return setup

    text_only = {name: DecoupledAttnProcessor() for name in unet.attn_processors}  # one text cache each

    def plain_cached():
        for p in text_only.values():
            p.kv_cache = p.kv_cache if p.kv_cache is not None else {}
        unet.set_attn_processor(dict(text_only))

    def call(u, **kw):
        return lambda: u(latents, t, text, **kw).sample

    variants = {
        "plain": call(unet),
        "plain_cached": call(unet),
        "image4": call(unet, cross_attention_kwargs={"streams": streams4}),
        "image4_uncached": call(unet, cross_attention_kwargs={"streams": streams4}),
        "patch16+graph32": call(unet, cross_attention_kwargs={"streams": streams_pg}),
        "patch16+graph32_uncached": call(unet, cross_attention_kwargs={"streams": streams_pg}),
        "diffusers_ip4": call(unet_d, added_cond_kwargs={"image_embeds": [feats.embeds[:, None]]}),
    }
    setup = {
        "plain": lambda: unet.set_attn_processor(AttnProcessor2_0()),
        "plain_cached": plain_cached,
        "image4": use(ad4, True),
        "image4_uncached": use(ad4, False),
        "patch16+graph32": use(adpg, True),
        "patch16+graph32_uncached": use(adpg, False),
    }
    with torch.no_grad():
        setup["image4"]()
        ours = variants["image4"]().float()
        theirs = variants["diffusers_ip4"]().float()
        parity = float((ours - theirs).abs().max() / theirs.abs().max())
        times = alternate(variants, device, args.repeats, args.warmup, setup)
    for p in ad4.attention.processors() + adpg.attention.processors():
        p.kv_cache = None
    summary = summarise(times, "plain")
    for name in ("image4", "patch16+graph32"):
        summary[name]["ratio_to_plain_cached"] = (
            summary[name]["median_s"] / summary["plain_cached"]["median_s"]
        )
    rows = [
        [n, f"{s['median_s'] * 1000:.1f}", f"{s['ratio']:.3f}", f"{s['overhead_pct']:+.1f}%"]
        for n, s in summary.items()
    ]
    print(f"UNet step, SD1.5 architecture, batch {b}, {args.latent}x{args.latent} latents, {dtype}, {device}")
    print(table(rows, ["variant", "median ms", "ratio", "overhead"]))
    print(f"image4 vs diffusers_ip4 outputs: max |diff| / max |out| = {parity:.2e}")
    name = "unet_step" + ("" if args.latent == 64 else f"-{args.latent}") + f"-{device.type}"
    out = write(
        name,
        {
            "setting": {
                "batch": b,
                "latent": args.latent,
                "text_tokens": 77,
                "dtype": str(dtype),
                "graph_tokens": n_graph,
                "repeats": args.repeats,
                "warmup": args.warmup,
            },
            "device": device_record(device),
            "results": summary,
            "times_s": times,
            "parity_image4_vs_diffusers": parity,
        },
        args.out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
