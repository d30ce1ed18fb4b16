"""What one sampling step of the shapes UNet costs in arithmetic, and how fast this machine does it.

    python experiments/bench/unet_flops.py

Counts the floating-point operations of one forward of the embedded (shipped) base's UNet with torch's
``FlopCounterMode`` (per UNet row: a guided image takes two rows per step), then times the forward on a
batch of 50 rows in both layouts (alternating, median of the repeats) and gives the rate in GFLOP/s. With
the row count of an evaluation (graphs x steps x 2 rows under guidance) it says how long the UNet alone
takes for 500 test graphs at 25 steps at that rate, and what rate a target time would need: whether a
faster evaluation has to come from a faster kernel or from fewer rows.
Writes experiments/results/bench/unet_flops-<device>.json, or --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, device_record, summarise, write

GRAPHS, STEPS, TARGET_S = 500, 25, 90.0  # the evaluation the research loop runs, and its target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50, help="UNet rows per timed forward")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--overhead-s", type=float, default=15.0,
                    help="the evaluation's time outside the UNet (imports, loading, scoring, writing)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from sg2img.shapes.embedded import embedded_base

    torch.manual_seed(0)
    unet = embedded_base().unet.eval()
    cfg = unet.config
    x = torch.randn(args.rows, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text = torch.randn(args.rows, 77, cfg.cross_attention_dim)
    t = torch.tensor(500)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=text)
    total = counter.get_total_flops()
    by_op = {str(k): v / total for k, v in counter.get_flop_counts()["Global"].items()}

    nhwc, x_nhwc = (
        copy.deepcopy(unet).to(memory_format=torch.channels_last),
        x.to(memory_format=torch.channels_last),
    )

    def forward(model: torch.nn.Module, sample: torch.Tensor) -> None:
        with torch.no_grad():
            model(sample, t, encoder_hidden_states=text)

    times = alternate(
        {"contiguous": lambda: forward(unet, x), "channels_last": lambda: forward(nhwc, x_nhwc)},
        torch.device("cpu"),
        args.repeats,
    )
    results = summarise(times, "contiguous")
    rows = GRAPHS * STEPS * 2
    for r in results.values():
        r["gflop_per_s"] = round(total / r["median_s"] / 1e9, 1)
        r["unet_s_for_500_graphs"] = round(rows * total / args.rows / (r["gflop_per_s"] * 1e9), 1)
    needed = rows * total / args.rows / (TARGET_S - args.overhead_s) / 1e9
    record = {
        "setting": {"rows_per_forward": args.rows, "repeats": args.repeats, "model": "embedded base's UNet"},
        "device": device_record(torch.device("cpu")),
        "gflop_per_row": round(total / args.rows / 1e9, 4),
        "flop_share_by_op": {k: round(v, 3) for k, v in by_op.items()},
        "evaluation_rows": rows,
        "results": results,
        "target_s": TARGET_S,
        "overhead_s": args.overhead_s,
        "gflop_per_s_for_target": round(needed, 1),
    }
    path = write("unet_flops-cpu", record, args.out)
    for name, r in results.items():
        print(f"{name}: {r['median_s'] * 1000:.0f} ms per forward, {r['gflop_per_s']} GFLOP/s, "
              f"UNet alone {r['unet_s_for_500_graphs']} s for {GRAPHS} graphs")  # fmt: skip
    print(
        f"{record['gflop_per_row']} GFLOP per row; {TARGET_S:.0f} s needs {needed:.0f} GFLOP/s; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
