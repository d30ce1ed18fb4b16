"""sg2img: images from scene graphs, text and image prompts on a frozen Stable Diffusion 1.5.

Built on the ``ip_adapter`` package; adds scene graphs, the GNN graph branch, presets and the CLI.
"""

from .adapter import SceneGraphAdapter, SGAdapterConfig
from .gnn import GNN_PRESETS, GNNConfig, SceneGraphEncoder, TokenConfig, gnn_preset, graphs_to_batch
from .graph import Limits, Relationship, SceneGraph, SceneGraphError, SGObject, load_scene_graphs
from .labels import LabelEmbedder, LearnedVocabulary

__all__ = [
    "GNN_PRESETS",
    "GNNConfig",
    "LabelEmbedder",
    "LearnedVocabulary",
    "Limits",
    "Relationship",
    "SGAdapterConfig",
    "SGObject",
    "SceneGraph",
    "SceneGraphAdapter",
    "SceneGraphEncoder",
    "SceneGraphError",
    "TokenConfig",
    "gnn_preset",
    "graphs_to_batch",
    "load_scene_graphs",
]
