"""The embedded default model: what ``sg2img generate`` uses when no ``--model``/``--adapter`` is given.

It must work on a fresh machine with no downloads, so it is built here from the tiny preset: the tiny
SD base and a scene-graph adapter (4-token image branch and decoupled graph branch, tiny GNN), every
weight drawn from a fixed seed. The weights are untrained, so its images are noise; it exercises every
part of the inference path, and the same seed always gives the same model.
"""

from __future__ import annotations

import torch

from .adapter import SceneGraphAdapter, SGAdapterConfig
from .gnn import gnn_preset
from .models import Components, build_components, get_preset

EMBEDDED_BASE = "tiny"
DESCRIPTION = "embedded default: tiny preset base + scene-graph adapter, untrained (seeded random weights)"


def embedded_base(seed: int = 0) -> Components:
    return build_components(EMBEDDED_BASE, seed=seed)


def embedded_adapter(unet: torch.nn.Module, label_dim: int, seed: int = 0) -> SceneGraphAdapter:
    config = SGAdapterConfig(
        label_dim=label_dim,
        image=get_preset(EMBEDDED_BASE).adapter_config("cls"),
        gnn=gnn_preset("tiny"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        adapter = SceneGraphAdapter(unet, config)
    return adapter.eval().requires_grad_(False)


__all__ = ["DESCRIPTION", "EMBEDDED_BASE", "embedded_adapter", "embedded_base"]
