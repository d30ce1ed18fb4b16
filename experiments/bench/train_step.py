"""The training step at equal batch and model: ours (frozen encoders cached) against the official recipe.

    python experiments/bench/train_step.py                          # CPU setting: 256 px, batch 2
    python experiments/bench/train_step.py --resolution 512 --batch 8   # the paper's size (a GPU)

One SG2ImgModule on the SD1.5 architecture with random weights (image branch, CLS tokens, and the graph
branch with the sg2im GNN), AdamW on the adapter. Variants, each one optimiser step on the same rows:
  official        the official recipe: VAE encode + CLIP image encode + text encode at every step, then the
                  UNet forward and backward (our module on raw rows: nothing cached)
  ours            the frozen encoders' outputs read from a cache (``sg2img cache``): only the UNet forward
                  and backward run
  unet_forward    one UNet forward with the same conditioning, no gradients: the unit of the floor (a step
                  costs about 2x a forward: the backward needs activation gradients only)
  gnn+labels      the graph branch's share: label embeddings (cached per string, as in training) and the
                  GNN, forward and backward
Samples/s, the ratios, and the peak memory of each variant's step: the most memory the step takes above
what was in use just before it (the model, its weights and inputs, loaded alike for every variant). CUDA:
``max_memory_allocated`` reset before the step; CPU: a process of its own per variant, its resident set
sampled every millisecond over the steps alone. Writes experiments/results/bench/train_step-<res>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, pick_device, summarise, table, write

VARIANTS = ("official", "ours", "unet_forward", "gnn+labels")


def build(args, device):
    from sg2img.data.rows import Example, Preprocess, collate
    from sg2img.graph import SceneGraph
    from sg2img.train.adapter_module import SG2ImgModule
    from sg2img.train.settings import BaseSettings, ImageBranchSettings

    module = SG2ImgModule(
        base=BaseSettings("sd15", dtype=args.base_dtype), image=ImageBranchSettings(tokens="cls"), seed=0
    )
    module.configure_model()
    module.to(device)
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    prep = Preprocess(args.resolution, module.model.image_encoder.spec.image_size, module.model.tokenizer)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.batch):
        from PIL import Image

        pixels = (torch.rand(args.resolution, args.resolution, 3, generator=g) * 255).to(torch.uint8).numpy()
        graph = SceneGraph.from_names(
            ["sky", "tree", "house", "road", "car"], [(0, "above", 1), (2, "left of", 1), (4, "on", 3)]
        )
        rows.append(prep(Example(f"row{i}", Image.fromarray(pixels), "a house beside a road", graph)))
    raw = collate(rows).to(device)
    enc = module.model.encode_batch(raw)
    cached_rows = [
        {
            "key": r["key"],
            "caption": r["caption"],
            "graph": r["graph"],
            **{k: v[i].cpu() for k, v in enc.items()},
        }
        for i, r in enumerate(rows)
    ]
    cached = collate(cached_rows).to(device)
    return module, optimizer, raw, cached


def make_variants(module, optimizer, raw, cached):
    gen = lambda: torch.Generator(device=module.device).manual_seed(0)  # noqa: E731

    def step(batch):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss = module.diffusion_loss(batch, gen())
            loss.backward()
            optimizer.step()

        return run

    drops = module.model.dropout.sample(cached.batch_size, gen(), module.device)
    drops = {k: torch.zeros_like(v) for k, v in drops.items()}

    def forward():
        with torch.no_grad():
            latents = module.model._latents(cached, gen())
            t = torch.full((latents.shape[0],), 500, device=module.device)
            module.model.unet(latents, t, **module.model.condition(cached, drops))

    def gnn():
        graphs = module.model.embed_graphs(cached.graphs, cached.labels)
        tokens = module.model.adapter.graph_tokens(graphs).tokens
        tokens.float().square().mean().backward()

    return {"official": step(raw), "ours": step(cached), "unet_forward": forward, "gnn+labels": gnn}


def peak_memory(args, device, variant: str) -> float:
    """The peak bytes one variant's step takes above what was in use before it, in a process of its own."""
    cmd = [sys.executable, __file__, "--probe", variant, "--resolution", str(args.resolution),
           "--batch", str(args.batch), "--device", str(device), "--base-dtype", args.base_dtype]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_step_bytes"])


def step_peak(run, device, repeats: int = 2) -> float:
    """Peak memory of ``run`` (called ``repeats`` times) above what was in use when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            run()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    import threading

    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()
    before = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(repeats):
            run()
    finally:
        done.set()
        sampler.join()
    return float(max(peak[0], proc.memory_info().rss) - before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--base-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # one variant, print its peak RSS
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    module, optimizer, raw, cached = build(args, device)
    variants = make_variants(module, optimizer, raw, cached)
    if args.probe:
        print(json.dumps({"peak_step_bytes": step_peak(variants[args.probe], device)}))
        return 0
    times = alternate(variants, device, args.repeats, args.warmup)
    summary = summarise(times, "official")
    fwd = summary["unet_forward"]["median_s"]
    for s in summary.values():
        s["samples_per_s"] = args.batch / s["median_s"]
        s["per_unet_forward"] = s["median_s"] / fwd
    summary["gnn+labels"]["share_of_ours_pct"] = (
        100.0 * summary["gnn+labels"]["median_s"] / summary["ours"]["median_s"]
    )
    if not args.no_memory:
        for name in ("official", "ours"):
            summary[name]["peak_memory_bytes"] = (
                step_peak(variants[name], device)
                if device.type == "cuda"
                else peak_memory(args, device, name)
            )
    speedup = summary["ours"]["samples_per_s"] / summary["official"]["samples_per_s"]
    rows = [
        [n, f"{s['median_s']:.2f}", f"{s['samples_per_s']:.2f}", f"{s['per_unet_forward']:.2f}",
         f"{s['peak_memory_bytes'] / 2**30:.2f}" if "peak_memory_bytes" in s else "-"]
        for n, s in summary.items()
    ]  # fmt: skip
    print(f"training step, SD1.5 architecture, {args.resolution} px, batch {args.batch}, {device}")
    print(table(rows, ["variant", "median s", "samples/s", "x UNet fwd", "peak GiB"]))
    print(f"ours / official samples/s: {speedup:.2f}x; GNN + labels: "
          f"{summary['gnn+labels']['share_of_ours_pct']:.2f}% of our step")  # fmt: skip
    out = write(
        f"train_step-{args.resolution}-{device.type}",
        {
            "setting": {
                "resolution": args.resolution,
                "batch": args.batch,
                "base_dtype": args.base_dtype,
                "repeats": args.repeats,
                "warmup": args.warmup,
            },
            "device": device_record(device),
            "results": summary,
            "speedup_ours_vs_official": speedup,
            "times_s": times,
        },
        args.out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
