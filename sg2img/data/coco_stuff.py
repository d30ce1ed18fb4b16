"""COCO-Stuff 2017 (``instances_*.json`` + ``stuff_*.json``) with sg2im's filters and geometric relations.

Filters, as in sg2im's ``CocoSceneGraphDataset``: images at least 64 px on the short side, images with
stuff annotations only, objects whose box covers more than 2% of the image, 3 to 8 objects per image, and
the catch-all stuff class "other" left out.

Relations are synthesized by sg2im's rule: every object picks one random partner, a coin decides which is
the subject, and the predicate follows from the boxes -- "surrounding"/"inside" when one box contains the
other, else "left of"/"above"/"right of"/"below" from the angle between centres. The random draws come from
a generator seeded with ``(seed, image_id)``, so an image's graph is the same in every run, worker and
order. (sg2im uses mask centroids; boxes give the centres here, so no masks are decoded.)

Captions come from ``captions_*.json`` when given, else from the graph's description.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from sg2img.data.base import RowSource, open_image
from sg2img.data.rows import Example
from sg2img.graph import Box, Relationship, SceneGraph, SGObject, geometric_predicate


def synthesize_relationships(boxes: list[Box], rng: random.Random) -> list[Relationship]:
    rels = []
    for cur in range(len(boxes)):
        choices = [i for i in range(len(boxes)) if i != cur]
        if not choices:
            break
        other = rng.choice(choices)
        s, o = (cur, other) if rng.random() > 0.5 else (other, cur)
        rels.append(Relationship(s, geometric_predicate(boxes[s], boxes[o]), o))
    return rels


class CocoStuff(RowSource):
    def __init__(
        self,
        instances_json: str | Path,
        stuff_json: str | Path | None,
        images_dir: str | Path,
        captions_json: str | Path | None = None,
        seed: int = 0,
        image_min_size: int = 64,
        min_object_size: float = 0.02,
        min_objects_per_image: int = 3,
        max_objects_per_image: int = 8,
        include_other: bool = False,
        stuff_only: bool = True,
    ):
        self.instances_json = Path(instances_json)
        self.stuff_json = Path(stuff_json) if stuff_json is not None else None
        self.images_dir = Path(images_dir)
        self.captions_json = Path(captions_json) if captions_json is not None else None
        self.seed = seed
        self.image_min_size, self.min_object_size = image_min_size, min_object_size
        self.min_objects, self.max_objects = min_objects_per_image, max_objects_per_image
        self.include_other = include_other
        self.stuff_only = stuff_only and self.stuff_json is not None

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing COCO annotation file")
        with open(path) as f:
            return json.load(f)

    def _index(self) -> list[dict[str, Any]]:
        files = [self.instances_json] + ([self.stuff_json] if self.stuff_json else [])
        images: dict[int, dict[str, Any]] = {}
        names: dict[int, str] = {}
        anns: dict[int, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
        has_stuff: set[int] = set()
        for path in files:
            data = self._read(path)
            for im in data.get("images", []):
                images[int(im["id"])] = im
            for c in data.get("categories", []):
                names[int(c["id"])] = str(c["name"])
            for a in data.get("annotations", []):
                anns[int(a["image_id"])].append((path, a))
                if path == self.stuff_json:
                    has_stuff.add(int(a["image_id"]))
        self.category_names = names
        captions: dict[int, str] = {}
        if self.captions_json is not None:
            for a in sorted(
                self._read(self.captions_json).get("annotations", []), key=lambda a: a.get("id", 0)
            ):
                captions.setdefault(int(a["image_id"]), str(a["caption"]).strip())
        rows = []
        for image_id in sorted(images):
            im = images[image_id]
            if min(int(im.get("width", 0)), int(im.get("height", 0))) < self.image_min_size:
                continue
            if self.stuff_only and image_id not in has_stuff:
                continue
            row = {"image": im, "annotations": anns.get(image_id, []), "caption": captions.get(image_id)}
            try:
                n = len(self._objects(row))
            except Exception:  # malformed: keep it, reading the row reports why
                rows.append(row)
                continue
            if self.min_objects <= n <= self.max_objects:
                rows.append(row)
        return rows

    def _objects(self, row: dict[str, Any]) -> list[SGObject]:
        im = row["image"]
        width, height = float(im["width"]), float(im["height"])
        out = []
        for path, a in row["annotations"]:
            where = f"{path}: annotation {a.get('id', '?')}"
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                name = self.category_names[int(a["category_id"])]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: malformed bbox or category_id") from None
            if (w * h) / (width * height) <= self.min_object_size:
                continue
            if name == "other" and not self.include_other:
                continue
            box = (x / width, y / height, min(1.0, (x + w) / width), min(1.0, (y + h) / height))
            out.append(SGObject(name, (), box))
        return out

    def key(self, i: int) -> str:
        return f"coco:{self._rows()[i]['image']['id']}"

    def graph(self, row: dict[str, Any]) -> SceneGraph:
        objects = self._objects(row)
        rng = random.Random(f"{self.seed}:{row['image']['id']}")
        rels = synthesize_relationships([o.box for o in objects], rng)
        return SceneGraph(tuple(objects), tuple(rels))

    def example(self, i: int) -> Example:
        row = self._rows()[i]
        graph = self.graph(row)
        image = open_image(self.images_dir / str(row["image"]["file_name"]))
        caption = row["caption"] if row["caption"] is not None else graph.describe()
        return Example(key=self.key(i), image=image, caption=caption, graph=graph)
