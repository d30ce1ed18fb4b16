"""Where the graph branch put each object: a table from committed evaluation and layout records.

    python experiments/shapes/placement_table.py      # writes experiments/results/shapes/placement.md

For each row: the image's figures (``sg2img evaluate shapes``) beside the layout's (``layout_accuracy.py``):
how many of the graph's relations the branch's own boxes satisfy, and where the drawn objects landed: in
their own box, in another object's box (the identity swap), elsewhere. A row whose records are missing is
left out.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORDS = Path(__file__).resolve().parents[2] / "experiments" / "results" / "shapes"


def evaluated(adapter: str, steps: str, run: str, base: str, shipped: bool = False) -> tuple:
    """The three 500-graph rows of one adapter run (test split, boxes given, independent graphs). A base no
    longer shipped has its records renamed ``base-<version>-<row>``; the shipped one's keep the row's name."""
    prefix = "" if shipped else f"base-{base}-"
    return tuple(
        (f"{adapter}, {steps} steps{kind} (base {base}{', shipped' if shipped and not kind else ''})",
         f"{prefix}{run}{suffix}", f"{prefix}{run}{suffix}-layout")
        for kind, suffix in (("", ""), (", boxes given", "-oracle"), (", independent graphs", "-independent"))
    )  # fmt: skip


ROWS = (  # label, evaluation record, layout record (both under RECORDS)
    ("layout adapter, 1,000 steps (200 test graphs)", "screen/layout", "screen/layout-layout"),
    ("layout + identity, 1,000 steps (200 test graphs)", "screen/identity", "screen/identity-layout"),
    ("identity, object tokens not confined, 1,000 steps (200)", "screen/no-confine", "screen/no-confine-layout"),
    ("identity, uniform timesteps, 1,000 steps (200)", "screen/uniform-t", "screen/uniform-t-layout"),
    ("identity, concat injection, 1,000 steps (200)", "screen/concat", "screen/concat-layout"),
    *evaluated("layout adapter", "3,000", "graph_layout", "v2"),
    *evaluated("layout + identity", "1,000", "graph_identity", "v2"),
    *evaluated("layout + identity", "1,000", "graph_identity", "v3"),
    *evaluated("layout + identity", "1,000", "graph_identity", "v4"),
    *evaluated("layout + identity", "1,000", "graph_identity", "v5", shipped=True),
)  # fmt: skip


def pm(record: dict, key: str) -> str:
    return f"{record[key]:.3f} ± {record[key + '_se']:.3f}" if key in record else "–"


def main() -> int:
    lines = [
        "| adapter (relations only unless said) | images | relation accuracy | object recall | graph accuracy | "
        "layout's relations held | objects in own box (chance) | in another's box | elsewhere |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, evaluation, layout in ROWS:
        e_path, l_path = RECORDS / f"{evaluation}.json", RECORDS / f"{layout}.json"
        if not (e_path.is_file() and l_path.is_file()):
            continue
        s, lay = json.loads(e_path.read_text())["scores"], json.loads(l_path.read_text())
        lines.append(
            f"| {label} | {s['images']} | {pm(s, 'relation_accuracy')} | {pm(s, 'object_recall')} | "
            f"{pm(s, 'graph_accuracy')} | {pm(lay, 'layout_relation_accuracy')} | {pm(lay, 'in_own_box')} ({lay.get('in_own_box_by_chance', float('nan')):.2f}) | "
            f"{pm(lay, 'in_another_box')} | {pm(lay, 'elsewhere')} |"
        )
    out = RECORDS / "placement.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
