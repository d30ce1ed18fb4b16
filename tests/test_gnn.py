"""Graph -> tokens: label embeddings, the GNN layers, and the padded/resampled token sequences."""

import pytest
import torch

from sg2img.graph import SceneGraph
from sg2img.graph_batch import graphs_to_batch
from sg2img.model.gnn import GraphTripleConv, SceneGraphEncoder, TokenConfig, gnn_preset
from sg2img.model.labels import LabelEmbedder, LearnedVocabulary

A = SceneGraph.from_json(
    {
        "objects": [
            {"name": "circle", "attributes": ["red"], "box": [0.1, 0.1, 0.4, 0.4]},
            "square",
            "tree",
            "cat",
        ],
        "relationships": [[0, "left of", 1], [0, "left of", 1], [1, "above", 1], [2, "near", 0]],
    }
)  # fmt: skip  (a duplicate, a self-loop and an isolated object)
B = SceneGraph.from_names(["dog", "ball"], [(0, "chasing", 1)])


@pytest.fixture
def labels(tiny_session):
    return LabelEmbedder(tiny_session.text_encoder, tiny_session.tokenizer)


def test_label_embeddings_are_the_frozen_clip_pooled_output_and_cached(tiny_session, labels):
    out = labels(["red circle", "left of", "red circle"])
    ids = tiny_session.tokenizer(
        ["red circle"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        direct = tiny_session.text_encoder(input_ids=ids).pooler_output
    torch.testing.assert_close(out[0], direct[0])
    assert torch.equal(out[0], out[2]) and labels.encoder_calls == 1
    labels(["left of", "red circle"])
    assert labels.encoder_calls == 1  # all cached


def test_batch_embeds_each_unique_string_once(labels):
    seen = []

    def embed(strings):
        seen.append(list(strings))
        return labels(strings)

    batch = graphs_to_batch([A, B, SceneGraph()], embed)
    assert len(seen) == 1 and len(seen[0]) == len(set(seen[0]))
    assert batch.num_graphs == 3 and batch.x.shape == (6, labels.dim)
    assert batch.edge_index.tolist() == [[0, 0, 1, 2, 4], [1, 1, 1, 0, 5]]
    assert batch.has_box.tolist() == [True, False, False, False, False, False]


def test_learned_vocabulary_maps_unknown_to_index_zero():
    vocab = LearnedVocabulary(["circle", "square"], dim=8)
    out = vocab(["square", "hexagon", "circle"])
    assert out.shape == (3, 8) and torch.equal(out[1], vocab.embedding.weight[0])
    assert vocab.unknown(["square", "hexagon"]) == ["hexagon"]


def test_triplet_layer_matches_sg2ims_dense_update_rule():
    torch.manual_seed(0)
    layer = GraphTripleConv(dim=6, hidden_dim=5, out_dim=7)
    obj, pred = torch.randn(4, 6), torch.randn(5, 6)
    edges = torch.tensor([[0, 1], [0, 1], [1, 1], [2, 0], [3, 0]])  # object 3 as subject only
    new_obj, new_pred = layer(obj, edges.t(), pred)
    # sg2im, written out per triple: net1 on [s, p, o]; average the s/o candidates per object; net2.
    h, d = 5, 7
    candidates = {i: [] for i in range(4)}
    expected_pred = []
    for k, (s, o) in enumerate(edges.tolist()):
        t = layer.net1(torch.cat([obj[s], pred[k], obj[o]]))
        candidates[s].append(t[:h])
        candidates[o].append(t[h + d :])
        expected_pred.append(t[h : h + d])
    pooled = torch.stack([torch.stack(c).mean(0) if c else torch.zeros(h) for c in candidates.values()])
    torch.testing.assert_close(new_pred, torch.stack(expected_pred))
    torch.testing.assert_close(new_obj, layer.net2(pooled))
    # an object in no triple gets net2(0)
    lonely, _ = layer(torch.randn(2, 6), torch.tensor([[0], [0]]), torch.randn(1, 6))
    torch.testing.assert_close(lonely[1], layer.net2(torch.zeros(h)))


def tokens_of(enc, graphs, labels):
    out = enc(graphs_to_batch(graphs, labels))
    return out.tokens, out.mask


def encoder(labels, layer="tiny", **kw):
    torch.manual_seed(0)
    gnn = gnn_preset(layer, hidden_dim=16, mlp_dim=32, heads=4, **kw.pop("gnn", {}))
    return SceneGraphEncoder(labels.dim, 48, gnn, TokenConfig(**kw)).eval()


@pytest.mark.parametrize("layer", ["sg2im", "gine", "transformer", "gatv2"])
@pytest.mark.parametrize("image_node", [False, True])
def test_every_layer_gives_padded_tokens_with_masks(labels, layer, image_node):
    enc = encoder(labels, layer, gnn={"image_node": image_node})
    tokens, mask = tokens_of(enc, [A, B, SceneGraph()], labels)
    # 1 global + 4 objects + 4 triples for A; B has 1 + 2 + 1; the empty graph has nothing
    assert tokens.shape == (3, 9, 48)
    assert mask.sum(1).tolist() == [9, 4, 0]
    assert mask[1].tolist() == [True, True, True, False, False, True, False, False, False]
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize(
    "on",
    [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, True)],
)
def test_token_labels_name_the_tokens_the_encoder_makes_in_its_order(labels, on):
    from sg2img.model.gnn import token_labels

    glob, objects, triples = on
    config = dict(global_token=glob, object_tokens=objects, triple_tokens=triples)
    enc = encoder(labels, confine_objects=objects, **config)
    graphs = [A, B, SceneGraph()]
    out = enc(graphs_to_batch(graphs, labels))
    names = token_labels(graphs, TokenConfig(**config))
    assert [[n is not None for n in row] for row in names] == out.mask.tolist()  # same length, same padding
    b = names[1]  # B: dog chasing ball
    expected = (
        ["<graph>"] * glob + ["0: dog", "1: ball", None, None] * objects + ["dog chasing ball"] * triples
    )
    assert [n for n in b if n is not None] == [n for n in expected if n is not None]
    if objects:  # A's boxed object: its region sits at the position its label names
        boxed = (out.regions[0] != torch.tensor([0.0, 0.0, 1.0, 1.0])).any(-1) & out.mask[0]
        assert [n for n, k in zip(names[0], boxed.tolist()) if k] == ["0: red circle"]


def test_tokens_do_not_depend_on_the_rest_of_the_batch(labels):
    enc = encoder(labels, "transformer")
    alone, m1 = tokens_of(enc, [B], labels)
    batched, m2 = tokens_of(enc, [A, B], labels)
    keep = m2[1]
    torch.testing.assert_close(batched[1][keep], alone[0][m1[0]], atol=1e-5, rtol=1e-5)


def test_resampled_tokens_have_fixed_length_and_empty_graphs_stay_masked(labels):
    enc = encoder(labels, resample_to=5, resampler_heads=4)
    tokens, mask = tokens_of(enc, [A, SceneGraph(), B], labels)
    assert tokens.shape == (3, 5, 48) and mask.tolist() == [[True] * 5, [False] * 5, [True] * 5]
    alone, _ = tokens_of(enc, [B], labels)
    torch.testing.assert_close(tokens[2], alone[0], atol=1e-5, rtol=1e-5)  # padding does not leak in


def test_config_errors():
    with pytest.raises(ValueError, match=r"gnn\.layer must be one of"):
        gnn_preset("tiny", layer="gcn")
    with pytest.raises(ValueError, match="unknown GNN preset 'big'"):
        gnn_preset("big")
    with pytest.raises(ValueError, match=r"divisible by gnn\.heads"):
        gnn_preset("transformer", hidden_dim=30, heads=4)
