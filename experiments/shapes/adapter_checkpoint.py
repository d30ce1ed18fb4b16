"""The adapter a training checkpoint holds, as an adapter file (for learning curves and same-step controls).

    python experiments/shapes/adapter_checkpoint.py runs/shapes/graph_layout \
        runs/shapes/graph_layout/checkpoints/epoch=0-step=1000.ckpt build/graph_layout-1000.safetensors

The run folder's ``config.yaml`` (written by ``sg2img fit``) builds the module exactly as the run did
(``graph_use.load_run``); the checkpoint's trainable weights are loaded into it (``weights_only=True``) and
the whole adapter is written in the adapter-file format that ``sg2img generate`` and ``sg2img evaluate
shapes --adapter`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_use import load_run  # builds the run's module from its config.yaml


def export_checkpoint(run: Path, ckpt: Path, out: Path) -> Path:
    module, _ = load_run(run)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(state)  # a checkpoint from before the model was its own module: renamed keys
    module.load_state_dict(state["state_dict"])
    out.parent.mkdir(parents=True, exist_ok=True)
    return module.export_adapter(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="an `sg2img fit` run folder (config.yaml)")
    ap.add_argument("checkpoint", type=Path, help="one of its checkpoints")
    ap.add_argument("out", type=Path, help="the adapter file to write")
    args = ap.parse_args(argv)
    print(export_checkpoint(args.run, args.checkpoint, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
