"""SG2ImgPipeline: equality with stock diffusers, the guidance negatives, every prompt mix, the base
loaders (folder, single file), ControlNet, the concat ablation and attention maps."""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from ip_adapter import IPAdapter
from sg2img.base.components import (
    ModelNotFoundError,
    build_components,
    get_preset,
    load_pipeline_parts,
    save_tiny_model,
)
from sg2img.base.single_file import export_single_file
from sg2img.errors import ConfigurationError
from sg2img.graph import SceneGraph
from sg2img.infer.pipeline import SG2ImgControlNetPipeline, SG2ImgPipeline
from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import gnn_preset
from sg2img.shapes.demo import reference_image

GRAPH = SceneGraph.from_names(["sheep", "tree", "grass"], [(0, "left of", 1), (0, "standing on", 2)])
OTHER = SceneGraph.from_names(["dog"], [])
STEPS = 3


def _adapter(unet, image_tokens="cls", seed=1, **kw) -> SceneGraphAdapter:
    torch.manual_seed(seed)
    cfg = SGAdapterConfig(
        label_dim=48, image=get_preset("tiny").adapter_config(image_tokens), gnn=gnn_preset("tiny"), **kw
    )
    adapter = SceneGraphAdapter(unet, cfg)
    with torch.no_grad():  # off the identity init, so every branch visibly matters
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    unet = build_components("tiny").unet
    paths = {"base": save_tiny_model(root / "tiny-sd")}
    for name, kw in {
        "cls": {},
        "patch": {"image_tokens": "patch"},
        "concat": {"injection": "concat"},
    }.items():
        paths[name] = _adapter(unet, **kw).save(root / f"{name}.safetensors")
    torch.manual_seed(3)
    official = IPAdapter(unet, get_preset("tiny").adapter_config("cls"))
    torch.save(official.official_state_dict(), root / "ip-adapter_sd15.bin")
    paths["official"] = root / "ip-adapter_sd15.bin"
    return paths


def ours(files, adapter="cls") -> SG2ImgPipeline:
    pipe = SG2ImgPipeline.from_pretrained(files["base"], safety_checker=None)
    if adapter:
        pipe.load_sg_adapter(files[adapter])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(files, adapter="cls", scale=0.6) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(files["base"], safety_checker=None)
    path = files[adapter]
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(pipe, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    kw.setdefault("generator", gen())
    return pipe(**kw)


# --- drop-in equivalence -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cls", "patch"])
def test_sg_scale_zero_equals_stock_diffusers_with_load_ip_adapter(files, variant):
    ref = reference_image()
    a = call(stock(files, variant), prompt="a sheep", ip_adapter_image=ref, num_images_per_prompt=2).images
    b = call(
        ours(files, variant),
        prompt="a sheep",
        ip_adapter_image=ref,
        image_scale=0.6,
        scene_graph=GRAPH,
        sg_scale=0.0,
        num_images_per_prompt=2,
    ).images
    assert np.array_equal(a, b)


def test_official_file_is_the_image_branch_alone_and_equals_stock(files):
    pipe = ours(files, "official")
    assert pipe.sg_adapter.config.image_branch and not pipe.sg_adapter.config.graph_branch
    ref = reference_image()
    a = call(stock(files, "official", scale=0.8), prompt="a dog", ip_adapter_image=ref).images
    b = call(pipe, prompt="a dog", ip_adapter_image=ref, image_scale=0.8).images
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="no graph branch"):
        call(pipe, prompt="a dog", scene_graph=GRAPH)


def test_text_only_is_the_plain_base(files):
    """The paper's text-only setting: the image branch is left out (lambda = 0)."""
    plain = StableDiffusionPipeline.from_pretrained(files["base"], safety_checker=None)
    pipe = ours(files)
    plain.scheduler = pipe.scheduler
    plain.set_progress_bar_config(disable=True)
    assert np.array_equal(call(plain, prompt="a sheep").images, call(pipe, prompt="a sheep").images)


def test_default_scheduler_is_ddim_and_steps_guidance_are_the_papers(files):
    import inspect

    pipe = ours(files)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    params = inspect.signature(pipe.__call__).parameters
    assert params["num_inference_steps"].default == 50 and params["guidance_scale"].default == 7.5


def test_a_guidance_interval_guides_only_the_steps_inside_it(files):
    pipe = ours(files)
    kw = dict(prompt="a sheep", scene_graph=GRAPH, guidance_scale=6.0)
    pipe.scheduler.set_timesteps(STEPS)
    first = int(pipe.scheduler.timesteps[0])  # the step at the highest noise
    everywhere = call(pipe, **kw).images
    assert np.array_equal(call(pipe, guidance_interval=(0, 999), **kw).images, everywhere)
    unguided = call(pipe, **{**kw, "guidance_scale": 1.0}).images  # no unconditional pass at all
    rows: list[int] = []  # the rows of each UNet call: an unguided step runs the conditional ones only
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    nowhere = call(pipe, guidance_interval=(first + 1, 999), **kw).images
    np.testing.assert_allclose(nowhere, unguided, atol=1e-5)  # outside it: the conditional prediction
    assert rows == [1] * STEPS
    rows.clear()
    late = call(pipe, guidance_interval=(0, first - 1), **kw).images  # all but the first step guided
    assert rows == [1] + [2] * (STEPS - 1)
    handle.remove()
    assert not np.allclose(late, everywhere) and not np.allclose(late, unguided)
    with pytest.raises(ValueError, match="guidance_interval"):
        call(pipe, guidance_interval=(0, 1000), **kw)


# --- conditioning ------------------------------------------------------------------------------
class Capture:
    """Records the keyword arguments of every UNet call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(kwargs)


def test_guidance_negatives_are_empty_text_proj_zeros_and_the_empty_graph(files):
    pipe = ours(files)
    cap = Capture(pipe.unet)
    call(pipe, ip_adapter_image=reference_image(), scene_graph=GRAPH)  # no prompt: image + graph only
    kw = cap.calls[0]
    text = kw["encoder_hidden_states"]
    empty = pipe.encode_prompt("", "cpu", 1, False)[0]
    assert torch.equal(text[0], empty[0]) and torch.equal(text[1], empty[0])  # no prompt -> empty text
    streams = kw["cross_attention_kwargs"]["streams"]
    adapter = pipe.sg_adapter
    zero = adapter.image_tokens(pipe.clip.negative_features(1))
    assert torch.allclose(streams["ip"].tokens[0], zero[0], atol=1e-6)
    assert zero.abs().sum() > 0  # proj(zeros) is not zeros
    assert not streams["ip"].tokens[1].equal(streams["ip"].tokens[0])
    sg = streams["sg"]
    assert not sg.mask[0].any() and sg.mask[1].sum() == 1 + 3 + 2  # global + objects + triples


def test_every_mix_works_and_each_input_changes_the_image(files):
    pipe = ours(files)
    ref = reference_image()
    text = call(pipe, prompt="a sheep").images
    mixes = {
        "graph": call(pipe, scene_graph=GRAPH).images,
        "image": call(pipe, ip_adapter_image=ref).images,
        "text+graph": call(pipe, prompt="a sheep", scene_graph=GRAPH).images,
        "text+image": call(pipe, prompt="a sheep", ip_adapter_image=ref).images,
        "all": call(pipe, prompt="a sheep", ip_adapter_image=ref, scene_graph=GRAPH).images,
    }
    for name, images in mixes.items():
        assert images.shape == text.shape and np.isfinite(images).all(), name
        assert not np.array_equal(images, text), name
    assert not np.array_equal(mixes["all"], mixes["text+image"])
    assert not np.array_equal(call(pipe, scene_graph=OTHER).images, mixes["graph"])


def test_same_seed_same_images_and_scales_matter(files):
    pipe = ours(files)
    a = call(pipe, prompt="x", scene_graph=GRAPH, generator=gen(5)).images
    assert np.array_equal(a, call(pipe, prompt="x", scene_graph=GRAPH, generator=gen(5)).images)
    assert not np.array_equal(a, call(pipe, prompt="x", scene_graph=GRAPH, generator=gen(6)).images)
    assert not np.array_equal(
        a, call(pipe, prompt="x", scene_graph=GRAPH, sg_scale=0.5, generator=gen(5)).images
    )


def test_a_batch_of_graphs_and_broadcasting(files):
    pipe = ours(files)
    both = call(pipe, prompt="x", scene_graph=[GRAPH, OTHER], generator=[gen(1), gen(2)]).images
    one = call(pipe, prompt="x", scene_graph=GRAPH, generator=gen(1)).images
    assert both.shape[0] == 2
    assert np.allclose(both[0], one[0], atol=1e-5)  # a graph's image does not depend on its batch mates
    dict_graph = call(pipe, prompt="x", scene_graph=GRAPH.to_json(), generator=gen(1)).images
    assert np.array_equal(dict_graph, one)
    with pytest.raises(ValueError, match="scene_graph has 2 entries; expected 1 or the batch size 3"):
        call(pipe, prompt=["a", "b", "c"], scene_graph=[GRAPH, OTHER])


def test_inputs_the_adapter_cannot_take_are_refused(files):
    plain = ours(files, adapter=None)
    with pytest.raises(ValueError, match="load_sg_adapter"):
        call(plain, prompt="x", scene_graph=GRAPH)
    pipe = ours(files)
    with pytest.raises(ValueError, match="prompt_embeds"):
        call(pipe, prompt_embeds=torch.zeros(1, 77, 48))
    with pytest.raises(TypeError, match="scene_graph"):
        call(pipe, scene_graph="sheep")


def test_concat_injection_passes_the_padding_mask(files):
    pipe = ours(files, "concat")
    cap = Capture(pipe.unet)
    a = call(pipe, prompt="x", scene_graph=GRAPH).images
    kw = cap.calls[0]
    hidden, mask = kw["encoder_hidden_states"], kw["encoder_attention_mask"]
    assert hidden.shape[1] == 77 + 4 + 6 and mask.shape == hidden.shape[:2]
    assert mask[:, :81].all() and not mask[0, 81:].any() and mask[1, 81:].all()
    assert "cross_attention_kwargs" not in kw or not kw["cross_attention_kwargs"]
    assert not np.array_equal(a, call(pipe, prompt="x", scene_graph=OTHER).images)
    cap.handle.remove()
    assert not pipe.unet._forward_pre_hooks  # the mask hook is gone after the call
    with pytest.raises(ValueError, match="0 or 1 with the concat"):
        call(pipe, prompt="x", scene_graph=GRAPH, sg_scale=0.5)


# --- bases -------------------------------------------------------------------------------------
def test_single_file_base_gives_the_folders_images(files, tmp_path):
    folder = ours(files)
    single = export_single_file(folder, tmp_path / "tiny.safetensors")
    pipe = SG2ImgPipeline.from_single_file(
        str(single),
        config=str(files["base"]),
        safety_checker=None,
        image_encoder=None,
        feature_extractor=None,
    )
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.load_sg_adapter(files["cls"], image_encoder=str(files["base"] / "image_encoder"))
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt": "x", "scene_graph": GRAPH, "ip_adapter_image": reference_image()}
    assert np.array_equal(call(folder, **kw).images, call(pipe, **kw).images)
    parts = load_pipeline_parts(single, single_file_config=str(files["base"]))
    assert parts.image_encoder is not None  # taken from the config folder
    base = StableDiffusionPipeline.from_pretrained(files["base"], safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):  # every base weight, and no adapter weight
        a, b = getattr(base, name).state_dict(), getattr(parts, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_missing_models_say_how_to_provide_one(tmp_path):
    for source in (tmp_path / "nope.safetensors", tmp_path / "nope", "./relative/model"):
        with pytest.raises(ModelNotFoundError, match="Provide a local diffusers folder"):
            load_pipeline_parts(source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no model_index\.json"):
        load_pipeline_parts(tmp_path / "empty")


# --- ControlNet --------------------------------------------------------------------------------
def with_controlnet(pipe) -> SG2ImgControlNetPipeline:
    """The pipeline's parts and adapter with a tiny ControlNet of random (non-zero) weights."""
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(
        build_components("tiny").unet,
        conditioning_embedding_out_channels=(8, 16),  # tiny VAE: 2x
    )
    with torch.no_grad():  # its zero convolutions would make it a no-op
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cn = SG2ImgControlNetPipeline(**pipe.components, controlnet=controlnet)
    cn.set_sg_adapter(pipe.sg_adapter)
    cn.set_progress_bar_config(disable=True)
    return cn


def test_controlnet_composes_with_the_adapter(files):
    pipe = ours(files)
    cn = with_controlnet(pipe)
    control = reference_image(32)
    kw = {"prompt": "x", "scene_graph": GRAPH}
    off = call(cn, image=control, controlnet_conditioning_scale=0.0, **kw).images
    assert np.array_equal(off, call(pipe, **kw).images)  # a ControlNet at scale 0 changes nothing
    on = call(cn, image=control, **kw).images
    assert not np.array_equal(on, off)
    assert not np.array_equal(on, call(cn, image=control, prompt="x", scene_graph=OTHER).images)


def test_outside_the_guidance_interval_each_injection_gets_the_conditional_rows_alone(files):
    """Unguided steps slice every per-row UNet input: the concat padding mask, the ControlNet's residuals
    and the recorded attention's rows all follow the conditional half."""
    pipe = ours(files, "concat")
    pipe.scheduler.set_timesteps(STEPS)
    nowhere = (int(pipe.scheduler.timesteps[0]) + 1, 999)
    kw = dict(prompt="x", scene_graph=GRAPH, guidance_scale=6.0)
    unguided = {**kw, "guidance_scale": 1.0}
    np.testing.assert_allclose(
        call(pipe, guidance_interval=nowhere, **kw).images, call(pipe, **unguided).images, atol=1e-5
    )

    pipe = ours(files)
    a = call(pipe, guidance_interval=nowhere, attention_maps=True, **kw).attention_maps[0]
    b = call(pipe, attention_maps=True, **unguided).attention_maps[0]
    assert a.labels == b.labels
    torch.testing.assert_close(a.maps, b.maps, atol=1e-5, rtol=0)

    cn = with_controlnet(pipe)
    control = reference_image(32)
    np.testing.assert_allclose(
        call(cn, image=control, guidance_interval=nowhere, **kw).images,
        call(cn, image=control, **unguided).images,
        atol=1e-5,
    )


# --- attention maps ----------------------------------------------------------------------------
def test_attention_maps_cover_each_graph_token_and_change_nothing(files):
    pipe = ours(files)
    plain = call(pipe, prompt="x", scene_graph=[GRAPH, OTHER], generator=[gen(1), gen(2)])
    out = call(pipe, prompt="x", scene_graph=[GRAPH, OTHER], generator=[gen(1), gen(2)], attention_maps=True)
    assert np.array_equal(out.images, plain.images)
    assert plain.attention_maps is None
    first, second = out.attention_maps
    latent = pipe.unet.config.sample_size
    assert first.maps.shape == (1 + 3 + 2, latent, latent)  # padded to the batch's longest graph
    assert first.labels == [
        "<graph>",
        "0: sheep",
        "1: tree",
        "2: grass",
        "sheep left of tree",
        "sheep standing on grass",
    ]
    assert second.labels == ["<graph>", "0: dog", None, None, None, None]
    assert list(first.nodes()) == ["0: sheep", "1: tree", "2: grass"]
    # attention is a distribution over the real tokens at every position, padding gets none
    assert torch.allclose(first.maps.sum(0), torch.ones(latent, latent), atol=1e-4)
    assert torch.allclose(second.maps[:2].sum(0), torch.ones(latent, latent), atol=1e-4)
    assert second.maps[2:].abs().max() == 0
    assert all(p.recorder is None for p in pipe.sg_adapter.attention.processors())
    with pytest.raises(ValueError, match="attention_maps need a scene graph"):
        call(pipe, prompt="x", attention_maps=True)


def test_cached_kv_of_the_constant_streams_gives_the_same_images(files):
    pipe = ours(files, "patch")
    kw = dict(prompt="sheep", ip_adapter_image=reference_image(), scene_graph=GRAPH, num_inference_steps=STEPS,
              output_type="np")  # fmt: skip
    cached = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.cache_constant_kv = False
    uncached = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(cached, uncached)
    assert all(p.kv_cache is None for p in pipe.sg_adapter.attention.processors())


# --- save and load like diffusers --------------------------------------------------------------
def test_the_pipeline_saves_its_adapter_beside_a_plain_diffusers_base_and_loads_it_back(files, tmp_path):
    from safetensors import safe_open

    pipe = ours(files)
    pipe.sg_adapter.set_scale(image_scale=0.7, sg_scale=0.9)
    before = call(pipe, prompt="a sheep", scene_graph=GRAPH, ip_adapter_image=reference_image(),
                  image_scale=0.7, sg_scale=0.9).images  # fmt: skip
    pipe.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(build_components("tiny").unet.state_dict())  # a plain UNet: no adapter weights
    assert sorted(p.name for p in (tmp_path / "saved" / "sg_adapter").iterdir()) == [
        "README.md", "adapter.safetensors", "config.json",
    ]  # fmt: skip
    again = SG2ImgPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    again.set_progress_bar_config(disable=True)
    assert again.sg_adapter is not None
    after = call(again, prompt="a sheep", scene_graph=GRAPH, ip_adapter_image=reference_image(),
                 image_scale=0.7, sg_scale=0.9).images  # fmt: skip
    np.testing.assert_array_equal(before, after)
    # the saving pipeline still has its adapter attached, and stock diffusers reads the folder as SD1.5
    np.testing.assert_array_equal(
        before, call(pipe, prompt="a sheep", scene_graph=GRAPH, ip_adapter_image=reference_image(),
                     image_scale=0.7, sg_scale=0.9).images,
    )  # fmt: skip
    StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)


def test_a_saved_folder_keeps_the_bases_sampler_eta_and_loads_with_it(files, tmp_path):
    pipe = ours(files)
    pipe.default_eta = 1.0  # as a base file recording its recipe's eta makes it
    before = call(pipe, prompt="a sheep", scene_graph=GRAPH).images
    assert not np.array_equal(before, call(pipe, prompt="a sheep", scene_graph=GRAPH, eta=0.0).images)
    pipe.save_pretrained(tmp_path / "saved")
    again = SG2ImgPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    again.set_progress_bar_config(disable=True)
    assert again.default_eta == 1.0
    np.testing.assert_array_equal(before, call(again, prompt="a sheep", scene_graph=GRAPH).images)
    assert load_pipeline_parts(tmp_path / "saved").eta == 1.0  # the CLI's loader reads it too
    assert SG2ImgPipeline.from_pretrained(files["base"], safety_checker=None).default_eta == 0.0  # no marker
    (tmp_path / "saved" / "sg2img.json").write_text('{"eta": 2}')
    with pytest.raises(
        ConfigurationError, match=r"sg2img\.json: field 'eta' must be a number in \[0, 1\], got 2"
    ):
        load_pipeline_parts(tmp_path / "saved")
