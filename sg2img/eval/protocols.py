"""``sg2img evaluate shapes``: generate from shapes-world graphs and score the images programmatically.

The graphs are the first ``--n`` rows of a split of ``sg2img.data.Shapes`` (or the graphs of a file), the
prompt is their caption (``--prompt objects``: the objects only; ``relations``: the relations too;
``none``: the empty prompt), and the images go through ``ShapesEvaluator``: object recall, relation
accuracy and graph accuracy. ``--adapter none`` evaluates the base alone (its text only); a graph reaches
the model only through an adapter with a graph branch. An adapter with an image branch gets the graph's
own rendering as its image prompt (``--image-prompt reference``, the default for such adapters: IP-Adapter's
image-variation protocol). Image i uses its own generator seeded with ``seed + i``: the same settings give
the same images and scores.

With ``--out DIR`` the images go to ``DIR`` with ``samples.jsonl`` (one row per saved image: ``file``,
``prompt``, ``graph``, ``ref``) and the graphs' renderings to ``DIR/refs``: the layout that
``sg2img evaluate --samples DIR --refs DIR/refs`` scores with any metric.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from sg2img.eval.metrics import (
    MANIFEST,  # one row per image of a samples folder (see sg2img.eval.metrics.read_samples)
)
from sg2img.graph import Limits, SceneGraph, load_scene_graphs
from sg2img.infer.generate import ModelSource

PROMPTS = ("objects", "relations", "none")
IMAGE_PROMPTS = ("auto", "reference", "none")
RESULT = "shapes-eval.json"


@dataclass(frozen=True, kw_only=True)
class ShapesEvaluation(ModelSource):
    """What ``sg2img evaluate shapes`` generates and scores (its flags, one field each).

    Args:
        n / split / world_seed: the first ``n`` rows (None: all) of a split of the shapes world of that seed.
        graphs: a scene-graph file to evaluate instead of a split.
        num_images: images per graph (seeds go on counting).
        prompt: what the text prompt holds (``PROMPTS``).
        image_prompt: the graph's rendering as image prompt (``auto``: when the adapter has an image branch).
        boxes: what the graph branch sees: ``none`` (the relations; a layout head places the objects) or
            ``given`` (the graphs' true boxes too: the oracle layout).
        sg_scale / image_scale / steps / guidance / eta / seed / batch_size / device / dtype: sampling (eta:
            DDIM's, 0 the deterministic sampler; None: the base's own, see ``GenerateSettings``).
        guidance_interval: guidance only at timesteps lo <= t <= hi (None: at every step).
        out / save_images: where the record, images and sheets go; every image or the first 16.
        config: the settings files the command read (recorded; flags after them won).
    """

    n: int | None = None
    split: Literal["train", "val", "test"] = "test"
    world_seed: int = 0
    graphs: Path | None = None
    num_images: int = 1
    prompt: Literal["objects", "relations", "none"] = "objects"
    image_prompt: Literal["auto", "reference", "none"] = "auto"
    boxes: Literal["none", "given"] = "none"
    sg_scale: float = 1.0
    image_scale: float = 1.0
    steps: int = 25
    guidance: float = 5.0
    eta: float | None = None
    guidance_interval: tuple[int, int] | None = None
    seed: int = 0
    batch_size: int = 50
    device: str = "auto"
    dtype: str = "float32"
    out: Path | None = None
    save_images: bool = False
    config: tuple[str, ...] = ()  # the settings files the command read (recorded)


@dataclass(frozen=True, kw_only=True)
class CocoEvaluation(ModelSource):
    """What ``sg2img evaluate coco`` generates and scores (IP-Adapter's protocol; its flags, one field each).

    Args:
        images / captions / n: COCO images (val2017/), their captions file, the first ``n`` by id.
        clip / clip_pretrained: the scoring CLIP (``open_clip:NAME``, ``hf:ID`` or a transformers folder).
        num_images: images per image prompt (the paper: 4).
        prompt: the text prompt, ``empty`` (the paper's) or the ``caption``.
        steps / guidance / eta / guidance_interval / image_scale / seed / batch_size / device / dtype / out:
            sampling and output.
    """

    images: Path | None = None
    captions: Path | None = None
    n: int | None = None
    clip: str | None = None
    clip_pretrained: str | None = None
    num_images: int = 4
    prompt: Literal["empty", "caption"] = "empty"
    steps: int = 50
    guidance: float = 7.5
    eta: float | None = None
    guidance_interval: tuple[int, int] | None = None
    image_scale: float = 1.0
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    out: Path = Path("build/coco-eval")
    config: tuple[str, ...] = ()  # the settings files the command read (recorded)


def shapes_rows(settings: ShapesEvaluation) -> tuple[list[SceneGraph], list[str]]:
    """(graphs, names): a file's graphs, or the first ``n`` rows of the split."""
    from sg2img.data.shapes import Shapes

    if settings.graphs is not None:
        graphs = list(load_scene_graphs(settings.graphs, Limits()))
        if not graphs:
            raise ValueError(f"{settings.graphs}: the file holds an empty list of graphs")
        return graphs[: settings.n] if settings.n else graphs, [
            f"{Path(settings.graphs).stem}-{i:02d}" for i in range(len(graphs))
        ]
    source = Shapes(settings.split, seed=settings.world_seed)
    n = min(settings.n or len(source), len(source))
    return [source.example(i).graph for i in range(n)], [f"{settings.split}-{i:05d}" for i in range(n)]


def prompt_for(graph: SceneGraph, mode: str) -> str:
    from sg2img.shapes.world import caption

    if mode == "none":
        return ""
    return caption(graph, relations=mode == "relations")


def check_args(settings: ShapesEvaluation) -> None:
    from sg2img.infer.generate import check_sampling

    check_sampling(settings, ("steps", "batch_size", "num_images"))
    if settings.n is not None and settings.n < 1:
        raise ValueError(f"--n must be at least 1, got {settings.n}")
    if settings.out is not None and Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise ValueError(
            f"--out {settings.out}: is a file, not a folder; give a folder (it is created if missing)"
        )
    graphs = settings.graphs
    if graphs is not None and Path(graphs).is_dir():
        raise ValueError(f"--graphs {graphs}: is a folder; give a JSON file holding a list of graphs")


def run_shapes(settings: ShapesEvaluation) -> dict[str, Any]:
    from sg2img.infer.generate import _device_and_dtype, build_pipeline, versions
    from sg2img.shapes.world import ShapesEvaluator

    check_args(settings)
    graphs, names = shapes_rows(settings)  # before any model loads
    evaluator = ShapesEvaluator()
    for k, g in enumerate(graphs):
        if (why := evaluator.cannot_judge(g)) is not None:
            raise ValueError(
                f"{settings.graphs or settings.split}: graph [{k}]: {why}; `evaluate shapes` scores shapes-world graphs only"
            )
    if settings.num_images > 1:  # K images per graph, each with its own seed: graph-major order
        k = settings.num_images
        graphs = [g for g in graphs for _ in range(k)]
        names = [f"{name}-{j:02d}" for name in names for j in range(k)]
    refs, not_renderable = reference_images(graphs)
    device, dtype = _device_and_dtype(settings.device, settings.dtype)
    pipe, info = build_pipeline(settings, device, dtype)
    settings = replace(settings, eta=pipe.eta_for(settings.eta))  # recorded as sampled
    pipe.set_progress_bar_config(disable=True)
    use_graph = pipe.sg_adapter is not None and pipe.sg_adapter.config.graph_branch
    has_image = pipe.sg_adapter is not None and pipe.sg_adapter.config.image_branch
    use_image = settings.image_prompt == "reference" or (settings.image_prompt == "auto" and has_image)
    if use_image and not has_image:
        raise ValueError("--image-prompt reference needs an adapter with an image branch")
    if use_image and not_renderable:
        raise ValueError(f"the image prompt is each graph's rendering, but {not_renderable}")
    prompts = [prompt_for(g, settings.prompt) for g in graphs]
    # --boxes none: the graph branch sees the relations only (its layout head places the objects); the
    # boxes stay with the evaluator, which reads colours and centres, and with the reference renderings
    shown = graphs if settings.boxes == "given" else [g.without_boxes() for g in graphs]
    images: list[Image.Image] = []
    layouts: list[list[tuple[float, float, float, float]] | None] = []
    start = time.perf_counter()
    for lo in range(0, len(graphs), settings.batch_size):
        hi = min(lo + settings.batch_size, len(graphs))
        out = pipe(
            prompt=prompts[lo:hi],
            scene_graph=shown[lo:hi] if use_graph else None,
            ip_adapter_image=refs[lo:hi] if use_image else None,
            sg_scale=settings.sg_scale,
            image_scale=settings.image_scale if use_image else 0.0,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            eta=settings.eta,
            guidance_interval=settings.guidance_interval,
            generator=[torch.Generator(device="cpu").manual_seed(settings.seed + i) for i in range(lo, hi)],
        )
        images.extend(out.images)
        layouts.extend(out.layouts if out.layouts is not None else [None] * (hi - lo))
    seconds = time.perf_counter() - start
    per_image = [evaluator.score(img, g) for img, g in zip(images, graphs)]
    record = {
        "scores": evaluator.summarise(per_image),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        "graph_branch_used": use_graph,
        "image_prompt_used": use_image,
        "generation_seconds": round(seconds, 2),
        **info,
        "versions": versions(),
    }
    if settings.out is not None:
        ref_names = [n.rsplit("-", 1)[0] for n in names] if settings.num_images > 1 else names
        save_outputs(
            settings.out,
            images,
            graphs,
            prompts,
            names,
            refs,
            ref_names,
            record,
            settings.save_images,
            per_image,
            shown,
            layouts,
        )
    return record


def reference_images(graphs: list[SceneGraph]) -> tuple[list[Image.Image | None], str | None]:
    """Each graph rendered by the shapes world from its boxes (the ground truth and the image prompt), and
    why not when a graph cannot be (no boxes, say): then its entry is None."""
    from sg2img.shapes.world import objects_from_graph, render

    out: list[Image.Image | None] = []
    why = None
    for i, g in enumerate(graphs):
        try:
            out.append(render(objects_from_graph(g)))
        except ValueError as e:
            out.append(None)
            why = why or f"graph {i}: {e}"
    return out, why


def save_outputs(
    out: Path,
    images: list[Image.Image],
    graphs: list[SceneGraph],
    prompts: list[str],
    names: list[str],
    refs: list[Image.Image | None],
    ref_names: list[str],
    record: dict[str, Any],
    save_images: bool,
    scores: list[dict[str, float]],
    shown: list[SceneGraph] | None = None,
    layouts: list[list[tuple[float, float, float, float]] | None] | None = None,
) -> None:
    """Images, one sheet per graph (its reference rendering, the graph, the layout the graph branch used,
    and every image drawn for it), the manifest and the record. ``scores``: each image's counts from the
    shapes evaluator; ``shown``: the graphs as the model saw them (without boxes under ``--boxes none``)."""
    from sg2img.drawing import contact_sheet, draw_layout, draw_scene_graph
    from sg2img.infer.generate import layout_record, layout_source

    shown = shown or graphs
    layouts = layouts or [None] * len(images)
    (out / "refs").mkdir(parents=True, exist_ok=True)
    per_image, manifest = [], []
    by_graph: dict[str, list[int]] = {}  # a graph's name -> its images, in order
    for i, graph_name in enumerate(ref_names):
        by_graph.setdefault(graph_name, []).append(i)
    sheets = list(by_graph.items()) if save_images else list(by_graph.items())[:16]
    for graph_name, idx in sheets:
        i = idx[0]
        held = ", ".join(f"{scores[k]['triples_held']}/{scores[k]['triples']}" for k in idx)
        caption = f"{prompts[i] or '(empty prompt)'} | relations held: {held}"
        layout = None
        if layouts[i] is not None:
            layout = draw_layout(shown[i], layouts[i], title=layout_source(shown[i]))
        sheet = contact_sheet(
            draw_scene_graph(graphs[i], size=256),
            [images[k] for k in idx],
            caption,
            layout=layout,
            reference=refs[i],
        )
        sheet.save(out / f"{graph_name}-sheet.png")
    for i, (img, g, p, name, s) in enumerate(zip(images, graphs, prompts, names, scores)):
        per_image.append({"name": name, "prompt": p, **s})
        if save_images or i < 16:
            img.save(out / f"{name}.png")
            row = {
                "file": f"{name}.png",
                "prompt": p,
                "caption": prompt_for(g, "objects"),
                "graph": g.to_json(),
            }
            if layouts[i] is not None:
                row["layout"] = layout_record(shown[i], layouts[i])
            if (ref := refs[i]) is not None:
                row["ref"] = f"{ref_names[i]}.png"
                if not (out / "refs" / row["ref"]).is_file():
                    ref.save(out / "refs" / row["ref"])
            manifest.append(row)
    (out / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in manifest))
    (out / RESULT).write_text(json.dumps({**record, "images": per_image}, indent=2) + "\n")


# --- IP-Adapter's COCO protocol ---------------------------------------------------------------------
PAPER_TABLE_1 = {"clip_t": 0.588, "clip_i": 0.828}  # IP-Adapter (SD1.5, 22M), Table 1 of Ye et al. 2023
COCO_RESULT = "coco-eval.json"
COCO_KEYS = (
    "images", "captions", "n", "model", "adapter", "image_encoder", "single_file_config", "clip",
    "clip_pretrained", "num_images", "prompt", "steps", "guidance", "eta", "guidance_interval", "image_scale",
    "seed", "batch_size", "device", "dtype", "channels_last", "compile", "out",
)  # fmt: skip


def coco_rows(images: Path, captions: Path, n: int | None) -> list[tuple[str, str]]:
    """(file name, caption): COCO's images by id, each with its first caption (lowest annotation id)."""
    try:
        data = json.loads(Path(captions).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--captions {captions}: cannot read a COCO captions file ({e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(f"--captions {captions}: a COCO captions file has `images` and `annotations` lists")
    first: dict[int, tuple[int, str]] = {}
    for i, a in enumerate(data["annotations"]):
        try:
            key, ann_id, text = a["image_id"], a["id"], a["caption"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{captions}: annotations[{i}] needs image_id, id and caption, got {a!r}"
            ) from None
        if not isinstance(text, str):
            raise ValueError(f"{captions}: annotations[{i}].caption must be a string, got {text!r}")
        if key not in first or ann_id < first[key][0]:
            first[key] = (ann_id, text.strip())
    rows = []
    for i, img in enumerate(
        sorted(data["images"], key=lambda x: x.get("id", 0) if isinstance(x, dict) else 0)
    ):
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            raise ValueError(f"{captions}: images[{i}] needs id and file_name, got {img!r}")
        if img["id"] in first:
            rows.append((img["file_name"], first[img["id"]][1]))
    rows = rows[:n] if n else rows
    if not rows:
        raise ValueError(f"--captions {captions}: no image has a caption")
    for name, _ in rows:
        if not (Path(images) / name).is_file():
            raise ValueError(f"--images {images}: {name} (listed in {captions}) does not exist")
    return rows


def run_coco(settings: CocoEvaluation) -> dict[str, Any]:
    """Generate from COCO images as image prompts, then CLIP-T against their captions and CLIP-I against
    the prompts themselves; the paper's figures go into the record beside ours."""
    from sg2img.eval.metrics import MetricSettings, evaluate_folder, load_clip, open_image
    from sg2img.infer.generate import _device_and_dtype, build_pipeline, check_sampling, versions

    check_sampling(settings, ("steps", "batch_size", "num_images"))
    if (
        settings.images is None
        or settings.captions is None
        or settings.clip is None
        or settings.model is None
    ):
        raise ValueError(
            "evaluate coco needs --images, --captions, --model and --clip (or a --config naming them)"
        )
    if settings.adapter is None:
        raise ValueError("evaluate coco needs --adapter (an IP-Adapter file; `none` for the base alone)")
    rows = coco_rows(settings.images, settings.captions, settings.n)
    load_clip(settings.clip, settings.clip_pretrained)  # fail on a bad CLIP before hours of generation
    device, dtype = _device_and_dtype(settings.device, settings.dtype)
    pipe, info = build_pipeline(settings, device, dtype)
    settings = replace(settings, eta=pipe.eta_for(settings.eta))  # recorded as sampled
    pipe.set_progress_bar_config(disable=True)
    has_image = pipe.sg_adapter is not None and pipe.sg_adapter.config.image_branch
    out = Path(settings.out)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    jobs = [(file, cap, k) for file, cap in rows for k in range(settings.num_images)]
    manifest = []
    start = time.perf_counter()
    for lo in range(0, len(jobs), settings.batch_size):
        batch = jobs[lo : lo + settings.batch_size]
        refs = [open_image(Path(settings.images) / f) for f, _, _ in batch]
        result = pipe(
            prompt=[c if settings.prompt == "caption" else "" for _, c, _ in batch],
            ip_adapter_image=refs if has_image else None,
            image_scale=settings.image_scale if has_image else 0.0,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            eta=settings.eta,
            guidance_interval=settings.guidance_interval,
            generator=[
                torch.Generator(device="cpu").manual_seed(settings.seed + i)
                for i in range(lo, lo + len(batch))
            ],
        )
        for (file, cap, k), img in zip(batch, result.images):
            name = f"{Path(file).stem}-{k}.png"
            img.save(samples / name)
            manifest.append({"file": name, "prompt": cap, "ref": file})
    seconds = time.perf_counter() - start
    (samples / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in manifest))
    scoring = MetricSettings(
        clip=settings.clip, clip_pretrained=settings.clip_pretrained, batch_size=settings.batch_size
    )
    scored = evaluate_folder(samples, Path(settings.images), ["clip-t", "clip-i"], scoring)
    record = {
        "scores": scored["scores"],
        "paper": {"ip_adapter_sd15": PAPER_TABLE_1},
        "clip": scored["clip"],
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items() if k in COCO_KEYS
        },
        "image_prompt_used": has_image,
        "generation_seconds": round(seconds, 2),
        **info,
        "versions": versions(),
    }
    (out / COCO_RESULT).write_text(json.dumps(record, indent=2) + "\n")
    return record


def format_scores(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())


__all__ = ["PROMPTS", "CocoEvaluation", "ShapesEvaluation", "format_scores", "run_coco", "run_shapes"]
