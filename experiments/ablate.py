"""Run an ablation grid: each variant is fitted, generates on a fixed evaluation set and is scored the same way.

    python experiments/ablate.py --grid experiments/grids/shapes.yaml
    python experiments/ablate.py --grid experiments/grids/shapes.yaml --only concat   # one variant
    python experiments/ablate.py --grid experiments/grids/shapes.yaml --table         # tables only

A grid file names a base (config files composed first), the variants (each a list of delta configs from
``configs/experiments/ablations/``, composed after the base), how to generate and which metrics to compute:

    name: shapes-quick
    base: [configs/experiments/shapes/graph_decoupled.yaml, configs/experiments/shapes/quick.yaml]
    fit_flags: []                       # extra `sg2img fit` flags for every variant
    generate: {kind: shapes, n: 200, steps: 25, guidance: 5.0}    # `sg2img evaluate shapes` flags
    metrics: [shapes]                   # `sg2img evaluate --metrics`
    metric_flags: []                    # e.g. [--clip, open_clip:ViT-L-14, --clip-pretrained, FILE]
    plot: [relation_accuracy, object_recall]
    variants:
      - {name: reference, configs: []}
      - {name: concat, configs: [configs/experiments/ablations/injection_concat.yaml]}

Per variant, under ``--runs DIR/<variant>`` (default ``runs/ablations/<grid name>``):
  fit       sg2img fit --config <base...> --config <deltas...> --trainer.default_root_dir RUN
            (resumed from RUN/checkpoints/last.ckpt when a previous fit stopped partway)
  generate  sg2img evaluate shapes --adapter RUN/adapter.safetensors --save-images --out RUN/samples
            (kind coco: sg2img evaluate coco [--config PROTOCOL] --adapter ... --out RUN/coco)
  score     sg2img evaluate --samples RUN/samples --refs RUN/samples/refs --metrics ... --out RUN/scores.json
A stage whose result is on disk is not run again, so the same command resumes a stopped grid. The W&B runs
of a grid share one group (its name): the fits (job type ``fit``) and one ``eval`` run per variant with its
scores. The CSV, markdown table and bar plot go to ``--results`` (default ``experiments/results/ablations``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GENERATE_KINDS = ("shapes", "coco")
FIT_DONE, SCORES = "fit-done.json", "scores.json"
# per kind: the command, the folder it writes under RUN, its record (the "done" mark), the samples folder
KINDS = {
    "shapes": ("shapes", "samples", "shapes-eval.json", "samples"),
    "coco": ("coco", "coco", "coco-eval.json", "coco/samples"),
}


class GridError(ValueError):
    pass


@dataclass
class Variant:
    name: str
    configs: list[str]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9._]+", "-", self.name.lower()).strip("-")


@dataclass
class Grid:
    path: Path
    name: str
    base: list[str]
    variants: list[Variant]
    generate: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["shapes"])
    fit_flags: list[str] = field(default_factory=list)
    metric_flags: list[str] = field(default_factory=list)
    plot: list[str] = field(default_factory=list)


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise GridError(f"{path}: {key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_grid(path: Path) -> Grid:
    """Read and check a grid file; every error names the file, the field and the value."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GridError(f"{path}: cannot read the grid: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid is a mapping with name, base and variants, got {type(raw).__name__}")
    known = {"name", "base", "variants", "generate", "metrics", "fit_flags", "metric_flags", "plot"}
    if unknown := sorted(set(raw) - known):
        raise GridError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GridError(f"{path}: name must be a non-empty string, got {name!r}")
    base = _strings(path, "base", raw.get("base", []))
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise GridError(f"{path}: variants must be a non-empty list, got {variants_raw!r}")
    variants = []
    for i, v in enumerate(variants_raw):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].strip():
            raise GridError(f"{path}: variants[{i}] needs a name (a string), got {v!r}")
        if unknown := sorted(set(v) - {"name", "configs"}):
            raise GridError(f"{path}: variants[{i}] ({v['name']}): unknown field(s) {unknown}")
        variants.append(Variant(v["name"], _strings(path, f"variants[{i}].configs", v.get("configs", []))))
    slugs = [v.slug for v in variants]
    if dupes := sorted({s for s in slugs if slugs.count(s) > 1}):
        raise GridError(f"{path}: variant names must differ (as folder names), repeated: {dupes}")
    for key, config in [("base", c) for c in base] + [
        (f"variants ({v.name})", c) for v in variants for c in v.configs
    ]:
        if not (ROOT / config).is_file() and not Path(config).is_file():
            raise GridError(f"{path}: {key}: config file {config} does not exist")
    generate = raw.get("generate") or {}
    if not isinstance(generate, dict) or generate.get("kind", "shapes") not in GENERATE_KINDS:
        raise GridError(f"{path}: generate.kind must be one of {list(GENERATE_KINDS)}, got {generate!r}")
    if generate.get("kind") == "coco" and "images" not in generate and "config" not in generate:
        raise GridError(f"{path}: generate (kind coco) needs images or a protocol config, got {generate!r}")
    return Grid(
        Path(path),
        name.strip(),
        base,
        variants,
        generate=dict(generate),
        metrics=_strings(path, "metrics", raw.get("metrics", ["shapes"])),
        fit_flags=_strings(path, "fit_flags", raw.get("fit_flags", [])),
        metric_flags=_strings(path, "metric_flags", raw.get("metric_flags", [])),
        plot=_strings(path, "plot", raw.get("plot", [])),
    )


def sg2img(*args: str) -> list[str]:
    return [sys.executable, "-m", "sg2img", *args]


def shown(cmd: list[str]) -> str:
    return shlex.join(["sg2img", *cmd[3:]] if cmd[:3] == sg2img() else cmd)


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    print(f"\n$ {shown(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def fit_command(grid: Grid, variant: Variant, run_dir: Path, extra: list[str]) -> list[str]:
    cmd = ["fit"]
    for config in grid.base + variant.configs:
        cmd += ["--config", config]
    cmd += [*grid.fit_flags, *extra, "--trainer.default_root_dir", str(run_dir)]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        cmd += ["--ckpt_path", str(last)]
    return sg2img(*cmd)


def trained_on(run_dir: Path) -> dict[str, str]:
    """The base (and image encoder) a variant was fitted on, from its resolved config: generation uses
    the same, unless the grid's ``generate`` names them."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return {k: str(model[k]) for k in ("base", "image_encoder") if model.get(k) is not None}


def generate_command(grid: Grid, run_dir: Path) -> list[str]:
    kind = grid.generate.get("kind", "shapes")
    command, folder, _, _ = KINDS[kind]
    cmd = ["evaluate", command]
    if "config" in grid.generate:  # a protocol file first (evaluate coco), the grid's flags override it
        cmd += ["--config", str(grid.generate["config"])]
    cmd += ["--adapter", str(run_dir / "adapter.safetensors")]
    trained = trained_on(run_dir)
    if "model" not in grid.generate and "base" in trained:
        cmd += ["--model", trained["base"]]
    if kind == "coco" and "image_encoder" not in grid.generate and "image_encoder" in trained:
        cmd += ["--image-encoder", trained["image_encoder"]]
    for k, v in grid.generate.items():
        if k not in ("kind", "config"):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    if kind == "shapes":
        cmd.append("--save-images")
    return sg2img(*cmd, "--out", str(run_dir / folder))


def samples_record(grid: Grid, run_dir: Path) -> Path:
    _, folder, record, _ = KINDS[grid.generate.get("kind", "shapes")]
    return run_dir / folder / record


def refs_folder(grid: Grid, run_dir: Path) -> str:
    if grid.generate.get("kind", "shapes") == "shapes":
        return str(run_dir / "samples" / "refs")
    if "images" in grid.generate:
        return str(grid.generate["images"])
    from sg2img.evaluate import read_protocol

    flags = read_protocol(Path(grid.generate["config"]))
    return flags[flags.index("--images") + 1]


def score_command(grid: Grid, run_dir: Path) -> list[str]:
    samples = run_dir / KINDS[grid.generate.get("kind", "shapes")][3]
    cmd = ["evaluate", "--samples", str(samples), "--refs", refs_folder(grid, run_dir)]
    cmd += ["--metrics", ",".join(grid.metrics), *grid.metric_flags, "--out", str(run_dir / SCORES)]
    return sg2img(*cmd)


def log_eval_run(grid: Grid, variant: Variant, run_dir: Path, scores: dict[str, Any]) -> None:
    """One W&B run per variant's evaluation, in the grid's group (offline unless W&B can authenticate)."""
    import wandb

    from sg2img.training_cli import wandb_mode

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "sg2img"),
        group=grid.name,
        job_type="eval",
        name=f"{variant.slug}-eval",
        dir=str(run_dir),
        mode=wandb_mode(),
        config={"grid": str(grid.path), "variant": variant.name, "configs": grid.base + variant.configs},
        reinit="finish_previous",
    )
    run.log({f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    run.finish()


def run_variant(grid: Grid, variant: Variant, runs: Path, extra_fit: list[str], wandb_log: bool) -> dict:
    run_dir = runs / variant.slug
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"variant": variant.name, "configs": grid.base + variant.configs}
    done = run_dir / FIT_DONE
    if done.is_file():
        record.update(json.loads(done.read_text()))
    else:
        cmd = fit_command(grid, variant, run_dir, extra_fit)
        env = {"WANDB_RUN_GROUP": grid.name, "WANDB_JOB_TYPE": "fit"}
        seconds = run(cmd, env)
        info = {"fit_command": shown(cmd), "fit_seconds": round(seconds, 1)}
        done.write_text(json.dumps(info, indent=2) + "\n")
        record.update(info)
    samples = samples_record(grid, run_dir)
    if not samples.is_file():
        cmd = generate_command(grid, run_dir)
        run(cmd)
    record["generate_command"] = shown(generate_command(grid, run_dir))
    record["generate_seconds"] = json.loads(samples.read_text())["generation_seconds"]
    scores_path = run_dir / SCORES
    if not scores_path.is_file():
        run(score_command(grid, run_dir))
        if wandb_log:
            log_eval_run(grid, variant, run_dir, json.loads(scores_path.read_text())["scores"])
    record["score_command"] = shown(score_command(grid, run_dir))
    record["scores"] = json.loads(scores_path.read_text())["scores"]
    return record


# --- results ------------------------------------------------------------------------------------------
def metric_names(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [k for k, v in r["scores"].items() if isinstance(v, float) and k not in names]
    return names


def write_results(grid: Grid, records: list[dict], out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / grid.path.stem
    metrics = metric_names(records)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "configs", *metrics, "images", "fit_seconds", "generate_seconds"])
        for r in records:
            s = r["scores"]
            w.writerow(
                [r["variant"], " ".join(r["configs"])]
                + [f"{s[m]:.4f}" if m in s else "" for m in metrics]
                + [s.get("images", ""), r.get("fit_seconds", ""), r.get("generate_seconds", "")]
            )
    lines = [
        f"# Ablation grid `{grid.name}`",
        "",
        f"Made by `{command}` from `{grid.path.relative_to(ROOT) if grid.path.is_absolute() and grid.path.is_relative_to(ROOT) else grid.path}`.",
        f"Base: {', '.join(f'`{c}`' for c in grid.base) or '(none)'}.",
        "",
        "| variant | delta | " + " | ".join(m.replace("_", " ") for m in metrics) + " | fit (s) |",
        "|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for r in records:
        delta = ", ".join(f"`{Path(c).stem}`" for c in r["configs"][len(grid.base) :]) or "(base)"
        cells = [f"{r['scores'][m]:.3f}" if m in r["scores"] else "" for m in metrics]
        lines.append(
            f"| {r['variant']} | {delta} | " + " | ".join(cells) + f" | {r.get('fit_seconds', '')} |"
        )
    lines += ["", "Commands per variant:", ""]
    for r in records:
        lines.append(f"- {r['variant']}:")
        lines += [f"  - `{r[k]}`" for k in ("fit_command", "generate_command", "score_command") if r.get(k)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    paths = {"csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md")}
    plot = [m for m in (grid.plot or [m for m in metrics if not m.endswith("_se")]) if m in metrics]
    if plot:
        paths["png"] = bar_plot(grid, records, plot, stem.with_suffix(".png"))
    return paths


def bar_plot(grid: Grid, records: list[dict], metrics: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(records)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics) * max(1, len(records) / 3), 3.6))
    for i, r in enumerate(records):
        xs = [j + (i - (len(records) - 1) / 2) * width for j in range(len(metrics))]
        ys = [r["scores"].get(m, 0.0) for m in metrics]
        errs = [
            r["scores"].get(f"{m}_se", 0.0) for m in metrics
        ]  # a standard error, where the metric has one
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=2, label=r["variant"])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_ylim(0, max(1.0, max(r["scores"].get(m, 0.0) for r in records for m in metrics) * 1.15))
    ax.set_title(f"ablation grid: {grid.name}")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=Path, required=True, help="a grid file (see experiments/grids/)")
    ap.add_argument("--runs", type=Path, default=None, help="default: runs/ablations/<grid name>")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "ablations")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run these variants only")
    ap.add_argument("--table", action="store_true", help="only write the results of finished variants")
    ap.add_argument("--no-wandb", action="store_true", help="do not log the evaluations to W&B")
    ap.add_argument(
        "--fit-flag", action="append", default=[], metavar="FLAG", help="an extra fit flag (repeatable)"
    )
    args = ap.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except GridError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    runs = args.runs or Path("runs/ablations") / grid.name
    chosen = grid.variants
    if args.only:
        names = {v.name for v in grid.variants} | {v.slug for v in grid.variants}
        if missing := [n for n in args.only if n not in names]:
            print(f"ablate: error: {args.grid}: no variant named {missing}", file=sys.stderr)
            return 2
        chosen = [v for v in grid.variants if v.name in args.only or v.slug in args.only]
    records, failed = [], []
    for variant in grid.variants:
        if variant in chosen and not args.table:
            try:  # a failed variant does not stop the grid; running the command again resumes it
                records.append(run_variant(grid, variant, runs, args.fit_flag, not args.no_wandb))
            except subprocess.CalledProcessError as e:
                print(f"ablate: variant {variant.name!r} failed: {shown(e.cmd)} (exit {e.returncode})")
                failed.append(variant.name)
        elif (runs / variant.slug / SCORES).is_file():
            records.append(
                {
                    "variant": variant.name,
                    "configs": grid.base + variant.configs,
                    "scores": json.loads((runs / variant.slug / SCORES).read_text())["scores"],
                    **json.loads((runs / variant.slug / FIT_DONE).read_text()),
                    "generate_command": shown(generate_command(grid, runs / variant.slug)),
                    "score_command": shown(score_command(grid, runs / variant.slug)),
                }
            )
    if not records:
        print(f"ablate: no finished variant yet (failed: {failed})", file=sys.stderr)
        return 1
    command = shlex.join(["python", "experiments/ablate.py", "--grid", str(args.grid)])
    paths = write_results(grid, records, args.results, command)
    print("\n" + paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if failed:
        print(
            f"ablate: {len(failed)} variant(s) failed: {failed}; run the same command to resume",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
