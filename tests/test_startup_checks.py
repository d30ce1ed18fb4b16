"""Settings that cannot work together stop the run at start-up with one message, before any step."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from datafiles import tiny_fit_args, write_manifest
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from sg2img.base.components import TINY_TEXT, TINY_UNET, get_preset, save_tiny_model
from sg2img.cli import main
from sg2img.data import JsonlManifest, SG2ImgDataModule
from sg2img.data.datamodule import check_source
from sg2img.errors import ConfigurationError
from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
from sg2img.model.gnn import GNNConfig
from sg2img.shapes.embedded import embedded_base
from sg2img.train.adapter_module import SG2ImgModule
from sg2img.train.settings import BaseSettings, GraphBranchSettings, ImageBranchSettings

SMALL_GNN = GNNConfig(layer="triplet", num_layers=1, hidden_dim=16, mlp_dim=32)


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def graphless_manifest(root: Path, with_graph_every: int = 0) -> Path:
    """``write_manifest``'s rows with their scene graphs taken out (all, or all but every k-th)."""
    path = write_manifest(root, n=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        if not with_graph_every or i % with_graph_every:
            del row["scene_graph"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(tmp_path: Path, manifest: Path, *extra: str) -> list[str]:
    args = tiny_fit_args(tmp_path / "run.yaml", manifest, batch_size=3, max_steps=2)
    return [*args, "--trainer.default_root_dir", str(tmp_path / "run"), *extra]


def test_graph_branch_on_data_without_graphs_stops_at_start_up(tmp_path, capsys):
    manifest = graphless_manifest(tmp_path / "d")
    assert main(fit(tmp_path, manifest)) == 2
    err = capsys.readouterr().err
    assert "sg2img fit: error: model.graph.enabled is on, but data.train has no scene graphs" in err
    assert "none of the first 6 readable rows of JsonlManifest(" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()  # not one step ran


def test_image_and_caption_data_trains_an_adapter_without_the_graph_branch(tmp_path):
    manifest = graphless_manifest(tmp_path / "d")
    assert main(fit(tmp_path, manifest, "--model.graph.enabled", "false")) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2


def test_rows_without_a_graph_are_skipped_and_counted_when_some_have_one(tmp_path, caplog):
    manifest = graphless_manifest(tmp_path / "d", with_graph_every=2)  # rows 0, 2, 4 keep theirs
    assert main(fit(tmp_path, manifest)) == 0
    assert "skipped rows: 3" in caplog.text
    assert "no scene graph, and the model's graph branch is on" in caplog.text


def test_no_readable_row_stops_at_start_up(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "d", n=4)
    shutil.rmtree(tmp_path / "d" / "images")  # e.g. a wrong image_root
    assert main(fit(tmp_path, manifest)) == 2
    err = capsys.readouterr().err
    assert "none of the first 4 rows of JsonlManifest(" in err and "can be read" in err
    assert "FileNotFoundError" in err and "000.png" in err  # the summary names the files


def tiny_folder(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "base")


def test_a_text_encoder_of_another_width_than_the_unet_is_one_message(tmp_path):
    base = tiny_folder(tmp_path)
    narrow = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "hidden_size": 32, "projection_dim": 32}))
    shutil.rmtree(base / "text_encoder")
    narrow.save_pretrained(base / "text_encoder")
    with pytest.raises(ConfigurationError) as e:
        SG2ImgModule(base=BaseSettings(str(base)), graph=GraphBranchSettings(gnn=SMALL_GNN)).configure_model()
    assert "token widths do not match" in str(e.value)
    assert "text encoder makes 32-wide tokens, but its UNet's cross-attention takes 48" in str(e.value)


def test_an_init_adapter_for_another_unet_width_is_one_message_naming_the_file(tmp_path):
    # an adapter file made for a UNet whose cross-attention takes 64
    other = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 64})
    image = get_preset("tiny").adapter_config("cls")
    image = type(image).from_dict({**json.loads(image.to_json()), "cross_attention_dim": 64})
    wide = SceneGraphAdapter(other, SGAdapterConfig(label_dim=48, image=image, graph_branch=False))
    wide.save(tmp_path / "wide.safetensors")
    with pytest.raises(ConfigurationError) as e:
        SG2ImgModule(
            init_adapter=str(tmp_path / "wide.safetensors"), graph=GraphBranchSettings(gnn=SMALL_GNN)
        ).configure_model()
    msg = str(e.value)
    assert (
        f"the image branch (model.init_adapter {tmp_path / 'wide.safetensors'}) makes 64-wide tokens" in msg
    )
    assert "the UNet's cross-attention takes 48" in msg


def test_an_image_encoder_narrower_than_the_init_adapter_expects_is_one_message(tmp_path):
    m = SG2ImgModule(graph=GraphBranchSettings(enabled=False, gnn=SMALL_GNN))
    m.configure_model()
    m.model.adapter.save(tmp_path / "adapter.safetensors")
    tower = get_preset("tiny").image_encoder
    vision = CLIPVisionConfig(
        hidden_size=tower.hidden_size, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=tower.image_size, patch_size=tower.patch_size, projection_dim=32,
    )  # fmt: skip
    CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "vision")
    with pytest.raises(ConfigurationError) as e:
        SG2ImgModule(
            base=BaseSettings(image_encoder=str(tmp_path / "vision")),
            init_adapter=str(tmp_path / "adapter.safetensors"),
            graph=GraphBranchSettings(enabled=False, gnn=SMALL_GNN),
        ).configure_model()
    expected = f"takes {tower.projection_dim}-wide image embeddings, but {tmp_path / 'vision'} gives 32"
    assert expected in str(e.value)


def test_an_image_branch_without_an_image_encoder_is_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # IP-Adapter's default encoder cannot be fetched
    base = tiny_folder(tmp_path)  # made like SD1.5's folder, which has no image encoder
    shutil.rmtree(base / "image_encoder")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "image_encoder": [None, None]}))
    manifest = write_manifest(tmp_path / "d", n=3)
    assert main(fit(tmp_path, manifest, "--model.base.source", str(base))) == 2
    err = capsys.readouterr().err
    assert "sg2img fit: error: model.image.enabled is on, but no image encoder is configured" in err
    assert f"the base {base} has no image_encoder/ folder" in err and "model.base.image_encoder" in err
    assert "Traceback" not in err
    # a graph-only adapter needs no image encoder: the same base trains it
    m = SG2ImgModule(
        base=BaseSettings(str(base)),
        image=ImageBranchSettings(enabled=False),
        graph=GraphBranchSettings(gnn=SMALL_GNN),
    )
    m.configure_model()
    assert m.model.image_encoder is None and "ip" not in m.model.adapter.branches


class _CachedRows(torch.utils.data.Dataset):
    def __init__(self, **widths: int):
        self.widths = widths

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        from sg2img.graph import SceneGraph

        row = {"key": str(i), "caption": "", "graph": SceneGraph.from_names(["a"], [])}
        return {**row, **{k: torch.zeros(3, w) for k, w in self.widths.items()}}


def test_a_cache_made_with_other_encoders_is_refused_at_start_up():
    need = {"graphs": True, "widths": {"text_embeds": 48, "image_embeds": 48, "patch_tokens": 40}}
    with pytest.raises(
        ConfigurationError, match="holds 32-wide text_embeds, but this model's encoders give 48"
    ):
        check_source(_CachedRows(text_embeds=32, image_embeds=48, patch_tokens=40), need)
    with pytest.raises(ConfigurationError, match="holds no patch tokens"):
        check_source(_CachedRows(text_embeds=48, image_embeds=48), need)
    check_source(_CachedRows(text_embeds=48, image_embeds=48, patch_tokens=40), need)  # fits


def test_the_model_hands_its_requirements_to_the_data_module(tmp_path):
    import lightning as L

    manifest = graphless_manifest(tmp_path / "d")
    dm = SG2ImgDataModule(train=JsonlManifest(manifest))
    assert dm.requirements() == {}  # no model yet: nothing to check against
    module = SG2ImgModule(
        image=ImageBranchSettings(tokens="patch"),
        graph=GraphBranchSettings(gnn=GNNConfig("triplet", 1, 16, 32)),
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    module.trainer, trainer.datamodule = trainer, dm  # what fit does before it sets up the data
    module.setup("fit")  # Lightning's hook, after the data module's own setup and before any loader
    need = dm.requirements()
    tiny = get_preset("tiny")
    assert need == module.data_requirements()
    assert need["resolution"] == tiny.vae["sample_size"]
    assert need["clip_size"] == tiny.image_encoder.image_size and need["graphs"] is True
    assert need["widths"]["patch_tokens"] == tiny.image_encoder.hidden_size
    preprocess = dm.preprocess()  # and builds its preprocessing from them, with the base's own tokenizer
    assert (preprocess.resolution, preprocess.clip_size) == (need["resolution"], need["clip_size"])
    assert preprocess.tokenizer is module.model.tokenizer


def test_graphless_webdataset_shards_are_refused_for_a_graph_branch(tmp_path):
    from sg2img.base.tokenizer import clip_tokenizer
    from sg2img.data import Preprocess, WebDatasetShards, write_shards

    examples = [JsonlManifest(graphless_manifest(tmp_path / "d"))[i] for i in range(6)]
    assert all(e.graph is None for e in examples)
    shards = write_shards(examples, tmp_path / "shards" / "s-%06d.tar", max_count=3)
    stream = WebDatasetShards(shards, shuffle_buffer=0)
    stream.transform = Preprocess(32, 24, clip_tokenizer())
    with pytest.raises(ConfigurationError, match="none of the first 6 readable rows of WebDatasetShards"):
        check_source(stream, {"graphs": True})
    check_source(stream, {"graphs": False})  # an image-only adapter trains on them


ROOT = Path(__file__).resolve().parents[1]
FIT_MISTAKES = {  # name -> (extra arguments, the one-line message's expected text)
    "no data config": ([], "no training data: data.train is not set; compose a data config"),
    "manifest not there": (
        ["--data.train", "sg2img.data.JsonlManifest", "--data.train.manifest", "/nonexistent/train.jsonl"],
        "data.train: JsonlManifest(/nonexistent/train.jsonl): /nonexistent/train.jsonl: no such manifest",
    ),
    "base not there": (
        ["--config", "configs/data/shapes.yaml", "--model.base.source", "/nonexistent/model"],
        "model.base.source: /nonexistent/model: no such model folder or file.",
    ),
    "batch size 0": (["--config", "configs/data/shapes.yaml", "--data.batch_size", "0"],
                     "data.batch_size must be at least 1, got 0"),
    "max_steps -5": (["--config", "configs/data/shapes.yaml", "--trainer.max_steps", "-5"],
                     "trainer.max_steps must be -1 (no limit) or at least 0, got -5"),
    "a typo in a config file": (["--config", "{typo}"],
                                "unknown setting model.optimiser.lr in {typo}; did you mean model.optimizer.lr?"),
    "a typo on the command line": (["--trainer.max_stpes", "3"],
                                   "unknown setting trainer.max_stpes on the command line; did you mean trainer.max_steps?"),
    "a config of the flat layout": (["--config", "{flat}"], "model.image_tokens is now model.image.tokens"),
    "a flat base": (["--model.base", "embedded"], "model.base is now model.base.source"),
    "a flat gnn setting": (["--model.gnn.layer", "gine"], "model.gnn.layer is now model.graph.gnn.layer"),
    "a value not allowed": (["--model.graph.gnn.layer", "gcn"],
                            "model.graph.gnn.layer: expected one of 'triplet', 'gine', 'transformer', 'gatv2'; got gcn"),
    "a value out of range": (["--model.graph.layout_loss_weight=-1"],
                             "model.graph.layout_loss_weight must be >= 0, got -1.0"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", FIT_MISTAKES)
def test_a_fit_mistake_ends_in_one_line_exit_2_and_nothing_written(mistake, tmp_path):
    import subprocess
    import sys

    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  optimiser:\n    lr: 0.1\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("model:\n  image_tokens: patch\n")
    extra, message = FIT_MISTAKES[mistake]
    extra, message = [a.format(typo=typo, flat=flat) for a in extra], message.format(typo=typo, flat=flat)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sg2img", "fit", "--config", "configs/base.yaml", "--config",
           "configs/model/tiny.yaml", *extra, "--trainer.default_root_dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sg2img fit: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "usage:" not in proc.stderr
    assert not run_dir.exists()  # no config.yaml, no W&B run, no adapter


SHIPPED_ADAPTER = "sg2img/assets/shapes-adapter.safetensors"
# the shipped base's cross-attention layers, which the shipped adapter has one key projection each for
SHIPPED_LAYERS = sum(n.endswith("attn2") for n, _ in embedded_base().unet.named_modules())
INFERENCE_MISTAKES = {  # name -> (command, the one-line message's expected text)
    "evaluate on graphs outside the shapes world": (
        ["evaluate", "shapes", "--graphs", "data/examples/sheep.json", "--out", "{out}"],
        "sg2img evaluate: error: data/examples/sheep.json: graph [0]: objects[0] ('sky') is not a shapes-world object",
    ),
    "evaluate --out an existing file": (
        ["evaluate", "shapes", "--n", "1", "--out", "{file}"], "--out {file}: is a file, not a folder",
    ),
    "evaluate --graphs a folder": (["evaluate", "shapes", "--graphs", "data", "--out", "{out}"], "--graphs data: is a folder"),
    "generate --device cuda without a GPU": (
        ["generate", "--graph", "data/examples/shapes.json", "--device", "cuda", "--out", "{out}"],
        "--device cuda: no CUDA GPU is visible to torch here",
    ),
    "generate --device gpu": (
        ["generate", "--graph", "data/examples/shapes.json", "--device", "gpu", "--out", "{out}"],
        "--device gpu: not a device; use auto, cpu, cuda, cuda:N or mps",
    ),
    "generate too large": (
        ["generate", "--graph", "data/examples/shapes.json", "--height", "100000", "--out", "{out}"],
        "--height 100000 is over 2048, the largest side this command draws",
    ),
    "generate --out an existing file": (
        ["generate", "--graph", "data/examples/shapes.json", "--out", "{file}"], "--out {file}: is a file, not a folder",
    ),
    "generate --adapter none alone": (
        ["generate", "--adapter", "none", "--out", "{out}"], "nothing to draw from: give --prompt TEXT, --graph FILE",
    ),
    "generate --graph a folder": (["generate", "--graph", "data", "--out", "{out}"], "--graph data: is a folder"),
    "generate with an adapter of another base": (
        ["generate", "--model", "tiny", "--adapter", SHIPPED_ADAPTER, "--graph", "data/examples/shapes.json", "--out", "{out}"],
        f"--adapter {SHIPPED_ADAPTER} does not fit --model tiny: the adapter was trained on a base with {SHIPPED_LAYERS} cross-attention layers",
    ),
    "generate --image with a graph-only adapter": (
        ["generate", "--graph", "data/examples/shapes.json", "--image", "{image}", "--out", "{out}"],
        "--image needs an adapter with an image branch, and --adapter embedded has none",
    ),
    "check-graph on an empty list": (["check-graph", "{empty}"], "{empty}: the file holds an empty list of graphs"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", INFERENCE_MISTAKES)
def test_an_inference_mistake_ends_in_one_line_exit_2_and_nothing_written(mistake, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    paths = {"out": tmp_path / "out", "file": tmp_path / "a-file", "empty": tmp_path / "empty.json",
             "image": tmp_path / "prompt.png"}  # fmt: skip
    paths["file"].write_text("keep me\n")
    paths["empty"].write_text("[]\n")
    Image.new("RGB", (32, 32), "red").save(paths["image"])
    args, message = INFERENCE_MISTAKES[mistake]
    args, message = [a.format(**paths) for a in args], message.format(**paths)
    proc = subprocess.run(
        [sys.executable, "-m", "sg2img", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not paths["out"].exists() and paths["file"].read_text() == "keep me\n"


def test_a_graph_outside_the_embedded_models_world_gets_one_warning_naming_its_words(tmp_path):
    import subprocess
    import sys

    args = ["generate", "--graph", "data/examples/sheep.json", "--prompt", "a sheep on grass", "--steps", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "sg2img", *args, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
        text=True, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: the embedded model")]
    assert len(warnings) == 1 and "'sheep'" in warnings[0] and "'standing on'" in warnings[0], proc.stderr
    assert "'a'" not in warnings[0] and "'above'" not in warnings[0]  # words of its own world are not named
