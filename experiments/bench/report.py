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

MET, NOT_MET, NOISE, MISSING = "met", "**not met**", "within noise", "not measured"


def at_most(a: dict, b: dict, factor: float = 1.0, key: str = "median_s") -> str:
    """Whether variant ``a`` is at most ``factor`` times variant ``b``: met / not met when every timed run
    agrees, "within noise" when their spreads (min..max over the runs) straddle the line; a variant without
    the figure is "not measured"."""
    if key not in a or key not in b:
        return MISSING
    if key != "median_s":  # a single figure per variant (peak memory): no spread to judge
        return MET if a[key] <= factor * b[key] else NOT_MET
    if a["max_s"] <= factor * b["min_s"]:
        return MET
    if a["min_s"] > factor * b["max_s"]:
        return NOT_MET
    return NOISE


def within_seconds(r: dict, graphs: int, seconds: float) -> str:
    times = [v["median_s"] for v in r.values() if v.get("graphs") == graphs]
    return MISSING if not times else (MET if min(times) <= seconds else NOT_MET)


TARGETS = {
    "unet_step": [
        ("image branch overhead <= 3%", lambda r: at_most(r["image4"], r["plain"], 1.03)),
        ("image + graph overhead <= 6%", lambda r: at_most(r["patch16+graph32"], r["plain"], 1.06)),
        ("image branch overhead <= 3% against the plain UNet with its text K/V cached",
         lambda r: at_most(r["image4"], r["plain_cached"], 1.03) if "plain_cached" in r else MISSING),
        ("image branch <= diffusers' processor", lambda r: at_most(r["image4"], r["diffusers_ip4"])),
    ],
    "train_step": [
        (">= 1.5x the official recipe's samples/s", lambda r: at_most(r["ours"], r["official"], 1 / 1.5)),
        ("peak memory <= the official recipe's",
         lambda r: at_most(r["ours"], r["official"], key="peak_memory_bytes")),
        ("GNN + labels <= 1% of a step",
         lambda r: MET if r["gnn+labels"]["share_of_ours_pct"] <= 1.0 else NOT_MET),
    ],
    "evaluate_shapes": [("500 test graphs (25 steps) in <= 90 s", lambda r: within_seconds(r, 500, 90.0))],
    "compiled_sampling": [("compiled <= 0.36 x eager (what 500 graphs in 90 s would need of compilation alone)",
                           lambda r: at_most(r["compiled"], r["eager"], 0.36))],
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
    "- Peak memory is what one variant's step takes above what was in use before it, in a process of its own: "
    "`torch.cuda.max_memory_allocated` after a reset on a GPU, the RSS sampled over the step on a CPU. The "
    "weights are not in it; at 256 px the UNet's backward sets the peak, so the official step (encoders "
    "under no_grad) and ours differ by little.",
    "- Only CPU records exist so far: no GPU has run these benchmarks. On a GPU, run each command with its GPU "
    "setting (`unet_step.py` and `generation.py --latent 64` take fp16 by default; `train_step.py "
    "--resolution 512 --batch 8`), and `model.base.channels_last` / `model.base.compile_unet` for training.",
    "",
]


def device_text(d: dict) -> str:
    return d.get("gpu") or f"{d['cpu']} CPU, {d['cpu_threads']} threads"


def timed_rows(results: dict) -> list[tuple[str, dict]]:
    """(variant, figures) rows; a record that groups its variants ({group: {variant: figures}}) gives
    "group: variant" rows."""
    rows = []
    for name, s in results.items():
        grouped = "median_s" not in s and s and all(isinstance(v, dict) for v in s.values())
        rows += [(f"{name}: {sub}", t) for sub, t in s.items()] if grouped else [(name, s)]
    return rows


def figure(format_, s: dict) -> str:
    try:
        return format_(s)
    except KeyError:
        return MISSING


def section(rec: dict) -> list[str]:
    kind = rec["benchmark"].split("-")[0]
    res = rec["results"]
    lines = [f"### `{rec['benchmark']}`", "", f"`{rec['command']}`", ""]
    device = rec["device"] if isinstance(rec["device"], dict) else rec  # older records: at the top level
    lines.append(f"Device: {device_text(device)} (torch {device['torch']}). Setting: "
                 + ", ".join(f"{k} {v}" for k, v in rec["setting"].items()) + ".")  # fmt: skip
    lines.append("")
    extra = {
        "unet_step": [("overhead", lambda s: f"{s['overhead_pct']:+.1f}%")],
        "generation": [("ms/step", lambda s: f"{s['per_step_ms']:.1f}"), ("adapter share", lambda s: f"{s['adapter_share_pct']:.1f}%")],
        "train_step": [("samples/s", lambda s: f"{s['samples_per_s']:.3f}"), ("x UNet forward", lambda s: f"{s['per_unet_forward']:.2f}"),
                       ("peak memory", lambda s: f"{s['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in s else MISSING)],
        "evaluate_shapes": [("generation", lambda s: f"{s['generation_s']:.1f} s"), ("object recall", lambda s: f"{s['object_recall']:.3f}"),
                            ("relation accuracy", lambda s: f"{s['relation_accuracy']:.3f}")],
        "unet_flops": [("GFLOP/s", lambda s: f"{s['gflop_per_s']:.1f}")],
    }.get(kind, [])  # fmt: skip
    lines.append("| variant | median | ratio |" + "".join(f" {h} |" for h, _ in extra))
    lines.append("|---|---:|---:|" + "---:|" * len(extra))
    for name, s in timed_rows(res):
        cells = "".join(f" {figure(f, s)} |" for _, f in extra)
        median = f"{s['median_s']:.3f} s" if "median_s" in s else MISSING
        ratio = f"{s['ratio']:.3f}" if "ratio" in s else MISSING
        lines.append(f"| {name} | {median} | {ratio} |{cells}")
    lines.append("")
    if kind == "unet_step":
        lines.append(f"Our image branch and diffusers' processor give the same output to "
                     f"{rec['parity_image4_vs_diffusers']:.1e} (relative).")  # fmt: skip
    if kind == "generation":
        lines.append(f"Cached and uncached K/V give the same latents: {rec['cached_equals_uncached']}.")
    if kind == "compiled_sampling":
        lines.append(f"Compiled against eager images: at most {rec['max_pixel_difference']} of 255 apart "
                     f"(mean {rec['mean_pixel_difference']:.1e}).")  # fmt: skip
    if kind == "unet_int8":
        lines.append(f"Relative RMS error of the predicted noise by timestep: {rec['relative_rms_error_by_timestep']}; "
                     f"the call that compiles, in seconds: {rec['first_call_s']}.")  # fmt: skip
    if kind == "train_step":
        lines.append(f"Ours / official samples/s: {rec['speedup_ours_vs_official']:.2f}x; GNN and labels: "
                     f"{res['gnn+labels']['share_of_ours_pct']:.2f}% of our step.")  # fmt: skip
    for text, check in TARGETS.get(kind, []):
        try:
            verdict = check(res)
        except KeyError:
            verdict = MISSING
        lines.append(f"- Target {text}: {verdict}.")
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
