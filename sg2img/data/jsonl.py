"""A JSONL manifest, the format for a user's own data: one row per line,

    {"image": "images/0001.jpg", "caption": "a sheep on grass", "scene_graph": {...} | "graphs/0001.json"}

``image`` (and a ``scene_graph`` given as a path) are relative to ``image_root`` (default: the manifest's
folder). ``scene_graph`` is sg2im's JSON or the extended form; ``caption`` may be empty. A row without a
``scene_graph`` (or with ``null``) is image-and-caption data: a model with a graph branch skips it, and
refuses at start-up a manifest whose first rows have none.
"""

from __future__ import annotations

import json
from pathlib import Path

from sg2img.data.base import RowSource, open_image
from sg2img.data.rows import Example
from sg2img.graph import SceneGraph, SceneGraphError, load_scene_graphs


class JsonlManifest(RowSource):
    def __init__(self, manifest: str | Path, image_root: str | Path | None = None):
        self.manifest = Path(manifest)
        self.image_root = Path(image_root) if image_root is not None else self.manifest.parent

    def _index(self) -> list[tuple[int, int]]:
        """(byte offset, line number) of the non-blank lines: the rows themselves are read on demand."""
        if not self.manifest.is_file():
            raise FileNotFoundError(f"{self.manifest}: no such manifest")
        rows, pos = [], 0
        with open(self.manifest, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append((pos, lineno))
                pos += len(line)
        return rows

    def key(self, i: int) -> str:
        return f"{self.manifest}:{self._rows()[i][1]}"

    def example(self, i: int) -> Example:
        offset, _ = self._rows()[i]
        with open(self.manifest, "rb") as f:
            f.seek(offset)
            raw = f.readline()
        where = self.key(i)
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if "image" not in row:
            raise ValueError(f"{where}: missing field 'image'")
        if not isinstance(row["image"], str):
            raise ValueError(
                f"{where}: field 'image' must be a path string, got {type(row['image']).__name__}"
            )
        caption = row.get("caption", "")
        if not isinstance(caption, str):
            raise ValueError(f"{where}: field 'caption' must be a string, got {type(caption).__name__}")
        sg = row.get("scene_graph")
        if sg is None:  # image-and-caption data: fine for a model without a graph branch
            graph = None
        elif isinstance(sg, str):
            graphs = load_scene_graphs(self.image_root / sg)
            if len(graphs) != 1:
                raise SceneGraphError(f"expected one graph, found {len(graphs)}", str(self.image_root / sg))
            graph = graphs[0]
        else:
            graph = SceneGraph.from_json(sg, source=where, path="scene_graph")
        image = open_image(self.image_root / str(row["image"]))
        return Example(key=str(row["image"]), image=image, caption=caption, graph=graph)
