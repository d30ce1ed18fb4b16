"""``sg2img generate``: outputs, the record, reproducibility, and bad input before any model loads."""

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import sg2img.infer.generate
from sg2img.base.components import EMBEDDED_BASE_FILE, base_file_preset, save_tiny_model
from sg2img.base.single_file import export_single_file
from sg2img.cli import main
from sg2img.shapes.demo import reference_image

SHEEP = "data/examples/sheep.json"  # a list of two graphs


def generate(*args):
    return main(["generate", "--steps", "2", *map(str, args)])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    assert generate("--graph", SHEEP, "--prompt", "a sheep", "--num-images", "2", "--out", out) == 0
    return out


def test_embedded_default_writes_images_sheets_and_the_record(default_run):
    names = sorted(p.name for p in default_run.iterdir())
    assert names == [
        "generate.json",
        "sheep-00-00.png", "sheep-00-01.png", "sheep-00-sheet.png",
        "sheep-01-00.png", "sheep-01-01.png", "sheep-01-sheet.png",
    ]  # fmt: skip
    record = json.loads((default_run / "generate.json").read_text())
    assert record["settings"]["steps"] == 2 and record["settings"]["guidance"] == 7.5
    # without --eta the base's own is used and recorded: the embedded base records eta 1 in its file
    assert record["settings"]["eta"] == base_file_preset(EMBEDDED_BASE_FILE).eta == 1.0
    assert record["model"].startswith("embedded default")
    assert record["adapter"].endswith("shapes-adapter.safetensors") and record["adapter_sha256"]
    assert [i["seed"] for o in record["outputs"] for i in o["images"]] == [0, 1, 2, 3]
    assert record["outputs"][0]["graph"]["objects"]  # the graph itself is kept
    layout = record["outputs"][0]["layout"]  # the embedded adapter places the objects itself
    assert len(layout) == len(record["outputs"][0]["graph"]["objects"])
    assert all(len(o["box"]) == 4 and o["source"] == "predicted" for o in layout)  # sheep.json has no boxes
    assert {"torch", "diffusers", "sg2img"} <= set(record["versions"])
    assert record["scheduler"]["class"] == "DDIMScheduler"
    sheet = Image.open(default_run / "sheep-00-sheet.png")
    image = Image.open(default_run / "sheep-00-00.png")
    assert sheet.width == 4 * 256 and image.size == (32, 32)  # drawing + its layout + 2 images


def test_same_seed_same_images_other_seed_differs(default_run, tmp_path):
    again = tmp_path / "again"
    assert generate("--graph", SHEEP, "--prompt", "a sheep", "--num-images", "2", "--out", again) == 0
    for name in ("sheep-00-00.png", "sheep-01-01.png"):
        assert (again / name).read_bytes() == (default_run / name).read_bytes()
    other = tmp_path / "other"
    assert generate("--graph", SHEEP, "--prompt", "a sheep", "--seed", "7", "--out", other) == 0
    assert (other / "sheep-00-00.png").read_bytes() != (default_run / "sheep-00-00.png").read_bytes()


def test_attention_maps(tmp_path):
    out = tmp_path / "att"
    assert generate("--graph", "data/examples/shapes.json", "--attention-maps", "--out", out) == 0
    pngs = sorted(p.name for p in out.glob("*-attention.png"))
    assert pngs and all((out / p).stat().st_size > 0 for p in pngs)
    stem = pngs[0].rsplit("-", 2)[0]
    with safe_open(out / f"{stem}-attention.safetensors", "pt") as f:
        labels = json.loads(f.metadata()["labels"])["image_00"]
        maps = f.get_tensor("image_00")
    assert maps.shape[0] == len(labels) and labels[0] == "<graph>"


def test_model_folder_single_file_and_adapter(tmp_path):
    base = save_tiny_model(tmp_path / "tiny-sd")
    from diffusers import StableDiffusionPipeline

    from sg2img.base.components import get_preset
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
    from sg2img.model.gnn import gnn_preset

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    config = SGAdapterConfig(
        label_dim=48, image=get_preset("tiny").adapter_config("cls"), gnn=gnn_preset("tiny")
    )
    adapter = SceneGraphAdapter(pipe.unet, config).save(tmp_path / "adapter.safetensors")
    single = export_single_file(pipe, tmp_path / "tiny.safetensors")
    reference_image().save(tmp_path / "ref.png")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--graph", "data/examples/shapes.json", "--image", tmp_path / "ref.png", "--prompt", "shapes"]
    assert generate(*common, "--model", base, "--adapter", adapter, "--out", a) == 0
    assert (
        generate(*common, "--model", single, "--single-file-config", base, "--adapter", adapter, "--out", b)
        == 0
    )
    assert len(list(a.glob("*.png"))) == 2  # image + contact sheet
    for p in a.glob("*.png"):
        assert (b / p.name).read_bytes() == p.read_bytes(), p.name
    assert json.loads((b / "generate.json").read_text())["adapter_sha256"]


def test_invalid_graph_exits_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sg2img.infer.generate, "build_pipeline", no_model)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"objects": ["sheep"], "relationships": [[0, "near", 3]]}))
    out = tmp_path / "out"
    assert generate("--graph", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "relationships[0]" in err and "out of range" in err
    assert not out.exists()
    assert generate("--graph", tmp_path / "missing.json", "--out", out) == 2
    assert "missing.json" in capsys.readouterr().err and not out.exists()
    assert generate("--image", tmp_path / "none.png", "--out", out) == 2
    assert "none.png" in capsys.readouterr().err
    assert generate("--prompt", "a red circle", "--attention-maps", "--out", out) == 2
    assert "--attention-maps needs --graph" in capsys.readouterr().err
    assert generate("--prompt", "a red circle", "--eta", "-0.5", "--out", out) == 2
    assert "--eta must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_says_how_to_provide_one(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate("--model", tmp_path / "nope", "--prompt", "a sheep", "--out", out) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "`sg2img generate` without --model uses it" in err
    assert not out.exists()


def test_a_base_without_adapter_refuses_graphs(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate("--model", "tiny", "--graph", SHEEP, "--out", out) == 2
    assert "--adapter FILE" in capsys.readouterr().err
    assert not out.exists()
    assert generate("--model", "tiny", "--prompt", "a sheep", "--out", out) == 0  # text only works
    assert (out / "prompt-00.png").is_file()


def test_help_texts_show_the_defaults(capsys):
    for command in (["generate"], ["evaluate", "shapes"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "(default: 0)" in " ".join(out.split())  # --seed, wrapped or not
        assert "(default: None)" not in out and "(default: False)" not in out


def test_the_top_level_help_lists_the_training_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "fit-base", "fit-clip", "generate", "evaluate"):
        assert f"    {command} " in out, command


def test_inference_commands_take_a_settings_file_and_print_their_settings(tmp_path, capsys):
    import yaml

    from sg2img.cli import parse_settings

    settings = tmp_path / "gen.yaml"
    settings.write_text(f"graph: {SHEEP}\nprompt: a sheep\nguidance: 3.0\nsteps: 4\n")
    out = tmp_path / "out"
    assert main(["generate", "--config", str(settings), "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "generate.json").read_text())["settings"]
    assert (record["guidance"], record["steps"], record["prompt"]) == (3.0, 2, "a sheep")  # flags after win
    assert record["config"] == [str(settings)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--config", str(settings), "--steps", "2", "--out", str(out), "--print_config"])
    assert e.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert yaml.safe_load(printed.read_text())["steps"] == 2
    again = vars(parse_settings(["generate", "--config", str(printed)]))
    first = vars(parse_settings(["generate", "--config", str(settings), "--steps", "2", "--out", str(out)]))
    assert {k: v for k, v in again.items() if k != "config"} == {
        k: v for k, v in first.items() if k != "config"
    }
    for words, default_steps in ((["evaluate", "shapes"], 25), (["evaluate", "coco"], 50)):
        with pytest.raises(SystemExit):
            main([*words, "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["steps"] == default_steps
    settings.write_text("guidance: 3.0\nimage_scael: 0.5\n")  # a typo: one line, the file, the nearest key
    assert main(["generate", "--config", str(settings), "--out", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"sg2img generate: error: unknown setting image_scael in {settings}; did you mean image_scale?\n"
    )
    assert not (tmp_path / "typo").exists()
    assert main(["evaluate", "shapes", "--stepz", "3"]) == 2
    assert "unknown setting stepz on the command line; did you mean steps?" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == "sg2img generate: error: the following arguments are required: --out\n"


def test_each_command_s_flags_and_its_typed_settings_agree_on_every_default():
    from sg2img.cli import parse_settings, settings_from
    from sg2img.eval.protocols import CocoEvaluation, ShapesEvaluation
    from sg2img.infer.generate import GenerateSettings

    for argv, kind, expected in (
        (["generate", "--out", "x"], GenerateSettings, GenerateSettings(out=Path("x"))),
        (["evaluate", "shapes"], ShapesEvaluation, ShapesEvaluation()),
        (["evaluate", "coco"], CocoEvaluation, CocoEvaluation()),
    ):
        parsed = parse_settings(argv)
        settings = settings_from(parsed, kind)
        assert settings == expected, argv
        # every flag is a field of the settings, and the other way round
        flags = set(vars(parsed)) - {"command", "what"}
        assert flags == {f.name for f in dataclasses.fields(kind)}, argv
