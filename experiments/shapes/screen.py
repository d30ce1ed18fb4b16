"""Same-budget screens of graph-branch variants: one question per run, each against the same control.

    python experiments/shapes/screen.py identity no-confine     # train and evaluate these variants
    python experiments/shapes/screen.py --list                  # what each variant changes

Every variant trains for 1,000 steps of the layout recipe (``graph_decoupled.yaml`` + ``graph_layout.yaml``,
batch 32, seed 0, constant lr after warm-up, so its step-1,000 weights are what a longer run of it has at
that step) with one change, into ``runs/shapes/screen/NAME``; it is then evaluated on the first ``--n`` test
graphs from the relations alone (``sg2img evaluate shapes --boxes none``), and ``layout_accuracy.py`` says
where each object was drawn. The records go to ``experiments/results/shapes/screen/NAME.json`` and
``NAME-layout.json``, with the training command and its wall time.

The control, ``layout``, is the layout adapter as it was shipped before object identity (``graph_layout.yaml``
alone).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ROOT, run, sg2img  # run.py's way of running and timing a command

CONFIGS = "configs/experiments/shapes"
RECORDS = ROOT / "experiments" / "results" / "shapes" / "screen"
STEPS = 1000
LAYOUT = ["--config", f"{CONFIGS}/graph_decoupled.yaml", "--config", f"{CONFIGS}/graph_layout.yaml"]
IDENTITY = [*LAYOUT, "--config", f"{CONFIGS}/graph_identity.yaml"]
VARIANTS = {  # name -> (what it asks, fit arguments)
    "layout": ("the control: the layout adapter (layout head, confined object tokens, shifted timesteps)", LAYOUT),
    "identity": ("object tokens carry their label's text embedding (tokens.object_identity)", IDENTITY),
    "no-confine": ("identity without confining object tokens to their boxes: is the hard mask still needed?",
                   [*IDENTITY, "--model.graph.tokens.confine_objects", "false"]),
    "uniform-t": ("identity with uniform timesteps instead of shifted ones (model.objective.timesteps uniform)",
                  [*IDENTITY, "--model.objective.timesteps", "uniform"]),
    "concat": ("identity with concat injection: the layout embedded into the object tokens, no confinement "
               "(concat shares the text's attention)",
               ["--config", f"{CONFIGS}/graph_concat.yaml", "--config", f"{CONFIGS}/graph_concat_layout.yaml",
                "--model.graph.tokens.object_identity", "true"]),
}  # fmt: skip


def screen(name: str, n: int, runs: Path, evals: Path) -> None:
    _, fit_args = VARIANTS[name]
    run_dir, out = runs / name, evals / name
    fit = ["fit", *fit_args, "--trainer.max_steps", str(STEPS), "--trainer.default_root_dir", str(run_dir)]
    log: dict = {}
    fit_seconds = run(sg2img(*fit), log)
    evaluate = ["evaluate", "shapes", "--adapter", str(run_dir / "adapter.safetensors"), "--n", str(n),
                "--boxes", "none", "--save-images", "--out", str(out)]  # fmt: skip
    eval_seconds = run(sg2img(*evaluate), log)
    RECORDS.mkdir(parents=True, exist_ok=True)
    layout_record = RECORDS / f"{name}-layout.json"
    run([sys.executable, "experiments/shapes/layout_accuracy.py", str(out), "--out", str(layout_record)], log)
    record = json.loads((out / "shapes-eval.json").read_text())
    record.pop("images", None)
    record.update(
        variant=name,
        question=VARIANTS[name][0],
        fit_command=shlex.join(["sg2img", *fit]),
        fit_seconds=round(fit_seconds, 1),
        evaluate_command=shlex.join(["sg2img", *evaluate]),
        evaluate_seconds=round(eval_seconds, 1),
    )
    (RECORDS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", metavar="VARIANT", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--list", action="store_true", help="print the variants and what each asks")
    ap.add_argument("--n", type=int, default=200, help="test graphs to evaluate")
    ap.add_argument("--runs", type=Path, default=Path("runs/shapes/screen"))
    ap.add_argument("--eval", type=Path, default=Path("build/shapes-eval/screen"))
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.list or not args.variants:
        for name, (question, _) in VARIANTS.items():
            print(f"{name:12s} {question}")
        return 0
    for name in args.variants:
        screen(name, args.n, args.runs, args.eval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
