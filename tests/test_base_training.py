"""Pixel-space bases (``vae: null``), base files, and training a base from scratch (``fit-base``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from lightning.pytorch.callbacks import ModelCheckpoint

from ip_adapter import CheckpointError
from sg2img.base.components import (
    EMBEDDED_BASE_FILE,
    PRESETS,
    base_file_preset,
    build_components,
    is_base_file,
    load_base,
    preset_from_json,
    preset_to_json,
    read_base_file,
    save_base_file,
)
from sg2img.data import SG2ImgDataModule, Shapes
from sg2img.infer.pipeline import SG2ImgPipeline
from sg2img.model.gnn import GNNConfig
from sg2img.train.adapter_module import SG2ImgModule
from sg2img.train.base_module import BaseModelModule
from sg2img.train.callbacks import BaseExport
from sg2img.train.settings import (
    BaseSettings,
    ConditionDropout,
    GraphBranchSettings,
    ImageBranchSettings,
    ObjectiveSettings,
)


def shapes_data(n: int = 8, batch_size: int = 4, **kw) -> SG2ImgDataModule:
    return SG2ImgDataModule(
        train=Shapes("train", num_rows=n, **kw), batch_size=batch_size, num_workers=0, shuffle=False
    )


def trainer(root: Path, **kw) -> L.Trainer:
    defaults = dict(
        default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=2,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kw})


ROOT = Path(__file__).resolve().parents[1]


def small_base(**kw) -> BaseModelModule:
    kw.setdefault("warmup_steps", 1)
    m = BaseModelModule(**kw)
    m.configure_model()
    return m


# --- pixel space --------------------------------------------------------------------------------
def test_the_shapes_preset_is_pixel_space_and_its_pipeline_draws_rgb():
    parts = build_components("shapes")
    assert parts.vae is None and parts.unet.config.in_channels == 3
    pipe = SG2ImgPipeline.from_components(parts)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    out = pipe(
        prompt=["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, generator=g
    )
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    raw = pipe(
        prompt="a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert raw.shape == (1, 3, 32, 32)
    # the PIL image is the denoised sample mapped from [-1, 1] to [0, 255]
    expected = ((raw[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    first = np.asarray(
        pipe(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[
            0
        ]
    )
    assert np.abs(first.astype(np.float32) - expected).max() <= 1.0


def test_the_pipeline_samples_with_the_scheduler_the_preset_declares():
    """diffusers' pipeline would turn clip_sample off and steps_offset to 1; a base's scheduler stays."""
    parts = build_components("shapes")
    declared = {**parts.scheduler.config, "clip_sample": True, "steps_offset": 0}
    parts.scheduler = DDIMScheduler.from_config(declared)
    pipe = SG2ImgPipeline.from_components(parts)
    for scheduler in (pipe.scheduler, parts.scheduler):
        assert scheduler.config.clip_sample is True and scheduler.config.steps_offset == 0
    assert pipe.scheduler is not parts.scheduler


# --- base files ---------------------------------------------------------------------------------
def test_base_file_round_trip_is_exact_and_loads_everywhere_a_base_is_accepted(tmp_path):
    parts = build_components("shapes", seed=3)
    f = save_base_file(parts, PRESETS["shapes"], tmp_path / "base.safetensors", dtype=torch.float32)
    assert is_base_file(f) and not is_base_file(tmp_path / "missing.safetensors")
    back = read_base_file(f)
    for name in ("unet", "text_encoder"):
        a, b = getattr(parts, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = parts.image_encoder.model.state_dict(), back.image_encoder.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.vae is None and dict(back.scheduler.config)["beta_schedule"] == "squaredcos_cap_v2"
    via_load_base = load_base(str(f))
    assert torch.equal(via_load_base.unet.conv_in.weight, parts.unet.conv_in.weight)
    half = read_base_file(save_base_file(parts, PRESETS["shapes"], tmp_path / "half.safetensors"))
    assert half.unet.conv_in.weight.dtype == torch.float32  # stored as fp16, loaded as asked
    torch.testing.assert_close(half.unet.conv_in.weight, parts.unet.conv_in.weight, atol=1e-3, rtol=1e-3)


def test_broken_base_files_give_clear_errors(tmp_path):
    parts = build_components("shapes")
    f = save_base_file(parts, PRESETS["shapes"], tmp_path / "base.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        read_base_file(cut)
    other = save_base_file(build_components("tiny"), PRESETS["shapes"], tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match=r"mixed.safetensors: does not match this unet") as e:
        read_base_file(other)
    assert "shape mismatches" in str(e.value) or "missing keys" in str(e.value)


def test_the_embedded_base_is_a_shipped_trained_base_file():
    parts = load_base("embedded")
    assert parts.vae is None and parts.unet.config.sample_size == 32
    fresh = build_components("shapes", seed=0)
    assert not torch.equal(parts.unet.conv_in.weight, fresh.unet.conv_in.weight)  # trained, not the seed
    # only training gives this: on fixed probes (test rows, their captions, fixed noise at mid noise) the
    # shipped UNet predicts its target (the noise, or v for a v-prediction base) far better than the same
    # architecture at its seed
    source = Shapes("test", num_rows=8)
    rows = [source.example(i) for i in range(8)]
    x0 = torch.stack(
        [torch.from_numpy(np.asarray(r.image)).permute(2, 0, 1).float() / 127.5 - 1 for r in rows]
    )
    ids = parts.tokenizer([r.caption for r in rows], padding="max_length", max_length=77, return_tensors="pt")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 500)
    from sg2img.base.components import ddpm_scheduler
    from sg2img.train.core import diffusion_target

    schedule = ddpm_scheduler(base_file_preset(EMBEDDED_BASE_FILE))
    noisy = schedule.add_noise(x0, noise, t)
    target = diffusion_target(schedule, x0, noise, t)
    with torch.no_grad():
        text = parts.text_encoder(input_ids=ids.input_ids)[0]
        trained = (parts.unet(noisy, t, text).sample - target).square().mean()
        seed = (
            (fresh.unet(noisy, t, fresh.text_encoder(input_ids=ids.input_ids)[0]).sample - target)
            .square()
            .mean()
        )
    assert trained < 0.2 * seed, (float(trained), float(seed))


def test_the_embedded_base_reads_the_shipped_tiny_clip():
    from sg2img.shapes.tiny_clip import transformers_towers

    parts = load_base("embedded")
    text, vision = transformers_towers("embedded")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the image branch reads the tiny CLIP's vision tower, exactly
        assert torch.equal(parts.image_encoder(pixels).embeds, vision(pixel_values=pixels).image_embeds)
    # the text encoder is the tiny CLIP's text tower trained on with the UNet (base.yaml's text_lr)
    assert parts.text_encoder.config.to_diff_dict() == text.config.to_diff_dict()


# --- training a base ----------------------------------------------------------------------------
def test_fit_base_trains_the_unet_and_exports_the_ema(tmp_path):
    m = small_base(ema_decay=0.9, lr=1e-3)
    frozen = copy.deepcopy(m.text_encoder.state_dict())
    before = copy.deepcopy(m.unet.state_dict())
    trainer(tmp_path, max_steps=3, callbacks=[BaseExport()]).fit(m, shapes_data())
    after = m.unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before)
    assert all(torch.equal(frozen[k], v) for k, v in m.text_encoder.state_dict().items())
    assert set(m.state_dict()) == {f"unet.{k}" for k in after}  # checkpoints: the UNet, no frozen part
    exported = read_base_file(tmp_path / "base.safetensors")
    ema = m.parts(ema=True).unet.conv_in.weight
    torch.testing.assert_close(exported.unet.conv_in.weight, ema, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(ema, m.unet.conv_in.weight)  # the EMA, not the raw weights


def test_text_lr_trains_the_text_encoder_with_the_unet_and_the_base_file_holds_its_ema(tmp_path):
    m = small_base(ema_decay=0.9, lr=1e-3, text_lr=1e-3)
    text_before = copy.deepcopy(m.text_encoder.state_dict())
    image_before = copy.deepcopy(m.image_encoder.state_dict())
    trainer(tmp_path, max_steps=3, callbacks=[BaseExport()]).fit(m, shapes_data())
    text_after = m.text_encoder.state_dict()
    changed = [k for k in text_before if not torch.equal(text_before[k], text_after[k])]
    assert len(changed) > 0.5 * len(text_before)
    assert all(torch.equal(image_before[k], v) for k, v in m.image_encoder.state_dict().items())
    keys = set(m.state_dict())  # checkpoints hold what trains: the UNet and the text encoder
    assert keys == {f"unet.{k}" for k in m.unet.state_dict()} | {f"text_encoder.{k}" for k in text_after}
    assert m.text_encoder.training  # it trains, so its dropout and norms follow the module's mode
    exported = read_base_file(tmp_path / "base.safetensors")
    key = next(k for k in text_after if k.endswith("final_layer_norm.weight"))
    ema = m.parts(ema=True).text_encoder.state_dict()[key]
    torch.testing.assert_close(exported.text_encoder.state_dict()[key], ema)
    assert not torch.equal(ema, text_after[key])  # the EMA, not the raw weights
    with pytest.raises(ValueError, match="text_lr must be positive"):
        BaseModelModule(text_lr=0.0)


def test_fit_base_resumes_with_its_ema(tmp_path):
    def run(root: Path, epochs: int, ckpt=None) -> BaseModelModule:
        m = small_base(ema_decay=0.9)
        cb = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer(root, max_epochs=epochs, max_steps=-1, callbacks=[cb], enable_checkpointing=True).fit(
            m, shapes_data(n=8), ckpt_path=ckpt
        )
        return m

    straight = run(tmp_path / "a", 2)
    first = run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 4
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(straight.ema.shadow_params[0], first.ema.shadow_params[0])
    for k, v in straight.unet.state_dict().items():
        torch.testing.assert_close(v, resumed.unet.state_dict()[k], atol=1e-6, rtol=0)


def test_each_loss_weighting_changes_the_loss_and_bad_settings_fail():
    from sg2img.data.rows import collate

    weightings = {"none": ObjectiveSettings(loss_weighting="none"),
                  "min_snr": ObjectiveSettings(loss_weighting="min_snr", snr_gamma=1.0),
                  "inv_snr": ObjectiveSettings(loss_weighting="inv_snr", snr_gamma=5.0)}  # fmt: skip
    modules = {k: small_base(objective=o) for k, o in weightings.items()}
    for m in modules.values():
        m.unet.load_state_dict(modules["none"].unet.state_dict())
    dm = shapes_data()
    dm.resolution, dm.clip_size = 32, 32
    batch = collate([dm.preprocess()(Shapes("train", num_rows=4).example(i)) for i in range(4)])
    losses = {k: m.diffusion_loss(batch, m.step_generator(0)) for k, m in modules.items()}
    assert all(torch.isfinite(v) for v in losses.values())
    values = [float(v) for v in losses.values()]
    assert len(set(values)) == 3, losses  # same weights, noise and timesteps: only the weighting differs
    for bad, match in ((lambda: BaseModelModule(objective={"snr_gamma": 0.0}), "snr_gamma"),
                       (lambda: BaseModelModule(ema_decay=1.0), "ema_decay"),
                       (lambda: BaseModelModule(caption_dropout=1.5), "caption_dropout")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            bad()


def same_loss_then_backward(ref: BaseModelModule, other: BaseModelModule) -> None:
    """Both modules' loss on the same four rows, noise and timesteps: equal; then each one's backward."""
    from sg2img.data.rows import collate

    dm = shapes_data()
    dm.resolution, dm.clip_size = 32, 32
    batch = collate([dm.preprocess()(Shapes("train", num_rows=4).example(i)) for i in range(4)])
    losses = [m.diffusion_loss(batch, m.step_generator(0)) for m in (ref, other)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for loss in losses:
        loss.backward()


def test_the_matmul_attention_kernel_trains_the_same_function_as_sdpa():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    ref, fast = small_base(text_lr=1e-3), small_base(text_lr=1e-3, attention="matmul")
    fast.load_state_dict(ref.state_dict())  # the UNet and the text encoder: both train
    assert {type(p) for p in ref.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in fast.unet.attn_processors.values()} == {AttnProcessor}
    assert (ref.text_encoder.config._attn_implementation, fast.text_encoder.config._attn_implementation) == (
        "sdpa",
        "eager",
    )
    same_loss_then_backward(ref, fast)
    for name in ("unet", "text_encoder"):
        grads = [dict(getattr(m, name).named_parameters()) for m in (ref, fast)]
        attention = [k for k in grads[0] if "attn" in k]
        assert attention  # the kernels differ exactly where attention is computed
        for k in attention:
            torch.testing.assert_close(grads[1][k].grad, grads[0][k].grad, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match=r"model\.attention must be one of"):
        BaseModelModule(attention="flash")


def test_channels_last_trains_the_same_function_and_exports_the_default_layout(tmp_path):
    from safetensors.torch import load_file

    ref, nhwc = small_base(), small_base(memory_format="channels_last")
    nhwc.load_state_dict(ref.state_dict())
    # 3x3 kernels (a 1x1 kernel's two layouts have the same strides)
    convs = [n for n, w in nhwc.unet.named_parameters() if w.dim() == 4 and w.shape[-1] > 1]
    assert convs and all(
        dict(nhwc.unet.named_parameters())[n].is_contiguous(memory_format=torch.channels_last)
        and not dict(ref.unet.named_parameters())[n].is_contiguous(memory_format=torch.channels_last)
        for n in convs
    )
    same_loss_then_backward(ref, nhwc)
    grads = [dict(m.unet.named_parameters()) for m in (ref, nhwc)]
    for k in convs:
        torch.testing.assert_close(grads[1][k].grad, grads[0][k].grad, rtol=1e-3, atol=1e-6)
    # the base file holds plain (contiguous) weights, equal to the default layout's export
    exported = [load_file(m.export_base(tmp_path / f"{i}.safetensors")) for i, m in enumerate((ref, nhwc))]
    assert exported[0].keys() == exported[1].keys()
    for k, v in exported[1].items():
        assert v.is_contiguous() and torch.equal(v, exported[0][k]), k
    with pytest.raises(ValueError, match=r"model\.memory_format must be one of"):
        BaseModelModule(memory_format="nhwc")


def test_a_scheduler_override_trains_v_prediction_and_the_base_file_keeps_it(tmp_path):
    from sg2img.train.core import noised

    m = small_base(scheduler={"prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    _, t, target = noised(m.noise_scheduler, x0, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(target, m.noise_scheduler.get_velocity(x0, noise, t))  # v, not the noise
    parts = load_base(m.export_base(tmp_path / "base.safetensors"))
    assert parts.scheduler.config.prediction_type == "v_prediction"
    parts.scheduler.set_timesteps(25)
    plain = small_base().parts().scheduler
    plain.set_timesteps(25)
    assert int(parts.scheduler.timesteps[0]) == 999 and int(plain.timesteps[0]) == 961  # trailing vs leading
    for bad, match in (({"timestep_spacingg": "trailing"}, "unknown DDIMScheduler setting.*timestep_spacingg"),
                       ({"prediction_type": "velocity"}, "prediction_type must be .*'velocity'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            BaseModelModule(scheduler=bad)


def test_a_base_file_carries_its_sampling_eta_and_a_call_can_override_it(tmp_path):
    m = small_base(eta=1.0)
    parts = load_base(m.export_base(tmp_path / "base.safetensors"))
    assert parts.eta == 1.0 and small_base().parts().eta == 0.0  # the preset's default: deterministic DDIM
    pipe = SG2ImgPipeline.from_components(parts)
    pipe.set_progress_bar_config(disable=True)

    def draw(**kw):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, generator=g, output_type="np", **kw).images

    own = draw()
    assert np.array_equal(own, draw(eta=1.0)) and not np.array_equal(own, draw(eta=0.0))
    # a base file written before the field existed (no "eta" in its preset) samples deterministically
    legacy = json.loads(preset_to_json(PRESETS["shapes"]))
    del legacy["eta"]
    assert preset_from_json(json.dumps(legacy)).eta == 0.0
    with pytest.raises(ValueError, match=r"model.eta must be in \[0, 1\].*got -0.5"):
        BaseModelModule(eta=-0.5)


def test_the_base_default_objective_is_min_snr_and_a_shift_draws_higher_noise(monkeypatch):
    import sg2img.train.base_module as base_module
    from sg2img.data.rows import collate

    m = small_base()
    assert (
        m.objective.loss_weighting == "min_snr"
        and m.objective.snr_gamma == 5.0
        and m.objective.shift() is None
    )
    partial = small_base(objective={"snr_gamma": 3.0})  # a partial group keeps the base's own defaults
    assert partial.objective.loss_weighting == "min_snr" and partial.objective.snr_gamma == 3.0
    shifted = small_base(objective=ObjectiveSettings(loss_weighting="min_snr", timesteps="shifted"))
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        out = base_module.noised.__wrapped__(*args, **kwargs)
        drawn.append(out[1])
        return out

    recording.__wrapped__ = base_module.noised
    monkeypatch.setattr(base_module, "noised", recording)
    dm = shapes_data()
    dm.resolution, dm.clip_size = 32, 32
    rows = collate([dm.preprocess()(Shapes("train", num_rows=64).example(i)) for i in range(64)])
    for module in (m, shifted):  # the same generator: only the shift differs
        module.diffusion_loss(rows, module.step_generator(0))
    plain, high = (t.float().mean() for t in drawn)
    assert high > plain + 100  # t = 3u / (1 + 2u): mean 0.65 of the range against 0.5


def test_an_adapter_trains_on_a_pixel_space_base(tmp_path):
    m = SG2ImgModule(
        base=BaseSettings("shapes"),
        image=ImageBranchSettings(enabled=False),
        graph=GraphBranchSettings(
            gnn=GNNConfig("triplet", num_layers=1, hidden_dim=16, mlp_dim=32, use_boxes=False)
        ),
        dropout=ConditionDropout(0.0, 0.0, 0.1, 0.0),
    )
    m.configure_model()
    assert m.data_requirements()["resolution"] == 32
    before = {k: v.clone() for k, v in m.model.adapter.adapter_state_dict().items()}
    trainer(tmp_path).fit(m, shapes_data())
    after = m.model.adapter.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    images = m.generate(graphs=[Shapes("test").example(0).graph], prompts=["a shape"], steps=2)
    assert images[0].size == (32, 32)


def test_caption_relations_share_is_drawn_per_row_and_fixed():
    rows = Shapes("train", num_rows=400, caption_relations=0.5)
    predicates = ("left of", "right of", "above", "below")
    with_rel = [any(w in rows.example(i).caption for w in predicates) for i in range(400)]
    assert 0.4 < np.mean(with_rel) < 0.6
    again = Shapes("train", num_rows=400, caption_relations=0.5)
    assert [again.example(i).caption for i in range(20)] == [rows.example(i).caption for i in range(20)]
    plain = Shapes("train", num_rows=20)
    assert [plain.example(i).image.tobytes() for i in range(5)] == [
        rows.example(i).image.tobytes() for i in range(5)
    ]
    with pytest.raises(ValueError, match="caption_relations"):
        Shapes("train", caption_relations=1.5)


def test_a_patch_adapter_on_a_base_file_gets_the_resampler_its_preset_records(tmp_path):
    path = save_base_file(build_components("shapes"), PRESETS["shapes"], tmp_path / "base.safetensors")
    m = SG2ImgModule(
        base=BaseSettings(str(path)),
        image=ImageBranchSettings(tokens="patch"),
        graph=GraphBranchSettings(enabled=False),
    )
    m.configure_model()
    assert PRESETS["shapes"].resampler == {"heads": 2}
    assert m.model.adapter.config.image.resampler_config().heads == 2  # not SD1.5's 12 heads at width 48


@pytest.mark.parametrize(
    "args, message",
    [(["--model.snr_gamma", "5"], "model.snr_gamma is now model.objective.snr_gamma (a null gamma, the plain "
                                  "MSE, is now model.objective.loss_weighting: none)"),
     (["--model.objective.loss_weighting", "max_snr"],
      "model.objective.loss_weighting: expected one of 'none', 'min_snr', 'inv_snr'; got max_snr"),
     (["--model.scheduler", '{"prediction_type": "velocity"}'],
      "model.scheduler.prediction_type must be epsilon, v_prediction or sample, got 'velocity'"),
     (["--model.eta", "1.5"], "model.eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got 1.5"),
     (["--model.attention", "flash"], "model.attention must be one of ['matmul', 'sdpa'], got 'flash'"),
     (["--model.memory_format", "nhwc"],
      "model.memory_format must be one of ['channels_last', 'contiguous'], got 'nhwc'")],
)  # fmt: skip
def test_a_base_objective_mistake_is_one_line_and_writes_nothing(args, message, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sg2img", "fit-base", "--config", "configs/experiments/shapes/base.yaml", *args,
           "--trainer.default_root_dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout and not run_dir.exists()
