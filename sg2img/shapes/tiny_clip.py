"""The shapes world's own CLIP: an open_clip model trained here, contrastively, before any UNet sees it.

SD1.5 reads a CLIP that learned to match images and captions first; the shapes world's miniature does the
same. ``TinyClipModule`` (``sg2img fit-clip``) trains an open_clip ``CLIP`` (ViT vision tower, causal text
tower) on the world's images and captions with open_clip's ``ClipLoss``, plus NegCLIP's hard negatives
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"): each image
also scores a caption that differs from its own only in which colour goes with which shape, or in one
relation, so the towers must encode bindings and relations, not a bag of words.

The trained model is written as one safetensors file (``TINY_CLIP_FORMAT``: the open_clip state dict and
its ``TinyClipConfig`` in the metadata). ``transformers_towers`` converts it to the two transformers models
the rest of the framework loads as a base's ``text_encoder`` (``CLIPTextModel``: SD reads its last hidden
state) and ``image_encoder`` (``CLIPVisionModelWithProjection``: IP-Adapter reads its image embeds and
penultimate patch tokens).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection

from ip_adapter.image_encoder import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionTowerSpec,
    open_clip_blocks_to_transformers,
    open_clip_to_transformers,
)
from sg2img.base.tokenizer import clip_tokenizer
from sg2img.data.rows import TrainBatch
from sg2img.train.core import TrainingSteps

log = logging.getLogger(__name__)

TINY_CLIP_FORMAT = "sg2img-tiny-clip"


@dataclass(frozen=True)
class TinyClipConfig:
    """The sizes of an open_clip ``CLIP``. ``text_width`` is the width of the token states a UNet reads
    (its ``cross_attention_dim``); ``image_size`` is the world's image side (no resizing)."""

    embed_dim: int = 64
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 48
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width / text_width must be multiples of vision_heads / text_heads")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.vision_layers < 2:
            raise ValueError("patch tokens come from the penultimate layer: vision_layers must be >= 2")

    def vision_spec(self) -> VisionTowerSpec:
        return VisionTowerSpec(
            hidden_size=self.vision_width,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            projection_dim=self.embed_dim,
            intermediate_size=int(self.vision_width * self.mlp_ratio),
        )

    def text_config(self) -> dict[str, Any]:
        """The ``CLIPTextConfig`` fields of the text tower (exact GELU, as open_clip builds it)."""
        return {
            "hidden_size": self.text_width,
            "intermediate_size": int(self.text_width * self.mlp_ratio),
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "max_position_embeddings": self.context_length,
            "vocab_size": self.vocab_size,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": self.embed_dim,
        }


def build_tiny_clip(config: TinyClipConfig, seed: int = 0) -> torch.nn.Module:
    """An open_clip ``CLIP`` of these sizes, random weights seeded with ``seed``."""
    from open_clip.model import CLIP, CLIPTextCfg

    text = CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
        mlp_ratio=config.mlp_ratio,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(config.embed_dim, config.vision_spec().open_clip_config(), text)


# --- NegCLIP's hard negatives, for the shapes world's caption grammar ------------------------------------
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPE_NAMES = ("circle", "square", "triangle")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPE_NAMES)})\b")
_PREDICATE = re.compile(r"\b(left of|right of|above|below)\b")


def binding_negative(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with the colours of two differently shaped objects swapped ("a red circle and a blue
    square" -> "a blue circle and a red square"): the same words, another binding. None if no such pair."""
    found = [(m.start(1), m.group(1), m.group(2)) for m in _OBJECT.finditer(caption)]
    objects: dict[tuple[str, str], int] = {}
    for start, colour, shape in found:
        objects.setdefault((colour, shape), start)
    pairs = [(a, b) for a in objects for b in objects if a[0] < b[0] and a[1] != b[1]]
    if not pairs:
        return None
    (c1, _), (c2, _) = pairs[int(rng.integers(len(pairs)))]
    swap = {c1: c2, c2: c1}
    # every mention of the two objects changes colour, so a relation caption stays consistent
    return _OBJECT.sub(lambda m: f"{swap.get(m.group(1), m.group(1))} {m.group(2)}", caption)


def relation_negative(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with one relation reversed ("left of" -> "right of"). None if it names no relation."""
    spans = list(_PREDICATE.finditer(caption))
    if not spans:
        return None
    m = spans[int(rng.integers(len(spans)))]
    return caption[: m.start()] + OPPOSITE[m.group(1)] + caption[m.end() :]


def hard_negative(caption: str, rng: np.random.Generator) -> str | None:
    """A relation or a binding negative (a relation when the caption has one, half the time)."""
    if _PREDICATE.search(caption) and rng.random() < 0.5:
        return relation_negative(caption, rng)
    return binding_negative(caption, rng) or relation_negative(caption, rng)


def encode_text(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(ids)`` computed on the ids up to the batch's last end-of-text token only. The
    tower is causal, so the token states up to there, and the pooled end-of-text state, do not depend on
    the padding after it: the result equals the full 77-token pass (to float rounding) at a fraction of
    the cost for short captions."""
    length = int(ids.argmax(dim=1).max()) + 1  # the end-of-text id is the vocabulary's largest
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(len(ids), device=ids.device), ids.argmax(dim=1)]  # open_clip's argmax pool
    return pooled @ model.text_projection


def clip_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] at the tower's own size -> CLIP-normalised input (what ``CLIPImageProcessor`` gives
    for an image already at ``image_size``, without decoding the image twice)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    return ((pixels + 1) / 2 - mean) / std


class TinyClipModule(TrainingSteps):
    """Trains a tiny open_clip CLIP on captioned images (``sg2img fit-clip``).

    Args:
        clip: the model's sizes (``TinyClipConfig``).
        hard_negatives: add one NegCLIP hard negative caption per image to the image->text logits.
        lr / weight_decay / warmup_steps: AdamW, linear warm-up then cosine decay to 0 at ``max_steps``.
        seed: seeds the weights and the negatives drawn in training.
    """

    def __init__(
        self,
        clip: TinyClipConfig = TinyClipConfig(),
        hard_negatives: bool = True,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        seed: int = 0,
    ):
        super().__init__(seed)
        from open_clip.loss import ClipLoss

        self.config, self.hard_negatives = clip, hard_negatives
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.model = build_tiny_clip(clip, seed)
        self.tokenizer = clip_tokenizer()
        self.clip_loss = ClipLoss()

    def data_requirements(self) -> dict[str, Any]:
        # CLIP-normalised here, from the pixels
        return {"resolution": self.config.image_size, "clip_size": None, "tokenizer": self.tokenizer}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.config.context_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def diffusion_loss(self, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        """The contrastive loss (the name is the shared step's hook; nothing here diffuses)."""
        images = F.normalize(self.model.encode_image(clip_normalise(batch.pixels)), dim=-1)
        texts = F.normalize(encode_text(self.model, batch.input_ids), dim=-1)
        scale = self.model.logit_scale.exp()
        loss = self.clip_loss(images, texts, scale)
        if self.hard_negatives:
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
            negatives = [hard_negative(c, rng) for c in batch.captions]
            rows = [i for i, n in enumerate(negatives) if n is not None]
            if rows:
                neg = F.normalize(
                    encode_text(self.model, self.tokenize([negatives[i] for i in rows])), dim=-1
                )
                # NegCLIP: each image chooses among every caption of the batch and every hard negative
                logits = scale * images @ torch.cat([texts, neg]).T
                target = torch.arange(len(images), device=self.device)
                loss = loss + (
                    F.cross_entropy(logits, target) - F.cross_entropy(logits[:, : len(texts)], target)
                )
        return loss

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        loss = super().validation_step(batch, batch_idx)
        if batch.batch_size:
            acc = retrieval_accuracy(self.model, self.tokenizer, batch.pixels, batch.captions, seed=batch_idx)
            for kind, value in acc.items():
                if value is not None:
                    self.log(f"val/retrieval_{kind}", value, batch_size=batch.batch_size)
        return loss

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        total = max(1, int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 10_000)
        warmup = max(1, self.warmup_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, path: str | Path) -> Path:
        return save_tiny_clip(self.model, self.config, path)


@torch.no_grad()
def retrieval_counts(
    model: torch.nn.Module, tokenizer, pixels: torch.Tensor, captions: list[str], seed: int = 0
) -> dict[str, tuple[int, int]]:
    """(right, total) of top-1 image->caption choices: between each image's own caption and one that differs
    from it only in a binding (``binding``: rows with two differently shaped objects) or only in one
    relation (``relation``: rows whose caption has relations); ``batch``: among all the batch's captions."""
    was_training = model.training
    model.eval()
    device = pixels.device

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        return F.normalize(encode_text(model, ids.input_ids.to(device)), dim=-1)

    images = F.normalize(model.encode_image(clip_normalise(pixels)), dim=-1)
    own = encode(captions)
    hits = (images @ own.T).argmax(1).eq(torch.arange(len(captions), device=device))
    out = {"batch": (int(hits.sum()), len(captions))}
    rng = np.random.default_rng(seed)
    for kind, negative in (("binding", binding_negative), ("relation", relation_negative)):
        pairs = [(i, n) for i, n in ((i, negative(c, rng)) for i, c in enumerate(captions)) if n is not None]
        if not pairs:
            out[kind] = (0, 0)
            continue
        rows = torch.tensor([i for i, _ in pairs], device=device)
        neg = encode([n for _, n in pairs])
        right = (images[rows] * own[rows]).sum(-1) > (images[rows] * neg).sum(-1)
        out[kind] = (int(right.sum()), len(pairs))
    model.train(was_training)
    return out


def retrieval_accuracy(
    model: torch.nn.Module, tokenizer, pixels: torch.Tensor, captions: list[str], seed: int = 0
) -> dict[str, float | None]:
    """``retrieval_counts`` as accuracies (None for a kind no caption of the batch allows)."""
    counts = retrieval_counts(model, tokenizer, pixels, captions, seed)
    return {kind: right / total if total else None for kind, (right, total) in counts.items()}


# --- the file, and the towers the rest of the framework reads ---------------------------------------------
def save_tiny_clip(
    model: torch.nn.Module, config: TinyClipConfig, path: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """The open_clip state dict (as ``dtype``: fp16 halves a shipped file) and the config as metadata,
    written atomically."""
    from safetensors.torch import save_file

    from ip_adapter.atomic_files import atomic_write

    out = Path(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": TINY_CLIP_FORMAT, "config": json.dumps(asdict(config), sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return out


EMBEDDED_CLIP = "embedded"  # the shapes world's tiny CLIP shipped in sg2img/assets/


def tiny_clip_path(path: str | Path) -> Path:
    """``embedded`` -> the shipped file; anything else is a path."""
    from sg2img.base.components import ASSETS

    return ASSETS / "shapes-clip.safetensors" if str(path) == EMBEDDED_CLIP else Path(path)


def load_tiny_clip(path: str | Path) -> tuple[torch.nn.Module, TinyClipConfig]:
    """The open_clip model of a tiny-CLIP file (or ``embedded``; eval mode, frozen, fp32) and its config."""
    from ip_adapter.checkpoint import CheckpointError, read_formatted_file

    p = tiny_clip_path(path)
    meta, tensors = read_formatted_file(p, TINY_CLIP_FORMAT)
    try:
        config = TinyClipConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: the metadata field 'config' does not describe a tiny CLIP: {e}") from e
    model = build_tiny_clip(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval().requires_grad_(False), config


def text_tower_to_transformers(model: torch.nn.Module, config: TinyClipConfig) -> CLIPTextModel:
    """The text tower of an open_clip ``CLIP`` as an equal ``CLIPTextModel`` (its last hidden state is the
    open_clip tower's token states after ``ln_final``, what SD's UNet reads)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    out.update(open_clip_blocks_to_transformers(sd, config.text_layers, "text_model.encoder.layers"))
    text = CLIPTextModel(CLIPTextConfig(**config.text_config()))
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5 flattens it
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    result = text.load_state_dict(out, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"conversion left missing {missing} / unexpected {result.unexpected_keys}")
    return text.eval()


def transformers_towers(path: str | Path) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection]:
    """A tiny-CLIP file as the (text encoder, image encoder) pair a base holds."""
    model, config = load_tiny_clip(path)
    return text_tower_to_transformers(model, config), open_clip_to_transformers(model.visual)


__all__ = [
    "TINY_CLIP_FORMAT",
    "TinyClipConfig",
    "TinyClipModule",
    "binding_negative",
    "build_tiny_clip",
    "clip_normalise",
    "encode_text",
    "hard_negative",
    "load_tiny_clip",
    "relation_negative",
    "retrieval_accuracy",
    "retrieval_counts",
    "save_tiny_clip",
    "text_tower_to_transformers",
    "tiny_clip_path",
    "transformers_towers",
]
