"""The whole generation loop: how much of a 50-step generation goes to the adapter.

    python experiments/bench/generation.py                # 50 DDIM steps, 16x16 latents (CPU setting)
    python experiments/bench/generation.py --latent 64    # 512 px (a GPU)

SG2ImgPipeline on the SD1.5 architecture with random weights (text encoder, ViT-H/14 image encoder, UNet;
the VAE decode is left out: ``output_type="latent"``), batch 1 with classifier-free guidance. Variants:
  plain                      no adapter: the text prompt alone (the baseline)
  image4                     + image prompt, 4 tokens (the ViT-H/14 encode and projection once per call)
  image4_uncached            the same, with the K/V of the constant streams projected at every step
  patch16+graph              + image prompt (16 patch tokens) and a scene graph (11 objects, 19 triples:
                             31 graph tokens; label embeddings and GNN once per call)
  patch16+graph_uncached     the same, uncached
"adapter share" is (variant - plain) / variant: the part of the loop the adapter costs.
Writes experiments/results/bench/generation[-<latent>]-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, pick_device, pick_dtype, summarise, table, write


def big_graph():
    from sg2img.graph import SceneGraph

    names = ["sky", "tree", "house", "road", "car", "person", "dog", "grass", "cloud", "fence", "window"]
    preds = ["above", "left of", "right of", "below", "near", "on", "behind", "has"]
    triples = [(i, preds[(i + j) % len(preds)], j) for i in range(11) for j in range(11) if 0 < j - i <= 2]
    return SceneGraph.from_names(names, triples[:20])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from PIL import Image

    from sg2img.base.components import build_components, get_preset
    from sg2img.infer.pipeline import SG2ImgPipeline
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
    from sg2img.model.gnn import gnn_preset

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    preset = get_preset("sd15")
    parts = build_components("sd15", seed=0)
    pipe = SG2ImgPipeline.from_components(parts)
    pipe.use_ddim()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device, dtype=dtype)
    label_dim = parts.text_encoder.config.hidden_size
    image4 = SceneGraphAdapter(
        pipe.unet, SGAdapterConfig(label_dim, graph_branch=False, image=preset.adapter_config("cls"))
    )
    full = SceneGraphAdapter(
        pipe.unet,
        SGAdapterConfig(label_dim, image=preset.adapter_config("patch"), gnn=gnn_preset("sg2im")),
    )
    graph = big_graph()
    image = Image.new("RGB", (512, 512), (120, 160, 200))
    size = args.latent * pipe.vae_scale_factor
    prompt = "a house beside a road under a cloudy sky"

    def generate(**kw):
        def run():
            return pipe(
                prompt=prompt,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                height=size,
                width=size,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
                **kw,
            ).images

        return run

    def use(adapter, cached: bool):
        def setup():
            if adapter is None:
                pipe.unload_sg_adapter()
            else:
                pipe.set_sg_adapter(adapter, image_encoder=parts.image_encoder)
            pipe.cache_constant_kv = cached

        return setup

    variants = {
        "plain": generate(),
        "image4": generate(ip_adapter_image=image),
        "image4_uncached": generate(ip_adapter_image=image),
        "patch16+graph": generate(ip_adapter_image=image, scene_graph=graph),
        "patch16+graph_uncached": generate(ip_adapter_image=image, scene_graph=graph),
    }
    setup = {
        "plain": use(None, True),
        "image4": use(image4, True),
        "image4_uncached": use(image4, False),
        "patch16+graph": use(full, True),
        "patch16+graph_uncached": use(full, False),
    }
    setup["image4"]()
    a = variants["image4"]()
    setup["image4_uncached"]()
    b = variants["image4_uncached"]()
    same = bool(torch.equal(a, b))
    times = alternate(variants, device, args.repeats, args.warmup, setup)
    summary = summarise(times, "plain")
    plain = summary["plain"]["median_s"]
    for s in summary.values():
        s["adapter_share_pct"] = 100.0 * (s["median_s"] - plain) / s["median_s"]
        s["per_step_ms"] = 1000.0 * s["median_s"] / args.steps
    rows = [
        [
            n,
            f"{s['median_s']:.2f}",
            f"{s['per_step_ms']:.1f}",
            f"{s['ratio']:.3f}",
            f"{s['adapter_share_pct']:.1f}%",
        ]
        for n, s in summary.items()
    ]
    print(f"generation loop, {args.steps} DDIM steps, SD1.5 architecture, {size} px ({args.latent}x{args.latent} "
          f"latents), CFG, {dtype}, {device}")  # fmt: skip
    print(table(rows, ["variant", "median s", "ms/step", "ratio", "adapter share"]))
    print(f"cached and uncached K/V give the same latents: {same}")
    name = "generation" + ("" if args.latent == 64 else f"-{args.latent}") + f"-{device.type}"
    out = write(
        name,
        {
            "setting": {
                "steps": args.steps,
                "latent": args.latent,
                "dtype": str(dtype),
                "cfg": True,
                "graph_tokens": 1 + len(graph.objects) + len(graph.relationships),
                "repeats": args.repeats,
                "warmup": args.warmup,
            },
            "device": device_record(device),
            "results": summary,
            "times_s": times,
            "cached_equals_uncached": same,
        },
        args.out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
