"""Property-based tests of the scene-graph JSON reader: any input parses or raises SceneGraphError."""

import contextlib
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sg2img.graph import Limits, SceneGraph, SceneGraphError, parse_scene_graphs, scene_graphs_from_json

SMALL = Limits(
    max_file_bytes=200_000, max_graphs=50, max_objects=20, max_relationships=40, max_label_chars=40
)
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any code point (lone surrogates, controls, RTL marks, BOM, astral) and some composed odd strings
odd_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["\u0000", "\u202e", "\ufeff", "\U0001f600", "e\u0301", "\ud800", " \t\n ", "x" * 41]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(odd_text | st.sampled_from(["objects", "relationships", "name", "box"]), inner, max_size=6),
    max_leaves=40,
)  # fmt: skip

index = st.integers(min_value=-3, max_value=8) | st.booleans() | st.floats(-2, 8) | st.just("1") | st.none()
label = odd_text | st.integers() | st.none() | st.lists(odd_text, max_size=2)
obj = label | st.fixed_dictionaries(
    {"name": label},
    optional={
        "attributes": st.lists(label, max_size=20) | label,
        "box": st.lists(st.floats(allow_nan=True) | st.integers(-1, 2) | st.booleans(), max_size=5) | label,
        "extra": scalars,
    },
)
rel = st.lists(index | label, max_size=4) | st.fixed_dictionaries(
    {"subject": index, "predicate": label, "object": index}, optional={"x": scalars}
)
graph_like = st.fixed_dictionaries(
    {"objects": st.lists(obj, max_size=25) | scalars},
    optional={"relationships": st.lists(rel, max_size=45) | scalars, "caption": scalars, "junk": scalars},
)


def parses_or_refuses(text: str) -> list[SceneGraph] | SceneGraphError:
    try:
        graphs = parse_scene_graphs(text, "fuzz.json", SMALL)
    except SceneGraphError as e:
        assert str(e).startswith("fuzz.json: "), str(e)  # every error names the file
        return e
    for g in graphs:  # what parses is within the limits and self-consistent
        assert len(g.objects) <= SMALL.max_objects and len(g.relationships) <= SMALL.max_relationships
        for r in g.relationships:
            assert 0 <= r.subject < len(g.objects) and 0 <= r.object < len(g.objects)
            assert type(r.subject) is int and type(r.object) is int
        for o in g.objects:
            assert o.name and len(o.name) <= SMALL.max_label_chars
            assert o.box is None or all(0.0 <= v <= 1.0 and math.isfinite(v) for v in o.box)
    return graphs


@PROFILE
@given(json_values)
def test_any_json_value_parses_or_raises_scene_graph_error(value):
    parses_or_refuses(json.dumps(value))


@PROFILE
@given(st.lists(graph_like, max_size=3) | graph_like)
def test_graph_shaped_input_with_wrong_types_parses_or_raises(value):
    text = json.dumps(value)
    parses_or_refuses(text)
    data = json.loads(text)  # the same from Python objects, which are never mutated
    with contextlib.suppress(SceneGraphError):
        scene_graphs_from_json(data, "x", SMALL)
    assert json.dumps(data) == text


@PROFILE
@given(st.lists(graph_like, max_size=2) | graph_like, st.data())
def test_truncated_text_is_refused_cleanly(value, data):
    text = json.dumps(value)
    cut = data.draw(st.integers(0, max(0, len(text) - 1)))
    parses_or_refuses(text[:cut])


@PROFILE
@given(st.integers(1, 3000), st.sampled_from(["[", '{"objects": [', '[[[[{"a": ']))
def test_deep_nesting_is_refused_not_a_crash(depth, opener):
    # no such text is a scene-graph file (a list of graph objects): each must be refused with one clear error
    assert isinstance(parses_or_refuses(opener * depth + "1" + "]" * depth), SceneGraphError)


@PROFILE
@given(st.sampled_from([True, False, 1.0, 0.0, 2.5, float("nan"), "0", None, [0], -1, 2**64]))
def test_booleans_floats_and_strings_are_not_indices(bad):
    g = {"objects": ["a", "b"], "relationships": [[0, "near", bad]]}
    result = parses_or_refuses(json.dumps(g))
    assert isinstance(result, SceneGraphError) and "relationships[0][2]" in str(result)


def test_huge_and_empty_lists():
    assert parses_or_refuses('{"objects": [], "relationships": []}')[0].objects == ()
    assert parses_or_refuses("[]") == []
    many = json.dumps({"objects": ["a"] * (SMALL.max_objects + 1)})
    assert "over the limit" in str(parses_or_refuses(many))
    graphs = json.dumps([{"objects": ["a"]}] * (SMALL.max_graphs + 1))
    assert "over the limit" in str(parses_or_refuses(graphs))
    assert "over the limit" in str(parses_or_refuses(" " * (SMALL.max_file_bytes + 1)))
