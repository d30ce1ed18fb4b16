"""Data: sources in their native formats, preprocessing, the typed batch, the encoder cache."""

from sg2img.data.base import RowSource, open_image
from sg2img.data.cache import CachedRows, write_cache
from sg2img.data.coco_stuff import CocoStuff, synthesize_relationships
from sg2img.data.datamodule import SG2ImgDataModule
from sg2img.data.jsonl import JsonlManifest
from sg2img.data.laion_sg import LaionSG
from sg2img.data.rows import Example, Preprocess, SkipLog, Skipped, TrainBatch, collate
from sg2img.data.shapes import Shapes
from sg2img.data.visual_genome import VisualGenome
from sg2img.data.webdataset import WebDatasetShards, write_shards
from sg2img.graph import geometric_predicate

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
