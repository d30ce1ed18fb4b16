"""The layout: the layout head, object tokens confined to their boxes, and the training options that
reward layout (timestep sampling, loss weighting, teacher forcing)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from datafiles import write_manifest
from diffusers.models.attention_processor import Attention
from test_training import first_batch, graph, make_module

from ip_adapter.attention import DecoupledAttnProcessor, Stream, region_distance, region_mask, region_offsets
from sg2img.graph import SceneGraph
from sg2img.graph_batch import graphs_to_batch
from sg2img.model.adapter import SGAdapterConfig
from sg2img.model.gnn import FULL_IMAGE, GNNConfig, SceneGraphEncoder, TokenConfig
from sg2img.model.labels import LabelEmbedder
from sg2img.train.adapter_module import SG2ImgModule
from sg2img.train.core import sample_timesteps, snr_loss_weights
from sg2img.train.settings import (
    BaseSettings,
    ConditionDropout,
    GraphBranchSettings,
    ImageBranchSettings,
    ObjectiveSettings,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
BOXED = SceneGraph.from_json(
    {
        "objects": [
            {"name": "circle", "attributes": ["red"], "box": [0.1, 0.2, 0.4, 0.5]},
            {"name": "square", "attributes": ["blue"], "box": [0.6, 0.5, 0.9, 0.8]},
        ],
        "relationships": [[0, "left of", 1]],
    }
)
UNBOXED = SceneGraph.from_names(["red circle", "blue square"], [(0, "left of", 1)])


def test_region_mask_marks_the_cells_a_box_overlaps():
    regions = torch.tensor([[FULL_IMAGE, LEFT, (0.30, 0.30, 0.31, 0.31), (0.5, 0.5, 0.5, 0.5)]])
    cells = region_mask(regions, 4, 4).reshape(1, 4, 4, 4)  # (B, h, w, N)
    assert cells[0, ..., 0].all()  # the whole image: every cell
    assert cells[0, :, :2, 1].all() and not cells[0, :, 2:, 1].any()  # the left half: columns 0-1
    assert cells[0, ..., 2].sum() == 1 and cells[0, 1, 1, 2]  # a speck still reaches its one cell
    assert not cells[0, ..., 3].any()  # no area: no cell (padding)


@pytest.fixture
def attention_layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    proc = DecoupledAttnProcessor(hidden_size=8, cross_attention_dim=6, streams=("sg",))
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_()
    attn.set_processor(proc)
    hidden = torch.randn(1, 16, 8)  # a 4x4 grid of queries
    text = torch.randn(1, 3, 6)
    tokens = torch.randn(1, 2, 6)
    return attn, hidden, text, tokens


def test_a_confined_token_is_seen_only_inside_its_box(attention_layer):
    attn, hidden, text, tokens = attention_layer

    def out(stream):
        with torch.no_grad():
            return attn(hidden, encoder_hidden_states=text, streams={"sg": stream}).reshape(4, 4, 8)

    free = out(Stream(tokens))
    without_second = out(Stream(tokens, torch.tensor([[True, False]])))
    confined = out(Stream(tokens, regions=torch.tensor([[FULL_IMAGE, LEFT]])))
    torch.testing.assert_close(confined[:, :2], free[:, :2])  # inside the box: as if unconfined
    torch.testing.assert_close(confined[:, 2:], without_second[:, 2:])  # outside: as if absent
    assert not torch.allclose(confined[:, 2:], free[:, 2:])
    # a query that sees no token of the stream gets nothing from it: only the text path is left
    nothing = out(Stream(tokens, regions=torch.tensor([[LEFT, LEFT]])))
    text_only = out(Stream(tokens, torch.tensor([[False, False]])))
    torch.testing.assert_close(nothing[:, 2:], text_only[:, 2:])
    assert torch.isfinite(nothing).all()


def test_region_distance_is_zero_where_the_mask_sees_and_grows_away_from_the_box():
    regions = torch.tensor([[FULL_IMAGE, LEFT, (0.30, 0.30, 0.31, 0.31)]])
    d = region_distance(regions, 4, 4)  # (B, 16, N)
    assert torch.equal(d == 0, region_mask(regions, 4, 4))  # 0 exactly where the hard mask sees
    left = d[0, :, 1].reshape(4, 4)
    torch.testing.assert_close(left[0], torch.tensor([0.0, 0.0, 0.125, 0.375]))  # centres to x = 0.5
    speck = d[0, :, 2].reshape(4, 4)
    torch.testing.assert_close(speck[3, 3], torch.tensor(2 * 0.565**2).sqrt())  # centre to corner


def soft_layer(attention_layer, width):
    attn = attention_layer[0]
    soft = DecoupledAttnProcessor(8, 6, streams=("sg",), soft_regions=("sg",), region_width=width)
    kv = {k: v for k, v in attn.processor.state_dict().items() if k.startswith(("to_k_", "to_v_"))}
    soft.load_state_dict(kv, strict=False)  # the same K/V weights, its own width
    attn.set_processor(soft)
    return attn, soft


def test_a_softly_confined_token_fades_with_its_learned_width(attention_layer):
    attn, hidden, text, tokens = attention_layer
    regions = torch.tensor([[FULL_IMAGE, LEFT]])

    def out(stream):
        with torch.no_grad():
            return attn(hidden, encoder_hidden_states=text, streams={"sg": stream}).reshape(4, 4, 8)

    hard, free = out(Stream(tokens, regions=regions)), out(Stream(tokens))
    _, soft = soft_layer(attention_layer, 1e-3)  # the hard mask is its narrow limit
    torch.testing.assert_close(out(Stream(tokens, regions=regions)), hard)
    soft_layer(attention_layer, 1e3)  # and no mask its wide one
    torch.testing.assert_close(out(Stream(tokens, regions=regions)), free)
    _, soft = soft_layer(attention_layer, 0.1)
    mid = out(Stream(tokens, regions=regions))
    torch.testing.assert_close(mid[:, :2], free[:, :2])  # inside the box: as if unconfined
    assert not torch.allclose(mid[:, 2:], hard[:, 2:]) and not torch.allclose(mid[:, 2:], free[:, 2:])
    # padding still hides a token, and a sample with no real token gets nothing from the stream
    torch.testing.assert_close(
        out(Stream(tokens, torch.tensor([[True, False]]), regions)), out(Stream(tokens[:, :1]))
    )
    text_only = out(Stream(tokens, torch.tensor([[False, False]])))
    torch.testing.assert_close(out(Stream(tokens, torch.tensor([[False, False]]), regions)), text_only)
    # the width learns: the loss reaches its log
    attn(hidden, encoder_hidden_states=text, streams={"sg": Stream(tokens, regions=regions)}).sum().backward()
    assert soft.region_width_sg.grad is not None and soft.region_width_sg.grad.abs().item() > 0
    with pytest.raises(ValueError, match="region_width must be positive"):
        DecoupledAttnProcessor(8, 6, streams=("sg",), soft_regions=("sg",), region_width=0.0)
    with pytest.raises(ValueError, match=r"soft-region streams \['ip'\] are not streams"):
        DecoupledAttnProcessor(8, 6, streams=("sg",), soft_regions=("ip",))


def test_region_offsets_place_each_cell_in_half_widths_of_the_box():
    regions = torch.tensor([[LEFT, (0.25, 0.25, 0.75, 0.75)]])
    off = region_offsets(regions, 4, 4).reshape(4, 4, 2, 2)  # (h, w, N, xy)
    # the left half (centre x = 0.25, half-width 0.25): cell centres at x = 0.125 ... 0.875
    torch.testing.assert_close(off[0, :, 0, 0], torch.tensor([-0.5, 0.5, 1.5, 2.5]))
    torch.testing.assert_close(off[:, 0, 0, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # its full height
    inside = (off[..., 1, :].abs() <= 1).all(-1)  # the centre box holds the middle 2 x 2 cells
    assert inside[1:3, 1:3].all() and inside.sum() == 4
    speck = region_offsets(torch.tensor([[(0.5, 0.5, 0.5, 0.5)]]), 4, 4)
    assert torch.isfinite(speck).all() and speck.abs().max() == 4.0  # no area: clipped, never inf


def test_a_learned_spatial_bias_starts_as_the_soft_mask_and_learns(attention_layer):
    attn, hidden, text, tokens = attention_layer
    streams = {name: {"sg": Stream(tokens, regions=torch.tensor([regions]))}
               for name, regions in (("mixed", [FULL_IMAGE, LEFT]), ("boxed", [LEFT, RIGHT]),
                                     ("whole", [FULL_IMAGE, FULL_IMAGE]))}  # fmt: skip
    _, soft = soft_layer(attention_layer, 0.1)

    def outputs():
        return {k: attn(hidden, encoder_hidden_states=text, streams=v) for k, v in streams.items()}

    with torch.no_grad():
        soft_out = outputs()
    learned = DecoupledAttnProcessor(8, 6, streams=("sg",), soft_regions=("sg",), region_width=0.1,
                                     region_bias=("sg",))  # fmt: skip
    learned.load_state_dict(soft.state_dict(), strict=False)  # the same K/V and width, a fresh bias
    attn.set_processor(learned)
    for k, out in outputs().items():  # at the start it is the soft mask
        torch.testing.assert_close(out.detach(), soft_out[k])
    outputs()["mixed"].sum().backward()
    grad = learned.region_bias_out_sg.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the loss reaches the bias from the first step
    with torch.no_grad():
        learned.region_bias_out_sg.bias.fill_(-3.0)  # the same term for every boxed token changes nothing
        torch.testing.assert_close(outputs()["boxed"], soft_out["boxed"])
        learned.region_bias_out_sg.weight.normal_()  # one that depends on the place does
        out = outputs()
        assert not torch.allclose(out["boxed"], soft_out["boxed"])
        assert not torch.allclose(out["mixed"], soft_out["mixed"])
        # a token whose box is the whole image stays seen everywhere alike: no learned term for it
        torch.testing.assert_close(out["whole"], soft_out["whole"])
    with pytest.raises(ValueError, match=r"region-bias streams \['sg'\] are not soft-region streams"):
        DecoupledAttnProcessor(8, 6, streams=("sg",), region_bias=("sg",))


def test_the_region_widths_script_reads_the_score_term_the_processor_applies():
    spec = importlib.util.spec_from_file_location(
        "region_widths", Path(__file__).parents[1] / "experiments" / "shapes" / "region_widths.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    width, half = 0.05, script.BOX_HALF_WIDTH
    soft = script.score_profile(width, None)  # inside the box nothing, outside -(d / w)^2
    assert soft["0"] == soft["0.5"] == 0.0
    assert soft["3"] == pytest.approx(-((2 * half / width) ** 2), rel=0.02)
    torch.manual_seed(0)
    proc = DecoupledAttnProcessor(8, 6, streams=("sg",), soft_regions=("sg",), region_width=width,
                                  region_bias=("sg",))  # fmt: skip
    torch.nn.init.normal_(proc.region_bias_out_sg.weight)
    tensors = {f"{side}.{p}": getattr(getattr(proc, f"region_bias_{side}_sg"), p).detach()
               for side in ("in", "out") for p in ("weight", "bias")}  # fmt: skip
    learned = script.score_profile(width, tensors)
    box = torch.tensor([[[0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half]]])
    with torch.no_grad():
        applied = proc._spatial_bias("sg", box, (script.GRID, script.GRID))[0, :, 0].view(script.GRID, -1)
    row = applied[script.GRID // 2]
    for u, cell in zip(script.OFFSETS, script.offset_cells()):
        assert abs(cell + 0.5 - (0.5 + u * half) * script.GRID) <= 0.5
        assert learned[f"{u:g}"] == pytest.approx(soft[f"{u:g}"] + float(row[cell]), abs=2e-3)


def test_stream_regions_must_match_the_tokens():
    with pytest.raises(ValueError, match=r"regions shape \(1, 3, 4\) is not \(B, N, 4\)"):
        Stream(torch.zeros(1, 2, 6), regions=torch.zeros(1, 3, 4))


@pytest.fixture
def labels(tiny_session):
    return LabelEmbedder(tiny_session.text_encoder, tiny_session.tokenizer)


def encoder(labels, **gnn):
    torch.manual_seed(0)
    config = GNNConfig("triplet", num_layers=2, hidden_dim=16, mlp_dim=32, **gnn)
    return SceneGraphEncoder(labels.dim, 48, config, TokenConfig(confine_objects=True)).eval()


def test_layout_head_boxes_given_boxes_override_and_object_tokens_get_their_regions(labels):
    enc = encoder(labels, use_boxes=False, layout_head=True, boxes_after_gnn=True)
    with torch.no_grad():
        out = enc(graphs_to_batch([BOXED, UNBOXED, SceneGraph()], labels))
    assert out.predicted.shape == (4, 4) and out.layout.shape == (4, 4)
    p = out.predicted
    assert ((p >= 0) & (p <= 1)).all() and (p[:, 2] >= p[:, 0]).all() and (p[:, 3] >= p[:, 1]).all()
    given = torch.tensor([o.box for o in BOXED.objects])
    torch.testing.assert_close(out.layout[:2], given)  # the graph's own boxes
    torch.testing.assert_close(out.layout[2:], p[2:])  # predicted where the graph has none
    # token order: global, 2 objects, 1 triple; only the object tokens are confined
    full = torch.tensor(FULL_IMAGE)
    torch.testing.assert_close(out.regions[0, 1:3], given)
    torch.testing.assert_close(out.regions[1, 1:3], p[2:])
    for row in range(3):
        torch.testing.assert_close(out.regions[row, 0], full)
        torch.testing.assert_close(out.regions[row, 3], full)
    assert not out.mask[2].any()  # the empty graph still contributes nothing


def test_boxes_after_the_gnn_reach_the_tokens(labels):
    enc = encoder(labels, use_boxes=False, boxes_after_gnn=True)
    moved = SceneGraph.from_json(
        {
            **BOXED.to_json(),
            "objects": [{**o, "box": [0.5, 0.1, 0.9, 0.3]} for o in BOXED.to_json()["objects"]],
        }
    )
    with torch.no_grad():
        a = enc(graphs_to_batch([BOXED], labels)).tokens
        b = enc(graphs_to_batch([moved], labels)).tokens
    assert not torch.allclose(a[0, 1:3], b[0, 1:3])  # object tokens know their box
    off = encoder(labels, use_boxes=False)
    with torch.no_grad():  # without it (and without boxes at the input) the tokens ignore the boxes
        torch.testing.assert_close(
            off(graphs_to_batch([BOXED], labels)).tokens, off(graphs_to_batch([moved], labels)).tokens
        )


def test_object_identity_adds_each_label_embedding_to_its_object_token(labels):
    torch.manual_seed(0)
    config = GNNConfig("triplet", num_layers=2, hidden_dim=16, mlp_dim=32, use_boxes=False)
    width = labels.dim
    enc = SceneGraphEncoder(labels.dim, width, config, TokenConfig(object_identity=True)).eval()
    plain = SceneGraphEncoder(labels.dim, width, config, TokenConfig()).eval()
    plain.load_state_dict(enc.state_dict())  # the same weights: identity adds no parameter at equal width
    batch = graphs_to_batch([UNBOXED, BOXED], labels)
    with torch.no_grad():
        with_id, without = enc(batch).tokens, plain(batch).tokens
    names = [o.label for o in UNBOXED.objects]
    torch.testing.assert_close(with_id[0, 1:3] - without[0, 1:3], labels(names))  # object tokens only
    torch.testing.assert_close(with_id[:, 0], without[:, 0])  # the global token is untouched
    torch.testing.assert_close(with_id[:, 3], without[:, 3])  # and so is the triple token
    narrow = SceneGraphEncoder(labels.dim, width // 2, config, TokenConfig(object_identity=True))
    assert isinstance(narrow.identity, torch.nn.Linear) and narrow.identity.out_features == width // 2
    with torch.no_grad():  # another width goes through a linear map
        assert narrow(batch).tokens.shape == (2, 4, width // 2)


def test_confinement_config_errors():
    with pytest.raises(ValueError, match="cannot go with resample_to"):
        TokenConfig(confine_objects=True, resample_to=4)
    with pytest.raises(ValueError, match="needs object_tokens"):
        TokenConfig(confine_objects=True, object_tokens=False)
    with pytest.raises(ValueError, match="object_identity needs object_tokens"):
        TokenConfig(object_identity=True, object_tokens=False)
    with pytest.raises(ValueError, match="confine_objects needs injection: decoupled"):
        SGAdapterConfig(injection="concat", tokens=TokenConfig(confine_objects=True))
    with pytest.raises(ValueError, match="confinement must be 'hard', 'soft' or 'learned', got 'fuzzy'"):
        TokenConfig(confine_objects=True, confinement="fuzzy")
    with pytest.raises(ValueError, match="region_width must be positive, got -1"):
        TokenConfig(confine_objects=True, confinement="soft", region_width=-1)


LAYOUT_GNN = GNNConfig("triplet", num_layers=1, hidden_dim=16, mlp_dim=32, use_boxes=False, layout_head=True)
NO_DROPOUT = ConditionDropout(0.0, 0.0, 0.0, 0.0)


def test_the_layout_loss_is_the_l1_of_the_predicted_boxes_and_adds_to_the_loss(manifest):
    confined = TokenConfig(confine_objects=True)
    with_layout = make_module(
        graph=graph(gnn=LAYOUT_GNN, tokens=confined, layout_loss_weight=1.0), dropout=NO_DROPOUT
    )
    without = make_module(
        graph=graph(gnn=LAYOUT_GNN, tokens=confined, layout_loss_weight=0.0), dropout=NO_DROPOUT
    )
    batch = first_batch(with_layout, manifest)
    with torch.no_grad():
        total = with_layout.diffusion_loss(batch, with_layout.step_generator(0)).item()
        plain = without.diffusion_loss(batch, without.step_generator(0)).item()
        graphs = batch.graphs
        encoded = with_layout.model.adapter.graph_tokens(with_layout.model.embed_graphs(graphs, batch.labels))
        l1 = (encoded.predicted - graphs.box).abs().mean().item()
    assert l1 > 0 and total == pytest.approx(plain + l1, rel=1e-5)


def test_teacher_forcing_zero_hides_the_boxes_and_one_keeps_them(manifest):
    gnn = GNNConfig("triplet", num_layers=1, hidden_dim=16, mlp_dim=32, use_boxes=True, layout_head=True)
    m = make_module(graph=graph(gnn=gnn, tokens=TokenConfig(confine_objects=True)), dropout=NO_DROPOUT)
    batch = first_batch(m, manifest)
    n = batch.batch_size
    drops = {k: torch.zeros(n, dtype=torch.bool) for k in ("text", "image", "graph")}
    with torch.no_grad():
        _, kept, graphs = m.model._condition(batch, drops, torch.zeros(n, dtype=torch.bool))
        _, hidden, _ = m.model._condition(batch, drops, torch.ones(n, dtype=torch.bool))
    torch.testing.assert_close(kept.layout, graphs.box)  # the true boxes
    torch.testing.assert_close(hidden.layout, hidden.predicted)  # the head's own boxes
    assert not torch.allclose(hidden.predicted, kept.predicted)  # the GNN no longer sees the boxes


def test_shifted_timesteps_favour_high_noise_and_inverse_snr_weights_it_more():
    scheduler = make_module().model.noise_scheduler
    uniform, shifted = ObjectiveSettings(), ObjectiveSettings(timesteps="shifted", timestep_shift=3.0)
    assert uniform.shift() is None and shifted.shift() == 3.0
    t_u = sample_timesteps(
        scheduler, 4000, torch.Generator().manual_seed(0), torch.device("cpu"), uniform.shift()
    )
    t_s = sample_timesteps(
        scheduler, 4000, torch.Generator().manual_seed(0), torch.device("cpu"), shifted.shift()
    )
    assert t_s.min() >= 0 and t_s.max() <= 999
    assert t_s.float().mean() > t_u.float().mean() + 150  # shift 3: mean 0.70 of the range against 0.5
    t = torch.tensor([50, 500, 950])
    inv = snr_loss_weights(scheduler, t, "inv_snr", 5.0)
    min_snr = snr_loss_weights(scheduler, t, "min_snr", 5.0)
    assert inv[0] < inv[1] < inv[2] and inv.max() <= 5.0  # grows with the noise, capped
    assert min_snr[2] == 1.0 and min_snr[0] < 1.0  # high noise keeps weight 1, low noise weighs less
    assert snr_loss_weights(scheduler, t, "none", 5.0) is None


def test_layout_and_timestep_options_refuse_bad_values():
    for make, match in (
        (lambda: GraphBranchSettings(layout_teacher_forcing=1.5), "model.graph.layout_teacher_forcing"),
        (lambda: GraphBranchSettings(layout_loss_weight=-1.0), "model.graph.layout_loss_weight"),
        (lambda: ObjectiveSettings(timesteps="cubic"), "model.objective.timesteps must be"),
        (lambda: ObjectiveSettings(timestep_shift=0.0), "model.objective.timestep_shift"),
        (lambda: ObjectiveSettings(loss_weighting="p2"), "model.objective.loss_weighting must be"),
        (lambda: ImageBranchSettings(tokens="grid"), "model.image.tokens must be"),
        (lambda: BaseSettings(dtype="int8"), "model.base.dtype must be"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="injection must be"):
        SG2ImgModule(injection="sum")


def layout_adapter(tiny, tiny_preset, confinement="hard"):
    from sg2img.model.adapter import SceneGraphAdapter

    torch.manual_seed(0)
    cfg = SGAdapterConfig(
        label_dim=tiny.text_encoder.config.hidden_size,
        image_branch=False,
        image=tiny_preset.adapter_config("cls"),
        gnn=GNNConfig("triplet", num_layers=1, hidden_dim=16, mlp_dim=32, use_boxes=False, layout_head=True),
        tokens=TokenConfig(confine_objects=True, confinement=confinement),
    )
    adapter = SceneGraphAdapter(tiny.unet, cfg)
    with torch.no_grad():  # off the identity init, so the branch visibly matters
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter.attach(tiny.unet)
    return adapter


@pytest.mark.parametrize("confinement", ["hard", "soft", "learned"])
def test_sg_scale_zero_with_confined_tokens_is_the_plain_unet(
    tiny, tiny_preset, unet_inputs, labels, confinement
):
    adapter = layout_adapter(tiny, tiny_preset, confinement)
    latents, t, text = unet_inputs
    graphs = graphs_to_batch([BOXED, UNBOXED], labels)
    kwargs = adapter.unet_kwargs(text, None, graphs)
    assert kwargs["cross_attention_kwargs"]["streams"]["sg"].regions is not None
    with torch.no_grad():
        plain = tiny.unet(latents, t, encoder_hidden_states=text).sample
        adapter.set_scale(sg_scale=0.0)
        assert torch.equal(tiny.unet(latents, t, **kwargs).sample, plain)
        adapter.set_scale(sg_scale=1.0)
        assert not torch.allclose(tiny.unet(latents, t, **kwargs).sample, plain)


def test_the_pipeline_returns_the_layout_it_used(tiny, tiny_preset, labels):
    from sg2img.infer.pipeline import SG2ImgPipeline

    pipe = SG2ImgPipeline.from_components(tiny)
    pipe.set_sg_adapter(layout_adapter(tiny, tiny_preset), labels=labels)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=["two things"] * 2,
        scene_graph=[BOXED, UNBOXED],
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        attention_maps=True,
    )
    assert len(out.layouts) == 4 and out.layouts[0] == out.layouts[1]  # one per image, graph-major
    torch.testing.assert_close(torch.tensor(out.layouts[0]), torch.tensor([o.box for o in BOXED.objects]))
    predicted = torch.tensor(out.layouts[2])
    assert predicted.shape == (2, 4) and ((predicted >= 0) & (predicted <= 1)).all()
    assert all(torch.isfinite(m.maps).all() for m in out.attention_maps)


@pytest.mark.parametrize("confinement", ["soft", "learned"])
def test_soft_confinement_saves_its_widths_trains_them_and_loads_them_back(
    tiny, tiny_preset, unet_inputs, labels, tmp_path, confinement
):
    import copy

    from sg2img.model.adapter import SceneGraphAdapter
    from sg2img.train.adapter_module import branch_of

    adapter = layout_adapter(tiny, tiny_preset, confinement)
    path = adapter.save(tmp_path / "soft.safetensors")
    own = ("region_width_sg", "region_bias_in_sg.weight", "region_bias_in_sg.bias", "region_bias_out_sg.weight",
           "region_bias_out_sg.bias") if confinement == "learned" else ("region_width_sg",)  # fmt: skip
    widths = {k: v for k, v in adapter.state_dict().items() if k.endswith(own)}
    assert len(widths) == len(own) * len(adapter.attention.processors())
    fresh = copy.deepcopy(tiny.unet)
    loaded = SceneGraphAdapter.from_file(path, fresh)
    assert loaded.config.tokens.confinement == confinement
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in widths.items())
    loaded.attach(fresh)
    latents, t, text = unet_inputs
    graphs = graphs_to_batch([BOXED, UNBOXED], labels)
    with torch.no_grad():
        ours = tiny.unet(latents, t, **adapter.unet_kwargs(text, None, graphs)).sample
        theirs = fresh(latents, t, **loaded.unet_kwargs(text, None, graphs)).sample
    assert torch.equal(ours, theirs)
    assert {branch_of(f"adapter.{k}") for k in widths} == {"graph"}  # in the graph branch's optimizer group
