"""Does ``torch.compile`` speed up ``evaluate shapes``' sampling? The embedded model (base and graph adapter)
draws one batch of test graphs (25 DDIM steps, guidance 5, float32) eagerly, then with its UNet compiled
(inductor): the first compiled call includes the compilation, the second is the steady state. The images
of the compiled UNet are compared with the eager ones pixel by pixel.

    python experiments/bench/compiled_sampling.py            # 50 graphs, one batch
Writes experiments/results/bench/compiled_sampling-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_record, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="test graphs, drawn as one batch")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)

    from sg2img.data.shapes import Shapes
    from sg2img.infer.generate import ModelSource, build_pipeline
    from sg2img.shapes.world import caption

    device = torch.device("cpu")
    pipe, _ = build_pipeline(ModelSource(), device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    source = Shapes("test", seed=0)
    graphs = [source.example(i).graph for i in range(args.n)]
    prompts = [caption(g, relations=False) for g in graphs]

    def draw() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = pipe(
            prompt=prompts, scene_graph=graphs, num_inference_steps=args.steps, guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(i) for i in range(args.n)],
        )  # fmt: skip
        seconds = time.perf_counter() - start
        return seconds, np.stack([np.asarray(im, dtype=np.int16) for im in out.images])

    eager_s, eager = draw()
    pipe.unet = torch.compile(pipe.unet)
    first_s, _ = draw()
    steady_s, compiled = draw()
    diff = np.abs(eager - compiled)

    def timed(seconds: float) -> dict:  # one call per variant: min = median = max
        return {"median_s": round(seconds, 2), "min_s": round(seconds, 2), "max_s": round(seconds, 2),
                "ratio": round(seconds / eager_s, 3)}  # fmt: skip

    record = {
        "device": device_record(device),
        "setting": {"graphs": args.n, "steps": args.steps, "guidance": 5.0, "dtype": "float32"},
        "results": {
            "eager": timed(eager_s),
            "compiled, first call (with compilation)": timed(first_s),
            "compiled": timed(steady_s),
        },
        "max_pixel_difference": int(diff.max()),
        "mean_pixel_difference": float(diff.mean()),
    }
    path = write(f"compiled_sampling-{device.type}", record)
    print(f"eager {eager_s:.1f} s, compiled {first_s:.1f} s (first call) and {steady_s:.1f} s "
          f"({steady_s / eager_s:.2f} of eager); max pixel difference {int(diff.max())}; wrote {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
