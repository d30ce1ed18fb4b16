"""Is the base's object recall held back by the sampler? A base with the objects in its caption, scored at
several classifier-free guidance scales, guidance intervals, DDIM etas and step counts, on the same test
graphs and seeds.

    python experiments/shapes/base_guidance.py --n 100 --guidance 2 5 7.5 10
    python experiments/shapes/base_guidance.py --model runs/shapes/base-bf16/base.safetensors --n 100 \\
        --eta 0 1 --steps 25 50 --interval all 0,600 --out experiments/results/shapes/base-sampler

Each setting is ``sg2img evaluate shapes --model M --adapter none --prompt objects --guidance G
--guidance-interval [LO, HI] --eta E --steps S`` on the first ``--n`` test graphs; a record that exists is
not run again. Records (totals, no per-image rows): ``--out/g<G>.json``, with ``-t<LO>-<HI>``, ``-eta<E>``
and ``-s<S>`` where they are not every step, 0 and 25; the table: ``--out/table.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from base_curve import ROOT, evaluate_base, score_cells  # this script's folder is on sys.path


def record_name(guidance: float, interval: str, eta: float, steps: int) -> str:
    return (
        f"g{guidance}"
        + (f"-t{interval.replace(',', '-')}" if interval != "all" else "")
        + (f"-eta{eta:g}" if eta else "")
        + (f"-s{steps}" if steps != 25 else "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="the base: embedded (the shipped one) or a base file")
    ap.add_argument("--n", type=int, default=100, help="test graphs per setting")
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    ap.add_argument(
        "--interval",
        nargs="+",
        default=["all"],
        help="guidance intervals LO,HI in timesteps (all: every step)",
    )
    ap.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM's eta (0: deterministic)")
    ap.add_argument("--steps", type=int, nargs="+", default=[25], help="DDIM steps")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "shapes" / "base-guidance")
    ap.add_argument("--work", type=Path, default=Path("build/base-guidance"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for g, interval, eta, steps in itertools.product(args.guidance, args.interval, args.eta, args.steps):
        name = record_name(g, interval, eta, steps)
        record_path = args.out / f"{name}.json"
        if not record_path.is_file():
            flags = ["--model", args.model, "--prompt", "objects", "--n", str(args.n), "--guidance", str(g),
                     "--eta", str(eta), "--steps", str(steps)]  # fmt: skip
            if interval != "all":
                flags += ["--guidance-interval", f"[{interval}]"]
            evaluate_base(flags, args.work / name, record_path)
        scores = json.loads(record_path.read_text())["scores"]
        shown = "every step" if interval == "all" else "t in [" + interval.replace(",", ", ") + "]"
        rows.append(f"| {g:g} | {shown} | {eta:g} | {steps} | {score_cells(scores)} |")
    model = "The shipped base" if args.model == "embedded" else f"The base `{args.model}`"
    table = [
        f"{model}, objects in the caption, first {args.n} test graphs, DDIM:",
        "",
        "| guidance | guided steps | eta | steps | object recall | relation accuracy | graph accuracy |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
