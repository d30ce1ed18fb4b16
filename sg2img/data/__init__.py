"""Data: sources in their native formats, preprocessing, the typed batch, the encoder cache."""

from .base import RowSource, open_image
from .cache import CachedRows, write_cache
from .coco_stuff import CocoStuff, geometric_predicate, synthesize_relationships
from .datamodule import SG2ImgDataModule
from .jsonl import JsonlManifest
from .laion_sg import LaionSG
from .records import Example, Preprocess, SkipLog, Skipped, TrainBatch, collate
from .shapes import Shapes, ShapesEvaluator
from .visual_genome import VisualGenome
from .webdataset import WebDatasetShards, write_shards

__all__ = [
    "CachedRows",
    "CocoStuff",
    "Example",
    "JsonlManifest",
    "LaionSG",
    "Preprocess",
    "RowSource",
    "SG2ImgDataModule",
    "Shapes",
    "ShapesEvaluator",
    "SkipLog",
    "Skipped",
    "TrainBatch",
    "VisualGenome",
    "WebDatasetShards",
    "collate",
    "geometric_predicate",
    "open_image",
    "synthesize_relationships",
    "write_cache",
    "write_shards",
]
