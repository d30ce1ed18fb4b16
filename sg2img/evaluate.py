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

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .graph import Limits, SceneGraph, load_scene_graphs

PROMPTS = ("objects", "relations", "none")
IMAGE_PROMPTS = ("auto", "reference", "none")
RESULT = "shapes-eval.json"
MANIFEST = "samples.jsonl"  # one row per image of a samples folder (see sg2img.metrics.read_samples)


def shapes_rows(args: argparse.Namespace) -> tuple[list[SceneGraph], list[str]]:
    """(graphs, names): a file's graphs, or the first ``n`` rows of the split."""
    from .data.shapes import Shapes

    if args.graphs is not None:
        graphs = list(load_scene_graphs(args.graphs, Limits()))
        if not graphs:
            raise ValueError(f"{args.graphs}: the file holds an empty list of graphs")
        return graphs[: args.n] if args.n else graphs, [
            f"{Path(args.graphs).stem}-{i:02d}" for i in range(len(graphs))
        ]
    source = Shapes(args.split, seed=args.world_seed)
    n = min(args.n or len(source), len(source))
    return [source.example(i).graph for i in range(n)], [f"{args.split}-{i:05d}" for i in range(n)]


def prompt_for(graph: SceneGraph, mode: str) -> str:
    from .data.shapes import caption

    if mode == "none":
        return ""
    return caption(graph, relations=mode == "relations")


def check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "num_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")


def run_shapes(args: argparse.Namespace) -> dict[str, Any]:
    from .data.shapes import ShapesEvaluator
    from .generate import _device_and_dtype, build_pipeline, versions

    check_args(args)
    graphs, names = shapes_rows(args)  # before any model loads
    if args.num_images > 1:  # K images per graph, each with its own seed: graph-major order
        k = args.num_images
        graphs = [g for g in graphs for _ in range(k)]
        names = [f"{name}-{j:02d}" for name in names for j in range(k)]
    refs = reference_images(graphs)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    pipe, info = build_pipeline(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    use_graph = pipe.sg_adapter is not None and pipe.sg_adapter.config.graph_branch
    has_image = pipe.sg_adapter is not None and pipe.sg_adapter.config.image_branch
    use_image = args.image_prompt == "reference" or (args.image_prompt == "auto" and has_image)
    if use_image and not has_image:
        raise ValueError("--image-prompt reference needs an adapter with an image branch")
    prompts = [prompt_for(g, args.prompt) for g in graphs]
    images: list[Image.Image] = []
    start = time.perf_counter()
    for lo in range(0, len(graphs), args.batch_size):
        hi = min(lo + args.batch_size, len(graphs))
        out = pipe(
            prompt=prompts[lo:hi],
            scene_graph=graphs[lo:hi] if use_graph else None,
            ip_adapter_image=refs[lo:hi] if use_image else None,
            sg_scale=args.sg_scale,
            image_scale=args.image_scale if use_image else 0.0,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=[torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(lo, hi)],
        )
        images.extend(out.images)
    seconds = time.perf_counter() - start
    scores = ShapesEvaluator().evaluate(images, graphs)
    record = {
        "scores": scores,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("func", "command", "what")
        },
        "graph_branch_used": use_graph,
        "image_prompt_used": use_image,
        "generation_seconds": round(seconds, 2),
        **info,
        "versions": versions(),
    }
    if args.out is not None:
        ref_names = [n.rsplit("-", 1)[0] for n in names] if args.num_images > 1 else names
        save_outputs(args.out, images, graphs, prompts, names, refs, ref_names, record, args.save_images)
    return record


def reference_images(graphs: list[SceneGraph]) -> list[Image.Image]:
    """Each graph rendered by the shapes world (from its boxes): the ground truth, and the image prompt."""
    from .data.shapes import objects_from_graph, render

    out = []
    for i, g in enumerate(graphs):
        try:
            out.append(render(objects_from_graph(g)))
        except ValueError as e:
            raise ValueError(f"graph {i}: {e}") from None
    return out


def save_outputs(
    out: Path,
    images: list[Image.Image],
    graphs: list[SceneGraph],
    prompts: list[str],
    names: list[str],
    refs: list[Image.Image],
    ref_names: list[str],
    record: dict[str, Any],
    save_images: bool,
) -> None:
    from .data.shapes import ShapesEvaluator
    from .drawing import contact_sheet, draw_scene_graph

    (out / "refs").mkdir(parents=True, exist_ok=True)
    evaluator = ShapesEvaluator()
    per_image, manifest = [], []
    for i, (img, g, p, name) in enumerate(zip(images, graphs, prompts, names)):
        s = evaluator.score(img, g)
        per_image.append({"name": name, "prompt": p, **s})
        if save_images or i < 16:
            img.save(out / f"{name}.png")
            caption = f"{p or '(empty prompt)'} | relations {s['triples_held']}/{s['triples']}"
            contact_sheet(draw_scene_graph(g, size=256), [img], caption).save(out / f"{name}-sheet.png")
            ref = f"{ref_names[i]}.png"
            if not (out / "refs" / ref).is_file():
                refs[i].save(out / "refs" / ref)
            manifest.append({"file": f"{name}.png", "prompt": p, "graph": g.to_json(), "ref": ref})
    (out / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in manifest))
    (out / RESULT).write_text(json.dumps({**record, "images": per_image}, indent=2) + "\n")


def format_scores(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())


def add_shapes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="base: default the embedded shapes base (or a base file, folder, ...)"
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="adapter file; `none` for the base alone; default: the embedded adapter with the embedded base",
    )
    p.add_argument("--image-encoder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-file-config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help="rows of the split to evaluate (default: all)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--world-seed", type=int, default=0, help="the shapes world's seed (as in training)")
    p.add_argument(
        "--graphs", type=Path, default=None, help="a scene-graph file to evaluate instead of a split"
    )
    p.add_argument("--num-images", type=int, default=1, help="images per graph (seeds go on counting)")
    p.add_argument("--prompt", choices=PROMPTS, default="objects", help="what the text prompt holds")
    p.add_argument(
        "--image-prompt",
        choices=IMAGE_PROMPTS,
        default="auto",
        help="the graph's rendering as image prompt (auto: when the adapter has an image branch)",
    )
    p.add_argument("--sg-scale", type=float, default=1.0)
    p.add_argument("--image-scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=None, help=f"write {RESULT}, images and contact sheets here")
    p.add_argument("--save-images", action="store_true", help="save every image (default: the first 16)")


__all__ = ["PROMPTS", "add_shapes_arguments", "format_scores", "run_shapes"]
