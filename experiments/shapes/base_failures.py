"""Why a base misses objects: how many objects it draws for each caption length, and what each miss is.

    python experiments/shapes/base_failures.py build/shapes-eval/base-objects \
        --out experiments/results/shapes/base-failures/shipped.md

Reads an ``sg2img evaluate shapes --save-images`` folder (``samples.jsonl`` and the images). A drawn object
is a connected region of one palette colour (the evaluator's colour tolerance) of at least ``--min-pixels``
pixels. Each object of a graph that the evaluator does not find (``ShapesEvaluator``: colour and shape) is
one of:

- *drawn twice*: its colour forms two or more regions, so the evaluator's one box per colour spans both and
  its shape reads wrong (an extra object of a named colour);
- *wrong shape*: one region of its colour, classified as another shape (e.g. a square with rounded corners);
- *absent*: too few pixels of its colour.

Writes a markdown table (drawn objects per caption length, and the misses by kind) to ``--out``, with the
share of each and its binomial standard error.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import networkx as nx
import numpy as np
from PIL import Image

from sg2img.shapes.world import PALETTE, ShapesEvaluator


def regions(image: np.ndarray, colour: str, tolerance: float, min_pixels: int) -> list[int]:
    """Sizes of the connected regions (4-neighbours) of ``colour`` with at least ``min_pixels`` pixels."""
    mask = np.linalg.norm(image - np.asarray(PALETTE[colour], dtype=np.float32), axis=-1) < tolerance
    grid = nx.grid_2d_graph(*mask.shape).subgraph(map(tuple, np.argwhere(mask)))
    return sorted((len(c) for c in nx.connected_components(grid) if len(c) >= min_pixels), reverse=True)


def share(k: int, n: int) -> str:
    p = k / n if n else float("nan")
    return f"{p:.3f} ± {(p * (1 - p) / n) ** 0.5:.3f}" if n else "–"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an `sg2img evaluate shapes --save-images` output folder")
    ap.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    ap.add_argument("--min-pixels", type=int, default=10, help="smallest region counted as an object")
    args = ap.parse_args(argv)
    evaluator = ShapesEvaluator()
    rows = [json.loads(line) for line in (args.folder / "samples.jsonl").read_text().splitlines() if line]
    drawn: Counter[tuple[int, int]] = Counter()
    misses: Counter[str] = Counter()
    objects = 0
    for row in rows:
        image = Image.open(args.folder / row["file"]).convert("RGB")
        pixels = np.asarray(image, dtype=np.float32)
        found = evaluator.find(image)
        sizes = {c: regions(pixels, c, evaluator.colour_tolerance, args.min_pixels) for c in PALETTE}
        graph = row["graph"]["objects"]
        drawn[(len(graph), sum(len(s) for s in sizes.values()))] += 1
        for obj in graph:
            objects += 1
            colour, shape = obj["attributes"][0], obj["name"]
            hit = found.get(colour)
            if hit is not None and hit.shape == shape:
                continue
            if hit is None:
                misses["absent"] += 1
            elif len(sizes[colour]) >= 2:
                misses["drawn twice"] += 1
            else:
                misses["wrong shape"] += 1
    counts = sorted({k for k, _ in drawn})
    most = max(d for _, d in drawn)
    lines = [
        f"`{args.folder}`: {len(rows)} images, {objects} objects.",
        "",
        "Objects drawn (regions of a palette colour) for each caption length, share of the images:",
        "",
        "| objects in the caption | images | " + " | ".join(f"{d} drawn" for d in range(1, most + 1)) + " |",
        "|---|---|" + "---|" * most,
    ]
    for k in counts:
        n = sum(v for (kk, _), v in drawn.items() if kk == k)
        cells = [share(drawn[(k, d)], n) for d in range(1, most + 1)]
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Objects the evaluator does not find, by kind (share of all objects):", "",
              "| kind | objects | share |", "|---|---|---|"]  # fmt: skip
    for kind in ("drawn twice", "wrong shape", "absent"):
        lines.append(f"| {kind} | {misses[kind]} | {share(misses[kind], objects)} |")
    lines.append(f"| all misses | {sum(misses.values())} | {share(sum(misses.values()), objects)} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
