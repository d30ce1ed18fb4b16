"""The adapter trainer's settings, grouped by what they describe: the frozen base, the image branch, the
graph branch, the diffusion objective, condition dropout and the optimiser.

Each group is a frozen dataclass that checks its own values, so a config file reads as the model is built
(``model.image.tokens: patch``, ``model.graph.gnn.layer: gine``) and a wrong value is named where it is
set. ``SG2ImgModule`` takes one of each (``BaseModelModule``, the base trainer, takes the objective);
``MOVED_SETTINGS`` maps the flat keys of earlier configs to
their place here, for the message a user with an old config gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from sg2img.model.gnn import GNNConfig, TokenConfig


@dataclass(frozen=True)
class BaseSettings:
    """The frozen base.

    Args:
        source: ``tiny`` (random weights, no download), ``embedded`` (the shapes world's shipped base), a
            base file, a local diffusers folder, a single-file SD1.5 checkpoint, or a hub id.
        image_encoder: transformers CLIP vision model (folder, ``hub_id[:subfolder]``) or
            ``open_clip:MODEL[:PRETRAINED]``; default: the base folder's, the preset's, else IP-Adapter's.
        single_file_config: the diffusers folder or hub id describing a single-file ``source``.
        dtype: dtype of the frozen base; ``auto`` is bfloat16 on GPU and float32 on CPU.
        channels_last: keep the UNet's activations in channels-last layout (faster convolutions on GPUs).
        compile_unet: ``torch.compile`` the UNet (with the adapter's processors attached) before training.
    """

    source: str = "tiny"
    image_encoder: str | None = None
    single_file_config: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    channels_last: bool = False
    compile_unet: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"model.base.dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}"
            )

    def frozen_dtype(self, on_gpu: bool) -> torch.dtype:
        from sg2img.base.dtypes import DTYPES

        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if on_gpu else torch.float32


@dataclass(frozen=True)
class ImageBranchSettings:
    """The IP-Adapter branch.

    Args:
        enabled: the branch exists.
        train: it trains (else it stays as ``init_adapter`` left it, frozen).
        tokens: ``cls`` (``num_tokens`` tokens from the image embedding) or ``patch`` (the Resampler's
            tokens from the encoder's patch tokens; their count is its query count).
    """

    enabled: bool = True
    train: bool = True
    tokens: Literal["cls", "patch"] = "cls"
    num_tokens: int = 4

    def __post_init__(self) -> None:
        if self.tokens not in ("cls", "patch"):
            raise ValueError(f"model.image.tokens must be 'cls' or 'patch', got {self.tokens!r}")
        if self.num_tokens < 1:
            raise ValueError(f"model.image.num_tokens must be >= 1, got {self.num_tokens}")

    @property
    def trains(self) -> bool:
        return self.enabled and self.train


@dataclass(frozen=True)
class GraphBranchSettings:
    """The scene-graph branch.

    Args:
        enabled / train: as for the image branch.
        gnn / tokens: the graph encoder and which tokens a graph becomes.
        positional_query: the branch's query gets a learned position term, so the graph tokens can place
            objects (decoupled injection only; see ``ip_adapter.attention``).
        layout_loss_weight: weight of the layout head's L1 loss against the true boxes (``gnn.layout_head``).
        layout_teacher_forcing: share of training graphs whose layout is their true boxes; the rest hide
            their boxes (from the GNN input too) and use the layout head's prediction, as at inference
            without boxes. The layout loss always reads the true boxes.
    """

    enabled: bool = True
    train: bool = True
    gnn: GNNConfig = field(default_factory=GNNConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    positional_query: bool = False
    layout_loss_weight: float = 1.0
    layout_teacher_forcing: float = 1.0

    def __post_init__(self) -> None:
        if self.layout_loss_weight < 0:
            raise ValueError(f"model.graph.layout_loss_weight must be >= 0, got {self.layout_loss_weight}")
        if not 0.0 <= self.layout_teacher_forcing <= 1.0:
            raise ValueError(
                f"model.graph.layout_teacher_forcing must be in [0, 1], got {self.layout_teacher_forcing}"
            )

    @property
    def trains(self) -> bool:
        return self.enabled and self.train


@dataclass(frozen=True)
class ObjectiveSettings:
    """Which timesteps training draws and how their losses weigh.

    Args:
        timesteps: ``uniform``, or ``shifted`` towards high noise, where layout is decided
            (t = s u / (1 + (s - 1) u) for uniform u, with s = ``timestep_shift``; the shift of Esser et al.
            2024).
        loss_weighting: ``none`` (the plain MSE, the paper's), ``min_snr`` (min(SNR, gamma) / SNR: low noise
            weighs less, high noise keeps weight 1) or ``inv_snr`` (min(1 / SNR, gamma): high noise weighs
            more, capped), with gamma = ``snr_gamma``.
    """

    timesteps: Literal["uniform", "shifted"] = "uniform"
    timestep_shift: float = 3.0
    loss_weighting: Literal["none", "min_snr", "inv_snr"] = "none"
    snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.timesteps not in ("uniform", "shifted"):
            raise ValueError(
                f"model.objective.timesteps must be 'uniform' or 'shifted', got {self.timesteps!r}"
            )
        if self.timestep_shift <= 0:
            raise ValueError(f"model.objective.timestep_shift must be positive, got {self.timestep_shift}")
        if self.loss_weighting not in ("none", "min_snr", "inv_snr"):
            raise ValueError(
                "model.objective.loss_weighting must be 'none', 'min_snr' or 'inv_snr', "
                f"got {self.loss_weighting!r}"
            )
        if self.snr_gamma <= 0:
            raise ValueError(f"model.objective.snr_gamma must be positive, got {self.snr_gamma}")

    def shift(self) -> float | None:
        """The timestep shift when timesteps are shifted, else None (uniform)."""
        return self.timestep_shift if self.timesteps == "shifted" else None


@dataclass(frozen=True)
class ConditionDropout:
    """Per-sample condition dropout for classifier-free guidance: one uniform draw per sample falls in
    exactly one of the ranges [text | image | graph | all | keep]. A dropped image is the zero CLIP
    embedding (patch tokens: the encoder's features of a zero image), dropped text the empty caption, a
    dropped graph the empty graph."""

    text: float = 0.05
    image: float = 0.05
    graph: float = 0.05
    all: float = 0.05

    def __post_init__(self) -> None:
        for name in ("text", "image", "graph", "all"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"model.dropout.{name} must be in [0, 1], got {p}")
        if self.text + self.image + self.graph + self.all > 1.0 + 1e-9:
            raise ValueError(
                f"model.dropout: the probabilities sum to {self.text + self.image + self.graph + self.all:.3f} > 1"
            )

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        u = torch.rand(n, generator=generator, device=device)
        t, i, g = self.text, self.text + self.image, self.text + self.image + self.graph
        a = g + self.all
        every = (u >= g) & (u < a)
        return {
            "text": (u < t) | every,
            "image": ((u >= t) & (u < i)) | every,
            "graph": ((u >= i) & (u < g)) | every,
        }


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, one parameter group per branch. ``image_lr``/``graph_lr`` override ``lr`` per branch."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    image_lr: float | None = None
    graph_lr: float | None = None
    warmup_steps: int = 0  # linear warm-up, then constant (the paper's schedule is constant)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"model.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


# the flat model settings of earlier configs, and where each one is now
MOVED_SETTINGS: dict[str, str] = {
    "base": "base.source",
    "image_encoder": "base.image_encoder",
    "single_file_config": "base.single_file_config",
    "base_dtype": "base.dtype",
    "channels_last": "base.channels_last",
    "compile_unet": "base.compile_unet",
    "image_branch": "image.enabled",
    "train_image_branch": "image.train",
    "image_tokens": "image.tokens",
    "num_image_tokens": "image.num_tokens",
    "graph_branch": "graph.enabled",
    "train_graph_branch": "graph.train",
    "gnn": "graph.gnn",
    "tokens": "graph.tokens",
    "positional_graph_query": "graph.positional_query",
    "layout_loss_weight": "graph.layout_loss_weight",
    "layout_teacher_forcing": "graph.layout_teacher_forcing",
    "timesteps": "objective.timesteps",
    "timestep_shift": "objective.timestep_shift",
    "loss_weighting": "objective.loss_weighting",
    "snr_gamma": "objective.snr_gamma",
}


def settings_value(kind: type, value: Any) -> Any:
    """``value`` as the settings dataclass ``kind`` when it is a plain dict (a checkpoint's
    hyperparameters), nested settings included; anything else as it is."""
    if not isinstance(value, dict):
        return value
    nested = {f.name: f.type for f in fields(kind)}
    classes = {"GNNConfig": GNNConfig, "TokenConfig": TokenConfig}
    return kind(**{k: settings_value(classes[nested[k]], v) if nested.get(k) in classes else v
                   for k, v in value.items()})  # fmt: skip


def grouped_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` config section in the grouped layout: the flat keys of earlier configs (a run folder's
    ``config.yaml`` written before the settings were grouped) moved to their groups, the rest kept."""
    out: dict[str, Any] = {}
    for key, value in model.items():
        if key not in MOVED_SETTINGS or (key == "base" and isinstance(value, dict)):
            out[key] = value if not isinstance(value, dict) or key not in out else {**out[key], **value}
            continue
        group, name = MOVED_SETTINGS[key].split(".")
        out.setdefault(group, {})[name] = value
    return out


def fitted_base(model: dict[str, Any]) -> dict[str, str]:
    """The base (``source``) and ``image_encoder`` that a fit's resolved config (its ``model`` section,
    ``DIR/config.yaml``) names, in the grouped layout or the earlier flat one; only those it sets."""
    base = model.get("base")
    if isinstance(base, dict):  # model.base.source, model.base.image_encoder
        found = {"source": base.get("source"), "image_encoder": base.get("image_encoder")}
    else:  # model.base and model.image_encoder, as configs had them before the settings were grouped
        found = {"source": base, "image_encoder": model.get("image_encoder")}
    return {k: str(v) for k, v in found.items() if v is not None}


__all__ = [
    "MOVED_SETTINGS",
    "BaseSettings",
    "ConditionDropout",
    "GraphBranchSettings",
    "ImageBranchSettings",
    "ObjectiveSettings",
    "OptimizerConfig",
    "fitted_base",
    "grouped_model_config",
    "settings_value",
]
