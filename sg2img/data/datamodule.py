"""The Lightning data module: any source for train/val/test, preprocessing sized to the model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..tokenizer import clip_tokenizer
from .records import Preprocess, collate


class SG2ImgDataModule(L.LightningDataModule):
    """``train``/``val``/``test``: any source (``JsonlManifest``, ``VisualGenome``, ``CocoStuff``, ``LaionSG``,
    ``WebDatasetShards``, ``CachedRows``). ``resolution`` and ``clip_size`` default to what the model needs
    (its VAE sample size and its CLIP tower's input size)."""

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
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle, self.seed, self.pin_memory = num_workers, shuffle, seed, pin_memory
        self.resolution, self.clip_size = resolution, clip_size
        self._tokenizer = None

    def preprocess(self) -> Preprocess:
        resolution, clip_size = self.resolution, self.clip_size
        if resolution is None or clip_size is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "data_requirements"):
                raise ValueError(
                    "set data.resolution and data.clip_size, or attach the data module to a trainer"
                )
            need = module.data_requirements()
            resolution = resolution or need["resolution"]
            clip_size = clip_size or need["clip_size"]
        if self._tokenizer is None:
            self._tokenizer = clip_tokenizer()
        return Preprocess(resolution, clip_size, self._tokenizer)

    def _loader(self, stage: str) -> DataLoader | list:
        source = self.sources[stage]
        if source is None:
            return []
        if hasattr(source, "transform"):
            source.transform = self.preprocess()
        train = stage == "train"
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size if train else self.val_batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate,
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

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
