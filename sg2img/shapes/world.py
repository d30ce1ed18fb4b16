"""The shapes world: a procedurally rendered scene-graph benchmark that fits on a CPU, with an evaluator.

Each image holds 2-4 objects on a plain background: a shape (circle, square, triangle) in a colour from a
fixed palette, each colour at most once per image, objects apart from each other and no pair within 10
degrees of a diagonal (where the relation would be ambiguous). The scene graph names
each object by its shape with its colour as an attribute ("red circle"), and relates every pair with
left of / right of / above / below, from the object centres by sg2im's angle rule. Rendering is
deterministic: row i of a split is drawn from a generator seeded with (seed, split, i).

``ShapesEvaluator`` needs no learned weights: it segments each palette colour, takes its centroid and a
rough shape class (how much of its bounding box the colour fills), and scores an image against a graph:

- object recall: the share of the graph's objects found with the right colour and shape;
- relation accuracy: the share of triples whose two objects are both found (by colour) for which the
  angle rule on the found centres gives the graph's predicate (chance is 1/4 for a random layout);
- graph accuracy: the share of images where every object is found and every triple holds.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sg2img.graph import SceneGraph, geometric_predicate

SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (25, 25, 230),
    "yellow": (240, 230, 20),
    "magenta": (230, 25, 230),
    "cyan": (20, 225, 230),
}
BACKGROUND = (128, 128, 128)
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 20_000, "val": 500, "test": 500}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    centre: tuple[float, float]  # normalised (x, y), y down
    radius: float  # normalised half-size

    @property
    def box(self) -> tuple[float, float, float, float]:
        x, y, r = *self.centre, self.radius
        return (x - r, y - r, x + r, y + r)


JUDGED_PREDICATES = ("left of", "right of", "above", "below")  # what the angle rule gives two centres


def centre_predicate(s: tuple[float, float], o: tuple[float, float]) -> str:
    """sg2im's angle rule on two centres (the subject's relation to the object)."""
    return geometric_predicate((*s, *s), (*o, *o))


def _clear_of_diagonals(a: tuple[float, float], b: tuple[float, float], margin_deg: float) -> bool:
    """Whether the direction a -> b is more than ``margin_deg`` from every diagonal, where the angle
    rule switches predicate: then a few pixels of error cannot flip the relation."""
    angle = np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0])) % 90.0
    return abs(angle - 45.0) > margin_deg


def sample_scene(
    rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4, margin_deg: float = 10.0
) -> list[ShapeObject]:
    """Objects at random places, apart from each other, every pair's direction clear of the diagonals."""
    n = int(rng.integers(min_objects, max_objects + 1))
    colours = rng.choice(len(PALETTE), size=n, replace=False)
    radius = 0.12
    objects: list[ShapeObject] = []
    while len(objects) < n:
        centre = tuple(float(v) for v in rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
        if all(
            np.hypot(centre[0] - o.centre[0], centre[1] - o.centre[1]) > 2.4 * radius
            and _clear_of_diagonals(centre, o.centre, margin_deg)
            for o in objects
        ):
            name = list(PALETTE)[int(colours[len(objects)])]
            objects.append(ShapeObject(SHAPES[int(rng.integers(len(SHAPES)))], name, centre, radius))
    return objects


def render(objects: list[ShapeObject], size: int = 32, supersample: int = 4) -> Image.Image:
    """Draw at ``supersample`` times the size, then reduce with nearest sampling (crisp, exact colours)."""
    big = size * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x, y, r = o.centre[0] * big, o.centre[1] * big, o.radius * big
        fill = PALETTE[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85  # equal area-ish to the circle, so size does not give the shape away
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        else:
            # equilateral, inscribed in the circle: its centroid is the object's centre
            draw.polygon([(x, y - r), (x + 0.866 * r, y + r / 2), (x - 0.866 * r, y + r / 2)], fill=fill)
    return img.resize((size, size), Image.Resampling.NEAREST)


def scene_graph(objects: list[ShapeObject]) -> SceneGraph:
    """Every object, and one triple per pair (lower index as subject), from the centres."""
    triples = [
        [i, centre_predicate(objects[i].centre, objects[j].centre), j]
        for i, j in itertools.combinations(range(len(objects)), 2)
    ]
    return SceneGraph.from_json(
        {
            "objects": [{"name": o.shape, "attributes": [o.colour], "box": list(o.box)} for o in objects],
            "relationships": triples,
        },
        source="shapes",
    )


def objects_from_graph(graph: SceneGraph) -> list[ShapeObject]:
    """The objects a shapes-world graph describes (shape name, colour attribute, box), to render it again.
    Raises ``ValueError`` naming the object when one is not a shapes-world object."""
    out = []
    for i, o in enumerate(graph.objects):
        colour = o.attributes[0] if o.attributes else None
        if o.name not in SHAPES or colour not in PALETTE or o.box is None:
            raise ValueError(
                f"objects[{i}] ({o.label!r}, box {o.box}) is not a shapes-world object: it needs a name in "
                f"{list(SHAPES)}, a colour attribute in {list(PALETTE)} and a box"
            )
        x0, y0, x1, y1 = o.box
        out.append(ShapeObject(o.name, colour, ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2))
    return out


CAPTION_WORDS = frozenset({"a", "an", "and", "the", "left", "right", "of", "above", "below"})


def outside_world(graphs: list[SceneGraph | None], prompt: str | None) -> list[str]:
    """The words of ``graphs`` and ``prompt`` this world has never shown its models (sorted, each once):
    object names that are not shapes, attributes that are not colours, predicates the angle rule does not
    give, and prompt words its captions never use."""
    known = CAPTION_WORDS | set(SHAPES) | set(PALETTE)
    words: set[str] = set()
    for g in graphs:
        if g is None:
            continue
        words |= {o.name for o in g.objects if o.name not in SHAPES}
        words |= {a for o in g.objects for a in o.attributes if a not in PALETTE}
        words |= {r.predicate for r in g.relationships if r.predicate not in JUDGED_PREDICATES}
    if prompt:
        words |= {w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in known}
    return sorted(words)


def caption(graph: SceneGraph, relations: bool = False) -> str:
    names = [f"a {o.label}" for o in graph.objects]
    if not relations:
        return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    return "; ".join(
        f"a {graph.objects[r.subject].label} {r.predicate} a {graph.objects[r.object].label}"
        for r in graph.relationships
    )


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    centre: tuple[float, float]
    pixels: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # the colour's pixels, normalised


def _shape_class(box: np.ndarray) -> str:
    """From the colour's mask inside its bounding box: a square fills all four corners, a triangle (apex
    up) the bottom two only, a circle none; the fill ratio decides what the corners leave open."""
    h, w = box.shape
    k = max(1, round(0.2 * min(h, w)))
    corners = [box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()]
    top, bottom = corners[0] + corners[1], corners[2] + corners[3]
    if min(corners) > 0.5:
        return "square"
    if bottom > 1.0 and top < 0.5:
        return "triangle"
    return "circle" if box.mean() > 0.62 else "triangle"


class ShapesEvaluator:
    """Scores images against shapes-world graphs by colour segmentation (see the module docstring)."""

    def __init__(self, colour_tolerance: float = 60.0, min_fraction: float = 0.25):
        self.colour_tolerance = colour_tolerance
        self.min_fraction = min_fraction  # of the area a rendered object covers

    def cannot_judge(self, graph: SceneGraph) -> str | None:
        """Why this evaluator cannot score images of ``graph``, or None: it finds objects by their colour
        (one object per colour, each a shape of the world) and judges the angle rule's four predicates."""
        colours: dict[str, int] = {}
        for i, o in enumerate(graph.objects):
            colour = o.attributes[0] if o.attributes else None
            if o.name not in SHAPES or colour not in PALETTE:
                return (
                    f"objects[{i}] ({o.label!r}) is not a shapes-world object: a shape in {list(SHAPES)} with "
                    f"a colour attribute in {list(PALETTE)}"
                )
            if colour in colours:
                return f"objects[{colours[colour]}] and objects[{i}] are both {colour}: the evaluator tells objects apart by colour"
            colours[colour] = i
        for j, r in enumerate(graph.relationships):
            if r.predicate not in JUDGED_PREDICATES:
                return f"relationships[{j}]: predicate {r.predicate!r} is not judged (only {list(JUDGED_PREDICATES)})"
        return None

    def find(self, image: Image.Image) -> dict[str, Found]:
        a = np.asarray(image.convert("RGB"), dtype=np.float32)
        h, w = a.shape[:2]
        expected = np.pi * (0.12 * min(h, w)) ** 2 * 0.75  # the smallest rendered shape, roughly
        out = {}
        for name, rgb in PALETTE.items():
            mask = np.linalg.norm(a - np.asarray(rgb, dtype=np.float32), axis=-1) < self.colour_tolerance
            count = int(mask.sum())
            if count < self.min_fraction * expected:
                continue
            ys, xs = np.nonzero(mask)
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            extent = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
            centre = ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h)
            out[name] = Found(name, _shape_class(box), centre, count, tuple(float(v) for v in extent))
        return out

    def score(self, image: Image.Image, graph: SceneGraph) -> dict[str, float]:
        """Per-image counts: objects, objects found, triples judged, triples that hold, graph correct."""
        found = self.find(image)
        objects_ok = 0
        for o in graph.objects:
            f = found.get(o.attributes[0] if o.attributes else "")
            objects_ok += int(f is not None and f.shape == o.name)
        judged = held = 0
        for r in graph.relationships:
            s, o = (found.get(graph.objects[k].attributes[0]) for k in (r.subject, r.object))
            if s is None or o is None:
                continue
            judged += 1
            held += int(centre_predicate(s.centre, o.centre) == r.predicate)
        n_obj, n_rel = len(graph.objects), len(graph.relationships)
        return {
            "objects": n_obj,
            "objects_found": objects_ok,
            "triples": n_rel,
            "triples_judged": judged,
            "triples_held": held,
            "graph_correct": float(objects_ok == n_obj and held == n_rel),
        }

    def evaluate(
        self, images: list[Image.Image], graphs: list[SceneGraph], resamples: int = 1000
    ) -> dict[str, float]:
        """The totals over every image, and for each figure its standard error: the spread over
        ``resamples`` bootstrap resamples of the images (seeded; triples of one image are not independent,
        so images are what is resampled)."""
        if len(images) != len(graphs):
            raise ValueError(f"{len(images)} images for {len(graphs)} graphs")
        return self.summarise([self.score(i, g) for i, g in zip(images, graphs)], resamples)

    @staticmethod
    def summarise(rows: list[dict[str, float]], resamples: int = 1000) -> dict[str, float]:
        """``evaluate`` from the per-image counts of ``score``."""
        if not rows:
            raise ValueError("no images to evaluate")
        c = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}

        def figures(w: np.ndarray) -> dict[str, np.ndarray]:  # w: (R, n) weights (counts of each image)
            total = {k: w @ v for k, v in c.items()}
            return {
                "object_recall": total["objects_found"] / np.maximum(total["objects"], 1),
                "relation_accuracy": total["triples_held"] / np.maximum(total["triples_judged"], 1),
                "relations_judged": total["triples_judged"] / np.maximum(total["triples"], 1),
                "graph_accuracy": total["graph_correct"] / len(rows),
            }

        point = {k: float(v[0]) for k, v in figures(np.ones((1, len(rows)))).items()}
        out: dict[str, float] = {"images": len(rows), **point}
        if resamples and len(rows) > 1:
            rng = np.random.default_rng(0)
            picks = rng.integers(0, len(rows), size=(resamples, len(rows)))
            w = np.zeros((resamples, len(rows)))
            np.add.at(w, (np.arange(resamples)[:, None], picks), 1.0)
            for k, v in figures(w).items():
                if k != "relations_judged":
                    out[f"{k}_se"] = float(v.std(ddof=1))
        return out


__all__ = [
    "PALETTE",
    "SHAPES",
    "ShapeObject",
    "ShapesEvaluator",
    "caption",
    "centre_predicate",
    "objects_from_graph",
    "render",
    "sample_scene",
    "scene_graph",
]
