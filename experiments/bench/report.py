"""experiments/results/bench.md from the benchmarks' JSON records (experiments/results/bench/*.json): every
figure in it is read from a record, with the command that made it and the device it ran on.

    python experiments/bench/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT

TARGETS = {
    "unet_step": [
        ("image branch overhead <= 3%", lambda r: r["image4"]["overhead_pct"] <= 3.0),
        ("image + graph overhead <= 6%", lambda r: r["patch16+graph32"]["overhead_pct"] <= 6.0),
        ("image branch <= diffusers' processor", lambda r: r["image4"]["median_s"] <= r["diffusers_ip4"]["median_s"]),
    ],
    "train_step": [
        (">= 1.5x the official recipe's samples/s", lambda r: r["ours"]["samples_per_s"] >= 1.5 * r["official"]["samples_per_s"]),
        ("peak memory <= the official recipe's",
         lambda r: r["ours"].get("peak_memory_bytes", 0) <= r["official"].get("peak_memory_bytes", float("inf"))),
        ("GNN + labels <= 1% of a step", lambda r: r["gnn+labels"]["share_of_ours_pct"] <= 1.0),
    ],
}  # fmt: skip


NOTES = [
    "## Reading these figures",
    "",
    "- The `_uncached` rows are the *before* of the K/V cache: there the text and stream tokens are projected "
    "to K/V at every step, as stock diffusers does; the cached rows project them once per generation "
    "(`DecoupledAttention.caching`, on by default in the pipeline). The cached image branch can be faster "
    "than the plain UNet because the text K/V are cached too.",
    "- Every processor (ours, and the self-attention passthrough) uses `F.scaled_dot_product_attention`; "
    "attention maps are recomputed beside it only when asked for, so no debug tensor is kept otherwise.",
    "- Close margins (such as the image branch against diffusers' processor at 64x64) are within "
    "the spread of single runs; each record keeps every timing (`times_s`) and the min/max.",
    "- On a CPU, peak memory is the peak RSS of a process running one variant alone; it is dominated by the "
    "weights, and both variants load every encoder (a cached run could leave the VAE encoder and the image "
    "tower unloaded).",
    "- Only CPU records exist so far: no GPU has run these benchmarks. On a GPU, run each command with its GPU "
    "setting (`unet_step.py` and `generation.py --latent 64` take fp16 by default; `train_step.py "
    "--resolution 512 --batch 8`), and `model.channels_last` / `model.compile_unet` for training.",
    "",
]


def device_text(d: dict) -> str:
    return d.get("gpu") or f"{d['cpu']} CPU, {d['cpu_threads']} threads"


def section(rec: dict) -> list[str]:
    kind = rec["benchmark"].split("-")[0]
    res = rec["results"]
    lines = [f"### `{rec['benchmark']}`", "", f"`{rec['command']}`", ""]
    lines.append(f"Device: {device_text(rec['device'])} (torch {rec['device']['torch']}). Setting: "
                 + ", ".join(f"{k} {v}" for k, v in rec["setting"].items()) + ".")  # fmt: skip
    lines.append("")
    extra = {
        "unet_step": [("overhead", lambda s: f"{s['overhead_pct']:+.1f}%")],
        "generation": [("ms/step", lambda s: f"{s['per_step_ms']:.1f}"), ("adapter share", lambda s: f"{s['adapter_share_pct']:.1f}%")],
        "train_step": [("samples/s", lambda s: f"{s['samples_per_s']:.3f}"), ("x UNet forward", lambda s: f"{s['per_unet_forward']:.2f}"),
                       ("peak memory", lambda s: f"{s['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in s else "")],
    }.get(kind, [])  # fmt: skip
    lines.append("| variant | median | ratio | " + " | ".join(h for h, _ in extra) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(extra))
    for name, s in res.items():
        cells = [f(s) for _, f in extra]
        lines.append(f"| {name} | {s['median_s']:.3f} s | {s['ratio']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    if kind == "unet_step":
        lines.append(f"Our image branch and diffusers' processor give the same output to "
                     f"{rec['parity_image4_vs_diffusers']:.1e} (relative).")  # fmt: skip
    if kind == "generation":
        lines.append(f"Cached and uncached K/V give the same latents: {rec['cached_equals_uncached']}.")
    if kind == "train_step":
        lines.append(f"Ours / official samples/s: {rec['speedup_ours_vs_official']:.2f}x; GNN and labels: "
                     f"{res['gnn+labels']['share_of_ours_pct']:.2f}% of our step.")  # fmt: skip
    for text, check in TARGETS.get(kind, []):
        try:
            ok = "met" if check(res) else "**not met**"
        except KeyError:
            ok = "not measured"
        lines.append(f"- Target {text}: {ok}.")
    lines.append("")
    return lines


def main() -> int:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not records:
        print(f"no records under {RESULTS}; run the benchmarks first", file=sys.stderr)
        return 1
    lines = [
        "# Benchmarks",
        "",
        "Every figure below is read from a record in `experiments/results/bench/` by "
        "`python experiments/bench/report.py`; each section gives the command that wrote the record. "
        "Ratios are against the baseline measured in the same run (runs alternate, after a warm-up; "
        "medians).",
        "",
    ]
    for rec in records:
        lines += section(rec)
    lines += NOTES
    out = ROOT / "experiments" / "results" / "bench.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
