"""The training core shared by every trainer (adapter, base, tiny CLIP): the diffusion objective (noise,
timesteps, targets by prediction type, SNR loss weights), the warm-up schedule, the trainable-subset
checkpoints, and the LightningModule steps with their seeded noise and fault accounting."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sg2img.data.rows import SkipLog, TrainBatch
from sg2img.errors import NonFiniteLossError
from sg2img.train.checkpointing import continue_after_epoch_end

log = logging.getLogger(__name__)


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict, from the base's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} in the base's scheduler config")


def snr_loss_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, kind: str, gamma: float
) -> torch.Tensor | None:
    """Per-sample loss weights of timesteps: ``none`` (None: the plain MSE), ``min_snr`` (Hang et al. 2023:
    min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction: low noise weighs less) or ``inv_snr``
    (min(1 / SNR, gamma): high noise weighs more, capped)."""
    if kind == "none":
        return None
    snr = compute_snr(scheduler, timesteps).clamp_min(1e-8)
    if kind == "min_snr":
        if scheduler.config.prediction_type == "v_prediction":
            return snr.clamp_max(gamma) / (snr + 1)
        return snr.clamp_max(gamma) / snr
    return (1.0 / snr).clamp_max(gamma)


def sample_timesteps(
    scheduler: DDPMScheduler,
    n: int,
    generator: torch.Generator,
    device: torch.device,
    shift: float | None = None,
) -> torch.Tensor:
    """``n`` training timesteps: uniform, or with ``shift`` s towards high noise (t = s u / (1 + (s - 1) u)
    for uniform u; the shift of Esser et al. 2024)."""
    steps = scheduler.config.num_train_timesteps
    if shift is None:
        return torch.randint(0, steps, (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device)
    return (shift * u / (1 + (shift - 1) * u) * steps).long().clamp(max=steps - 1)


def noised(
    scheduler: DDPMScheduler, clean: torch.Tensor, generator: torch.Generator, shift: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy input, timesteps, target) for clean latents or pixels: the noise, then the timesteps, drawn
    from ``generator`` in that order."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    t = sample_timesteps(scheduler, clean.shape[0], generator, clean.device, shift)
    return scheduler.add_noise(clean, noise, t), t, diffusion_target(scheduler, clean, noise, t)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The denoising loss: the plain MSE, or the mean of per-sample MSEs times their ``weights``."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights).mean()


def warmup_then_constant(optimizer: torch.optim.Optimizer, steps: int) -> dict[str, Any]:
    """Lightning's optimiser config with a linear warm-up over ``steps`` steps, then a constant rate."""
    warmup = max(1, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def describe_keys(keys: Iterable[str]) -> str:
    """A short account of state-dict keys, grouped below their common prefix (attention layers by their
    pattern): "12 (model.adapter.sg_encoder: 8, model.adapter.attention.layers.*.to_k_sg: 4)"."""
    keys = sorted(set(keys))
    if not keys:
        return "none"
    parts = [k.split(".") for k in keys]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1

    def group(key: str) -> str:
        if ".attention." in key:
            return re.sub(r"\.\d+\.", ".*.", key.rsplit(".", 1)[0])
        return ".".join(key.split(".")[: common + 1])

    groups = Counter(group(k) for k in keys)
    return f"{len(keys)} ({', '.join(f'{g}: {n}' for g, n in sorted(groups.items()))})"


FAULTS_KEY = "sg2img_faults"  # checkpoint entry: skipped rows and non-finite losses so far


class TrainingSteps(L.LightningModule):
    """The training, validation and test steps shared by every trainer here (the adapter, the base and the
    tiny CLIP): the per-step seeded generator (fixed noise for evaluation, comparable across a run),
    skipped-row accounting, the non-finite-loss policy, the fault counts in checkpoints and the logged loss.
    A subclass supplies ``diffusion_loss(batch, generator)``, the loss of one batch, and
    ``is_trainable(name)``, the one predicate for what trains: checkpoints hold exactly those weights, and
    resuming checks that they are all there."""

    def __init__(self, seed: int = 0, nonfinite_loss: Literal["stop", "skip"] = "stop"):
        super().__init__()
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        self.seed, self.nonfinite_loss = seed, nonfinite_loss
        self.skips = SkipLog()
        self.nonfinite_count = 0

    def diffusion_loss(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def is_trainable(self, name: str) -> bool:
        """Whether the state-dict entry ``name`` trains, and so is checkpointed (default: everything)."""
        return True

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return type(full)((k, v) for k, v in full.items() if self.is_trainable(k[len(prefix) :]))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        self.configure_model()
        expected, given = set(self.state_dict()), set(state_dict)
        if strict and expected != given:
            raise RuntimeError(
                "the checkpoint does not hold what this run trains (was it saved with other settings of what "
                f"trains?): missing {describe_keys(expected - given)}; unexpected {describe_keys(given - expected)}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def data_requirements(self) -> dict[str, Any]:
        """What this model needs of its rows: ``resolution``, ``clip_size`` (None: no CLIP pixels), and
        optionally ``graphs``, ``widths`` (of cached encoder outputs) and ``tokenizer``."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # the model hands its requirements to the data module; the data module never asks the model
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "use_requirements"):
            datamodule.use_requirements(self.data_requirements())

    def step_generator(self, *key: int) -> torch.Generator:
        h = self.seed
        for k in key:
            h = (h * 1_000_003 + int(k) + 1) % (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(h)

    def _step(self, batch: TrainBatch, batch_idx: int, stage: str) -> torch.Tensor | None:
        if batch.skipped:
            self.skips.add(batch.skipped)
            self.log(f"{stage}/skipped_rows", float(self.skips.total), batch_size=max(batch.batch_size, 1))
        if batch.batch_size == 0:
            return None
        if stage == "train":
            g = self.step_generator(self.current_epoch, batch_idx, self.global_rank)
        else:  # fixed noise for evaluation: comparable across the run
            g = self.step_generator(10**6 + batch_idx, self.global_rank)
        loss = self.diffusion_loss(batch, g)
        if not bool(torch.isfinite(loss.detach())):
            return self._nonfinite(loss, batch, batch_idx, stage)
        self.log(
            f"{stage}/loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=stage != "train"
        )
        return loss

    def _nonfinite(self, loss: torch.Tensor, batch: TrainBatch, batch_idx: int, stage: str) -> None:
        """A NaN or inf loss: with ``nonfinite_loss: skip`` the batch is passed over (no backward, no
        optimiser step) and counted in ``<stage>/nonfinite_losses``; with ``stop`` the run ends here with
        this message, before the weights change, so the checkpoints and the exported file on disk stay
        the last good ones."""
        where = (
            f"{stage} step {self.global_step} (batch {batch_idx}, rows {batch.keys[:4]}"
            f"{' ...' if batch.batch_size > 4 else ''}): loss is {loss.item()}"
        )
        if self.nonfinite_loss == "skip":
            self.nonfinite_count += 1
            self.log(f"{stage}/nonfinite_losses", float(self.nonfinite_count), batch_size=batch.batch_size)
            log.warning("%s; batch skipped (%d so far)", where, self.nonfinite_count)
            return None
        raise NonFiniteLossError(
            f"{where}. The run stops here (model.nonfinite_loss: stop), before this batch changes any weight; "
            "the checkpoints and the exported file on disk are the last good ones. Set "
            "model.nonfinite_loss: skip to pass over such batches and count them instead."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the run's fault counts go on across a resume: the end-of-run summary covers the whole run
        checkpoint[FAULTS_KEY] = {
            "skipped_rows": self.skips.state_dict(),
            "nonfinite_losses": self.nonfinite_count,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        continue_after_epoch_end(checkpoint)  # a resume at an epoch boundary keeps the data order
        faults = checkpoint.get(FAULTS_KEY)
        if faults is not None:
            self.skips.load_state_dict(faults["skipped_rows"])
            self.nonfinite_count = int(faults["nonfinite_losses"])

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, batch_idx, "train")

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, batch_idx, "val")

    def test_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, batch_idx, "test")
