"""Run an ablation grid: each variant is fitted (per training seed), generates on a fixed evaluation set and
is scored the same way; the table gives each variant's mean over seeds with its standard error.

    python experiments/ablate.py --grid experiments/grids/shapes_ablations.yaml
    python experiments/ablate.py --grid experiments/grids/shapes.yaml --only concat   # one variant
    python experiments/ablate.py --grid experiments/grids/shapes.yaml --seeds 1       # second seeds only
    python experiments/ablate.py --grid experiments/grids/shapes.yaml --table         # tables only

A grid file names a base (config files composed first), the variants (each a list of delta configs,
composed after the base), how to generate and which metrics to compute:

    name: shapes-quick
    base: [configs/experiments/shapes/graph_decoupled.yaml, configs/experiments/shapes/quick.yaml]
    fit_flags: []                       # extra `sg2img fit` flags for every variant
    seeds: [0, 1]                       # training seeds (--seed_everything and --model.seed); omit: one
                                        # run per variant with its configs' own seed
    generate: {kind: shapes, n: 200, steps: 25, guidance: 5.0}    # `sg2img evaluate shapes` flags
    metrics: [shapes]                   # `sg2img evaluate --metrics`
    metric_flags: []                    # e.g. [--clip, shapes]
    evaluations:                        # optional: several evaluations of each run, by name, each with
      text: {generate: {prompt: objects}}                 # its own generate flags and metrics
      image-only: {generate: {prompt: none}, metrics: [shapes, clip-i]}
    comparisons: [[concat, reference]]  # pairs whose differences the table tests (each evaluation)
    plot: [relation_accuracy, object_recall]
    variants:
      - {name: reference, configs: [], seeds: [0, 1, 2]}     # seeds: this variant's own
      - {name: concat, configs: [configs/experiments/ablations/injection_concat.yaml]}
      - {name: base alone, train: false, generate: {prompt: relations}, evaluations: [text]}

A variant with ``train: false`` is not fitted: it is evaluated with ``--adapter none`` (the base alone).

Per run (a variant and a seed), under ``--runs DIR/<variant>[/seed-S]`` (default ``runs/ablations/<grid>``):
  fit       sg2img fit --config <base...> --config <deltas...> [--seed_everything S --model.seed S]
            --trainer.default_root_dir RUN (resumed from RUN/checkpoints/last.ckpt when a fit stopped)
  generate  sg2img evaluate shapes --adapter RUN/adapter.safetensors --save-images --out RUN/samples[-EVAL]
            (kind coco: sg2img evaluate coco [--config PROTOCOL] --adapter ... --out RUN/coco[-EVAL])
  score     sg2img evaluate --samples ... --refs ... --metrics ... --out RUN/scores[-EVAL].json
A stage whose result is on disk is not run again, so the same command resumes a stopped grid. Each run's
commands, trainable parameters, times and scores go to a record under ``--results``
(``<grid file stem>/<variant>[/seed-S].json``), small enough to commit: a run whose record holds every
evaluation is not run again, on any machine, and ``--table`` needs only the records. Runs go seed by seed
(every variant's first seed before any second one), so a grid stopped early has the most variants.

The table: per variant and evaluation, the mean over seeds ± its standard error, which adds in quadrature
the spread over seeds (sample standard deviation / sqrt(seeds)) and the images' own standard errors
(pooled: sqrt(sum of squares) / seeds). A difference "exceeds its error" when it is more than twice
sqrt(se_a^2 + se_b^2). The W&B runs of a grid share one group (its name): the fits (job type ``fit``) and
one ``eval`` run per run and evaluation. The CSV (one row per run and evaluation), the markdown table and
the bar plot go to ``--results`` (default ``experiments/results/ablations``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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
DEFAULT_EVALUATION = ""  # the name of a grid's only evaluation when it names none


class GridError(ValueError):
    pass


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-")


@dataclass
class Evaluation:
    name: str  # DEFAULT_EVALUATION for a grid without `evaluations`
    generate: dict[str, Any] = field(default_factory=dict)  # over the grid's generate flags
    metrics: list[str] | None = None  # None: the grid's

    @property
    def suffix(self) -> str:
        return f"-{slugify(self.name)}" if self.name else ""


@dataclass
class Variant:
    name: str
    configs: list[str]
    seeds: list[int] | None = None  # None: the grid's
    evaluations: list[str] | None = None  # None: every evaluation of the grid
    train: bool = True  # False: the base alone (--adapter none), nothing fitted
    generate: dict[str, Any] = field(default_factory=dict)  # over the grid's and the evaluation's flags

    @property
    def slug(self) -> str:
        return slugify(self.name)


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
    seeds: list[int] | None = None
    evaluations: list[Evaluation] = field(default_factory=lambda: [Evaluation(DEFAULT_EVALUATION)])
    comparisons: list[tuple[str, str]] = field(default_factory=list)

    def seeds_of(self, variant: Variant) -> list[int | None]:
        if not variant.train:
            return [None]
        seeds = variant.seeds if variant.seeds is not None else self.seeds
        return list(seeds) if seeds else [None]

    def evaluations_of(self, variant: Variant) -> list[Evaluation]:
        if variant.evaluations is None:
            return self.evaluations
        return [e for e in self.evaluations if e.name in variant.evaluations]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if name in (v.name, v.slug))


@dataclass
class Run:
    """One fit of one variant (with one seed), and where it lives."""

    grid: Grid
    variant: Variant
    seed: int | None
    runs: Path  # the grid's runs folder

    @property
    def dir(self) -> Path:
        return self.runs / self.variant.slug / ("" if self.seed is None else f"seed-{self.seed}")

    @property
    def label(self) -> str:
        return self.variant.slug + ("" if self.seed is None else f"-seed-{self.seed}")

    def record_path(self, results: Path) -> Path:
        folder = results / self.grid.path.stem / self.variant.slug
        return folder.with_suffix(".json") if self.seed is None else folder / f"seed-{self.seed}.json"


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise GridError(f"{path}: {key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def _seeds(path: Path, key: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
        or len(set(value)) != len(value)
    ):
        raise GridError(
            f"{path}: {key} must be a non-empty list of distinct seeds (integers >= 0), got {value!r}"
        )
    return list(value)


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{path}: {key} must be a mapping of flags, got {value!r}")
    return dict(value)


def load_grid(path: Path) -> Grid:
    """Read and check a grid file; every error names the file, the field and the value."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GridError(f"{path}: cannot read the grid: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid is a mapping with name, base and variants, got {type(raw).__name__}")
    known = {"name", "base", "variants", "generate", "metrics", "fit_flags", "metric_flags", "plot", "seeds",
             "evaluations", "comparisons"}  # fmt: skip
    if unknown := sorted(set(raw) - known):
        raise GridError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GridError(f"{path}: name must be a non-empty string, got {name!r}")
    base = _strings(path, "base", raw.get("base", []))
    evaluations = [Evaluation(DEFAULT_EVALUATION)]
    if "evaluations" in raw:
        evals_raw = raw["evaluations"]
        if not isinstance(evals_raw, dict) or not evals_raw:
            raise GridError(
                f"{path}: evaluations must be a non-empty mapping of name to settings, got {evals_raw!r}"
            )
        evaluations = []
        for ename, spec in evals_raw.items():
            spec = spec or {}
            if not isinstance(ename, str) or not slugify(ename) or not isinstance(spec, dict):
                raise GridError(f"{path}: evaluations.{ename}: a name and a mapping are needed, got {spec!r}")
            if unknown := sorted(set(spec) - {"generate", "metrics"}):
                raise GridError(f"{path}: evaluations.{ename}: unknown field(s) {unknown}")
            metrics = (
                _strings(path, f"evaluations.{ename}.metrics", spec["metrics"]) if "metrics" in spec else None
            )
            generate = _mapping(path, f"evaluations.{ename}.generate", spec.get("generate"))
            evaluations.append(Evaluation(ename, generate, metrics))
    eval_names = [e.name for e in evaluations]
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise GridError(f"{path}: variants must be a non-empty list, got {variants_raw!r}")
    variants = []
    for i, v in enumerate(variants_raw):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].strip():
            raise GridError(f"{path}: variants[{i}] needs a name (a string), got {v!r}")
        where = f"variants[{i}] ({v['name']})"
        if unknown := sorted(set(v) - {"name", "configs", "seeds", "evaluations", "train", "generate"}):
            raise GridError(f"{path}: {where}: unknown field(s) {unknown}")
        chosen = _strings(path, f"{where}.evaluations", v["evaluations"]) if "evaluations" in v else None
        if chosen is not None and (missing := [e for e in chosen if e not in eval_names]):
            raise GridError(f"{path}: {where}: no evaluation named {missing}; the grid has {eval_names}")
        train = v.get("train", True)
        if not isinstance(train, bool):
            raise GridError(f"{path}: {where}.train must be true or false, got {train!r}")
        variants.append(
            Variant(
                v["name"],
                _strings(path, f"variants[{i}].configs", v.get("configs", [])),
                seeds=_seeds(path, f"{where}.seeds", v.get("seeds")),
                evaluations=chosen,
                train=train,
                generate=_mapping(path, f"{where}.generate", v.get("generate")),
            )
        )
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
    comparisons = []
    for i, pair in enumerate(raw.get("comparisons") or []):
        names = _strings(path, f"comparisons[{i}]", pair)
        if len(names) != 2 or (
            missing := [n for n in names if n not in {v.name for v in variants} | set(slugs)]
        ):
            raise GridError(f"{path}: comparisons[{i}] must name two variants of the grid, got {pair!r}")
        comparisons.append((names[0], names[1]))
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
        seeds=_seeds(path, "seeds", raw.get("seeds")),
        evaluations=evaluations,
        comparisons=comparisons,
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


def fit_command(
    grid: Grid, variant: Variant, run_dir: Path, extra: list[str], seed: int | None = None
) -> list[str]:
    cmd = ["fit"]
    for config in grid.base + variant.configs:
        cmd += ["--config", config]
    cmd += [*grid.fit_flags, *extra]
    if seed is not None:  # the data order and Lightning's draws, and the module's own (init, noise, dropout)
        cmd += ["--seed_everything", str(seed), "--model.seed", str(seed)]
    cmd += ["--trainer.default_root_dir", str(run_dir)]
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
    from sg2img.train.settings import fitted_base

    found = fitted_base((yaml.safe_load(path.read_text()) or {}).get("model") or {})
    return {"base" if k == "source" else k: v for k, v in found.items()}


def generate_flags(grid: Grid, evaluation: Evaluation | None, variant: Variant | None) -> dict[str, Any]:
    return {
        **grid.generate,
        **(evaluation.generate if evaluation else {}),
        **(variant.generate if variant else {}),
    }


def generate_command(
    grid: Grid, run_dir: Path, evaluation: Evaluation | None = None, variant: Variant | None = None
) -> list[str]:
    flags = generate_flags(grid, evaluation, variant)
    kind = flags.get("kind", "shapes")
    command, folder, _, _ = KINDS[kind]
    cmd = ["evaluate", command]
    if "config" in flags:  # a protocol file first (evaluate coco), the grid's flags override it
        cmd += ["--config", str(flags["config"])]
    trained = variant is None or variant.train
    cmd += ["--adapter", str(run_dir / "adapter.safetensors") if trained else "none"]
    fitted = trained_on(run_dir)
    if "model" not in flags and "base" in fitted:
        cmd += ["--model", fitted["base"]]
    if kind == "coco" and "image_encoder" not in flags and "image_encoder" in fitted:
        cmd += ["--image-encoder", fitted["image_encoder"]]
    for k, v in flags.items():
        if k in ("kind", "config") or v is False:
            continue
        flag = f"--{k.replace('_', '-')}"
        cmd += [flag] if v is True else [flag, str(v)]  # true: a switch such as --channels-last
    if kind == "shapes":
        cmd.append("--save-images")
    suffix = evaluation.suffix if evaluation else ""
    return sg2img(*cmd, "--out", str(run_dir / f"{folder}{suffix}"))


def samples_record(grid: Grid, run_dir: Path, evaluation: Evaluation | None = None) -> Path:
    _, folder, record, _ = KINDS[generate_flags(grid, evaluation, None).get("kind", "shapes")]
    return run_dir / f"{folder}{evaluation.suffix if evaluation else ''}" / record


def refs_folder(grid: Grid, run_dir: Path, evaluation: Evaluation | None = None) -> str:
    flags = generate_flags(grid, evaluation, None)
    if flags.get("kind", "shapes") == "shapes":
        return str(samples_record(grid, run_dir, evaluation).parent / "refs")
    if "images" in flags:
        return str(flags["images"])
    from sg2img.cli import parse_settings

    return str(parse_settings(["evaluate", "coco", "--config", str(flags["config"])]).images)


def scores_path(run_dir: Path, evaluation: Evaluation | None = None) -> Path:
    return run_dir / (f"scores{evaluation.suffix}.json" if evaluation and evaluation.name else SCORES)


def score_command(grid: Grid, run_dir: Path, evaluation: Evaluation | None = None) -> list[str]:
    kind = generate_flags(grid, evaluation, None).get("kind", "shapes")
    folder, samples = KINDS[kind][1], KINDS[kind][3]
    samples = samples.replace(folder, folder + (evaluation.suffix if evaluation else ""), 1)
    metrics = (evaluation.metrics if evaluation and evaluation.metrics is not None else None) or grid.metrics
    cmd = ["evaluate", "--samples", str(run_dir / samples), "--refs", refs_folder(grid, run_dir, evaluation)]
    cmd += [
        "--metrics",
        ",".join(metrics),
        *grid.metric_flags,
        "--out",
        str(scores_path(run_dir, evaluation)),
    ]
    return sg2img(*cmd)


def log_eval_run(
    grid: Grid,
    variant: Variant,
    run_dir: Path,
    scores: dict[str, Any],
    seed: int | None = None,
    evaluation: str = DEFAULT_EVALUATION,
) -> None:
    """One W&B run per run's evaluation, in the grid's group (offline unless W&B can authenticate)."""
    import wandb

    from sg2img.train.cli import wandb_mode

    parts = [variant.slug, *([f"seed-{seed}"] if seed is not None else []), slugify(evaluation) or "eval"]
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "sg2img"),
        group=grid.name,
        job_type="eval",
        name="-".join(parts) if evaluation else "-".join(parts[:-1]) + "-eval",
        dir=str(run_dir),
        mode=wandb_mode(),
        config={
            "grid": str(grid.path),
            "variant": variant.name,
            "configs": grid.base + variant.configs,
            "seed": seed,
            "evaluation": evaluation,
        },
        reinit="finish_previous",
    )
    run.log({f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    run.finish()


def trainable_parameters(adapter: Path) -> int | None:
    """Parameters in an adapter file: what the fit trained (the adapter file holds exactly that)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter), framework="pt") as f:
            names = f.keys()
            return sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    except (OSError, SafetensorError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_one(run_: Run, results: Path, extra_fit: list[str], wandb_log: bool) -> dict:
    """Fit (unless the variant trains nothing), generate and score each evaluation; the run's record is
    written after every stage, and a record that already holds an evaluation skips it."""
    grid, variant, seed, run_dir = run_.grid, run_.variant, run_.seed, run_.dir
    record_path = run_.record_path(results)
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"variant": variant.name, "seed": seed, "configs": grid.base + variant.configs})
    record.setdefault("evaluations", {})
    evaluations = [e for e in grid.evaluations_of(variant) if e.name not in record["evaluations"]]
    if not evaluations:
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    if variant.train:
        done = run_dir / FIT_DONE
        if not done.is_file():
            cmd = fit_command(grid, variant, run_dir, extra_fit, seed)
            seconds = run(cmd, {"WANDB_RUN_GROUP": grid.name, "WANDB_JOB_TYPE": "fit"})
            info = {"fit_command": shown(cmd), "fit_seconds": round(seconds, 1)}
            done.write_text(json.dumps(info, indent=2) + "\n")
        record.update(json.loads(done.read_text()))
        record["trainable_parameters"] = trainable_parameters(run_dir / "adapter.safetensors")
    else:
        record["trainable_parameters"] = 0
    write_json(record_path, record)
    for evaluation in evaluations:
        samples = samples_record(grid, run_dir, evaluation)
        gen = generate_command(grid, run_dir, evaluation, variant)
        stage_seconds = {}  # each command's wall time, when this call ran it (a resumed stage has none)
        if not samples.is_file():
            stage_seconds["generate_wall_seconds"] = round(run(gen), 1)
        score, path = score_command(grid, run_dir, evaluation), scores_path(run_dir, evaluation)
        if not path.is_file():
            stage_seconds["score_seconds"] = round(run(score), 1)
        scores = json.loads(path.read_text())["scores"]
        if wandb_log:
            log_eval_run(grid, variant, run_dir, scores, seed, evaluation.name)
        record["evaluations"][evaluation.name] = {
            "generate_command": shown(gen),
            "score_command": shown(score),
            "generate_seconds": json.loads(samples.read_text())["generation_seconds"],
            **stage_seconds,
            "scores": scores,
        }
        write_json(record_path, record)
    return record


# --- results ------------------------------------------------------------------------------------------
def image_se(scores: dict[str, Any], metric: str) -> float:
    """A run's standard error over its images: the metric's own ``_se``, else ``_std`` / sqrt(images)."""
    if f"{metric}_se" in scores:
        return float(scores[f"{metric}_se"])
    if f"{metric}_std" in scores and scores.get("images"):
        return float(scores[f"{metric}_std"]) / math.sqrt(scores["images"])
    return 0.0


def is_metric(key: str, value: Any) -> bool:
    return isinstance(value, float) and not key.endswith(("_se", "_std"))


def aggregate(records: list[dict], evaluation: str) -> dict[str, Any]:
    """Mean over the runs (seeds) of each metric, with its standard error (see the module docstring)."""
    runs = [r["evaluations"][evaluation]["scores"] for r in records if evaluation in r.get("evaluations", {})]
    out: dict[str, Any] = {"seeds": len(runs)}
    if not runs:
        return out
    for m in [k for k, v in runs[0].items() if is_metric(k, v)]:
        values = [s[m] for s in runs if m in s]
        k = len(values)
        mean = sum(values) / k
        seed_se = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k) if k > 1 else 0.0
        pooled = math.sqrt(sum(image_se(s, m) ** 2 for s in runs if m in s)) / k
        out[m] = mean
        out[f"{m}_se"] = math.sqrt(seed_se**2 + pooled**2)
        out[f"{m}_seed_se"] = seed_se
    params = [r.get("trainable_parameters") for r in records if r.get("trainable_parameters") is not None]
    out["trainable_parameters"] = params[0] if params else None
    fits = [r["fit_seconds"] for r in records if "fit_seconds" in r]
    out["fit_seconds"] = round(sum(fits) / len(fits), 1) if fits else None
    return out


def read_records(grid: Grid, results: Path, runs: Path) -> dict[str, list[dict]]:
    """Each variant's finished run records (those with at least one evaluation), seed order."""
    out: dict[str, list[dict]] = {}
    for variant in grid.variants:
        records = []
        for seed in grid.seeds_of(variant):
            path = Run(grid, variant, seed, runs).record_path(results)
            if path.is_file() and (r := json.loads(path.read_text())).get("evaluations"):
                records.append(r)
        if records:
            out[variant.name] = records
    return out


def metric_names(aggregates: list[dict]) -> list[str]:
    names: list[str] = []
    for a in aggregates:
        names += [k for k, v in a.items() if is_metric(k, v) and k != "fit_seconds" and k not in names]
    return names


def differences(grid: Grid, table: dict[str, dict[str, dict]], metrics: list[str]) -> list[dict]:
    """Each comparison of the grid, per evaluation and metric: the difference, its error, and whether it
    exceeds twice that error."""
    out = []
    for a_name, b_name in grid.comparisons:
        a, b = grid.variant(a_name).name, grid.variant(b_name).name
        for evaluation in grid.evaluations:
            ea, eb = table.get(evaluation.name, {}).get(a), table.get(evaluation.name, {}).get(b)
            if not ea or not eb:
                continue
            for m in metrics:
                if m in ea and m in eb:
                    diff = ea[m] - eb[m]
                    se = math.sqrt(ea[f"{m}_se"] ** 2 + eb[f"{m}_se"] ** 2)
                    out.append({"a": a, "b": b, "evaluation": evaluation.name, "metric": m, "difference": diff,
                                "se": se, "exceeds": abs(diff) > 2 * se})  # fmt: skip
    return out


def fmt_params(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def write_results(grid: Grid, records: dict[str, list[dict]], out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / grid.path.stem
    table = {
        e.name: {
            v.name: aggregate(records[v.name], e.name)
            for v in grid.variants
            if v.name in records and any(e.name in r["evaluations"] for r in records[v.name])
        }
        for e in grid.evaluations
    }
    every = [a for per_eval in table.values() for a in per_eval.values()]
    metrics = metric_names(every)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "evaluation", "configs", *metrics, *[f"{m}_se" for m in metrics],
                    "images", "trainable_parameters", "fit_seconds", "generate_seconds"])  # fmt: skip
        for name, runs in records.items():
            for r in runs:
                for ename, e in r["evaluations"].items():
                    s = e["scores"]
                    w.writerow(
                        [name, "" if r.get("seed") is None else r["seed"], ename, " ".join(r["configs"])]
                        + [f"{s[m]:.4f}" if m in s else "" for m in metrics]
                        + [f"{image_se(s, m):.4f}" if m in s else "" for m in metrics]
                        + [
                            s.get("images", ""),
                            r.get("trainable_parameters", ""),
                            r.get("fit_seconds", ""),
                            e.get("generate_seconds", ""),
                        ]
                    )
    shown_grid = (
        grid.path.relative_to(ROOT)
        if grid.path.is_absolute() and grid.path.is_relative_to(ROOT)
        else grid.path
    )
    lines = [
        f"# Ablation grid `{grid.name}`",
        "",
        f"Made by `{command}` from `{shown_grid}`.",
        f"Base: {', '.join(f'`{c}`' for c in grid.base) or '(none)'}.",
        "",
        "Mean over the training seeds ± standard error (seed spread and image errors in quadrature; "
        "`experiments/ablate.py`'s docstring).",
        "",
        grid_time(records),
    ]
    for e in grid.evaluations:
        rows = table[e.name]
        if not rows:
            continue
        cols = [m for m in metrics if any(m in a for a in rows.values())]
        flags = generate_flags(grid, e, None)
        lines += ["", f"## Evaluation `{e.name}`", ""] if e.name else [""]
        lines += [f"Generation: {', '.join(f'{k} {v}' for k, v in flags.items())}.", ""]
        lines += ["| variant | delta | seeds | trainable | " + " | ".join(m.replace("_", " ") for m in cols) + " | fit (s) |",
                  "|---|---|---|---|" + "---|" * len(cols) + "---|"]  # fmt: skip
        for v in grid.variants:
            if v.name not in rows:
                continue
            a = rows[v.name]
            delta = ", ".join(f"`{Path(c).stem}`" for c in v.configs) or "(base)"
            if not v.train:
                delta = (
                    f"no adapter; {', '.join(f'{k} {x}' for k, x in v.generate.items()) or 'the base alone'}"
                )
            cells = [f"{a[m]:.3f} ± {a[f'{m}_se']:.3f}" if m in a else "" for m in cols]
            lines.append(f"| {v.name} | {delta} | {a['seeds']} | {fmt_params(a['trainable_parameters'])} | "
                         + " | ".join(cells) + f" | {a['fit_seconds'] if a['fit_seconds'] is not None else ''} |")  # fmt: skip
    diffs = differences(grid, table, grid.plot or metrics)
    if diffs:
        lines += ["", "## Differences", "", "A − B, ± the error of the difference; **exceeds** when |A − B| > 2 × error.", "",
                  "| A | B | evaluation | metric | A − B | exceeds its error |", "|---|---|---|---|---|---|"]  # fmt: skip
        for d in diffs:
            verdict = "**exceeds**" if d["exceeds"] else "no"
            lines.append(f"| {d['a']} | {d['b']} | {d['evaluation'] or '–'} | {d['metric'].replace('_', ' ')} | "
                         f"{d['difference']:+.3f} ± {d['se']:.3f} | {verdict} |")  # fmt: skip
    lines += ["", "Commands per run:", ""]
    for name, runs in records.items():
        for r in runs:
            lines.append(f"- {name}" + ("" if r.get("seed") is None else f", seed {r['seed']}") + ":")
            lines += [f"  - `{r['fit_command']}`"] if r.get("fit_command") else []
            for e in r["evaluations"].values():
                lines += [f"  - `{e['generate_command']}`", f"  - `{e['score_command']}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    paths = {"csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md")}
    plot = [m for m in (grid.plot or metrics) if m in metrics]
    if plot:
        paths["png"] = bar_plot(grid, table, plot, stem.with_suffix(".png"))
    return paths


def grid_time(records: dict[str, list[dict]]) -> str:
    """The grid's wall time: the sum of every stage's command (fit, generation, scoring) over its runs, so
    a grid that stopped and resumed is timed by what it ran, not by the calendar."""
    runs = [r for rs in records.values() for r in rs]
    fits = sum(r.get("fit_seconds", 0.0) for r in runs)
    evals = [e for r in runs for e in r.get("evaluations", {}).values()]
    gen = sum(e.get("generate_wall_seconds", 0.0) for e in evals)
    score = sum(e.get("score_seconds", 0.0) for e in evals)
    untimed = sum("generate_wall_seconds" not in e or "score_seconds" not in e for e in evals)
    line = (
        f"Wall time, summed over the stages' commands: fits {fits:.0f} s, generation {gen:.0f} s, scoring "
        f"{score:.0f} s; {(fits + gen + score) / 3600:.2f} h in all"
    )
    return line + (f" ({untimed} evaluations ran before their commands were timed)." if untimed else ".")


def bar_plot(grid: Grid, table: dict[str, dict[str, dict]], metrics: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e, table[e]) for e in table if table[e]]
    most = max(len(rows) for _, rows in panels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(1.6 + 1.4 * len(metrics) * max(1, most / 3), 3.6 * len(panels)),
        squeeze=False,
    )
    for ax, (ename, rows) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / len(rows)
        for i, (name, a) in enumerate(rows.items()):
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, [a.get(m, 0.0) for m in metrics], width,
                          yerr=[a.get(f"{m}_se", 0.0) for m in metrics], capsize=2, label=name)  # fmt: skip
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics])
        ax.set_ylim(0, max(1.0, max(a.get(m, 0.0) for a in rows.values() for m in metrics) * 1.15))
        ax.set_title(f"ablation grid: {grid.name}" + (f" — {ename}" if ename else ""))
        ax.legend(fontsize=7, loc="upper right")
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
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=None, metavar="SEED", help="run these training seeds only"
    )
    ap.add_argument("--table", action="store_true", help="only write the results of finished runs")
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
    # seed by seed: every variant's first run before any variant's second
    order = [
        Run(grid, v, s, runs)
        for v in chosen
        for s in grid.seeds_of(v)
        if args.seeds is None or s is None or s in args.seeds
    ]
    rank = {id(r): (grid.seeds_of(r.variant).index(r.seed), i) for i, r in enumerate(order)}
    failed: list[str] = []
    if not args.table:
        for run_ in sorted(order, key=lambda r: rank[id(r)]):
            try:  # a failed run does not stop the grid; running the command again resumes it
                run_one(run_, args.results, args.fit_flag, not args.no_wandb)
            except subprocess.CalledProcessError as e:
                print(
                    f"ablate: variant {run_.variant.name!r} ({run_.label}) failed: {shown(e.cmd)} (exit {e.returncode})"
                )
                failed.append(run_.label)
    records = read_records(grid, args.results, runs)
    if not records:
        print(f"ablate: no finished run yet (failed: {failed})", file=sys.stderr)
        return 1
    command = shlex.join(["python", "experiments/ablate.py", "--grid", str(args.grid)])
    paths = write_results(grid, records, args.results, command)
    print("\n" + paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if failed:
        print(
            f"ablate: {len(failed)} run(s) failed: {failed}; run the same command to resume", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
