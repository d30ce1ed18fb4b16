"""The research loop's clock: ``sg2img evaluate shapes`` on the test graphs, end to end.

    python experiments/bench/evaluate_shapes.py                   # 500 test graphs, 25 DDIM steps
    python experiments/bench/evaluate_shapes.py --n 100 --dtypes float32

Each variant is one whole command in a fresh process (model loading, generation, scoring), timed on the
wall clock, with the embedded model (base and graph adapter). Variants: the frozen model's dtype
(``float32``, the command's default, is the baseline; ``bfloat16`` runs the UNet in bfloat16, which CPUs
with AVX-512 BF16 or AMX do natively), the UNet's layout (``--layouts contiguous,channels_last``: the
command's ``--channels-last``) and the batch size. The scores of each variant are recorded beside its time:
a faster setting that draws differently shows it here.
Writes experiments/results/bench/evaluate_shapes-<device>.json, or --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_record, write

TARGET_S = 90.0  # the goal for 500 graphs at 25 steps on a 2-core CPU


def run_variant(n: int, steps: int, dtype: str, layout: str, batch: int, adapter: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sg2img", "evaluate", "shapes", "--n", str(n), "--steps", str(steps)]
    cmd += ["--dtype", dtype, "--batch-size", str(batch), "--out", str(out)]
    cmd += ["--channels-last"] if layout == "channels_last" else []
    cmd += [] if adapter == "embedded" else ["--adapter", adapter]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = json.loads((out / "shapes-eval.json").read_text())
    keys = ("object_recall", "relation_accuracy", "graph_accuracy")
    return {
        "command": " ".join(["sg2img", *cmd[3:]]).replace(str(out), "OUT"),
        "graphs": n,
        "median_s": round(wall, 2),  # one whole command per variant: min = median = max
        "min_s": round(wall, 2),
        "max_s": round(wall, 2),
        "generation_s": record["generation_seconds"],
        **{k: round(record["scores"][k], 4) for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="contiguous", help="the UNet's layouts: contiguous, channels_last")
    ap.add_argument("--batch-sizes", default="50")
    ap.add_argument("--adapter", default="embedded", help="adapter file, `embedded` or `none`")
    ap.add_argument("--out", type=Path, default=None, help="the record's path")
    args = ap.parse_args(argv)
    if unknown := set(args.layouts.split(",")) - {"contiguous", "channels_last"}:
        ap.error(f"--layouts: unknown layout(s) {sorted(unknown)}; give contiguous and/or channels_last")
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    name = f"{dtype}-batch{batch}" + ("-channels-last" if layout == "channels_last" else "")
                    print(f"{name} ...", flush=True)
                    out = Path(tmp) / name
                    variants[name] = run_variant(args.n, args.steps, dtype, layout, batch, args.adapter, out)
                    v = variants[name]
                    print(f"  {v['median_s']} s, recall {v['object_recall']}, relations {v['relation_accuracy']}")
    baseline = next(iter(variants))
    for v in variants.values():
        v["ratio"] = round(v["median_s"] / variants[baseline]["median_s"], 3)
    result = {
        "setting": {"graphs": args.n, "steps": args.steps, "adapter": args.adapter, "baseline": baseline},
        "device": device_record(torch.device("cpu")),
        "results": variants,
        "target_s": TARGET_S,
    }
    path = write("evaluate_shapes-cpu", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
