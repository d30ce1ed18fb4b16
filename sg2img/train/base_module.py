"""Training a small base model from scratch: ``sg2img fit-base`` (the shapes world's text-to-image model).

The adapter recipes need a frozen base that already draws its world from text. For SD1.5 that base is
downloaded; for the shapes world (``sg2img.shapes.world``) it is trained here, on CPU in minutes: every
UNet weight trains on the captions, the text encoder stays frozen (as SD's CLIP text encoder does), the
caption is dropped to the empty prompt with probability ``caption_dropout`` so that classifier-free
guidance works, and an exponential moving average of the weights (diffusers' ``EMAModel``, with its
warm-up) is what gets exported. A base without a VAE (``vae: null`` in the preset) denoises pixels.

The result is a base file (``sg2img.base.components.save_base_file``): ``DIR/base.safetensors``, written with every
checkpoint and at the end of fit, loadable everywhere a base is accepted (``--model``, ``model.base.source``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.training_utils import EMAModel
from PIL import Image

from sg2img.base.components import (
    Components,
    build_components,
    ddpm_scheduler,
    get_preset,
    load_base,
    save_base_file,
)
from sg2img.data.rows import TrainBatch
from sg2img.graph import SceneGraph
from sg2img.train.core import TrainingSteps, noised, snr_loss_weights, warmup_then_constant, weighted_mse
from sg2img.train.settings import ObjectiveSettings

log = logging.getLogger(__name__)


BASE_OBJECTIVE = ObjectiveSettings(loss_weighting="min_snr", snr_gamma=5.0)
# model.attention -> the diffusers attention processor the UNet trains with, and the transformers attention
# implementation of a text encoder that trains with it
ATTENTION_KERNELS = {"sdpa": AttnProcessor2_0, "matmul": AttnProcessor}
TEXT_ATTENTION = {"sdpa": "sdpa", "matmul": "eager"}
# model.memory_format -> how the UNet's weights and inputs are laid out while training
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class BaseModelModule(TrainingSteps):
    """Trains a base model's UNet on captioned images.

    Args:
        preset: the architecture (``sg2img.base.components.PRESETS``, e.g. ``shapes``), built with random weights.
        unet: UNet config entries that replace the preset's (``block_out_channels``, ``down_block_types``,
            ...), to try another size; the base file records the config that was used.
        scheduler: noise-schedule entries that replace the preset's (``prediction_type: v_prediction``,
            ``timestep_spacing: trailing``, ``rescale_betas_zero_snr``, ...); training and every later
            stage read them from the base file.
        eta: DDIM's eta the base file records as its sampling default (``Preset.eta``): every drawing
            command and the training sample grids use it unless told otherwise (None: the preset's, 0).
        clip: a tiny-CLIP file (``sg2img fit-clip``; ``embedded``: the shipped one) whose towers become the
            base's text encoder (frozen, read as SD reads CLIP) and image encoder, in place of the preset's
            random ones.
        init: a base file to start from instead (its UNet trains on; a resumed run uses ``--ckpt_path``).
        caption_dropout: probability of training on the empty prompt (classifier-free guidance).
        lr / weight_decay / warmup_steps: AdamW, linear warm-up then constant.
        text_lr: train the text encoder together with the UNet, at this learning rate (None: frozen, as
            SD's CLIP text encoder is). Its trained (EMA) weights go into the base file, which every later
            stage reads frozen; the image encoder stays the tiny CLIP's vision tower either way.
        ema_decay: the EMA's decay (0 turns it off: the raw weights are exported).
        objective: which timesteps training draws and how their losses weigh (``ObjectiveSettings``, the
            adapter trainer's own): by default Min-SNR (Hang et al. 2023) with gamma 5, min(SNR, 5) / SNR for
            epsilon, which stops the easy low-noise steps from dominating; ``inv_snr`` weighs high noise,
            where the number and places of the objects are decided, more; ``none`` is the plain MSE.
        seed: seeds the weights and every random draw of training (noise, timesteps, dropout).
        attention: how the UNet's attention layers compute while training. ``sdpa``: diffusers' default
            (``AttnProcessor2_0``, torch's scaled_dot_product_attention); ``matmul``: diffusers'
            ``AttnProcessor`` (scores by ``baddbmm``, softmax, ``bmm``), and a text encoder trained with
            it (``text_lr``) attends ``eager`` instead of ``sdpa``: the same function with other kernels,
            whose backward pass runs the shapes UNet's bfloat16 training step 1.35x as fast on a CPU
            (``experiments/bench/base_train_step.py``). Training only: the base file holds weights, and
            every later stage attends with its own kernels.
        memory_format: how the UNet's weights and noisy inputs are laid out while training.
            ``contiguous``: torch's default (NCHW); ``channels_last``: NHWC, the layout oneDNN's CPU
            convolutions prefer (``experiments/bench/base_train_step.py`` measures the step both ways). The
            same function; training only: the base file's weights are stored in the default layout.
    """

    def __init__(
        self,
        preset: str = "shapes",
        unet: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        eta: float | None = None,
        clip: str | None = None,
        init: str | None = None,
        caption_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        objective: ObjectiveSettings = BASE_OBJECTIVE,
        text_lr: float | None = None,
        seed: int = 0,
        attention: str = "sdpa",
        memory_format: str = "contiguous",
    ):
        super().__init__(seed)
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"model.attention must be one of {sorted(ATTENTION_KERNELS)}, got {attention!r}")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"model.memory_format must be one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}"
            )
        self.attention, self.memory_format = attention, MEMORY_FORMATS[memory_format]
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.preset_name, self.init, self.clip = preset, init, clip
        self.preset = get_preset(preset)
        if unet:
            unknown = sorted(set(unet) - set(inspect.signature(UNet2DConditionModel.__init__).parameters))
            if unknown:
                raise ValueError(f"model.unet: unknown UNet2DConditionModel setting(s) {unknown}")
            self.preset = dataclasses.replace(self.preset, unet={**self.preset.unet, **unet})
        if scheduler:
            unknown = sorted(set(scheduler) - set(inspect.signature(DDIMScheduler.__init__).parameters))
            if unknown:
                raise ValueError(f"model.scheduler: unknown DDIMScheduler setting(s) {unknown}")
            kind = scheduler.get("prediction_type", "epsilon")
            if kind not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(
                    f"model.scheduler.prediction_type must be epsilon, v_prediction or sample, got {kind!r}"
                )
            self.preset = dataclasses.replace(self.preset, scheduler={**self.preset.scheduler, **scheduler})
        if eta is not None:
            if not 0.0 <= eta <= 1.0:
                raise ValueError(
                    f"model.eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {eta}"
                )
            self.preset = dataclasses.replace(self.preset, eta=float(eta))
        self.caption_dropout, self.lr, self.weight_decay = caption_dropout, lr, weight_decay
        if text_lr is not None and text_lr <= 0:
            raise ValueError(
                f"text_lr must be positive (or null: the text encoder stays frozen), got {text_lr}"
            )
        self.text_lr = text_lr
        self.warmup_steps, self.ema_decay = warmup_steps, ema_decay
        # a partial group (a dict) fills in from the base's own defaults, not the adapter trainer's
        self.objective = (
            dataclasses.replace(BASE_OBJECTIVE, **objective) if isinstance(objective, dict) else objective
        )
        self.unet = self.vae = self.text_encoder = self.image_encoder = None
        self.ema: EMAModel | None = None

    # --- building --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.unet is not None:
            return
        if self.clip and not self.init:
            from sg2img.shapes.tiny_clip import load_tiny_clip

            _, config = load_tiny_clip(self.clip)  # the towers' configs go into the preset, and the base file
            self.preset = dataclasses.replace(
                self.preset, text_encoder=config.text_config(), image_encoder=config.vision_spec()
            )
        parts = load_base(self.init) if self.init else build_components(self.preset, seed=self.seed)
        if self.clip and not self.init:
            from ip_adapter.image_encoder import TransformersImageEncoder
            from sg2img.shapes.tiny_clip import transformers_towers

            text, vision = transformers_towers(self.clip)
            parts.text_encoder, parts.image_encoder = text, TransformersImageEncoder(vision)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.unet.set_attn_processor(ATTENTION_KERNELS[self.attention]())
        self.unet.to(memory_format=self.memory_format)
        if self.text_lr is not None:
            self.text_encoder.set_attn_implementation(TEXT_ATTENTION[self.attention])
        self.image_encoder, self.tokenizer = parts.image_encoder, parts.tokenizer
        self.noise_scheduler = ddpm_scheduler(self.preset)
        self.sample_scheduler_config = parts.scheduler.config
        for m in (self.vae, self.text_encoder, self.image_encoder):
            if m is not None:
                m.requires_grad_(False)
        for m in self.trained_modules().values():
            m.requires_grad_(True)
        if self.ema_decay:
            self.ema = EMAModel(self._trained_parameters(), decay=self.ema_decay, use_ema_warmup=True)
        self.train(self.training)

    @property
    def trained_names(self) -> tuple[str, ...]:
        """What this run trains, by attribute name: the UNet, and the text encoder when ``text_lr`` is set."""
        return ("unet", "text_encoder") if self.text_lr is not None else ("unet",)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in self.trained_names}

    def _trained_parameters(
        self, modules: dict[str, torch.nn.Module] | None = None
    ) -> list[torch.nn.Parameter]:
        return [p for m in (modules or self.trained_modules()).values() for p in m.parameters()]

    def parts(self, ema: bool = True) -> Components:
        """The model as it stands (with the EMA weights when ``ema``), sharing nothing with training."""
        import copy

        self.configure_model()
        copies = {
            k: copy.deepcopy(m).eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
            for k, m in self.trained_modules().items()
        }
        if ema and self.ema is not None:
            self.ema.copy_to(self._trained_parameters(copies))
        return Components(
            unet=copies["unet"],
            vae=self.vae,
            text_encoder=copies.get("text_encoder", self.text_encoder),
            tokenizer=self.tokenizer,
            scheduler=DDIMScheduler.from_config(self.sample_scheduler_config),
            image_encoder=self.image_encoder,
            eta=self.preset.eta,
        )

    def export_base(self, path: str | Path) -> Path:
        """The EMA model as a base file (fp32: the files are small)."""
        return save_base_file(self.parts(ema=True), self.preset, path, dtype=torch.float32)

    def train(self, mode: bool = True) -> BaseModelModule:
        super().train(mode)
        for m in (self.vae, self.text_encoder, self.image_encoder):
            if m is not None and m not in self.trained_modules().values():
                m.eval()
        return self

    # --- checkpoints: the trained modules and their EMA, not the frozen parts ---------------------
    def is_trainable(self, name: str) -> bool:
        return name.startswith(tuple(f"{module}." for module in self.trained_names))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.configure_model()
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise RuntimeError("the checkpoint holds no EMA state; set model.ema_decay: 0 to resume it")
            self.ema.load_state_dict(checkpoint["ema"])

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    # --- training --------------------------------------------------------------------------------
    def data_requirements(self) -> dict[str, int]:
        self.configure_model()
        side = self.vae.config.sample_size if self.vae is not None else self.unet.config.sample_size
        # a base reads text, not CLIP pixels
        return {"resolution": int(side), "clip_size": None, "tokenizer": self.tokenizer}

    def _text(self, input_ids: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        if bool(drop.any()):
            empty = self.tokenizer(
                "", padding="max_length", max_length=ids.shape[1], return_tensors="pt"
            ).input_ids.to(self.device)
            ids = torch.where(drop[:, None], empty, ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_lr is not None):
            return self.text_encoder(input_ids=ids)[0]

    @torch.no_grad()
    def _clean(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        pixels = batch.pixels.to(self.device)
        if self.vae is None:
            return pixels.to(self.unet.dtype)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    def diffusion_loss(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        x0 = self._clean(batch, generator)
        o = self.objective
        noisy, t, target = noised(self.noise_scheduler, x0, generator, o.shift())
        drop = torch.rand(x0.shape[0], generator=generator, device=self.device) < self.caption_dropout
        noisy = noisy.contiguous(memory_format=self.memory_format)
        pred = self.unet(noisy, t, self._text(batch.input_ids, drop)).sample
        return weighted_mse(
            pred, target, snr_loss_weights(self.noise_scheduler, t, o.loss_weighting, o.snr_gamma)
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.step(self._trained_parameters())

    def configure_optimizers(self):
        groups = [{"params": list(self.unet.parameters()), "lr": self.lr}]
        if self.text_lr is not None:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": self.text_lr})
        return warmup_then_constant(
            torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay), self.warmup_steps
        )

    # --- sampling (the SampleGrid callback) ------------------------------------------------------
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
        """Text-to-image samples from the EMA weights (graphs and images are ignored: a base reads text)."""
        from sg2img.infer.pipeline import SG2ImgPipeline

        pipe = SG2ImgPipeline.from_components(self.parts(ema=True))
        pipe.set_progress_bar_config(disable=True)
        prompts = list(prompts) if prompts else [g.describe() for g in graphs or []] or [""]
        return pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            height=size,
            width=size,
        ).images


__all__ = ["BaseModelModule"]
