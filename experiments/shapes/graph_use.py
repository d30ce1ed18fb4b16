"""Does a trained graph adapter use its graph? The denoising loss on validation rows, per timestep, with

  true   the row's own caption and graph,
  other  the row's own caption and another row's graph,
  none   the row's own caption and no graph (the dropped-graph condition),

at the same noise. An adapter that reads the graph has ``true`` clearly below ``other``; where they are
equal, the branch has learned nothing the caption does not already say.

    python experiments/shapes/graph_use.py runs/shapes/graph_decoupled [more run folders] [--batches 4]

Each run folder is what ``sg2img fit`` wrote (config.yaml and adapter.safetensors). Prints one table per run
and writes the figures to ``--out`` (default build/shapes-eval/graph-use.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sg2img.train.core import diffusion_target

TIMESTEPS = (50, 200, 400, 600, 800, 950)
CONDITIONS = ("true", "other", "none")


def load_run(run: Path):
    from ip_adapter.checkpoint import read_adapter_file
    from sg2img.train.cli import SG2ImgCLI
    from sg2img.train.settings import grouped_model_config

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # fit-only keys of the saved config
        cfg.pop(key, None)
    cfg["trainer"].update(callbacks=None, logger=False)
    cfg["data"]["num_workers"] = 0
    cfg["model"] = grouped_model_config(cfg["model"])  # a run fitted before the settings were grouped
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    cli = SG2ImgCLI(args=["--config", f.name], run=False)
    Path(f.name).unlink()
    module, data = cli.model, cli.datamodule
    module.configure_model()
    adapter = read_adapter_file(run / "adapter.safetensors")
    module.model.adapter.load_adapter_state_dict(adapter.tensors, source=str(run / "adapter.safetensors"))
    module.model.adapter.attach(module.model.unet)
    module.eval()
    need = module.data_requirements()
    data.resolution, data.clip_size = need["resolution"], need["clip_size"]
    return module, data


@torch.no_grad()
def graph_use(run: Path, batches: int) -> dict[int, dict[str, float]]:
    module, data = load_run(run)
    loader = iter(data.val_dataloader())
    rows = [next(loader) for _ in range(batches + 1)]
    sums = {t: dict.fromkeys(CONDITIONS, 0.0) for t in TIMESTEPS}
    for i in range(batches):
        batch, other = rows[i], rows[i + 1]
        n = min(batch.batch_size, other.batch_size)
        if n != batch.batch_size:
            raise ValueError(
                f"{run}: validation batches of unequal size ({batch.batch_size}, {other.batch_size})"
            )
        swapped = dataclasses.replace(batch, graphs=other.graphs, labels=other.labels)
        g = torch.Generator().manual_seed(i)
        x0 = module.model._latents(batch, g)
        noise = torch.randn(x0.shape, generator=g)
        keep = torch.zeros(n, dtype=torch.bool)
        drops = {"text": keep, "image": keep, "graph": keep}
        no_graph = dict(drops, graph=torch.ones(n, dtype=torch.bool))
        for t in TIMESTEPS:
            steps = torch.full((n,), t)
            noisy = module.model.noise_scheduler.add_noise(x0, noise, steps)
            target = diffusion_target(module.model.noise_scheduler, x0, noise, steps)  # the noise, or v
            for name, b, d in (("true", batch, drops), ("other", swapped, drops), ("none", batch, no_graph)):
                pred = module.model.unet(noisy, steps, **module.model.condition(b, d)).sample
                sums[t][name] += F.mse_loss(pred.float(), target.float()).item() / batches
    return sums


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batches", type=int, default=4, help="validation batches (each paired with the next)")
    ap.add_argument("--out", type=Path, default=Path("build/shapes-eval/graph-use.json"))
    args = ap.parse_args(argv)
    results = {}
    for run in args.runs:
        sums = graph_use(run, args.batches)
        results[str(run)] = sums
        print(f"\n{run}\n| t | true | other | none | (other - true) / other |\n|---|---|---|---|---|")
        for t, s in sums.items():
            gap = (s["other"] - s["true"]) / s["other"]
            print(f"| {t} | {s['true']:.5f} | {s['other']:.5f} | {s['none']:.5f} | {gap:+.2%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
