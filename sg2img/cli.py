"""The ``sg2img`` command line. Training runs through LightningCLI (each has its own --help): ``sg2img
fit|validate|test --config ...`` (an adapter), ``sg2img fit-base`` (a small base from scratch) and ``sg2img
fit-clip`` (the shapes world's tiny CLIP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ip_adapter import CheckpointError
from sg2img.errors import ConfigurationError, NonFiniteLossError

EXIT_USAGE = 2
EXIT_FAILED = 1  # a run that stopped itself (a non-finite loss)
TRAINING_SUBCOMMANDS = ("fit", "validate", "test")  # LightningCLI (see sg2img/train/cli.py)
T = TypeVar("T")


def _cmd_info(args: argparse.Namespace) -> int:
    from sg2img.model.parameter_counts import format_rows, info_rows

    rows = info_rows(args.model, gnn=args.gnn)
    if args.json:
        print(json.dumps([{"name": r.name, "params": r.params, "indent": r.indent} for r in rows], indent=2))
    else:
        print(f"model: {args.model}  (built on the meta device; nothing allocated or downloaded)")
        print(format_rows(rows))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from sg2img.base.components import save_tiny_model
    from sg2img.infer.generate import quiet_loading

    quiet_loading()
    out = save_tiny_model(args.out, seed=args.seed)
    print(f"wrote a tiny diffusers-format SD model to {out}")
    if args.single_file is not None:
        from diffusers import StableDiffusionPipeline

        from sg2img.base.single_file import export_single_file

        pipe = StableDiffusionPipeline.from_pretrained(
            out, safety_checker=None, requires_safety_checker=False
        )
        export_single_file(pipe, args.single_file)
        print(f"wrote it as a single file to {args.single_file} (load with config={out})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from sg2img.infer.generate import GenerateSettings, run_generate

    record = run_generate(settings_from(args, GenerateSettings))
    n = sum(len(o["images"]) for o in record["outputs"])
    print(
        f"wrote {n} images and {len(record['outputs'])} contact sheets to {args.out} (settings: {args.out / 'generate.json'})"
    )
    return 0


def _cmd_evaluate_shapes(args: argparse.Namespace) -> int:
    from sg2img.eval.protocols import ShapesEvaluation, format_scores, run_shapes

    record = run_shapes(settings_from(args, ShapesEvaluation))
    print(f"model: {record['model']}\nadapter: {record['adapter']}\nprompt: {args.prompt}")
    print(format_scores(record["scores"]))
    if args.out is not None:
        print(f"wrote {args.out / 'shapes-eval.json'} and contact sheets to {args.out}")
    return 0


def _cmd_evaluate_coco(args: argparse.Namespace) -> int:
    from sg2img.eval.protocols import COCO_RESULT, CocoEvaluation, format_scores, run_coco

    record = run_coco(settings_from(args, CocoEvaluation))
    print(f"model: {record['model']}\nadapter: {record['adapter']}\nCLIP: {record['clip']}")
    print(format_scores(record["scores"]))
    paper = record["paper"]["ip_adapter_sd15"]
    print(f"paper (IP-Adapter SD1.5, Table 1): clip_t {paper['clip_t']:.3f}  clip_i {paper['clip_i']:.3f}")
    print(f"wrote {args.out / COCO_RESULT} and the images to {args.out / 'samples'}")
    return 0


def _cmd_evaluate_folder(args: argparse.Namespace) -> int:
    from sg2img.eval.metrics import MetricSettings, evaluate_folder, parse_metrics

    if args.samples is None:
        raise ValueError("give --samples DIR (a folder of images), or a subcommand: shapes, coco")
    settings = MetricSettings(
        clip=args.clip,
        clip_pretrained=args.clip_pretrained,
        fid_features=args.fid_features,
        inception=args.inception,
        fid_size=args.fid_size,
        detector=args.detector,
        detector_weights=args.detector_weights,
        detector_threshold=args.detector_threshold,
        batch_size=args.batch_size,
        device=args.device,
    )
    record = evaluate_folder(args.samples, args.refs, parse_metrics(args.metrics), settings)
    from sg2img.eval.protocols import format_scores

    print(format_scores(record["scores"]))
    if args.out is not None:
        from ip_adapter.atomic_files import atomic_write

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
        print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sg2img.shapes.demo import run_demo

    run_demo(Path(args.out), seed=args.seed)
    return 0


def _cmd_check_graph(args: argparse.Namespace) -> int:
    from sg2img.graph import Limits, SceneGraphError, load_scene_graphs

    limits = Limits(max_objects=args.max_objects, max_relationships=args.max_relationships)
    status = 0
    for path in args.files:
        try:
            graphs = load_scene_graphs(path, limits)
        except SceneGraphError as e:
            print(f"error: {e}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        if not graphs:  # as generate and evaluate say: nothing to draw is a fault of the file
            print(f"error: {path}: the file holds an empty list of graphs", file=sys.stderr)
            status = EXIT_USAGE
            continue
        for i, g in enumerate(graphs):
            where = f"{path}[{i}]" if len(graphs) > 1 else str(path)
            print(f"{where}: ok: {g.summary()}")
        if args.draw:
            from sg2img.drawing import save_scene_graph_drawing

            for i, g in enumerate(graphs):
                out = args.draw / f"{Path(path).stem}_{i}.png"
                save_scene_graph_drawing(g, out, title=f"{Path(path).name} [{i}]")
                print(f"  drawing -> {out}")
    return status


def _cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from sg2img.data.cache import write_cache
    from sg2img.train.cli import SG2ImgCLI, quiet_lightning

    quiet_lightning()
    argv = [a for c in args.config for a in ("--config", str(c))] + list(args.set or [])
    if args.print_config:  # the fit's config as resolved (jsonargparse's --print_config), then exit
        SG2ImgCLI(args=[*argv, "--print_config"], run=False)
        return 0
    if args.out is None:
        raise ValueError("--out is required: the folder the shards go to")
    cli = SG2ImgCLI(args=argv, run=False)
    module, data = cli.model, cli.datamodule
    source = data.sources[args.split]
    if source is None:
        raise ValueError(f"the config has no data.{args.split} source to cache")
    if torch.cuda.is_available():
        module.configure_model()  # built first: moving an unbuilt module would leave the encoders behind
        module.to("cuda")
    index = write_cache(
        module,
        source,
        args.out,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        shard_size=args.shard_size,
        dtype=args.dtype,
    )
    print(
        f"cached {index['rows']} rows in {len(index['shards'])} shards to {args.out} "
        f"({index['skipped']} rows skipped); train from it with data.train: sg2img.data.CachedRows"
    )
    return 0


def _help_with_default(action: argparse.Action) -> str:
    """An option's help with its default, unless it has none or the text already says it."""
    text = action.help or ""
    if (
        not action.option_strings
        or action.default is None
        or action.default is False
        or action.default == argparse.SUPPRESS
        or "default" in text
        or text == argparse.SUPPRESS
    ):
        return text
    return f"{text} (default: %(default)s)"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default, unless it has none or its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _help_with_default(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


# --- the inference commands' flags: each command's typed settings, one flag per field ---------------------
def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler flags every drawing command shares (checked by ``sg2img.infer.generate.check_sampling``),
    and the UNet's layout."""
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help="DDIM's eta: 0 deterministic, 1 DDPM's noise (default: the base's own; 0 but for a base file "
        "whose recipe set model.eta)",
    )
    p.add_argument(
        "--guidance-interval",
        type=tuple[int, int] | None,
        default=None,
        help="guidance only at timesteps LO <= t <= HI, as [LO, HI] (default: at every step)",
    )
    p.add_argument(
        "--channels-last", action="store_true",
        help="the UNet's weights in NHWC layout (faster convolutions on CPUs; images differ by rounding)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the UNet (the first run on a machine compiles for about a minute; later runs "
        "read inductor's cache; images differ by rounding)",
    )  # fmt: skip


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``sg2img generate`` (``GenerateSettings``, one field each)."""
    from sg2img.base.dtypes import DTYPES
    from sg2img.infer.generate import MAX_SIDE

    p.add_argument(
        "--graph", type=Path, help="sg2im JSON: one graph or a list (one set of outputs per graph)"
    )
    p.add_argument("--prompt", default=None, help="text prompt (default: none, i.e. the empty prompt)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--image", type=Path, default=None, help="image prompt (needs an adapter with an image branch)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="base: a diffusers folder, a single-file SD1.5 .safetensors, a base file, a hub id, a preset "
        "name, or `embedded`; default: the embedded default model (no downloads)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="sg2img adapter file or official IP-Adapter file; `none`: the base alone; default: the "
        "embedded adapter with the embedded base",
    )
    p.add_argument(
        "--image-encoder", default=None,
        help="CLIP vision tower for image prompts: folder, hub_id[:subfolder] or open_clip:MODEL[:FILE]",
    )  # fmt: skip
    p.add_argument(
        "--single-file-config", default=None, help="folder or hub id describing a single-file --model"
    )
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, the paper's)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    add_sampler_arguments(p)
    p.add_argument("--image-scale", type=float, default=1.0, help="image branch weight (lambda)")
    p.add_argument("--sg-scale", type=float, default=1.0, help="scene-graph branch weight")
    p.add_argument("--seed", type=int, default=0, help="image k of graph i uses seed + i * num_images + k")
    p.add_argument("--num-images", type=int, default=1, help="images per graph")
    p.add_argument(
        "--height", type=int, default=None,
        help=f"image height in pixels, a multiple of 8 up to {MAX_SIDE} (default: the model's own size)",
    )  # fmt: skip
    p.add_argument(
        "--width", type=int, default=None,
        help=f"image width in pixels, a multiple of 8 up to {MAX_SIDE} (default: the model's own size)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: float16 on GPU, else float32"
    )
    p.add_argument(
        "--attention-maps", action="store_true",
        help="also save each graph node's cross-attention (graph branch, mean over layers and steps)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")


def add_coco_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``sg2img evaluate coco`` (``CocoEvaluation``, one field each)."""
    p.add_argument("--images", type=Path, default=None, help="COCO images (val2017/)")
    p.add_argument("--captions", type=Path, default=None, help="COCO captions (captions_val2017.json)")
    p.add_argument("--n", type=int, default=None, help="first n images by id (default: all)")
    p.add_argument("--model", default=None, help="SD1.5 base: hub id, diffusers folder or single file")
    p.add_argument("--adapter", default=None, help="IP-Adapter file (official .bin/.safetensors or ours)")
    p.add_argument("--image-encoder", default=None, help="CLIP vision tower folder/hub id of the adapter")
    p.add_argument("--single-file-config", default=None)
    p.add_argument(
        "--clip", default=None, help="scoring CLIP: open_clip:NAME, hf:ID or a transformers folder"
    )
    p.add_argument("--clip-pretrained", default=None)
    p.add_argument("--num-images", type=int, default=4, help="images per image prompt (the paper: 4)")
    p.add_argument(
        "--prompt", choices=("empty", "caption"), default="empty", help="text prompt (the paper: empty)"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    add_sampler_arguments(p)
    p.add_argument("--image-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--out", type=Path, default=Path("build/coco-eval"))


def add_shapes_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``sg2img evaluate shapes`` (``ShapesEvaluation``, one field each)."""
    from sg2img.eval.protocols import IMAGE_PROMPTS, PROMPTS, RESULT

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
    p.add_argument(
        "--boxes",
        choices=("none", "given"),
        default="none",
        help="what the graph branch sees: the relations only (none: a layout head places the objects) or "
        "the graphs' true boxes too (given: the oracle layout)",
    )
    p.add_argument("--sg-scale", type=float, default=1.0)
    p.add_argument("--image-scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=None, help=f"write {RESULT}, images and contact sheets here")
    p.add_argument("--save-images", action="store_true", help="save every image (default: the first 16)")


def add_metric_arguments(p: Any) -> None:
    """The folder-scoring flags of ``sg2img evaluate``."""
    from sg2img.eval.metrics import METRICS

    p.add_argument("--samples", type=Path, default=None, help="a folder of generated images")
    p.add_argument("--refs", type=Path, default=None, help="reference images (CLIP-I pairs, FID's real set)")
    p.add_argument("--metrics", default="clip-t,clip-i", help=f"comma-separated: {', '.join(METRICS)}")
    p.add_argument(
        "--clip",
        default=None,
        help="open_clip:NAME, hf:PATH_OR_ID, a transformers folder, a tiny-CLIP file, or shapes (the shipped one)",
    )
    p.add_argument("--clip-pretrained", default=None, help="open_clip weights file (or tag)")
    p.add_argument("--fid-features", default="inception", help="inception, clip or module:pkg.mod:factory")
    p.add_argument("--inception", default=None, help="torch-fidelity Inception-v3 weights file (for fid)")
    p.add_argument("--fid-size", type=int, default=299, help="images are resized to this square for fid")
    p.add_argument("--detector", default="shapes", help="shapes, torchvision:NAME or module:pkg.mod:factory")
    p.add_argument("--detector-weights", default=None, help="weights file of a torchvision detector")
    p.add_argument("--detector-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")


def settings_from(values: argparse.Namespace, kind: type[T]) -> T:
    """A command's typed settings (``GenerateSettings``, ``ShapesEvaluation``, ...) from its parsed flags."""
    names = {f.name for f in dataclasses.fields(kind)}
    given = {k: v for k, v in vars(values).items() if k in names}
    if "config" in given:
        given["config"] = tuple(given["config"] or ())
    return kind(**given)


# --- the inference commands' settings: jsonargparse, as fit's, so `--config FILE` and `--print_config` ---
# work the same everywhere: a YAML of the command's settings (its flags with underscores), flags after it win
SETTINGS_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("generate",): (
        "images from scene-graph files, text and image prompts (embedded default model)",
        "sg2img.cli:add_generate_arguments",
    ),
    ("evaluate", "shapes"): (
        "generate from shapes-world test graphs and print object recall and relation accuracy",
        "sg2img.cli:add_shapes_arguments",
    ),
    ("evaluate", "coco"): (
        "IP-Adapter's protocol: COCO images as image prompts, CLIP-T vs their captions, CLIP-I vs the prompts "
        "(the protocol file: configs/eval/ip_adapter_coco2017.yaml)",
        "sg2img.cli:add_coco_arguments",
    ),
    ("evaluate",): (
        "score folders of images (--samples DIR --refs DIR --metrics ...), or generate and score: "
        "`evaluate shapes` (the shapes world), `evaluate coco` (IP-Adapter's COCO protocol)",
        "sg2img.cli:add_metric_arguments",
    ),
}


def settings_command(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The words of the settings command ``argv`` starts with (the longest that matches), if any."""
    for words in sorted(SETTINGS_COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(words)]) == words:
            return words
    return None


def settings_parser(words: tuple[str, ...], argv: Sequence[str] = ()) -> Any:
    """The jsonargparse parser of a settings command: its flags, ``--config FILE`` (repeatable) and
    ``--print_config``; its errors are one line (``ConfigurationError``) naming the setting, the file and the
    nearest valid setting."""
    import importlib

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    from sg2img.errors import describe_parse_error

    class HelpFormatter(DefaultHelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            return _help_with_default(action)

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None) -> Any:
            message = re.sub(  # flags, as the user types them, not Python names
                r"(arguments are required: )(.*)",
                lambda m: m[1] + ", ".join(f"--{k.strip().replace('_', '-')}" for k in m[2].split(",")),
                message,
            )
            raise ConfigurationError(describe_parse_error(message, self, argv, " ".join(words))) from ex

    description, where = SETTINGS_COMMANDS[words]
    parser = Parser(prog=f"sg2img {' '.join(words)}", description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a YAML of this command's settings (flags with underscores)"
    )
    module, name = where.split(":")
    getattr(importlib.import_module(module), name)(parser)
    if words == ("evaluate",):
        parser.epilog = "subcommands: sg2img evaluate shapes --help, sg2img evaluate coco --help"
    return parser


def parse_settings(argv: Sequence[str]) -> argparse.Namespace:
    """A settings command's parsed flags (``argv`` starts with its words), as the ``_cmd_*`` functions take
    them: ``command``, ``what`` and the config files (as strings) beside the settings."""
    words = settings_command(argv)
    if words is None:
        raise ValueError(f"not a settings command: {' '.join(argv[:2])}")
    parsed = settings_parser(words, argv).parse_args(list(argv[len(words) :]))
    values = parsed.as_dict()
    values["config"] = [str(c) for c in values.get("config") or []]
    return argparse.Namespace(**values, command=words[0], what=words[1] if len(words) > 1 else None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sg2img", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # listed for --help; main() hands them to LightningCLI before this parser runs (each has its own --help)
    for name, text in (
        ("fit", "train an adapter: LightningCLI, --config FILE ... (see `sg2img fit --help`)"),
        ("validate", "validate an adapter run on its config's validation data (LightningCLI)"),
        ("test", "test an adapter run on its config's test data (LightningCLI)"),
        ("fit-base", "train a small base model from scratch (LightningCLI; the shapes world's base)"),
        ("fit-clip", "train the shapes world's tiny CLIP with open_clip (LightningCLI)"),
    ):
        sub.add_parser(name, help=text, add_help=False)

    p = sub.add_parser("info", help="parameter table per component (built on the meta device)")
    p.add_argument("--model", default="sd15", help="'sd15', 'tiny', or a local diffusers model folder")
    p.add_argument(
        "--gnn",
        default="sg2im",
        help="GNN preset of the graph branch row (sg2im, gine, transformer, gatv2, tiny)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("make-tiny", help="write the tiny preset as a diffusers-format model folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--single-file", type=Path, default=None, metavar="FILE",
        help="also write it as one original-layout .safetensors (what custom SD1.5 fine-tunes ship as)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser(
        "check-graph", help="validate scene-graph JSON files (exit 2 on the first fault per file)"
    )
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--max-objects", type=int, default=256)
    p.add_argument("--max-relationships", type=int, default=2048)
    p.add_argument(
        "--draw", type=Path, default=None, metavar="DIR", help="also write a PNG drawing of each graph"
    )
    p.set_defaults(func=_cmd_check_graph)

    p = sub.add_parser(
        "cache", help="run the frozen encoders once over a config's data and store the results in shards"
    )
    p.add_argument("--config", action="append", required=True, type=Path, help="as for fit; repeatable")
    p.add_argument("--out", type=Path, help="the folder the shards go to (required)")
    p.add_argument(
        "--print_config", action="store_true", help="print the fit config the data and model come from; exit"
    )
    p.add_argument("--split", choices=("train", "val", "test"), default="train")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument(
        "--set", nargs="*", metavar="FLAG", help="extra config flags, e.g. --set --model.base.source=tiny"
    )
    p.set_defaults(func=_cmd_cache)

    for name in ("generate", "evaluate"):  # listed for --help; main() parses them with settings_parser
        sub.add_parser(name, help=SETTINGS_COMMANDS[(name,)][0], add_help=False)

    p = sub.add_parser("demo", help="end-to-end run on the tiny preset (no downloads)")
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


SETTINGS_HANDLERS = {
    ("generate",): _cmd_generate,
    ("evaluate", "shapes"): _cmd_evaluate_shapes,
    ("evaluate", "coco"): _cmd_evaluate_coco,
    ("evaluate",): _cmd_evaluate_folder,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in (*TRAINING_SUBCOMMANDS, "fit-base", "fit-clip"):
        from sg2img.train.cli import BaseModelCLI, ClipCLI, SG2ImgCLI, cli_main

        try:
            if argv[0] == "fit-base":
                cli_main(["fit", *argv[1:]], BaseModelCLI)
            elif argv[0] == "fit-clip":
                cli_main(["fit", *argv[1:]], ClipCLI)
            else:
                cli_main(argv, SG2ImgCLI)
        except ConfigurationError as e:  # settings that cannot work together: one message, no traceback
            print(f"sg2img {argv[0]}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except NonFiniteLossError as e:  # the run stopped itself; what is on disk is the last good state
            print(f"sg2img {argv[0]}: stopped: {e}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    if words := settings_command(argv):
        try:
            args = parse_settings(argv)
        except ConfigurationError as e:
            print(f"sg2img {' '.join(words)}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        args.func = SETTINGS_HANDLERS[words]
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"sg2img {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
