"""Metrics over folders of images: ``sg2img evaluate --samples DIR [--refs DIR] --metrics ...``.

- ``clip-t``: the mean cosine between each image's CLIP embedding and its prompt's, or, for an image made
  without a text prompt, its caption's (IP-Adapter's CLIP-T: the caption of the image prompt; torchmetrics' ``CLIPScore`` is 100 * max(cosine, 0) of the same embeddings, and reads HF models only);
- ``clip-i``: the mean cosine between the CLIP image embeddings of each image and its reference
  (IP-Adapter's CLIP-I: the reference is the image prompt);
- ``fid``: torchmetrics' ``FrechetInceptionDistance`` between the samples and every image of ``--refs``,
  on Inception-v3 features from a local weights file (``--inception FILE``: torch-fidelity's
  ``pt_inception-2015-12-05`` weights), on the CLIP image embeddings (``--fid-features clip``) or on any
  ``nn.Module`` a factory returns (``--fid-features module:package.module:factory``);
- ``shapes``: the shapes world's evaluator (object recall, relation accuracy, graph accuracy);
- ``sg-geometry``: sg2im's geometric rule (left of / right of / above / below / inside / surrounding)
  applied to the boxes a detector finds for the graph's objects, for COCO-Stuff-style graphs. The detector
  is pluggable: ``shapes`` (the shapes world's colour segmentation), ``torchvision:NAME`` with
  ``--detector-weights FILE`` (a torchvision COCO detector; labels are COCO's category names), or
  ``module:package.module:factory`` (a callable image -> list of ``Detection``).

CLIP is any open_clip or transformers model: ``open_clip:NAME`` (a model name, or a model config .json)
with ``--clip-pretrained`` a weights file (or an open_clip tag, which downloads), or ``hf:PATH_OR_ID`` /
a local folder holding a transformers ``CLIPModel`` with its processor.

A samples folder pairs its images with prompts, graphs and references through ``samples.jsonl`` (one row
per image: ``file``, optional ``prompt``, ``caption`` (what the image should show, for CLIP-T when the
prompt is empty), ``graph``, ``ref`` relative to ``--refs``), which ``sg2img
evaluate shapes|coco --out`` write; without it, every image in the folder counts, ``NAME.txt`` holds its
prompt, ``NAME.json`` its graph and the image of the same name in ``--refs`` its reference.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ip_adapter.image_encoder import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sg2img.data.base import open_image as decode_image
from sg2img.graph import SceneGraph, SceneGraphError, load_scene_graphs

METRICS = ("clip-t", "clip-i", "fid", "shapes", "sg-geometry")
MANIFEST = "samples.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GEOMETRIC_PREDICATES = ("left of", "right of", "above", "below", "inside", "surrounding")
OPENAI_MEAN, OPENAI_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # CLIP's pixel normalisation


class MetricError(ValueError):
    pass


# --- samples ---------------------------------------------------------------------------------------
@dataclass
class Sample:
    path: Path
    prompt: str | None = None
    graph: SceneGraph | None = None
    ref: Path | None = None
    caption: str | None = None  # what the image should show, where no text prompt said it

    @property
    def text(self) -> str | None:
        """What CLIP-T compares the image with: its prompt, or its caption when the prompt is empty."""
        return self.prompt or self.caption or self.prompt


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise MetricError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _manifest_rows(samples: Path, refs: Path | None) -> list[Sample]:
    manifest = samples / MANIFEST
    out = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise MetricError(f"{where}: a row needs a `file` (a string), got {line[:80]!r}")
        prompt, caption = row.get("prompt"), row.get("caption")
        if prompt is not None and not isinstance(prompt, str):
            raise MetricError(f"{where}: `prompt` must be a string, got {prompt!r}")
        if caption is not None and not isinstance(caption, str):
            raise MetricError(f"{where}: `caption` must be a string, got {caption!r}")
        graph = SceneGraph.from_json(row["graph"], source=where, path="graph") if "graph" in row else None
        ref = row.get("ref")
        if ref is not None and not isinstance(ref, str):
            raise MetricError(f"{where}: `ref` must be a file name, got {ref!r}")
        out.append(
            Sample(
                samples / row["file"],
                prompt,
                graph,
                (refs / ref) if refs is not None and ref else None,
                caption,
            )
        )
    return out


def _sidecar_rows(samples: Path, refs: Path | None) -> list[Sample]:
    ref_by_stem = {p.stem: p for p in image_files(refs)} if refs is not None else {}
    out = []
    for path in image_files(samples):
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        prompt = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        graph = None
        if js.is_file():
            graphs = load_scene_graphs(js)
            if len(graphs) != 1:
                raise MetricError(f"{js}: a sample's graph file holds one graph, found {len(graphs)}")
            graph = graphs[0]
        out.append(Sample(path, prompt, graph, ref_by_stem.get(path.stem)))
    return out


def read_samples(samples: Path, refs: Path | None = None) -> list[Sample]:
    """The samples of a folder (see the module docstring), each file checked to exist."""
    samples = Path(samples)
    if refs is not None and not Path(refs).is_dir():
        raise MetricError(f"--refs {refs}: not a folder")
    try:
        rows = (
            _manifest_rows(samples, refs) if (samples / MANIFEST).is_file() else _sidecar_rows(samples, refs)
        )
    except SceneGraphError as e:
        raise MetricError(str(e)) from None
    if not rows:
        raise MetricError(f"{samples}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {MANIFEST}")
    for s in rows:
        for p in (s.path, s.ref):
            if p is not None and not p.is_file():
                raise MetricError(f"{samples}: {p} is listed but does not exist")
    return rows


def open_image(path: Path) -> Image.Image:
    """``data.open_image`` (fully decoded, RGB), its failure a ``MetricError`` naming the file."""
    try:
        return decode_image(path)
    except OSError as e:  # UnidentifiedImageError included
        raise MetricError(f"{path}: not a readable image ({e})") from None


def _need(samples: Sequence[Sample], field: str, metric: str, how: str, what: str | None = None) -> None:
    missing = [s.path.name for s in samples if getattr(s, field) is None]
    if missing:
        raise MetricError(
            f"{metric} needs a {what or field} for every sample; {len(missing)} have none "
            f"(first: {missing[0]}); {how}"
        )


# --- CLIP ------------------------------------------------------------------------------------------
class ClipModel:
    """Normalised CLIP image and text embeddings from an open_clip or a transformers model."""

    def __init__(
        self,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        name: str,
    ):
        self._encode_image, self._encode_text = encode_image, encode_text
        self.image_size, self.mean, self.std, self.device, self.name = image_size, mean, std, device, name

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP's preprocessing: bicubic resize of the shortest edge, centre crop, mean/std."""
        from torchvision.transforms import v2

        t = v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )
        return torch.stack([t(img.convert("RGB")) for img in images]).to(self.device)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        out = [
            self._encode_image(self.pixels(images[i : i + batch_size])).float()
            for i in range(0, len(images), batch_size)
        ]
        return nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = [
            self._encode_text(list(texts[i : i + batch_size])).float()
            for i in range(0, len(texts), batch_size)
        ]
        return nn.functional.normalize(torch.cat(out), dim=-1).cpu()


def _open_clip_model(name: str, pretrained: str | None, device: torch.device) -> ClipModel:
    import open_clip

    if name.endswith(".json"):  # a model config file: register it under its stem
        path = Path(name)
        if not path.is_file():
            raise MetricError(f"--clip open_clip:{name}: no such model config file")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise MetricError(f"--clip open_clip:{name}: unknown model (open_clip.list_models() has the names)")
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise MetricError(f"--clip-pretrained {pretrained}: no such file")
    model = open_clip.create_model(name, pretrained=pretrained, device=device).eval()
    tokenizer = open_clip.get_tokenizer(name)
    cfg = model.visual
    size = cfg.image_size[0] if isinstance(cfg.image_size, (tuple, list)) else cfg.image_size
    mean = getattr(cfg, "image_mean", None) or OPENAI_MEAN
    std = getattr(cfg, "image_std", None) or OPENAI_STD
    return ClipModel(
        lambda x: model.encode_image(x),
        lambda t: model.encode_text(tokenizer(t).to(device)),
        int(size),
        mean,
        std,
        device,
        f"open_clip:{name}" + (f" ({pretrained})" if pretrained else " (random weights)"),
    )


def _transformers_clip_model(source: str, device: torch.device) -> ClipModel:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(source).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise MetricError(f"--clip {source}: cannot load a transformers CLIPModel ({e})") from None
    try:
        proc = CLIPImageProcessor.from_pretrained(source)
        mean, std = proc.image_mean, proc.image_std
    except OSError:
        mean, std = OPENAI_MEAN, OPENAI_STD
    max_len = model.config.text_config.max_position_embeddings

    def features(out: Any) -> torch.Tensor:  # a tensor, or an output object in recent transformers
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def text(t: list[str]) -> torch.Tensor:
        enc = tokenizer(t, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return features(model.get_text_features(**enc.to(device)))

    return ClipModel(
        lambda x: features(model.get_image_features(pixel_values=x)),
        text,
        int(model.config.vision_config.image_size),
        mean,
        std,
        device,
        f"transformers:{source}",
    )


def _tiny_clip_model(path: Path, device: torch.device, name: str) -> ClipModel:
    from ip_adapter.checkpoint import CheckpointError
    from sg2img.base.tokenizer import clip_tokenizer
    from sg2img.shapes.tiny_clip import encode_text, load_tiny_clip

    try:
        model, config = load_tiny_clip(path)
    except CheckpointError as e:
        raise MetricError(f"--clip {path}: {e}") from None
    model = model.to(device)
    tokenizer = clip_tokenizer()

    def text(t: list[str]) -> torch.Tensor:
        ids = tokenizer(t, padding="max_length", truncation=True, max_length=config.context_length,
                        return_tensors="pt").input_ids  # fmt: skip
        return encode_text(model, ids.to(device))

    return ClipModel(
        model.encode_image, text, config.image_size, OPENAI_MEAN, OPENAI_STD, device, f"tiny-clip:{name}"
    )


def load_clip(spec: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """``open_clip:NAME`` (+ ``pretrained``), ``hf:PATH_OR_ID``, a local transformers folder, a tiny-CLIP
    file (``sg2img fit-clip``), or ``shapes``: the shapes world's shipped tiny CLIP."""
    device = torch.device(device)
    if spec == "shapes":  # recorded by name: a record says which model, not where this machine keeps it
        from sg2img.shapes.tiny_clip import EMBEDDED_CLIP, tiny_clip_path

        return _tiny_clip_model(tiny_clip_path(EMBEDDED_CLIP), device, spec)
    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise MetricError(f"--clip {spec}: no such tiny-CLIP file")
        return _tiny_clip_model(Path(spec), device, spec)
    if spec.startswith("open_clip:"):
        return _open_clip_model(spec.split(":", 1)[1], pretrained, device)
    source = spec.split(":", 1)[1] if spec.startswith("hf:") else spec
    if not spec.startswith("hf:") and not Path(source).is_dir():
        raise MetricError(
            f"--clip {spec}: give open_clip:NAME, hf:PATH_OR_ID or a local folder of a transformers CLIPModel"
        )
    return _transformers_clip_model(source, device)


def clip_t(clip: ClipModel, samples: Sequence[Sample], img: torch.Tensor) -> dict[str, float]:
    """``img``: the samples' normalised CLIP image embeddings (``clip.images``), shared with CLIP-I."""
    _need(samples, "text", "clip-t", f"give {MANIFEST} rows a `prompt` or NAME.txt files", "prompt")
    txt = clip.texts([s.text or "" for s in samples])
    cos = (img * txt).sum(-1)
    return {"clip_t": float(cos.mean()), "clip_t_std": float(cos.std()) if len(cos) > 1 else 0.0}


def clip_i(clip: ClipModel, samples: Sequence[Sample], img: torch.Tensor) -> dict[str, float]:
    """``img``: the samples' normalised CLIP image embeddings (``clip.images``), shared with CLIP-T."""
    _need(samples, "ref", "clip-i", f"give --refs DIR (and {MANIFEST} `ref` names or same-name images)")
    ref_paths = [s.ref for s in samples]
    unique = list(dict.fromkeys(ref_paths))
    ref_emb = clip.images([open_image(p) for p in unique])
    ref = ref_emb[[unique.index(p) for p in ref_paths]]
    cos = (img * ref).sum(-1)
    return {"clip_i": float(cos.mean()), "clip_i_std": float(cos.std()) if len(cos) > 1 else 0.0}


# --- FID -------------------------------------------------------------------------------------------
class ClipFeatures(nn.Module):
    """CLIP image embeddings as a feature extractor for torchmetrics' FID (uint8 NCHW in)."""

    def __init__(self, clip: ClipModel):
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        return self.clip.images([to_pil_image(i) for i in x.cpu()])


def load_factory(spec: str, what: str) -> Any:
    """``module:package.module:attribute`` -> the attribute called with no arguments."""
    _, _, target = spec.partition(":")
    module, _, attr = target.rpartition(":")
    if not module or not attr:
        raise MetricError(f"{what} {spec}: expected module:package.module:factory")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise MetricError(f"{what} {spec}: {e}") from None
    return factory()


def fid_extractor(kind: str, inception: str | None, clip: ClipModel | None) -> nn.Module | int:
    if kind == "inception":
        if inception is None:
            raise MetricError(
                "fid with Inception features needs --inception FILE (torch-fidelity's "
                "pt_inception-2015-12-05 weights; nothing is downloaded), or --fid-features clip|module:..."
            )
        if not Path(inception).is_file():
            raise MetricError(f"--inception {inception}: no such file")
        return 2048
    if kind == "clip":
        if clip is None:
            raise MetricError("--fid-features clip needs --clip")
        return ClipFeatures(clip)
    if kind.startswith("module:"):
        module = load_factory(kind, "--fid-features")
        if not isinstance(module, nn.Module):
            raise MetricError(
                f"--fid-features {kind}: the factory returned {type(module).__name__}, not nn.Module"
            )
        return module
    raise MetricError(f"--fid-features {kind}: expected inception, clip or module:package.module:factory")


def safe_inception_copy(path: str, out_dir: Path) -> str:
    """torch-fidelity unpickles its weights file with ``weights_only=False``; so read the user's file safely
    here (safetensors, or ``torch.load(weights_only=True)``), check it is a state dict of tensors, and hand
    torch-fidelity a copy written here."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling or format fault: the file is refused, nothing of it runs
        raise MetricError(
            f"--inception {path}: not a plain state dict of tensors ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricError(f"--inception {path}: not a plain state dict of tensors")
    copy = out_dir / "inception.pt"
    torch.save(state, copy)
    return str(copy)


def _uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return torch.stack(
        [pil_to_tensor(i.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for i in images]
    )


def fid(
    images: Sequence[Image.Image],
    refs: Sequence[Image.Image],
    features: nn.Module | int,
    inception: str | None = None,
    size: int = 299,
    batch_size: int = 32,
) -> dict[str, float]:
    import tempfile

    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(images) < 2 or len(refs) < 2:
        raise MetricError(f"fid needs at least 2 samples and 2 references, got {len(images)} and {len(refs)}")
    if isinstance(features, int):
        if inception is None:
            raise MetricError("fid with Inception features needs --inception FILE")
        with tempfile.TemporaryDirectory() as tmp:
            metric = FrechetInceptionDistance(
                feature=features, feature_extractor_weights_path=safe_inception_copy(inception, Path(tmp))
            )
    else:
        metric = FrechetInceptionDistance(feature=features, input_img_size=(3, size, size))
    for real, batch in ((True, refs), (False, images)):
        for i in range(0, len(batch), batch_size):
            metric.update(_uint8(batch[i : i + batch_size], size), real=real)
    return {"fid": float(metric.compute()), "fid_samples": len(images), "fid_refs": len(refs)}


# --- scene-graph faithfulness ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), normalised to [0, 1]
    score: float = 1.0


Detector = Callable[[Image.Image], list[Detection]]


def shapes_detector(image: Image.Image) -> list[Detection]:
    """The shapes world's colour segmentation as a detector: labels "colour shape"."""
    from sg2img.shapes.world import ShapesEvaluator

    return [Detection(f"{f.colour} {f.shape}", f.box) for f in ShapesEvaluator().find(image).values()]


class TorchvisionDetector:
    """A torchvision COCO detector (``torchvision.models.detection``) with weights from a local file."""

    def __init__(self, name: str, weights: str | None, threshold: float = 0.5, device: str = "cpu"):
        from torchvision.models import detection

        builder = getattr(detection, name, None)
        if builder is None or not callable(builder):
            raise MetricError(f"--detector torchvision:{name}: no such torchvision detection model")
        if weights is None or not Path(weights).is_file():
            raise MetricError(f"--detector torchvision:{name} needs --detector-weights FILE (got {weights})")
        self.model = builder(weights=None, weights_backbone=None, num_classes=91)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise MetricError(f"--detector-weights {weights}: not weights for {name}: {e}") from None
        self.model.eval().to(device)
        self.categories = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        self.threshold, self.device = threshold, device

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> list[Detection]:
        from torchvision.transforms.functional import to_tensor

        w, h = image.size
        out = self.model([to_tensor(image.convert("RGB")).to(self.device)])[0]
        dets = []
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
            if score >= self.threshold and 0 <= label < len(self.categories):
                x0, y0, x1, y1 = box
                dets.append(Detection(self.categories[label], (x0 / w, y0 / h, x1 / w, y1 / h), score))
        return dets


def load_detector(
    spec: str, weights: str | None = None, threshold: float = 0.5, device: str = "cpu"
) -> Detector:
    if spec == "shapes":
        return shapes_detector
    if spec.startswith("torchvision:"):
        return TorchvisionDetector(spec.split(":", 1)[1], weights, threshold, device)
    if spec.startswith("module:"):
        detector = load_factory(spec, "--detector")
        if not callable(detector):
            raise MetricError(
                f"--detector {spec}: the factory returned {type(detector).__name__}, not a callable"
            )
        return detector
    raise MetricError(
        f"--detector {spec}: expected shapes, torchvision:NAME or module:package.module:factory"
    )


def _match(obj_label: str, obj_name: str, detections: list[Detection]) -> Detection | None:
    """The highest-scoring detection labelled with the object's full label, else with its name."""
    for want in (obj_label.lower(), obj_name.lower()):
        hits = [d for d in detections if d.label.lower() == want]
        if hits:
            return max(hits, key=lambda d: d.score)
    return None


def sg_geometry(
    detector: Detector, samples: Sequence[Sample], images: Sequence[Image.Image]
) -> dict[str, float]:
    """sg2im's geometric rule on detected boxes: of the geometric triples whose two objects are found, the
    share whose predicate the boxes reproduce; plus how many objects and triples the detector found."""
    from sg2img.graph import geometric_predicate

    _need(samples, "graph", "sg-geometry", f"give {MANIFEST} rows a `graph` or NAME.json files")
    objects = found = triples = judged = held = 0
    for s, img in zip(samples, images):
        graph = s.graph
        assert graph is not None
        dets = detector(img)
        boxes = [_match(o.label, o.name, dets) for o in graph.objects]
        objects += len(boxes)
        found += sum(b is not None for b in boxes)
        for r in graph.relationships:
            if r.predicate not in GEOMETRIC_PREDICATES or r.subject == r.object:
                continue
            triples += 1
            a, b = boxes[r.subject], boxes[r.object]
            if a is None or b is None:
                continue
            judged += 1
            held += int(geometric_predicate(a.box, b.box) == r.predicate)
    return {
        "geometric_accuracy": held / judged if judged else math.nan,
        "geometric_judged": judged / triples if triples else math.nan,
        "detection_recall": found / objects if objects else math.nan,
    }


def shapes_scores(samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, float]:
    from sg2img.shapes.world import ShapesEvaluator

    _need(samples, "graph", "shapes", f"give {MANIFEST} rows a `graph` or NAME.json files")
    return ShapesEvaluator().evaluate(list(images), [s.graph for s in samples])  # type: ignore[misc]


# --- all together ----------------------------------------------------------------------------------------
@dataclass
class MetricSettings:
    clip: str | None = None
    clip_pretrained: str | None = None
    fid_features: str = "inception"
    inception: str | None = None
    fid_size: int = 299
    detector: str = "shapes"
    detector_weights: str | None = None
    detector_threshold: float = 0.5
    batch_size: int = 32
    device: str = "cpu"


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise MetricError("--metrics is empty")
    if bad := [m for m in names if m not in METRICS]:
        raise MetricError(f"--metrics: unknown {bad}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def evaluate_folder(
    samples_dir: Path, refs_dir: Path | None, metrics: Sequence[str], settings: MetricSettings
) -> dict[str, Any]:
    """Every requested metric over a samples folder; all inputs are checked before any model loads."""
    samples = read_samples(samples_dir, refs_dir)
    needs_clip = {"clip-t", "clip-i"} & set(metrics) or ("fid" in metrics and settings.fid_features == "clip")
    if needs_clip and settings.clip is None:
        users = [m for m in metrics if m.startswith("clip")] or ["fid"]
        raise MetricError(f"{', '.join(users)} needs --clip")
    if "fid" in metrics and refs_dir is None:
        raise MetricError("fid needs --refs DIR (the reference images)")
    if "clip-t" in metrics:
        _need(samples, "text", "clip-t", f"give {MANIFEST} rows a `prompt` or NAME.txt files", "prompt")
    if "clip-i" in metrics:
        _need(samples, "ref", "clip-i", f"give --refs DIR (and {MANIFEST} `ref` names or same-name images)")
    if "shapes" in metrics:
        from sg2img.shapes.world import ShapesEvaluator

        evaluator = ShapesEvaluator()
        for sample in samples:
            if sample.graph is not None and (why := evaluator.cannot_judge(sample.graph)) is not None:
                raise MetricError(f"shapes cannot score {sample.path}: its graph's {why}")
    if {"shapes", "sg-geometry"} & set(metrics):
        _need(
            samples,
            "graph",
            "/".join(m for m in metrics if m in ("shapes", "sg-geometry")),
            f"give {MANIFEST} rows a `graph` or NAME.json files",
        )
    images = [open_image(s.path) for s in samples]
    clip = load_clip(settings.clip, settings.clip_pretrained, settings.device) if needs_clip else None
    # the samples' CLIP embeddings once, for CLIP-T and CLIP-I alike
    embeds = clip.images(images) if clip is not None and {"clip-t", "clip-i"} & set(metrics) else None
    scores: dict[str, Any] = {"images": len(images)}
    for name in metrics:
        if name == "clip-t":
            scores.update(clip_t(clip, samples, embeds))  # type: ignore[arg-type]
        elif name == "clip-i":
            scores.update(clip_i(clip, samples, embeds))  # type: ignore[arg-type]
        elif name == "fid":
            features = fid_extractor(settings.fid_features, settings.inception, clip)
            refs = [open_image(p) for p in image_files(refs_dir)]  # type: ignore[arg-type]
            scores.update(
                fid(images, refs, features, settings.inception, settings.fid_size, settings.batch_size)
            )
        elif name == "shapes":
            scores.update(shapes_scores(samples, images))
        elif name == "sg-geometry":
            detector = load_detector(
                settings.detector, settings.detector_weights, settings.detector_threshold, settings.device
            )
            scores.update(sg_geometry(detector, samples, images))
    return {
        "scores": scores,
        "samples": str(samples_dir),
        "refs": str(refs_dir) if refs_dir is not None else None,
        "metrics": list(metrics),
        "clip": clip.name if clip is not None else None,
        "settings": {k: v for k, v in vars(settings).items()},
    }


__all__ = [
    "METRICS",
    "ClipModel",
    "Detection",
    "MetricError",
    "MetricSettings",
    "Sample",
    "clip_i",
    "clip_t",
    "evaluate_folder",
    "fid",
    "load_clip",
    "load_detector",
    "read_samples",
    "sg_geometry",
    "shapes_detector",
]
