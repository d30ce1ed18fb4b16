"""Scene graphs: the ``SceneGraph`` type, sg2im's JSON format, validation and networkx conversion.

sg2im's format::

    {"objects": ["sheep", "grass"], "relationships": [[0, "standing on", 1]]}

or a list of such graphs. The extended form also accepted here::

    {"objects": [{"name": "circle", "attributes": ["red"], "box": [x0, y0, x1, y1]}],
     "relationships": [{"subject": 0, "predicate": "left of", "object": 1}]}

Boxes are optional and normalised to [0, 1]. Duplicate triples, self-loops and isolated objects occur in
real files and are all accepted. Parsing never mutates the caller's data; every fault raises one
``SceneGraphError`` naming the file and the JSON path, e.g.
``scene.json: relationships[3][2]: object index 9 out of range (8 objects)``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx


class SceneGraphError(ValueError):
    """An invalid scene graph, located by file and JSON path."""

    def __init__(self, message: str, source: str = "<data>", path: str = ""):
        self.source, self.path, self.reason = source, path, message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Limits:
    """Size limits: a graph beyond them is refused before any work is done on it."""

    max_file_bytes: int = 16 * 1024 * 1024
    max_graphs: int = 10_000
    max_objects: int = 256
    max_relationships: int = 2_048
    max_attributes: int = 16
    max_label_chars: int = 200


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SGObject:
    name: str
    attributes: tuple[str, ...] = ()
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1), normalised

    @property
    def label(self) -> str:
        """The open-vocabulary phrase: attributes before the name ("red circle")."""
        return " ".join((*self.attributes, self.name))


@dataclass(frozen=True)
class Relationship:
    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    objects: tuple[SGObject, ...] = ()
    relationships: tuple[Relationship, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.objects)
        for i, r in enumerate(self.relationships):
            for role, idx in (("subject", r.subject), ("object", r.object)):
                if not 0 <= idx < n:
                    raise SceneGraphError(
                        f"{role} index {idx} out of range ({n} objects)", path=f"relationships[{i}]"
                    )

    # --- reading -------------------------------------------------------------------------------
    @classmethod
    def from_json(
        cls, data: Any, source: str = "<data>", limits: Limits = DEFAULT_LIMITS, path: str = ""
    ) -> SceneGraph:
        return _parse_graph(data, source, path, limits)

    @classmethod
    def from_names(cls, objects: Sequence[str], triples: Iterable[tuple[int, str, int]] = ()) -> SceneGraph:
        return cls.from_json({"objects": list(objects), "relationships": [list(t) for t in triples]})

    def without_boxes(self) -> SceneGraph:
        """The same graph with no object boxes: what a graph branch with a layout head must place itself."""
        return SceneGraph(tuple(replace(o, box=None) for o in self.objects), self.relationships)

    @property
    def is_empty(self) -> bool:
        return not self.objects

    @property
    def triples(self) -> list[tuple[int, str, int]]:
        return [(r.subject, r.predicate, r.object) for r in self.relationships]

    def stats(self) -> dict[str, int]:
        """Counts of the real-data oddities that are accepted: duplicates, self-loops, isolated objects."""
        counts = Counter(self.triples)
        used = {i for r in self.relationships for i in (r.subject, r.object)}
        return {
            "objects": len(self.objects),
            "relationships": len(self.relationships),
            "duplicate_triples": sum(c - 1 for c in counts.values()),
            "self_loops": sum(r.subject == r.object for r in self.relationships),
            "isolated_objects": len(self.objects) - len(used),
            "boxes": sum(o.box is not None for o in self.objects),
        }

    def summary(self) -> str:
        s = self.stats()
        names = ", ".join(o.label for o in self.objects[:6]) + (", ..." if len(self.objects) > 6 else "")
        return (
            f"{s['objects']} objects, {s['relationships']} relationships "
            f"({s['duplicate_triples']} duplicate, {s['self_loops']} self-loops, "
            f"{s['isolated_objects']} isolated, {s['boxes']} boxes): {names}"
        )

    def describe(self, max_phrases: int = 8) -> str:
        """A plain-text caption: each triple as "subject predicate object", then the unrelated objects."""
        phrases = [
            f"{self.objects[r.subject].label} {r.predicate} {self.objects[r.object].label}"
            for r in self.relationships
        ]
        used = {i for r in self.relationships for i in (r.subject, r.object)}
        phrases += [o.label for i, o in enumerate(self.objects) if i not in used]
        return ", ".join(list(dict.fromkeys(phrases))[:max_phrases])

    # --- writing -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """sg2im's plain form when it can hold everything, else the extended form."""
        plain = all(not o.attributes and o.box is None for o in self.objects)
        objects: list[Any] = [
            o.name
            if plain
            else {"name": o.name, "attributes": list(o.attributes), **({"box": list(o.box)} if o.box else {})}
            for o in self.objects
        ]
        return {
            "objects": objects,
            "relationships": [[r.subject, r.predicate, r.object] for r in self.relationships],
        }

    # --- networkx ------------------------------------------------------------------------------
    def to_networkx(self) -> nx.MultiDiGraph:
        """Nodes 0..n-1 with ``name``, ``attributes``, ``box``; one edge per triple with ``predicate`` and
        ``index`` (its position in the file, so a round trip keeps the order)."""
        g = nx.MultiDiGraph()
        for i, o in enumerate(self.objects):
            g.add_node(i, name=o.name, attributes=list(o.attributes), box=list(o.box) if o.box else None)
        for k, r in enumerate(self.relationships):
            g.add_edge(r.subject, r.object, predicate=r.predicate, index=k)  # index keeps the triple order
        return g

    @classmethod
    def from_networkx(cls, g: nx.MultiDiGraph, source: str = "<networkx>") -> SceneGraph:
        nodes = list(g.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        objects = []
        for n in nodes:
            d = g.nodes[n]
            obj: dict[str, Any] = {
                "name": d.get("name", str(n)),
                "attributes": list(d.get("attributes") or []),
            }
            if d.get("box") is not None:
                obj["box"] = list(d["box"])
            objects.append(obj)
        edges = (
            g.edges(data=True, keys=True)
            if g.is_multigraph()
            else ((u, v, None, d) for u, v, d in g.edges(data=True))
        )
        ordered = sorted(enumerate(edges), key=lambda item: (item[1][3].get("index", item[0]), item[0]))
        rels = [[index[u], d.get("predicate", ""), index[v]] for _, (u, v, _, d) in ordered]
        return cls.from_json({"objects": objects, "relationships": rels}, source=source)


# --- files -----------------------------------------------------------------------------------------
def load_scene_graphs(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> list[SceneGraph]:
    """Read a JSON file holding one graph or a list of graphs."""
    p = Path(path)
    source = str(p)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise SceneGraphError(f"cannot read file ({e.strerror})", source) from e
    if size > limits.max_file_bytes:
        raise SceneGraphError(f"file is {size:,} bytes, over the limit of {limits.max_file_bytes:,}", source)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SceneGraphError(f"not UTF-8 text ({e.reason} at byte {e.start})", source) from e
    return parse_scene_graphs(text, source, limits)


def parse_scene_graphs(
    text: str, source: str = "<data>", limits: Limits = DEFAULT_LIMITS
) -> list[SceneGraph]:
    if len(text) > limits.max_file_bytes:
        raise SceneGraphError(
            f"text is {len(text):,} characters, over the limit of {limits.max_file_bytes:,}", source
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SceneGraphError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", source) from e
    except RecursionError as e:
        raise SceneGraphError("invalid JSON: nested too deeply", source) from e
    return scene_graphs_from_json(data, source, limits)


def scene_graphs_from_json(
    data: Any, source: str = "<data>", limits: Limits = DEFAULT_LIMITS
) -> list[SceneGraph]:
    if isinstance(data, list):
        if len(data) > limits.max_graphs:
            raise SceneGraphError(f"{len(data):,} graphs, over the limit of {limits.max_graphs:,}", source)
        return [_parse_graph(g, source, f"[{i}]", limits) for i, g in enumerate(data)]
    return [_parse_graph(data, source, "", limits)]


# --- parsing ---------------------------------------------------------------------------------------
def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), type(x).__name__
    )


def _parse_graph(data: Any, source: str, path: str, limits: Limits) -> SceneGraph:
    def fail(msg: str, at: str) -> SceneGraphError:
        return SceneGraphError(msg, source, at)

    if not isinstance(data, Mapping):
        raise fail(
            f"a scene graph must be an object with 'objects' and 'relationships', got {_type_name(data)}",
            path or "$",
        )
    unknown = sorted(set(data) - {"objects", "relationships", "image_id", "caption", "id"})
    if unknown:
        raise fail(f"unknown field(s) {unknown}; expected 'objects' and 'relationships'", path or "$")
    if "objects" not in data:
        raise fail("missing field 'objects'", path or "$")
    raw_objects = data["objects"]
    raw_rels = data.get("relationships", [])
    objects_path, rels_path = _join(path, "objects"), _join(path, "relationships")
    if not isinstance(raw_objects, list):
        raise fail(f"must be an array, got {_type_name(raw_objects)}", objects_path)
    if not isinstance(raw_rels, list):
        raise fail(f"must be an array, got {_type_name(raw_rels)}", rels_path)
    if len(raw_objects) > limits.max_objects:
        raise fail(f"{len(raw_objects):,} objects, over the limit of {limits.max_objects:,}", objects_path)
    if len(raw_rels) > limits.max_relationships:
        raise fail(
            f"{len(raw_rels):,} relationships, over the limit of {limits.max_relationships:,}", rels_path
        )

    objects = tuple(_parse_object(o, _join(objects_path, i), fail, limits) for i, o in enumerate(raw_objects))
    n = len(objects)
    rels = tuple(_parse_relationship(r, _join(rels_path, i), n, fail, limits) for i, r in enumerate(raw_rels))
    return SceneGraph(objects, rels)


def _label(x: Any, at: str, fail, limits: Limits) -> str:
    if not isinstance(x, str):
        raise fail(f"must be a string, got {_type_name(x)}", at)
    s = " ".join(x.split())
    if not s:
        raise fail("must not be empty", at)
    if len(s) > limits.max_label_chars:
        raise fail(f"label of {len(s):,} characters, over the limit of {limits.max_label_chars:,}", at)
    return s


def _parse_object(o: Any, at: str, fail, limits: Limits) -> SGObject:
    if isinstance(o, str):
        return SGObject(_label(o, at, fail, limits))
    if not isinstance(o, Mapping):
        raise fail(f"an object must be a string or {{'name', 'attributes', 'box'}}, got {_type_name(o)}", at)
    unknown = sorted(set(o) - {"name", "attributes", "box"})
    if unknown:
        raise fail(f"unknown field(s) {unknown}", at)
    if "name" not in o:
        raise fail("missing field 'name'", at)
    name = _label(o["name"], _join(at, "name"), fail, limits)
    raw_attrs = o.get("attributes", [])
    if not isinstance(raw_attrs, list):
        raise fail(f"must be an array of strings, got {_type_name(raw_attrs)}", _join(at, "attributes"))
    if len(raw_attrs) > limits.max_attributes:
        raise fail(
            f"{len(raw_attrs)} attributes, over the limit of {limits.max_attributes}", _join(at, "attributes")
        )
    attrs = tuple(_label(a, _join(_join(at, "attributes"), j), fail, limits) for j, a in enumerate(raw_attrs))
    box = None
    if o.get("box") is not None:
        box = _parse_box(o["box"], _join(at, "box"), fail)
    return SGObject(name, attrs, box)


def _parse_box(b: Any, at: str, fail) -> tuple[float, float, float, float]:
    if not isinstance(b, list) or len(b) != 4:
        raise fail(
            f"a box must be [x0, y0, x1, y1], got {_type_name(b)}"
            + (f" of length {len(b)}" if isinstance(b, list) else ""),
            at,
        )
    vals = []
    for j, v in enumerate(b):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise fail(f"box coordinate must be a finite number, got {v!r}", _join(at, j))
        if not 0.0 <= v <= 1.0:
            raise fail(f"box coordinate {v!r} is outside [0, 1] (boxes are normalised)", _join(at, j))
        vals.append(float(v))
    x0, y0, x1, y1 = vals
    if x1 < x0 or y1 < y0:
        raise fail(f"box {vals} has x1 < x0 or y1 < y0", at)
    return (x0, y0, x1, y1)


def _index(v: Any, at: str, n: int, fail) -> int:
    # bool is an int subclass and 1.0 == 1; neither is an index.
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(f"object index must be an integer, got {_type_name(v)} {v!r}", at)
    if not 0 <= v < n:
        raise fail(f"object index {v} out of range ({n} objects)", at)
    return v


def _parse_relationship(r: Any, at: str, n: int, fail, limits: Limits) -> Relationship:
    if isinstance(r, list):
        if len(r) != 3:
            raise fail(
                f"a relationship must be [subject, predicate, object], got an array of length {len(r)}", at
            )
        s, p, o = (_join(at, k) for k in range(3))
        return Relationship(_index(r[0], s, n, fail), _label(r[1], p, fail, limits), _index(r[2], o, n, fail))
    if isinstance(r, Mapping):
        missing = [k for k in ("subject", "predicate", "object") if k not in r]
        if missing:
            raise fail(f"missing field(s) {missing}", at)
        unknown = sorted(set(r) - {"subject", "predicate", "object"})
        if unknown:
            raise fail(f"unknown field(s) {unknown}", at)
        return Relationship(
            _index(r["subject"], _join(at, "subject"), n, fail),
            _label(r["predicate"], _join(at, "predicate"), fail, limits),
            _index(r["object"], _join(at, "object"), n, fail),
        )
    raise fail(f"a relationship must be [s, 'predicate', o] or an object, got {_type_name(r)}", at)


# --- relations from geometry ------------------------------------------------------------------------
Box = tuple[float, float, float, float]


def geometric_predicate(s: Box, o: Box) -> str:
    """sg2im's COCO rule for the predicate of subject box ``s`` and object box ``o`` (x0, y0, x1, y1)."""
    sx0, sy0, sx1, sy1 = s
    ox0, oy0, ox1, oy1 = o
    dx = (sx0 + sx1) / 2 - (ox0 + ox1) / 2
    dy = (sy0 + sy1) / 2 - (oy0 + oy1) / 2
    theta = math.atan2(dy, dx)
    if sx0 < ox0 and sx1 > ox1 and sy0 < oy0 and sy1 > oy1:
        return "surrounding"
    if sx0 > ox0 and sx1 < ox1 and sy0 > oy0 and sy1 < oy1:
        return "inside"
    if theta >= 3 * math.pi / 4 or theta <= -3 * math.pi / 4:
        return "left of"
    if -3 * math.pi / 4 <= theta < -math.pi / 4:
        return "above"
    if -math.pi / 4 <= theta < math.pi / 4:
        return "right of"
    return "below"
