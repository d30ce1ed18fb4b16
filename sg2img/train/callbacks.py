"""Training callbacks: sample grids, the adapter and base files, throughput, and the run's resolved config."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelSummary, ThroughputMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw

from sg2img.drawing import draw_scene_graph
from sg2img.graph import SceneGraph, load_scene_graphs
from sg2img.train.checkpointing import clean_run_folders

log = logging.getLogger(__name__)
EXAMPLE_GRAPHS = Path(__file__).resolve().parents[2] / "data" / "examples" / "sheep.json"
RUN_ID_FILE = "wandb-run-id"  # DIR/wandb-run-id: the W&B run a fit into DIR logs to, kept for its resumption


def _batch_size(batch: Any) -> int:
    return batch.batch_size


class SamplesPerSecond(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` reading the batch size of a ``TrainBatch``: logs
    ``train/device/samples_per_sec`` (and ``train/samples_per_sec`` over all processes when there are
    several), averaged over the last ``window_size`` steps."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_batch_size, window_size=window_size)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        if _batch_size(batch) == 0:  # every row of it was skipped: no step was taken, nothing to count
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)


class RunLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without the warnings a user cannot act on: it no longer passes wandb the
    retired ``anonymous`` setting, and it tells wandb where the code's git repository is (the working
    directory's), instead of letting wandb look for one in the run folder and warn that there is none."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        if "settings" not in self._wandb_init:
            import wandb

            repo = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / ".git").exists()), None)
            self._wandb_init["settings"] = (
                wandb.Settings(git_root=str(repo)) if repo else wandb.Settings(disable_git=True)
            )


class ParameterSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total, which this trainer never measures
    (it printed "Total FLOPs: 0" for every run)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [
            max(len(name), *(len(v) for v in values)) if values else len(name) for name, values in columns
        ]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1]) if columns else 0):
            rows.append(
                " | ".join(values[i].ljust(w) for (_, values), w in zip(columns, widths, strict=True))
            )
        rows += [
            "-" * len(rows[0]),
            f"{get_human_readable_count(trainable_parameters):<10} trainable params",
            f"{get_human_readable_count(total_parameters - trainable_parameters):<10} frozen params",
            f"{model_size:<10.1f} MB of parameters in all",
        ]
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("\n" + "\n".join(rows))


def text_panel(text: str, size: int) -> Image.Image:
    panel = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(panel)
    lines = textwrap.wrap(text or "(no prompt)", width=max(8, size // 7))[: size // 12]
    draw.multiline_text((6, 6), "\n".join(lines), fill="black", spacing=2)
    return panel


def sample_grid(
    images: list[Image.Image], graphs: list[SceneGraph], prompts: list[str], panel: int = 256
) -> Image.Image:
    """One row per sample: the generated image, a drawing of its graph, its prompt."""
    grid = Image.new("RGB", (3 * panel, panel * len(images)), "white")
    for row, (img, g, p) in enumerate(zip(images, graphs, prompts)):
        grid.paste(img.convert("RGB").resize((panel, panel), Image.Resampling.NEAREST), (0, row * panel))
        grid.paste(
            draw_scene_graph(g, size=panel).convert("RGB").resize((panel, panel)), (panel, row * panel)
        )
        grid.paste(text_panel(p, panel), (2 * panel, row * panel))
    return grid


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimiser steps, generate from fixed graphs and prompts, save the grid under
    ``DIR/samples/`` and log it (``samples``) to the logger that supports images (W&B), with a
    ``samples_table`` (a ``wandb.Table`` of image, graph drawing and caption, one row per sample).

    What it draws: the graphs of the file ``graphs`` names (with ``prompts``, else each graph's
    description); without one, the first rows with a graph of the run's own validation data (their
    captions), else of its training data; the example graphs only for a run that has neither."""

    def __init__(
        self,
        every_n_steps: int = 500,
        graphs: str | None = None,
        prompts: list[str] | None = None,
        max_samples: int = 4,
        steps: int = 30,
        guidance: float = 7.5,
        seed: int = 0,
        panel: int = 256,
    ):
        self.every_n_steps, self.graphs_path = every_n_steps, graphs
        self.prompts, self.max_samples = prompts, max_samples
        self.steps, self.guidance, self.seed, self.panel = steps, guidance, seed, panel
        self._last_step = -1

    def rows_of_the_run(self, trainer: L.Trainer | None) -> tuple[list[SceneGraph], list[str]]:
        """The first ``max_samples`` rows with a graph of the run's validation (else training) source."""
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        sources = getattr(data, "sources", {}) if data is not None else {}
        for name in ("val", "train"):
            source = sources.get(name)
            if source is None or not hasattr(source, "example"):
                continue
            graphs, prompts = [], []
            for i in range(min(len(source), 8 * self.max_samples)):
                try:
                    ex = source.example(i)
                except Exception:  # a faulty row: the data module counts it; here it is passed over
                    continue
                if ex.graph is not None and len(ex.graph.objects):
                    graphs.append(ex.graph)
                    prompts.append(ex.caption)
                if len(graphs) == self.max_samples:
                    break
            if graphs:
                return graphs, prompts
        return [], []

    def fixed_inputs(self, trainer: L.Trainer | None = None) -> tuple[list[SceneGraph], list[str]]:
        if self.graphs_path is None and not hasattr(self, "_run_rows"):
            self._run_rows = self.rows_of_the_run(trainer)  # once: the same samples at every step
        if self.graphs_path is None and self._run_rows[0]:
            graphs, prompts = self._run_rows
            return graphs, list(self.prompts)[: len(graphs)] if self.prompts else prompts
        graphs = load_scene_graphs(self.graphs_path or EXAMPLE_GRAPHS)[: self.max_samples]
        prompts = list(self.prompts) if self.prompts else [g.describe() for g in graphs]
        if len(prompts) < len(graphs):
            prompts += [prompts[-1]] * (len(graphs) - len(prompts))
        return graphs, prompts[: len(graphs)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self.log_samples(trainer, pl_module, step)

    def log_samples(self, trainer: L.Trainer, pl_module, step: int) -> Path:
        graphs, prompts = self.fixed_inputs(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.generate(
                graphs=graphs, prompts=prompts, steps=self.steps, guidance=self.guidance, seed=self.seed
            )
        finally:
            pl_module.train(was_training)
        grid = sample_grid(images, graphs, prompts, self.panel)
        out = Path(trainer.default_root_dir) / "samples" / f"step-{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=step, caption=[" | ".join(prompts)])
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [
                    [step, wandb.Image(img), wandb.Image(draw_scene_graph(g, size=self.panel)), p]
                    for img, g, p in zip(images, graphs, prompts, strict=True)
                ]
                logger.log_table(
                    key="samples_table", columns=["step", "image", "graph", "caption"], data=rows, step=step
                )
        return out


class AdapterExport(L.Callback):
    """Keeps ``DIR/adapter.safetensors`` current: written with every checkpoint and at the end of fit."""

    def __init__(self, filename: str = "adapter.safetensors"):
        self.filename = filename

    def export(self, pl_module, out: Path) -> None:
        pl_module.export_adapter(out)

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:  # a run started again after its process was killed
            folders = [trainer.default_root_dir, self.path(trainer).parent]
            folders += [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
            clean_run_folders(folders)

    def _write(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            out = self.path(trainer)
            out.parent.mkdir(parents=True, exist_ok=True)
            self.export(pl_module, out)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module)
        if trainer.is_global_zero:
            if self.writes_card:
                self.write_card(trainer, pl_module)
            self.log_artifact(trainer)

    writes_card = True

    def write_card(self, trainer: L.Trainer, pl_module) -> None:
        """DIR as ``save_pretrained`` writes it: beside the adapter file, ``config.json`` and a model card
        (the base it expects, what it was trained on, how long)."""
        from ip_adapter.pretrained import write_card
        from sg2img.data.datamodule import describe_source

        data = getattr(trainer, "datamodule", None)
        train = getattr(data, "sources", {}).get("train") if data is not None else None
        card = {
            "name": f"sg2img adapter ({Path(trainer.default_root_dir).name})",
            "base": pl_module.model.base,  # the base the adapter expects (model.base.source)
            "trained_on": describe_source(train) if train is not None else None,
            "steps": trainer.global_step,
        }
        write_card(self.path(trainer).parent, self.path(trainer), card)

    artifact_type = "model"

    def log_artifact(self, trainer: L.Trainer) -> None:
        """The trained file, with the run's config.yaml, as a W&B artifact of the fit's run (W&B's
        ``log_model`` for what this fit makes: the adapter file, not Lightning's checkpoint)."""
        out = self.path(trainer)
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger) or not out.is_file():
                continue
            import wandb

            run = logger.experiment
            config = Path(trainer.default_root_dir) / "config.yaml"
            artifact = wandb.Artifact(
                name=f"{out.stem}-{run.id}",
                type=self.artifact_type,
                description=f"{out.name} of the fit in {trainer.default_root_dir}, step {trainer.global_step}",
                metadata={"global_step": trainer.global_step, "file": out.name},
            )
            artifact.add_file(str(out))
            if config.is_file():
                artifact.add_file(str(config))
            run.log_artifact(artifact, aliases=["latest", f"step-{trainer.global_step}"])


class BaseExport(AdapterExport):
    """Keeps ``DIR/base.safetensors`` (a base file, EMA weights) current, as ``AdapterExport`` does."""

    def __init__(self, filename: str = "base.safetensors"):
        super().__init__(filename)

    writes_card = False  # a base file is not an adapter folder

    def export(self, pl_module, out: Path) -> None:
        pl_module.export_base(out)


class ClipExport(AdapterExport):
    """Keeps ``DIR/clip.safetensors`` (a tiny-CLIP file) current, as ``AdapterExport`` does."""

    writes_card = False  # a tiny-CLIP file is not an adapter folder

    def __init__(self, filename: str = "clip.safetensors"):
        super().__init__(filename)

    def export(self, pl_module, out: Path) -> None:
        pl_module.export(out)


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config to ``DIR/config.yaml`` (``--trainer.default_root_dir DIR``) and logs it
    as the run's hyperparameters (the W&B run config)."""

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / self.config_filename
            out.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(out), skip_none=False, overwrite=True, multifile=False)
            self.save_config(trainer, pl_module, stage)
            if stage == "fit":  # the W&B run a resumption of this fit continues (training_cli)
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger) and logger.version:
                        (out.parent / RUN_ID_FILE).write_text(f"{logger.version}\n")
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
