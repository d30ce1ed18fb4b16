"""Runs killed with SIGKILL: atomic writes, the clean-up of what a killed writer left, and a resumed fit
that ends with the adapter an uninterrupted run ends with."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datafiles import tiny_fit_args, write_manifest
from safetensors.torch import load_file

from ip_adapter.atomic_files import PARTIAL_WRITE, atomic_write, remove_partial_writes
from sg2img.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from ip_adapter.atomic_files import atomic_write

def half_then_die(tmp):
    with open(tmp, "wb") as f:
        f.write(b"new" * 1000)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(Path(sys.argv[1]), half_then_die)
"""


def test_a_writer_killed_midway_leaves_the_old_file_and_its_leftover_is_removed(tmp_path):
    target = tmp_path / "adapter.safetensors"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"old"))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"  # nobody ever sees the half-written file under the real name
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert PARTIAL_WRITE.match(leftover.name)["name"] == "adapter.safetensors"
    assert leftover.stat().st_size == 3000
    # a temporary file of a live writer (this process) is kept
    live = tmp_path / f".last.ckpt.{leftover.name.split('.')[-3].rsplit('-', 1)[0]}-{os.getpid()}.abc.tmp"
    live.write_bytes(b"in progress")
    assert remove_partial_writes(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


def fit_config(tmp_path: Path, workers: int = 0) -> list[str]:
    """The tiny preset on 8 good and 3 planted bad rows, batch 2 (6 batches an epoch), 10 steps, a
    checkpoint at every step."""
    manifest = write_manifest(tmp_path / "data", n=8, bad_rows=True)
    return tiny_fit_args(
        tmp_path / "run.yaml", manifest, batch_size=2, workers=workers, checkpoint_every=1, max_steps=10,
        logger=False,
    )  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path.name} was written")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path.name} not written in {timeout} s")
        time.sleep(0.01)


def test_a_fit_killed_with_sigkill_resumes_to_the_adapter_of_an_uninterrupted_run(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = fit_config(tmp_path, workers=2)  # loader workers: their position is in the checkpoint too
    straight = tmp_path / "straight"
    assert main([*args, "--trainer.default_root_dir", str(straight)]) == 0
    assert "skipped rows: 3" in caplog.text

    killed = tmp_path / "killed"
    run = [sys.executable, "-m", "sg2img", *args, "--trainer.default_root_dir", str(killed)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    step = random.Random(0).randint(2, 8)  # mid-epoch in the first or second epoch
    # the run waits after step `step` until it is killed (tests/datafiles.py's PauseAfterStep)
    pause = json.dumps({"class_path": "datafiles.PauseAfterStep", "init_args": {"step": step}})
    paused_env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [*run, f"--trainer.callbacks+={pause}"],
        cwd=ROOT, env=paused_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for(killed / "paused", proc)
    assert (killed / "checkpoints" / f"epoch={(step - 1) // 6}-step={step}.ckpt").is_file()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # every checkpoint on disk is whole, and loads without unpickling code
    for ckpt in (killed / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)["global_step"] >= 1
    resumed = subprocess.run(
        [*run, "--ckpt_path", "last"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr
    assert "skipped rows: 3" in resumed.stderr  # the count goes on across the resume

    a, b = load_file(straight / "adapter.safetensors"), load_file(killed / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    leftovers = [p for d in (killed, killed / "checkpoints") for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("straight")
    args = fit_config(tmp)
    with pytest.MonkeyPatch.context() as mp:  # as the resumed runs have it, and only for this run
        mp.setenv("WANDB_MODE", "disabled")
        assert main([*args, "--trainer.default_root_dir", str(tmp / "run")]) == 0
    return args, tmp / "run"


@pytest.mark.parametrize(
    "step", [3, 6, 7, 10], ids=["mid-epoch-0", "last-batch-of-epoch-0", "mid-epoch-1", "end"]
)
def test_resuming_from_a_step_checkpoint_ends_with_the_same_adapter(
    step, straight_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args, straight = straight_run
    ckpt = straight / "checkpoints" / f"epoch={(step - 1) // 6}-step={step}.ckpt"
    out = tmp_path / "resumed"
    assert main([*args, "--trainer.default_root_dir", str(out), "--ckpt_path", str(ckpt)]) == 0
    a, b = load_file(straight / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact here: same process, same order of operations


def test_the_fit_command_writes_checkpoints_atomically_unless_told_otherwise(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from sg2img.train.checkpointing import AtomicCheckpointIO
    from sg2img.train.cli import SG2ImgCLI

    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [*fit_config(tmp_path)[1:], "--trainer.default_root_dir", str(tmp_path / "run")]
    cli = SG2ImgCLI(args=args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    own = SG2ImgCLI(
        args=[*args, "--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO"], run=False
    )
    assert type(own.trainer.strategy.checkpoint_io) is TorchCheckpointIO  # a configured one is kept


def test_a_nan_loss_stops_the_fit_command_with_the_last_good_checkpoint_on_disk(
    tmp_path, monkeypatch, capsys
):
    from sg2img.train.adapter_module import SG2ImgModule

    monkeypatch.setenv("WANDB_MODE", "disabled")
    original = SG2ImgModule.diffusion_loss

    def nan_at_step_4(self, batch, generator):
        loss = original(self, batch, generator)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(SG2ImgModule, "diffusion_loss", nan_at_step_4)
    root = tmp_path / "run"
    assert main([*fit_config(tmp_path), "--trainer.default_root_dir", str(root)]) == 1
    err = capsys.readouterr().err
    assert "sg2img fit: stopped: train step 4 (batch 4, rows" in err and "loss is nan" in err
    assert "Traceback" not in err
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the last good state: after step 3, nothing of the NaN batch
    saved = load_file(root / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    weights = {k.removeprefix("model.adapter."): v for k, v in last["state_dict"].items()}
    shared = saved.keys() & weights.keys()
    assert len(shared) > len(saved) // 2 and all(torch.equal(saved[k], weights[k]) for k in shared)
