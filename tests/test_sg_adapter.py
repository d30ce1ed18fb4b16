"""The graph branch in the UNet: invariants, the concat ablation, and the adapter file."""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ip_adapter import Adapter, IPAdapter
from ip_adapter.checkpoint import CheckpointError
from sg2img.graph import SceneGraph
from sg2img.graph_batch import graphs_to_batch
from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import TokenConfig, gnn_preset
from sg2img.model.labels import LabelEmbedder

A = SceneGraph.from_names(
    ["red circle", "blue square", "tree"], [(0, "left of", 1), (1, "above", 0), (0, "left of", 1)]
)
B = SceneGraph.from_names(["dog", "ball"], [(0, "chasing", 1)])


def make(tiny, tiny_preset, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SGAdapterConfig(
        label_dim=tiny.text_encoder.config.hidden_size,
        image=tiny_preset.adapter_config("cls"),
        gnn=gnn_preset("tiny", hidden_dim=16, mlp_dim=32),
        **kw,
    )
    adapter = SceneGraphAdapter(tiny.unet, cfg)
    with torch.no_grad():  # move off the identity init so every branch has a visible effect
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter.attach(tiny.unet)
    return adapter


@pytest.fixture
def labels(tiny_session):
    return LabelEmbedder(tiny_session.text_encoder, tiny_session.tokenizer)


def run(unet, inputs, kwargs):
    latents, t, _ = inputs
    with torch.no_grad():
        return unet(latents, t, **kwargs).sample


def test_sg_scale_zero_is_bit_identical_to_the_image_only_adapter(
    tiny, tiny_preset, features, unet_inputs, labels
):
    adapter = make(tiny, tiny_preset)
    text = unet_inputs[2]
    graphs = graphs_to_batch([A, B], labels)
    image_only = run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features))
    adapter.set_scale(sg_scale=0.0)
    assert torch.equal(run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features, graphs)), image_only)
    adapter.set_scale(sg_scale=1.0)
    assert not torch.allclose(
        run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features, graphs)), image_only, atol=1e-4
    )
    # the image branch alone equals a plain IPAdapter with the same weights
    ip = IPAdapter(copy.deepcopy(tiny.unet), tiny_preset.adapter_config("cls"))
    ip.load_adapter_state_dict(adapter.adapter_state_dict(), streams=["ip"])
    other = copy.deepcopy(tiny.unet)
    ip.attach(other)
    ref = run(other, unet_inputs, {"encoder_hidden_states": text,
                                   "cross_attention_kwargs": {"streams": {"ip": ip.image_stream(features)}}})  # fmt: skip
    assert torch.equal(ref, image_only)


def test_an_empty_graph_contributes_exactly_zero(tiny, tiny_preset, features, unet_inputs, labels):
    adapter = make(tiny, tiny_preset)
    text = unet_inputs[2]
    without = run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features))
    empty = graphs_to_batch([SceneGraph(), SceneGraph()], labels)
    assert torch.equal(run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features, empty)), without)


def test_results_do_not_change_with_padding(tiny, tiny_preset, unet_inputs, labels):
    adapter = make(tiny, tiny_preset, image_branch=False)
    latents, t, text = unet_inputs
    one = (latents[1:], t[1:], text[1:])
    two = (latents[1:].repeat(2, 1, 1, 1), t[1:].repeat(2), text[1:].repeat(2, 1, 1))
    # B is padded to A's length (7 tokens) in the batch, and unpadded (4 tokens) alone
    padded = run(tiny.unet, two, adapter.unet_kwargs(two[2], None, graphs_to_batch([A, B], labels)))
    alone = run(tiny.unet, one, adapter.unet_kwargs(one[2], None, graphs_to_batch([B], labels)))
    torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter(tiny, tiny_preset, features, unet_inputs, labels):
    adapter = make(tiny, tiny_preset)
    latents, t, text = unet_inputs
    out = tiny.unet(latents, t, **adapter.unet_kwargs(text, features, graphs_to_batch([A, B], labels))).sample
    out.square().mean().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert all(g is not None for g in grads.values())
    # every weight gets a non-zero gradient, except the box embedding: no graph here has boxes
    zero = sorted(n for n, g in grads.items() if not bool(g.abs().sum() > 0))
    assert zero and all("box_embed" in n for n in zero), zero
    adapter_ids = {id(p) for p in adapter.parameters()}
    leaked = [n for n, p in tiny.unet.named_parameters() if p.grad is not None and id(p) not in adapter_ids]
    assert leaked == []
    assert all(p.grad is None for p in tiny.text_encoder.parameters())


def test_concat_injection(tiny, tiny_preset, features, unet_inputs, labels):
    plain = run(tiny.unet, unet_inputs, {"encoder_hidden_states": unet_inputs[2]})
    adapter = make(tiny, tiny_preset, injection="concat", image_branch=False)
    assert adapter.attention is None
    assert not any(k.startswith(("ip_adapter.", "sg_adapter.")) for k in adapter.adapter_state_dict())
    text = unet_inputs[2]
    kwargs = adapter.unet_kwargs(text, None, graphs_to_batch([A, B], labels))
    assert (
        kwargs["encoder_hidden_states"].shape[1] == 77 + 7
        and kwargs["encoder_attention_mask"].dtype == torch.bool
    )
    assert not torch.allclose(run(tiny.unet, unet_inputs, kwargs), plain, atol=1e-4)
    empty = adapter.unet_kwargs(text, None, graphs_to_batch([SceneGraph(), SceneGraph()], labels))
    torch.testing.assert_close(run(tiny.unet, unet_inputs, empty), plain, atol=1e-5, rtol=1e-5)
    adapter.set_scale(sg_scale=1.0)  # concat has no scale between "in" (1) and "as its negative" (0)
    with pytest.raises(ValueError, match="'sg' branch's scale must be 0 or 1 with the concat injection"):
        adapter.set_scale(sg_scale=0.5)
    assert adapter.unet_kwargs(text) == {"encoder_hidden_states": text}  # no stream: the text alone


def test_an_unknown_injection_is_named():
    with pytest.raises(ValueError, match=r"injection must be one of \['concat', 'decoupled'\], got 'sum'"):
        SGAdapterConfig(injection="sum")


def test_concat_with_image_appends_both(tiny, tiny_preset, features, unet_inputs, labels):
    adapter = make(tiny, tiny_preset, injection="concat")
    kwargs = adapter.unet_kwargs(unet_inputs[2], features, graphs_to_batch([A, B], labels))
    assert kwargs["encoder_hidden_states"].shape[1] == 77 + 4 + 7
    assert kwargs["encoder_attention_mask"][:, : 77 + 4].all()


def test_file_round_trip_and_stock_diffusers_reads_the_image_branch(
    tiny, tiny_preset, features, unet_inputs, labels, tmp_path
):
    adapter = make(tiny, tiny_preset, tokens=TokenConfig(resample_to=3, resampler_heads=4))
    path = adapter.save(tmp_path / "sg-adapter.safetensors")
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"image_proj", "ip_adapter", "sg_adapter", "sg_encoder"}

    fresh = copy.deepcopy(tiny.unet)
    loaded = SceneGraphAdapter.from_file(path, fresh)
    assert loaded.config == adapter.config
    loaded.attach(fresh)
    graphs = graphs_to_batch([A, B], labels)
    text = unet_inputs[2]
    assert torch.equal(run(fresh, unet_inputs, loaded.unet_kwargs(text, features, graphs)),
                       run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features, graphs)))  # fmt: skip

    pipe = StableDiffusionPipeline(**copy.deepcopy(tiny).pipeline_kwargs())
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="sg-adapter.safetensors")
    theirs = run(pipe.unet, unet_inputs, {"encoder_hidden_states": text,
                                          "added_cond_kwargs": {"image_embeds": [features.embeds[:, None]]}})  # fmt: skip
    ours = run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_graph_branch_on_top_of_an_official_image_adapter(tiny, tiny_preset, tmp_path):
    ip = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls"))
    torch.save(ip.official_state_dict(), tmp_path / "ip-adapter_sd15.bin")
    sg = SceneGraphAdapter.from_file(tmp_path / "ip-adapter_sd15.bin", tiny.unet, label_dim=48,
                                     gnn=gnn_preset("tiny"))  # fmt: skip
    theirs, ours = ip.adapter_state_dict(), sg.adapter_state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert any(k.startswith("sg_encoder.") for k in ours)


def test_positional_graph_query_round_trip_and_mismatch(
    tiny, tiny_preset, features, unet_inputs, labels, tmp_path
):
    adapter = make(tiny, tiny_preset, positional_graph_query=True)
    path = adapter.save(tmp_path / "positional.safetensors")
    with safe_open(str(path), "pt") as f:
        pos = sorted(k for k in f.keys() if ".pos_sg." in k)  # noqa: SIM118
    layers = len(adapter.attention.processors())
    assert len(pos) == 2 * layers and "sg_adapter.1.pos_sg.weight" in pos

    fresh = copy.deepcopy(tiny.unet)
    loaded = SceneGraphAdapter.from_file(path, fresh)
    assert loaded.config.positional_graph_query
    loaded.attach(fresh)
    graphs, text = graphs_to_batch([A, B], labels), unet_inputs[2]
    assert torch.equal(run(fresh, unet_inputs, loaded.unet_kwargs(text, features, graphs)),
                       run(tiny.unet, unet_inputs, adapter.unet_kwargs(text, features, graphs)))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"sg_adapter\.1\.pos_sg\.weight"):
        SceneGraphAdapter.from_file(path, copy.deepcopy(tiny.unet), positional_graph_query=False)


def test_positional_graph_query_needs_the_decoupled_graph_branch(tiny, tiny_preset):
    with pytest.raises(
        ValueError, match="positional_graph_query needs graph_branch: true and injection: decoupled"
    ):
        make(tiny, tiny_preset, injection="concat", positional_graph_query=True)


def test_one_adapter_class_of_named_branches(tiny, tiny_preset):
    """The scene-graph adapter and IPAdapter are the same Adapter with other branches: the image-only one has
    IPAdapter's file sections, module paths and weights (same seed), and a missing branch is named."""
    torch.manual_seed(0)
    ip = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls"))
    torch.manual_seed(0)
    image_only = SceneGraphAdapter(
        tiny.unet, SGAdapterConfig(label_dim=48, image=tiny_preset.adapter_config("cls"), graph_branch=False)
    )
    assert (
        isinstance(image_only, Adapter)
        and isinstance(ip, Adapter)
        and list(image_only.branches) == list(ip.branches) == ["ip"]
    )
    assert [n for n, _ in image_only.named_parameters()] == [n for n, _ in ip.named_parameters()]
    theirs, ours = ip.adapter_state_dict(), image_only.adapter_state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with pytest.raises(ValueError, match="this adapter has no graph branch"):
        image_only.graph_tokens(None)
    graph_only = make(tiny, tiny_preset, image_branch=False)
    assert list(graph_only.branches) == ["sg"] and hasattr(graph_only, "sg_encoder")
    with pytest.raises(ValueError, match="this adapter has no image branch"):
        graph_only.image_tokens(None)
