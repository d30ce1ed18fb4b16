"""The shapes base's training step under each attention kernel, precision and memory layout (``fit-base``'s
``model.attention``, ``trainer.precision`` and ``model.memory_format``).

    python experiments/bench/base_train_step.py          # batch 32, as configs/experiments/shapes/base.yaml

The shapes preset's UNet (random weights, 32 px, cross-attention to 77 text tokens), one AdamW step on the
same batch per call: forward under bfloat16 autocast (base v3's ``trainer.precision: bf16-mixed``) or in
float32 (the shipped base v4's), the MSE's backward, the optimiser step. Variants:
  sdpa, bfloat16      diffusers' AttnProcessor2_0 (torch's scaled_dot_product_attention): the baseline
  matmul, bfloat16    diffusers' AttnProcessor (baddbmm, softmax, bmm)
  sdpa, float32
  matmul, float32
  fit-base step, float32   the whole step of `fit-base`'s loss (BaseModelModule.diffusion_loss with the
                           shipped recipe's settings: the tiny CLIP's text tower training with the UNet,
                           v-prediction, Min-SNR weights, caption dropout), its backward and AdamW over
                           both: what the UNet-only variants leave out
  sdpa, float32, channels_last             the UNet's weights and input in NHWC (``model.memory_format``)
  fit-base step, float32, channels_last    the whole fit-base step so
Each variant has its own copy of the same weights and optimiser. Runs alternate, the order rotating, after
a warm-up; medians, and ratios to the baseline. Writes experiments/results/bench/base_train_step-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, summarise, table, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from sg2img.base.components import build_components
    from sg2img.train.base_module import ATTENTION_KERNELS, MEMORY_FORMATS

    device = torch.device("cpu")
    unet = build_components("shapes", seed=0).unet.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    b, side = args.batch, unet.config.sample_size
    x = torch.randn(b, unet.config.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)

    def variant(kernel: str, bf16: bool, memory_format: str = "contiguous"):
        u = copy.deepcopy(unet).to(memory_format=MEMORY_FORMATS[memory_format])
        u.set_attn_processor(ATTENTION_KERNELS[kernel]())
        opt = torch.optim.AdamW(u.parameters(), lr=1e-4)
        sample = x.contiguous(memory_format=MEMORY_FORMATS[memory_format])

        def step() -> None:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                out = u(sample, t, text).sample
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def fit_step(memory_format: str = "contiguous"):
        from sg2img.data.rows import TrainBatch
        from sg2img.train.base_module import BaseModelModule

        module = BaseModelModule(
            preset="shapes",
            clip="embedded",
            text_lr=3e-4,
            scheduler={"prediction_type": "v_prediction"},
            memory_format=memory_format,
        )
        module.configure_model()
        module.train()
        opt = module.configure_optimizers()["optimizer"]  # the trainer's own AdamW over UNet and text tower
        ids = torch.randint(0, module.tokenizer.vocab_size, (b, 77), generator=g)
        batch = TrainBatch(keys=[], captions=[], graphs=None, labels=[], pixels=x.clamp(-1, 1), input_ids=ids)
        loss_generator = torch.Generator().manual_seed(0)

        def step() -> None:
            module.diffusion_loss(batch, loss_generator).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    variants = {
        "sdpa, bfloat16": variant("sdpa", True),
        "matmul, bfloat16": variant("matmul", True),
        "sdpa, float32": variant("sdpa", False),
        "matmul, float32": variant("matmul", False),
        "fit-base step, float32": fit_step(),
        "sdpa, float32, channels_last": variant("sdpa", False, "channels_last"),
        "fit-base step, float32, channels_last": fit_step("channels_last"),
    }
    times = alternate(variants, device, args.repeats, args.warmup)
    stats = summarise(times, "sdpa, bfloat16")
    rows = [
        [name, f"{s['median_s']:.3f}", f"{b / s['median_s']:.1f}", f"{s['ratio']:.2f}"]
        for name, s in stats.items()
    ]
    print(table(rows, ["variant", "s/step (median)", "samples/s", "ratio to sdpa, bfloat16"]))
    record = {
        "setting": {"preset": "shapes", "batch": b, "repeats": args.repeats, "warmup": args.warmup},
        **device_record(device),
        "results": stats,
    }
    print("wrote", write("base_train_step-cpu", record, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
