"""Training on the tiny preset: what trains, what is saved, the loss, resume, cache, CLI, W&B, configs."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from datafiles import write_manifest
from lightning.pytorch.callbacks import ModelCheckpoint

from ip_adapter import IPAdapter
from sg2img.base.components import save_tiny_model
from sg2img.data import CachedRows, JsonlManifest, SG2ImgDataModule, collate, write_cache
from sg2img.graph import SceneGraph
from sg2img.model.adapter import SceneGraphAdapter
from sg2img.model.gnn import GNNConfig
from sg2img.train.adapter_module import SG2ImgModule, branch_of
from sg2img.train.core import diffusion_target
from sg2img.train.settings import (
    BaseSettings,
    ConditionDropout,
    GraphBranchSettings,
    ImageBranchSettings,
    OptimizerConfig,
    grouped_model_config,
)

SMALL_GNN = GNNConfig(layer="triplet", num_layers=1, hidden_dim=16, mlp_dim=32)
NO_DROPOUT = ConditionDropout(0.0, 0.0, 0.0, 0.0)


def graph(**kw) -> GraphBranchSettings:
    """The graph branch's settings, with the small test GNN unless given."""
    return GraphBranchSettings(**{"gnn": SMALL_GNN, **kw})


def make_module(**kw) -> SG2ImgModule:
    kw.setdefault("graph", graph())
    m = SG2ImgModule(**kw)
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


def data_module(manifest: Path, batch_size: int = 4) -> SG2ImgDataModule:
    return SG2ImgDataModule(train=JsonlManifest(manifest), batch_size=batch_size, num_workers=0)


def trainer(root: Path, **kw) -> L.Trainer:
    defaults = dict(
        default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=2,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kw})


def first_batch(module: SG2ImgModule, manifest: Path):
    dm = data_module(manifest)
    need = module.data_requirements()
    dm.resolution, dm.clip_size, dm.shuffle = need["resolution"], need["clip_size"], False
    return next(iter(dm.train_dataloader()))


def adapter_params(m: SG2ImgModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.model.adapter.adapter_state_dict().items()}


# --- what trains ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(graph=graph(enabled=False)),
        dict(image=ImageBranchSettings(enabled=False)),
        dict(injection="concat"),
        dict(image=ImageBranchSettings(tokens="patch"), graph=graph(enabled=False)),
    ],
    ids=["both", "image", "graph", "concat", "patch"],
)
def test_few_step_fit_changes_exactly_the_trainable_weights(setting, manifest, tmp_path):
    m = make_module(**setting)
    before_base = {k: v.clone() for k, v in m.model.unet.state_dict().items() if "processor" not in k}
    before = adapter_params(m)
    trainer(tmp_path, max_steps=2).fit(m, datamodule=data_module(manifest))
    after = adapter_params(m)
    assert before.keys() == after.keys() and before
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k.split(".", 1)[0] for k in changed}
    expected = set()
    if m.model.has_image:
        expected |= {"image_proj", "ip_adapter"}
    if m.model.has_graph:
        expected |= {"sg_encoder", "sg_adapter"}
    if setting.get("injection") == "concat":
        expected -= {"ip_adapter", "sg_adapter"}
    assert trainable == expected
    assert all(torch.equal(v, m.model.unet.state_dict()[k]) for k, v in before_base.items())  # base untouched
    assert not m.model.unet.training and not m.model.vae.training and not m.model.text_encoder.training
    ours = {id(p) for p in m.model.adapter.parameters()}  # processors are reachable from the UNet too
    assert not any(p.requires_grad for p in m.parameters() if id(p) not in ours)


def test_one_predicate_selects_trainable_and_saved(manifest, tmp_path):
    m = make_module(image=ImageBranchSettings(train=False))
    own = {n for n, _ in m.model.trainable_parameters()}  # named within the model: adapter.…
    assert own and all(branch_of(n) == "graph" for n in own)
    names = {f"model.{n}" for n in own}  # named within the Lightning module: model.adapter.…
    assert names == {
        n
        for n, p in m.named_parameters(remove_duplicate=False)
        if p.requires_grad and n.startswith("model.adapter.")
    }
    assert set(m.state_dict()) == names
    assert all(
        p.requires_grad == (n in names)
        for n, p in m.named_parameters(remove_duplicate=False)
        if n.startswith("model.adapter.")
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        m, datamodule=data_module(manifest)
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == names
    assert "optimizer_states" in saved and saved["global_step"] == 1
    size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size
    base_bytes = sum(p.numel() * 4 for n, p in m.named_parameters() if not n.startswith("model.adapter."))
    assert size < base_bytes / 10  # adapter + optimizer state only, never the frozen base


def test_loading_a_checkpoint_of_another_setting_names_the_keys():
    m = make_module()
    other = make_module(graph=graph(enabled=False)).state_dict()
    with pytest.raises(RuntimeError, match=r"missing .*sg_encoder"):
        m.load_state_dict(other)


def test_official_ip_adapter_as_frozen_image_branch(manifest, tmp_path, tiny):
    official = IPAdapter(tiny.unet, make_module(graph=graph(enabled=False)).model.adapter.config.image)
    torch.nn.init.normal_(official.image_proj.proj.weight)
    path = tmp_path / "ip-adapter_sd15.bin"
    torch.save(official.official_state_dict(), path)
    m = make_module(init_adapter=str(path), image=ImageBranchSettings(train=False))
    loaded = adapter_params(m)
    assert torch.equal(loaded["image_proj.proj.weight"], official.image_proj.proj.weight)
    trainer(tmp_path, max_steps=2).fit(m, datamodule=data_module(manifest))
    after = adapter_params(m)
    image = [k for k in loaded if k.startswith(("image_proj.", "ip_adapter."))]
    assert image and all(torch.equal(loaded[k], after[k]) for k in image)
    assert any(not torch.equal(loaded[k], after[k]) for k in loaded if k.startswith("sg_"))
    out = m.export_adapter(tmp_path / "adapter.safetensors")  # the frozen branch is part of the file
    again = SceneGraphAdapter.from_file(out, copy.deepcopy(tiny.unet))
    assert torch.equal(again.image_proj.proj.weight, official.image_proj.proj.weight)


def test_a_checkpoint_from_before_the_model_was_its_own_module_still_loads():
    # such checkpoints keep the trained weights at the module's top level: adapter.… for model.adapter.…
    trained = make_module()
    with torch.no_grad():
        for _, p in trained.model.trainable_parameters():
            p.add_(1.0)
    old = {"state_dict": {k.removeprefix("model."): v for k, v in trained.state_dict().items()}}
    assert old["state_dict"] and all(k.startswith("adapter.") for k in old["state_dict"])
    fresh = make_module()
    fresh.on_load_checkpoint(old)
    fresh.load_state_dict(old["state_dict"])
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())


def test_the_saved_hyperparameters_rebuild_the_same_settings():
    # what load_from_checkpoint does: the checkpoint's plain-dict settings back into the settings classes
    m = SG2ImgModule(image=ImageBranchSettings(tokens="patch"), graph=graph(layout_loss_weight=0.5), seed=3)
    again = SG2ImgModule(**dict(m.hparams))
    for name in ("base_settings", "image_settings", "graph_settings", "objective", "dropout"):
        assert getattr(again.model, name) == getattr(m.model, name), name
    assert again.optim == m.optim and again.seed == 3


def test_a_model_section_of_the_flat_layout_is_grouped():
    flat = {"base": "embedded", "image_encoder": None, "image_tokens": "patch", "gnn": {"layer": "gine"},
            "timesteps": "shifted", "dropout": {"text": 0.5}, "seed": 1}  # fmt: skip
    assert grouped_model_config(flat) == {
        "base": {"source": "embedded", "image_encoder": None},
        "image": {"tokens": "patch"},
        "graph": {"gnn": {"layer": "gine"}},
        "objective": {"timesteps": "shifted"},
        "dropout": {"text": 0.5},
        "seed": 1,
    }
    grouped = {"base": {"source": "tiny"}, "graph": {"enabled": False}}
    assert grouped_model_config(grouped) == grouped


def test_nothing_to_train_is_refused():
    with pytest.raises(ValueError, match="nothing would train"):
        SG2ImgModule(image=ImageBranchSettings(train=False), graph=GraphBranchSettings(enabled=False))


# --- the loss ------------------------------------------------------------------------------------
def test_condition_dropout_ranges():
    d = ConditionDropout(text=0.1, image=0.2, graph=0.3, all=0.1)
    drops = d.sample(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    t, i, g = (drops[k].float() for k in ("text", "image", "graph"))
    every = (t * i * g).mean().item()
    assert every == pytest.approx(0.1, abs=0.01)
    assert (t.mean() - every).item() == pytest.approx(0.1, abs=0.01)
    assert (i.mean() - every).item() == pytest.approx(0.2, abs=0.01)
    assert ((t * i).mean().item() - every) == 0.0  # one draw per sample: ranges never overlap otherwise
    with pytest.raises(ValueError, match="sum to"):
        ConditionDropout(0.5, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match=r"dropout.text"):
        ConditionDropout(text=-0.1)


def test_dropped_conditions_equal_their_null_inputs(manifest):
    m = make_module(dropout=NO_DROPOUT)
    batch = first_batch(m, manifest)
    n = batch.batch_size
    everything = {k: torch.ones(n, dtype=torch.bool) for k in ("text", "image", "graph")}
    dropped = m.model.condition(batch, everything)
    streams = dropped["cross_attention_kwargs"]["streams"]
    assert torch.equal(dropped["encoder_hidden_states"], m.model.empty_text().expand(n, -1, -1))
    zero_tokens = m.model.adapter.image_proj(torch.zeros(n, m.model.image_encoder.spec.projection_dim))
    assert torch.allclose(streams["ip"].tokens, zero_tokens)  # proj(zeros), not zeros
    assert not streams["sg"].mask.any()  # the empty graph contributes nothing


def test_v_prediction_base_trains_on_velocity(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"epsilon"', '"v_prediction"'))
    m = make_module(base=BaseSettings(str(folder)))
    assert m.model.noise_scheduler.config.prediction_type == "v_prediction"
    x, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    v = diffusion_target(m.model.noise_scheduler, x, noise, t)
    assert torch.allclose(v, m.model.noise_scheduler.get_velocity(x, noise, t)) and not torch.allclose(
        v, noise
    )


def test_tiny_overfit_loss_falls(manifest, tmp_path):
    m = make_module(dropout=NO_DROPOUT, optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0))
    batch = first_batch(m, manifest)
    probe = [m.step_generator(99, k) for k in range(4)]

    def fixed_loss() -> float:
        with torch.no_grad():
            return sum(m.diffusion_loss(batch, copy.deepcopy(g)).item() for g in probe) / len(probe)

    start = fixed_loss()
    trainer(tmp_path, max_steps=40).fit(m, datamodule=data_module(manifest, batch_size=4))
    assert fixed_loss() < 0.8 * start


# --- resume and cache ----------------------------------------------------------------------------
def test_resume_matches_an_uninterrupted_run(manifest, tmp_path):
    straight = make_module()
    trainer(tmp_path / "a", max_epochs=2, max_steps=-1).fit(straight, datamodule=data_module(manifest))

    first = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", max_epochs=1, max_steps=-1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, datamodule=data_module(manifest)
    )
    resumed = make_module()
    trainer(tmp_path / "c", max_epochs=2, max_steps=-1).fit(
        resumed, datamodule=data_module(manifest), ckpt_path=tmp_path / "b" / "last.ckpt", weights_only=True
    )
    a, b = adapter_params(straight), adapter_params(resumed)
    assert any(not torch.equal(a[k], adapter_params(first)[k]) for k in a)  # epoch 2 did change weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_path_gives_the_same_loss(manifest, tmp_path):
    m = make_module(image=ImageBranchSettings(tokens="patch"))
    write_cache(m, JsonlManifest(manifest), tmp_path / "cache", batch_size=3, shard_size=5, dtype="float32")
    cached = CachedRows(tmp_path / "cache")
    assert len(cached) == 8 and cached.index["shards"] == [6, 2]  # whole batches per shard
    raw = first_batch(m, manifest)
    from_cache = collate([cached[i] for i in range(raw.batch_size)])
    assert from_cache.keys == raw.keys and from_cache.labels == raw.labels
    assert from_cache.pixels is None and from_cache.latent_dist is not None
    m.model.dropout = ConditionDropout(0.25, 0.25, 0.25, 0.25)  # every null path is exercised
    for seed in range(3):
        a = m.diffusion_loss(raw, m.step_generator(seed))
        b = m.diffusion_loss(from_cache, m.step_generator(seed))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (seed, a.item(), b.item())


def test_sampling_during_training_keeps_the_adapter_fp32_beside_a_half_base():
    m = make_module(base=BaseSettings(dtype="bfloat16"))
    assert m.model.unet.dtype == torch.bfloat16
    graph = SceneGraph.from_names(["sheep", "tree"], [(0, "left of", 1)])
    images = m.generate(graphs=[graph], prompts=["a sheep"], steps=2, seed=0)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert {p.dtype for _, p in m.model.trainable_parameters()} == {torch.float32}
    assert (
        m.generate(graphs=[graph], prompts=["a sheep"], steps=2, seed=0)[0].tobytes() == images[0].tobytes()
    )


def test_channels_last_keeps_the_loss_and_compile_wraps_the_unet_in_place(manifest):
    plain = make_module()
    batch = first_batch(plain, manifest)
    fast = make_module(base=BaseSettings(channels_last=True, compile_unet=True))
    conv = fast.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.model.unet._compiled_call_impl is not None  # compiled on first call
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    # run it compiled: TorchDynamo traces the UNet with the adapter's processors (the "eager" backend
    # skips inductor's C++ code generation, minutes on this CPU) and the loss must not change
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    fast.model.unet.compile(backend="eager")
    g = lambda: plain.step_generator(0)  # noqa: E731
    compiled = fast.diffusion_loss(batch, g())
    assert counters["stats"]["unique_graphs"] >= 1  # something was really compiled
    torch.testing.assert_close(compiled, plain.diffusion_loss(batch, g()), rtol=1e-5, atol=1e-6)
    dynamo.reset()


def nan_on(module: SG2ImgModule, calls: set[int]):
    """Make the loss NaN on the given calls of ``diffusion_loss`` (counting from 0)."""
    original, count = module.diffusion_loss, [0]

    def loss(batch, generator):
        out = original(batch, generator)
        count[0] += 1
        return out * float("nan") if count[0] - 1 in calls else out

    module.diffusion_loss = loss


def test_a_nan_loss_is_skipped_and_counted_or_stops_the_run_before_any_weight_changes(manifest, tmp_path):
    m = make_module(nonfinite_loss="skip")
    before = adapter_params(m)
    nan_on(m, {1})
    trainer(tmp_path / "skip", max_steps=3).fit(m, datamodule=data_module(manifest))
    assert m.nonfinite_count == 1
    after = adapter_params(m)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the good batches trained

    m = make_module()  # nonfinite_loss: stop is the default
    before = adapter_params(m)
    nan_on(m, {0})
    with pytest.raises(
        FloatingPointError, match=r"train step 0 \(batch 0, rows .*loss is nan.*model.nonfinite_loss: skip"
    ):
        trainer(tmp_path / "stop").fit(m, datamodule=data_module(manifest))
    after = adapter_params(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="nonfinite_loss must be 'stop' or 'skip'"):
        SG2ImgModule(nonfinite_loss="ignore")
