"""``sg2img evaluate shapes``: generation from the shapes world's graphs, scored by the evaluator."""

import json

import pytest

from sg2img.cli import main


def evaluate(*args):
    return main(["evaluate", "shapes", "--steps", "2", *map(str, args)])


def test_scores_the_embedded_model_on_test_rows_and_writes_the_record(tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate("--n", "3", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "object_recall" in printed and "relation_accuracy" in printed
    record = json.loads((out / "shapes-eval.json").read_text())
    assert record["scores"]["images"] == 3 and record["graph_branch_used"]
    assert record["adapter"].endswith("shapes-adapter.safetensors")
    assert [r["name"] for r in record["images"]] == ["test-00000", "test-00001", "test-00002"]
    assert all(
        0 <= record["scores"][k] <= 1 for k in ("object_recall", "relation_accuracy", "graph_accuracy")
    )
    assert (out / "test-00000.png").is_file() and (out / "test-00000-sheet.png").is_file()
    again = tmp_path / "again"
    assert evaluate("--n", "3", "--out", again) == 0
    assert (again / "test-00002.png").read_bytes() == (out / "test-00002.png").read_bytes()


def test_the_base_alone_reads_the_caption_only(tmp_path):
    out = tmp_path / "base"
    assert evaluate("--n", "2", "--adapter", "none", "--prompt", "relations", "--out", out) == 0
    record = json.loads((out / "shapes-eval.json").read_text())
    assert record["adapter"] is None and not record["graph_branch_used"]
    prompt = record["images"][0]["prompt"]
    assert any(f" {w} " in prompt for w in ("left of", "right of", "above", "below")), prompt


def test_graph_files_and_several_images_per_graph(tmp_path):
    out = tmp_path / "files"
    assert evaluate("--graphs", "data/examples/shapes-world.json", "--num-images", "2", "--out", out) == 0
    record = json.loads((out / "shapes-eval.json").read_text())
    assert record["scores"]["images"] == 8
    assert record["images"][1]["name"] == "shapes-world-00-01"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--n", "0"], "--n must be at least 1"), (["--num-images", "0"], "--num-images must be at least 1")],
)
def test_bad_settings_exit_2_before_any_model_loads(flags, message, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("sg2img.generate.build_pipeline", no_model)
    assert evaluate(*flags) == 2
    assert message in capsys.readouterr().err
