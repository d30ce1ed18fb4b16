"""What a softly confined graph branch learned about where an object token acts (``tokens.confinement:
soft`` or ``learned``): per cross-attention layer, the width w of its score penalty -(d / w)^2, as a
fraction of the image (it starts at ``tokens.region_width``, 0.1 by default); and, with a learned spatial
bias, the whole score term an object token gets along a line through its box, for a box a quarter of the
image wide (a typical shapes-world object): at the box centre, inside it, at its edge and outside. The
term is added to the attention scores, so 0 at the centre against -5 two half-widths out means the
token is seen about e^5 = 150 times less there.

    python experiments/shapes/region_widths.py runs/ablations/shapes-ablations/graph-soft-mask/seed-0/adapter.safetensors \
        --out experiments/results/ablations/layouts/graph-soft-mask-seed-0-widths.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from ip_adapter.attention import region_distance, region_offsets

OFFSETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # along x through the box centre, in half-widths
BOX_HALF_WIDTH = 0.125  # a box a quarter of the image wide
GRID = 256  # cells across the image, fine enough to read the term at each offset


def score_profile(width: float, tensors: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """The score term an object token gets at each of OFFSETS along x (its box centred in the image): the
    soft penalty, plus the learned bias when ``tensors`` (the layer's region_bias_{in,out} weights)."""
    box = torch.tensor(
        [[[0.5 - BOX_HALF_WIDTH, 0.5 - BOX_HALF_WIDTH, 0.5 + BOX_HALF_WIDTH, 0.5 + BOX_HALF_WIDTH]]]
    )
    row = GRID // 2  # the row through the centre
    score = -((region_distance(box, GRID, GRID) / width) ** 2)[0, :, 0].view(GRID, GRID)[row]
    if tensors is not None:
        offsets = region_offsets(box, GRID, GRID)[0, :, 0].view(GRID, GRID, 2)[row]  # (GRID, 2)
        hidden = torch.nn.functional.gelu(offsets @ tensors["in.weight"].T + tensors["in.bias"])
        score = score + (hidden @ tensors["out.weight"].T + tensors["out.bias"]).squeeze(-1)
    return {f"{u:g}": round(float(score[cell]), 3) for u, cell in zip(OFFSETS, offset_cells())}


def offset_cells() -> list[int]:
    """The grid column nearest to each of OFFSETS along the row through the box centre."""
    xs = (torch.arange(GRID) + 0.5) / GRID
    return [int(torch.argmin((xs - (0.5 + u * BOX_HALF_WIDTH)).abs())) for u in OFFSETS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter", type=Path, help="an adapter file with soft confinement")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    with safe_open(str(args.adapter), "pt") as f:
        keys = [k for k in f.keys() if ".region_width_" in k]  # noqa: SIM118
        if not keys:
            raise SystemExit(f"{args.adapter}: no learned region widths (not a softly confined adapter)")
        keys = sorted(keys, key=lambda k: int(k.split(".")[1]))
        widths = {k: float(f.get_tensor(k).float().exp()) for k in keys}
        profiles = {}
        for k in keys:
            prefix, stream = k.rsplit(".region_width_", 1)
            names = {
                f"{side}.{p}": f"{prefix}.region_bias_{side}_{stream}.{p}"
                for side in ("in", "out")
                for p in ("weight", "bias")
            }
            learned = all(n in f.keys() for n in names.values())  # noqa: SIM118
            tensors = {s: f.get_tensor(n).float() for s, n in names.items()} if learned else None
            profiles[k.replace(".region_width_", ".score_")] = score_profile(widths[k], tensors)
    record = {
        "adapter": str(args.adapter),
        "widths": widths,
        "score_along_x_in_half_widths": profiles,
        "box_half_width": BOX_HALF_WIDTH,
        "command": "python experiments/shapes/region_widths.py",
    }
    for k, w in widths.items():
        print(f"{k}: {w:.4f}")
    print(f"score term at {', '.join(f'{u:g}' for u in OFFSETS)} half-widths from the box centre:")
    for k, p in profiles.items():
        print(f"{k}: " + "  ".join(f"{v:+.2f}" for v in p.values()))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
