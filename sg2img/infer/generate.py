"""``sg2img generate``: images from scene-graph files, text and image prompts.

Every input is read and checked before any model loads, and nothing is written until the first image
exists. For each graph (or once, with no graph) it writes ``NAME-KK.png`` per image, ``NAME-sheet.png``
(the graph drawing beside its images) and, with ``--attention-maps``, ``NAME-KK-attention.png`` plus the
raw maps in ``NAME-attention.safetensors``; ``generate.json`` records every setting, seed and version.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ip_adapter import CheckpointError
from sg2img.base.dtypes import DTYPES
from sg2img.graph import Limits, SceneGraph, load_scene_graphs

RECORD = "generate.json"
VERSIONED = (
    "sg2img",
    "torch",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "torch_geometric",
    "safetensors",
)


@dataclass(frozen=True)
class ModelSource:
    """Which base and adapter a command draws with.

    Args:
        model: a diffusers folder, a single-file SD1.5 checkpoint, a base file, a hub id, a preset name or
            ``embedded``; None: the embedded default model (no downloads).
        adapter: an sg2img or official IP-Adapter file; ``none``: the base alone; None: the embedded
            adapter with the embedded base.
        image_encoder: the CLIP vision tower for image prompts (folder, ``hub_id[:subfolder]`` or
            ``open_clip:MODEL[:FILE]``); None: the base's or the adapter's own.
        single_file_config: the folder or hub id describing a single-file ``model``.
        channels_last: the UNet's weights in NHWC layout, which oneDNN's CPU convolutions prefer (the
            same function; the order of sums changes, so images differ from the default layout's by
            rounding). ``experiments/bench/evaluate_shapes.py`` times it.
        compile: ``torch.compile`` the UNet's forward, with the adapter's processors attached (inductor).
            The first run on a machine compiles (about a minute for the shapes UNet on two cores); later
            runs read the compiled code from inductor's cache (``TORCHINDUCTOR_CACHE_DIR``) in seconds.
            The kernels fuse and reorder sums, so images differ from eager ones by rounding.
    """

    model: str | None = None
    adapter: str | None = None
    image_encoder: str | None = None
    single_file_config: str | None = None
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(ModelSource):
    """What ``sg2img generate`` draws, with what and where to (its flags, one field each).

    Args:
        out: the output folder (created if missing).
        graph: a scene-graph JSON file (one graph or a list: one set of outputs per graph).
        prompt / negative_prompt: the text prompts (None: the empty prompt).
        image: an image prompt (needs an adapter with an image branch).
        steps / guidance / eta: DDIM steps, the classifier-free guidance scale, and DDIM's eta (0: the
            deterministic sampler; 1: as much fresh noise per step as DDPM's ancestral sampler; None: the
            base's own, which a base file records and is 0 for every other model).
        guidance_interval: guidance only at timesteps lo <= t <= hi (None: at every step).
        image_scale / sg_scale: the image and scene-graph branches' weights.
        seed: image k of graph i uses seed + i * num_images + k.
        num_images: images per graph.
        height / width: in pixels, multiples of 8 up to ``MAX_SIDE`` (None: the model's own size).
        device / dtype: ``auto`` (cuda if available; float16 on GPU, else float32) or a torch name.
        attention_maps: also save each graph node's cross-attention (graph branch).
        config: the settings files the command read (recorded; flags after them won).
    """

    out: Path
    graph: Path | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    image: Path | None = None
    steps: int = 50
    guidance: float = 7.5
    eta: float | None = None
    guidance_interval: tuple[int, int] | None = None
    image_scale: float = 1.0
    sg_scale: float = 1.0
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_maps: bool = False
    config: tuple[str, ...] = ()


@dataclass
class Inputs:
    graphs: list[SceneGraph | None]
    names: list[str]
    image: Image.Image | None


MAX_SIDE = 2048  # the largest --height / --width generate accepts


def check_sampling(settings: Any, counts: tuple[str, ...] = ("steps", "num_images")) -> None:
    """The sampling flags every drawing command shares: ``counts`` at least 1, eta in [0, 1], a guidance
    interval that is one (its upper end is checked against the model's schedule when it is loaded)."""
    for name in counts:
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.eta is not None and not 0.0 <= settings.eta <= 1.0:
        raise ValueError(
            f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {settings.eta}"
        )
    interval = settings.guidance_interval
    if interval is not None and not 0 <= interval[0] <= interval[1]:
        raise ValueError(
            f"--guidance-interval must be [LO, HI] timesteps with 0 <= LO <= HI, got {list(interval)}"
        )


def read_inputs(settings: GenerateSettings) -> Inputs:
    """Read and check the graph file and image prompt (raises SceneGraphError / ValueError)."""
    check_sampling(settings)
    for name in ("height", "width"):
        v = getattr(settings, name)
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {v}")
        if v is not None and v > MAX_SIDE:
            raise ValueError(
                f"--{name} {v} is over {MAX_SIDE}, the largest side this command draws (SD1.5 is trained at "
                "512; cross-attention memory grows with the square of the pixel count)"
            )
    out = settings.out
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder; give a folder (it is created if missing)")
    if settings.prompt is None and settings.graph is None and settings.image is None:
        raise ValueError(
            "nothing to draw from: give --prompt TEXT, --graph FILE or --image FILE "
            "(with --adapter none, the base alone, --prompt)"
        )
    graphs: list[SceneGraph | None] = [None]
    names = ["prompt"]
    if settings.graph is not None and Path(settings.graph).is_dir():
        raise ValueError(
            f"--graph {settings.graph}: is a folder; give a JSON file holding one graph or a list of graphs"
        )
    if settings.graph is not None:
        loaded = load_scene_graphs(settings.graph, Limits())
        if not loaded:
            raise ValueError(f"{settings.graph}: the file holds an empty list of graphs")
        graphs = list(loaded)
        stem = Path(settings.graph).stem
        names = [stem] if len(graphs) == 1 else [f"{stem}-{i:02d}" for i in range(len(graphs))]
    image = None
    if settings.image is not None:
        try:
            with Image.open(settings.image) as im:
                image = im.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--image {settings.image}: no such file") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--image {settings.image}: not a readable image ({e})") from e
    if settings.attention_maps and settings.graph is None:
        raise ValueError("--attention-maps needs --graph: the maps show where each graph node went")
    return Inputs(graphs, names, image)


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` and ``--dtype`` flags as torch objects; a device that is not one, or is not here,
    is a ValueError naming the flag."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: not supported; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, DTYPES[dtype]


def build_pipeline(settings: ModelSource, device: torch.device, dtype: torch.dtype):
    """(pipeline, description of model and adapter for the record). No ``--model``: the embedded default
    (and its adapter unless ``--adapter`` names another, or ``none``)."""
    from sg2img.base.components import PRESETS, base_components
    from sg2img.infer.pipeline import SG2ImgPipeline
    from sg2img.shapes.embedded import DESCRIPTION, EMBEDDED, EMBEDDED_ADAPTER_FILE

    source = EMBEDDED if settings.model is None else str(settings.model)
    embedded = source == EMBEDDED
    info: dict[str, Any] = {
        "model": DESCRIPTION
        if embedded
        else f"preset {source} (random weights, seed 0)"
        if source in PRESETS
        else source
    }
    pipe = SG2ImgPipeline.from_components(base_components(source, settings.single_file_config))
    pipe.use_ddim()
    adapter = settings.adapter
    if adapter is None and embedded:
        adapter = EMBEDDED_ADAPTER_FILE
    if adapter is not None and str(adapter) != "none":
        try:
            pipe.load_sg_adapter(adapter, image_encoder=settings.image_encoder)
        except CheckpointError as e:
            if "does not match" not in str(e):
                raise
            raise ValueError(
                f"--adapter {adapter} does not fit --model {settings.model or EMBEDDED}: {fit_mismatch(adapter, pipe.unet)}"
            ) from None
        info["adapter"] = str(adapter)
        info["adapter_sha256"] = hashlib.sha256(Path(adapter).read_bytes()).hexdigest()
    else:
        info["adapter"] = None
    if device.type != "cpu" or dtype != torch.float32:  # parts are built and loaded as float32 on CPU
        pipe.to(device=device, dtype=dtype)
    if settings.channels_last:  # the convolutions' outputs follow their weights' layout
        pipe.unet.to(memory_format=torch.channels_last)
    if settings.compile:  # after the adapter's processors, which are traced with it; the pipeline's hooks
        # stay eager (they slice rows per step), and each batch size gets its own static graph
        pipe.unet.forward = torch.compile(pipe.unet.forward, dynamic=False)
    if pipe.sg_adapter is not None:
        info["adapter_config"] = pipe.sg_adapter.config.to_dict()
    info["scheduler"] = {"class": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    return pipe, info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_generate(settings: GenerateSettings) -> dict[str, Any]:
    from safetensors.torch import save_file

    from sg2img.drawing import attention_overlays, contact_sheet, draw_layout, draw_scene_graph
    from sg2img.shapes.embedded import DESCRIPTION
    from sg2img.shapes.world import PALETTE, outside_world

    inputs = read_inputs(settings)  # before any model loads: bad input costs nothing
    device, dtype = _device_and_dtype(settings.device, settings.dtype)
    quiet_loading()
    pipe, model_info = build_pipeline(settings, device, dtype)
    settings = replace(settings, eta=pipe.eta_for(settings.eta))  # recorded as sampled
    adapter = pipe.sg_adapter
    branches = (
        ("--graph", settings.graph, "graph_branch", "a graph"),
        ("--image", settings.image, "image_branch", "an image"),
    )
    for flag, given, branch, what in branches:
        if given is not None and adapter is not None and not getattr(adapter.config, branch):
            raise ValueError(
                f"{flag} needs an adapter with {what} branch, and --adapter {settings.adapter or 'embedded'} has "
                f"none; drop {flag} or pass an adapter trained with one"
            )
    if model_info["model"] == DESCRIPTION and (unknown := outside_world(inputs.graphs, settings.prompt)):
        print(
            f"warning: the embedded model knows the shapes world only, and not {', '.join(map(repr, unknown))}: "
            f"it draws coloured circles, squares and triangles ({', '.join(PALETTE)})",
            file=sys.stderr,
        )
    if pipe.sg_adapter is None and (settings.graph is not None or inputs.image is not None):
        raise ValueError(
            f"--model {settings.model} alone has no adapter: a scene graph or an image prompt needs "
            "--adapter FILE (an sg2img adapter file, or an official IP-Adapter file for image prompts)"
        )
    out: Path = settings.out
    record: dict[str, Any] = {
        "command": ["sg2img", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("sg2img") else None,
        "settings": {
            "graph": None if settings.graph is None else str(settings.graph),
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt,
            "image": None if settings.image is None else str(settings.image),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "eta": settings.eta,
            "guidance_interval": settings.guidance_interval,
            "channels_last": settings.channels_last,
            "compile": settings.compile,
            "image_scale": settings.image_scale,
            "sg_scale": settings.sg_scale,
            "seed": settings.seed,
            "num_images": settings.num_images,
            "height": settings.height,  # as asked (None: the model's own); each output records its drawn size
            "width": settings.width,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "attention_maps": settings.attention_maps,
            "config": list(settings.config),  # the settings files, flags after them won
        },
        **model_info,
        "versions": versions(),
        "outputs": [],
    }
    for i, (graph, name) in enumerate(zip(inputs.graphs, inputs.names)):
        seeds = [settings.seed + i * settings.num_images + k for k in range(settings.num_images)]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        pipe.set_progress_bar_config(desc=f"{name} ({i + 1}/{len(inputs.graphs)})", leave=False)
        result = pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            ip_adapter_image=inputs.image,
            scene_graph=graph,
            image_scale=settings.image_scale,
            sg_scale=settings.sg_scale,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            eta=settings.eta,
            guidance_interval=settings.guidance_interval,
            generator=generators,
            num_images_per_prompt=settings.num_images,
            height=settings.height,
            width=settings.width,
            attention_maps=settings.attention_maps,
        )
        out.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {
            "name": name,
            "graph": None if graph is None else graph.to_json(),
            "images": [],
        }
        for k, (img, seed) in enumerate(zip(result.images, seeds)):
            path = out / f"{name}-{k:02d}.png"
            img.save(path)
            entry["images"].append(
                {"file": path.name, "seed": seed, "width": img.width, "height": img.height}
            )
        drawing = draw_scene_graph(graph, size=256, title=name) if graph is not None else None
        caption = " | ".join(
            s for s in (settings.prompt and f"prompt: {settings.prompt}", graph is not None and f"sg_scale {settings.sg_scale}",
                        inputs.image is not None and f"image_scale {settings.image_scale}") if s
        )  # fmt: skip
        layout = None
        if result.layouts is not None and graph is not None:  # the same for every image of one graph
            entry["layout"] = layout_record(graph, result.layouts[0])
            layout = draw_layout(graph, result.layouts[0], title=layout_source(graph))
        contact_sheet(drawing, result.images, caption, layout=layout).save(out / f"{name}-sheet.png")
        entry["sheet"] = f"{name}-sheet.png"
        if result.attention_maps is not None:
            tensors, labels = {}, {}
            for k, (img, att) in enumerate(zip(result.images, result.attention_maps)):
                attention_overlays(img, att.nodes()).save(out / f"{name}-{k:02d}-attention.png")
                tensors[f"image_{k:02d}"] = att.maps.float().contiguous()
                labels[f"image_{k:02d}"] = att.labels
            save_file(
                tensors, str(out / f"{name}-attention.safetensors"), metadata={"labels": json.dumps(labels)}
            )
            entry["attention"] = [f"{name}-{k:02d}-attention.png" for k in range(len(result.images))]
        record["outputs"].append(entry)
    (out / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def fit_mismatch(adapter: str | Path, unet: torch.nn.Module) -> str:
    """Which UNet an adapter file was trained for, against the one it was given (the number of
    cross-attention layers and the key projections' shapes), in one line."""
    from ip_adapter.checkpoint import read_adapter_file

    f = read_adapter_file(adapter)
    keys = {
        k: tuple(t.shape) for k, t in f.tensors.items() if k.endswith(("to_k_sg.weight", "to_k_ip.weight"))
    }
    layers = {k.split(".")[1] for k in keys}
    shapes = sorted(set(keys.values()))
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    here = sorted({tuple(m.to_k.weight.shape) for m in attn2})
    return (
        f"the adapter was trained on a base with {len(layers)} cross-attention layers (key projections "
        f"{', '.join(map(str, shapes))}); this UNet has {len(attn2)} ({', '.join(map(str, here))}). Pass the "
        "--model it was trained on (its fit's config.yaml names it under model.base.source, or model.base in runs "
        "fitted before the settings were grouped)"
    )


def layout_source(graph: SceneGraph) -> str:
    given = sum(o.box is not None for o in graph.objects)
    if given == len(graph.objects):
        return "layout: given boxes"
    return "layout: predicted" if not given else f"layout: {given} given, the rest predicted"


def layout_record(graph: SceneGraph, boxes: list[tuple[float, float, float, float]]) -> list[dict[str, Any]]:
    """Each object's box as the graph branch used it, and whether it was given or predicted."""
    return [
        {"object": o.label, "box": [round(v, 4) for v in box], "source": "given" if o.box else "predicted"}
        for o, box in zip(graph.objects, boxes)
    ]


def quiet_loading() -> None:
    """No per-file progress bars or info logs from diffusers and transformers while models load and save."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


__all__ = [
    "GenerateSettings",
    "Inputs",
    "ModelSource",
    "build_pipeline",
    "read_inputs",
    "run_generate",
    "versions",
]
