"""Kill a training run with SIGKILL at random moments, resume it each time, and check that nothing is lost.

    python experiments/kill_resume.py                      # 200 steps, 20 kills, seed 0
    python experiments/kill_resume.py --kills 50 --seed 3

The run is ``sg2img fit`` on the tiny preset over a manifest of shapes images with bad rows planted among
them (broken, truncated, empty and missing images, malformed JSON, wrong types, bad graphs), two loader
workers, and a checkpoint every ``--every`` steps. First the run goes through uninterrupted. Then the same
command is started again and again with ``--ckpt_path last``, each time killed with SIGKILL after a delay
drawn from the seed (from start-up to well into training, so kills land while loading, while stepping
and while checkpoints are written), until ``--kills`` kills are done; then it runs to the end.

After every kill each checkpoint and adapter file on disk is read back (``torch.load(weights_only=True)``,
safetensors) and the temporary files a killed writer left are counted; a start removes them. At the end
the two adapters are compared, and the killed run's summary of skipped rows must count every planted
fault once. Prints a summary and writes experiments/results/kill_resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fixture writers the test suite plants faults with

from datafiles import plant_faults, tiny_fit_args, write_manifest  # noqa: E402

from ip_adapter.atomic_files import PARTIAL_WRITE  # noqa: E402

STEP_FILE = re.compile(r"step=(\d+)")


def write_run_config(work: Path, args: argparse.Namespace) -> tuple[list[str], int]:
    """The data (good rows, then every kind of planted fault) and the ``sg2img fit`` arguments."""
    data = work / "data"
    manifest = write_manifest(data, n=args.rows, seed=args.seed, bad_rows=True)
    faults = 3 + len(plant_faults(data, manifest))
    fit = tiny_fit_args(
        work / "run.yaml", manifest, batch_size=args.batch_size, workers=args.workers,
        gnn={"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64}, checkpoint_every=args.every, keep=1,
        max_steps=args.steps,
    )  # fmt: skip
    return fit, faults


def command(fit: list[str], root: Path) -> list[str]:
    return [sys.executable, "-m", "sg2img", *fit, "--trainer.default_root_dir", str(root)]


def audit(root: Path) -> dict:
    """Read back every checkpoint and adapter file; count the temporary files of killed writers."""
    folders = [root, root / "checkpoints"]
    leftovers = [p.name for d in folders if d.is_dir() for p in d.iterdir() if PARTIAL_WRITE.match(p.name)]
    unreadable, checked, step = [], 0, 0
    for ckpt in sorted((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").is_dir() else []:
        checked += 1
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if ckpt.name == "last.ckpt":
                step = int(state["global_step"])
        except Exception as e:  # any failure to read back is what this counts
            unreadable.append(f"{ckpt.name}: {type(e).__name__}: {e}")
    adapter = root / "adapter.safetensors"
    if adapter.exists():
        checked += 1
        try:
            load_file(adapter)
        except Exception as e:
            unreadable.append(f"{adapter.name}: {type(e).__name__}: {e}")
    return {"last_step": step, "files_checked": checked, "unreadable": unreadable, "leftovers": leftovers}


def skipped_total(stderr: str) -> int | None:
    m = re.findall(r"skipped rows: (\d+)", stderr)
    return int(m[-1]) if m else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    p.add_argument("--rows", type=int, default=40, help="good rows (12 bad ones are planted among them)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "kill_resume")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "kill_resume.json")
    args = p.parse_args(argv)

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    fit, faults = write_run_config(args.work, args)
    env = {**os.environ, "WANDB_MODE": "disabled"}

    t0 = time.monotonic()
    log = args.work / "straight.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            command(fit, args.work / "straight"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        first = args.work / "straight" / "checkpoints"
        while proc.poll() is None and not (first.is_dir() and any(first.iterdir())):
            time.sleep(0.02)
        startup_s = time.monotonic() - t0  # start-up and the first `every` steps
        proc.wait()
    straight_s = time.monotonic() - t0
    straight = log.read_text()
    if proc.returncode != 0:
        print(straight[-4000:], file=sys.stderr)
        return 1
    train_s = straight_s - startup_s
    print(f"uninterrupted run: {straight_s:.1f} s ({startup_s:.1f} s to the first checkpoint), "
          f"skipped rows {skipped_total(straight)}")  # fmt: skip

    rng = random.Random(args.seed)
    root = args.work / "killed"
    run = [*command(fit, root), "--ckpt_path", "last"]
    kills: list[dict] = []
    finished_before_kill = False
    while len(kills) < args.kills:
        # from halfway through start-up to about twice a fair share of the training time past it
        delay = rng.uniform(0.5 * startup_s, startup_s + 2 * train_s / args.kills)
        start = time.monotonic()
        proc = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
            finished_before_kill = True  # it reached max_steps before this kill was due
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        record = {"after_s": round(time.monotonic() - start, 2), **audit(root)}
        kills.append(record)
        print(
            f"kill {len(kills):>3} after {record['after_s']:6.1f} s: last.ckpt at step {record['last_step']:>4}, "
            f"{record['files_checked']} files read back, {len(record['unreadable'])} unreadable, "
            f"{len(record['leftovers'])} partial writes left"
        )
    final = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if final.returncode != 0:
        print(final.stderr[-4000:], file=sys.stderr)
        return 1
    end = audit(root)
    a, b = load_file(args.work / "straight" / "adapter.safetensors"), load_file(root / "adapter.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    exact = sum(torch.equal(a[k], b[k]) for k in a)
    result = {
        "command": "python experiments/kill_resume.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {  # paths inside the checkout as relative ones: the record names no machine
            k: (str(v.resolve().relative_to(ROOT)) if v.resolve().is_relative_to(ROOT) else str(v))
            if isinstance(v, Path)
            else v
            for k, v in vars(args).items()
        },
        "uninterrupted_s": round(straight_s, 1),
        "uninterrupted_to_first_checkpoint_s": round(startup_s, 1),
        "kills": kills,
        "finished_before_the_last_kill": finished_before_kill,
        "kills_that_left_a_partial_write": sum(bool(k["leftovers"]) for k in kills),
        "unreadable_files_after_kills": sum(len(k["unreadable"]) for k in kills),
        "final": end,
        "adapter_tensors": len(a),
        "adapter_tensors_bit_equal": exact,
        "adapter_max_abs_diff": diff,
        "planted_faults": faults,
        "skipped_rows_uninterrupted": skipped_total(straight),
        "skipped_rows_killed_and_resumed": skipped_total(final.stderr),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{len(kills)} kills; {result['kills_that_left_a_partial_write']} left a partial write (removed on the "
        f"next start), {result['unreadable_files_after_kills']} unreadable files; final adapter: "
        f"{exact}/{len(a)} tensors bit-equal, max |diff| {diff:.3g}; skipped rows "
        f"{result['skipped_rows_uninterrupted']} / {result['skipped_rows_killed_and_resumed']} "
        f"(planted {faults})\nwrote {args.out}"
    )
    ok = diff <= 1e-6 and not result["unreadable_files_after_kills"] and not end["leftovers"]
    return 0 if ok and result["skipped_rows_killed_and_resumed"] == faults else 1


if __name__ == "__main__":
    sys.exit(main())
