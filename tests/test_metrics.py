"""``sg2img evaluate --samples DIR``: every metric on synthetic folders, with tiny CLIP and Inception models."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from sg2img.cli import main
from sg2img.data.shapes import Shapes
from sg2img.eval import metrics
from sg2img.eval.metrics import (
    Detection,
    MetricError,
    MetricSettings,
    evaluate_folder,
    load_clip,
    sg_geometry,
)
from sg2img.shapes.world import objects_from_graph, render

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_spec(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("open_clip")
    config = root / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(0)
    open_clip.add_model_config(config)
    weights = root / "tiny.pt"
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), weights)
    return f"open_clip:{config}", str(weights)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sg2img.base.tokenizer import clip_tokenizer

    root = tmp_path_factory.mktemp("hf_clip") / "clip"
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(root)
    clip_tokenizer().save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root
    )
    return str(root)


def shapes_folder(root: Path, n: int = 4, shuffle_graphs: bool = False) -> tuple[Path, Path]:
    """Samples = the shapes world's own renderings (so every metric's perfect case is known)."""
    samples, refs = root / "samples", root / "refs"
    samples.mkdir(parents=True)
    refs.mkdir()
    rows = []
    source = Shapes("test", num_rows=n)
    for i in range(n):
        ex = source.example(i)
        ex.image.save(samples / f"s{i}.png")
        ex.image.save(refs / f"r{i}.png")
        graph = source.example((i + 1) % n if shuffle_graphs else i).graph
        rows.append({"file": f"s{i}.png", "prompt": ex.caption, "graph": graph.to_json(), "ref": f"r{i}.png"})
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return samples, refs


def test_clip_t_and_clip_i_with_open_clip_and_transformers(tmp_path, open_clip_spec, hf_clip):
    samples, refs = shapes_folder(tmp_path)
    spec, weights = open_clip_spec
    for clip, pretrained in ((spec, weights), (hf_clip, None), (f"hf:{hf_clip}", None)):
        settings = MetricSettings(clip=clip, clip_pretrained=pretrained)
        s = evaluate_folder(samples, refs, ["clip-t", "clip-i"], settings)["scores"]
        # the samples are their references: CLIP-I is 1 up to float error
        assert s["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= s["clip_t"] <= 1.0
        # CLIP-T is the mean cosine of the model's own embeddings
        model = load_clip(clip, pretrained)
        imgs = [Image.open(samples / f"s{i}.png") for i in range(4)]
        prompts = [
            json.loads(line)["prompt"] for line in (samples / "samples.jsonl").read_text().splitlines()
        ]
        expected = (model.images(imgs) * model.texts(prompts)).sum(-1).mean()
        assert s["clip_t"] == pytest.approx(float(expected), abs=1e-5)


def test_clip_t_of_an_image_made_without_a_text_prompt_reads_its_caption(tmp_path, open_clip_spec):
    """IP-Adapter's CLIP-T for image-prompted generation: against the caption of the image prompt."""
    samples, refs = shapes_folder(tmp_path)
    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    captioned = [{**r, "prompt": "", "caption": r["prompt"]} for r in rows]
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captioned))
    settings = MetricSettings(clip=open_clip_spec[0], clip_pretrained=open_clip_spec[1])
    with_caption = evaluate_folder(samples, refs, ["clip-t"], settings)["scores"]["clip_t"]
    model = load_clip(*open_clip_spec)
    imgs = [Image.open(samples / f"s{i}.png") for i in range(4)]
    for texts, expected in (([r["prompt"] for r in rows], with_caption), ([""] * 4, None)):
        cos = float((model.images(imgs) * model.texts(texts)).sum(-1).mean())
        if expected is not None:
            assert expected == pytest.approx(cos, abs=1e-5)  # the caption, as if it had been the prompt
        else:
            assert with_caption != pytest.approx(cos, abs=1e-4)  # not the empty prompt
    # a prompt, where there is one, still wins over the caption
    (samples / "samples.jsonl").write_text("".join(json.dumps({**r, "caption": "x"}) + "\n" for r in rows))
    assert evaluate_folder(samples, refs, ["clip-t"], settings)["scores"]["clip_t"] == pytest.approx(
        with_caption, abs=1e-5
    )


def test_open_clip_embeddings_match_its_own_preprocessing(open_clip_spec):
    import open_clip

    spec, weights = open_clip_spec
    name = Path(spec.split(":", 1)[1]).stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    img = Shapes("test", num_rows=1).example(0).image.resize((48, 40))
    ours = load_clip(spec, weights).images([img])
    theirs = torch.nn.functional.normalize(model.eval().encode_image(preprocess(img)[None]), dim=-1)
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-4, rtol=1e-4)


def test_clip_i_drops_when_references_are_swapped(tmp_path, open_clip_spec):
    samples, refs = shapes_folder(tmp_path)
    spec, weights = open_clip_spec
    good = evaluate_folder(samples, refs, ["clip-i"], MetricSettings(clip=spec, clip_pretrained=weights))
    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["ref"] = rows[(i + 1) % len(rows)]["file"].replace("s", "r")
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = evaluate_folder(samples, refs, ["clip-i"], MetricSettings(clip=spec, clip_pretrained=weights))
    assert bad["scores"]["clip_i"] < good["scores"]["clip_i"] - 1e-3


FEATURES_MODULE = """
import torch

class PixelFeatures(torch.nn.Module):
    # the mean colour of each quarter of the image (uint8 NCHW in)
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

def pixel_features():
    return PixelFeatures()
"""


def test_fid_with_a_custom_feature_extractor_and_with_clip_features(tmp_path, open_clip_spec, monkeypatch):
    (tmp_path / "my_features.py").write_text(FEATURES_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    samples, refs = shapes_folder(tmp_path, n=6)
    same = evaluate_folder(
        samples,
        refs,
        ["fid"],
        MetricSettings(fid_features="module:my_features:pixel_features", fid_size=32),
    )["scores"]
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["fid_samples"] == 6
    # other images: grey ones
    for p in samples.glob("*.png"):
        Image.new("RGB", (32, 32), (100, 110, 120)).save(p)
    far = evaluate_folder(
        samples,
        refs,
        ["fid"],
        MetricSettings(fid_features="module:my_features:pixel_features", fid_size=32),
    )["scores"]
    # constant samples have no covariance: FID = |mu_refs - mu_samples|^2 + trace(cov_refs)
    from my_features import pixel_features

    from sg2img.eval.metrics import _uint8

    f = pixel_features()(_uint8([Image.open(p) for p in sorted(refs.glob("*.png"))], 32)).double()
    g = pixel_features()(_uint8([Image.new("RGB", (32, 32), (100, 110, 120))], 32)).double()[0]
    expected = float(((f.mean(0) - g) ** 2).sum() + torch.cov(f.T).trace())
    assert far["fid"] == pytest.approx(expected, rel=1e-3)
    spec, weights = open_clip_spec
    clip_fid = evaluate_folder(
        samples, refs, ["fid"], MetricSettings(clip=spec, clip_pretrained=weights, fid_features="clip")
    )["scores"]
    assert clip_fid["fid"] > 0


def random_inception_weights(path: Path) -> Path:
    """Inception-v3 (torch-fidelity's layout) with random weights, saved as a plain state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
        )
    torch.save(model.state_dict(), path)
    return path


def test_fid_on_inception_weights_from_a_local_file(tmp_path):
    samples, refs = shapes_folder(tmp_path, n=3)
    weights = random_inception_weights(tmp_path / "inception.pt")
    s = evaluate_folder(samples, refs, ["fid"], MetricSettings(inception=str(weights), fid_size=75))["scores"]
    assert s["fid"] == pytest.approx(0.0, abs=1e-2)  # the same images on both sides


def test_fid_refuses_a_pickle_that_would_run_code(tmp_path):
    samples, refs = shapes_folder(tmp_path, n=3)
    evil = tmp_path / "inception.pt"

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code')",))

    torch.save({"x": Boom()}, evil)
    with pytest.raises(MetricError, match=r"inception\.pt.*not a plain state dict"):
        evaluate_folder(samples, refs, ["fid"], MetricSettings(inception=str(evil)))


def test_shapes_and_geometry_on_the_worlds_own_images(tmp_path):
    samples, refs = shapes_folder(tmp_path, n=6)
    s = evaluate_folder(samples, refs, ["shapes", "sg-geometry"], MetricSettings())["scores"]
    assert s["object_recall"] == 1.0 and s["relation_accuracy"] == 1.0
    assert s["geometric_accuracy"] == 1.0 and s["detection_recall"] == 1.0 and s["geometric_judged"] == 1.0
    other = tmp_path / "other"
    samples, refs = shapes_folder(other, n=6, shuffle_graphs=True)
    s = evaluate_folder(samples, refs, ["shapes", "sg-geometry"], MetricSettings())["scores"]
    assert s["object_recall"] < 0.5 and s["detection_recall"] < 0.5


def test_the_geometric_rule_on_a_pluggable_detector():
    from sg2img.graph import SceneGraph

    graph = SceneGraph.from_json(
        {
            "objects": ["person", "dog", "sky", "kite"],
            "relationships": [[0, "left of", 1], [2, "above", 0], [3, "inside", 2], [0, "holding", 3]],
        }
    )
    boxes = {
        "person": (0.1, 0.5, 0.3, 0.9),
        "dog": (0.6, 0.6, 0.9, 0.9),
        "sky": (0.0, 0.0, 1.0, 0.4),
        "kite": (0.4, 0.1, 0.5, 0.2),
    }

    def detector(image):
        return [Detection(k, b) for k, b in boxes.items()] + [Detection("person", (0.7, 0, 0.8, 0.1), 0.1)]

    sample = metrics.Sample(Path("x.png"), graph=graph)
    s = sg_geometry(detector, [sample], [Image.new("RGB", (8, 8))])
    # "holding" is not geometric; the three others hold (the low-score person is ignored)
    assert s == {"geometric_accuracy": 1.0, "geometric_judged": 1.0, "detection_recall": 1.0}
    boxes["dog"] = (0.0, 0.6, 0.05, 0.9)  # now the dog is left of the person
    del boxes["kite"]
    s = sg_geometry(detector, [sample], [Image.new("RGB", (8, 8))])
    assert s["geometric_accuracy"] == 0.5 and s["geometric_judged"] == pytest.approx(2 / 3)
    assert s["detection_recall"] == 0.75


def test_a_torchvision_detector_loads_local_weights_and_maps_coco_names(tmp_path):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():  # a classifier that calls every proposal COCO category 1, "person", for sure
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.zero_()
        cls.bias.fill_(-20.0)
        cls.bias[1] = 20.0
    weights = tmp_path / "det.pt"
    torch.save(model.state_dict(), weights)
    det = metrics.load_detector("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", str(weights), 0.5)
    found = det(Image.new("RGB", (64, 48), (200, 30, 30)))
    assert len(found) >= 1  # the checks below run over real detections
    assert all(0 <= v <= 1.0001 for d in found for v in d.box)
    assert {d.label for d in found} == {"person"} and "person" in det.categories
    with pytest.raises(MetricError, match="not weights for fasterrcnn_resnet50_fpn"):
        metrics.load_detector("torchvision:fasterrcnn_resnet50_fpn", str(weights))


def test_sidecar_files_pair_prompts_graphs_and_references(tmp_path):
    samples, refs = tmp_path / "s", tmp_path / "r"
    samples.mkdir()
    refs.mkdir()
    ex = Shapes("test", num_rows=1).example(0)
    ex.image.save(samples / "a.png")
    (samples / "a.txt").write_text(ex.caption + "\n")
    (samples / "a.json").write_text(json.dumps(ex.graph.to_json()))
    ex.image.save(refs / "a.jpg")
    (rows,) = metrics.read_samples(samples, refs)
    assert rows.prompt == ex.caption and rows.ref == refs / "a.jpg"
    assert [o.label for o in rows.graph.objects] == [o.label for o in ex.graph.objects]
    assert render(objects_from_graph(rows.graph)).tobytes() == ex.image.tobytes()


@pytest.mark.parametrize(
    ("manifest", "metric_list", "message"),
    [
        ('{"file": "s0.png"}\n', "clip-t", "clip-t needs a prompt for every sample; 1 have none"),
        ('{"file": "s0.png"}\n', "shapes", "shapes needs a graph"),
        ('{"file": "nope.png"}\n', "shapes", "nope.png is listed but does not exist"),
        ('{"file": "s0.png", "prompt": 3}\n', "shapes", r"samples.jsonl:1: `prompt` must be a string, got 3"),
        (
            '{"file": "s0.png", "caption": [1]}\n',
            "shapes",
            r"samples.jsonl:1: `caption` must be a string, got \[1\]",
        ),
        (
            '{"file": "s0.png", "graph": {"objects": ["sheep"]}}\n',
            "shapes",
            r"shapes cannot score .*s0.png: its graph's objects\[0\] \('sheep'\) is not a shapes-world object",
        ),
        ('{"file": "s0.png"}\n{oops\n', "shapes", r"samples.jsonl:2: not JSON"),
        (
            '{"file": "s0.png", "graph": {"objects": ["a"], "relationships": [[0, "x", 5]]}}\n',
            "shapes",
            r"samples.jsonl:1: graph.relationships\[0\]",
        ),
        ('{"file": "s0.png"}\n', "fid,bogus", r"unknown \['bogus'\]"),
    ],
)
def test_bad_folders_name_the_file_field_and_value(tmp_path, manifest, metric_list, message, capsys):
    samples, _ = shapes_folder(tmp_path, n=1)
    (samples / "samples.jsonl").write_text(manifest)
    flags = ["evaluate", "--samples", str(samples), "--metrics", metric_list, "--clip", "open_clip:none"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "sg2img evaluate: error:" in err
    import re

    assert re.search(message, err), err


def test_bad_model_flags_fail_before_anything_loads(tmp_path, capsys):
    samples, refs = shapes_folder(tmp_path, n=2)
    cases = [
        (["--metrics", "clip-i"], "clip-i needs --clip"),
        (["--metrics", "fid"], "fid needs --refs"),
        (["--metrics", "fid", "--refs", str(refs)], "needs --inception FILE"),
        (
            ["--metrics", "fid", "--refs", str(refs), "--inception", "nope.pt"],
            "--inception nope.pt: no such file",
        ),
        (["--metrics", "clip-t", "--clip", "open_clip:no-such-model"], "unknown model"),
        (["--metrics", "clip-t", "--clip", str(tmp_path / "none")], "give open_clip:NAME, hf:PATH_OR_ID"),
        (["--metrics", "sg-geometry", "--detector", "yolo"], "--detector yolo: expected shapes"),
        (["--metrics", "sg-geometry", "--detector", "module:nowhere:f"], "No module named 'nowhere'"),
    ]
    for flags, message in cases:
        assert main(["evaluate", "--samples", str(samples), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_the_cli_writes_the_record(tmp_path, capsys):
    samples, refs = shapes_folder(tmp_path, n=2)
    out = tmp_path / "scores" / "s.json"
    flags = [
        "--samples",
        str(samples),
        "--refs",
        str(refs),
        "--metrics",
        "shapes,sg-geometry",
        "--out",
        str(out),
    ]
    assert main(["evaluate", *flags]) == 0
    assert "relation_accuracy 1.000" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["scores"]["images"] == 2 and record["metrics"] == ["shapes", "sg-geometry"]


# --- IP-Adapter's COCO protocol -------------------------------------------------------------------------
def fake_coco(root: Path) -> tuple[Path, Path]:
    images = root / "val2017"
    images.mkdir(parents=True)
    source = Shapes("test", num_rows=3)
    for i in range(3):
        source.example(i).image.resize((64, 64)).save(images / f"{i + 1:012d}.jpg")
    captions = {
        "images": [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg"} for i in (2, 0, 1)],
        "annotations": [
            {"id": 20, "image_id": 1, "caption": "a later caption"},
            {"id": 10, "image_id": 1, "caption": " the first caption "},
            {"id": 30, "image_id": 2, "caption": "shapes on grey"},
        ],  # image 3 has no caption: it is left out
    }
    path = root / "captions_val2017.json"
    path.write_text(json.dumps(captions))
    return images, path


def test_coco_protocol_generates_from_image_prompts_and_scores_clip_t_and_clip_i(tmp_path, open_clip_spec):
    from sg2img.base.components import build_components, get_preset
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig

    images, captions = fake_coco(tmp_path / "coco")
    unet = build_components("tiny", seed=0).unet
    config = SGAdapterConfig(graph_branch=False, image=get_preset("tiny").adapter_config("cls"))
    adapter = SceneGraphAdapter(unet, config).save(tmp_path / "ip-adapter.safetensors")
    spec, weights = open_clip_spec
    protocol = tmp_path / "protocol.yaml"
    settings = {
        "images": images, "captions": captions, "model": "tiny", "adapter": adapter, "clip": spec,
        "clip_pretrained": weights, "num_images": 2, "steps": 50, "out": tmp_path / "out",
    }  # fmt: skip
    protocol.write_text("\n".join(f"{k}: {v}" for k, v in settings.items()))
    assert main(["evaluate", "coco", "--config", str(protocol), "--steps", "2", "--batch-size", "3"]) == 0
    record = json.loads((tmp_path / "out" / "coco-eval.json").read_text())
    assert record["settings"]["steps"] == 2  # the flag overrides the protocol file
    assert record["image_prompt_used"] and record["scores"]["images"] == 4
    assert record["paper"]["ip_adapter_sd15"] == {"clip_t": 0.588, "clip_i": 0.828}
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "samples" / "samples.jsonl").read_text().splitlines()
    ]
    assert [(r["ref"], r["prompt"]) for r in rows] == [
        ("000000000001.jpg", "the first caption"),
        ("000000000001.jpg", "the first caption"),
        ("000000000002.jpg", "shapes on grey"),
        ("000000000002.jpg", "shapes on grey"),
    ]
    # the record's scores are those of the folder metrics on the written samples
    again = evaluate_folder(
        tmp_path / "out" / "samples",
        images,
        ["clip-t", "clip-i"],
        MetricSettings(clip=spec, clip_pretrained=weights),
    )
    assert again["scores"] == record["scores"]


def test_the_shipped_protocol_file_reads_and_bad_ones_are_refused(tmp_path, capsys):
    from sg2img.cli import parse_settings

    protocol = Path(__file__).parent.parent / "configs" / "eval" / "ip_adapter_coco2017.yaml"
    args = parse_settings(["evaluate", "coco", "--config", str(protocol), "--n", "3"])  # flags after it win
    assert (args.steps, args.guidance, args.num_images, args.prompt, args.n) == (50, 7.5, 4, "empty", 3)
    assert args.images == Path("data/coco/val2017") and args.config == [str(protocol)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: x\nstepz: 3\n")
    assert main(["evaluate", "coco", "--config", str(bad)]) == 2
    assert f"unknown setting stepz in {bad}; did you mean steps?" in capsys.readouterr().err
    images, captions = fake_coco(tmp_path / "coco")
    (images / "000000000002.jpg").unlink()
    common = ["--images", str(images), "--model", "tiny", "--adapter", "none", "--clip", "open_clip:x"]
    assert main(["evaluate", "coco", *common, "--captions", str(captions)]) == 2
    assert "000000000002.jpg (listed in" in capsys.readouterr().err
    captions.write_text('{"images": [], "annotations": [{"id": 1}]}')
    assert main(["evaluate", "coco", *common, "--captions", str(captions)]) == 2
    assert "annotations[0] needs image_id, id and caption" in capsys.readouterr().err


def test_the_shipped_tiny_clip_is_recorded_by_name_and_a_file_by_its_path(tmp_path):
    from sg2img.shapes.tiny_clip import EMBEDDED_CLIP, tiny_clip_path

    assert metrics.load_clip("shapes").name == "tiny-clip:shapes"  # no path of this machine in a record
    copy = tmp_path / "clip.safetensors"
    copy.write_bytes(tiny_clip_path(EMBEDDED_CLIP).read_bytes())
    assert metrics.load_clip(str(copy)).name == f"tiny-clip:{copy}"
