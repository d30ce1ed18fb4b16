"""Scene graphs: sg2im's JSON, the extended form, validation, networkx, drawing and check-graph."""

import copy
import json
from pathlib import Path

import jsonschema
import networkx as nx
import pytest

from sg2img.cli import main
from sg2img.drawing import draw_scene_graph
from sg2img.graph import Limits, SceneGraph, SceneGraphError, load_scene_graphs, parse_scene_graphs

DATA = Path(__file__).resolve().parents[1] / "data"
SHEEP = {
    "objects": ["sky", "sheep", "grass", "tree", "sheep"],
    "relationships": [[0, "above", 2], [1, "standing on", 2], [1, "standing on", 2], [4, "next to", 4]],
}


def test_reads_sg2im_form_with_duplicates_self_loops_and_isolated_objects():
    g = SceneGraph.from_json(SHEEP)
    assert [o.name for o in g.objects] == SHEEP["objects"]
    assert g.triples == [(0, "above", 2), (1, "standing on", 2), (1, "standing on", 2), (4, "next to", 4)]
    assert g.stats() == {"objects": 5, "relationships": 4, "duplicate_triples": 1, "self_loops": 1,
                         "isolated_objects": 1, "boxes": 0}  # fmt: skip


def test_reads_extended_form_and_lists():
    data = [
        {"objects": [{"name": "circle", "attributes": ["red"], "box": [0.1, 0.2, 0.3, 0.4]}, "square"],
         "relationships": [{"subject": 0, "predicate": "left of", "object": 1}]},
        {"objects": []},
    ]  # fmt: skip
    a, b = parse_scene_graphs(json.dumps(data))
    assert a.objects[0].label == "red circle" and a.objects[0].box == (0.1, 0.2, 0.3, 0.4)
    assert a.triples == [(0, "left of", 1)] and b.is_empty


def test_parsing_never_mutates_the_callers_data():
    data = {"objects": [{"name": "  big   dog ", "attributes": ["brown"]}], "relationships": [[0, "near", 0]]}
    before = copy.deepcopy(data)
    SceneGraph.from_json(data)
    assert data == before


def test_json_round_trip():
    for g in (SceneGraph.from_json(SHEEP), load_scene_graphs(DATA / "examples" / "shapes.json")[0]):
        assert SceneGraph.from_json(json.loads(json.dumps(g.to_json()))) == g


def test_networkx_round_trip():
    g = load_scene_graphs(DATA / "examples" / "shapes.json")[0]
    nxg = g.to_networkx()
    assert isinstance(nxg, nx.MultiDiGraph) and nxg.nodes[0]["attributes"] == ["red"]
    assert nxg.nodes[0]["box"] == [0.05, 0.1, 0.4, 0.45]
    assert SceneGraph.from_networkx(nxg) == g
    dup = SceneGraph.from_json(SHEEP)
    assert dup.to_networkx().number_of_edges() == 4  # duplicates and self-loops survive
    assert SceneGraph.from_networkx(dup.to_networkx()) == dup


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"objects": ["a"] * 8, "relationships": [[0, "x", 1]] * 3 + [[0, "x", 9]]},
         "relationships[3][2]: object index 9 out of range (8 objects)"),
        ({"objects": ["a", "b"], "relationships": [[True, "x", 1]]},
         "relationships[0][0]: object index must be an integer, got boolean True"),
        ({"objects": ["a", "b"], "relationships": [[0, "x", 1.0]]},
         "relationships[0][2]: object index must be an integer, got float 1.0"),
        ({"objects": ["a", "b"], "relationships": [[0, "x", -1]]}, "relationships[0][2]: object index -1 out of range"),
        ({"objects": ["a", ""]}, "objects[1]: must not be empty"),
        ({"objects": ["a", 3]}, "objects[1]: an object must be a string"),
        ({"objects": [{"name": "a", "box": [0, 0, 2, 1]}]}, "objects[0].box[2]: box coordinate 2 is outside [0, 1]"),
        ({"objects": [{"name": "a", "box": [0.5, 0, 0.1, 1]}]}, "objects[0].box: box [0.5, 0.0, 0.1, 1.0] has x1 < x0"),
        ({"objects": [{"name": "a", "colour": "red"}]}, "objects[0]: unknown field(s) ['colour']"),
        ({"objects": ["a"], "relationships": [[0, "x"]]}, "relationships[0]: a relationship must be [subject, predicate, object]"),
        ({"objects": ["a"], "relationships": [{"subject": 0, "object": 0}]}, "relationships[0]: missing field(s) ['predicate']"),
        ({"relationships": []}, "$: missing field 'objects'"),
        ([{"objects": ["a"]}, 5], "[1]: a scene graph must be an object"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_json_path(data, message):
    with pytest.raises(SceneGraphError) as e:
        parse_scene_graphs(json.dumps(data), source="scene.json")
    assert str(e.value).startswith("scene.json: ")
    assert message in str(e.value)


def test_invalid_json_and_size_limits():
    with pytest.raises(SceneGraphError, match=r"invalid JSON: .* \(line 1, column"):
        parse_scene_graphs('{"objects": [', source="x.json")
    with pytest.raises(SceneGraphError, match="nested too deeply"):
        parse_scene_graphs("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SceneGraphError, match="objects: 300 objects, over the limit of 256"):
        parse_scene_graphs(json.dumps({"objects": ["a"] * 300}))
    small = Limits(max_relationships=2)
    with pytest.raises(SceneGraphError, match="3 relationships, over the limit of 2"):
        parse_scene_graphs(json.dumps({"objects": ["a"], "relationships": [[0, "x", 0]] * 3}), limits=small)


def test_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(" " * 2048 + "{}")
    with pytest.raises(SceneGraphError, match="over the limit of 1,024"):
        load_scene_graphs(path, Limits(max_file_bytes=1024))


def test_shipped_schema_accepts_the_examples_and_rejects_bad_graphs():
    schema = json.loads((DATA / "scene_graph.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for f in (DATA / "examples").glob("*.json"):
        jsonschema.validate(json.loads(f.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"objects": ["a"], "relationships": [[0, "x", True]]}, schema)


def test_drawing_is_an_image():
    img = draw_scene_graph(SceneGraph.from_json(SHEEP), size=256)
    assert img.size == (256, 256) and len(img.getcolors(maxcolors=1 << 16) or []) > 10
    assert draw_scene_graph(SceneGraph()).size == (384, 384)


def test_check_graph_cli(tmp_path, capsys):
    assert main(["check-graph", str(DATA / "examples" / "sheep.json")]) == 0
    out = capsys.readouterr().out
    assert "sheep.json[0]: ok: 5 objects, 5 relationships (1 duplicate" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"objects": ["a"] * 8, "relationships": [[0, "x", 9]]}))
    assert main(["check-graph", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: relationships[0][2]: object index 9 out of range (8 objects)" in err
    assert "Traceback" not in err


def test_attention_maps_share_one_colour_scale_and_say_when_they_are_alike():
    import numpy as np
    import torch
    from PIL import Image

    from sg2img.drawing import attention_overlays, similar_maps

    ramp = torch.linspace(0, 1, 64).reshape(8, 8)
    black = Image.new("RGB", (32, 32))

    def red_pixels(maps):
        a = np.asarray(attention_overlays(black, maps, alpha=1.0)).astype(int)
        return int(((a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())

    strong_twice = red_pixels({"a": ramp, "b": ramp.flip(0)})
    strong_and_weak = red_pixels({"a": ramp, "b": 0.1 * ramp.flip(0)})
    # one scale: the weak map (a tenth of the other) shows no red; each map stretched to its own range would
    # draw as much red as the strong one
    assert strong_and_weak < 0.75 * strong_twice
    blob = torch.zeros(8, 8)
    blob[2:4, 2:4] = 1
    assert similar_maps({"a": ramp, "b": 0.5 * ramp + 0.01, "c": blob}) == [("a", "b", pytest.approx(1.0))]
    assert similar_maps({"a": ramp, "c": blob, "flat": torch.zeros(8, 8)}) == []


def test_graph_drawings_keep_every_label_apart_and_inside_at_four_objects_and_six_triples():
    import matplotlib.pyplot as plt

    from sg2img.data.shapes import Shapes
    from sg2img.drawing import scene_graph_figure

    source = Shapes("test", num_rows=60)
    graphs = [g for g in (source.example(i).graph for i in range(60)) if len(g.objects) == 4][:5]
    assert graphs and all(len(g.relationships) == 6 for g in graphs)
    for graph in [*graphs, SceneGraph.from_json(SHEEP)]:
        fig, texts = scene_graph_figure(graph, size=256)
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in texts]
        width, height = fig.canvas.get_width_height()
        plt.close(fig)
        assert len(texts) == len(graph.objects) + len(graph.relationships)  # a repeated triple shows twice
        for k, b in enumerate(boxes):
            assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= width and b.y1 <= height, (graph.describe(), texts[k])
            assert not any(b.overlaps(c) for c in boxes[k + 1 :]), (graph.describe(), texts[k].get_text())


def test_layout_labels_of_adjacent_boxes_do_not_overlap():
    from PIL import Image, ImageDraw

    from sg2img.drawing import draw_layout, layout_label_boxes

    g = SceneGraph.from_names(
        ["magenta square", "green triangle", "yellow square", "cyan circle"],
        [(0, "below", 1), (2, "left of", 3)],
    )
    # boxes side by side at the same height, as a layout head puts two objects it cannot tell apart
    boxes = [(0.35, 0.35, 0.6, 0.6), (0.5, 0.35, 0.75, 0.6), (0.2, 0.1, 0.45, 0.3), (0.4, 0.05, 0.6, 0.25)]
    size = 256
    pixels = [tuple(round(v * (size - 1)) for v in b) for b in boxes]
    draw = ImageDraw.Draw(Image.new("RGB", (size, size)))
    labels = [f"{i}: {o.label}" for i, o in enumerate(g.objects)]
    placed = layout_label_boxes(draw, labels, pixels, size)
    for i, a in enumerate(placed):
        assert min(a[:2]) >= 0 and max(a[2:]) <= size
        for b in placed[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert draw_layout(g, boxes, size=size).size == (size, size)
