"""Scene graphs drawn independently of the shapes world's generator, with the same rules, and no boxes.

The held-out test of the graph branch's layout: graphs the training data never produced, which the branch
must place from their relations alone.

- 2-4 objects, each a shape (circle, square, triangle) in a colour of the world's palette, colours distinct;
- centres drawn on the 32 px canvas at least 9 px apart, every pair's direction at least 12 degrees from a
  diagonal;
- every pair related by sg2im's angle rule; which of the two is the subject is drawn at random (the world
  always makes the lower index the subject);
- no boxes in the file: the centres only decide the relations.

    python experiments/shapes/independent_graphs.py --n 500 --out data/shapes-independent.json

Evaluate with ``sg2img evaluate shapes --graphs data/shapes-independent.json --adapter ...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path

from sg2img.graph import SceneGraph
from sg2img.shapes.world import PALETTE, SHAPES, centre_predicate

CANVAS = 32.0


def draw_centres(rng: random.Random, n: int, min_px: float, margin_deg: float) -> list[tuple[float, float]]:
    while True:  # rejection sampling of a whole layout
        centres = [(rng.uniform(6.0, CANVAS - 6.0), rng.uniform(6.0, CANVAS - 6.0)) for _ in range(n)]
        ok = True
        for (ax, ay), (bx, by) in itertools.combinations(centres, 2):
            angle = math.degrees(math.atan2(by - ay, bx - ax)) % 90.0
            if math.hypot(bx - ax, by - ay) < min_px or abs(angle - 45.0) < margin_deg:
                ok = False
                break
        if ok:
            return [(x / CANVAS, y / CANVAS) for x, y in centres]


def draw_graph(rng: random.Random, min_px: float, margin_deg: float) -> SceneGraph:
    n = rng.randint(2, 4)
    colours = rng.sample(sorted(PALETTE), n)
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    centres = draw_centres(rng, n, min_px, margin_deg)
    triples = []
    for i, j in itertools.combinations(range(n), 2):
        s, o = (i, j) if rng.random() < 0.5 else (j, i)
        triples.append([s, centre_predicate(centres[s], centres[o]), o])
    rng.shuffle(triples)
    objects = [{"name": shape, "attributes": [colour]} for shape, colour in zip(shapes, colours)]
    return SceneGraph.from_json({"objects": objects, "relationships": triples})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--min-distance", type=float, default=9.0, help="pixels between centres, on 32 px")
    ap.add_argument("--diagonal-margin", type=float, default=12.0, help="degrees from every diagonal")
    ap.add_argument("--out", type=Path, default=Path("data/shapes-independent.json"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    graphs = [draw_graph(rng, args.min_distance, args.diagonal_margin).to_json() for _ in range(args.n)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(graphs, separators=(",", ":")) + "\n")
    print(f"wrote {len(graphs)} graphs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
