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
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
            folder = args.work / f"g{g}"
            cmd = [sys.executable, "-m", "sg2img", "evaluate", "shapes", "--adapter", "none", "--prompt",
                   "objects", "--n", str(args.n), "--guidance", str(g), "--out", str(folder)]  # fmt: skip
            print("$", " ".join(["sg2img", *cmd[3:]]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            record = json.loads((folder / "shapes-eval.json").read_text())
            record.pop("images", None)
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        s = json.loads(record_path.read_text())["scores"]
        rows.append(
            f"| {g:g} | {s['object_recall']:.3f} ± {s['object_recall_se']:.3f} | "
            f"{s['relation_accuracy']:.3f} ± {s['relation_accuracy_se']:.3f} | "
            f"{s['graph_accuracy']:.3f} ± {s['graph_accuracy_se']:.3f} |"
        )
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
