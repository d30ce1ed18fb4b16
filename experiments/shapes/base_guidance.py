"""Is the base's object recall held back by the guidance scale? The shipped base with the objects in its
caption, scored at several classifier-free guidance scales on the same test graphs and seeds.

    python experiments/shapes/base_guidance.py --n 100 --guidance 2 5 7.5 10

Each scale is ``sg2img evaluate shapes --adapter none --prompt objects --guidance G`` (25 DDIM steps) on the
first ``--n`` test graphs; a record that exists is not run again. Records (totals, no per-image rows):
``--out/g<G>.json``; the table: ``--out/table.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from base_curve import ROOT, evaluate_base, score_cells  # this script's folder is on sys.path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="test graphs per scale")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 5.0, 7.5, 10.0])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "shapes" / "base-guidance")
    ap.add_argument("--work", type=Path, default=Path("build/base-guidance"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for g in args.guidance:
        record_path = args.out / f"g{g}.json"
        if not record_path.is_file():
            flags = ["--prompt", "objects", "--n", str(args.n), "--guidance", str(g)]
            evaluate_base(flags, args.work / f"g{g}", record_path)
        rows.append(f"| {g:g} | {score_cells(json.loads(record_path.read_text())['scores'])} |")
    table = [
        f"The shipped base, objects in the caption, first {args.n} test graphs, 25 DDIM steps:",
        "",
        "| guidance | object recall | relation accuracy | graph accuracy |",
        "|---|---|---|---|",
        *rows,
    ]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
