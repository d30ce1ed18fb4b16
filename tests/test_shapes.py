"""The shapes world: deterministic rendering, graphs from the angle rule, and the programmatic evaluator."""

import numpy as np
import pytest

from sg2img.data.shapes import Shapes
from sg2img.graph import SceneGraph
from sg2img.shapes.world import (
    PALETTE,
    ShapesEvaluator,
    caption,
    centre_predicate,
    render,
    sample_scene,
)

N = 200


@pytest.fixture(scope="module")
def test_rows():
    src = Shapes("test", size=32, num_rows=N)
    return src, [src.example(i) for i in range(N)]


def test_rows_are_deterministic_and_splits_differ():
    a, b = Shapes("train", num_rows=4), Shapes("train", num_rows=4)
    assert a.example(3).image.tobytes() == b.example(3).image.tobytes()
    assert Shapes("val", num_rows=4).example(3).image.tobytes() != a.example(3).image.tobytes()
    assert Shapes("train", num_rows=4, seed=1).example(3).image.tobytes() != a.example(3).image.tobytes()
    assert Shapes("train", size=64, num_rows=1).example(0).image.size == (64, 64)
    with pytest.raises(ValueError, match="split must be one of"):
        Shapes("dev")


def test_graphs_follow_the_scene(test_rows):
    src, rows = test_rows
    for i, ex in enumerate(rows[:50]):
        objects = src.objects(i)
        assert 2 <= len(objects) <= 4 and len({o.colour for o in objects}) == len(objects)
        g = ex.graph
        assert [o.label for o in g.objects] == [f"{o.colour} {o.shape}" for o in objects]
        assert len(g.relationships) == len(objects) * (len(objects) - 1) // 2  # every pair
        for r in g.relationships:
            assert r.predicate == centre_predicate(objects[r.subject].centre, objects[r.object].centre)
    assert {r.predicate for ex in rows for r in ex.graph.relationships} == {
        "left of",
        "right of",
        "above",
        "below",
    }


def test_captions_name_objects_and_optionally_relations(test_rows):
    _, rows = test_rows
    g = rows[0].graph
    plain, with_rel = caption(g), caption(g, relations=True)
    assert all(o.label in plain for o in g.objects)
    assert not any(p in plain for p in ("left of", "right of", "above", "below"))
    assert all(r.predicate in with_rel for r in g.relationships)
    assert Shapes("test", num_rows=1, caption_relations=True).example(0).caption == caption(
        Shapes("test", num_rows=1).example(0).graph, relations=True
    )


def test_evaluator_scores_the_renderers_own_images_near_one():
    for size in (32, 64):
        src = Shapes("test", size=size, num_rows=N)
        ex = [src.example(i) for i in range(N)]
        m = ShapesEvaluator().evaluate([e.image for e in ex], [e.graph for e in ex])
        assert (
            m["object_recall"] >= 0.99 and m["relation_accuracy"] >= 0.99 and m["graph_accuracy"] >= 0.99
        ), m


def test_evaluator_is_near_chance_on_mismatched_pairs(test_rows):
    src, rows = test_rows
    rng = np.random.default_rng(7)
    relaid = []
    for i in range(N):  # the same objects at new places: only the layout is wrong
        objects = src.objects(i)
        places = sample_scene(rng, len(objects), len(objects))
        relaid.append(
            render([type(o)(o.shape, o.colour, p.centre, o.radius) for o, p in zip(objects, places)])
        )
    ev = ShapesEvaluator()
    m = ev.evaluate(relaid, [e.graph for e in rows])
    assert m["object_recall"] >= 0.99
    assert 0.15 <= m["relation_accuracy"] <= 0.35, m  # four predicates: chance is 1/4
    # the bootstrap standard error over images: about what the binomial one over the judged triples gives
    # (within a factor of about two), and none when every image is right
    judged = m["relations_judged"] * sum(len(e.graph.relationships) for e in rows)
    binomial = (m["relation_accuracy"] * (1 - m["relation_accuracy"]) / judged) ** 0.5
    assert 0.5 * binomial < m["relation_accuracy_se"] < 2.5 * binomial, (m, binomial)
    assert m["object_recall_se"] == 0.0
    shuffled = ev.evaluate([e.image for e in rows], [e.graph for e in rows[1:] + rows[:1]])
    assert shuffled["object_recall"] < 0.4 and shuffled["graph_accuracy"] < 0.05, shuffled


def test_evaluator_on_a_blank_image_finds_nothing(test_rows):
    from PIL import Image

    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    assert ShapesEvaluator().find(blank) == {}
    m = ShapesEvaluator().evaluate([blank], [test_rows[1][0].graph])
    assert m["object_recall"] == 0 and m["relations_judged"] == 0 and m["graph_accuracy"] == 0
    assert len(PALETTE) >= 4
    with pytest.raises(ValueError, match="images for"):
        ShapesEvaluator().evaluate([blank], [])


def test_the_evaluator_says_which_graphs_it_cannot_judge():
    from sg2img.shapes.world import ShapesEvaluator

    judge = ShapesEvaluator().cannot_judge
    ok = {"objects": [{"name": "circle", "attributes": ["red"]}, {"name": "square", "attributes": ["blue"]}],
          "relationships": [[0, "left of", 1]]}  # fmt: skip
    assert judge(SceneGraph.from_json(ok)) is None
    cases = [
        ({**ok, "objects": ["sheep", ok["objects"][1]]}, "objects[0] ('sheep') is not a shapes-world object"),
        ({**ok, "objects": [ok["objects"][0], {"name": "square", "attributes": ["red"]}]},
         "objects[0] and objects[1] are both red"),
        ({**ok, "relationships": [[0, "next to", 1]]}, "relationships[0]: predicate 'next to' is not judged"),
    ]  # fmt: skip
    for graph, why in cases:
        assert why in judge(SceneGraph.from_json(graph))


def test_words_outside_the_world_are_named_once_each():
    from sg2img.shapes.world import outside_world

    sheep = SceneGraph.from_json({"objects": ["sheep", {"name": "circle", "attributes": ["plaid"]}],
                                  "relationships": [[0, "next to", 1], [1, "above", 0]]})  # fmt: skip
    assert outside_world([sheep, None], "A red circle and a sheep, left of a Cow") == [
        "cow",
        "next to",
        "plaid",
        "sheep",
    ]
    assert outside_world([None], "a red circle left of a blue square; a green triangle above it") == ["it"]
