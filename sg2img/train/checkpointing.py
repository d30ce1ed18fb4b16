"""Lightning checkpoints written atomically, and the clean-up of writes cut short by a killed process.

Lightning's own writer goes through an fsspec transaction, which on a local disk leaves a temporary file
with a random name beside the checkpoint when the process is killed mid-write, and does not fsync. Here
checkpoints are written the way every other file of a run is (``ip_adapter.atomic_files.atomic_write``:
a named temporary file in the same folder, fsync, one rename), so a reader finds either the previous
complete file or the new complete file, and what a killed writer left behind is recognised and removed
when the run starts again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ip_adapter.atomic_files import atomic_write, remove_partial_writes

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (remote ``scheme://`` paths are left to it)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{type(self).__name__}`."
            )
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))


def clean_run_folders(folders) -> list[Path]:
    """Remove the partial writes of killed processes from the run's folders (logged as warnings)."""
    removed = [f for folder in dict.fromkeys(Path(f) for f in folders) for f in remove_partial_writes(folder)]
    for f in removed:
        log.warning("removed %s: a file write cut short when an earlier process was killed", f)
    return removed


def continue_after_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the loop state of a checkpoint saved after the last batch of an epoch (at that batch's end or
    at the epoch's end) as the state at the start of the next epoch. Returns whether it did.

    Lightning 2.x restores such a checkpoint of an iteration-based run (``max_steps``) with its epoch
    counters out of step: the sampler of the next epoch gets epoch ``e + 1`` (and, for a checkpoint saved at
    the batch end, ``current_epoch`` moves on by two), so the resumed run sees another shuffle than the
    uninterrupted one. Saved in the start-of-epoch form, it resumes into the same epoch with the same order.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or not fit.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        return False
    batches, epochs = fit["epoch_loop.batch_progress"], fit["epoch_progress"]
    total = batches["total"]
    if total["completed"] == total["processed"] - 1:  # saved at the batch end: the batch is done now
        total["completed"] = total["processed"]
        stepped = fit.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] += 1  # what Lightning adds on restoring a batch-end checkpoint
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    for part in ("total", "current"):
        n = epochs[part]["ready"]  # epochs begun, the one that just ended included
        epochs[part].update(ready=n, started=n, processed=n, completed=n)
    fit.get("state_dict", {}).pop("combined_loader", None)  # the ended epoch's loader position
    return True
