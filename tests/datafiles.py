"""Small fixture datasets written in each source's real on-disk format."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")


def shapes_image(
    path: Path, items: list[tuple[str, str, tuple[float, float, float, float]]], size=(48, 40)
) -> None:
    im = Image.new("RGB", size, (235, 235, 235))
    d = ImageDraw.Draw(im)
    w, h = size
    for color, shape, (x0, y0, x1, y1) in items:
        box = (x0 * w, y0 * h, x1 * w, y1 * h)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_manifest(root: Path, n: int = 8, seed: int = 0, bad_rows: bool = False) -> Path:
    """``root/train.jsonl`` with ``n`` rows of two coloured shapes; optionally plus three bad rows."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        c1, c2 = rng.sample(sorted(COLORS), 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        b1, b2 = (0.05, 0.2, 0.45, 0.8), (0.55, 0.2, 0.95, 0.8)
        shapes_image(root / "images" / f"{i:03d}.png", [(c1, s1, b1), (c2, s2, b2)])
        graph = {
            "objects": [
                {"name": s1, "attributes": [c1], "box": list(b1)},
                {"name": s2, "attributes": [c2], "box": list(b2)},
            ],
            "relationships": [[0, "left of", 1]],
        }
        lines.append(
            json.dumps(
                {
                    "image": f"images/{i:03d}.png",
                    "caption": f"a {c1} {s1} left of a {c2} {s2}",
                    "scene_graph": graph,
                }
            )
        )
    if bad_rows:
        (root / "images" / "broken.png").write_bytes(b"not an image")
        good_graph = {"objects": ["circle"], "relationships": []}
        lines.insert(1, json.dumps({"image": "images/broken.png", "caption": "x", "scene_graph": good_graph}))
        lines.insert(3, '{"image": "images/000.png", "caption": "unterminated')
        lines.insert(
            5,
            json.dumps(
                {
                    "image": "images/000.png",
                    "caption": "x",
                    "scene_graph": {"objects": ["a"], "relationships": [[0, "on", 7]]},
                }
            ),
        )
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# Faults planted among good rows: (what, the JSONL line, the words the skip reason must hold).
def plant_faults(root: Path, manifest: Path) -> list[tuple[str, str]]:
    """Append one row of every kind of fault to ``manifest`` (its images under ``root/images``); returns
    (line, expected reason fragment) for each, in file order."""
    images = root / "images"
    good = images / "000.png"
    data = good.read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])  # a valid header, then nothing
    (images / "empty.png").write_bytes(b"")
    (images / "text.jpg").write_bytes(b"<html>404 not found</html>")
    graph = {"objects": ["circle", "square"], "relationships": [[0, "left of", 1]]}
    rows = [
        (json.dumps({"image": "images/truncated.png", "caption": "x", "scene_graph": graph}), "truncated"),
        (
            json.dumps({"image": "images/empty.png", "caption": "x", "scene_graph": graph}),
            "UnidentifiedImageError",
        ),
        (
            json.dumps({"image": "images/text.jpg", "caption": "x", "scene_graph": graph}),
            "UnidentifiedImageError",
        ),
        (json.dumps({"image": "images/gone.png", "caption": "x", "scene_graph": graph}), "FileNotFoundError"),
        ('{"image": "images/000.png", "caption": "cut off', "not valid JSON"),
        ('["images/000.png", "x"]', "a row must be a JSON object"),
        (
            json.dumps({"image": "images/000.png", "caption": 5, "scene_graph": graph}),
            "'caption' must be a string",
        ),
        (
            json.dumps(
                {
                    "image": "images/000.png",
                    "scene_graph": {"objects": ["a", "b"], "relationships": [[True, "on", 1]]},
                }
            ),
            "relationships[0][0]",
        ),
        (
            json.dumps({"image": "images/000.png", "scene_graph": {"objects": "circle"}}),
            "objects: must be an array, got string",
        ),
    ]
    with open(manifest, "a") as f:
        for line, _ in rows:
            f.write(line + "\n")
    return [(line, reason) for line, reason in rows]


def write_visual_genome(root: Path) -> Path:
    """Three images in VG's raw JSON layout; image 3 has only tiny objects, image 2 a missing file."""
    images, objects, rels, attrs = [], [], [], []
    for image_id in (1, 2, 3):
        folder = "VG_100K" if image_id != 2 else "VG_100K_2"
        images.append(
            {"image_id": image_id, "url": f"https://x/{folder}/{image_id}.jpg", "width": 100, "height": 80}
        )
        size = 40 if image_id != 3 else 10
        objs = [
            {"object_id": 10 * image_id + k, "x": 5 + 30 * k, "y": 10, "w": size, "h": size, "names": [name]}
            for k, name in enumerate(["Dog", "frisbee", "tree"])
        ]
        if image_id == 1:  # a single instance: below any vocabulary threshold above 1
            objs.append({"object_id": 19, "x": 0, "y": 0, "w": 50, "h": 50, "names": ["rare thing"]})
        objects.append({"image_id": image_id, "objects": objs})
        rels.append({"image_id": image_id, "relationships": [
            {"relationship_id": 1, "predicate": "Catches", "subject": {"object_id": 10 * image_id}, "object": {"object_id": 10 * image_id + 1}},
            {"relationship_id": 2, "predicate": "near", "subject": {"object_id": 10 * image_id}, "object": {"object_id": 10 * image_id + 2}},
        ]})  # fmt: skip
        attrs.append(
            {
                "image_id": image_id,
                "attributes": [
                    {
                        "object_id": 10 * image_id,
                        "attributes": ["Brown", "small"] if image_id == 1 else ["brown"],
                    }
                ],
            }
        )
        if image_id != 2:
            Image.new("RGB", (100, 80), (90, 120, 60)).save(_mk(root / "images" / folder / f"{image_id}.jpg"))
    for name, data in (
        ("image_data", images),
        ("objects", objects),
        ("relationships", rels),
        ("attributes", attrs),
    ):
        (root / f"{name}.json").write_text(json.dumps(data))
    return root


def write_coco_stuff(root: Path) -> Path:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 200, "height": 100} for i in (1, 2, 3)]
    images.append({"id": 4, "file_name": "small.jpg", "width": 40, "height": 30})  # below image_min_size
    cats = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
    ]
    stuff_cats = [
        {"id": 149, "name": "grass", "supercategory": "plant"},
        {"id": 183, "name": "other", "supercategory": "other"},
    ]
    inst = []
    for i in (1, 2, 3, 4):
        inst.append(
            {
                "id": 100 + i,
                "image_id": i,
                "category_id": 1,
                "bbox": [10, 10, 60, 60],
                "area": 1,
                "iscrowd": 0,
            }
        )
        inst.append(
            {
                "id": 200 + i,
                "image_id": i,
                "category_id": 18,
                "bbox": [120, 20, 50, 50],
                "area": 1,
                "iscrowd": 0,
            }
        )
        inst.append(
            {"id": 300 + i, "image_id": i, "category_id": 18, "bbox": [1, 1, 2, 2], "area": 1, "iscrowd": 0}
        )  # tiny
    stuff = [
        {"id": 400 + i, "image_id": i, "category_id": c, "bbox": [0, 50, 200, 50], "area": 1, "iscrowd": 0}
        for i in (1, 2, 4) for c in (149, 183)
    ]  # fmt: skip
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": inst, "categories": cats})
    )
    (ann / "stuff_val2017.json").write_text(
        json.dumps({"images": images, "annotations": stuff, "categories": stuff_cats})
    )
    caps = [{"id": 7, "image_id": 1, "caption": "A person and a dog on grass."}]
    (ann / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": caps}))
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (100, 150, 100)).save(
            _mk(root / "val2017" / im["file_name"])
        )
    return root


def write_laion_sg(root: Path) -> Path:
    entries = [
        {"name": "a.jpg", "img_id": "a", "caption_ori": "a brown dog on a sofa", "score": 6.1, "url": "http://x/a.jpg",
         "items": [{"item_id": 0, "label": "dog", "attributes": ["brown"], "global_item_id": 5},
                   {"item_id": 1, "label": "sofa", "attributes": [], "global_item_id": 6}],
         "relations": [{"triple_id": 0, "item1": 0, "relation": "on", "item2": 1}]},
        {"name": "b.jpg", "img_id": "b", "caption_ori": "broken", "items": [{"item_id": 0, "label": "cat", "attributes": []}],
         "relations": [{"triple_id": 0, "item1": 0, "relation": "near", "item2": 3}]},
    ]  # fmt: skip
    Image.new("RGB", (64, 48), (200, 180, 150)).save(_mk(root / "images" / "a.jpg"))
    Image.new("RGB", (64, 48), (20, 80, 150)).save(_mk(root / "images" / "b.jpg"))
    (root / "laion_sg.json").write_text(json.dumps(entries))
    return root / "laion_sg.json"


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class PauseAfterStep(L.Callback):
    """For runs that a test kills: once step ``step`` is done (its checkpoint written), the run writes
    ``DIR/paused`` and waits to be killed, so the kill always lands mid-run, however fast the steps are."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            (Path(trainer.default_root_dir) / "paused").write_text(str(trainer.global_step))
            while True:
                time.sleep(1)


SMALL_GNN = {"num_layers": 1, "hidden_dim": 16, "mlp_dim": 32}


def tiny_fit_args(
    cfg: Path,
    manifest: Path,
    *,
    batch_size: int,
    workers: int = 0,
    gnn: dict[str, int] | None = None,
    checkpoint_every: int | None = None,
    keep: int = -1,
    **trainer: Any,
) -> list[str]:
    """Write ``cfg``: a fit on the tiny preset over a JSONL ``manifest`` (``trainer``: Trainer settings;
    ``checkpoint_every``: a ModelCheckpoint every N steps keeping ``keep`` besides last.ckpt). Returns the
    ``sg2img fit`` arguments for base.yaml, model/tiny.yaml and ``cfg``."""
    settings: dict[str, Any] = {"enable_progress_bar": False, **trainer}
    if checkpoint_every is not None:
        settings["callbacks"] = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": checkpoint_every, "save_last": True, "save_top_k": keep},
            }
        ]
    data = {"class_path": "sg2img.data.JsonlManifest", "init_args": {"manifest": str(manifest)}}
    config = {
        "model": {"graph": {"gnn": gnn or SMALL_GNN}},
        "data": {"train": data, "batch_size": batch_size, "num_workers": workers},
        "trainer": settings,
    }
    cfg.write_text(yaml.safe_dump(config))
    files = [CONFIGS / "base.yaml", CONFIGS / "model" / "tiny.yaml", cfg]
    return ["fit", *(a for f in files for a in ("--config", str(f)))]
