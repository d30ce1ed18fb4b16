"""The adapter trainer's model: a frozen SD1.5 base with the trainable adapter, how a batch conditions it,
the diffusion loss, and sampling. A plain ``nn.Module``; ``SG2ImgModule`` drives it under Lightning.

Every base part (UNet, VAE, text and image encoders) is frozen and stays in eval mode. What trains is
decided by one predicate, ``is_trainable(name)``: the image branch (projection and ``to_{k,v}_ip``), the
graph branch (GNN encoder and ``to_{k,v}_sg``), or both. The same predicate selects what a Lightning
checkpoint holds, so checkpoints are megabytes and resuming restores exactly the trained weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from sg2img.data.rows import TrainBatch
from sg2img.errors import ConfigurationError
from sg2img.graph import SceneGraph
from sg2img.graph_batch import drop_graphs, embed_label_batch
from sg2img.model.adapter import SG_ENCODER, SG_STREAM, SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import GraphTokens
from sg2img.model.labels import LabelEmbedder
from sg2img.train.core import noised, snr_loss_weights, weighted_mse
from sg2img.train.settings import (
    BaseSettings,
    ConditionDropout,
    GraphBranchSettings,
    ImageBranchSettings,
    ObjectiveSettings,
)

log = logging.getLogger(__name__)


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


class AdapterModel(torch.nn.Module):
    """The frozen base and the adapter, built by ``build()`` from the settings (``sg2img.train.settings``).

    Args:
        base / image / graph / objective / dropout: the settings groups.
        injection: ``decoupled`` (own K/V per stream) or ``concat`` (appended to the text tokens).
        init_adapter: an adapter file to start from: an official IP-Adapter ``.bin``/``.safetensors``
            (loaded as the image branch) or an sg2img adapter file (every branch it has).
        seed: seeds the random weights (the adapter's initialisation; a ``tiny`` base's weights).
    """

    def __init__(
        self,
        base: BaseSettings,
        image: ImageBranchSettings,
        graph: GraphBranchSettings,
        injection: Literal["decoupled", "concat"],
        init_adapter: str | None,
        objective: ObjectiveSettings,
        dropout: ConditionDropout,
        seed: int,
    ):
        super().__init__()
        self.base_settings, self.image_settings, self.graph_settings = base, image, graph
        self.injection, self.init_adapter = injection, init_adapter
        self.objective, self.dropout, self.seed = objective, dropout, seed
        self.unet = self.vae = self.text_encoder = self.image_encoder = self.adapter = None

    @property
    def has_image(self) -> bool:
        return self.image_settings.enabled

    @property
    def has_graph(self) -> bool:
        return self.graph_settings.enabled

    @property
    def base(self) -> str:
        """Which base this model is built on (``base.source``)."""
        return self.base_settings.source

    @property
    def device(self) -> torch.device:
        return self.unet.device if self.unet is not None else torch.device("cpu")

    # --- building --------------------------------------------------------------------------------
    def _resampler_overrides(self) -> dict[str, Any]:
        if self.base in PRESETS:
            return dict(get_preset(self.base).resampler)
        base_file = EMBEDDED_BASE_FILE if self.base == EMBEDDED else Path(self.base)
        if is_base_file(base_file):  # a small trained base records the Resampler size that suits it
            return dict(base_file_preset(base_file).resampler)
        if Path(self.base).is_dir():
            return dict(read_preset_from_folder(self.base).resampler)
        return {}

    def build(self, on_gpu: bool = False) -> None:
        """Load the base and build the adapter (once): the base in ``base.dtype`` (``auto``: bfloat16 when
        ``on_gpu``), the adapter initialised from ``seed`` or from ``init_adapter``."""
        if self.unet is not None:
            return
        parts = load_base(
            self.base,
            self.base_settings.image_encoder,
            self.base_settings.frozen_dtype(on_gpu),
            self.seed,
            self.base_settings.single_file_config,
            image_encoder_required=self.has_image,
        )
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.image_encoder, self.tokenizer = parts.image_encoder, parts.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        self.sample_scheduler_config, self.sample_eta = parts.scheduler.config, parts.eta
        width = self.unet.config.cross_attention_dim
        spec = self.image_encoder.spec if self.image_encoder is not None else None
        image = IPAdapterConfig(  # without an image encoder (no image branch) the widths are placeholders
            image_tokens=self.image_settings.tokens,
            cross_attention_dim=width,
            clip_embeddings_dim=spec.projection_dim if spec else width,
            clip_hidden_dim=spec.hidden_size if spec else width,
            num_tokens=self.image_settings.num_tokens,
            resampler=self._resampler_overrides(),
        )
        source = read_adapter_file(self.init_adapter) if self.init_adapter else None
        image_from = "model.base.image_encoder and model.image.tokens"
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
            gnn=self.graph_settings.gnn,
            tokens=self.graph_settings.tokens,
            positional_graph_query=self.graph_settings.positional_query,
        )
        torch.manual_seed(self.seed)  # the adapter's random init is part of the run's seed
        self.adapter = SceneGraphAdapter(self.unet, config)
        if source is not None:
            self._load_init_adapter(source)
        self.adapter.attach(self.unet)
        if self.base_settings.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.base_settings.compile_unet:
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
            encoder = self.base_settings.image_encoder or f"the image encoder of base {self.base}"
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
        """The one predicate: a parameter (named within this model) trains, and is checkpointed, iff this
        is True."""
        branch = branch_of(name)
        return (branch == "image" and self.image_settings.trains) or (
            branch == "graph" and self.graph_settings.trains
        )

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) pairs the predicate accepts. The attention processors are reachable both
        under ``unet.`` and ``adapter.``; duplicates are not removed by name, so the ``adapter.`` name
        is always the one judged."""
        if self.unet is None:
            return []
        return [(n, p) for n, p in self.named_parameters(remove_duplicate=False) if self.is_trainable(n)]

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.trainable_parameters()]

    def train(self, mode: bool = True) -> AdapterModel:
        """Only the adapter follows ``mode``: the frozen base stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            if m is not None:
                m.eval()
        if self.adapter is not None:
            self.adapter.train(mode)
            for stream, trained in (
                (IMAGE_STREAM, self.image_settings.train),
                (SG_STREAM, self.graph_settings.train),
            ):
                if stream in self.adapter.branches and not trained:
                    self.adapter.branches[stream].module.eval()
        return self

    # --- conditioning ---------------------------------------------------------------------------
    def data_requirements(self) -> dict[str, Any]:
        """What the data pipeline must produce for this model: image sizes, whether rows need scene graphs,
        and the widths cached encoder outputs must have."""
        self.build()
        side = self.vae.config.sample_size if self.vae is not None else self.unet.config.sample_size
        spec = self.image_encoder.spec if self.image_encoder is not None else None
        widths = {"text_embeds": int(self.text_encoder.config.hidden_size)}
        if self.has_image:
            widths["image_embeds"] = int(spec.projection_dim)
            if self.image_settings.tokens == "patch":
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
                if patch is None and self.image_settings.tokens == "patch":
                    raise ValueError(
                        "the cache holds no patch tokens; rebuild it with patch tokens for model.image.tokens: patch"
                    )
                feats = ImageFeatures(batch.image_embeds, patch if patch is not None else batch.image_embeds)
            else:
                feats = self.image_encoder(batch.clip_pixels)
            if bool(drop.any()):
                neg = self.negative_image()
                keep = ~drop
                embeds = torch.where(keep[:, None], feats.embeds, neg.embeds.to(feats.embeds.dtype))
                patch = feats.patch_tokens
                if self.image_settings.tokens == "patch":
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

    # --- the loss -------------------------------------------------------------------------------
    def loss(
        self, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch: the denoising loss (weighted per ``objective.loss_weighting``) plus the
        layout head's, and its parts by name when there is more than one. Every random draw comes from
        ``generator``: the latent sample, noise, timesteps, condition dropout, hidden boxes."""
        latents = self._latents(batch, generator)
        n = latents.shape[0]
        noisy, t, target = noised(self.noise_scheduler, latents, generator, self.objective.shift())
        drops = self.dropout.sample(n, generator, self.device)
        hide = None
        forcing = self.graph_settings.layout_teacher_forcing
        if self.has_graph and forcing < 1.0:
            hide = torch.rand(n, generator=generator, device=self.device) >= forcing
        kwargs, encoded, graphs = self._condition(batch, drops, hide)
        pred = self.unet(noisy, t, **kwargs).sample
        o = self.objective
        loss = weighted_mse(
            pred, target, snr_loss_weights(self.noise_scheduler, t, o.loss_weighting, o.snr_gamma)
        )
        if encoded is None or encoded.predicted is None:
            return loss, {}
        known = graphs.has_box  # the layout loss reads the true boxes, hidden from the model or not
        layout = (
            F.l1_loss(encoded.predicted[known], graphs.box[known].float())
            if bool(known.any())
            else encoded.predicted.sum() * 0.0
        )
        total = loss + self.graph_settings.layout_loss_weight * layout
        return total, {"diffusion_loss": loss, "layout_loss": layout}

    # --- sampling -------------------------------------------------------------------------------
    def pipeline(self):
        """An ``SG2ImgPipeline`` over this module's parts and adapter (shared, not copied), with the
        DDIM sampler of the base's schedule and no progress bar."""
        from ip_adapter import TransformersImageEncoder
        from sg2img.infer.pipeline import SG2ImgPipeline

        self.build()
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
        pipe.default_eta = self.sample_eta
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
        self.build()
        return self.adapter.save(path)


__all__ = ["AdapterModel", "branch_of"]
