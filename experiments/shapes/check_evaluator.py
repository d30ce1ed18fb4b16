"""The shapes evaluator on images whose answer is known, over the first N test rows:

own       the renderer's own images with their graphs (should score 1.0),
relaid    the same objects drawn at new places (only the layout is wrong: relations near chance, 1/4),
shuffled  each image scored against the next row's graph (objects mostly absent).

  python experiments/shapes/check_evaluator.py [--n 500] [--size 32]
"""

from __future__ import annotations

import argparse

import numpy as np

from sg2img.data.shapes import Shapes
from sg2img.eval.protocols import format_scores
from sg2img.shapes.world import ShapesEvaluator, render, sample_scene


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)
    src = Shapes("test", size=args.size, num_rows=args.n)
    rows = [src.example(i) for i in range(args.n)]
    graphs = [r.graph for r in rows]
    rng = np.random.default_rng(7)
    relaid = []
    for i in range(args.n):
        objects = src.objects(i)
        places = sample_scene(rng, len(objects), len(objects))
        moved = [type(o)(o.shape, o.colour, p.centre, o.radius) for o, p in zip(objects, places)]
        relaid.append(render(moved, args.size))
    ev = ShapesEvaluator()
    print(f"own       {format_scores(ev.evaluate([r.image for r in rows], graphs))}")
    print(f"relaid    {format_scores(ev.evaluate(relaid, graphs))}")
    print(f"shuffled  {format_scores(ev.evaluate([r.image for r in rows], graphs[1:] + graphs[:1]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
