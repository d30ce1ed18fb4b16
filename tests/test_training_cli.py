"""`sg2img fit` end to end on the tiny preset: run files, W&B offline records, configs, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datafiles import write_manifest

from sg2img.base.components import build_components
from sg2img.cli import main
from sg2img.model.adapter import SceneGraphAdapter
from sg2img.train.cli import BaseModelCLI, ClipCLI, SG2ImgCLI, wandb_offline
from sg2img.train.wandb_runs import offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parent.parent
# training configs; configs/eval/ holds evaluation protocols (tests/test_metrics.py reads those)
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if "eval" not in p.relative_to(ROOT / "configs").parts
)
BASE = [str(ROOT / "configs" / "base.yaml"), str(ROOT / "configs" / "model" / "tiny.yaml")]


def data_config(tmp_path: Path, bad_rows: bool = False) -> Path:
    manifest = write_manifest(tmp_path / "data", n=6, bad_rows=bad_rows)
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "train": {
                        "class_path": "sg2img.data.JsonlManifest",
                        "init_args": {"manifest": str(manifest)},
                    }
                }
            }
        )
    )
    return cfg


def fit_args(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", *(a for c in [*BASE, str(data_config(tmp_path, bad_rows=True))] for a in ("--config", c)),
            "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def test_fit_leaves_config_adapter_checkpoint_and_wandb_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "run"
    args = fit_args(tmp_path, root, "--trainer.max_steps", "4",
                    "--trainer.callbacks+=sg2img.train.callbacks.SampleGrid", "--trainer.callbacks.every_n_steps", "2",
                    "--trainer.callbacks.steps", "2", "--trainer.callbacks.panel", "64",
                    "--trainer.callbacks+=sg2img.train.callbacks.SamplesPerSecond", "--trainer.callbacks.window_size", "2")  # fmt: skip
    assert main(args) == 0

    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["model"]["base"]["source"] == "tiny" and config["trainer"]["precision"] == "32-true"
    assert config["trainer"]["logger"]["class_path"] == "sg2img.train.callbacks.RunLogger"

    adapter = SceneGraphAdapter.from_file(root / "adapter.safetensors", build_components("tiny").unet)
    assert adapter.config.graph_branch and adapter.config.gnn.num_layers == 2

    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(k.startswith("model.adapter.") for k in ckpt["state_dict"])
    hparams = ckpt["hyper_parameters"]  # the grouped settings, as plain values (weights_only loads them)
    assert hparams["graph"]["gnn"]["num_layers"] == 2 and hparams["image"]["tokens"] == "cls"

    (run,) = offline_runs(root)
    logged = read_offline_run(run)
    keys = set().union(*logged["history"])
    for key in (
        "train/loss",
        "train/grad_norm",
        "lr-AdamW/image",
        "lr-AdamW/graph",
        "train/device/samples_per_sec",
        "train/skipped_rows",
    ):
        assert key in keys, key
    losses = [row["train/loss"] for row in logged["history"] if "train/loss" in row]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    assert max(row.get("train/skipped_rows", 0) for row in logged["history"]) == 3
    images = [row for row in logged["history"] if "samples/filenames" in row]
    assert [row["trainer/global_step"] for row in images] == [2, 4]
    assert all((run / "files" / f).is_file() for row in images for f in row["samples/filenames"])
    model_config = logged["config"]["model"]
    # the resolved config, in the run
    assert model_config.get("value", model_config)["base"]["source"] == "tiny"
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert "skipped rows: 3" in caplog.text and "not valid JSON" in caplog.text  # the end-of-run summary


def test_each_fit_in_one_process_uses_the_wandb_mode_set_when_it_starts(tmp_path, monkeypatch):
    # wandb reads WANDB_MODE once per process: without the mode passed to every run, a disabled fit would
    # leave the next fit of the same process (a test worker, a notebook, a sweep) without its offline run
    for i, (mode, writes_run) in enumerate((("disabled", False), ("offline", True), ("disabled", False))):
        monkeypatch.setenv("WANDB_MODE", mode)
        root = tmp_path / f"{i}-{mode}"
        assert main(fit_args(tmp_path, root, "--trainer.max_steps", "1")) == 0
        assert len(offline_runs(root)) == int(writes_run), mode


def test_cache_command_then_fit_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = data_config(tmp_path)
    configs = [a for c in [*BASE, str(data)] for a in ("--config", c)]
    assert main(["cache", *configs, "--out", str(tmp_path / "cache"), "--dtype", "float32"]) == 0
    cached = tmp_path / "cached.yaml"
    cached.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "train": {
                        "class_path": "sg2img.data.CachedRows",
                        "init_args": {"root": str(tmp_path / "cache")},
                    }
                }
            }
        )
    )
    root = tmp_path / "run"
    assert main(["fit", *[a for c in [*BASE, str(cached)] for a in ("--config", c)], "--trainer.max_steps", "2",
                 "--trainer.default_root_dir", str(root)]) == 0  # fmt: skip
    assert (root / "adapter.safetensors").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses(path, tmp_path):
    text = path.read_text()
    base_model = "sg2img fit-base" in text  # a base-model config: fit-base, composed alone
    clip_model = "sg2img fit-clip" in text  # the tiny CLIP's config: fit-clip, composed alone
    args = [] if base_model or clip_model else ["--config", str(ROOT / "configs" / "base.yaml")]
    args += ["--config", str(path), "--trainer.default_root_dir", str(tmp_path)]
    needs_hardware = "strategy" in path.parts  # FSDP/DeepSpeed need GPUs or the optional extra
    cli_class = BaseModelCLI if base_model else ClipCLI if clip_model else SG2ImgCLI
    cli = cli_class(args=args, run=False, instantiate=not needs_hardware)
    assert cli.config.trainer.default_root_dir == str(tmp_path)
    if not needs_hardware:
        model = (
            cli.model.preset_name if base_model else cli.model.config if clip_model else cli.model.model.base
        )
        assert model and cli.datamodule.batch_size > 0


def test_fsdp_config_builds_its_strategy_model_and_data_and_lightning_refuses_it_without_a_gpu(tmp_path):
    """Everything the FSDP config names is built here; only Lightning's Trainer needs a GPU for FSDP."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    args = ["--config", str(ROOT / "configs" / "base.yaml"), "--config", str(ROOT / "configs" / "model" / "tiny.yaml"),
            "--config", str(ROOT / "configs" / "strategy" / "fsdp.yaml"), "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = SG2ImgCLI(args=args, run=False, instantiate=False)
    built = cli.parser.instantiate_classes(cli.config)
    strategy = built.trainer.strategy
    assert isinstance(strategy, FSDPStrategy)
    assert (
        strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    )  # gradients and optimizer state sharded
    built.model.configure_model()
    assert sum(p.numel() for p in built.model.parameters() if p.requires_grad) > 0
    assert built.data.batch_size > 0
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)


def test_deepspeed_config_builds_its_model_and_data_and_names_zero_stage_2(tmp_path):
    from lightning.pytorch.strategies import StrategyRegistry

    args = ["--config", str(ROOT / "configs" / "base.yaml"), "--config", str(ROOT / "configs" / "model" / "tiny.yaml"),
            "--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero2.yaml"),
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = SG2ImgCLI(args=args, run=False, instantiate=False)
    built = cli.parser.instantiate_classes(cli.config)
    assert built.trainer.strategy == "deepspeed_stage_2"
    assert StrategyRegistry["deepspeed_stage_2"]["init_params"]["stage"] == 2
    built.model.configure_model()
    assert sum(p.numel() for p in built.model.parameters() if p.requires_grad) > 0
    assert built.data.batch_size > 0
    pytest.importorskip(
        "deepspeed",
        reason="DeepSpeed is the optional extra sg2img[deepspeed], not installed here: its engine is not built",
    )
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = Trainer(strategy=built.trainer.strategy, accelerator="cpu", devices=1, logger=False)
    assert (
        isinstance(trainer.strategy, DeepSpeedStrategy)
        and trainer.strategy.config["zero_optimization"]["stage"] == 2
    )


def test_wandb_mode_is_honoured(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("HOME", "/nonexistent")
    assert wandb_offline()


def test_ddp_fit_with_two_cpu_processes(tmp_path):
    """Lightning's DDP launcher re-runs the command for rank 1; gloo on CPU."""
    root = tmp_path / "ddp"
    args = fit_args(tmp_path, root, "--config", str(ROOT / "configs" / "strategy" / "ddp.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "2")  # fmt: skip
    exe = Path(sys.executable).parent / "sg2img"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert (root / "adapter.safetensors").is_file()


def test_validate_reports_val_loss(tmp_path, capsys):
    data = data_config(tmp_path)
    spec = yaml.safe_load(data.read_text())["data"]["train"]
    val = tmp_path / "val.yaml"
    val.write_text(yaml.safe_dump({"data": {"val": spec}}))
    args = ["validate", *(a for c in [*BASE, str(val)] for a in ("--config", c)),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    # Lightning's table row: the metric and its value, a finite positive loss
    import re

    row = re.search(r"val/loss\W+([0-9.]+(?:e-?\d+)?)", out)
    assert row is not None, out
    assert 0 < float(row.group(1)) < 10


def test_a_resumed_fit_continues_its_wandb_run_and_validate_logs_a_run_of_its_own(
    tmp_path, monkeypatch, capfd, caplog
):
    """One W&B run across resumes (same id, resume="allow"), the final adapter as a model artifact with its
    config, validate in a run of its own job type that leaves the fit's config.yaml alone, and none of the
    notices a user cannot act on."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "run"
    assert main(fit_args(tmp_path, root, "--trainer.max_steps", "2")) == 0
    run_id = (root / "wandb-run-id").read_text().strip()
    assert main(fit_args(tmp_path, root, "--trainer.max_steps", "4", "--ckpt_path", "last")) == 0
    config = (root / "config.yaml").read_text()
    assert main(["validate", *fit_args(tmp_path, root)[1:], "--ckpt_path", "last"]) == 0
    first, resumed, validate = (read_offline_run(r) for r in offline_runs(root))
    assert first["run"]["id"] == resumed["run"]["id"] == run_id and validate["run"]["id"] != run_id
    assert [r["run"]["job_type"] for r in (first, resumed, validate)] == ["fit", "fit", "validate"]
    (artifact,) = resumed["artifacts"]
    assert artifact["name"] == f"adapter-{run_id}" and artifact["type"] == "model"
    assert artifact["files"] == ["adapter.safetensors", "config.yaml"] and "step-4" in artifact["aliases"]
    assert (root / "config.yaml").read_text() == config and (root / "config-validate.yaml").is_file()
    # the run folder is an adapter folder, as save_pretrained writes it
    card = json.loads((root / "config.json").read_text())
    assert card["base"] == "tiny" and card["steps"] == 4 and card["sg"]["graph_branch"]
    assert "- **Base it expects**: `tiny`" in (root / "README.md").read_text()
    assert SceneGraphAdapter.from_pretrained(root, build_components("tiny").unet).config.graph_branch
    # a fit started again without --ckpt_path is a new run
    assert main(fit_args(tmp_path, root, "--trainer.max_steps", "1")) == 0
    assert read_offline_run(offline_runs(root)[-1])["run"]["id"] != run_id
    out = capfd.readouterr()
    shown = out.out + out.err + caplog.text
    for noise in ("💡 Tip", "anonymous setting", "git root", "Total FLOPs", "Trainer already configured"):
        assert noise not in shown, noise
    assert "trainable params" in shown  # the parameter summary itself stays


def test_a_ten_step_smoke_fit_on_the_tiny_preset_shows_its_loss_speed_and_a_grid_of_its_own_rows(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "smoke"
    assert main(fit_args(tmp_path, root, "--trainer.max_steps", "10")) == 0
    logged = read_offline_run(offline_runs(root)[0])
    keys = set().union(*logged["history"])
    assert {"train/loss", "train/device/samples_per_sec", "samples/filenames"} <= keys, sorted(keys)
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["step-0000010.png"]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    # the grid draws the run's own rows (their captions), and W&B gets them as a table too
    table = [row for row in logged["history"] if "samples_table/path" in row]
    assert len(table) == 1 and any(p.startswith("media/table/samples_table") for p in logged["media"])
    from sg2img.train.callbacks import SampleGrid

    grid = SampleGrid()
    graphs, prompts = grid.rows_of_the_run(None)
    assert (
        graphs == [] and prompts == []
    )  # no trainer: no rows of a run (the example graphs are the fallback)


@pytest.mark.parametrize("logger", ["false", "true"])
def test_a_run_without_a_logger_leaves_out_the_callbacks_that_only_log(logger, tmp_path):
    from sg2img.train.cli import BaseModelCLI

    args = ["--config", str(ROOT / "configs" / "experiments" / "shapes" / "base.yaml"), "--trainer.logger", logger,
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = BaseModelCLI(args=args, run=False, instantiate=False)
    names = [c.class_path.rsplit(".", 1)[-1] for c in cli.config.trainer.callbacks]
    assert "ModelCheckpoint" in names and "SampleGrid" in names
    assert ("LearningRateMonitor" in names) == (logger == "true")  # Lightning refuses it with no logger
