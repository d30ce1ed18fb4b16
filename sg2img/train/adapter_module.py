"""The Lightning module: a frozen SD1.5 base, the trainable adapter, the diffusion loss and sampling.

Every base part (UNet, VAE, text and image encoders) is frozen and stays in eval mode. What trains is
decided by one predicate, ``is_trainable(name)``: the image branch (projection and ``to_{k,v}_ip``), the
graph branch (GNN encoder and ``to_{k,v}_sg``), or both. The same predicate selects what a Lightning
checkpoint holds, so checkpoints are megabytes and resuming restores exactly the trained weights.

All randomness of a step (latent sampling, noise, timesteps, condition dropout) comes from a generator
seeded with ``(seed, epoch, batch index, rank)``: a resumed run draws the same numbers as an
uninterrupted one, and the cached and uncached paths give the same loss.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch_geometric.data import Batch

from ip_adapter import IMAGE_STREAM, ImageFeatures, IPAdapterConfig
from ip_adapter.adapter import IMAGE_PROJ, config_from_file, load_sections
from ip_adapter.checkpoint import read_adapter_file
from sg2img.base.components import (
    EMBEDDED,
    EMBEDDED_BASE_FILE,
    PRESETS,
    base_file_preset,
    get_preset,
    is_base_file,
    load_base,
    read_preset_from_folder,
)
from sg2img.base.dtypes import DTYPES
from sg2img.data.rows import TrainBatch
from sg2img.errors import ConfigurationError
from sg2img.graph import SceneGraph
from sg2img.graph_batch import drop_graphs, embed_label_batch
from sg2img.model.adapter import SG_ENCODER, SG_STREAM, SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import GNNConfig, GraphTokens, TokenConfig
from sg2img.model.labels import LabelEmbedder
from sg2img.train.core import TrainingSteps, diffusion_target, snr_loss_weights

log = logging.getLogger(__name__)


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
                raise ValueError(f"dropout.{name} must be in [0, 1], got {p}")
        if self.text + self.image + self.graph + self.all > 1.0 + 1e-9:
            raise ValueError(
                f"dropout probabilities sum to {self.text + self.image + self.graph + self.all:.3f} > 1"
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


def branch_of(name: str) -> str | None:
    """Which adapter branch a parameter of the module belongs to: "image", "graph", or None (base)."""
    if not name.startswith("adapter."):
        return None
    rest = name[len("adapter.") :]
    # a processor's own parameters end in their stream's name: to_k_ip.weight, pos_sg.bias, region_width_sg
    if rest.startswith(f"{IMAGE_PROJ}.") or rest.endswith(
        (f"_{IMAGE_STREAM}.weight", f"_{IMAGE_STREAM}.bias", f"_{IMAGE_STREAM}")
    ):
        return "image"
    if rest.startswith(f"{SG_ENCODER}.") or rest.endswith(
        (f"_{SG_STREAM}.weight", f"_{SG_STREAM}.bias", f"_{SG_STREAM}")
    ):
        return "graph"
    return None


class SG2ImgModule(TrainingSteps):
    """Trains the adapter on a frozen base.

    Args:
        base: ``tiny`` (random weights, no download), a local diffusers folder, a single-file SD1.5
            checkpoint, or a hub id.
        image_encoder: transformers CLIP vision model (folder, ``hub_id[:subfolder]``) or
            ``open_clip:MODEL[:PRETRAINED]``; default: the base folder's, the preset's, else IP-Adapter's.
        single_file_config: the diffusers folder or hub id describing a single-file ``base``.
        image_tokens: ``cls`` (4 tokens from the image embedding) or ``patch`` (16 from the Resampler).
        num_image_tokens: how many tokens the CLS projection makes (``cls`` only; the Resampler's count is
            its query count).
        injection: ``decoupled`` (own K/V per stream) or ``concat`` (appended to the text tokens).
        image_branch / graph_branch: which branches exist.
        train_image_branch / train_graph_branch: which existing branches train (the rest stays frozen).
        init_adapter: an adapter file to start from: an official IP-Adapter ``.bin``/``.safetensors``
            (loaded as the image branch) or an sg2img adapter file (every branch it has).
        gnn / tokens: the graph encoder.
        positional_graph_query: the graph branch's query gets a learned position term, so the graph tokens
            can place objects (decoupled injection only; see ``ip_adapter.attention``).
        layout_loss_weight: weight of the layout head's L1 loss against the true boxes (``gnn.layout_head``).
        layout_teacher_forcing: share of training graphs whose layout is their true boxes; the rest hide
            their boxes (from the GNN input too) and use the layout head's prediction, as at inference
            without boxes. The layout loss always reads the true boxes.
        timesteps: how training timesteps are drawn: ``uniform``, or ``shifted`` towards high noise, where
            layout is decided (t = s u / (1 + (s - 1) u) for uniform u, with s = ``timestep_shift``; the
            shift of Esser et al. 2024).
        loss_weighting: ``none`` (the plain MSE, the paper's), ``min_snr`` (min(SNR, gamma) / SNR: low noise
            weighs less, high noise keeps weight 1) or ``inv_snr`` (min(1 / SNR, gamma): high noise weighs
            more, capped), with gamma = ``snr_gamma``.
        dropout / optimizer: see ``ConditionDropout`` and ``OptimizerConfig``.
        base_dtype: dtype of the frozen base; ``auto`` is bfloat16 on GPU and float32 on CPU.
        channels_last: keep the UNet's activations in channels-last layout (faster convolutions on GPUs).
        compile_unet: ``torch.compile`` the UNet (with the adapter's processors attached) before training.
        nonfinite_loss: on a NaN or inf loss, ``stop`` (a clear error, nothing of the batch applied) or
            ``skip`` (the batch is passed over and counted in ``train/nonfinite_losses``).
        seed: seeds every random draw of training (see the module docstring).
    """

    def __init__(
        self,
        base: str = "tiny",
        image_encoder: str | None = None,
        single_file_config: str | None = None,
        image_tokens: Literal["cls", "patch"] = "cls",
        num_image_tokens: int = 4,
        injection: Literal["decoupled", "concat"] = "decoupled",
        image_branch: bool = True,
        graph_branch: bool = True,
        train_image_branch: bool = True,
        train_graph_branch: bool = True,
        init_adapter: str | None = None,
        gnn: GNNConfig = GNNConfig(),  # noqa: B008 (frozen dataclass)
        tokens: TokenConfig = TokenConfig(),  # noqa: B008
        positional_graph_query: bool = False,
        layout_loss_weight: float = 1.0,
        layout_teacher_forcing: float = 1.0,
        timesteps: Literal["uniform", "shifted"] = "uniform",
        timestep_shift: float = 3.0,
        loss_weighting: Literal["none", "min_snr", "inv_snr"] = "none",
        snr_gamma: float = 5.0,
        dropout: ConditionDropout = ConditionDropout(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        channels_last: bool = False,
        compile_unet: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        seed: int = 0,
    ):
        super().__init__(seed, nonfinite_loss)
        if not (image_branch or graph_branch):
            raise ValueError("at least one of image_branch and graph_branch must be on")
        self.base, self.image_encoder_source, self.single_file_config = (
            base,
            image_encoder,
            single_file_config,
        )
        self.image_tokens_kind, self.num_image_tokens, self.injection = (
            image_tokens,
            num_image_tokens,
            injection,
        )
        self.has_image, self.has_graph = image_branch, graph_branch
        self.train_image, self.train_graph = (
            train_image_branch and image_branch,
            train_graph_branch and graph_branch,
        )
        if not (self.train_image or self.train_graph):
            raise ValueError(
                "nothing would train: set train_image_branch or train_graph_branch on a branch that exists"
            )
        self.init_adapter = init_adapter
        self.gnn_config, self.token_config = gnn, tokens
        self.positional_graph_query = positional_graph_query
        if layout_loss_weight < 0:
            raise ValueError(f"layout_loss_weight must be >= 0, got {layout_loss_weight}")
        if not 0.0 <= layout_teacher_forcing <= 1.0:
            raise ValueError(f"layout_teacher_forcing must be in [0, 1], got {layout_teacher_forcing}")
        if timesteps not in ("uniform", "shifted"):
            raise ValueError(f"timesteps must be 'uniform' or 'shifted', got {timesteps!r}")
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {timestep_shift}")
        if loss_weighting not in ("none", "min_snr", "inv_snr"):
            raise ValueError(f"loss_weighting must be 'none', 'min_snr' or 'inv_snr', got {loss_weighting!r}")
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        self.layout_loss_weight, self.layout_teacher_forcing = layout_loss_weight, layout_teacher_forcing
        self.timesteps, self.timestep_shift = timesteps, timestep_shift
        self.loss_weighting, self.snr_gamma = loss_weighting, snr_gamma
        self.dropout, self.optim = dropout, optimizer
        self.base_dtype = base_dtype
        self.channels_last, self.compile_unet = channels_last, compile_unet
        self.unet = self.vae = self.text_encoder = self.image_encoder = self.adapter = None

    # --- building --------------------------------------------------------------------------------
    def _frozen_dtype(self) -> torch.dtype:
        if self.base_dtype != "auto":
            return DTYPES[self.base_dtype]
        on_gpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32

    def _resampler_overrides(self) -> dict[str, Any]:
        if self.base in PRESETS:
            return dict(get_preset(self.base).resampler)
        base_file = EMBEDDED_BASE_FILE if self.base == EMBEDDED else Path(self.base)
        if is_base_file(base_file):  # a small trained base records the Resampler size that suits it
            return dict(base_file_preset(base_file).resampler)
        if Path(self.base).is_dir():
            return dict(read_preset_from_folder(self.base).resampler)
        return {}

    def configure_model(self) -> None:
        """Load the base and build the adapter (once; Lightning calls this before fit/validate/test)."""
        if self.unet is not None:
            return
        parts = load_base(
            self.base,
            self.image_encoder_source,
            self._frozen_dtype(),
            self.seed,
            self.single_file_config,
            image_encoder_required=self.has_image,
        )
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.image_encoder, self.tokenizer = parts.image_encoder, parts.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        self.sample_scheduler_config = parts.scheduler.config
        width = self.unet.config.cross_attention_dim
        spec = self.image_encoder.spec if self.image_encoder is not None else None
        image = IPAdapterConfig(  # without an image encoder (no image branch) the widths are placeholders
            image_tokens=self.image_tokens_kind,
            cross_attention_dim=width,
            clip_embeddings_dim=spec.projection_dim if spec else width,
            clip_hidden_dim=spec.hidden_size if spec else width,
            num_tokens=self.num_image_tokens,
            resampler=self._resampler_overrides(),
        )
        source = read_adapter_file(self.init_adapter) if self.init_adapter else None
        image_from = "model.image_encoder and model.image_tokens"
        if source is not None and self.has_image and IMAGE_PROJ in source.prefixes():
            image = config_from_file(source)  # the file decides the image branch's shape
            image_from = f"model.init_adapter {source.path}"
        self._check_widths(image, image_from)
        config = SGAdapterConfig(
            label_dim=self.text_encoder.config.hidden_size,
            injection=self.injection,
            image_branch=self.has_image,
            graph_branch=self.has_graph,
            image=image,
            gnn=self.gnn_config,
            tokens=self.token_config,
            positional_graph_query=self.positional_graph_query,
        )
        torch.manual_seed(self.seed)  # the adapter's random init is part of the run's seed
        self.adapter = SceneGraphAdapter(self.unet, config)
        if source is not None:
            self._load_init_adapter(source)
        self.adapter.attach(self.unet)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.compile_unet:
            self.unet.compile()  # in place: the module (and its state-dict names) stay as they are
        self.labels = LabelEmbedder(self.text_encoder, self.tokenizer)
        for p in self.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def _check_widths(self, image: IPAdapterConfig, image_from: str) -> None:
        """Every token stream must be as wide as the UNet's cross-attention, and the image branch must take
        what the image encoder gives: else one message at start-up, not a shape error in the first step."""
        width = self.unet.config.cross_attention_dim
        problems = []
        text = self.text_encoder.config.hidden_size
        if isinstance(width, int) and text != width:
            problems.append(
                f"the base's text encoder makes {text}-wide tokens, but its UNet's cross-attention takes {width} "
                "(text encoder and UNet come from different models)"
            )
        if self.has_image:
            spec = self.image_encoder.spec
            encoder = self.image_encoder_source or f"the image encoder of base {self.base}"
            if isinstance(width, int) and image.cross_attention_dim != width:
                problems.append(
                    f"the image branch ({image_from}) makes {image.cross_attention_dim}-wide tokens, but the "
                    f"UNet's cross-attention takes {width} (an adapter made for another base)"
                )
            if image.image_tokens == "cls" and image.clip_embeddings_dim != spec.projection_dim:
                problems.append(
                    f"the image branch ({image_from}) takes {image.clip_embeddings_dim}-wide image embeddings, "
                    f"but {encoder} gives {spec.projection_dim}"
                )
            if image.image_tokens == "patch" and image.clip_hidden_dim != spec.hidden_size:
                problems.append(
                    f"the image branch ({image_from}) takes {image.clip_hidden_dim}-wide patch tokens, but "
                    f"{encoder} gives {spec.hidden_size}"
                )
        if problems:
            raise ConfigurationError(
                f"model (base {self.base}): token widths do not match:\n  - " + "\n  - ".join(problems)
            )

    def _load_init_adapter(self, f) -> None:
        own = self.adapter.adapter_state_dict()
        present = {k.split(".", 1)[0] for k in f.tensors}
        wanted = [s for s in {k.split(".", 1)[0] for k in own} if s in present]
        if not wanted:
            raise ValueError(
                f"{f.path}: has none of this adapter's sections ({sorted({k.split('.', 1)[0] for k in own})})"
            )
        load_sections(own, f.tensors, tuple(wanted), str(f.path))
        log.info("init_adapter %s: loaded %s", f.path, ", ".join(sorted(wanted)))

    # --- what trains and what is saved ----------------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        """The one predicate: a parameter trains, and is checkpointed, iff this is True."""
        branch = branch_of(name)
        return (branch == "image" and self.train_image) or (branch == "graph" and self.train_graph)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) pairs the predicate accepts. The attention processors are reachable both
        under ``unet.`` and ``adapter.``; duplicates are not removed by name, so the ``adapter.`` name
        is always the one judged."""
        return [(n, p) for n, p in self.named_parameters(remove_duplicate=False) if self.is_trainable(n)]

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.trainable_parameters()]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return type(full)((k, v) for k, v in full.items() if self.is_trainable(k[len(prefix) :]))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        self.configure_model()
        expected, given = set(self.trainable_names()), set(state_dict)
        if strict and expected != given:

            def describe(keys: set[str]) -> str:
                groups = Counter(
                    re.sub(r"\.\d+\.", ".*.", k.rsplit(".", 1)[0])
                    if ".attention." in k
                    else ".".join(k.split(".")[:2])
                    for k in keys
                )
                return (
                    f"{len(keys)} ({', '.join(f'{g}: {n}' for g, n in sorted(groups.items()))})"
                    if keys
                    else "none"
                )

            raise RuntimeError(
                "the checkpoint does not hold this module's trainable weights (was it saved with another "
                f"branch setting?): missing {describe(expected - given)}; unexpected {describe(given - expected)}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def train(self, mode: bool = True) -> SG2ImgModule:
        """Only the adapter follows ``mode``: the frozen base stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            if m is not None:
                m.eval()
        if self.adapter is not None:
            self.adapter.train(mode)
            for stream, trained in ((IMAGE_STREAM, self.train_image), (SG_STREAM, self.train_graph)):
                if stream in self.adapter.branches and not trained:
                    self.adapter.branches[stream].module.eval()
        return self

    # --- conditioning ---------------------------------------------------------------------------
    def data_requirements(self) -> dict[str, Any]:
        """What the data pipeline must produce for this model: image sizes, whether rows need scene graphs,
        and the widths cached encoder outputs must have."""
        self.configure_model()
        side = self.vae.config.sample_size if self.vae is not None else self.unet.config.sample_size
        spec = self.image_encoder.spec if self.image_encoder is not None else None
        widths = {"text_embeds": int(self.text_encoder.config.hidden_size)}
        if self.has_image:
            widths["image_embeds"] = int(spec.projection_dim)
            if self.image_tokens_kind == "patch":
                widths["patch_tokens"] = int(spec.hidden_size)
        return {
            "resolution": int(side),
            # without an image branch nothing reads the CLIP pixels: rows skip that preprocessing
            "clip_size": int(spec.image_size) if self.has_image else None,
            "graphs": self.has_graph,
            "widths": widths,
            "tokenizer": self.tokenizer,  # captions are tokenised as the base reads them
        }

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids.to(self.device))[0]

    @torch.no_grad()
    def empty_text(self) -> torch.Tensor:
        if getattr(self, "_empty_text", None) is None or self._empty_text.device != self.device:
            ids = self.tokenizer(
                "", padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids
            self._empty_text = self.encode_text(ids)
        return self._empty_text  # (1, 77, C)

    @torch.no_grad()
    def negative_image(self) -> ImageFeatures:
        if getattr(self, "_negative", None) is None or self._negative.embeds.device != self.device:
            self._negative = self.image_encoder.negative_features(1)
        return self._negative

    @torch.no_grad()
    def encode_batch(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The frozen encoders' outputs for a raw batch: what ``sg2img cache`` stores."""
        if self.vae is None:  # pixel space: the "distribution" is the image itself, with zero spread
            pixels = batch.pixels.to(self.device, self.unet.dtype)
            dist = torch.cat([pixels, torch.zeros_like(pixels)], dim=1)
        else:
            dist = self.vae.encode(batch.pixels.to(self.vae.dtype)).latent_dist.parameters
        out = {"latent_dist": dist, "text_embeds": self.encode_text(batch.input_ids)}
        if self.has_image:
            feats = self.image_encoder(batch.clip_pixels)
            out["image_embeds"], out["patch_tokens"] = feats.embeds, feats.patch_tokens
        return out

    def _latents(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            params = batch.latent_dist
            if self.vae is None:  # pixel space: the UNet denoises the image itself
                pixels = params.chunk(2, dim=1)[0] if params is not None else batch.pixels
                return pixels.to(self.device, self.unet.dtype)
            if params is None:
                params = self.vae.encode(batch.pixels.to(self.vae.dtype)).latent_dist.parameters
            dist = DiagonalGaussianDistribution(params.to(self.device, self.vae.dtype))
            return dist.sample(generator=generator) * self.vae.config.scaling_factor

    def _image_features(self, batch: TrainBatch, drop: torch.Tensor) -> ImageFeatures:
        with torch.no_grad():
            if batch.image_embeds is not None:
                patch = batch.patch_tokens
                if patch is None and self.image_tokens_kind == "patch":
                    raise ValueError(
                        "the cache holds no patch tokens; rebuild it with patch tokens for image_tokens: patch"
                    )
                feats = ImageFeatures(batch.image_embeds, patch if patch is not None else batch.image_embeds)
            else:
                feats = self.image_encoder(batch.clip_pixels)
            if bool(drop.any()):
                neg = self.negative_image()
                keep = ~drop
                embeds = torch.where(keep[:, None], feats.embeds, neg.embeds.to(feats.embeds.dtype))
                patch = feats.patch_tokens
                if self.image_tokens_kind == "patch":
                    patch = torch.where(keep[:, None, None], patch, neg.patch_tokens.to(patch.dtype))
                feats = ImageFeatures(embeds, patch)
            return feats

    def embed_graphs(self, graphs: Batch, labels: Sequence[str]) -> Batch:
        return embed_label_batch(graphs.to(self.device), labels, self.labels)

    def condition(self, batch: TrainBatch, drops: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's conditioning kwargs for a batch, after condition dropout."""
        return self._condition(batch, drops)[0]

    def _condition(
        self, batch: TrainBatch, drops: dict[str, torch.Tensor], hide_boxes: torch.Tensor | None = None
    ) -> tuple[dict[str, Any], GraphTokens | None, Batch | None]:
        """(UNet kwargs, the graph encoding, the graph batch it was made from). ``hide_boxes`` (B,) bool:
        graphs whose boxes the model does not see (the layout head's prediction stands in)."""
        text = batch.text_embeds if batch.text_embeds is not None else self.encode_text(batch.input_ids)
        text = text.to(self.device)
        if bool(drops["text"].any()):
            text = torch.where(drops["text"][:, None, None], self.empty_text().to(text.dtype), text)
        feats = self._image_features(batch, drops["image"]) if self.has_image else None
        encoded = graphs = None
        if self.has_graph:
            graphs = drop_graphs(batch.graphs.to(self.device), drops["graph"])
            seen = graphs
            if hide_boxes is not None and bool(hide_boxes.any()):
                seen = graphs.clone()
                seen.has_box = graphs.has_box & ~hide_boxes.to(self.device)[graphs.batch]
            encoded = self.adapter.graph_tokens(self.embed_graphs(seen, batch.labels))
        return self.adapter.unet_kwargs(text, feats, encoded), encoded, graphs

    def _timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        steps = self.noise_scheduler.config.num_train_timesteps
        if self.timesteps == "uniform":
            return torch.randint(0, steps, (n,), generator=generator, device=self.device)
        u = torch.rand(n, generator=generator, device=self.device)
        s = self.timestep_shift
        return (s * u / (1 + (s - 1) * u) * steps).long().clamp(max=steps - 1)

    def _loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return snr_loss_weights(self.noise_scheduler, t, self.loss_weighting, self.snr_gamma)

    # --- the loss -------------------------------------------------------------------------------
    def diffusion_loss(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss (weighted per ``loss_weighting``), plus the layout head's loss."""
        latents = self._latents(batch, generator)
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        t = self._timesteps(n, generator)
        drops = self.dropout.sample(n, generator, self.device)
        hide = None
        if self.has_graph and self.layout_teacher_forcing < 1.0:
            hide = torch.rand(n, generator=generator, device=self.device) >= self.layout_teacher_forcing
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = diffusion_target(self.noise_scheduler, latents, noise, t)
        kwargs, encoded, graphs = self._condition(batch, drops, hide)
        pred = self.unet(noisy, t, **kwargs).sample
        weights = self._loss_weights(t)
        if weights is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
            loss = (per_sample * weights).mean()
        if encoded is None or encoded.predicted is None:
            return loss
        stage = "train" if self.training else "val"
        known = graphs.has_box  # the layout loss reads the true boxes, hidden from the model or not
        layout = (
            F.l1_loss(encoded.predicted[known], graphs.box[known].float())
            if bool(known.any())
            else encoded.predicted.sum() * 0.0
        )
        if self._trainer is not None:
            self.log(f"{stage}/diffusion_loss", loss, batch_size=n)
            self.log(f"{stage}/layout_loss", layout, batch_size=n)
        return loss + self.layout_loss_weight * layout

    def on_before_optimizer_step(self, optimizer) -> None:
        # the optimizer holds exactly the trainable parameters: no walk over the frozen base each step
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm(), batch_size=1)

    def on_fit_end(self) -> None:
        if self.skips.total:
            log.warning("rank %d: %s", self.global_rank, self.skips.summary())
        elif self.global_rank == 0:
            log.info(self.skips.summary())

    # --- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        groups = []
        for branch, lr in (("image", o.image_lr), ("graph", o.graph_lr)):
            params = [p for n, p in self.trainable_parameters() if branch_of(n) == branch]
            if params:
                groups.append({"params": params, "lr": lr if lr is not None else o.lr, "name": branch})
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        if not o.warmup_steps:
            return optimizer
        warmup = max(1, o.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- sampling -------------------------------------------------------------------------------
    def pipeline(self):
        """An ``SG2ImgPipeline`` over this module's parts and adapter (shared, not copied), with the
        DDIM sampler of the base's schedule and no progress bar."""
        from ip_adapter import TransformersImageEncoder
        from sg2img.infer.pipeline import SG2ImgPipeline

        self.configure_model()
        encoder = self.image_encoder if self.has_image else None
        pipe = SG2ImgPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.sample_scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=encoder.model if isinstance(encoder, TransformersImageEncoder) else None,
            requires_safety_checker=False,
        )
        pipe.set_sg_adapter(self.adapter, image_encoder=encoder, labels=self.labels, cast=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(
        self,
        graphs: Sequence[SceneGraph] | None = None,
        prompts: Sequence[str] | None = None,
        images: Sequence[Image.Image] | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        seed: int = 0,
        size: int | None = None,
    ) -> list[Image.Image]:
        """DDIM samples with classifier-free guidance through ``pipeline()``: one image per entry of
        ``graphs``/``prompts``/``images`` (each list of length 1 or the batch size)."""
        pipe = self.pipeline()
        dtype = self.unet.dtype
        # the adapter keeps fp32 weights beside a half-precision base: autocast reconciles the two
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return pipe(
                prompt=list(prompts) if prompts else None,
                scene_graph=list(graphs) if graphs and self.has_graph else None,
                ip_adapter_image=list(images) if images else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device=self.device).manual_seed(seed),
                height=size,
                width=size,
            ).images

    # --- the adapter file -----------------------------------------------------------------------
    def export_adapter(self, path: str | Path) -> Path:
        """The whole adapter (frozen branches included) as one file in the adapter-file format."""
        self.configure_model()
        return self.adapter.save(path)


__all__ = ["ConditionDropout", "OptimizerConfig", "SG2ImgModule", "branch_of", "diffusion_target"]
