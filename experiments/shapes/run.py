"""The shapes-world experiment, end to end, with this package's own commands.

    python experiments/shapes/run.py                     # every stage (2-core CPU)
    python experiments/shapes/run.py --to ship-base      # the miniature SD1.5 + CLIP only: tiny CLIP, base
    python experiments/shapes/run.py --from evaluate     # only re-evaluate the models in place

Stages (each prints the command it runs and records its wall-clock time):
  clip       sg2img fit-clip --config configs/experiments/shapes/clip.yaml (the world's tiny CLIP)
  clip-eval  held-out retrieval of the tiny CLIP: image -> its caption vs one differing only in a binding
             or a relation (experiments/shapes/clip_retrieval.py)
  ship-clip  the tiny CLIP, stored fp16, becomes sg2img/assets/shapes-clip.safetensors (`clip: embedded`)
  base       sg2img fit-base --config .../base.yaml --config .../base_vpred_steps.yaml --config .../base_matmul.yaml
             --config .../base_fp32.yaml --config .../base_channels_last.yaml --config .../base_attention_8px.yaml
             (reads the shipped tiny CLIP; v-prediction, float32, NHWC, attention at 8 px only, 4,500 steps;
             sampled with eta 1)
  ship-base  the EMA base, stored fp16, becomes sg2img/assets/shapes-base.safetensors (`--model embedded`)
  image-cls  sg2img fit ... image_cls.yaml [quick]: IP-Adapter's image branch (4 tokens) on the new base
  image-patch sg2img fit ... image_patch.yaml [quick]: the Plus variant (Resampler over patch tokens)
  decoupled  sg2img fit --config configs/experiments/shapes/graph_decoupled.yaml [quick] (on the shipped base)
  concat     sg2img fit --config configs/experiments/shapes/graph_concat.yaml [quick]
  boxes      sg2img fit --config .../graph_decoupled.yaml --config .../graph_decoupled_boxes.yaml [quick]
  positional sg2img fit --config .../graph_decoupled.yaml --config .../graph_decoupled_positional.yaml [quick]
  layout     sg2img fit --config .../graph_decoupled.yaml --config .../graph_layout.yaml [quick]: the layout
             head and object tokens confined to their boxes
  identity   sg2img fit ... graph_layout.yaml --config .../graph_identity.yaml [quick]: the layout adapter whose
             object tokens also carry their label's text embedding (which object goes in which box)
  concat-layout sg2img fit ... graph_concat.yaml ... graph_concat_layout.yaml: the concat injection given the
             same layout (embedded into the object tokens; concat cannot confine tokens)
  ship       the identity adapter becomes sg2img/assets/shapes-adapter.safetensors
  evaluate   sg2img evaluate shapes for every row of the table (``ROWS``)
  table      experiments/results/shapes/table.md from the evaluation records

The evaluation records (``shapes-eval.json``, small) and the run log with each stage's time are copied to
``experiments/results/shapes/`` (``--records``), which is what the table is made from. ``--runs DIR``
(default ``runs/shapes``) holds the training runs, ``--eval DIR`` (default ``build/shapes-eval``) the
images and contact sheets.
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

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = "configs/experiments/shapes"
ASSETS = ROOT / "sg2img" / "assets"
STAGES = (
    "clip",
    "clip-eval",
    "ship-clip",
    "base",
    "ship-base",
    "image-cls",
    "image-patch",
    "image-cls-text-dropout",
    "decoupled",
    "concat",
    "boxes",
    "positional",
    "layout",
    "identity",
    "concat-layout",
    "ship",
    "evaluate",
    "table",
)
TRAINING = {  # stage -> (configs, run name, base model?); [quick] is added to the adapters
    "clip": (["clip"], "clip", "clip"),
    # base v5: v-prediction, float32 in NHWC layout, attention at 8 px only, 4,500 steps, eta 1 (the ninth
    # try of experiments/results/shapes.md section 1.3)
    "base": (
        ["base", "base_vpred_steps", "base_matmul", "base_fp32", "base_channels_last", "base_attention_8px"],
        "base",
        "base",
    ),
    "image-cls": (["graph_decoupled", "image_cls"], "image_cls", None),
    "image-patch": (["graph_decoupled", "image_patch"], "image_patch", None),
    "image-cls-text-dropout": (
        ["graph_decoupled", "image_cls", "image_text_dropout"],
        "image_cls_text_dropout",
        None,
    ),
    "decoupled": (["graph_decoupled"], "graph_decoupled", None),
    "concat": (["graph_concat"], "graph_concat", None),
    "boxes": (["graph_decoupled", "graph_decoupled_boxes"], "graph_decoupled_boxes", None),
    "positional": (["graph_decoupled", "graph_decoupled_positional"], "graph_decoupled_positional", None),
    "layout": (["graph_decoupled", "graph_layout"], "graph_layout", None),  # its own CPU recipe
    "identity": (["graph_decoupled", "graph_layout", "graph_identity"], "graph_identity", None),
    "concat-layout": (["graph_concat", "graph_concat_layout"], "graph_concat_layout", None),
}
SHIPPED = "graph_identity"  # the adapter run that becomes sg2img/assets/shapes-adapter.safetensors
INDEPENDENT = ["--graphs", "data/shapes-independent.json"]  # experiments/shapes/independent_graphs.py
ROWS = (  # name, record, adapter run (None: the base alone), text prompt, image prompt, more evaluate flags
    ("text only (objects in the caption)", "base-objects", None, "objects", "none", []),
    ("text with the relations in the caption", "base-relations", None, "relations", "none", []),
    ("image branch, CLS (4 tokens), image prompt only (200 graphs)", "image_cls-none", "image_cls", "none", "reference", []),
    ("image branch, patch (Resampler), image prompt only", "image_patch-none", "image_patch", "none", "reference",
     []),
    ("image branch, CLS (4 tokens), image + objects prompt (200 graphs)", "image_cls-objects", "image_cls", "objects",
     "reference", []),
    ("image branch, patch (Resampler), image + objects prompt", "image_patch-objects", "image_patch", "objects",
     "reference", []),
    ("image branch, CLS, text dropped half the time, image prompt only (200 graphs)", "image_cls_text_dropout-none",
     "image_cls_text_dropout", "none", "reference", []),
    ("image branch, CLS, text dropped half the time, image + objects prompt (200 graphs)", "image_cls_text_dropout-objects",
     "image_cls_text_dropout", "objects", "reference", []),
    ("graph branch, decoupled", "graph_decoupled", "graph_decoupled", "objects", "none", []),
    ("graph branch, concat", "graph_concat", "graph_concat", "objects", "none", []),
    ("graph branch, decoupled, GNN given the boxes (diagnostic)", "graph_decoupled_boxes", "graph_decoupled_boxes",
     "objects", "none", ["--boxes", "given"]),
    ("graph branch, decoupled, positional graph query", "graph_decoupled_positional", "graph_decoupled_positional",
     "objects", "none", []),
    ("graph branch with layout, relations only", "graph_layout", "graph_layout", "objects", "none", []),
    ("graph branch with layout, boxes given (oracle)", "graph_layout-oracle", "graph_layout", "objects", "none",
     ["--boxes", "given"]),
    ("graph branch with layout, concat (layout embedded in the tokens)", "graph_concat_layout",
     "graph_concat_layout", "objects", "none", []),
    ("graph branch with layout, relations only, independent graphs", "graph_layout-independent", "graph_layout",
     "objects", "none", INDEPENDENT),
    ("graph branch with layout and object identity, relations only", "graph_identity", "graph_identity", "objects",
     "none", []),
    ("graph branch with layout and object identity, boxes given (oracle)", "graph_identity-oracle",
     "graph_identity", "objects", "none", ["--boxes", "given"]),
    ("graph branch with layout and object identity, relations only, independent graphs",
     "graph_identity-independent", "graph_identity", "objects", "none", INDEPENDENT),
    ("text with the relations in the caption, independent graphs", "base-relations-independent", None,
     "relations", "none", INDEPENDENT),
)  # fmt: skip
# Rows whose model no longer ships: their records stay in the table (not re-evaluated), with what they were.
# When a base is replaced, the rows evaluated on it have their records renamed base-<version>-<row>.
SHIPPED_ROWS = (  # the rows evaluated again on each base since v3: the base alone and the shipped adapter
    "base-objects", "base-relations", "graph_identity", "graph_identity-oracle", "graph_identity-independent",
    "base-relations-independent",
)  # fmt: skip
RETIRED_BASES = (  # version, what it was, its rows
    # v2: the base shipped before the v-prediction one (base.yaml alone at commit c71465d: epsilon, float32,
    # 3,200 steps, sampled at eta 0), and the adapters trained on it
    ("v2", "base v2 (epsilon, 3,200 steps, eta 0; shipped until commit c71465d)", (
        "base-objects", "base-relations", "image_cls-none", "image_cls-objects", "image_cls_text_dropout-none",
        "image_cls_text_dropout-objects", "graph_layout", "graph_layout-oracle", "graph_layout-independent",
        "graph_identity", "graph_identity-oracle", "graph_identity-independent", "base-relations-independent",
    )),
    # v3: v-prediction, bfloat16, 4,000 steps (base.yaml + base_vpred_steps.yaml), eta 1
    ("v3", "base v3 (v-prediction, bfloat16, 4,000 steps, eta 1; shipped until base v4)", SHIPPED_ROWS),
    # v4: the same in float32 for 4,500 steps (+ base_matmul.yaml + base_fp32.yaml: transformers at 16 and 8 px)
    ("v4", "base v4 (v-prediction, float32, attention at 16 and 8 px, 4,500 steps, eta 1; shipped until base v5)",
     SHIPPED_ROWS),
)  # fmt: skip
ARCHIVED = (
    ("base v1 (frozen tiny-CLIP text tower, 8 heads, 4,500 steps; base.yaml at commit d2538dd), objects "
     "in the caption", "base-v1-objects", "objects", "none"),
    ("base v1, relations in the caption", "base-v1-relations", "relations", "none"),
    *((f"{what}: {label}", f"base-{version}-{name}", prompt, image)
      for version, what, rows in RETIRED_BASES
      for label, name, _, prompt, image, _ in ROWS if name in rows),
)  # fmt: skip
RECORDS = ROOT / "experiments" / "results" / "shapes"


def sg2img(*args: str) -> list[str]:
    return [sys.executable, "-m", "sg2img", *args]


def run(cmd: list[str], log: dict) -> float:
    # as anyone would type it from the repository root: no interpreter or checkout path of this machine
    shown = shlex.join(
        ["sg2img", *cmd[3:]]
        if cmd[:3] == sg2img()
        else ["python" if c == sys.executable else c.replace(f"{ROOT}/", "") for c in cmd]
    )
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    log.setdefault("commands", []).append({"command": shown, "seconds": round(seconds, 1)})
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full (GPU) preset for the adapters")
    ap.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0], help="first stage to run")
    ap.add_argument("--to", dest="stop", choices=STAGES, default=STAGES[-1], help="last stage to run")
    ap.add_argument("--runs", type=Path, default=Path("runs/shapes"))
    ap.add_argument("--eval", type=Path, default=Path("build/shapes-eval"))
    ap.add_argument("--records", type=Path, default=RECORDS, help="where the small result records go")
    ap.add_argument("--n", type=int, default=500, help="test rows to evaluate (the whole test split: 500)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps when evaluating")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale when evaluating")
    ap.add_argument("--rows", default=None, help="evaluate only these rows (comma-separated record names)")
    args = ap.parse_args(argv)
    only = set(args.rows.split(",")) if args.rows else None
    preset = [] if args.full else ["--config", f"{CONFIGS}/quick.yaml"]
    stages = STAGES[STAGES.index(args.start) : STAGES.index(args.stop) + 1]
    args.records.mkdir(parents=True, exist_ok=True)
    log_path = args.records / "run-log.json"
    log: dict = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["preset"] = "full" if args.full else "quick"
    args.eval.mkdir(parents=True, exist_ok=True)

    def save_log() -> None:
        log_path.write_text(json.dumps(log, indent=2) + "\n")

    for stage in stages:
        if stage in TRAINING:
            configs, name, kind = TRAINING[stage]
            cmd = {"clip": ["fit-clip"], "base": ["fit-base"]}.get(kind, ["fit"])
            # the preset goes after the first config: a stage's own recipe (its second config) has the last word
            for config in configs[:1]:
                cmd += ["--config", f"{CONFIGS}/{config}.yaml"]
            cmd += [] if kind else preset
            for config in configs[1:]:
                cmd += ["--config", f"{CONFIGS}/{config}.yaml"]
            cmd += ["--trainer.default_root_dir", str(args.runs / name)]
            log.setdefault("training_seconds", {})[name] = round(run(sg2img(*cmd), log), 1)
        elif stage == "clip-eval":
            out = args.records / "clip-retrieval.json"
            clip = args.runs / "clip" / "clip.safetensors"
            run([sys.executable, "experiments/shapes/clip_retrieval.py", str(clip), "--out", str(out)], log)
        elif stage == "ship-clip":
            from sg2img.shapes.tiny_clip import load_tiny_clip, save_tiny_clip

            model, config = load_tiny_clip(args.runs / "clip" / "clip.safetensors")
            save_tiny_clip(model, config, ASSETS / "shapes-clip.safetensors", dtype=torch.float16)
            print(
                f"shipped {args.runs / 'clip' / 'clip.safetensors'} -> {ASSETS / 'shapes-clip.safetensors'} (fp16)"
            )
        elif stage == "ship-base":
            from sg2img.base.components import convert_base_file

            convert_base_file(args.runs / "base" / "base.safetensors", ASSETS / "shapes-base.safetensors")
            print(
                f"shipped {args.runs / 'base' / 'base.safetensors'} -> {ASSETS / 'shapes-base.safetensors'} (fp16)"
            )
        elif stage == "ship":
            src = args.runs / SHIPPED / "adapter.safetensors"
            shutil.copyfile(src, ASSETS / "shapes-adapter.safetensors")
            print(f"shipped {src} -> {ASSETS / 'shapes-adapter.safetensors'}")
        elif stage == "evaluate":
            for _, name, adapter, prompt, image, flags in ROWS:
                if only is not None and name not in only:
                    continue
                out = args.eval / name
                cmd = ["evaluate", "shapes", "--model", "embedded", "--prompt", prompt, "--n", str(args.n)]
                cmd += [
                    "--steps",
                    str(args.steps),
                    "--guidance",
                    str(args.guidance),
                    "--out",
                    str(out),
                    *flags,
                ]
                if adapter is None:
                    path = "none"
                elif adapter == SHIPPED:  # what ships (a copy of the run's adapter)
                    path = str(ASSETS.relative_to(ROOT) / "shapes-adapter.safetensors")
                else:
                    path = str(args.runs / adapter / "adapter.safetensors")
                if adapter is not None and not Path(path).is_file():
                    print(f"skipped {name}: no {path}")
                    continue
                run(sg2img(*cmd, "--adapter", path, "--image-prompt", image, "--save-images"), log)
                record = json.loads((out / "shapes-eval.json").read_text())
                record.pop("images", None)  # the per-image rows stay in build/; the record keeps the totals
                # CLIP-T against the text prompt and CLIP-I against the prompt image (the graph's rendering),
                # both with the world's tiny CLIP; graphs without boxes have no rendering
                metrics = ",".join(
                    m for m, on in (("clip-t", prompt != "none"), ("clip-i", "--graphs" not in flags)) if on
                )
                scores = out / "clip-scores.json"
                run(sg2img("evaluate", "--samples", str(out), "--refs", str(out / "refs"), "--metrics", metrics,
                           "--clip", "shapes", "--out", str(scores)), log)  # fmt: skip
                record["clip_scores"] = json.loads(scores.read_text())
                (args.records / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        elif stage == "table":
            write_table(args)
        save_log()
    return 0


def write_table(args: argparse.Namespace) -> Path:
    """The results table from the committed evaluation records (a row whose record is missing is left out)."""
    lines = [
        "| model | text prompt | image prompt | object recall | relation accuracy | triples judged | "
        "graph accuracy | CLIP-T | CLIP-I |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(label, name, prompt, image) for label, name, _, prompt, image, _ in ROWS] + list(ARCHIVED)
    for label, name, prompt, image in rows:
        path = args.records / f"{name}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        s, c = record["scores"], record.get("clip_scores", {}).get("scores", {})

        def clip(key: str, c=c, n=s["images"]) -> str:  # mean ± standard error over the images
            return f"{c[key]:.3f} ± {c[key + '_std'] / n**0.5:.3f}" if key in c else "–"

        lines.append(
            f"| {label} | {prompt} | {image} | {s['object_recall']:.3f} ± {s['object_recall_se']:.3f} | "
            f"{s['relation_accuracy']:.3f} ± {s['relation_accuracy_se']:.3f} | {s['relations_judged']:.3f} | "
            f"{s['graph_accuracy']:.3f} ± {s['graph_accuracy_se']:.3f} | {clip('clip_t')} | {clip('clip_i')} |"
        )
    out = args.records / "table.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
