"""The shapes world's tiny CLIP: open_clip model, NegCLIP negatives, its file, and the towers a base reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ip_adapter import CheckpointError
from ip_adapter.image_encoder import TransformersImageEncoder, open_clip_to_transformers
from sg2img.base.components import PRESETS, read_base_file
from sg2img.base.tokenizer import clip_tokenizer
from sg2img.cli import main
from sg2img.data import Shapes
from sg2img.data.rows import Preprocess, collate
from sg2img.shapes.tiny_clip import (
    TinyClipConfig,
    TinyClipModule,
    binding_negative,
    build_tiny_clip,
    clip_normalise,
    encode_text,
    load_tiny_clip,
    relation_negative,
    retrieval_accuracy,
    save_tiny_clip,
    text_tower_to_transformers,
    transformers_towers,
)
from sg2img.train.base_module import BaseModelModule

CLIP_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "experiments" / "shapes" / "clip.yaml"
SMALL = TinyClipConfig(embed_dim=16, vision_width=32, vision_layers=2, text_width=48, text_layers=2)


def ids(*captions: str) -> torch.Tensor:
    return clip_tokenizer()(
        list(captions), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids


def test_binding_negatives_swap_colours_between_differently_shaped_objects_only():
    rng = np.random.default_rng(0)
    assert binding_negative("a red circle and a blue square", rng) == "a blue circle and a red square"
    assert binding_negative("a red circle and a blue circle", rng) is None  # same words, same meaning
    # every mention changes, so the relations stay about the same two objects
    neg = binding_negative("a red circle left of a blue square; a red circle above a green circle", rng)
    assert neg in (
        "a blue circle left of a red square; a blue circle above a green circle",
        "a red circle left of a green square; a red circle above a blue circle",
    )
    assert sorted(neg.split()) == sorted(
        [
            "a",
            "red",
            "circle",
            "left",
            "of",
            "a",
            "blue",
            "square;",
            "a",
            "red",
            "circle",
            "above",
            "a",
            "green",
            "circle",
        ]
    )


def test_relation_negatives_reverse_exactly_one_relation():
    rng = np.random.default_rng(0)
    caption = "a red circle left of a blue square; a red circle above a green circle"
    seen = {relation_negative(caption, rng) for _ in range(20)}
    assert seen == {
        "a red circle right of a blue square; a red circle above a green circle",
        "a red circle left of a blue square; a red circle below a green circle",
    }
    assert relation_negative("a red circle and a blue square", rng) is None


def test_the_short_text_pass_equals_open_clips_full_pass():
    model = build_tiny_clip(SMALL).eval()
    tokens = ids("a red circle", "a red circle left of a blue square; a green triangle above a red circle")
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), rtol=0, atol=1e-5)


def test_the_towers_convert_to_transformers_with_equal_outputs():
    model = build_tiny_clip(SMALL).eval()
    text = text_tower_to_transformers(model, SMALL)
    assert isinstance(text, CLIPTextModel) and text.config.hidden_size == SMALL.text_width
    tokens = ids("a red circle left of a blue square", "a green triangle")
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        states = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        torch.testing.assert_close(text(input_ids=tokens).last_hidden_state, states, rtol=0, atol=1e-5)
        vision = TransformersImageEncoder(open_clip_to_transformers(model.visual))
        pixels = torch.randn(
            2, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(vision(pixels).embeds, model.encode_image(pixels), rtol=0, atol=1e-5)
    assert vision.spec == SMALL.vision_spec()
    assert CLIPTextConfig(**SMALL.text_config()).hidden_act == "gelu"  # open_clip's exact GELU


def test_the_default_tiny_clip_has_the_sizes_of_the_shapes_preset():
    preset = PRESETS["shapes"]
    config = TinyClipConfig()
    assert config.text_config() == preset.text_encoder and config.vision_spec() == preset.image_encoder
    assert config.text_width == preset.unet["cross_attention_dim"]


def test_the_file_round_trips_and_a_wrong_file_is_one_error(tmp_path):
    model = build_tiny_clip(SMALL, seed=3)
    path = save_tiny_clip(model, SMALL, tmp_path / "clip.safetensors")
    loaded, config = load_tiny_clip(path)
    assert config == SMALL and not any(p.requires_grad for p in loaded.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        load_tiny_clip(tmp_path / "bad.safetensors")


def test_clip_normalise_equals_the_clip_image_processor_at_the_towers_size():
    row = Shapes("train", num_rows=1).example(0)
    processed = Preprocess(32, 32, clip_tokenizer())(row)
    torch.testing.assert_close(
        clip_normalise(processed["pixels"]), processed["clip_pixels"], atol=2e-2, rtol=0
    )


def test_a_base_reads_the_tiny_clips_towers_and_its_file_keeps_them(tmp_path):
    clip_file = save_tiny_clip(build_tiny_clip(SMALL, seed=1), SMALL, tmp_path / "clip.safetensors")
    module = BaseModelModule(preset="shapes", clip=str(clip_file), unet={"cross_attention_dim": 48})
    module.configure_model()
    assert module.data_requirements()["clip_size"] is None  # a base trains on pixels and text only
    text, vision = transformers_towers(clip_file)
    tokens = ids("a red circle")
    with torch.no_grad():
        torch.testing.assert_close(module.text_encoder(input_ids=tokens)[0], text(input_ids=tokens)[0])
    base = module.export_base(tmp_path / "base.safetensors")
    parts = read_base_file(base)
    with torch.no_grad():
        torch.testing.assert_close(parts.text_encoder(input_ids=tokens)[0], text(input_ids=tokens)[0])
        pixels = torch.zeros(1, 3, 32, 32)
        torch.testing.assert_close(
            parts.image_encoder(pixels).embeds, vision(pixel_values=pixels).image_embeds
        )
    with pytest.raises(ValueError, match="cross_attn_dim"):
        BaseModelModule(preset="shapes", unet={"cross_attn_dim": 48})


def test_hard_negatives_raise_the_loss_and_retrieval_is_scored_per_kind():
    source = Shapes("train", num_rows=8, caption_relations=0.5)
    source.transform = Preprocess(32, None, clip_tokenizer())
    batch = collate([source[i] for i in range(8)])
    assert batch.clip_pixels is None  # nothing reads them: none are made
    plain, negclip = TinyClipModule(SMALL, hard_negatives=False), TinyClipModule(SMALL, hard_negatives=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert negclip.diffusion_loss(batch, g()) > plain.diffusion_loss(batch, g())  # more captions to beat
    acc = retrieval_accuracy(plain.model, clip_tokenizer(), batch.pixels, batch.captions)
    assert set(acc) == {"batch", "binding", "relation"} and all(0 <= v <= 1 for v in acc.values())


def test_fit_clip_writes_the_tiny_clip_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "run"
    args = ["fit-clip", "--config", str(CLIP_CONFIG), "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(root), "--data.batch_size", "8", "--data.val_batch_size", "8",
            "--data.num_workers", "0", "--data.val.init_args.num_rows", "8", "--trainer.val_check_interval", "2",
            "--model.clip.vision_width", "32", "--model.clip.vision_layers", "2", "--model.clip.text_layers", "1",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(args) == 0
    model, config = load_tiny_clip(root / "clip.safetensors")
    assert config.vision_width == 32 and config.text_layers == 1
    assert not torch.equal(model.visual.conv1.weight, build_tiny_clip(config).visual.conv1.weight)
