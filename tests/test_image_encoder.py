import numpy as np
import pytest
import torch
from PIL import Image

from ip_adapter import TINY_VIT, OpenClipImageEncoder, TransformersImageEncoder, open_clip_to_transformers
from ip_adapter.image_encoder import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_image_processor


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(0)
    oc = OpenClipImageEncoder.from_spec(TINY_VIT)
    return oc, TransformersImageEncoder(open_clip_to_transformers(oc.visual))


def test_converted_twin_gives_the_same_features(twins):
    oc, hf = twins
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = oc(x), hf(x)
    assert a.embeds.shape == (3, TINY_VIT.projection_dim)
    assert a.patch_tokens.shape == (3, TINY_VIT.num_tokens, TINY_VIT.hidden_size)
    torch.testing.assert_close(a.embeds, b.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, atol=1e-5, rtol=1e-5)


def test_open_clip_embeds_equal_encode_image_unnormalised(twins):
    oc, _ = twins
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(oc(x).embeds, oc.visual(x), atol=0, rtol=0)


def test_patch_tokens_are_the_penultimate_hidden_state(twins):
    _, hf = twins
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = hf.model(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hf(x).patch_tokens, hidden[-2], atol=0, rtol=0)
        assert not torch.allclose(hidden[-2], hidden[-1])


def test_preprocessing_is_shortest_edge_bicubic_center_crop_openai_stats():
    proc = clip_image_processor(224)
    img = Image.fromarray(np.full((300, 500, 3), 255, dtype=np.uint8))
    px = proc(images=img, return_tensors="pt").pixel_values
    assert px.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(px[0, :, 100, 100], expected, atol=1e-4, rtol=0)
    assert proc.resample == Image.Resampling.BICUBIC


def test_negative_features_follow_both_official_recipes(twins):
    _, hf = twins
    neg = hf.negative_features(2)
    assert torch.count_nonzero(neg.embeds) == 0  # IP-Adapter: zeroed image_embeds
    with torch.no_grad():
        zeros = hf(torch.zeros(2, 3, 32, 32)).patch_tokens  # Plus: hidden states of a zero image
    torch.testing.assert_close(neg.patch_tokens, zeros)


def test_wrong_pixel_shape_is_a_clear_error(twins):
    _, hf = twins
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, \(3, 32, 32\)\)"):
        hf(torch.zeros(1, 3, 64, 64))


def test_conversion_refuses_unsupported_towers():
    from open_clip.model import _build_vision_tower

    cfg = TINY_VIT.open_clip_config()
    cfg.ls_init_value = 0.1
    with pytest.raises(ValueError, match="layer scale"):
        open_clip_to_transformers(_build_vision_tower(TINY_VIT.projection_dim, cfg))


def test_local_folder_and_local_open_clip_checkpoint_load(tmp_path, twins):
    import json

    import open_clip

    oc, hf = twins
    hf.model.save_pretrained(tmp_path / "image_encoder")
    again = TransformersImageEncoder.from_pretrained(tmp_path, subfolder="image_encoder")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).embeds, hf(x).embeds, atol=0, rtol=0)

    # an open_clip model name registered from a local config, weights from a local checkpoint
    (tmp_path / "cfg").mkdir()
    cfg = {
        "embed_dim": TINY_VIT.projection_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }  # fmt: skip
    (tmp_path / "cfg" / "tiny-vit-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    model = open_clip.create_model("tiny-vit-test")
    model.visual.load_state_dict(oc.visual.state_dict())
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    loaded = OpenClipImageEncoder.from_open_clip("tiny-vit-test", pretrained=str(tmp_path / "tiny.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).embeds, oc(x).embeds, atol=0, rtol=0)
        torch.testing.assert_close(
            loaded(x).embeds, model.encode_image(x, normalize=False), atol=1e-6, rtol=1e-5
        )
