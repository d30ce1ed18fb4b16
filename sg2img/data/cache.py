"""An encoder cache: the frozen encoders run once, and training then costs only the UNet.

``write_cache(module, source, out)`` stores, per row, the VAE posterior (mean and log-variance, so the
latent is still *sampled* at train time, exactly as without the cache), the CLIP image embedding and
(optionally) patch tokens, and the caption's text embeddings, in safetensors shards of ``shard_size``
rows next to a JSON sidecar with keys, captions and scene graphs. ``CachedRows(dir)`` reads it back as a
source for the data module.
"""

from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ip_adapter.atomic_files import atomic_write
from sg2img.data.rows import Preprocess, SkipLog, collate
from sg2img.graph import SceneGraph

log = logging.getLogger(__name__)
FORMAT = 1
INDEX = "index.json"
FIELDS = ("latent_dist", "image_embeds", "patch_tokens", "text_embeds")


@torch.no_grad()
def write_cache(
    module,
    source: Dataset,
    out: str | Path,
    batch_size: int = 16,
    num_workers: int = 0,
    shard_size: int = 1024,
    dtype: str = "float16",
    patch_tokens: bool | None = None,
) -> dict[str, Any]:
    """Encode every row of ``source`` with ``module``'s frozen encoders into ``out``; returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module.configure_model()
    model = module.model  # the frozen base and the adapter (sg2img.train.adapter_model)
    store = getattr(torch, dtype)
    if patch_tokens is None:
        patch_tokens = model.image_settings.tokens == "patch"
    need = module.data_requirements()
    source.transform = Preprocess(need["resolution"], need["clip_size"], model.tokenizer)
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    fields = [f for f in FIELDS if f != "patch_tokens" or patch_tokens]
    if not model.has_image:  # a model without an image branch reads (and caches) no image features
        fields = [f for f in fields if f not in ("image_embeds", "patch_tokens")]
    skips = SkipLog()
    shards: list[int] = []
    pending: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
    meta: list[dict[str, Any]] = []

    def flush() -> None:
        if not meta:
            return
        name = f"shard-{len(shards):05d}"
        tensors = {f: torch.cat(pending[f]).to(store).contiguous() for f in fields}
        atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        text = json.dumps(meta)
        atomic_write(out / f"{name}.json", lambda tmp: tmp.write_text(text))
        shards.append(len(meta))
        meta.clear()
        for f in fields:
            pending[f].clear()

    for batch in loader:
        skips.add(batch.skipped)
        if batch.batch_size == 0:
            continue
        encoded = model.encode_batch(batch.to(model.device))
        for j in range(batch.batch_size):
            for f in fields:
                pending[f].append(encoded[f][j : j + 1].cpu())
            meta.append({"key": batch.keys[j], "caption": batch.captions[j]})
        graphs = batch_graphs(batch) if batch.graphs is not None else [None] * batch.batch_size
        for m, g in zip(meta[len(meta) - batch.batch_size :], graphs):
            m["scene_graph"] = g.to_json() if g is not None else None
        if len(meta) >= shard_size:
            flush()
    flush()
    index = {
        "format": FORMAT,
        "rows": sum(shards),
        "shards": shards,
        "fields": fields,
        "dtype": dtype,
        "base": model.base,
        "image_encoder": model.base_settings.image_encoder,
        "resolution": need["resolution"],
        "clip_size": need["clip_size"],
        "skipped": skips.total,
    }
    atomic_write(out / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    if skips.total:
        log.warning("%s", skips.summary())
    return index


def batch_graphs(batch) -> list[SceneGraph]:
    """The scene graphs of a collated batch, back from its label-index form."""
    from sg2img.graph import Relationship, SGObject

    out = []
    for d in batch.graphs.to_data_list():
        objects = tuple(
            SGObject(batch.labels[int(i)], (), tuple(float(v) for v in b) if bool(h) else None)
            for i, b, h in zip(d.obj_label, d.box, d.has_box)
        )
        rels = tuple(
            Relationship(int(s), batch.labels[int(p)], int(o))
            for (s, o), p in zip(d.edge_index.t().tolist(), d.pred_label)
        )
        out.append(SceneGraph(objects, rels))
    return out


class CachedRows(Dataset):
    """Rows of an encoder cache written by ``write_cache`` / ``sg2img cache``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._index: dict[str, Any] | None = None  # read on first use: configs can name a cache to come
        self._meta: dict[int, list[dict[str, Any]]] = {}

    @property
    def index(self) -> dict[str, Any]:
        if self._index is None:
            path = self.root / INDEX
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not an encoder cache (write one with `sg2img cache`)")
            index = json.loads(path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"{path}: cache format {index.get('format')!r}, expected {FORMAT}")
            self.starts = [0]
            for n in index["shards"]:
                self.starts.append(self.starts[-1] + n)
            self._index = index
        return self._index

    def __len__(self) -> int:
        return self.index["rows"]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, j = self._locate(i)
        name = self.root / f"shard-{shard:05d}"
        if shard not in self._meta:
            self._meta[shard] = json.loads(Path(f"{name}.json").read_text())
        m = self._meta[shard][j]
        row: dict[str, Any] = {"key": m["key"], "caption": m["caption"]}
        sg = m.get("scene_graph")
        row["graph"] = (
            SceneGraph.from_json(sg, source=f"{name}.json", path=f"[{j}].scene_graph")
            if sg is not None
            else None
        )
        with safe_open(f"{name}.safetensors", framework="pt") as f:
            for field in self.index["fields"]:
                row[field] = f.get_slice(field)[j : j + 1][0].float()
        return row
