"""Held-out retrieval of a tiny CLIP: does it tell a caption from one that differs only in a binding or a
relation?

For each test row, the image scores its own caption against one hard negative of one kind:

  binding   the colours of two differently shaped objects swapped ("a red circle and a blue square" vs
            "a blue circle and a red square"): the same words, another binding;
  relation  one relation reversed ("left of" vs "right of"; captions with relations only);
  batch     top-1 among all the split's captions (the plain retrieval figure).

Top-1 accuracy with its binomial standard error, for captions with objects only and with relations, and the
same for a tiny CLIP of the same sizes with random weights (the chance level, measured).

    python experiments/shapes/clip_retrieval.py runs/shapes/clip/clip.safetensors --out records.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sg2img.base.tokenizer import clip_tokenizer
from sg2img.data import Shapes
from sg2img.data.rows import Preprocess, collate
from sg2img.shapes.tiny_clip import build_tiny_clip, load_tiny_clip, retrieval_counts


def scores(model: torch.nn.Module, n: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, share in (("objects", 0.0), ("relations", 1.0)):
        source = Shapes("test", num_rows=n, caption_relations=share)
        source.transform = Preprocess(32, None, clip_tokenizer())
        batch = collate([source[i] for i in range(n)])
        for kind, (right, total) in retrieval_counts(
            model, clip_tokenizer(), batch.pixels, batch.captions
        ).items():
            if total:
                p = right / total
                out[f"{name}/{kind}"] = {"accuracy": p, "se": math.sqrt(p * (1 - p) / total), "n": total}
    return out


def markdown_table(record: dict) -> str:
    """The record as the results table (``python clip_retrieval.py --table RECORD.json`` rewrites it)."""
    what = {
        "batch": f"all {record['n']} captions",
        "binding": "own vs colours swapped",
        "relation": "own vs one relation reversed",
    }
    lines = [
        f"Tiny CLIP `{record['clip']}`, first {record['n']} test rows; top-1 accuracy ± binomial standard error:",
        "",
        "| captions | choice between | rows | trained | random init (chance, measured) |",
        "|---|---|---|---|---|",
    ]
    for key, v in record["trained"].items():
        r = record["random_init"][key]
        captions, kind = key.split("/")
        lines.append(
            f"| {captions} | {what[kind]} | {v['n']} | {v['accuracy']:.3f} ± {v['se']:.3f} | "
            f"{r['accuracy']:.3f} ± {r['se']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clip", type=Path, nargs="?", help="a tiny-CLIP file (sg2img fit-clip)")
    ap.add_argument("--table", type=Path, default=None, help="only rewrite RECORD.md from RECORD.json")
    ap.add_argument("--n", type=int, default=500, help="test rows (the whole test split: 500)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.table is not None:
        args.table.with_suffix(".md").write_text(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.clip is None:
        ap.error("give a tiny-CLIP file, or --table RECORD.json")
    model, config = load_tiny_clip(args.clip)
    record = {
        "clip": str(args.clip),
        "n": args.n,
        "trained": scores(model, args.n),
        "random_init": scores(build_tiny_clip(config, seed=0).eval(), args.n),
    }
    table = markdown_table(record)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
