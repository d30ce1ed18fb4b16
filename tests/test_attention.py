"""The decoupled cross-attention processors: invariants and parity with diffusers."""

import copy
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ip_adapter import IPAdapter, Stream, expand_scale
from ip_adapter.attention import cross_attention_layers


def run(unet, inputs, **kwargs):
    latents, t, text = inputs
    with torch.no_grad():
        return unet(latents, t, text, **kwargs).sample


def randomise(adapter, seed=3):
    """Move the adapter away from its init so the image branch has a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def adapter(tiny, tiny_preset):
    a = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls"))
    randomise(a)
    return a


def streams(adapter, features, **kw):
    return {"cross_attention_kwargs": {"streams": {"ip": adapter.image_stream(features), **kw}}}


def test_scale_zero_is_bit_identical_to_plain_unet(tiny, adapter, features, unet_inputs):
    plain = run(tiny.unet, unet_inputs)
    adapter.attach(tiny.unet)
    adapter.set_scale(0.0)
    assert torch.equal(run(tiny.unet, unet_inputs, **streams(adapter, features)), plain)
    adapter.set_scale(1.0)
    assert not torch.allclose(run(tiny.unet, unet_inputs, **streams(adapter, features)), plain, atol=1e-4)
    adapter.set_scale(42.0)
    assert not torch.allclose(run(tiny.unet, unet_inputs, **streams(adapter, features)), plain, atol=1e-4)


def test_no_stream_and_detach_give_the_plain_unet(tiny, adapter, unet_inputs):
    plain = run(tiny.unet, unet_inputs)
    adapter.attach(tiny.unet)
    assert torch.equal(run(tiny.unet, unet_inputs), plain)
    adapter.detach(tiny.unet)
    assert torch.equal(run(tiny.unet, unet_inputs), plain)


def test_new_kv_start_as_copies_of_the_frozen_kv(tiny, tiny_preset):
    adapter = IPAdapter(tiny.unet, tiny_preset.adapter_config("cls"))
    for idx, _, module in cross_attention_layers(tiny.unet):
        k, v = adapter.attention.layers[str(idx)].branch("ip")
        assert torch.equal(k.weight, module.to_k.weight) and torch.equal(v.weight, module.to_v.weight)
        assert k.bias is None and v.bias is None
        assert k.weight.data_ptr() != module.to_k.weight.data_ptr()


@pytest.mark.parametrize("image_tokens", ["cls", "patch"])
def test_matches_diffusers_ip_adapter_processor(tiny, tiny_preset, features, unet_inputs, image_tokens):
    adapter = IPAdapter(tiny.unet, tiny_preset.adapter_config(image_tokens))
    randomise(adapter)
    reference = copy.deepcopy(tiny.unet)
    reference._load_ip_adapter_weights([adapter.official_state_dict()])  # what load_ip_adapter calls
    embeds = features.embeds if image_tokens == "cls" else features.patch_tokens
    expected = run(reference, unet_inputs, added_cond_kwargs={"image_embeds": [embeds[:, None]]})
    adapter.attach(tiny.unet)
    ours = run(tiny.unet, unet_inputs, **streams(adapter, features))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _diffusers_warnings(unet, inputs, kwargs) -> list[str]:
    """Warnings diffusers logs during one call (its logger does not propagate to the root)."""
    from diffusers.utils import logging as diffusers_logging

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        run(unet, inputs, **kwargs)
    finally:
        logger.removeHandler(handler)
        diffusers_logging.set_verbosity(level)
    return [r for r in records if "cross_attention_kwargs" in r]


def test_self_attention_processors_accept_streams_silently(tiny, adapter, features, unet_inputs):
    from diffusers.models.attention_processor import AttnProcessor2_0

    adapter.attach(tiny.unet)
    assert _diffusers_warnings(tiny.unet, unet_inputs, streams(adapter, features)) == []
    # control: a stock processor on the self-attention layers does warn, so the check above can fail
    procs = {n: (p if p.stream_names else AttnProcessor2_0()) for n, p in tiny.unet.attn_processors.items()}
    tiny.unet.set_attn_processor(procs)
    assert _diffusers_warnings(tiny.unet, unet_inputs, streams(adapter, features))


def test_token_width_mismatch_is_a_clear_error(tiny, adapter, unet_inputs):
    adapter.attach(tiny.unet)
    bad = Stream(torch.zeros(2, 4, 1024))
    with pytest.raises(
        ValueError, match=r"stream 'ip' tokens have width 1024, but this UNet's cross_attention_dim is 48"
    ):
        run(tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"ip": bad}})


def test_unknown_stream_is_a_clear_error(tiny, adapter, unet_inputs):
    adapter.attach(tiny.unet)
    with pytest.raises(ValueError, match=r"unknown stream\(s\) \['img'\]"):
        run(
            tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"img": Stream(torch.zeros(2, 4, 48))}}
        )


def test_stream_batch_mismatch_is_a_clear_error(tiny, adapter, unet_inputs):
    adapter.attach(tiny.unet)
    with pytest.raises(ValueError, match="has batch 3, the UNet input has 2"):
        run(tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"ip": Stream(torch.zeros(3, 4, 48))}})


def test_masked_stream_all_empty_contributes_exactly_zero(tiny, adapter, features, unet_inputs):
    plain = run(tiny.unet, unet_inputs)
    adapter.attach(tiny.unet)
    tokens = adapter.image_tokens(features)
    empty = Stream(tokens, torch.zeros(tokens.shape[:2], dtype=torch.bool))
    assert torch.equal(run(tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"ip": empty}}), plain)


def test_results_do_not_change_with_padding(tiny, adapter, features, unet_inputs):
    adapter.attach(tiny.unet)
    tokens = adapter.image_tokens(features)  # (2, 4, 48)
    unpadded = run(tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"ip": Stream(tokens)}})
    for pad in (1, 7):
        junk = torch.randn(2, pad, tokens.shape[-1]) * 100
        mask = torch.cat([torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, pad, dtype=torch.bool)], dim=1)
        padded = Stream(torch.cat([tokens, junk], dim=1), mask)
        out = run(tiny.unet, unet_inputs, cross_attention_kwargs={"streams": {"ip": padded}})
        torch.testing.assert_close(out, unpadded, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter(tiny, adapter, features, unet_inputs):
    tiny.unet.requires_grad_(False)
    adapter.attach(tiny.unet)
    latents, t, text = unet_inputs
    out = tiny.unet(latents, t, text, **streams(adapter, features)).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    base = [n for n, p in tiny.unet.named_parameters() if p.grad is not None and ".processor." not in n]
    assert base == []


def test_per_block_dict_scale_matches_diffusers(tiny, adapter):
    scale = {"down": {"block_0": 0.25}, "mid": 0.5, "up": {"block_1": [0.75, 1.5]}}
    adapter.set_scale(scale)
    pipe = StableDiffusionPipeline(**copy.deepcopy(tiny).pipeline_kwargs())
    pipe.unet._load_ip_adapter_weights([adapter.official_state_dict()])
    pipe.set_ip_adapter_scale(scale)
    theirs = [p.scale[0] for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert adapter.attention.get_scale("ip") == theirs == [0.25, 0.75, 1.5, 0.5]


def test_scale_forms_and_errors(adapter):
    names = list(adapter.attention.layers_by_name())
    assert expand_scale(0.5, names) == [0.5] * 4
    assert expand_scale([1, 2, 3, 4], names) == [1.0, 2.0, 3.0, 4.0]
    # processor order: down, up, then the mid block last; unnamed parts get 0, as in diffusers
    assert expand_scale({"up": 1.0}, names) == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one value per cross-attention layer"):
        expand_scale([1.0, 2.0], names)
    with pytest.raises(ValueError, match=r"expected 2 scales for up\.block_1, got 3"):
        expand_scale({"up": {"block_1": [1, 2, 3]}}, names)
    with pytest.raises(ValueError, match=r"which have no cross-attention"):
        expand_scale({"down": {"block_1": 1.0}}, names)
    with pytest.raises(ValueError, match="unknown stream 'sg'"):
        adapter.set_scale(1.0, stream="sg")


def test_adapter_refuses_a_unet_of_another_shape(tiny, adapter):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny.unet.config, "block_out_channels": [16, 32], "norm_num_groups": 4})
    with pytest.raises(ValueError, match="adapter does not fit this UNet"):
        adapter.attach(other)


# --- positional streams ---------------------------------------------------------------------------------


def positional_attention(unet, seed=5):
    from ip_adapter.attention import DecoupledAttention

    attention = DecoupledAttention(unet, ["sg"], positional=["sg"])
    randomise(attention, seed)  # moves the zero-initialised position layers too
    return attention


def sg_streams(tokens):
    return {"cross_attention_kwargs": {"streams": {"sg": Stream(tokens)}}}


def test_positional_stream_starts_equal_to_the_plain_branch(tiny, unet_inputs):
    from ip_adapter.attention import DecoupledAttention

    plain_branch = DecoupledAttention(tiny.unet, ["sg"])
    positional = DecoupledAttention(tiny.unet, ["sg"], positional=["sg"])
    tokens = torch.randn(
        2, 5, tiny.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(4)
    )
    plain_branch.attach(tiny.unet)
    want = run(tiny.unet, unet_inputs, **sg_streams(tokens))
    positional.attach(tiny.unet)
    assert torch.equal(run(tiny.unet, unet_inputs, **sg_streams(tokens)), want)
    with torch.no_grad():  # once trained, the position term changes the branch
        next(iter(positional.layers.values())).pos_sg.bias.fill_(1.0)
    assert not torch.allclose(run(tiny.unet, unet_inputs, **sg_streams(tokens)), want, atol=1e-5)
    positional.set_scale(0.0, "sg")  # and scale 0 still gives the plain UNet
    positional.detach(tiny.unet)
    plain = run(tiny.unet, unet_inputs)
    positional.attach(tiny.unet)
    positional.set_scale(0.0, "sg")
    assert torch.equal(run(tiny.unet, unet_inputs, **sg_streams(tokens)), plain)


def test_positional_query_follows_the_input_grid(tiny, unet_inputs):
    """The UNet's input size reaches every layer before the forward, so non-square inputs work."""
    attention = positional_attention(tiny.unet)
    attention.attach(tiny.unet)
    _, t, text = unet_inputs
    size = tiny.unet.config.sample_size
    wide = torch.randn(2, 4, size, 2 * size, generator=torch.Generator().manual_seed(6))
    tokens = torch.randn(
        2, 3, tiny.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7)
    )
    out = run(tiny.unet, (wide, t, text), **sg_streams(tokens))
    assert out.shape == wide.shape and torch.isfinite(out).all()
    assert {p.latent_grid for p in attention.processors()} == {(size, 2 * size)}
    attention.detach(tiny.unet)
    assert not tiny.unet._forward_pre_hooks  # detach removes the grid hook


def test_layer_grid_and_position_features():
    from ip_adapter.attention import fourier_positions, layer_grid

    assert layer_grid((64, 48), 64 * 48) == (64, 48)
    assert layer_grid((64, 48), 16 * 12) == (16, 12)
    assert layer_grid((9, 5), 5 * 3) == (5, 3)  # stride-2 convolutions round up
    with pytest.raises(ValueError, match="cannot place 7 query positions on a UNet input grid of 8x8"):
        layer_grid((8, 8), 7)
    f = fourier_positions(4, 6, 3)
    assert f.shape == (24, 12)
    row = f.view(4, 6, 12)
    # layout: [sin x, sin y, cos x, cos y] with 3 frequencies each
    assert torch.equal(row[0, :, :3], row[3, :, :3])  # x features are the same down a column
    assert torch.equal(row[:, 0, 3:6], row[:, 5, 3:6])  # y features are the same along a row
    assert not torch.equal(row[:, 0, :3], row[:, 1, :3])


def test_positional_branch_without_a_grid_is_a_clear_error(tiny, unet_inputs):
    attention = positional_attention(tiny.unet)
    attention.attach(tiny.unet)
    attention._remove_grid_hook(tiny.unet)
    for p in attention.processors():
        p.latent_grid = None
    _, t, text = unet_inputs
    size = tiny.unet.config.sample_size
    wide = torch.randn(2, 4, size, 2 * size)
    tokens = torch.randn(2, 3, tiny.unet.config.cross_attention_dim)
    with pytest.raises(
        ValueError, match="needs the query grid, but this processor was not told the UNet's input size"
    ):
        run(tiny.unet, (wide, t, text), **sg_streams(tokens))


def test_positional_streams_must_be_streams(tiny):
    from ip_adapter.attention import DecoupledAttention

    with pytest.raises(ValueError, match=r"positional streams \['ip'\] are not streams"):
        DecoupledAttention(tiny.unet, ["sg"], positional=["ip"])


def test_kv_cache_projects_each_constant_sequence_once_and_changes_nothing(
    tiny, adapter, features, unet_inputs
):
    adapter.attach(tiny.unet)
    kw = streams(adapter, features)
    latents, _, text = unet_inputs
    steps = [torch.tensor([900, 500]), torch.tensor([500, 100]), torch.tensor([100, 10])]
    plain = [run(tiny.unet, (latents, t, text), **kw) for t in steps]
    calls = {"text": 0, "ip": 0}
    procs = adapter.attention.processors()
    module = tiny.unet.get_submodule(procs[0].layer_name)
    hooks = [
        module.to_k.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
        procs[0].to_k_ip.register_forward_hook(lambda *a: calls.__setitem__("ip", calls["ip"] + 1)),
    ]
    with torch.no_grad(), adapter.attention.caching():
        cached = [run(tiny.unet, (latents, t, text), **kw) for t in steps]
        # a new tensor with the same values is another input: projected again, never confused
        again = run(tiny.unet, (latents, steps[0], text.clone()), **streams(adapter, features))
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert torch.equal(again, plain[0])
    assert calls == {"text": 2, "ip": 2}  # once per distinct tensor, not once per step
    assert all(p.kv_cache is None for p in procs)  # emptied when the generation ends
    with pytest.raises(RuntimeError, match=r"under torch\.no_grad"), adapter.attention.caching():
        pass
