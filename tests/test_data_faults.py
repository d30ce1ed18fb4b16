"""Corrupt images and malformed rows planted among good ones: a run over several epochs skips each,
counts it once, logs the count, and ends with a summary that names every one."""

from __future__ import annotations

from datafiles import plant_faults, tiny_fit_args, write_manifest

from sg2img.cli import main
from sg2img.train.wandb_runs import offline_runs, read_offline_run


def test_planted_faults_are_skipped_counted_once_and_summarised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    manifest = write_manifest(tmp_path / "data", n=8, bad_rows=True)  # 3 bad rows among the first 8
    planted = plant_faults(tmp_path / "data", manifest)  # 9 more, one of each kind
    root = tmp_path / "run"
    # 20 rows, 5 batches an epoch: 3 epochs, every bad row met three times
    args = tiny_fit_args(
        tmp_path / "run.yaml", manifest, batch_size=4, workers=2, max_steps=15, log_every_n_steps=1
    )
    args += ["--trainer.default_root_dir", str(root)]
    assert main(args) == 0

    summary = caplog.text[caplog.text.index("skipped rows: ") :]
    assert summary.startswith("skipped rows: 12\n")  # each bad row once, though met in every epoch
    for _, reason in planted:
        assert reason in summary, reason
    assert "truncated.png: image file is truncated" in summary  # the file is named, not only the row
    assert "gone.png" in summary and "text.jpg" in summary
    (run,) = offline_runs(root)
    history = read_offline_run(run)["history"]
    counts = [row["train/skipped_rows"] for row in history if "train/skipped_rows" in row]
    assert counts == sorted(counts) and counts[-1] == 12
    steps = [row["trainer/global_step"] for row in history if "train/loss" in row]
    assert len(steps) == 15  # every step had good rows to train on
