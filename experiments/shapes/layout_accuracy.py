"""How often the layout a graph branch used satisfies the graph's relations, apart from the drawing.

    python experiments/shapes/layout_accuracy.py build/shapes-eval/graph_layout \
        --out experiments/results/shapes/graph_layout-layout.json

Reads ``samples.jsonl`` of an ``sg2img evaluate shapes --save-images`` folder (each row holds the graph and,
for an adapter with a layout, the boxes it used) and applies the evaluator's rule (sg2im's angle rule on the
centres) to the layout's boxes instead of the image: the share of triples the layout itself gets right, with
its bootstrap standard error. Together with the image's relation accuracy this tells a wrong layout from a
right layout drawn wrongly.

Where the folder holds the images too (``--save-images``), it also says where each object was drawn: an
object whose colour the evaluator finds is *in its box* when the centre of its pixels lies inside the box
the branch gave it, *in another's box* when it lies inside another object's box and not its own (the
identity swap: the right layout with the wrong object in it), and elsewhere otherwise. Its chance level
(``in_own_box_by_chance``) is the share expected if every drawn object took one of its graph's boxes at random.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from sg2img.graph import SceneGraph  # noqa: E402
from sg2img.shapes.world import ShapesEvaluator, centre_predicate  # noqa: E402


def _inside(point: tuple[float, float], box: list[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def placement(image: Image.Image, graph: SceneGraph, boxes: list[list[float]]) -> list[str]:
    """For each object of the graph whose colour is drawn: "own", "other" or "elsewhere" (see above)."""
    found = ShapesEvaluator().find(image)
    out = []
    for k, o in enumerate(graph.objects):
        f = found.get(o.attributes[0] if o.attributes else "")
        if f is None:
            continue
        if _inside(f.centre, boxes[k]):
            out.append("own")
        elif any(_inside(f.centre, b) for j, b in enumerate(boxes) if j != k):
            out.append("other")
        else:
            out.append("elsewhere")
    return out


def _bootstrap_share(per_image: list[list[int]], rng: np.random.Generator) -> float:
    """Standard error of the pooled share over images resampled with replacement (1000 resamples)."""
    sums = np.array([sum(h) for h in per_image], dtype=float)
    counts = np.array([len(h) for h in per_image], dtype=float)
    boot = [
        sums[idx].sum() / max(counts[idx].sum(), 1)
        for idx in (rng.integers(0, len(per_image), len(per_image)) for _ in range(1000))
    ]
    return float(np.std(boot))


def layout_scores(folder: Path) -> dict:
    per_image = []
    placed: list[list[str]] = []
    chance: list[float] = []  # per drawn object: its share of its own box if objects took boxes at random
    by_predicate: dict[str, list[int]] = {}
    for line in (folder / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "layout" not in row:
            continue
        graph = SceneGraph.from_json(row["graph"])
        boxes = [o["box"] for o in row["layout"]]
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        held = []
        for r in graph.relationships:
            ok = int(centre_predicate(centres[r.subject], centres[r.object]) == r.predicate)
            held.append(ok)
            by_predicate.setdefault(r.predicate, []).append(ok)
        per_image.append(held)
        image_file = folder / row["file"]
        if image_file.exists():
            with Image.open(image_file) as image:
                placed.append(placement(image, graph, boxes))
            chance.extend([1.0 / len(graph.objects)] * len(placed[-1]))
    if not per_image:
        raise SystemExit(
            f"{folder}/samples.jsonl: no row records a layout (an adapter without a layout head?)"
        )
    flat = np.array([h for held in per_image for h in held], dtype=float)
    rng = np.random.default_rng(0)  # bootstrap over images, as the evaluator's standard errors
    record = {
        "folder": str(folder),
        "images": len(per_image),
        "triples": int(flat.size),
        "layout_relation_accuracy": float(flat.mean()),
        "layout_relation_accuracy_se": _bootstrap_share(per_image, rng),
        "by_predicate": {
            p: {"triples": len(v), "accuracy": float(np.mean(v))} for p, v in sorted(by_predicate.items())
        },
    }
    if placed and len(placed) == len(per_image):  # every image is there: where each object was drawn
        drawn = sum(len(p) for p in placed)
        record["objects_drawn"] = drawn
        record["in_own_box_by_chance"] = float(np.mean(chance)) if chance else 0.0
        for where in ("own", "other", "elsewhere"):
            hits = [[int(w == where) for w in p] for p in placed]
            key = {"own": "in_own_box", "other": "in_another_box", "elsewhere": "elsewhere"}[where]
            record[key] = sum(map(sum, hits)) / max(drawn, 1)
            record[f"{key}_se"] = _bootstrap_share(hits, rng)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    record = layout_scores(args.folder)
    record["command"] = " ".join(["python", "experiments/shapes/layout_accuracy.py", *(argv or sys.argv[1:])])
    text = json.dumps(record, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
