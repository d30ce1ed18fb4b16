"""The research loop's clock: ``sg2img evaluate shapes`` on the test graphs, end to end.

    python experiments/bench/evaluate_shapes.py                   # 500 test graphs, 25 DDIM steps
    python experiments/bench/evaluate_shapes.py --n 100 --dtypes float32
    python experiments/bench/evaluate_shapes.py --variant= --variant="--compile --batch-size 25"

Each variant is one whole command in a fresh process (model loading, generation, scoring), timed on the
wall clock, with the embedded model (base and graph adapter). Variants: the frozen model's dtype
(``float32``, the command's default, is the baseline; ``bfloat16`` runs the UNet in bfloat16, which CPUs
with AVX-512 BF16 or AMX do natively), the UNet's layout (``--layouts contiguous,channels_last``: the
command's ``--channels-last``) and the batch size; or, with ``--variant=FLAGS`` (repeatable; the ``=`` keeps flags from being read as the bench's own), any list of
flag sets for the command (``--compile``, ``--guidance-interval``, ...). The first variant is the baseline.
A variant with ``--compile`` runs twice, each variant with its own empty inductor cache: ``first_run_s`` is
the run that compiles, ``median_s`` the one that reads the cache. The scores of each variant are recorded
beside its time: a faster setting that draws differently shows it here.
Writes experiments/results/bench/evaluate_shapes-<device>.json, or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_record, write

TARGET_S = 90.0  # the goal for 500 graphs at 25 steps on a 2-core CPU


def run_command(flags: list[str], n: int, steps: int, out: Path, cache: Path) -> tuple[list[str], float]:
    cmd = [sys.executable, "-m", "sg2img", "evaluate", "shapes", "--n", str(n), "--steps", str(steps)]
    cmd += [*flags, "--out", str(out)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    return cmd, time.perf_counter() - start


def run_variant(flags: list[str], n: int, steps: int, tmp: Path) -> dict:
    cache = tmp / "inductor"  # empty: a compiled variant's first run compiles
    out = tmp / "out"
    first = None
    if "--compile" in flags:
        _, first = run_command(flags, n, steps, out, cache)
    cmd, wall = run_command(flags, n, steps, out, cache)
    record = json.loads((out / "shapes-eval.json").read_text())
    keys = ("object_recall", "relation_accuracy", "graph_accuracy")
    errors = ("object_recall_se", "relation_accuracy_se", "graph_accuracy_se")
    return {
        "command": " ".join(["sg2img", *cmd[3:]]).replace(str(out), "OUT"),
        "graphs": n,
        "median_s": round(wall, 2),  # one whole command per variant: min = median = max
        "min_s": round(wall, 2),
        "max_s": round(wall, 2),
        **({} if first is None else {"first_run_s": round(first, 2)}),
        "generation_s": record["generation_seconds"],
        **{k: round(record["scores"][k], 4) for k in (*keys, *errors)},
    }


def product_flags(dtype: str, layout: str, batch: int) -> list[str]:
    return ["--dtype", dtype, "--batch-size", str(batch)] + (
        ["--channels-last"] if layout == "channels_last" else []
    )


def variant_name(flags: list[str]) -> str:
    return " ".join(flags) or "default flags"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="contiguous", help="the UNet's layouts: contiguous, channels_last")
    ap.add_argument("--batch-sizes", default="50")
    ap.add_argument("--adapter", default="embedded", help="adapter file, `embedded` or `none`")
    ap.add_argument(
        "--variant", action="append", default=None, metavar="FLAGS",
        help="the command's flags for one variant, quoted (repeatable; the first is the baseline); "
        "replaces --dtypes/--layouts/--batch-sizes",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="the record's path")
    args = ap.parse_args(argv)
    if unknown := set(args.layouts.split(",")) - {"contiguous", "channels_last"}:
        ap.error(f"--layouts: unknown layout(s) {sorted(unknown)}; give contiguous and/or channels_last")
    adapter = [] if args.adapter == "embedded" else ["--adapter", args.adapter]
    if args.variant is not None:
        flag_sets = {variant_name(shlex.split(v)): shlex.split(v) for v in args.variant}
    else:
        flag_sets = {}
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    name = f"{dtype}-batch{batch}" + ("-channels-last" if layout == "channels_last" else "")
                    flag_sets[name] = product_flags(dtype, layout, batch)
    variants = {}
    for name, flags in flag_sets.items():
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            variants[name] = v = run_variant([*flags, *adapter], args.n, args.steps, Path(tmp))
        print(
            f"  {v['median_s']} s, recall {v['object_recall']}, relations {v['relation_accuracy']}",
            flush=True,
        )
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
