"""Visual Genome (v1.2/v1.4 raw JSON) with sg2im's preprocessing filters.

Reads ``image_data.json``, ``objects.json``, ``relationships.json`` and (optionally) ``attributes.json``
from ``root``; images from ``images_dir`` (the ``VG_100K``/``VG_100K_2`` sub-folders of the image URLs are
followed, else ``{image_id}.jpg``). The defaults are sg2im's ``preprocess_vg.py`` settings: a vocabulary
of object names with >= 2000 instances, attributes >= 2000, predicates >= 500; objects at least 32 px on
both sides; 3 to 30 objects, at most 30 relationships per image. Names are lower-cased and stripped.
Captions are the graph's own description (VG has no image-level caption).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from sg2img.data.base import RowSource, open_image
from sg2img.data.rows import Example
from sg2img.graph import Relationship, SceneGraph, SGObject


def _name(x: dict[str, Any]) -> str:
    names = x.get("names") or ([x["name"]] if "name" in x else [])
    if not names or not isinstance(names[0], str):
        raise ValueError(f"object {x.get('object_id', '?')}: no name")
    return names[0].strip().lower()


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing Visual Genome file")
    with open(path) as f:
        return json.load(f)


class VisualGenome(RowSource):
    def __init__(
        self,
        root: str | Path,
        images_dir: str | Path | None = None,
        image_ids: str | Path | list[int] | None = None,
        min_object_instances: int = 2000,
        min_attribute_instances: int = 2000,
        min_relationship_instances: int = 500,
        min_object_size: int = 32,
        min_objects_per_image: int = 3,
        max_objects_per_image: int = 30,
        max_relationships_per_image: int = 30,
        max_attributes_per_object: int = 3,
    ):
        self.root = Path(root)
        self.images_dir = Path(images_dir) if images_dir is not None else self.root / "images"
        self.image_ids = image_ids
        self.min_object_instances = min_object_instances
        self.min_attribute_instances = min_attribute_instances
        self.min_relationship_instances = min_relationship_instances
        self.min_object_size = min_object_size
        self.min_objects, self.max_objects = min_objects_per_image, max_objects_per_image
        self.max_relationships = max_relationships_per_image
        self.max_attributes = max_attributes_per_object

    def _index(self) -> list[dict[str, Any]]:
        images = {int(d.get("image_id", d.get("id"))): d for d in _load(self.root / "image_data.json")}
        objects = {int(d["image_id"]): d.get("objects", []) for d in _load(self.root / "objects.json")}
        rels = {
            int(d["image_id"]): d.get("relationships", []) for d in _load(self.root / "relationships.json")
        }
        attrs: dict[int, dict[int, list[str]]] = {}
        if (self.root / "attributes.json").is_file():
            for d in _load(self.root / "attributes.json"):
                attrs[int(d["image_id"])] = {
                    int(a["object_id"]): [str(s).strip().lower() for s in a.get("attributes") or []]
                    for a in d.get("attributes") or []
                    if "object_id" in a
                }
        wanted = self._wanted_ids()
        # Vocabulary counts over the whole file (sg2im counts before splitting); malformed objects are
        # left out of the counts here and reported when their image is read.
        obj_counts, attr_counts, pred_counts = Counter(), Counter(), Counter()
        for image_id, objs in objects.items():
            for o in objs:
                try:
                    obj_counts[_name(o)] += 1
                except (ValueError, TypeError, IndexError):
                    continue
                for a in attrs.get(image_id, {}).get(o.get("object_id"), []):
                    attr_counts[a] += 1
        for rs in rels.values():
            for r in rs:
                if isinstance(r.get("predicate"), str):
                    pred_counts[r["predicate"].strip().lower()] += 1
        self.object_vocab = {n for n, c in obj_counts.items() if c >= self.min_object_instances}
        self.attribute_vocab = {n for n, c in attr_counts.items() if c >= self.min_attribute_instances}
        self.predicate_vocab = {n for n, c in pred_counts.items() if c >= self.min_relationship_instances}
        rows = []
        for image_id in sorted(images):
            if wanted is not None and image_id not in wanted:
                continue
            row = {"image_id": image_id, "image": images[image_id], "objects": objects.get(image_id, []),
                   "relationships": rels.get(image_id, []), "attributes": attrs.get(image_id, {})}  # fmt: skip
            try:
                n = len(self._kept_objects(row))
            except Exception:  # malformed: keep the row so that reading it reports why
                rows.append(row)
                continue
            if self.min_objects <= n <= self.max_objects:
                rows.append(row)
        return rows

    def _wanted_ids(self) -> set[int] | None:
        if self.image_ids is None:
            return None
        if isinstance(self.image_ids, (str, Path)):
            return {int(i) for i in _load(Path(self.image_ids))}
        return {int(i) for i in self.image_ids}

    def _kept_objects(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        s = self.min_object_size
        return [
            o for o in row["objects"]
            if _name(o) in self.object_vocab and float(o["w"]) >= s and float(o["h"]) >= s
        ]  # fmt: skip

    def key(self, i: int) -> str:
        return f"vg:{self._rows()[i]['image_id']}"

    def image_path(self, image: dict[str, Any]) -> Path:
        url = str(image.get("url", ""))
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2].startswith("VG_100K"):
            candidate = self.images_dir / parts[-2] / parts[-1]
            if candidate.is_file():
                return candidate
        return self.images_dir / f"{image.get('image_id', image.get('id'))}.jpg"

    def graph(self, row: dict[str, Any]) -> SceneGraph:
        where = f"{self.root / 'objects.json'}: image_id {row['image_id']}"
        width, height = float(row["image"]["width"]), float(row["image"]["height"])
        if width <= 0 or height <= 0:
            raise ValueError(
                f"{self.root / 'image_data.json'}: image_id {row['image_id']}: size {width}x{height}"
            )
        kept = self._kept_objects(row)
        index = {int(o["object_id"]): i for i, o in enumerate(kept)}
        objects = []
        for o in kept:
            x, y, w, h = (float(o[k]) for k in ("x", "y", "w", "h"))
            box = (
                max(0.0, x / width),
                max(0.0, y / height),
                min(1.0, (x + w) / width),
                min(1.0, (y + h) / height),
            )
            attributes = [
                a for a in row["attributes"].get(int(o["object_id"]), []) if a in self.attribute_vocab
            ]
            objects.append(SGObject(_name(o), tuple(dict.fromkeys(attributes))[: self.max_attributes], box))
        relationships = []
        for r in row["relationships"]:
            pred = str(r.get("predicate", "")).strip().lower()
            try:
                s, o = int(r["subject"]["object_id"]), int(r["object"]["object_id"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{where}: relationship {r.get('relationship_id', '?')}: malformed subject/object"
                ) from None
            if pred in self.predicate_vocab and s in index and o in index:
                relationships.append(Relationship(index[s], pred, index[o]))
        return SceneGraph(tuple(objects), tuple(relationships[: self.max_relationships]))

    def example(self, i: int) -> Example:
        row = self._rows()[i]
        graph = self.graph(row)
        image = open_image(self.image_path(row["image"]))
        return Example(key=self.key(i), image=image, caption=graph.describe(), graph=graph)
