"""The adapter file: the official layout, round trips, stock diffusers loading, and bad files."""

import copy
import pickle

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from ip_adapter import CheckpointError, IPAdapter, IPAdapterConfig, read_adapter_file, write_adapter_file
from sg2img.base.components import SD15_UNET, get_preset


def randomised(adapter, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter


@pytest.fixture(scope="module")
def sd15_unet_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def test_sd15_cls_layout_is_the_official_one(sd15_unet_meta):
    with torch.device("meta"):
        adapter = IPAdapter(sd15_unet_meta, get_preset("sd15").adapter_config("cls"))
    shapes = {k: tuple(v.shape) for k, v in adapter.adapter_state_dict().items()}
    odd = range(1, 32, 2)
    expected_keys = {f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")}
    expected_keys |= {f"ip_adapter.{i}.to_{kv}_ip.weight" for i in odd for kv in "kv"}
    assert set(shapes) == expected_keys
    assert shapes["image_proj.proj.weight"] == (3072, 1024) and shapes["image_proj.norm.weight"] == (768,)
    # down blocks 320/640/1280, up blocks 1280/640/320, and the mid block (1280) last, at index 31
    widths = [shapes[f"ip_adapter.{i}.to_k_ip.weight"][0] for i in odd]
    assert widths == [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    assert all(shapes[f"ip_adapter.{i}.to_v_ip.weight"][1] == 768 for i in odd)
    assert adapter.attention.layers["31"].layer_name.startswith("mid_block.")
    assert sum(v.numel() for v in adapter.parameters()) == 22_319_616


def test_sd15_patch_layout_is_the_official_resampler(sd15_unet_meta):
    with torch.device("meta"):
        adapter = IPAdapter(sd15_unet_meta, get_preset("sd15").adapter_config("patch"))
    proj = {k: tuple(v.shape) for k, v in adapter.image_proj.state_dict().items()}
    expected = {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_in.bias": (768,),
                "proj_out.weight": (768, 768), "proj_out.bias": (768,),
                "norm_out.weight": (768,), "norm_out.bias": (768,)}  # fmt: skip
    for i in range(4):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        expected |= {a + "norm1.weight": (768,), a + "norm1.bias": (768,), a + "norm2.weight": (768,),
                     a + "norm2.bias": (768,), a + "to_q.weight": (768, 768), a + "to_kv.weight": (1536, 768),
                     a + "to_out.weight": (768, 768), f + "0.weight": (768,), f + "0.bias": (768,),
                     f + "1.weight": (3072, 768), f + "3.weight": (768, 3072)}  # fmt: skip
    assert proj == expected
    assert sum(v.numel() for v in adapter.parameters()) == 49_087_488


@pytest.mark.parametrize("image_tokens", ["cls", "patch"])
def test_round_trip_through_our_file(tiny, tiny_preset, tmp_path, image_tokens):
    adapter = randomised(IPAdapter(tiny.unet, tiny_preset.adapter_config(image_tokens)))
    path = adapter.save(tmp_path / "a.safetensors")
    loaded = IPAdapter.from_file(path, tiny.unet)
    assert loaded.config == adapter.config
    a, b = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("image_tokens", ["cls", "patch"])
def test_stock_diffusers_loads_our_file_and_agrees(
    tiny, tiny_preset, features, unet_inputs, tmp_path, image_tokens
):
    adapter = randomised(IPAdapter(tiny.unet, tiny_preset.adapter_config(image_tokens)))
    adapter.save(tmp_path / "ip-adapter.safetensors")
    pipe = StableDiffusionPipeline(**copy.deepcopy(tiny).pipeline_kwargs())
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors")
    embeds = features.embeds if image_tokens == "cls" else features.patch_tokens
    latents, t, text = unet_inputs
    with torch.no_grad():
        theirs = pipe.unet(latents, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        adapter.attach(tiny.unet)
        ours = tiny.unet(
            latents, t, text, cross_attention_kwargs={"streams": {"ip": adapter.image_stream(features)}}
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_official_nested_bin_with_mixed_dtypes_loads(tiny, tiny_preset, tmp_path):
    adapter = randomised(IPAdapter(tiny.unet, tiny_preset.adapter_config("cls")))
    official = adapter.official_state_dict()
    official["ip_adapter"] = {k: v.half() for k, v in official["ip_adapter"].items()}  # fp16 beside fp32
    torch.save(official, tmp_path / "ip-adapter_sd15.bin")
    loaded = IPAdapter.from_file(tmp_path / "ip-adapter_sd15.bin", tiny.unet)
    assert loaded.config.image_tokens == "cls" and loaded.config.num_tokens == 4
    for k, v in loaded.adapter_state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, adapter.adapter_state_dict()[k], atol=1e-3, rtol=1e-3)


def test_official_flat_safetensors_without_metadata_loads(tiny, tiny_preset, tmp_path):
    adapter = randomised(IPAdapter(tiny.unet, tiny_preset.adapter_config("patch")))
    tensors = {k: v.detach().contiguous() for k, v in adapter.adapter_state_dict().items()}
    save_file(tensors, str(tmp_path / "ip-adapter-plus_sd15.safetensors"))  # no metadata, as released
    loaded = IPAdapter.from_file(tmp_path / "ip-adapter-plus_sd15.safetensors", tiny.unet)
    assert loaded.config.image_tokens == "patch"
    assert loaded.config.resampler_config() == adapter.config.resampler_config()


def test_mismatched_keys_are_all_listed(tiny, tiny_preset, tmp_path):
    adapter = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls"))
    tensors = dict(adapter.adapter_state_dict())
    del tensors["ip_adapter.1.to_k_ip.weight"]
    tensors["ip_adapter.99.to_k_ip.weight"] = torch.zeros(1)
    tensors["ip_adapter.3.to_v_ip.weight"] = torch.zeros(5, 5)
    write_adapter_file(
        tmp_path / "bad.safetensors", tensors, {"config": '{"ip_adapter": ' + adapter.config.to_json() + "}"}
    )
    with pytest.raises(CheckpointError) as e:
        IPAdapter.from_file(tmp_path / "bad.safetensors", tiny.unet)
    msg = str(e.value)
    assert "bad.safetensors" in msg
    assert "missing keys (1)" in msg and "ip_adapter.1.to_k_ip.weight" in msg
    assert "unexpected keys (1)" in msg and "ip_adapter.99.to_k_ip.weight" in msg
    assert "ip_adapter.3.to_v_ip.weight: file (5, 5) vs model (32, 48)" in msg


def test_adapter_for_another_architecture_is_refused(tiny, tmp_path, sd15_unet_meta):
    with torch.device("meta"):
        big = IPAdapter(sd15_unet_meta, get_preset("sd15").adapter_config("cls"))
    tensors = {k: torch.zeros(v.shape) for k, v in big.adapter_state_dict().items()}
    torch.save({"image_proj": {k[11:]: v for k, v in tensors.items() if k.startswith("image_proj.")},
                "ip_adapter": {k[11:]: v for k, v in tensors.items() if k.startswith("ip_adapter.")}},
               tmp_path / "sd15.bin")  # fmt: skip
    with pytest.raises(ValueError, match="cross_attention_dim 768 does not match the UNet's 48"):
        IPAdapter.from_file(tmp_path / "sd15.bin", tiny.unet)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": {"proj.weight": _RunsCode()}}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_adapter_file(path)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_truncated_safetensors_is_a_clear_error(tiny, tiny_preset, tmp_path):
    path = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls")).save(tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a.safetensors: not a readable safetensors file"):
        read_adapter_file(path)


def test_missing_file_and_non_adapter_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such adapter file"):
        read_adapter_file(tmp_path / "nope.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no 'image_proj' tensors"):
        IPAdapter.from_file(tmp_path / "other.safetensors", UNet2DConditionModel(**get_preset("tiny").unet))


def test_config_validation():
    with pytest.raises(ValueError, match="image_tokens must be 'cls' or 'patch'"):
        IPAdapterConfig(image_tokens="global")
    with pytest.raises(ValueError, match=r"unknown resampler options \['depht'\]"):
        IPAdapterConfig(image_tokens="patch", resampler={"depht": 2})


def test_written_files_get_the_usual_permissions_not_the_temp_files(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        f = write_adapter_file(tmp_path / "a.safetensors", {"x.weight": torch.zeros(2)})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind
