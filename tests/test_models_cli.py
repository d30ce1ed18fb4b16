"""The tiny preset, the diffusers-format folder it writes, and the CLI commands on top."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sg2img.base.components import build_components, save_tiny_model
from sg2img.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (
        build_components("tiny", seed=0),
        build_components("tiny", seed=0),
        build_components("tiny", seed=1),
    )
    wa, wb, wc = (x.unet.conv_in.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_open_clip_backend_builds_the_same_spec():
    comps = build_components("tiny", image_backend="open_clip")
    assert comps.image_encoder.spec == build_components("tiny").image_encoder.spec


def test_folder_has_every_component(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    for part in (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "image_encoder",
        "feature_extractor",
    ):
        assert part in index, part
    assert (tiny_dir / "tokenizer" / "vocab.json").is_file() and (
        tiny_dir / "tokenizer" / "merges.txt"
    ).is_file()
    assert index["scheduler"][1] == "DDIMScheduler"


def test_stock_diffusers_loads_the_folder_and_generates(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    images = [
        pipe(
            "a red circle",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        for _ in range(2)
    ]
    assert images[0].shape == (1, 32, 32, 3)
    assert (images[0] == images[1]).all()  # same seed, same image
    saved = build_components("tiny", seed=0)
    assert torch.equal(pipe.unet.conv_in.weight, saved.unet.conv_in.weight)
    assert pipe.tokenizer("a cat").input_ids == saved.tokenizer("a cat").input_ids


def test_info_sd15_prints_the_reference_parameter_counts(capsys):
    assert main(["info", "--model", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "22,319,616" in out and "49,087,488" in out
    assert "3,150,336" in out and "19,169,280" in out
    assert "graph branch (gnn preset 'sg2im')" in out and "sg_adapter to_k_sg/to_v_sg (16 layers)" in out


def test_info_graph_rows_add_up(capsys):
    assert main(["info", "--model", "tiny", "--gnn", "gatv2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    start = next(i for i, r in enumerate(rows) if r["name"].startswith("graph branch"))
    branch, encoder, *parts, kv = rows[start:]
    assert branch["params"] == encoder["params"] + kv["params"]
    assert encoder["params"] == sum(r["params"] for r in parts)


def test_info_reads_a_model_folder(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    rows = {r["name"]: r["params"] for r in json.loads(capsys.readouterr().out)}
    assert rows["unet"] == sum(p.numel() for p in build_components("tiny").unet.parameters())


def test_info_on_a_missing_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["info", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no model_index.json" in err and "make-tiny" in err and "Traceback" not in err


def test_make_tiny_cli(tmp_path, capfd):
    assert main(["make-tiny", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    out = capfd.readouterr()
    assert out.out.strip() == f"wrote a tiny diffusers-format SD model to {tmp_path / 'm'}"
    assert "Writing model shards" not in out.err and "it/s" not in out.err  # no progress bars of saving


def test_demo_runs_end_to_end(tmp_path):
    from sg2img.shapes.demo import run_demo

    figures = run_demo(tmp_path / "demo")
    assert figures["max |ours - diffusers|"] < 1e-5
    assert figures["max |scale 0 - plain UNet|"] == 0.0
    assert figures["max |scale 1 - plain UNet|"] > 1e-4
    assert (tmp_path / "demo" / "stock-diffusers.png").is_file()
