"""Inference: diffusers' Stable Diffusion pipelines with the scene-graph adapter.

``SG2ImgPipeline`` is a ``StableDiffusionPipeline`` (and ``SG2ImgControlNetPipeline`` a
``StableDiffusionControlNetPipeline``) that also takes a scene graph and an image prompt, each with its
own scale::

    pipe = SG2ImgPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # or a folder
    pipe.load_sg_adapter("adapter.safetensors")  # ours, or an official ip-adapter_sd15 file
    pipe(prompt="...", scene_graph=graph, ip_adapter_image=img, image_scale=0.6, sg_scale=1.0).images

The denoising loop is diffusers' own: the adapter only supplies the decoupled streams (through
``cross_attention_kwargs``) or, for the ``concat`` ablation, the extended prompt embeddings and their
padding mask. So with ``sg_scale=0`` or an adapter without a graph branch, the images equal those of
stock diffusers with ``load_ip_adapter`` for the same seed, scheduler, steps and scale.

Classifier-free guidance negatives: the negative (or empty) prompt for text, ``proj(negative image)``
for the image (zeroed CLIP embedding; for patch tokens the features of a zero image) and the empty
graph for the graph. Text only leaves the image branch out (lambda = 0, as in the paper); image or graph
only uses the empty prompt.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from PIL import Image

from ip_adapter import IMAGE_STREAM, ImageEncoder, ImageFeatures, Stream, TransformersImageEncoder
from ip_adapter.attention import AttentionRecorder, Scale
from sg2img.base.components import (
    IP_ADAPTER_IMAGE_ENCODER,
    Components,
    load_image_encoder,
    read_folder_marker,
    write_folder_marker,
)
from sg2img.graph import SceneGraph
from sg2img.graph_batch import graphs_to_batch
from sg2img.model.adapter import SG_STREAM, SceneGraphAdapter
from sg2img.model.gnn import GraphTokens, token_labels
from sg2img.model.injection import is_zero
from sg2img.model.labels import LabelEmbedder


@dataclass
class GraphAttention:
    """Where one generated image attended to each token of its graph (graph branch, averaged over heads,
    layers and steps): ``maps`` is (N, h, w) at the latent resolution, ``labels[i]`` names token i
    (``None`` for padding)."""

    labels: list[str | None]
    maps: torch.Tensor

    def nodes(self) -> dict[str, torch.Tensor]:
        """Object tokens only: ``{"i: label": (h, w)}``."""
        return {
            name: self.maps[i]
            for i, name in enumerate(self.labels)
            if name is not None and name.split(":", 1)[0].isdigit()
        }


@dataclass
class SG2ImgPipelineOutput(StableDiffusionPipelineOutput):
    """``layouts``: per image, the box (x0, y0, x1, y1) in [0, 1] of each object of its graph that the graph
    branch used (given in the graph, else predicted by the layout head); None without a graph or boxes."""

    attention_maps: list[GraphAttention] | None = field(default=None)
    layouts: list[list[tuple[float, float, float, float]]] | None = field(default=None)


def _broadcast(name: str, values: list, n: int) -> list:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"{name} has {len(values)} entries; expected 1 or the batch size {n}")


def as_graphs(scene_graph: Any) -> list[SceneGraph] | None:
    """A SceneGraph, an sg2im-style dict, or a list of either."""
    if scene_graph is None:
        return None
    items = scene_graph if isinstance(scene_graph, (list, tuple)) else [scene_graph]
    out = []
    for i, g in enumerate(items):
        if isinstance(g, SceneGraph):
            out.append(g)
        elif isinstance(g, Mapping):
            out.append(SceneGraph.from_json(g, source="scene_graph", path=f"[{i}]"))
        else:
            raise TypeError(f"scene_graph[{i}] must be a SceneGraph or a dict, got {type(g).__name__}")
    return out


@contextmanager
def _padding_mask_hooks(
    unet: torch.nn.Module, controlnet: torch.nn.Module | None, mask: torch.Tensor, text_len: int
):
    """For an injection that extends the prompt (``concat``): give the UNet the key-padding mask of the
    extended prompt, and the ControlNet (trained on text alone) only the text tokens."""

    def unet_hook(module, args, kwargs):
        rows = kwargs["encoder_hidden_states"].shape[0]
        kwargs["encoder_attention_mask"] = mask[-rows:]
        return args, kwargs

    def controlnet_hook(module, args, kwargs):
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :text_len]
        return args, kwargs

    handles = [unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    if controlnet is not None:
        handles.append(controlnet.register_forward_pre_hook(controlnet_hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _conditional_rows(value: Any, rows: int) -> Any:
    """The conditional half of a UNet argument whose leading dimension is the ``rows`` of a guided batch
    (negatives first, then positives): tensors and streams sliced, containers walked, the rest as is."""
    if isinstance(value, torch.Tensor):
        return value[rows // 2 :] if value.ndim and value.shape[0] == rows else value
    if isinstance(value, Stream):
        if value.tokens.shape[0] != rows:
            return value
        return Stream(
            *(None if t is None else t[rows // 2 :] for t in (value.tokens, value.mask, value.regions))
        )
    if isinstance(value, Mapping):
        return {k: _conditional_rows(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_conditional_rows(v, rows) for v in value)
    return value


@contextmanager
def _guidance_interval_hook(unet: torch.nn.Module, interval: tuple[int, int]):
    """Classifier-free guidance only at timesteps in ``interval`` (Kynkaanniemi et al. 2024, "Applying
    guidance in a limited interval"). Outside it the UNet runs on the conditional rows alone and returns
    them twice, as negatives and positives, so the guided prediction is the conditional one and the step
    costs half a guided one."""
    lo, hi = interval
    skipped: list[int] = []  # the guided batch's rows while a step runs unguided

    def before(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        if lo <= float(t) <= hi:
            return None
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        skipped.append(rows)
        return _conditional_rows(args, rows), _conditional_rows(kwargs, rows)

    def after(module, args, kwargs, output):
        if not skipped:
            return output
        skipped.pop()
        sample = output[0] if isinstance(output, tuple) else output.sample
        both = torch.cat([sample, sample])
        if isinstance(output, tuple):
            return (both, *output[1:])
        output.sample = both
        return output

    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


ADAPTER_FOLDER = "sg_adapter"  # where save_pretrained puts the adapter, inside the pipeline's folder


class SceneGraphPipelineMixin:
    """The scene-graph adapter for a diffusers Stable Diffusion pipeline class (see the module doc)."""

    sg_adapter: SceneGraphAdapter | None = None
    clip: ImageEncoder | None = None  # the CLIP vision tower with its preprocessing
    label_embedder: LabelEmbedder | None = None
    default_eta: float = 0.0  # DDIM's eta when a call passes none (the base's own, see ``Components.eta``)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """diffusers' ``from_pretrained`` (hub id or folder); the scheduler becomes DDIM, the paper's
        sampler, unless one is passed. A folder written by ``save_pretrained`` brings its adapter back."""
        pipe = super().from_pretrained(*args, **kwargs)
        if "scheduler" not in kwargs:
            pipe.use_ddim()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        folder = Path(str(source)) if source is not None else None
        if folder is not None and folder.is_dir():  # the sampler's eta its save_pretrained recorded
            pipe.default_eta = float(read_folder_marker(folder).get("eta", 0.0))
        saved = folder / ADAPTER_FOLDER / "adapter.safetensors" if folder is not None else None
        if saved is not None and saved.is_file():  # a folder this pipeline's save_pretrained wrote
            pipe.load_sg_adapter(saved)
        return pipe

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` for the base, with the UNet saved as plain diffusers (the adapter's
        processors detached while it writes), and the adapter beside it as a ``save_pretrained`` folder,
        ``sg_adapter/`` (not a pipeline component: stock diffusers reads the folder as a plain SD1.5). The
        base's DDIM eta (``default_eta``) goes into the folder's ``sg2img.json``, where loading finds it."""
        adapter = self.sg_adapter
        if adapter is not None:
            adapter.detach(self.unet)
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if adapter is not None:
                adapter.attach(self.unet)
        write_folder_marker(save_directory, eta=self.default_eta)
        if adapter is not None:
            adapter.save_pretrained(Path(save_directory) / ADAPTER_FOLDER, base=str(save_directory))

    @classmethod
    def from_single_file(cls, *args: Any, **kwargs: Any):
        """diffusers' ``from_single_file`` (an SD1.5 ``.safetensors``/``.ckpt``; ``config=`` names the
        folder or hub id whose component configs describe it); the scheduler becomes DDIM."""
        pipe = super().from_single_file(*args, **kwargs)
        if "scheduler" not in kwargs:
            pipe.use_ddim()
        return pipe

    # K/V of the constant token sequences once per generation (see ip_adapter.attention); False projects
    # them at every step, as stock diffusers does (the benchmarks' "before")
    cache_constant_kv: bool = True

    def use_ddim(self) -> None:
        """Sample with DDIM (the paper's sampler) on the base's own noise schedule."""
        if not isinstance(self.scheduler, DDIMScheduler):
            self.scheduler = DDIMScheduler.from_config(self.scheduler.config)

    def _use_pixel_space(self) -> None:
        """No VAE: the UNet works on RGB in [-1, 1] at full resolution."""
        if isinstance(self, StableDiffusionControlNetPipeline):
            raise ValueError("the ControlNet pipeline needs a VAE; pixel-space bases are not supported")
        self.vae_scale_factor = 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @classmethod
    def from_components(cls, parts: Components, **kwargs: Any):
        """From already-built parts (a preset, or ``sg2img.base.components.load_base``)."""
        given = parts.pipeline_kwargs()
        scheduler = given["scheduler"]
        # StableDiffusionPipeline.__init__ "repairs" old hub scheduler configs in place: steps_offset
        # becomes 1 and clip_sample False. A preset's or base file's scheduler is exactly what its model
        # was trained and meant to be sampled with (a pixel-space base may well clip x0 to [-1, 1]), so
        # the pipeline gets a copy and then the scheduler as declared.
        pipe = cls(**{**given, "scheduler": copy.deepcopy(scheduler)}, **kwargs)
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
        if parts.image_encoder is not None:
            pipe.clip = parts.image_encoder
        pipe.default_eta = parts.eta
        return pipe

    def eta_for(self, eta: float | None) -> float:
        """The DDIM eta a call with ``eta`` samples with: its own, else the base's (``default_eta``)."""
        return self.default_eta if eta is None else eta

    # --- the adapter ----------------------------------------------------------------------------
    def load_sg_adapter(self, path: str | Path, image_encoder: str | None = None) -> SceneGraphAdapter:
        """Load an sg2img adapter file (every branch it has) or an official IP-Adapter file (the image
        branch alone) and attach it to the UNet.

        ``image_encoder``: where the CLIP vision tower comes from when the adapter has an image branch
        (see ``sg2img.base.components.load_image_encoder``); default: the pipeline's ``image_encoder``, else
        IP-Adapter's ViT-H/14 (``h94/IP-Adapter``, ``models/image_encoder``).
        """
        adapter = SceneGraphAdapter.from_file(
            path, self.unet, label_dim=self.text_encoder.config.hidden_size, add_graph_branch=False
        ).eval()  # for inference: no dropout in the GNN or the Resampler
        self.set_sg_adapter(adapter, image_encoder=image_encoder)
        return adapter

    def set_sg_adapter(
        self,
        adapter: SceneGraphAdapter,
        image_encoder: str | ImageEncoder | None = None,
        labels: LabelEmbedder | None = None,
        cast: bool = True,
    ) -> None:
        """Use an in-memory adapter; its weights are shared, not copied. ``cast=False`` leaves the adapter
        and image encoder on their device and dtype (an adapter in training keeps its fp32 weights)."""
        if adapter.config.image_branch:
            self.clip = self._resolve_image_encoder(image_encoder, cast)
            want, have = adapter.config.image.clip_embeddings_dim, self.clip.spec.projection_dim
            if adapter.config.image.image_tokens == "patch":
                want, have = adapter.config.image.clip_hidden_dim, self.clip.spec.hidden_size
            if want != have:
                raise ValueError(
                    f"the adapter's image branch expects CLIP features of width {want}, but the image "
                    f"encoder gives {have}; pass the image encoder it was trained with"
                )
        if adapter.config.graph_branch and adapter.config.label_dim != self.text_encoder.config.hidden_size:
            raise ValueError(
                f"the adapter's graph branch expects label embeddings of width {adapter.config.label_dim}, "
                f"but this text encoder gives {self.text_encoder.config.hidden_size}"
            )
        if cast:
            adapter.to(device=self.unet.device, dtype=self.unet.dtype)
        adapter.attach(self.unet)
        self.sg_adapter = adapter
        self.label_embedder = labels or LabelEmbedder(self.text_encoder, self.tokenizer)

    def unload_sg_adapter(self) -> None:
        if self.sg_adapter is not None:
            self.sg_adapter.detach(self.unet)
        self.sg_adapter = None

    def _resolve_image_encoder(self, spec: str | ImageEncoder | None, cast: bool = True) -> ImageEncoder:
        if isinstance(spec, ImageEncoder):
            encoder = spec
        elif spec is not None:
            encoder = load_image_encoder(spec)
        elif self.clip is not None:
            encoder = self.clip
        elif getattr(self, "image_encoder", None) is not None:
            encoder = TransformersImageEncoder(self.image_encoder)
        else:
            try:
                encoder = load_image_encoder(":".join(IP_ADAPTER_IMAGE_ENCODER))
            except OSError as e:
                raise OSError(
                    "the adapter has an image branch but the base model has no image encoder, and "
                    f"IP-Adapter's ({':'.join(IP_ADAPTER_IMAGE_ENCODER)}) could not be loaded: {e}. Pass "
                    "image_encoder= a local CLIPVisionModelWithProjection folder or 'open_clip:MODEL:FILE'"
                ) from e
        if cast:
            encoder.to(device=self.unet.device, dtype=self.unet.dtype)
        encoder.eval().requires_grad_(False)
        if isinstance(encoder, TransformersImageEncoder):
            self.register_modules(image_encoder=encoder.model)
        return encoder

    def to(self, *args: Any, **kwargs: Any):
        pipe = super().to(*args, **kwargs)
        for module in (self.sg_adapter, self.clip):
            if module is not None:
                module.to(device=self.unet.device, dtype=self.unet.dtype)
        return pipe

    # --- conditioning ---------------------------------------------------------------------------
    def _graph_tokens(self, graphs: list[SceneGraph]) -> GraphTokens:
        batch = graphs_to_batch(graphs, self.label_embedder).to(self.unet.device)
        return self.sg_adapter.graph_tokens(batch)

    def _image_stream(
        self, images: list[Image.Image] | None, batch: int, rows: Callable[..., torch.Tensor]
    ) -> Stream:
        """The image branch's stream over the UNet rows: the negative image's tokens, then the prompt
        images' (or the negative again when none is given). Every row goes through the projection as one
        batch, as diffusers does."""
        neg = self.clip.negative_features(batch)
        feats = self.clip.encode_images(images) if images is not None else neg
        return Stream(
            self.sg_adapter.image_tokens(
                ImageFeatures(rows(neg.embeds, feats.embeds), rows(neg.patch_tokens, feats.patch_tokens))
            )
        )

    def _graph_stream(
        self, graphs: list[SceneGraph] | None, batch: int, negatives: bool, rows: Callable[..., torch.Tensor]
    ) -> tuple[Stream, list[list[tuple[float, float, float, float]]] | None]:
        """The graph branch's stream over the UNet rows (the empty graph for the negatives, and for the
        positives when none is given), and per graph the layout it used (None without graphs or boxes)."""
        empty = [SceneGraph()] * batch
        encoded = self._graph_tokens((empty if negatives else []) + (graphs or empty))
        unc = encoded.rows(slice(0, batch if negatives else 0))
        cond = encoded.rows(slice(-batch, None))
        regions = None if cond.regions is None else rows(unc.regions, cond.regions)
        stream = Stream(rows(unc.tokens, cond.tokens), rows(unc.mask, cond.mask), regions)
        if graphs is None or encoded.layout is None:  # the empty graphs have no objects: all boxes are ours
            return stream, None
        boxes = [tuple(b) for b in encoded.layout.float().cpu().tolist()]
        starts = [0, *itertools.accumulate(len(g.objects) for g in graphs)]
        return stream, [boxes[a:b] for a, b in itertools.pairwise(starts)]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        ip_adapter_image: Image.Image | list[Image.Image] | None = None,
        scene_graph: SceneGraph | Mapping | Sequence | None = None,
        image_scale: Scale = 1.0,
        sg_scale: Scale = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_interval: tuple[int, int] | None = None,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        attention_maps: bool = False,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SG2ImgPipelineOutput:
        """diffusers' call, plus ``scene_graph`` (a SceneGraph, an sg2im dict or a list: one per prompt)
        and the branch scales ``image_scale``/``sg_scale`` (a float, one per cross-attention layer, or a
        per-block dict as in ``set_ip_adapter_scale``). ``attention_maps=True`` also returns, per image,
        the graph branch's attention to each graph token. ``guidance_interval=(lo, hi)``: guidance only at
        timesteps lo <= t <= hi (of the schedule's training steps), the conditional prediction elsewhere.
        ``eta``: DDIM's per-step noise (0 deterministic, 1 DDPM's); None: the base's own (``eta_for``).
        Other keyword arguments go to the parent call
        (``latents``, ``guidance_rescale``, ``output_type``; ControlNet's ``image``, ...)."""
        if kwargs.pop("ip_adapter_image_embeds", None) is not None:
            raise ValueError("pass ip_adapter_image; precomputed ip_adapter_image_embeds are not supported")
        if "prompt_embeds" in kwargs:
            raise ValueError(
                "pass prompt (text); prompt_embeds are built here together with the adapter tokens"
            )
        if self.vae is None and self.vae_scale_factor != 1:
            self._use_pixel_space()
        graphs = as_graphs(scene_graph)
        images = None
        if ip_adapter_image is not None:
            images = (
                list(ip_adapter_image) if isinstance(ip_adapter_image, (list, tuple)) else [ip_adapter_image]
            )
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        batch = max(len(prompts), len(graphs or []), len(images or []))
        prompts = [p or "" for p in _broadcast("prompt", prompts, batch)]
        adapter = self.sg_adapter
        if adapter is None and (graphs or images):
            raise ValueError(
                "a scene graph or an image prompt needs an adapter: call pipe.load_sg_adapter(path)"
            )
        if graphs is not None:
            graphs = _broadcast("scene_graph", graphs, batch)
            if not adapter.config.graph_branch:
                raise ValueError("this adapter has no graph branch (an image-only adapter); drop scene_graph")
        if images is not None:
            images = _broadcast("ip_adapter_image", images, batch)
            if not adapter.config.image_branch:
                raise ValueError("this adapter has no image branch; drop ip_adapter_image")

        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        n = num_images_per_prompt
        if guidance_interval is not None:
            lo, hi = guidance_interval
            last = self.scheduler.config.num_train_timesteps - 1
            if not 0 <= lo <= hi <= last:
                raise ValueError(
                    f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= {last}, got {guidance_interval}"
                )

        def rows(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            """The UNet's rows: with guidance every prompt's negative images, then its positive ones."""
            cond = cond.repeat_interleave(n, dim=0)
            return torch.cat([uncond.repeat_interleave(n, dim=0), cond]) if do_cfg else cond

        text, negative_text = self.encode_prompt(  # as the parent call would encode them
            prompts,
            self.unet.device,
            1,
            do_cfg,
            negative_prompt,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=kwargs.get("clip_skip"),
        )
        text_rows = rows(negative_text, text) if do_cfg else rows(text, text)
        streams: dict[str, Stream] = {}
        layouts = None
        used = {IMAGE_STREAM: images is not None and not is_zero(image_scale),
                SG_STREAM: graphs is not None and not is_zero(sg_scale)}  # fmt: skip
        if adapter is None:
            unet_kwargs: dict[str, Any] = {"encoder_hidden_states": text_rows}
        else:
            wanted = {s for s in adapter.config.streams if used[s] or adapter.injection.every_stream}
            if IMAGE_STREAM in wanted:
                streams[IMAGE_STREAM] = self._image_stream(
                    images if used[IMAGE_STREAM] else None, batch, rows
                )
            if SG_STREAM in wanted:
                streams[SG_STREAM], layouts = self._graph_stream(
                    graphs if used[SG_STREAM] else None, batch, do_cfg, rows
                )
                layouts = None if layouts is None else [layouts[r // n] for r in range(batch * n)]
            adapter.injection.set_scales(
                adapter.attention,
                {
                    s: scale
                    for s, scale in ((IMAGE_STREAM, image_scale), (SG_STREAM, sg_scale))
                    if s in streams
                },
            )
            unet_kwargs = adapter.injection.unet_kwargs(text_rows, streams)

        # the parent call takes one row of prompt embeddings per prompt (it repeats them per image); the
        # rest of the conditioning is per UNet row and reaches the UNet as it is
        hidden = unet_kwargs.pop("encoder_hidden_states")
        call = dict(
            prompt_embeds=hidden[-batch * n :][::n],
            negative_prompt_embeds=hidden[: batch * n][::n] if do_cfg else None,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=self.eta_for(eta),
            generator=generator,
            num_images_per_prompt=n,
            height=height,
            width=width,
            **kwargs,
        )
        cak = {**(cross_attention_kwargs or {}), **unet_kwargs.pop("cross_attention_kwargs", {})}
        call["cross_attention_kwargs"] = cak or None
        mask = unet_kwargs.pop("encoder_attention_mask", None)

        recorder = None
        if attention_maps:
            if not used[SG_STREAM] or adapter.attention is None:
                raise ValueError(
                    "attention_maps need a scene graph, a non-zero sg_scale and the decoupled graph branch"
                )
            h = (height or self.unet.config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
            w = (width or self.unet.config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
            # the conditional rows: the last batch * n, guided or not (a step outside the guidance interval)
            recorder = AttentionRecorder(SG_STREAM, (h, w), rows=slice(-batch * n, None))
        output_type = call.get("output_type", "pil")
        if self.vae is None:  # pixel space: the denoised sample is the image
            call["output_type"] = "latent"
        with ExitStack() as hooks:
            if mask is not None:
                hooks.enter_context(
                    _padding_mask_hooks(self.unet, getattr(self, "controlnet", None), mask, text.shape[1])
                )
            if recorder is not None:
                hooks.enter_context(adapter.attention.recording(recorder))
            if guidance_interval is not None and do_cfg:
                hooks.enter_context(_guidance_interval_hook(self.unet, guidance_interval))
            # the text and stream tokens are the same at every step: project them to K/V once per generation
            if adapter is not None and adapter.attention is not None:
                hooks.enter_context(adapter.attention.caching())
            out = super().__call__(**call, return_dict=True)
        images = out.images
        if self.vae is None and output_type != "latent":
            images = self.image_processor.postprocess(images, output_type=output_type)
        maps = None
        if recorder is not None:
            labels = token_labels(graphs, adapter.config.tokens)
            recorded = recorder.maps().cpu()
            maps = [GraphAttention(labels[r // n], recorded[r]) for r in range(batch * n)]
        return SG2ImgPipelineOutput(
            images=images,
            nsfw_content_detected=out.nsfw_content_detected,
            attention_maps=maps,
            layouts=layouts,
        )


class SG2ImgPipeline(SceneGraphPipelineMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.5 with text, image and scene-graph prompts."""


class SG2ImgControlNetPipeline(SceneGraphPipelineMixin, StableDiffusionControlNetPipeline):
    """The same, composed with a ``ControlNetModel`` (pass the control image as ``image=``)."""


__all__ = [
    "GraphAttention",
    "SG2ImgControlNetPipeline",
    "SG2ImgPipeline",
    "SG2ImgPipelineOutput",
    "SceneGraphPipelineMixin",
    "as_graphs",
]
