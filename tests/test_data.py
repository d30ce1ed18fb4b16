"""Data sources on fixture files in their real formats, preprocessing, the batch, the encoder cache."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datafiles import write_coco_stuff, write_laion_sg, write_manifest, write_visual_genome
from PIL import Image

from sg2img.base.tokenizer import clip_tokenizer
from sg2img.data import (
    CachedRows,
    CocoStuff,
    Example,
    JsonlManifest,
    LaionSG,
    Preprocess,
    SkipLog,
    Skipped,
    VisualGenome,
    WebDatasetShards,
    collate,
    geometric_predicate,
    synthesize_relationships,
    write_shards,
)
from sg2img.graph import SceneGraph


@pytest.fixture(scope="module")
def preprocess() -> Preprocess:
    return Preprocess(resolution=32, clip_size=24, tokenizer=clip_tokenizer())


def rows(source) -> list:
    return [source[i] for i in range(len(source))]


# --- JSONL manifest ------------------------------------------------------------------------------
def test_manifest_reads_rows_and_skips_bad_ones_with_reasons(tmp_path):
    path = write_manifest(tmp_path, n=4, bad_rows=True)
    got = rows(JsonlManifest(path))
    good = [r for r in got if isinstance(r, Example)]
    bad = {r.key: r.reason for r in got if isinstance(r, Skipped)}
    assert len(good) == 4 and len(bad) == 3
    assert good[0].graph.objects[0].attributes and good[0].caption.startswith("a ")
    assert "UnidentifiedImageError" in bad[f"{path}:2"]
    assert "not valid JSON" in bad[f"{path}:4"] and f"{path}:4" in bad[f"{path}:4"]
    assert "relationships[0][2]" in bad[f"{path}:6"] and "out of range" in bad[f"{path}:6"]


def test_iterating_a_source_ends(tmp_path):
    source = JsonlManifest(write_manifest(tmp_path, n=3, bad_rows=True))
    assert len(list(source)) == 6
    with pytest.raises(IndexError, match="out of range"):
        source[6]


def test_manifest_missing_field_and_graph_by_path(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "g.json").write_text(json.dumps({"objects": ["cat", "mat"], "relationships": [[0, "on", 1]]}))
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "scene_graph": "g.json"})
        + "\n\n"
        + json.dumps({"caption": "a cat", "scene_graph": "g.json"})
        + "\n"
        + json.dumps({"image": "a.png", "caption": "a cat on a mat"})
        + "\n"
        + json.dumps({"image": 7, "caption": "x"})
        + "\n"
    )
    first, second, third, fourth = rows(JsonlManifest(tmp_path / "m.jsonl"))
    assert first.graph.triples == [(0, "on", 1)] and first.caption == ""
    assert isinstance(second, Skipped) and "missing field 'image'" in second.reason
    assert second.key.endswith("m.jsonl:3")  # line numbers count blank lines
    assert isinstance(third, Example) and third.graph is None  # image-and-caption data
    assert isinstance(fourth, Skipped) and "field 'image' must be a path string, got int" in fourth.reason


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        len(JsonlManifest(tmp_path / "nope.jsonl"))


# --- Visual Genome -------------------------------------------------------------------------------
def test_visual_genome_applies_sg2im_filters(tmp_path):
    root = write_visual_genome(tmp_path)
    vg = VisualGenome(root, min_object_instances=2, min_attribute_instances=2, min_relationship_instances=2,
                      min_object_size=32, min_objects_per_image=2)  # fmt: skip
    assert [vg.key(i) for i in range(len(vg))] == ["vg:1", "vg:2"]  # image 3: all objects below 32 px
    ex = vg[0]
    assert [o.name for o in ex.graph.objects] == ["dog", "frisbee", "tree"]  # "rare thing" is below the count
    assert ex.graph.objects[0].attributes == ("brown",)  # "small" occurs once: below min_attribute_instances
    assert ex.graph.triples == [(0, "catches", 1), (0, "near", 2)]
    assert ex.graph.objects[0].box == pytest.approx((0.05, 0.125, 0.45, 0.625))
    assert ex.image.size == (100, 80)
    missing = vg[1]  # its image file is absent
    assert isinstance(missing, Skipped) and "2.jpg" in missing.reason


def test_visual_genome_predicate_threshold(tmp_path):
    vg = VisualGenome(write_visual_genome(tmp_path), min_object_instances=2, min_attribute_instances=2,
                      min_relationship_instances=4, min_objects_per_image=2)  # fmt: skip
    assert vg[0].graph.relationships == ()  # each predicate occurs 3 times


# --- COCO-Stuff ----------------------------------------------------------------------------------
def test_coco_stuff_filters_captions_and_relations(tmp_path):
    root = write_coco_stuff(tmp_path)
    ann = root / "annotations"
    coco = CocoStuff(ann / "instances_val2017.json", ann / "stuff_val2017.json", root / "val2017",
                     captions_json=ann / "captions_val2017.json", seed=3)  # fmt: skip
    # image 3 has no stuff (stuff_only), image 4 is below 64 px; tiny boxes and "other" are dropped
    assert [coco.key(i) for i in range(len(coco))] == ["coco:1", "coco:2"]
    ex = coco[0]
    assert [o.name for o in ex.graph.objects] == ["person", "dog", "grass"]
    assert ex.caption == "A person and a dog on grass."
    assert coco[1].caption == coco[1].graph.describe()  # no caption for image 2
    assert len(ex.graph.relationships) == 3  # one per object
    again = CocoStuff(ann / "instances_val2017.json", ann / "stuff_val2017.json", root / "val2017", seed=3)
    assert again[0].graph == ex.graph  # seeded per image: repeatable


def test_geometric_predicate_rule():
    left, right = (0.0, 0.4, 0.2, 0.6), (0.8, 0.4, 1.0, 0.6)
    top, bottom = (0.4, 0.0, 0.6, 0.2), (0.4, 0.8, 0.6, 1.0)
    big, small = (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.6, 0.6)
    assert geometric_predicate(left, right) == "left of"
    assert geometric_predicate(right, left) == "right of"
    assert geometric_predicate(top, bottom) == "above"  # image y grows downwards
    assert geometric_predicate(bottom, top) == "below"
    assert geometric_predicate(big, small) == "surrounding"
    assert geometric_predicate(small, big) == "inside"


def test_synthesized_relations_depend_only_on_the_seed():
    boxes = [(0.0, 0.0, 0.3, 0.3), (0.5, 0.5, 0.9, 0.9), (0.1, 0.6, 0.3, 0.9), (0.6, 0.0, 0.9, 0.2)]
    a = synthesize_relationships(boxes, random.Random("0:42"))
    assert a == synthesize_relationships(boxes, random.Random("0:42"))
    assert len(a) == 4 and all(r.subject != r.object for r in a)
    assert synthesize_relationships(boxes[:1], random.Random(0)) == []


# --- LAION-SG ------------------------------------------------------------------------------------
def test_laion_sg_items_relations_and_bad_entry(tmp_path):
    path = write_laion_sg(tmp_path)
    good, bad = rows(LaionSG(path, tmp_path / "images"))
    assert good.caption == "a brown dog on a sofa"
    assert [o.label for o in good.graph.objects] == ["brown dog", "sofa"]
    assert good.graph.triples == [(0, "on", 1)]
    assert isinstance(bad, Skipped) and "relations[0]" in bad.reason and "item2=3" in bad.reason


# --- WebDataset ----------------------------------------------------------------------------------
def test_webdataset_round_trip_and_bad_member(tmp_path):
    examples = [r for r in rows(JsonlManifest(write_manifest(tmp_path / "m", n=5))) if isinstance(r, Example)]
    shards = write_shards(examples, tmp_path / "shards" / "s-%06d.tar", max_count=2)
    assert len(shards) == 3
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shards" / "bad.tar")) as sink:
        sink.write(
            {
                "__key__": "x",
                "png": b"garbage",
                "json": json.dumps({"caption": "c", "scene_graph": {"objects": ["a"]}}).encode(),
            }
        )
        sink.write({"__key__": "y", "png": b"garbage"})
    got = list(WebDatasetShards([*sorted(shards), str(tmp_path / "shards" / "bad.tar")], shuffle_buffer=0))
    good = [r for r in got if isinstance(r, Example)]
    assert sorted(e.caption for e in good) == sorted(e.caption for e in examples)
    assert {g.graph for g in good} == {e.graph for e in examples}
    bad = [r for r in got if isinstance(r, Skipped)]
    assert len(bad) == 2 and any("no .json member" in b.reason for b in bad)


def test_webdataset_splits_shards_across_workers(tmp_path):
    examples = [r for r in rows(JsonlManifest(write_manifest(tmp_path / "m", n=4))) if isinstance(r, Example)]
    shards = write_shards(examples, tmp_path / "s-%06d.tar", max_count=1)
    ds = WebDatasetShards(shards, shuffle_buffer=0)
    ds.transform = lambda ex: ex.key
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = list(loader)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4  # every row once, none twice


# --- preprocessing, batch -----------------------------------------------------------------------
def test_preprocess_ranges_and_shapes(preprocess):
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    row = preprocess(Example("k", img, "a red square", SceneGraph.from_names(["square"])))
    assert row["pixels"].shape == (3, 32, 32)
    assert row["pixels"][0].max() == 1.0 and row["pixels"][1].min() == -1.0  # [-1, 1]
    assert row["clip_pixels"].shape == (3, 24, 24)
    assert row["input_ids"].shape == (77,) and row["input_ids"][0] == 49406


def test_collate_packs_graphs_by_label_and_carries_skips(preprocess):
    g1 = SceneGraph.from_names(["cat", "mat"], [(0, "on", 1)])
    g2 = SceneGraph.from_names(["cat"])
    img = Image.new("RGB", (32, 32))
    batch = collate(
        [
            preprocess(Example("a", img, "x", g1)),
            Skipped("b", "E: bad"),
            preprocess(Example("c", img, "y", g2)),
        ]
    )
    assert batch.keys == ["a", "c"] and batch.batch_size == 2 and batch.skipped == [Skipped("b", "E: bad")]
    assert batch.labels == ["cat", "mat", "on"]
    assert batch.graphs.obj_label.tolist() == [0, 1, 0] and batch.graphs.pred_label.tolist() == [2]
    assert batch.graphs.batch.tolist() == [0, 0, 1]
    moved = batch.to("meta")
    assert moved.pixels.device.type == "meta" and moved.graphs.obj_label.device.type == "meta"
    assert batch.pixels.device.type == "cpu"  # the original is untouched
    empty = collate([Skipped("z", "E")])
    assert empty.batch_size == 0 and empty.pixels is None


def test_skip_log_counts_distinct_rows():
    log = SkipLog()
    log.add([Skipped("a", "E: x"), Skipped("b", "E: x")])
    log.add([Skipped("a", "E: x"), Skipped("c", "F: y")])
    assert log.total == 3 and log.counts["E: x"] == 2
    lines = log.summary().splitlines()
    assert lines[0] == "skipped rows: 3"
    counts = [line.split(maxsplit=1) for line in lines[1:] if not line.strip().startswith("e.g.")]
    assert counts == [["2", "E: x"], ["1", "F: y"]]  # each reason with its count of distinct rows


def test_skip_log_groups_rows_that_failed_the_same_way_and_keeps_each_full_reason():
    log = SkipLog(examples_per_reason=2)
    log.add(
        [
            Skipped("m.jsonl:4", "ValueError: /d/m.jsonl:4: not valid JSON (Expecting value at column 12)"),
            Skipped("m.jsonl:9", "ValueError: /d/m.jsonl:9: not valid JSON (Expecting value at column 3)"),
            Skipped("m.jsonl:11", "OSError: /d/images/a b.png: image file is truncated"),
            Skipped("m.jsonl:12", "UnidentifiedImageError: cannot identify image file '/d/images/x.jpg'"),
            Skipped("m.jsonl:13", "ValueError: /d/m.jsonl:13: not valid JSON (Expecting value at column 1)"),
        ]
    )
    assert log.counts == {
        "ValueError: not valid JSON (Expecting value at column N)": 3,
        "OSError: image file is truncated": 1,
        "UnidentifiedImageError: cannot identify image file FILE": 1,
    }
    text = log.summary()
    assert text.splitlines()[0] == "skipped rows: 5"
    assert "e.g. ValueError: /d/m.jsonl:4: not valid JSON (Expecting value at column 12)" in text
    assert "m.jsonl:13" not in text  # two examples a kind
    assert "e.g. m.jsonl:11: OSError: /d/images/a b.png: image file is truncated" in text
    again = SkipLog()
    again.load_state_dict(log.state_dict())  # what a checkpoint keeps
    again.add([Skipped("m.jsonl:4", "ValueError: repeated"), Skipped("new", "E: z")])
    added = ["         1  E: z", "            e.g. new: E: z"]
    assert again.total == 6 and again.summary().splitlines()[1:] == [*log.summary().splitlines()[1:], *added]


def test_cached_rows_missing_index_is_clear(tmp_path):
    rows = CachedRows(tmp_path)  # a config may name a cache that is written later
    with pytest.raises(FileNotFoundError, match="sg2img cache"):
        len(rows)
