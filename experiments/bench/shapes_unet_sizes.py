"""What a smaller shapes UNet would buy: the training step and the sampling step of narrower variants of the
shapes preset's UNet, as ratios against the preset's own, measured alternately in the same run.

    python experiments/bench/shapes_unet_sizes.py
    python experiments/bench/shapes_unet_sizes.py --repeats 9 --out experiments/results/bench/shapes_unet_sizes-cpu.json

Every budget of the shapes world (the base's training, ``sg2img evaluate shapes``, the ablation grid) is
paid in UNet steps. Each variant is the preset's UNet (``sg2img.base.components.SHAPES_UNET``) with one
change, random weights, float32, NHWC (the faster layout on CPUs), timed for:
  train   one training step at batch 32: forward, backward, AdamW (what ``fit-base`` repeats)
  sample  one forward at 100 rows without gradients (50 graphs with classifier-free guidance: one step of
          ``sg2img evaluate shapes`` at its default batch)
Variants: the preset; no self-attention (``only_cross_attention``); narrower first level (16 channels);
narrower second level (48); every level narrower (24, 48, 48); half width (16, 32, 32); cross-attention at
8 px only (no attention at 16 px). The parameter count of each is recorded beside its times: at these
sizes a step's cost does not fall as fast as its parameters do.
Writes experiments/results/bench/shapes_unet_sizes-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, summarise, table, write

VARIANTS = {  # name -> changes to SHAPES_UNET
    "preset [32, 64, 64]": {},
    "no self-attention": {"only_cross_attention": True},
    "[16, 64, 64]": {"block_out_channels": [16, 64, 64]},
    "[32, 48, 64]": {"block_out_channels": [32, 48, 64]},
    "[24, 48, 48]": {"block_out_channels": [24, 48, 48]},
    "[16, 32, 32]": {"block_out_channels": [16, 32, 32]},
    "attention at 8 px only": {
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    },
}
BASELINE = "preset [32, 64, 64]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from diffusers import UNet2DConditionModel

    from sg2img.base.components import SHAPES_UNET

    device = torch.device("cpu")
    nhwc = torch.channels_last
    g = torch.Generator().manual_seed(0)
    side, width = SHAPES_UNET["sample_size"], SHAPES_UNET["cross_attention_dim"]

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(n, SHAPES_UNET["in_channels"], side, side, generator=g).contiguous(memory_format=nhwc)
        return x, torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 77, width, generator=g)

    train_rows, sample_rows = rows(32), rows(100)
    steps, params = {}, {}
    for name, change in VARIANTS.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SHAPES_UNET, **change}).train().to(memory_format=nhwc)
        params[name] = sum(p.numel() for p in unet.parameters())
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def train(unet=unet, opt=opt) -> None:
            x, t, text = train_rows
            unet(x, t, encoder_hidden_states=text).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sample(unet=unet) -> None:
            x, t, text = sample_rows
            with torch.inference_mode():
                unet(x, t, encoder_hidden_states=text)

        steps[f"train: {name}"], steps[f"sample: {name}"] = train, sample
    times = alternate(steps, device, args.repeats, args.warmup)
    results = {}
    for kind in ("train", "sample"):
        stats = summarise({n: times[f"{kind}: {n}"] for n in VARIANTS}, BASELINE)
        results[kind] = {n: {**s, "parameters": params[n]} for n, s in stats.items()}
    out_rows = [
        [
            name,
            f"{params[name] / 1e6:.2f} M",
            f"{params[name] / params[BASELINE]:.2f}",
            f"{results['train'][name]['median_s']:.3f}",
            f"{results['train'][name]['ratio']:.2f}",
            f"{results['sample'][name]['median_s']:.3f}",
            f"{results['sample'][name]['ratio']:.2f}",
        ]
        for name in VARIANTS
    ]
    header = ["variant", "params", "ratio", "train s", "ratio", "sample s (100 rows)", "ratio"]
    print(table(out_rows, header))
    record = {
        "setting": {
            "preset": "shapes",
            "train_batch": 32,
            "sample_rows": 100,
            "layout": "channels_last",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "baseline": BASELINE,
            "variants": VARIANTS,
        },
        **device_record(device),
        "results": results,
    }
    print("wrote", write("shapes_unet_sizes-cpu", record, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
