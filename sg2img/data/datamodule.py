"""The Lightning data module: any source for train/val/test, preprocessing sized to the model."""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from sg2img.base.tokenizer import clip_tokenizer
from sg2img.data.rows import Preprocess, SkipLog, Skipped, collate
from sg2img.errors import ConfigurationError

PROBE_ROWS = 32  # rows of the training data read at start-up to check it suits the model


class SG2ImgDataModule(L.LightningDataModule):
    """``train``/``val``/``test``: any source (``JsonlManifest``, ``VisualGenome``, ``CocoStuff``, ``LaionSG``,
    ``WebDatasetShards``, ``CachedRows``). ``resolution`` and ``clip_size`` default to what the model needs
    (its VAE sample size and its CLIP tower's input size).

    The data module never asks a model anything: the model hands its requirements over
    (``use_requirements``, from ``TrainingSteps.setup`` or the CLI's startup check), and captions are
    tokenised by the tokenizer in them, the base's own."""

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        resolution: int | None = None,
        clip_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool = True,
    ):
        super().__init__()
        self.sources = {"train": train, "val": val, "test": test}
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ConfigurationError(f"data.{name} must be at least 1, got {value}")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle, self.seed, self.pin_memory = num_workers, shuffle, seed, pin_memory
        self.resolution, self.clip_size = resolution, clip_size
        self._requirements: dict[str, Any] = {}
        self._clip_tokenizer = None  # the fallback when no model has handed its tokenizer over
        self._checked: tuple[Any, dict[str, Any]] | None = None  # (source, requirements) already probed

    def use_requirements(self, requirements: dict[str, Any]) -> None:
        """What the model to be trained needs of its rows (its ``data_requirements()``): image sizes,
        whether rows need graphs, the widths of cached encoder outputs and its tokenizer."""
        self._requirements = dict(requirements)

    def requirements(self) -> dict[str, Any]:
        """The requirements handed over by the model ({} before any)."""
        return self._requirements

    def preprocess(self, requirements: dict[str, Any] | None = None) -> Preprocess:
        """The row transform for this model (``requirements``: its ``data_requirements()``; default: those
        handed over)."""
        resolution, clip_size = self.resolution, self.clip_size
        need = requirements if requirements is not None else self.requirements()
        if need:
            resolution = resolution or need["resolution"]
            clip_size = clip_size or need.get("clip_size")  # None: the model reads no CLIP pixels
        elif resolution is None:
            raise ValueError(
                "set data.resolution (and data.clip_size), or hand the data module the model's requirements"
            )
        # with no model, a resolution set with no clip_size means no CLIP pixels (a graph-only model), and
        # captions get the CLIP tokenizer every SD1.5 base uses
        tokenizer = need.get("tokenizer")
        if tokenizer is None:
            if self._clip_tokenizer is None:  # built once per data module, not once per loader
                self._clip_tokenizer = clip_tokenizer()
            tokenizer = self._clip_tokenizer
        return Preprocess(resolution, clip_size, tokenizer)

    def _loader(self, stage: str) -> DataLoader | list:
        source = self.sources[stage]
        if source is None:
            return []
        if hasattr(source, "transform"):
            source.transform = self.preprocess()
        train = stage == "train"
        need = self.requirements()
        if train and need and self._checked != (source, need):  # not yet probed by check_before_fit
            check_source(source, need)
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size if train else self.val_batch_size,
            "num_workers": self.num_workers,
            "collate_fn": partial(collate, require_graph=bool(need.get("graphs"))),
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        if not isinstance(source, IterableDataset):
            world, rank = 1, 0
            if self.trainer is not None:
                world, rank = self.trainer.world_size, self.trainer.global_rank
            # Seeded, epoch-aware order (Lightning calls set_epoch): a resumed run sees the same batches.
            sampler = DistributedSampler(
                source, num_replicas=world, rank=rank, shuffle=self.shuffle and train, seed=self.seed
            )
            if train and self.trainer is not None:
                # Lightning sets the sampler's epoch only after it has made the loader's first iterator, so a
                # run resumed in epoch e > 0 would draw epoch 0's order for the rest of epoch e.
                sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
            kwargs["sampler"] = sampler
        if train:
            # Its position within the epoch goes into every checkpoint (Lightning saves a stateful loader's
            # state): a run resumed mid-epoch continues with the batches it would have had next.
            return StatefulDataLoader(source, **kwargs)
        return DataLoader(source, **kwargs)

    def check_before_fit(self, requirements: dict[str, Any]) -> None:
        """Refuse, before anything is written, a fit that cannot train: no training data, or training rows
        that cannot be read or cannot train this model (``check_source``)."""
        source = self.sources["train"]
        if source is None:
            raise ConfigurationError(
                "no training data: data.train is not set; compose a data config, e.g. "
                "--config configs/data/jsonl.yaml (copy it and set its manifest) or configs/data/shapes.yaml"
            )
        if hasattr(source, "transform"):
            source.transform = self.preprocess(requirements)
        check_source(source, requirements)
        self._checked = (source, requirements)
        self.use_requirements(requirements)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def describe_source(source: Any) -> str:
    where = next((getattr(source, a) for a in ("manifest", "root", "urls") if hasattr(source, a)), None)
    return f"{type(source).__name__}({where})" if where is not None else type(source).__name__


def check_source(source: Any, need: dict[str, Any], rows: int = PROBE_ROWS) -> None:
    """Read the first ``rows`` rows of the training source (of a stream such as WebDataset shards: the first
    it yields) and refuse, in one message, data that cannot train this model: no row readable, no scene
    graphs for a graph branch, cached encoder outputs of the wrong width."""
    try:
        if isinstance(source, IterableDataset):
            probed = list(itertools.islice(iter(source), rows))
        else:
            probed = [source[i] for i in range(min(rows, len(source)))]
    except OSError as e:  # a manifest, shard or root that is not there: the user's path, not a crash
        raise ConfigurationError(f"data.train: {describe_source(source)}: {e}") from e
    n = len(probed)
    if n == 0:
        raise ConfigurationError(f"data.train: {describe_source(source)} has no rows")
    good = [r for r in probed if not isinstance(r, Skipped)]
    name = describe_source(source)
    if not good:
        log = SkipLog()
        log.add([r for r in probed if isinstance(r, Skipped)])
        raise ConfigurationError(
            f"data.train: none of the first {n} rows of {name} can be read (wrong paths or image_root?)\n"
            + log.summary()
        )
    if need.get("graphs") and all(r["graph"] is None for r in good):
        raise ConfigurationError(
            f"model.graph.enabled is on, but data.train has no scene graphs: none of the first {len(good)} "
            f"readable rows of {name} has one. Give the rows a scene_graph, or train without the graph "
            "branch (model.graph.enabled: false; configs/experiments/ablations/graph_off.yaml)."
        )
    for field, width in need.get("widths", {}).items():
        row = good[0]
        if field not in row or row[field] is None:
            if field == "patch_tokens" and "image_embeds" in row:
                raise ConfigurationError(
                    f"model.image.tokens is patch, but the encoder cache {name} holds no patch tokens: "
                    "rebuild it with `sg2img cache` for this model"
                )
            continue
        got = int(row[field].shape[-1])
        if got != width:
            raise ConfigurationError(
                f"data.train: the encoder cache {name} holds {got}-wide {field}, but this model's encoders "
                f"give {width}: the cache was made with another base or image encoder (rebuild it with "
                "`sg2img cache` for this model)"
            )
