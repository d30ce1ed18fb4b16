"""The widths a softly confined graph branch learned (``tokens.confinement: soft``): per cross-attention
layer, the width w of its score penalty -(d / w)^2, as a fraction of the image (it starts at
``tokens.region_width``, 0.1 by default).

    python experiments/shapes/region_widths.py runs/ablations/shapes-ablations/graph-soft-mask/seed-0/adapter.safetensors \
        --out experiments/results/ablations/layouts/graph-soft-mask-seed-0-widths.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter", type=Path, help="an adapter file with soft confinement")
    ap.add_argument("--out", type=Path, default=None, help="also write the widths here as JSON")
    args = ap.parse_args(argv)
    with safe_open(str(args.adapter), "pt") as f:
        keys = [k for k in f.keys() if ".region_width_" in k]  # noqa: SIM118
        if not keys:
            raise SystemExit(f"{args.adapter}: no learned region widths (not a softly confined adapter)")
        widths = {
            k: float(f.get_tensor(k).float().exp()) for k in sorted(keys, key=lambda k: int(k.split(".")[1]))
        }
    record = {
        "adapter": str(args.adapter),
        "widths": widths,
        "command": "python experiments/shapes/region_widths.py",
    }
    for k, w in widths.items():
        print(f"{k}: {w:.4f}")
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
