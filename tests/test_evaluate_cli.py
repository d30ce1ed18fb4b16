"""``sg2img evaluate shapes``: generation from the shapes world's graphs, scored by the evaluator."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sg2img.base.components import EMBEDDED_BASE_FILE, base_file_preset
from sg2img.cli import main

EMBEDDED_PRESET = base_file_preset(EMBEDDED_BASE_FILE)


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
    # the sheet: the graph's reference rendering, its drawing, the predicted layout, the image
    assert Image.open(out / "test-00000-sheet.png").width == 256 * 4
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


def test_eta_adds_noise_per_step_and_is_recorded(tmp_path):
    runs = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        assert evaluate("--n", "1", "--adapter", "none", "--eta", eta, "--out", out) == 0
        runs[eta] = (
            (out / "test-00000.png").read_bytes(),
            json.loads((out / "shapes-eval.json").read_text()),
        )
    assert runs["0"][1]["settings"]["eta"] == 0.0 and runs["1"][1]["settings"]["eta"] == 1.0
    assert runs["0"][1]["settings"]["guidance_interval"] is None
    assert runs["0"][0] != runs["1"][0]  # the same seed, another image: eta reaches the sampler
    default = tmp_path / "default"
    assert evaluate("--n", "1", "--adapter", "none", "--out", default) == 0
    record = json.loads((default / "shapes-eval.json").read_text())
    own = float(EMBEDDED_PRESET.eta)  # without --eta the base's own eta is used, and recorded as a number
    assert record["settings"]["eta"] == own
    assert (default / "test-00000.png").read_bytes() == runs[f"{own:g}"][0]


def drawn_with(tmp_path, flag: str, on: bool) -> list[torch.Tensor]:
    """The first two test images drawn with or without a switch, which the record's settings hold."""
    out = tmp_path / (flag.strip("-") if on else "default")
    assert evaluate("--n", "2", *([flag] if on else []), "--out", out) == 0
    setting = flag.strip("-").replace("-", "_")
    assert json.loads((out / "shapes-eval.json").read_text())["settings"][setting] == on
    return [
        torch.from_numpy(np.asarray(Image.open(out / f"test-0000{i}.png"), dtype=np.int16)) for i in (0, 1)
    ]


def test_channels_last_lays_out_the_unet_in_nhwc_draws_the_same_images_and_is_recorded(tmp_path):
    from sg2img.eval.protocols import ShapesEvaluation
    from sg2img.infer.generate import build_pipeline

    pipe, _ = build_pipeline(ShapesEvaluation(channels_last=True), torch.device("cpu"), torch.float32)
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    drawn = {on: drawn_with(tmp_path, "--channels-last", on) for on in (False, True)}
    for nchw, nhwc in zip(drawn[False], drawn[True]):  # the same function: only the order of sums changes
        assert (nchw - nhwc).abs().max() <= 2


def test_compile_wraps_the_unets_forward_and_is_recorded(tmp_path):
    from sg2img.eval.protocols import ShapesEvaluation
    from sg2img.infer.generate import build_pipeline

    pipe, _ = build_pipeline(ShapesEvaluation(compile=True), torch.device("cpu"), torch.float32)
    assert getattr(pipe.unet.forward, "_torchdynamo_orig_callable", None) is not None
    eager, _ = build_pipeline(ShapesEvaluation(), torch.device("cpu"), torch.float32)
    assert getattr(eager.unet.forward, "_torchdynamo_orig_callable", None) is None


@pytest.mark.slow
def test_a_compiled_unet_traces_the_adapter_whole_and_draws_the_eager_images(tmp_path):
    """The adapter's processors (K/V cache, confinement masks) trace into one graph, and the compiled
    model draws what the eager one does but for rounding."""
    from sg2img.eval.protocols import ShapesEvaluation, shapes_rows
    from sg2img.infer.generate import build_pipeline

    pipe, _ = build_pipeline(ShapesEvaluation(), torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = torch.compile(pipe.unet.forward, fullgraph=True)  # a graph break raises
    graphs, _ = shapes_rows(ShapesEvaluation(n=1))
    out = pipe(prompt=["x"], scene_graph=[graphs[0].without_boxes()], num_inference_steps=2, output_type="np")
    assert out.images.shape[0] == 1
    drawn = {on: drawn_with(tmp_path, "--compile", on) for on in (False, True)}
    for eager, compiled in zip(drawn[False], drawn[True]):
        assert (eager - compiled).abs().max() <= 2


def test_graph_files_and_several_images_per_graph(tmp_path):
    out = tmp_path / "files"
    assert evaluate("--graphs", "data/examples/shapes-world.json", "--num-images", "2", "--out", out) == 0
    record = json.loads((out / "shapes-eval.json").read_text())
    assert record["scores"]["images"] == 8
    assert record["images"][1]["name"] == "shapes-world-00-01"
    # one sheet per graph: the graph, the layout used, then its 2 images (no boxes: no reference rendering)
    sheets = sorted(p.name for p in out.glob("*-sheet.png"))
    assert sheets == [f"shapes-world-{i:02d}-sheet.png" for i in range(4)]
    assert Image.open(out / sheets[0]).width == 256 * (2 + 2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--n", "0"], "--n must be at least 1"), (["--num-images", "0"], "--num-images must be at least 1"),
     (["--eta", "1.5"], "--eta must be in [0, 1]"),
     (["--guidance-interval", "[800, 200]"], "--guidance-interval must be [LO, HI] timesteps")],
)  # fmt: skip
def test_bad_settings_exit_2_before_any_model_loads(flags, message, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("sg2img.infer.generate.build_pipeline", no_model)
    assert evaluate(*flags) == 2
    assert message in capsys.readouterr().err


def test_samples_folder_scores_the_same_through_evaluate_samples(tmp_path):
    out = tmp_path / "eval"
    assert evaluate("--n", "3", "--num-images", "2", "--save-images", "--out", out) == 0
    record = json.loads((out / "shapes-eval.json").read_text())
    assert not record["image_prompt_used"]  # the embedded adapter has no image branch
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows][:3] == ["test-00000-00.png", "test-00000-01.png", "test-00001-00.png"]
    assert rows[1]["ref"] == "test-00000.png" and sorted(p.name for p in (out / "refs").iterdir()) == [
        "test-00000.png",
        "test-00001.png",
        "test-00002.png",
    ]
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--samples", str(out), "--refs", str(out / "refs"), "--metrics", "shapes",
                 "--out", str(scores)]) == 0  # fmt: skip
    assert json.loads(scores.read_text())["scores"] == record["scores"]


def test_an_image_branch_adapter_gets_the_graphs_rendering_as_image_prompt(tmp_path, capsys):
    from sg2img.base.components import base_file_preset
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
    from sg2img.model.gnn import gnn_preset
    from sg2img.shapes.embedded import EMBEDDED_BASE_FILE, embedded_base

    parts = embedded_base()
    config = SGAdapterConfig(
        label_dim=parts.text_encoder.config.hidden_size,
        image=base_file_preset(EMBEDDED_BASE_FILE).adapter_config("cls"),  # the shipped base's image tower
        gnn=gnn_preset("tiny"),
    )
    torch.manual_seed(0)
    adapter = SceneGraphAdapter(parts.unet, config)
    with torch.no_grad():  # a visible image branch, so the image prompt changes the result
        for name, p in adapter.named_parameters():
            if "image_proj" in name:
                p.normal_(0, 1)
    path = adapter.save(tmp_path / "image-graph.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    assert evaluate("--n", "2", "--adapter", path, "--save-images", "--out", a) == 0
    assert evaluate("--n", "2", "--adapter", path, "--image-prompt", "none", "--save-images", "--out", b) == 0
    assert json.loads((a / "shapes-eval.json").read_text())["image_prompt_used"]
    assert not json.loads((b / "shapes-eval.json").read_text())["image_prompt_used"]
    assert (a / "test-00000.png").read_bytes() != (b / "test-00000.png").read_bytes()
    capsys.readouterr()
    assert evaluate("--n", "1", "--image-prompt", "reference") == 2  # the embedded adapter reads no images
    assert "--image-prompt reference needs an adapter with an image branch" in capsys.readouterr().err


def test_the_layout_is_predicted_without_boxes_given_with_them_and_recorded(tmp_path):
    from sg2img.data import Shapes
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
    from sg2img.model.gnn import GNNConfig, TokenConfig
    from sg2img.shapes.embedded import embedded_base

    parts = embedded_base()
    config = SGAdapterConfig(
        label_dim=parts.text_encoder.config.hidden_size,
        image_branch=False,
        gnn=GNNConfig("triplet", num_layers=1, hidden_dim=16, mlp_dim=32, use_boxes=False, layout_head=True),
        tokens=TokenConfig(confine_objects=True),
    )
    torch.manual_seed(0)
    path = SceneGraphAdapter(parts.unet, config).save(tmp_path / "layout.safetensors")
    graph = Shapes("test", num_rows=1).example(0).graph  # a shapes-world graph with its boxes
    graphs = tmp_path / "boxed.json"
    graphs.write_text(json.dumps([graph.to_json()]))
    truth = [list(o.box) for o in graph.objects]
    n = len(truth)
    for boxes in ("none", "given"):
        out = tmp_path / boxes
        assert evaluate("--graphs", graphs, "--adapter", path, "--boxes", boxes, "--out", out) == 0
        row = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
        assert [o["source"] for o in row["layout"]] == ["predicted" if boxes == "none" else "given"] * n
        if boxes == "given":
            torch.testing.assert_close(
                torch.tensor([o["box"] for o in row["layout"]]), torch.tensor(truth), atol=1e-4, rtol=0
            )
        assert json.loads((out / "shapes-eval.json").read_text())["settings"]["boxes"] == boxes
    out = tmp_path / "generate"
    flags = ["--graph", str(graphs), "--adapter", str(path), "--steps", "2", "--out", str(out)]
    assert main(["generate", *flags]) == 0
    layout = json.loads((out / "generate.json").read_text())["outputs"][0]["layout"]
    assert [o["source"] for o in layout] == ["given"] * n
