"""The shapes world as a data source: rows of rendered images, captions and graphs (``sg2img.shapes.world``
draws them)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from sg2img.data.base import RowSource
from sg2img.data.rows import Example
from sg2img.shapes.world import (
    DEFAULT_SIZES,
    PALETTE,
    SPLITS,
    ShapeObject,
    caption,
    render,
    sample_scene,
    scene_graph,
)


class Shapes(RowSource):
    """One split of the shapes world (a map-style source of ``Example`` rows).

    Args:
        split: ``train``, ``val`` or ``test`` (fixed, disjoint generator streams).
        size: image side in pixels.
        num_rows: rows in the split (default: 20,000 / 500 / 500).
        caption_relations: put the relations into the caption (the text baseline); default: objects only.
            A number in (0, 1) is the share of rows whose caption has them (drawn per row, seeded).
        seed: the world's seed.
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        size: int = 32,
        num_rows: int | None = None,
        caption_relations: bool | float = False,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 4,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 1 <= min_objects <= max_objects <= len(PALETTE):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(PALETTE)}")
        self.split, self.size, self.seed = split, size, seed
        self.num_rows = DEFAULT_SIZES[split] if num_rows is None else num_rows
        if not 0.0 <= float(caption_relations) <= 1.0:
            raise ValueError(
                f"caption_relations must be a bool or a share in [0, 1], got {caption_relations}"
            )
        self.caption_relations = float(caption_relations)
        self.min_objects, self.max_objects = min_objects, max_objects

    def _index(self) -> list[int]:
        return list(range(self.num_rows))

    def key(self, i: int) -> str:
        return f"shapes/{self.split}/{i}"

    def objects(self, i: int) -> list[ShapeObject]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        return sample_scene(rng, self.min_objects, self.max_objects)

    def example(self, i: int) -> Example:
        objects = self.objects(i)
        graph = scene_graph(objects)
        p = self.caption_relations
        relations = p >= 1.0 or (
            p > 0.0 and np.random.default_rng([self.seed, SPLITS[self.split], i, 1]).random() < p
        )
        return Example(self.key(i), render(objects, self.size), caption(graph, relations), graph)
