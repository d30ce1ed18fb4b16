"""sg2img: images from scene graphs, text and image prompts on a frozen Stable Diffusion 1.5.

Built on the ``ip_adapter`` package; adds scene graphs, the GNN graph branch, presets and the CLI.
"""

import warnings

# torch-geometric applies torch.jit.script at import time, which recent torch marks deprecated; the
# warning is about that library, not about anything a user of sg2img can change.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

from sg2img.graph import (  # noqa: E402
    Limits,
    Relationship,
    SceneGraph,
    SceneGraphError,
    SGObject,
    load_scene_graphs,
)
from sg2img.graph_batch import graphs_to_batch  # noqa: E402
from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig  # noqa: E402
from sg2img.model.gnn import (  # noqa: E402
    GNN_PRESETS,
    GNNConfig,
    SceneGraphEncoder,
    TokenConfig,
    gnn_preset,
)
from sg2img.model.labels import LabelEmbedder, LearnedVocabulary  # noqa: E402

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
