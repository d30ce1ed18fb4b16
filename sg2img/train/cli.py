"""``sg2img fit|validate|test``: LightningCLI over ``SG2ImgModule`` and ``SG2ImgDataModule``.

Config files compose in order (``--config base.yaml --config experiment.yaml``), then command-line
flags. The defaults fill in what a user would otherwise repeat:

- the logger is W&B (``WandbLogger``) saving under ``--trainer.default_root_dir``; it runs offline when no
  API key is configured, and honours ``WANDB_MODE``;
- precision is ``bf16-mixed`` on GPU and ``32-true`` on CPU;
- ``ModelCheckpoint`` callbacks without a ``dirpath`` write to ``DIR/checkpoints``, atomically
  (``sg2img.train.checkpointing.AtomicCheckpointIO``, unless the config names another checkpoint IO plugin);
- when the output is not a terminal (a log file), the progress bar is tqdm's, updated every
  ``log_every_n_steps`` steps;
- ``DIR/config.yaml`` is the resolved config and ``DIR/adapter.safetensors`` the latest adapter.

``sg2img fit-base`` is the same over ``BaseModelModule`` (a small base trained from scratch, such as the
shapes world's); it keeps ``DIR/base.safetensors`` current instead. ``sg2img fit-clip`` trains the shapes
world's tiny CLIP (``TinyClipModule``) and keeps ``DIR/clip.safetensors`` current.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import secrets
import string
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sg2img.base.components import ModelNotFoundError
from sg2img.data.datamodule import SG2ImgDataModule
from sg2img.errors import ConfigurationError, describe_parse_error
from sg2img.shapes.tiny_clip import TinyClipModule
from sg2img.train.adapter_module import SG2ImgModule
from sg2img.train.base_module import BaseModelModule
from sg2img.train.callbacks import RUN_ID_FILE, SaveRunConfig
from sg2img.train.settings import MOVED_SETTINGS

SUBCOMMANDS = ("fit", "validate", "test")
# callbacks whose only work is to write to the run's logger: left out of a run with trainer.logger: false
LOGGER_ONLY_CALLBACKS = ("LearningRateMonitor", "DeviceStatsMonitor")
log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """``online``, ``offline`` or ``disabled``: ``WANDB_MODE`` when set, else online only when W&B can
    authenticate. Every run passes it to ``wandb.init`` itself: wandb reads its environment once per process
    (later changes are ignored once a session started), so a second fit in the same process would
    otherwise inherit the first one's mode."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return "offline" if netrc.netrc().authenticators(host) is None else "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


def wandb_run_identity(root: Path, job: str, resuming: bool) -> dict[str, str]:
    """The W&B run a job logs to: a resumed fit (``--ckpt_path``) continues the run its first part
    started (the id ``DIR/wandb-run-id`` kept, ``resume="allow"``); any other job starts a run of its own.
    The id file is written when the fit starts (``SaveRunConfig``), not here: a run that stops at
    start-up writes nothing."""
    kept = root / RUN_ID_FILE
    if job == "fit" and resuming and kept.is_file() and (run_id := kept.read_text().strip()):
        return {"id": run_id, "resume": "allow"}
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
    return {"id": new_id, "resume": "allow"} if job == "fit" else {}


def wandb_offline() -> bool:
    """Whether runs stay on this machine (offline or disabled)."""
    return wandb_mode() != "online"


class _OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors end the command in one line (``ConfigurationError``) instead of
    the usage text: the command line of the run is given by ``SG2ImgCLI``."""

    args: tuple[str, ...] = ()

    moved: ClassVar[dict[str, str]] = {}  # a model's settings that earlier configs set under another key
    moved_notes: ClassVar[dict[str, str]] = {}  # what a moved key's old values mean now, where not the same
    setting_groups: ClassVar[str] = ""  # the model's setting groups, named in the message for a moved key

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        for old, new in type(self).moved.items():
            # a moved key and what follows it (model.gnn.layer); a key that became its own group
            # (model.base) only alone, since model.base.dtype is a setting of the new layout
            tail = r"(?![.\w])" if new.startswith(f"{old}.") else r"((?:\.\w+)*)"
            if found := re.search(rf"(?<![.\w])model\.{old}{tail}", message):
                rest = found.group(1) or "" if found.groups() else ""
                note = type(self).moved_notes.get(old)
                raise ConfigurationError(
                    f"model.{old}{rest} is now model.{new}{rest}{f' ({note})' if note else ''}: the model's "
                    f"settings are grouped ({type(self).setting_groups}; `--print_config` shows them all)"
                ) from ex
        raise ConfigurationError(describe_parse_error(message, parser, type(self).args)) from ex


class SG2ImgCLI(LightningCLI):
    """``sg2img fit|validate|test``: trains an adapter (``SG2ImgModule``)."""

    model_class: type = SG2ImgModule
    moved_settings: ClassVar[dict[str, str]] = MOVED_SETTINGS
    moved_notes: ClassVar[dict[str, str]] = {}
    setting_groups: ClassVar[str] = "base, image, graph, objective, dropout and optimizer"
    base_setting = "model.base.source"  # the setting that names the model to load, for its errors
    export_callback = "sg2img.train.callbacks.AdapterExport"  # keeps DIR/<the trained file> current

    def __init__(
        self, args: list[str] | None = None, run: bool = True, instantiate: bool = True, **kwargs: Any
    ):
        self._instantiate = instantiate  # False: parse and resolve only (checks configs without building)
        parser_class = type(
            "OneLineErrorParser",
            (_OneLineErrorParser,),
            {
                "args": tuple(args or sys.argv[1:]),
                "moved": self.moved_settings,
                "moved_notes": self.moved_notes,
                "setting_groups": self.setting_groups,
            },
        )
        kwargs.setdefault("parser_class", parser_class)
        super().__init__(
            self.model_class,
            SG2ImgDataModule,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
            args=args,
            run=run,
            **kwargs,
        )

    def instantiate_classes(self) -> None:
        if not self._instantiate:
            return
        try:
            super().instantiate_classes()
        except (
            ValueError
        ) as e:  # a value the settings' own checks refuse (model.graph.layout_loss_weight: -1)
            raise ConfigurationError(str(e)) from e

    def before_fit(self) -> None:
        """Load the base and read the first training rows before the trainer starts, so a wrong model or
        data path ends the run in one message with nothing written (no W&B run, no config.yaml)."""
        try:
            self.model.configure_model()
        except ModelNotFoundError as e:
            raise ConfigurationError(f"{self.base_setting}: {e}") from e
        self.datamodule.check_before_fit(self.model.data_requirements())

    def before_instantiate_classes(self) -> None:
        """Resolve the defaults in the config itself, so ``DIR/config.yaml`` records what really ran."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        t = cfg.trainer
        for key in ("max_steps", "max_epochs"):
            value = t.get(key)
            if value is not None and value < -1:
                raise ConfigurationError(f"trainer.{key} must be -1 (no limit) or at least 0, got {value}")
        root = Path(t.default_root_dir or "runs/default")
        t.default_root_dir = str(root)
        job = self.subcommand or "fit"
        if job != "fit":  # validate / test: their own config record; the fit's config.yaml stays as it was
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-{job}.yaml"}
        if t.logger is None or t.logger is True:
            t.logger = Namespace(
                class_path="sg2img.train.callbacks.RunLogger",
                init_args=Namespace(
                    project=os.environ.get("WANDB_PROJECT", "sg2img"),
                    name=root.name if job == "fit" else f"{root.name}-{job}",
                    save_dir=str(root),
                    offline=wandb_offline(),
                    mode=wandb_mode(),
                    job_type=job,
                    **wandb_run_identity(root, job, resuming=cfg.get("ckpt_path") is not None),
                ),
            )
        plugins = t.plugins if isinstance(t.plugins, list) else [t.plugins] if t.plugins else []
        if not any("CheckpointIO" in getattr(p, "class_path", str(p)) for p in plugins):
            plugins.append(
                Namespace(class_path="sg2img.train.checkpointing.AtomicCheckpointIO", init_args=Namespace())
            )
        t.plugins = plugins
        if t.precision is None:
            t.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
        callbacks = t.callbacks if isinstance(t.callbacks, list) else [t.callbacks] if t.callbacks else []
        if t.logger is False:  # nothing to log to: a callback that only logs is left out, not failed on
            kept = [c for c in callbacks if c.class_path.rsplit(".", 1)[-1] not in LOGGER_ONLY_CALLBACKS]
            for c in callbacks:
                if c not in kept:
                    log.info("trainer.logger: false, so the %s callback is left out", c.class_path)
            callbacks = kept
        for c in callbacks:
            if c.class_path.endswith("ModelCheckpoint") and c.init_args.get("dirpath") is None:
                c.init_args.dirpath = str(root / "checkpoints")
        bars = ("ProgressBar", "RichProgressBar", "TQDMProgressBar")
        if (
            t.enable_progress_bar is not False
            and not sys.stderr.isatty()
            and not any(c.class_path.rsplit(".", 1)[-1] in bars for c in callbacks)
        ):
            # Unattended (output to a file): a line-based bar every log interval. Rich's live bar redraws
            # from a thread all the time (16% of the samples of a 2-core CPU run, in py-spy).
            callbacks.append(
                Namespace(
                    class_path="lightning.pytorch.callbacks.TQDMProgressBar",
                    init_args=Namespace(refresh_rate=max(1, int(t.log_every_n_steps or 50))),
                )
            )
        if t.enable_model_summary is not False and not any(
            c.class_path.endswith("ModelSummary") for c in callbacks
        ):
            callbacks.append(
                # depth 2: the trainer's model is one module (model), its parts one level down
                Namespace(
                    class_path="sg2img.train.callbacks.ParameterSummary", init_args=Namespace(max_depth=2)
                )
            )
        export_name = self.export_callback.rsplit(".", 1)[-1]  # configs may name it short or in full
        if not any(c.class_path.rsplit(".", 1)[-1] == export_name for c in callbacks):
            callbacks.append(Namespace(class_path=self.export_callback, init_args=Namespace()))
        t.callbacks = callbacks


class BaseModelCLI(SG2ImgCLI):
    """``sg2img fit-base``: trains a small base model from scratch (``BaseModelModule``)."""

    model_class = BaseModelModule
    base_setting = "model.init"
    moved_settings: ClassVar[dict[str, str]] = {"snr_gamma": "objective.snr_gamma"}
    moved_notes: ClassVar[dict[str, str]] = {
        "snr_gamma": "a null gamma, the plain MSE, is now model.objective.loss_weighting: none"
    }
    setting_groups: ClassVar[str] = "objective"
    export_callback = "sg2img.train.callbacks.BaseExport"


class ClipCLI(SG2ImgCLI):
    """``sg2img fit-clip``: trains the shapes world's tiny CLIP (``TinyClipModule``)."""

    model_class = TinyClipModule
    moved_settings: ClassVar[dict[str, str]] = {}
    export_callback = "sg2img.train.callbacks.ClipExport"


# Lightning notices that are expected here: the frozen base is in eval mode on purpose, a run may have no
# validation data, and throughput is reported in samples, not FLOPs.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"Total length of .* across ranks is zero",
    r"When using the `ThroughputMonitor`, you need to define a `flops_per_batch`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader, on torch versions that retired it
    r"LightningCLI's args parameter is intended to run from within Python",  # sg2img passes its own argv
)


class _LightningNoise(logging.Filter):
    """Drops from every run's log Lightning's tips to install its cloud services (litlogger, litmodels) and
    its notice that the model summary is ours (``ParameterSummary``, which leaves out the unmeasured FLOPs)."""

    NOISE = ("💡 Tip:", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.NOISE)


def quiet_lightning() -> None:
    """Silence the expected warnings and Lightning's noise (idempotent); what a user should act on stays."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LightningNoise) for f in logger.filters):
            logger.addFilter(_LightningNoise())


def cli_main(args: list[str] | None = None, cli: type[SG2ImgCLI] = SG2ImgCLI) -> SG2ImgCLI:
    quiet_lightning()
    try:
        return cli(args=args)
    finally:
        import wandb

        if wandb.run is not None:  # flush and close the run now, not at interpreter exit
            wandb.finish()
