"""The shapes-world experiment, end to end, with this package's own commands.

    python experiments/shapes/run.py                 # quick preset (2-core CPU, about 30 min per model)
    python experiments/shapes/run.py --full          # full preset (GPU)
    python experiments/shapes/run.py --from evaluate # only re-evaluate the models in place

Stages (each prints the command it runs):
  base      sg2img fit-base --config configs/experiments/shapes/base.yaml [quick]
  ship-base the EMA base, stored fp16, becomes sg2img/assets/shapes-base.safetensors (`--model embedded`)
  decoupled sg2img fit --config configs/experiments/shapes/graph_decoupled.yaml [quick] (on the shipped base)
  concat    sg2img fit --config configs/experiments/shapes/graph_concat.yaml [quick]
  boxes     sg2img fit --config .../graph_decoupled.yaml --config .../graph_decoupled_boxes.yaml [quick]
            (a diagnostic: the decoupled adapter whose GNN also reads the boxes, i.e. is given the layout)
  positional sg2img fit --config .../graph_decoupled.yaml --config .../graph_decoupled_positional.yaml [quick]
            (the decoupled adapter with a learned position term in the graph branch's query)
  ship      the decoupled adapter becomes sg2img/assets/shapes-adapter.safetensors
  evaluate  sg2img evaluate shapes for: text only, relations in the caption, graph decoupled, graph concat,
            graph decoupled with boxes, graph decoupled with the positional query
  table     experiments/results/shapes.md from the evaluation records

``--runs DIR`` (default ``runs/shapes``) holds the training runs, ``--eval DIR`` (default
``build/shapes-eval``) the evaluation records and contact sheets.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = "configs/experiments/shapes"
ASSETS = ROOT / "sg2img" / "assets"
STAGES = ("base", "ship-base", "decoupled", "concat", "boxes", "positional", "ship", "evaluate", "table")
ROWS = (  # name, adapter run (None: the base alone), prompt
    ("text only (objects in the caption)", None, "objects"),
    ("text with the relations in the caption", None, "relations"),
    ("graph branch, decoupled", "graph_decoupled", "objects"),
    ("graph branch, concat", "graph_concat", "objects"),
    ("graph branch, decoupled, GNN given the boxes (diagnostic)", "graph_decoupled_boxes", "objects"),
    ("graph branch, decoupled, positional graph query", "graph_decoupled_positional", "objects"),
)


def sg2img(*args: str) -> list[str]:
    return [sys.executable, "-m", "sg2img", *args]


def run(cmd: list[str], log: dict) -> float:
    shown = shlex.join(["sg2img", *cmd[3:]] if cmd[:3] == sg2img() else cmd)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    log.setdefault("commands", []).append({"command": shown, "seconds": round(seconds, 1)})
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full (GPU) preset instead of the quick one")
    ap.add_argument("--from", dest="start", choices=STAGES, default="base", help="first stage to run")
    ap.add_argument("--runs", type=Path, default=Path("runs/shapes"))
    ap.add_argument("--eval", type=Path, default=Path("build/shapes-eval"))
    ap.add_argument("--n", type=int, default=500, help="test rows to evaluate (the whole test split: 500)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps when evaluating")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale when evaluating")
    args = ap.parse_args(argv)
    preset = [] if args.full else ["--config", f"{CONFIGS}/quick.yaml"]
    stages = STAGES[STAGES.index(args.start) :]
    log_path = args.eval / "run-log.json"
    log: dict = json.loads(log_path.read_text()) if log_path.is_file() and args.start != "base" else {}
    log["preset"] = "full" if args.full else "quick"
    args.eval.mkdir(parents=True, exist_ok=True)

    def train(configs: str | list[str], name: str, base: bool = False) -> None:
        cmd = ["fit-base"] if base else ["fit"]
        for config in [configs] if isinstance(configs, str) else configs:
            cmd += ["--config", f"{CONFIGS}/{config}.yaml"]
        cmd += preset
        cmd += ["--trainer.default_root_dir", str(args.runs / name)]
        log.setdefault("training_seconds", {})[name] = round(run(sg2img(*cmd), log), 1)

    if "base" in stages:
        train("base", "base", base=True)
    if "ship-base" in stages:
        from sg2img.models import convert_base_file

        convert_base_file(args.runs / "base" / "base.safetensors", ASSETS / "shapes-base.safetensors")
        print(
            f"shipped {args.runs / 'base' / 'base.safetensors'} -> {ASSETS / 'shapes-base.safetensors'} (fp16)"
        )
    if "decoupled" in stages:
        train("graph_decoupled", "graph_decoupled")
    if "concat" in stages:
        train("graph_concat", "graph_concat")
    if "boxes" in stages:
        train(["graph_decoupled", "graph_decoupled_boxes"], "graph_decoupled_boxes")
    if "positional" in stages:
        train(["graph_decoupled", "graph_decoupled_positional"], "graph_decoupled_positional")
    if "ship" in stages:
        shutil.copyfile(
            args.runs / "graph_decoupled" / "adapter.safetensors", ASSETS / "shapes-adapter.safetensors"
        )
        print(f"shipped the decoupled adapter -> {ASSETS / 'shapes-adapter.safetensors'}")
    if "evaluate" in stages:
        for _, adapter, prompt in ROWS:
            out = args.eval / (adapter or f"base-{prompt}")
            cmd = ["evaluate", "shapes", "--model", "embedded", "--prompt", prompt, "--n", str(args.n)]
            cmd += ["--steps", str(args.steps), "--guidance", str(args.guidance), "--out", str(out)]
            if adapter is None:
                path = "none"
            elif adapter == "graph_decoupled":  # what ships (a copy of the run's adapter)
                path = str(ASSETS.relative_to(ROOT) / "shapes-adapter.safetensors")
            else:
                path = str(args.runs / adapter / "adapter.safetensors")
            run(sg2img(*cmd, "--adapter", path), log)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    if "table" in stages:
        write_table(args, log)
    return 0


def write_table(args: argparse.Namespace, log: dict) -> Path:
    lines = [
        "| model | prompt | object recall | relation accuracy | triples judged | graph accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, adapter, prompt in ROWS:
        rec = json.loads((args.eval / (adapter or f"base-{prompt}") / "shapes-eval.json").read_text())
        s = rec["scores"]
        lines.append(
            f"| {name} | {prompt} | {s['object_recall']:.3f} | {s['relation_accuracy']:.3f} | "
            f"{s['relations_judged']:.3f} | {s['graph_accuracy']:.3f} |"
        )
    out = args.eval / "table.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
