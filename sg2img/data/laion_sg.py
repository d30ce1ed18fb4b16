"""LAION-SG annotations with local images.

The annotation file is a JSON list of entries::

    {"name": "000123.jpg", "img_id": "...", "caption_ori": "...",
     "items": [{"item_id": 0, "label": "dog", "attributes": ["brown"], "global_item_id": 7}, ...],
     "relations": [{"triple_id": 0, "item1": 0, "relation": "on", "item2": 1}, ...]}

``item1``/``item2`` refer to ``item_id``. Images are read from ``images_dir / name``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sg2img.data.base import RowSource, open_image
from sg2img.data.rows import Example
from sg2img.graph import Relationship, SceneGraph, SGObject


class LaionSG(RowSource):
    def __init__(self, annotations: str | Path, images_dir: str | Path, max_objects: int | None = None):
        self.annotations = Path(annotations)
        self.images_dir = Path(images_dir)
        self.max_objects = max_objects

    def _index(self) -> list[Any]:
        if not self.annotations.is_file():
            raise FileNotFoundError(f"{self.annotations}: no such LAION-SG annotation file")
        with open(self.annotations) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(
                f"{self.annotations}: expected a JSON list of entries, got {type(data).__name__}"
            )
        return data

    def key(self, i: int) -> str:
        e = self._rows()[i]
        return f"laion-sg:{e.get('img_id', e.get('name', i)) if isinstance(e, dict) else i}"

    def graph(self, e: dict[str, Any], where: str) -> SceneGraph:
        items = e.get("items")
        if not isinstance(items, list):
            raise ValueError(f"{where}: field 'items' must be a list")
        if self.max_objects is not None:
            items = items[: self.max_objects]
        index, objects = {}, []
        for j, it in enumerate(items):
            label = it.get("label") if isinstance(it, dict) else None
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"{where}: items[{j}].label must be a non-empty string, got {label!r}")
            attrs = tuple(str(a).strip() for a in it.get("attributes") or [] if str(a).strip())
            index[it.get("item_id", j)] = len(objects)
            objects.append(SGObject(label.strip(), attrs))
        rels = []
        for j, r in enumerate(e.get("relations") or []):
            if not isinstance(r, dict) or not isinstance(r.get("relation"), str):
                raise ValueError(f"{where}: relations[{j}] must have a string 'relation'")
            s, o = r.get("item1"), r.get("item2")
            if s not in index or o not in index:
                if self.max_objects is not None:
                    continue  # the relation points at an item cut by max_objects
                raise ValueError(f"{where}: relations[{j}]: item1={s!r}/item2={o!r} is not an item_id")
            rels.append(Relationship(index[s], r["relation"].strip(), index[o]))
        return SceneGraph(tuple(objects), tuple(rels))

    def example(self, i: int) -> Example:
        e = self._rows()[i]
        where = f"{self.annotations}: [{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ValueError(f"{where}: an entry needs a string 'name'")
        graph = self.graph(e, where)
        caption = e.get("caption_ori") or graph.describe()
        return Example(
            key=self.key(i), image=open_image(self.images_dir / e["name"]), caption=str(caption), graph=graph
        )
