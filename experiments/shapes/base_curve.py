"""How a base learns to draw its captions: object recall and relation accuracy of the EMA weights at each
checkpoint of a ``sg2img fit-base`` run.

    python experiments/shapes/base_curve.py runs/shapes/base --n 100 --out experiments/results/shapes/base-curve

For every ``checkpoints/epoch=*-step=*.ckpt`` of the run: the EMA base it holds is exported as a base file
(``build/base-curve/step-N.safetensors``), then ``sg2img evaluate shapes --adapter none --prompt objects``
scores it on the first ``--n`` test graphs (25 DDIM steps, guidance 5). Each record is written to
``--out/step-N.json`` (totals, no per-image rows), and the curve to ``--out/curve.md``. ``--final`` scores
the run's own ``base.safetensors`` (the EMA weights at the end of fit) as well, as the row ``final``:

    python experiments/shapes/base_curve.py runs/shapes/base-inv-snr --steps none --final --n 500 \
        --out experiments/results/shapes/base-inv-snr
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def export_checkpoint(run: Path, ckpt: Path, out: Path) -> Path:
    """The EMA weights of one checkpoint as a base file, built as the run's config builds its model."""
    from sg2img.train.base_module import BaseModelModule

    model_config = yaml.safe_load((run / "config.yaml").read_text())["model"]
    if "snr_gamma" in model_config:  # a run fitted before the objective group: Min-SNR, or none for null
        gamma = model_config.pop("snr_gamma")
        model_config["objective"] = (
            {"loss_weighting": "none"} if gamma is None else {"loss_weighting": "min_snr", "snr_gamma": gamma}
        )
    module = BaseModelModule(**model_config)
    module.configure_model()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    module.ema.load_state_dict(state["ema"])
    return module.export_base(out)


def evaluate_base(flags: list[str], folder: Path, record_path: Path, **extra: object) -> dict:
    """``sg2img evaluate shapes --adapter none FLAGS --out FOLDER``, its record (totals, no per-image rows,
    plus ``extra``) written to ``record_path``; the record's scores."""
    cmd = [
        sys.executable,
        "-m",
        "sg2img",
        "evaluate",
        "shapes",
        "--adapter",
        "none",
        "--save-images",  # every image, for experiments/shapes/base_failures.py
        *flags,
        "--out",
        str(folder),
    ]
    print("$", " ".join(["sg2img", *cmd[3:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    record = json.loads((folder / "shapes-eval.json").read_text())
    record.pop("images", None)
    record.update(extra)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record["scores"]


def score_cells(s: dict) -> str:
    """Object recall, relation accuracy and graph accuracy, each ± its error, as table cells."""
    return (
        f"{s['object_recall']:.3f} ± {s['object_recall_se']:.3f} | "
        f"{s['relation_accuracy']:.3f} ± {s['relation_accuracy_se']:.3f} | "
        f"{s['graph_accuracy']:.3f} ± {s['graph_accuracy_se']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a fit-base run folder (config.yaml, checkpoints/)")
    ap.add_argument("--n", type=int, default=100, help="test graphs per checkpoint")
    ap.add_argument("--prompt", default="objects", choices=("objects", "relations"))
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "shapes" / "base-curve")
    ap.add_argument("--work", type=Path, default=Path("build/base-curve"))
    ap.add_argument(
        "--steps",
        default=None,
        help="comma-separated checkpoint steps (default: every one; none: no checkpoint)",
    )
    ap.add_argument("--final", action="store_true", help="also the run's base.safetensors (the end of fit)")
    args = ap.parse_args(argv)
    wanted = None if args.steps is None else {int(s) for s in args.steps.split(",") if s != "none"}
    ckpts = sorted(
        (int(m.group(1)), p)
        for p in (args.run / "checkpoints").glob("epoch=*-step=*.ckpt")
        if (m := re.search(r"step=(\d+)\.ckpt$", p.name)) and (wanted is None or int(m.group(1)) in wanted)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for step, ckpt in ckpts:
        record_path = args.out / f"step-{step}-{args.prompt}.json"
        if not record_path.is_file():
            base = export_checkpoint(args.run, ckpt, args.work / f"step-{step}.safetensors")
            flags = ["--model", str(base), "--prompt", args.prompt, "--n", str(args.n)]
            evaluate_base(flags, args.work / f"step-{step}-{args.prompt}", record_path, step=step)
        rows.append(f"| {step} | {score_cells(json.loads(record_path.read_text())['scores'])} |")
    record_path = args.out / f"final-{args.prompt}.json"
    if args.final:  # scored each time: the file may be newer
        flags = ["--model", str(args.run / "base.safetensors"), "--prompt", args.prompt, "--n", str(args.n)]
        evaluate_base(flags, args.work / f"final-{args.prompt}", record_path, step="final")
    if record_path.is_file():  # scored now or before: it stays in the table
        rows.append(f"| final | {score_cells(json.loads(record_path.read_text())['scores'])} |")
    table = [
        f"Base `{args.run}`, EMA weights per checkpoint, `--prompt {args.prompt}`, first {args.n} test graphs:",
        "",
        "| step | object recall | relation accuracy | graph accuracy |",
        "|---|---|---|---|",
        *rows,
    ]
    (args.out / f"curve-{args.prompt}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
