"""What every data source yields, how a row becomes tensors, and the typed training batch.

A source yields ``Example`` rows (a PIL image, a caption, a ``SceneGraph``). ``Preprocess`` turns a row into
tensors: target pixels in [-1, 1] (resize of the shorter side, center crop), CLIP pixels (the CLIP image
processor) and caption token ids. ``collate`` packs rows into a ``TrainBatch`` whose graphs are a
torch-geometric batch of label indices plus the batch's label strings; the model embeds those strings.

A row that cannot be read becomes a ``Skipped`` marker instead of an exception: the batch carries the
markers, the training module counts and logs them, and a long run never ends on one bad file.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch_geometric.data import Batch
from torchvision.transforms.v2 import functional as TF

from sg2img.graph import SceneGraph
from sg2img.graph_batch import graphs_to_label_batch


@dataclass
class Example:
    """One decoded row of any source."""

    key: str
    image: Image.Image
    caption: str
    graph: SceneGraph | None  # None: a row without a scene graph (image-and-caption data)


@dataclass(frozen=True)
class Skipped:
    """A row that could not be used, and why (the first line of the error, with file and field)."""

    key: str
    reason: str


def skipped(key: str, error: BaseException) -> Skipped:
    msg = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return Skipped(key, f"{type(error).__name__}: {msg}")


@dataclass
class TrainBatch:
    """A training batch. Raw rows fill ``pixels``/``clip_pixels``/``input_ids``; rows read from an encoder
    cache (``sg2img cache``) fill ``latent_dist``/``image_embeds``/``patch_tokens``/``text_embeds``."""

    keys: list[str]
    captions: list[str]
    graphs: Batch | None  # obj_label/pred_label index into ``labels``; edge_index, box, has_box. None:
    # some rows have no scene graph (allowed only when the model has no graph branch)
    labels: list[str]
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    clip_pixels: torch.Tensor | None = None  # (B, 3, S, S), CLIP-normalised
    input_ids: torch.Tensor | None = None  # (B, 77)
    latent_dist: torch.Tensor | None = None  # (B, 2*4, h, w): VAE posterior mean and log-variance
    image_embeds: torch.Tensor | None = None  # (B, projection_dim)
    patch_tokens: torch.Tensor | None = None  # (B, 1 + L, hidden)
    text_embeds: torch.Tensor | None = None  # (B, 77, cross_attention_dim)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, **kwargs: Any) -> TrainBatch:
        """Every tensor (and the graph batch) on ``device``; Lightning calls this to move the batch."""
        moved = {
            f.name: (
                getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), (torch.Tensor, Batch))
                else getattr(self, f.name)
            )
            for f in dataclasses.fields(self)
        }
        return TrainBatch(**moved)


class Preprocess:
    """Row -> tensors. ``resolution``: the target image side; ``clip_size``: the CLIP tower's input side
    (None: the model reads no CLIP pixels, and none are made)."""

    def __init__(self, resolution: int, clip_size: int | None, tokenizer, max_length: int = 77):
        from ip_adapter.image_encoder import clip_image_processor

        self.resolution, self.clip_size = resolution, clip_size
        self.tokenizer, self.max_length = tokenizer, max_length
        self.clip_processor = clip_image_processor(clip_size) if clip_size else None

    def target_pixels(self, image: Image.Image) -> torch.Tensor:
        x = TF.pil_to_tensor(image.convert("RGB"))
        x = TF.resize(x, self.resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.center_crop(x, [self.resolution, self.resolution])
        return x.float().div(127.5).sub(1.0)  # [-1, 1]

    def __call__(self, ex: Example) -> dict[str, Any]:
        ids = self.tokenizer(
            ex.caption, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids[0]
        row = {
            "key": ex.key,
            "caption": ex.caption,
            "graph": ex.graph,
            "pixels": self.target_pixels(ex.image),
            "input_ids": ids,
        }
        if self.clip_processor is not None:
            rgb = ex.image.convert("RGB")
            row["clip_pixels"] = self.clip_processor(images=rgb, return_tensors="pt").pixel_values[0]
        return row


TENSOR_FIELDS = (
    "pixels",
    "clip_pixels",
    "input_ids",
    "latent_dist",
    "image_embeds",
    "patch_tokens",
    "text_embeds",
)


NO_GRAPH = "no scene graph, and the model's graph branch is on"


def collate(rows: list[dict[str, Any] | Skipped], require_graph: bool = False) -> TrainBatch:
    """Rows (dicts from ``Preprocess`` or a cache) and ``Skipped`` markers -> one ``TrainBatch``. With
    ``require_graph`` (a model with a graph branch) a row without a scene graph becomes a ``Skipped``."""
    rows = [
        Skipped(r["key"], NO_GRAPH)
        if require_graph and not isinstance(r, Skipped) and r["graph"] is None
        else r
        for r in rows
    ]
    good = [r for r in rows if not isinstance(r, Skipped)]
    bad = [r for r in rows if isinstance(r, Skipped)]
    if not good:  # every row was skipped: an empty batch the trainer counts and passes over
        return TrainBatch(keys=[], captions=[], graphs=Batch(), labels=[], skipped=bad)
    graphs: Batch | None
    if any(r["graph"] is None for r in good):
        graphs, labels = None, []
    else:
        graphs, labels = graphs_to_label_batch([r["graph"] for r in good])
    tensors = {
        name: torch.stack([r[name] for r in good]) if good and name in good[0] else None
        for name in TENSOR_FIELDS
    }
    return TrainBatch(
        keys=[r["key"] for r in good],
        captions=[r["caption"] for r in good],
        graphs=graphs,
        labels=labels,
        skipped=bad,
        **tensors,
    )


def reason_kind(reason: str) -> str:
    """A skip reason without what names one row (paths, ``file:line:`` prefixes, numbers), so that rows
    that failed the same way are counted together: ``ValueError: not valid JSON (... column N)``."""
    kind, _, msg = reason.partition(": ")
    # leading "…/m.jsonl:12: ", "…/a b.png: "
    msg = re.sub(r"^(?:[^:'\"]*[/\\][^:'\"]*(?::\d+)?: )+", "", msg)
    msg = re.sub(r"'[^']*[/\\][^']*'", "FILE", msg)  # quoted paths
    msg = re.sub(r"\d+", "N", msg)
    return f"{kind}: {msg}" if msg else kind


class SkipLog:
    """Distinct skipped rows counted by kind of failure (``reason_kind``), with a few example rows and their
    full reasons each, for the end-of-run summary. A row met again in a later epoch is counted once."""

    def __init__(self, examples_per_reason: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}  # kind -> ["key: full reason", ...]
        self.seen: set[str] = set()
        self.k = examples_per_reason

    def add(self, rows: list[Skipped]) -> None:
        for r in rows:
            if r.key in self.seen:
                continue
            self.seen.add(r.key)
            kind = reason_kind(r.reason)
            self.counts[kind] += 1
            shown = self.examples.setdefault(kind, [])
            if len(shown) < self.k:
                shown.append(r.reason if r.key in r.reason else f"{r.key}: {r.reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (a checkpoint loads it with ``weights_only=True``)."""
        return {"counts": dict(self.counts), "examples": self.examples, "seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = Counter(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        self.seen = set(state["seen"])

    def summary(self) -> str:
        if not self.total:
            return "skipped rows: none"
        lines = [f"skipped rows: {self.total}"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {n:>8}  {kind}")
            lines.extend(f"            e.g. {example}" for example in self.examples[kind])
        return "\n".join(lines)
