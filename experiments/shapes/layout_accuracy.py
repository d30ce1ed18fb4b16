"""How often the layout a graph branch used satisfies the graph's relations, apart from the drawing.

    python experiments/shapes/layout_accuracy.py build/shapes-eval/graph_layout \
        --out experiments/results/shapes/graph_layout-layout.json

Reads ``samples.jsonl`` of an ``sg2img evaluate shapes --save-images`` folder (each row holds the graph and,
for an adapter with a layout, the boxes it used) and applies the evaluator's rule (sg2im's angle rule on the
centres) to the layout's boxes instead of the image: the share of triples the layout itself gets right, with
its bootstrap standard error. Together with the image's relation accuracy this tells a wrong layout from a
right layout drawn wrongly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sg2img.data.shapes import centre_predicate  # noqa: E402
from sg2img.graph import SceneGraph  # noqa: E402


def layout_scores(folder: Path) -> dict:
    per_image = []
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
    if not per_image:
        raise SystemExit(
            f"{folder}/samples.jsonl: no row records a layout (an adapter without a layout head?)"
        )
    flat = np.array([h for held in per_image for h in held], dtype=float)
    rng = np.random.default_rng(0)  # bootstrap over images, as the evaluator's standard errors
    sums = np.array([sum(h) for h in per_image], dtype=float)
    counts = np.array([len(h) for h in per_image], dtype=float)
    boot = [
        sums[idx].sum() / max(counts[idx].sum(), 1)
        for idx in (rng.integers(0, len(per_image), len(per_image)) for _ in range(1000))
    ]
    return {
        "folder": str(folder),
        "images": len(per_image),
        "triples": int(flat.size),
        "layout_relation_accuracy": float(flat.mean()),
        "layout_relation_accuracy_se": float(np.std(boot)),
        "by_predicate": {
            p: {"triples": len(v), "accuracy": float(np.mean(v))} for p, v in sorted(by_predicate.items())
        },
    }


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
