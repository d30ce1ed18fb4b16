"""IP-Adapter's Table 1 in miniature: the shapes world's rows in the paper's columns, from an ablation grid's
committed run records, beside the paper's SD1.5 figures.

    python experiments/ablate.py --grid experiments/grids/shapes_ablations.yaml   # the runs
    python experiments/table1.py                      # writes experiments/results/ablations/table1.md

Columns as the paper's (trainable parameters, CLIP-T, CLIP-I) plus relation accuracy and object recall
(the shapes evaluator). The image rows follow the paper's protocol: the image prompt alone (no text), CLIP-T
against the caption of the prompt image, CLIP-I against the prompt image, with the world's tiny CLIP. The
text rows and the graph row draw from their caption or graph; their CLIP-I is against the graph's rendering.
Each figure is the mean over the training seeds ± its standard error (``experiments/ablate.py``). A row
whose runs are missing is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules.setdefault("ablate", ablate)
spec.loader.exec_module(ablate)

GRID = ROOT / "experiments" / "grids" / "shapes_ablations.yaml"
ROWS = (  # the paper's row, the grid's variant, the evaluation
    ("text only (the base, objects in the caption)", "base objects", "graph"),
    ("text with the relations in the caption", "base relations", "graph"),
    ("IP-Adapter (CLS, 4 tokens), image prompt", "image CLS", "image-only"),
    ("IP-Adapter Plus (patch tokens, Resampler), image prompt", "image patch", "image-only"),
    ("simple adapter (CLS tokens concatenated to the text), image prompt", "image CLS concat", "image-only"),
    ("graph branch (decoupled, relations only)", "graph", "graph"),
)
PAPER = ("IP-Adapter, SD1.5 (the paper's Table 1, COCO 2017 val, OpenCLIP ViT-H/14)", "22M", "0.588", "0.828")


def cell(a: dict, metric: str) -> str:
    return f"{a[metric]:.3f} ± {a[f'{metric}_se']:.3f}" if metric in a else "–"


def table(grid_path: Path, results: Path) -> list[str]:
    grid = ablate.load_grid(grid_path)
    records = ablate.read_records(grid, results, Path("runs/ablations") / grid.name)
    lines = [
        "| method | seeds | trainable parameters | CLIP-T | CLIP-I | relation accuracy | object recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, variant, evaluation in ROWS:
        if variant not in records:
            continue
        a = ablate.aggregate(records[variant], evaluation)
        if not a["seeds"]:
            continue
        lines.append(
            f"| {label} | {a['seeds']} | {ablate.fmt_params(a['trainable_parameters'])} | {cell(a, 'clip_t')} | "
            f"{cell(a, 'clip_i')} | {cell(a, 'relation_accuracy')} | {cell(a, 'object_recall')} |"
        )
    lines.append(f"| {PAPER[0]} | | {PAPER[1]} | {PAPER[2]} | {PAPER[3]} | – | – |")
    missing = [(label, variant) for label, variant, evaluation in ROWS if variant not in records]
    if missing:
        lines += ["", "Rows without runs yet (the grid has not run these variants):", ""]
        lines += [f"- {label}: variant `{variant}`" for label, variant in missing]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=Path, default=GRID)
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "ablations")
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/table1.md")
    args = ap.parse_args(argv)
    lines = table(args.grid, args.results)
    header = [
        "# IP-Adapter's Table 1 in miniature (the shapes world)",
        "",
        f"Made by `python experiments/table1.py` from the run records of `{args.grid.relative_to(ROOT) if args.grid.is_relative_to(ROOT) else args.grid}`",
        "(`python experiments/ablate.py --grid ...`). Mean over training seeds ± standard error; CLIP scores with",
        "the world's tiny CLIP. The image rows: image prompt alone, CLIP-T against its caption (the paper's",
        "protocol); the others draw from their caption or graph. The last row is the paper's, for reference.",
        "",
    ]
    out = args.out or args.results / "table1.md"
    out.write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
