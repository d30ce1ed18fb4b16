"""WebDataset tar shards for data that outgrows one machine: each sample is an image plus a JSON record,

    000123.jpg   000123.json = {"caption": "...", "scene_graph": {...}}

Shards are split by node (torch.distributed rank) and by DataLoader worker, so every process reads its own
shards; rows are decoded here, so a bad image or record becomes a counted ``Skipped`` row, not a crash.
``write_shards`` converts any source (a JSONL manifest, Visual Genome, ...) into shards.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset

from sg2img.data.rows import Example, Skipped, skipped
from sg2img.graph import SceneGraph

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class WebDatasetShards(IterableDataset):
    """``urls``: a brace pattern (``data/shard-{000000..000099}.tar``), or a list of paths/URLs."""

    transform: Callable[[Example], Any] | None = None

    def __init__(
        self,
        urls: str | list[str],
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_length: int | None = None,
    ):
        self.urls = urls
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length  # rows per epoch per process, when the loader needs a length

    def pipeline(self):
        import webdataset as wds

        ds = wds.WebDataset(
            self.urls,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            shardshuffle=100 if self.shuffle_buffer else False,
            seed=self.seed,
            handler=wds.warn_and_continue,  # an unreadable tar member is logged and skipped
            empty_check=False,
        )
        if self.shuffle_buffer:
            ds = ds.shuffle(self.shuffle_buffer)
        return ds

    def decode(self, sample: dict[str, Any]) -> Example:
        key = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"{key}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        if "json" not in sample:
            raise ValueError(f"{key}: no .json member")
        with Image.open(io.BytesIO(sample[ext])) as im:
            im.load()
            image = im.convert("RGB")
        record = json.loads(sample["json"])
        if not isinstance(record, dict):
            raise ValueError(f"{key}.json: must be a JSON object, got {type(record).__name__}")
        sg = record.get("scene_graph")  # absent: image-and-caption data (a graph branch skips the row)
        graph = SceneGraph.from_json(sg, source=f"{key}.json", path="scene_graph") if sg is not None else None
        return Example(key=key, image=image, caption=str(record.get("caption", "")), graph=graph)

    def __iter__(self) -> Iterator[Any]:
        for sample in self.pipeline():
            try:
                ex = self.decode(sample)
                yield self.transform(ex) if self.transform is not None else ex
            except Exception as e:
                yield skipped(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}", e)


def write_shards(
    rows: Iterable[Example | Skipped], pattern: str | Path, max_count: int = 10_000
) -> list[str]:
    """Write examples as shards (``pattern`` like ``out/shard-%06d.tar``); skipped rows are left out."""
    import webdataset as wds

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written = []
    with wds.ShardWriter(str(pattern), maxcount=max_count, verbose=0) as sink:
        for i, ex in enumerate(rows):
            if isinstance(ex, Skipped):
                continue
            buf = io.BytesIO()
            ex.image.save(buf, format="PNG")
            record = {"caption": ex.caption, "key": ex.key}
            if ex.graph is not None:
                record["scene_graph"] = ex.graph.to_json()
            sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "json": json.dumps(record).encode()})
            if sink.fname not in written:
                written.append(sink.fname)
    return written
