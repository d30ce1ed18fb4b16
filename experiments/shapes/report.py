"""experiments/results/shapes.md from its prose (experiments/shapes/report.md) and the tables the scripts
wrote from the committed run records: every ``{{include PATH}}`` line of the prose is replaced by the file
at PATH (relative to experiments/results/), so no table in the results is typed by hand.

    python experiments/shapes/report.py

The tables come from: ``run.py`` (``shapes/table.md``, from ``shapes/<row>.json``), ``clip_retrieval.py
--table`` (``shapes/clip-retrieval.md``) and ``base_curve.py`` (``shapes/base-curve/curve-objects.md``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
PROSE = Path(__file__).resolve().parent / "report.md"
INCLUDE = re.compile(r"^\{\{include (?P<path>[^}]+)\}\}$")


def render(prose: str, results: Path = RESULTS) -> str:
    out = []
    for line in prose.splitlines():
        m = INCLUDE.match(line.strip())
        if m is None:
            out.append(line)
            continue
        path = results / m["path"].strip()
        if not path.is_file():
            raise SystemExit(
                f"{PROSE}: {{{{include {m['path']}}}}}: {path} does not exist; run its script first"
            )
        out.append(path.read_text().rstrip("\n"))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = RESULTS / "shapes.md"
    out.write_text(render(PROSE.read_text()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
