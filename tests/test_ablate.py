"""experiments/ablate.py: grid files, the stages and their resumption, the results, W&B grouping."""

import csv
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules["ablate"] = ablate
spec.loader.exec_module(ablate)

DELTA = "configs/experiments/ablations/injection_concat.yaml"


def write_grid(path: Path, **overrides) -> Path:
    grid = {
        "name": "test-grid",
        "base": ["configs/experiments/shapes/graph_decoupled.yaml"],
        "generate": {"kind": "shapes", "n": 2, "steps": 2},
        "metrics": ["shapes"],
        "plot": ["relation_accuracy"],
        "variants": [{"name": "reference", "configs": []}, {"name": "Concat injection", "configs": [DELTA]}],
        **overrides,
    }
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


@pytest.mark.parametrize(
    "grid", sorted((ROOT / "experiments" / "grids").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_grid_loads(grid):
    g = ablate.load_grid(grid)
    assert g.variants and len({v.slug for v in g.variants}) == len(g.variants)


def test_every_ablation_delta_changes_one_model_setting():
    import yaml

    def leaves(d: dict, prefix: str = "") -> list[str]:
        return [
            k
            for key, v in d.items()
            for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
        ]

    paths = sorted((ROOT / "configs" / "experiments" / "ablations").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        data = yaml.safe_load(path.read_text())
        assert list(data) == ["model"], path.name
        assert len(leaves(data["model"])) == 1, (path.name, leaves(data["model"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"variants": []}, "variants must be a non-empty list"),
        ({"variants": [{"configs": []}]}, r"variants\[0\] needs a name"),
        (
            {"variants": [{"name": "a", "config": []}]},
            r"variants\[0\] \(a\): unknown field\(s\) \['config'\]",
        ),
        ({"variants": [{"name": "A b"}, {"name": "a-b"}]}, r"repeated: \['a-b'\]"),
        ({"variants": [{"name": "a", "configs": ["nope.yaml"]}]}, r"variants \(a\): config file nope.yaml"),
        ({"base": "configs/base.yaml"}, "base must be a list of strings"),
        ({"generate": {"kind": "cifar"}}, "generate.kind must be one of"),
        ({"extra": 1}, r"unknown field\(s\) \['extra'\]"),
        ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct seeds"),
        ({"seeds": [-1]}, "seeds must be a non-empty list of distinct seeds"),
        ({"variants": [{"name": "a", "seeds": "0"}]}, r"variants\[0\] \(a\).seeds must be"),
        ({"variants": [{"name": "a", "train": "no"}]}, r"variants\[0\] \(a\).train must be true or false"),
        ({"evaluations": {"x": {"prompt": "none"}}}, r"evaluations.x: unknown field\(s\) \['prompt'\]"),
        (
            {"evaluations": {"x": {}}, "variants": [{"name": "a", "evaluations": ["y"]}]},
            r"variants\[0\] \(a\): no evaluation named \['y'\]; the grid has \['x'\]",
        ),
        ({"comparisons": [["reference", "nope"]]}, r"comparisons\[0\] must name two variants"),
    ],
)
def test_bad_grids_name_the_file_and_field(tmp_path, overrides, message):
    path = write_grid(tmp_path / "g.yaml", **overrides)
    with pytest.raises(ablate.GridError, match=message) as e:
        ablate.load_grid(path)
    assert str(path) in str(e.value)


class FakeStages:
    """Stands in for the subprocesses: writes what each stage would write, and records the commands."""

    def __init__(self, fail_on: str | None = None):
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, env=None):
        self.commands.append(cmd)
        args = cmd[3:]
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if self.fail_on and any(self.fail_on in a for a in args):
            raise subprocess.CalledProcessError(1, cmd)
        if args[0] == "fit":
            import torch
            from safetensors.torch import save_file

            root = Path(args[args.index("--trainer.default_root_dir") + 1])
            assert env == {"WANDB_RUN_GROUP": "test-grid", "WANDB_JOB_TYPE": "fit"}
            save_file(
                {"a": torch.zeros(3, 2), "b": torch.zeros(4)}, root / "adapter.safetensors"
            )  # 10 params
        elif args[:2] == ["evaluate", "shapes"]:
            out.mkdir(parents=True)
            (out / "shapes-eval.json").write_text(json.dumps({"generation_seconds": 1.5}))
        else:
            concat = "concat" in str(out)
            seed = int(re.search(r"seed-(\d)", str(out)).group(1)) if "seed-" in str(out) else 0
            scores = {"images": 2, "object_recall": 0.5, "relation_accuracy": (0.25 if concat else 0.75) + 0.1 * seed,
                      "relation_accuracy_se": 0.03}  # fmt: skip
            out.write_text(json.dumps({"scores": scores}))
        return 2.0


def test_a_grid_runs_every_stage_once_and_resumes(tmp_path, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml")
    fake = FakeStages()
    monkeypatch.setattr(ablate, "run", fake)
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--grid", str(grid), "--runs", str(runs), "--results", str(results), "--no-wandb"]
    assert ablate.main(common) == 0
    kinds = [c[3] for c in fake.commands]
    assert kinds == ["fit", "evaluate", "evaluate"] * 2
    fit = fake.commands[3]
    assert fit[fit.index("--config", 4) + 1 :].count(DELTA) == 1 and "--ckpt_path" not in fit
    assert (runs / "concat-injection" / "scores.json").is_file()
    with open(results / "g.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["relation_accuracy"], r["trainable_parameters"]) for r in rows] == [
        ("reference", "0.7500", "10"),
        ("Concat injection", "0.2500", "10"),
    ]
    md = (results / "g.md").read_text()
    assert (
        "| reference | (base) | 1 | 10 | 0.500 ± 0.000 | 0.750 ± 0.030 | 2.0 |" in md
        and "`injection_concat`" in md
    )
    assert (results / "g.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((results / "g" / "concat-injection.json").read_text())
    assert record["evaluations"][""]["scores"]["relation_accuracy"] == 0.25 and record["fit_seconds"] == 2.0
    # again, even on a machine without the runs (only the committed records): nothing to run, same results
    shutil.rmtree(runs)
    fake.commands.clear()
    assert ablate.main(common) == 0
    assert fake.commands == []
    assert (
        "| Concat injection | `injection_concat` | 1 | 10 | 0.500 ± 0.000 | 0.250 ± 0.030 |"
        in (results / "g.md").read_text()
    )


def test_seeds_evaluations_and_an_untrained_variant(tmp_path, monkeypatch):
    """Runs go seed by seed; each seed reaches the fit; each evaluation has its own folder, flags and
    metrics; a variant that trains nothing is evaluated with --adapter none; the table averages the seeds
    and says which compared differences exceed their error."""
    grid = write_grid(
        tmp_path / "g.yaml",
        seeds=[0, 1],
        evaluations={"text": {"generate": {"prompt": "objects"}}, "bare": {"generate": {"prompt": "none"}, "metrics": ["shapes"]}},
        comparisons=[["Concat injection", "reference"]],
        variants=[
            {"name": "reference", "configs": [], "seeds": [0, 1, 2]},
            {"name": "Concat injection", "configs": [DELTA], "evaluations": ["text"]},
            {"name": "base alone", "train": False, "generate": {"prompt": "relations"}, "evaluations": ["text"]},
        ],
    )  # fmt: skip
    fake = FakeStages()
    monkeypatch.setattr(ablate, "run", fake)
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--grid", str(grid), "--runs", str(runs), "--results", str(results), "--no-wandb"]
    # --seeds picks the training seeds to run now; the rest of the grid waits for the next command
    assert ablate.main([*common, "--seeds", "2"]) == 0
    fits = [c[3:] for c in fake.commands if c[3] == "fit"]
    assert [f[f.index("--trainer.default_root_dir") + 1] for f in fits] == [
        str(runs / "reference" / "seed-2")
    ]
    assert ablate.main(common) == 0
    fits = [c[3:] for c in fake.commands if c[3] == "fit"]
    seeds = [
        (f[f.index("--trainer.default_root_dir") + 1], f[f.index("--seed_everything") + 1]) for f in fits
    ]
    assert seeds == [
        (str(runs / "reference" / "seed-2"), "2"),
        (str(runs / "reference" / "seed-0"), "0"),
        (str(runs / "concat-injection" / "seed-0"), "0"),
        (str(runs / "reference" / "seed-1"), "1"),
        (str(runs / "concat-injection" / "seed-1"), "1"),
    ]
    assert all(f[f.index("--model.seed") + 1] == f[f.index("--seed_everything") + 1] for f in fits)
    gens = [c[3:] for c in fake.commands if c[3:5] == ["evaluate", "shapes"]]
    bare = [g for g in gens if g[g.index("--out") + 1].endswith("samples-bare")]
    assert len(bare) == 3 and all(g[g.index("--prompt") + 1] == "none" for g in bare)
    base = [g for g in gens if "base-alone" in g[g.index("--out") + 1]]
    assert len(base) == 1 and base[0][base[0].index("--adapter") + 1] == "none"
    assert base[0][base[0].index("--prompt") + 1] == "relations"
    scores = [c[3:] for c in fake.commands if c[3] == "evaluate" and c[4] == "--samples"]
    assert {s[s.index("--metrics") + 1] for s in scores if "scores-bare" in s[-1]} == {"shapes"}
    md = (results / "g.md").read_text()
    # reference: 0.75, 0.85, 0.95 -> mean 0.85, seed se 0.1/sqrt(3), image se sqrt(3 * 0.03^2) / 3
    se = ((0.1 / 3**0.5) ** 2 + (3 * 0.03**2) / 9) ** 0.5
    assert f"| reference | (base) | 3 | 10 | 0.500 ± 0.000 | 0.850 ± {se:.3f} |" in md
    assert "| base alone | no adapter; prompt relations | 1 | 0 |" in md
    assert (
        "| Concat injection | reference | text | relation accuracy | -0.550 ±" in md and "**exceeds**" in md
    )
    assert json.loads((results / "g" / "reference" / "seed-2.json").read_text())["seed"] == 2


def test_a_stopped_fit_resumes_from_its_last_checkpoint_and_a_failure_does_not_stop_the_grid(
    tmp_path, monkeypatch, capsys
):
    grid = write_grid(tmp_path / "g.yaml")
    runs, results = tmp_path / "runs", tmp_path / "results"
    (runs / "reference" / "checkpoints").mkdir(parents=True)
    (runs / "reference" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    fake = FakeStages(fail_on="concat-injection")
    monkeypatch.setattr(ablate, "run", fake)
    common = ["--grid", str(grid), "--runs", str(runs), "--results", str(results), "--no-wandb"]
    assert ablate.main(common) == 1  # the concat variant failed ...
    fit = fake.commands[0]
    assert fit[fit.index("--ckpt_path") + 1] == str(runs / "reference" / "checkpoints" / "last.ckpt")
    assert "variant 'Concat injection' (concat-injection) failed" in capsys.readouterr().out
    assert "| reference |" in (results / "g.md").read_text()  # ... the finished one is in the table
    fake.fail_on = None
    fake.commands.clear()
    assert ablate.main(common) == 0  # the same command finishes the grid
    assert [c[3] for c in fake.commands] == ["fit", "evaluate", "evaluate"]


def test_evaluations_are_logged_to_wandb_in_the_grids_group(tmp_path, monkeypatch):
    from sg2img.train.wandb_runs import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    grid = ablate.load_grid(write_grid(tmp_path / "g.yaml"))
    ablate.log_eval_run(grid, grid.variants[1], tmp_path, {"images": 2, "relation_accuracy": 0.25})
    (run,) = sorted(tmp_path.glob("wandb/offline-run-*"))
    logged = read_offline_run(run)
    run_info = {k: logged["run"][k] for k in ("name", "group", "job_type")}
    assert run_info == {"name": "concat-injection-eval", "group": "test-grid", "job_type": "eval"}
    assert logged["history"][0]["eval/relation_accuracy"] == 0.25
    assert logged["config"]["variant"] == "Concat injection"
    ablate.log_eval_run(
        grid, grid.variants[1], tmp_path / "s", {"images": 2}, seed=1, evaluation="image only"
    )
    (run,) = sorted((tmp_path / "s").glob("wandb/offline-run-*"))
    assert read_offline_run(run)["run"]["name"] == "concat-injection-seed-1-image-only"


def test_the_grids_time_is_the_sum_of_its_stages_and_says_what_was_not_timed():
    timed = {"generate_wall_seconds": 30.0, "score_seconds": 6.0}
    records = {
        "a": [{"fit_seconds": 600.0, "evaluations": {"x": timed, "y": timed}}],
        "b": [{"fit_seconds": 1200.0, "evaluations": {"x": {"generate_seconds": 20.0}}}],  # an older record
        "base": [{"evaluations": {"x": timed}}],
    }
    line = ablate.grid_time(records)
    assert "fits 1800 s, generation 90 s, scoring 18 s; 0.53 h in all" in line
    assert "(1 evaluations ran before their commands were timed)" in line


@pytest.mark.slow
def test_a_tiny_grid_end_to_end(tmp_path):
    """Fit 2 steps, generate 2 images and score, for two variants, through the real subprocesses."""
    grid = write_grid(
        tmp_path / "g.yaml",
        fit_flags=["--trainer.max_steps", "2", "--data.batch_size", "2", "--trainer.val_check_interval", "2",
                   "--data.val.init_args.num_rows", "2", "--trainer.callbacks", "[]"],
    )  # fmt: skip
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["--grid", str(grid), "--runs", str(runs), "--results", str(results), "--no-wandb"]
    assert ablate.main(args) == 0
    for v in ("reference", "concat-injection"):
        assert (runs / v / "adapter.safetensors").is_file() and (runs / v / "scores.json").is_file()
    assert len((results / "g.csv").read_text().splitlines()) == 3
    timed = [json.loads(p.read_text()) for p in results.rglob("*.json")]
    evaluations = [e for r in timed for e in r.get("evaluations", {}).values()]
    assert evaluations and all(e["generate_wall_seconds"] > 0 and e["score_seconds"] > 0 for e in evaluations)
    assert "Wall time, summed over the stages' commands: fits" in (results / "g.md").read_text()


def test_a_coco_grid_generates_with_the_protocol_and_scores_against_its_images(tmp_path):
    grid = ablate.load_grid(ROOT / "experiments" / "grids" / "sd15_image_adapter.yaml")
    run = tmp_path / "patch-tokens"
    gen = ablate.generate_command(grid, run)[3:]
    assert gen[:4] == ["evaluate", "coco", "--config", "configs/eval/ip_adapter_coco2017.yaml"]
    assert gen[gen.index("--adapter") + 1] == str(run / "adapter.safetensors")
    assert gen[gen.index("--n") + 1] == "500" and gen[-2:] == ["--out", str(run / "coco")]
    score = ablate.score_command(grid, run)[3:]
    assert score[score.index("--samples") + 1] == str(run / "coco" / "samples")
    assert score[score.index("--refs") + 1] == "data/coco/val2017"  # the protocol's images
    assert ablate.samples_record(grid, run) == run / "coco" / "coco-eval.json"
    with pytest.raises(ablate.GridError, match="needs images or a protocol config"):
        ablate.load_grid(write_grid(tmp_path / "g.yaml", generate={"kind": "coco"}))


def test_a_switch_in_the_grids_generate_settings_is_a_bare_flag(tmp_path):
    grid = ablate.load_grid(
        write_grid(tmp_path / "g.yaml", generate={"channels_last": True, "compile": False})
    )
    cmd = ablate.generate_command(grid, tmp_path / "reference")
    assert "--channels-last" in cmd and cmd[cmd.index("--channels-last") + 1].startswith("--")
    assert "--compile" not in cmd and "True" not in cmd and "False" not in cmd


def test_generation_uses_the_base_the_variant_was_fitted_on(tmp_path):
    grid = ablate.load_grid(write_grid(tmp_path / "g.yaml"))
    run = tmp_path / "reference"
    run.mkdir()
    assert "--model" not in ablate.generate_command(grid, run)  # not fitted yet: nothing to say
    (run / "config.yaml").write_text(
        "model:\n  base:\n    source: runs/shapes/base/base.safetensors\n    image_encoder: null\n"
    )
    cmd = ablate.generate_command(grid, run)
    assert cmd[cmd.index("--model") + 1] == "runs/shapes/base/base.safetensors"
    # a run fitted before the settings were grouped names its base in the flat layout
    (run / "config.yaml").write_text("model:\n  base: embedded\n  image_encoder: null\n")
    assert ablate.generate_command(grid, run)[cmd.index("--model") + 1] == "embedded"
    grid.generate["model"] = "embedded"  # the grid's own choice wins
    cmd = ablate.generate_command(grid, run)
    assert cmd.count("--model") == 1 and cmd[cmd.index("--model") + 1] == "embedded"
