"""Would 8-bit integer convolutions make the shapes UNet fast enough for a 90 s evaluation?

    python experiments/bench/unet_int8.py

The UNet's forward is 92% convolution (``unet_flops.py``) and this CPU has AVX-512 VNNI (four int8
multiply-adds per 32-bit lane where float32 does one) but no bfloat16 instructions. This benchmark asks one
question: is the embedded base's UNet, statically quantised to int8 by the PT2E flow (torchao's
``X86InductorQuantizer``: int8 weights per channel, int8 activations per tensor, calibrated on inputs of a
real sampling run) and compiled by inductor, fast enough, and how far do its predictions move?

It times four forwards of the same batch of rows (alternating, median of the repeats), all NHWC and
compiled as ``sg2img evaluate --compile`` compiles:
  float32           the UNet as the evaluation runs it today (the baseline, ratio 1);
  float32 frozen    the same with inductor's weight freezing, which the int8 path needs (so the int8 ratio
                    is not credited with what freezing alone gives);
  int8              the whole UNet exported, quantised and frozen;
  int8 convolution blocks
                    only its convolution blocks (ResnetBlock2D, Downsample2D, Upsample2D) quantised, each
                    exported on its own with a dynamic batch size: the form a sampling command could use,
                    since the cross-attention layers with an adapter's streams and region masks do not
                    export whole; conv_in, conv_out and the attention stay float32.
and gives each int8 prediction's error against float32 on held-out inputs (relative RMS of the predicted
noise, at three timesteps). The 90 s target needs the UNet at about 1.6 times today's rate with every
evaluation flag on (``unet_flops-cpu.json``: 178 GFLOP/s against 97-110).

Needs ``torchao`` (``pip install torchao``; not a dependency of sg2img). Writes
experiments/results/bench/unet_int8-cpu.json, or --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, summarise, write

QUANTIZED_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # diffusers' convolution blocks


def quantize_blocks(unet: torch.nn.Module, calibrate, quantizer, prepare_pt2e, convert_pt2e) -> list[str]:
    """Replace each convolution block of ``unet`` by an int8 one: record every block's (positional) inputs
    during ``calibrate()``, export the block with a dynamic batch size, observe it on those inputs, convert
    it and put it back in place. Returns the names of the blocks replaced."""
    blocks = {n: m for n, m in unet.named_modules() if type(m).__name__ in QUANTIZED_BLOCKS}
    seen: dict[str, list[tuple]] = {n: [] for n in blocks}

    def recorder(name: str):
        def hook(module, args):
            seen[name].append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in blocks.items()]
    with torch.no_grad():
        calibrate()
    for h in handles:
        h.remove()
    auto = torch.export.Dim.AUTO
    with torch.no_grad():
        for name, block in blocks.items():
            calls = seen.pop(name)
            dynamic = tuple({0: auto} if isinstance(a, torch.Tensor) else None for a in calls[0])
            exported = torch.export.export(block.eval(), calls[0], dynamic_shapes=dynamic)
            prepared = prepare_pt2e(exported.module(), quantizer)
            for call in calls:
                prepared(*call)
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, convert_pt2e(prepared))
    return list(blocks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50, help="UNet rows per timed forward (25 guided images)")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError:
        print("unet_int8.py needs torchao: pip install torchao", file=sys.stderr)
        return 2
    import torch._inductor.config as inductor_config

    from sg2img.shapes.embedded import embedded_base

    torch.manual_seed(0)
    base = embedded_base()
    unet = base.unet.eval().to(memory_format=torch.channels_last)
    cfg = unet.config
    text_encoder, tokenizer = base.text_encoder.eval(), base.tokenizer

    # Inputs as sampling sees them: noisy latents at timesteps across the schedule, real caption embeddings.
    captions = ["a red circle", "a blue square and a green triangle", "a yellow circle", ""] * 13
    with torch.no_grad():
        ids = tokenizer(
            captions[: args.rows],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text = text_encoder(ids)[0]

    def inputs(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(args.rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        return x.to(memory_format=torch.channels_last), torch.tensor(t)

    def run(model, x, t):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=text, return_dict=False)[0]

    x0, t0 = inputs(500, 0)
    exported = torch.export.export(unet, (x0, t0), {"encoder_hidden_states": text, "return_dict": False})
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    timesteps = torch.linspace(999, 0, args.calibration_batches).round().int().tolist()
    calibration = [inputs(t, 100 + i) for i, t in enumerate(timesteps)]  # the same inputs for both forms
    for xt in calibration:
        prepared(*xt, encoder_hidden_states=text, return_dict=False)
    quantised = convert_pt2e(prepared)

    blocks = copy.deepcopy(unet)
    quantize_blocks(
        blocks, lambda: [run(blocks, *xt) for xt in calibration], quantizer, prepare_pt2e, convert_pt2e
    )
    first_call_s: dict[str, float] = {}  # the call that compiles (inductor's cache as the environment has it)

    def first_call(name: str, model):
        start = time.perf_counter()
        run(model, x0, t0)
        first_call_s[name] = round(time.perf_counter() - start, 2)
        return model

    with inductor_config.patch(freezing=True):
        blocks_compiled = first_call("int8 convolution blocks", torch.compile(blocks, dynamic=False))
    fp32 = first_call("float32", torch.compile(copy.deepcopy(unet), dynamic=False))
    with inductor_config.patch(freezing=True):
        frozen = first_call("float32 frozen", torch.compile(copy.deepcopy(unet), dynamic=False))
        int8 = first_call("int8", torch.compile(quantised, dynamic=False))

        errors: dict[str, dict[str, float]] = {"int8": {}, "int8 convolution blocks": {}}
        for t in (900, 500, 100):
            x, tt = inputs(t, 1000 + t)
            ref = run(fp32, x, tt)
            for name, model in (("int8", int8), ("int8 convolution blocks", blocks_compiled)):
                got = run(model, x, tt)
                rms = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
                errors[name][str(t)] = round(float(rms), 4)

        times = alternate(
            {
                "float32": lambda: run(fp32, x0, t0),
                "float32 frozen": lambda: run(frozen, x0, t0),
                "int8": lambda: run(int8, x0, t0),
                "int8 convolution blocks": lambda: run(blocks_compiled, x0, t0),
            },
            torch.device("cpu"),
            args.repeats,
        )
    results = summarise(times, "float32")
    record = {
        "setting": {
            "rows_per_forward": args.rows,
            "repeats": args.repeats,
            "calibration_batches": args.calibration_batches,
            "model": "embedded base's UNet, NHWC, torch.compile (inductor)",
            "quantisation": "torchao PT2E, X86InductorQuantizer default config (static, int8 per-channel weights)",
        },
        "device": device_record(torch.device("cpu")),
        "results": results,
        "relative_rms_error_by_timestep": errors,
        "first_call_s": first_call_s,
    }
    path = write("unet_int8-cpu", record, args.out)
    for name, r in results.items():
        print(
            f"{name}: {r['median_s'] * 1000:.0f} ms per forward of {args.rows} rows, ratio {r['ratio']:.3f}"
        )
    print(f"relative RMS error of the predicted noise by timestep: {errors}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
