"""The adapter trainer under Lightning: settings in, the model (``AdapterModel``: the frozen base, the
adapter, conditioning and the loss) driven through the shared steps, with the optimiser, the checkpoint
filter and the logging.

All randomness of a step (latent sampling, noise, timesteps, condition dropout) comes from a generator
seeded with ``(seed, epoch, batch index, rank)``: a resumed run draws the same numbers as an
uninterrupted one, and the cached and uncached paths give the same loss.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from sg2img.data.rows import TrainBatch
from sg2img.train.adapter_model import AdapterModel, branch_of
from sg2img.train.core import TrainingSteps, warmup_then_constant
from sg2img.train.settings import (
    BaseSettings,
    ConditionDropout,
    GraphBranchSettings,
    ImageBranchSettings,
    ObjectiveSettings,
    OptimizerConfig,
    settings_value,
)

log = logging.getLogger(__name__)

MODEL = "model"  # the AdapterModel's attribute: every state-dict key of the module starts "model."


class SG2ImgModule(TrainingSteps):
    """Trains the adapter on a frozen base.

    Args:
        base: the frozen base (``BaseSettings``: which model, its dtype, compilation).
        image / graph: the two branches (``ImageBranchSettings``, ``GraphBranchSettings``): which exist,
            which train, and how each makes its tokens.
        injection: ``decoupled`` (own K/V per stream) or ``concat`` (appended to the text tokens).
        init_adapter: an adapter file to start from: an official IP-Adapter ``.bin``/``.safetensors``
            (loaded as the image branch) or an sg2img adapter file (every branch it has).
        objective: which timesteps training draws and how their losses weigh (``ObjectiveSettings``).
        dropout / optimizer: see ``ConditionDropout`` and ``OptimizerConfig``.
        nonfinite_loss: on a NaN or inf loss, ``stop`` (a clear error, nothing of the batch applied) or
            ``skip`` (the batch is passed over and counted in ``train/nonfinite_losses``).
        seed: seeds every random draw of training (see the module docstring).

    The settings are the module's hyperparameters (``self.hparams``), saved in every checkpoint.
    """

    def __init__(
        self,
        base: BaseSettings = BaseSettings(),  # noqa: B008 (frozen dataclasses)
        image: ImageBranchSettings = ImageBranchSettings(),  # noqa: B008
        graph: GraphBranchSettings = GraphBranchSettings(),  # noqa: B008
        injection: Literal["decoupled", "concat"] = "decoupled",
        init_adapter: str | None = None,
        objective: ObjectiveSettings = ObjectiveSettings(),  # noqa: B008
        dropout: ConditionDropout = ConditionDropout(),  # noqa: B008
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        seed: int = 0,
    ):
        super().__init__(seed, nonfinite_loss)
        # a checkpoint's hyperparameters hold the settings as plain dicts (load_from_checkpoint)
        base, image, graph = (
            settings_value(k, v)
            for k, v in ((BaseSettings, base), (ImageBranchSettings, image), (GraphBranchSettings, graph))
        )
        objective, dropout = (
            settings_value(ObjectiveSettings, objective),
            settings_value(ConditionDropout, dropout),
        )
        optimizer = settings_value(OptimizerConfig, optimizer)
        if not (image.enabled or graph.enabled):
            raise ValueError("at least one of model.image.enabled and model.graph.enabled must be on")
        if not (image.trains or graph.trains):
            raise ValueError(
                "nothing would train: set model.image.train or model.graph.train on a branch that is enabled"
            )
        if injection not in ("decoupled", "concat"):
            raise ValueError(f"model.injection must be 'decoupled' or 'concat', got {injection!r}")
        if graph.positional_query and not (graph.enabled and injection == "decoupled"):
            raise ValueError(
                "model.graph.positional_query needs model.graph.enabled: true and model.injection: decoupled"
            )
        self.optim = optimizer
        # into every checkpoint, as plain values (no dataclass instances: checkpoints stay loadable with
        # weights_only=True); W&B already has them in the run config, under model (SaveRunConfig)
        self.save_hyperparameters(
            {
                "base": asdict(base),
                "image": asdict(image),
                "graph": asdict(graph),
                "injection": injection,
                "init_adapter": init_adapter,
                "objective": asdict(objective),
                "dropout": asdict(dropout),
                "optimizer": asdict(optimizer),
                "nonfinite_loss": nonfinite_loss,
                "seed": seed,
            },
            logger=False,
        )
        self.model = AdapterModel(base, image, graph, injection, init_adapter, objective, dropout, seed)

    def configure_model(self) -> None:
        """Load the base and build the adapter (once; Lightning calls this before fit/validate/test). The
        base's dtype ``auto`` follows the trainer's device; before a trainer is attached (the CLI's start-up
        check), whether a GPU is there, as the CLI's default precision does."""
        if self._trainer is not None:
            on_gpu = self.trainer.strategy.root_device.type == "cuda"
        else:
            on_gpu = torch.cuda.is_available()
        self.model.build(on_gpu)

    def data_requirements(self) -> dict[str, Any]:
        self.configure_model()  # built here with the trainer's device in mind, not by the model's default
        return self.model.data_requirements()

    # --- what trains and what is saved ----------------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        """The model's predicate, on the module's names (``model.adapter.…``)."""
        return name.startswith(f"{MODEL}.") and self.model.is_trainable(name[len(MODEL) + 1 :])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the model became its own module keep its weights at the top level
        # (adapter.…): they resume as they were
        state = checkpoint.get("state_dict", {})
        if state and not any(k.startswith(f"{MODEL}.") for k in state):
            checkpoint["state_dict"] = type(state)((f"{MODEL}.{k}", v) for k, v in state.items())
        super().on_load_checkpoint(checkpoint)

    # --- the loss -------------------------------------------------------------------------------
    def diffusion_loss(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        total, parts = self.model.loss(batch, generator)
        if parts and self._trainer is not None:
            stage = "train" if self.training else "val"
            for name, value in parts.items():
                self.log(f"{stage}/{name}", value, batch_size=batch.batch_size)
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        # the optimizer holds exactly the trainable parameters: no walk over the frozen base each step
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm(), batch_size=1)

    def on_fit_end(self) -> None:
        if self.skips.total:
            log.warning("rank %d: %s", self.global_rank, self.skips.summary())
        elif self.global_rank == 0:
            log.info(self.skips.summary())

    # --- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        groups = []
        for branch, lr in (("image", o.image_lr), ("graph", o.graph_lr)):
            params = [p for n, p in self.model.trainable_parameters() if branch_of(n) == branch]
            if params:
                groups.append({"params": params, "lr": lr if lr is not None else o.lr, "name": branch})
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        return warmup_then_constant(optimizer, o.warmup_steps) if o.warmup_steps else optimizer

    # --- what the callbacks ask of a trainer (SampleGrid, AdapterExport) --------------------------
    def generate(self, *args: Any, **kwargs: Any) -> list[Image.Image]:
        """``AdapterModel.generate``: its signature and defaults, stated once there."""
        return self.model.generate(*args, **kwargs)

    def export_adapter(self, path: str | Path) -> Path:
        return self.model.export_adapter(path)


__all__ = ["SG2ImgModule"]
