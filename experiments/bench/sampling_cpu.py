"""Where ``evaluate shapes``' sampling time goes on a CPU, and what the CPU settings buy.

    python experiments/bench/sampling_cpu.py            # 50 test graphs, one batch, 25 DDIM steps

The embedded model (base and graph adapter) draws one batch of test graphs (relations only, guidance 5:
100 UNet rows per step), each variant in a fresh process so that thread settings and caches start alike:
  float32                     the command's default, all of torch's threads (the baseline)
  float32, channels_last      the UNet's weights in NHWC, the layout oneDNN's convolutions prefer
  bfloat16                    the frozen model in bfloat16 (``--dtype bfloat16``)
  float32, 1 thread           one intra-op thread
  bfloat16, 1 thread
  float32, 2 processes x 1 thread   two one-thread processes at once, each drawing half the batch; the
                              time is the later one's drawing
  bfloat16, 2 processes x 1 thread
Before the timed variants, one call of 3 steps of the baseline runs under ``torch.profiler``: the share
of the time of each kind of operator (convolutions, attention, linear layers, copies, the rest).
Writes experiments/results/bench/sampling_cpu-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_record, write

KINDS = {  # operator name -> kind, for the profile's shares
    "aten::mkldnn_convolution": "convolution",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::addmm": "linear layers",
    "aten::mm": "linear layers",
    "aten::bmm": "linear layers",
    "aten::copy_": "copies (dtype, layout)",
}
VARIANTS = {  # name -> (dtype, channels_last, threads, processes)
    "float32": ("float32", False, None, 1),
    "float32, channels_last": ("float32", True, None, 1),
    "bfloat16": ("bfloat16", False, None, 1),
    "float32, 1 thread": ("float32", False, 1, 1),
    "bfloat16, 1 thread": ("bfloat16", False, 1, 1),
    "float32, 2 processes x 1 thread": ("float32", False, 1, 2),
    "bfloat16, 2 processes x 1 thread": ("bfloat16", False, 1, 2),
}


def draw(n: int, offset: int, steps: int, dtype: str, channels_last: bool, profile: bool) -> dict:
    """One process's work: build the embedded pipeline, warm it up, draw graphs [offset, offset + n)."""
    from sg2img.data.shapes import Shapes
    from sg2img.infer.generate import ModelSource, build_pipeline
    from sg2img.shapes.world import caption

    pipe, _ = build_pipeline(ModelSource(), torch.device("cpu"), getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    source = Shapes("test", seed=0)
    graphs = [source.example(i).graph.without_boxes() for i in range(offset, offset + n)]
    prompts = [caption(g, relations=False) for g in graphs]

    def call(k: int) -> np.ndarray:
        out = pipe(
            prompt=prompts, scene_graph=graphs, num_inference_steps=k, guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(offset + i) for i in range(n)], output_type="np",
        )  # fmt: skip
        return np.asarray(out.images)

    call(2)  # warm-up: first-call allocations and oneDNN primitive creation
    shares = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            call(3)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares: dict[str, float] = {}
        for e in events:
            kind = KINDS.get(e.key, "the rest (norms, activations, element-wise)")
            shares[kind] = shares.get(kind, 0.0) + e.self_cpu_time_total / total
        shares = {k: round(v, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    start = time.perf_counter()
    images = call(steps)
    return {"seconds": time.perf_counter() - start, "images": images, "shares": shares}


def run_variant(name: str, n: int, steps: int, tmp: Path) -> dict:
    """Each variant in fresh processes (this script in --worker mode): the slowest worker's drawing time,
    and the wall clock until all are done, model loading included."""
    dtype, channels_last, threads, processes = VARIANTS[name]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    sizes = [n // processes + (k < n % processes) for k in range(processes)]
    procs = []
    start = time.perf_counter()
    for k, size in enumerate(sizes):
        out = tmp / f"{name.replace(' ', '_').replace(',', '')}-{k}.npz"
        cmd = [sys.executable, __file__, "--worker", "--n", str(size), "--offset", str(sum(sizes[:k])),
               "--steps", str(steps), "--dtype", dtype, "--out", str(out)]  # fmt: skip
        cmd += ["--channels-last"] if channels_last else []
        cmd += ["--profile"] if name == "float32" else []
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env), out))
    for p, _ in procs:
        if p.wait() != 0:
            raise SystemExit(f"variant {name!r}: a worker failed")
    wall = time.perf_counter() - start
    parts = [np.load(out) for _, out in procs]
    return {
        "draw_s": max(float(p["seconds"]) for p in parts),  # the drawing alone, without model loading
        "wall_s": wall,
        "images": np.concatenate([p["images"] for p in parts]),
        "shares": json.loads(str(parts[0]["shares"])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="test graphs, drawn as one batch")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        got = draw(args.n, args.offset, args.steps, args.dtype, args.channels_last, args.profile)
        np.savez(args.out, seconds=got["seconds"], images=got["images"], shares=json.dumps(got["shares"]))
        return 0

    import tempfile

    results, baseline = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            got = run_variant(name, args.n, args.steps, Path(tmp))
            baseline = baseline or got
            diff = np.abs(got["images"] - baseline["images"]) * 255
            results[name] = {
                "draw_s": round(got["draw_s"], 2),
                "ratio": round(got["draw_s"] / baseline["draw_s"], 3),
                "wall_s_with_loading": round(got["wall_s"], 2),
                "max_pixel_difference": round(float(diff.max()), 2),
                "mean_pixel_difference": round(float(diff.mean()), 3),
            }
            if got["shares"]:
                results[name]["time_shares_3_steps"] = got["shares"]
            print(f"{name}: {got['draw_s']:.1f} s ({results[name]['ratio']:.2f} of float32)", flush=True)
    record = {
        "device": device_record(torch.device("cpu")),
        "setting": {
            "graphs": args.n,
            "steps": args.steps,
            "guidance": 5.0,
            "boxes": "none",
            "baseline": "float32",
        },
        "results": results,
    }
    path = write(f"sampling_cpu-{record['device']['device']}", record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
