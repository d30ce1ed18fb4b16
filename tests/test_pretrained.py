"""Adapter folders and hub ids: save_pretrained / from_pretrained, as diffusers' load_ip_adapter names them."""

import json

import pytest
import torch

from ip_adapter import CheckpointError, IPAdapter
from sg2img.base.components import build_components, get_preset
from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import gnn_preset


def same_weights(a, b) -> bool:
    x, y = a.adapter_state_dict(), b.adapter_state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def unet():
    return build_components("tiny").unet


def test_an_ip_adapter_folder_round_trips_with_its_config_and_card(unet, tmp_path):
    torch.manual_seed(0)
    adapter = IPAdapter(unet, get_preset("tiny").adapter_config("patch"))
    folder = adapter.save_pretrained(
        tmp_path / "ip", base="stable-diffusion-v1-5/stable-diffusion-v1-5", trained_on="COCO 2017 train",
        steps=1000, scores={"clip_i": 0.83},
    )  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors", "config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["ip_adapter"]["image_tokens"] == "patch" and config["steps"] == 1000
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sg2img") and "base_model: stable-diffusion-v1-5/" in card
    assert "COCO 2017 train" in card and "| clip_i | 0.83 |" in card
    for source in (folder, folder / "adapter.safetensors"):
        assert same_weights(IPAdapter.from_pretrained(source, unet), adapter)
    # diffusers' naming: a subfolder and a weight name
    adapter.save_pretrained(tmp_path / "repo" / "models", weight_name="ip-adapter_tiny.safetensors")
    loaded = IPAdapter.from_pretrained(
        tmp_path / "repo", unet, subfolder="models", weight_name="ip-adapter_tiny.safetensors"
    )
    assert same_weights(loaded, adapter)


def test_a_scene_graph_adapter_folder_round_trips(unet, tmp_path):
    torch.manual_seed(0)
    config = SGAdapterConfig(
        label_dim=48, image=get_preset("tiny").adapter_config("cls"), gnn=gnn_preset("tiny")
    )
    adapter = SceneGraphAdapter(unet, config)
    adapter.save_pretrained(tmp_path / "sg", base="embedded")
    loaded = SceneGraphAdapter.from_pretrained(tmp_path / "sg", unet)
    assert same_weights(loaded, adapter) and loaded.config.graph_branch
    assert json.loads((tmp_path / "sg" / "config.json").read_text())["sg"]["graph_branch"] is True


def test_a_hub_id_goes_through_huggingface_hub_and_its_errors_say_why(unet, tmp_path, monkeypatch):
    import huggingface_hub

    torch.manual_seed(0)
    adapter = IPAdapter(unet, get_preset("tiny").adapter_config("cls"))
    file = adapter.save(tmp_path / "cached.safetensors")
    asked = []

    def fake_download(repo_id, filename, subfolder=None, **kw):
        asked.append((repo_id, filename, subfolder))
        return str(file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = IPAdapter.from_pretrained(
        "h94/IP-Adapter", unet, subfolder="models", weight_name="ip-adapter_sd15.safetensors"
    )
    assert asked == [("h94/IP-Adapter", "ip-adapter_sd15.safetensors", "models")] and same_weights(
        loaded, adapter
    )
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError,
        match=r"nobody/nothing: not a file or folder here, and the hub did not give adapter.safetensors \(",
    ):
        IPAdapter.from_pretrained("nobody/nothing", unet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no adapter.safetensors in this folder"):
        IPAdapter.from_pretrained(tmp_path / "empty", unet)
