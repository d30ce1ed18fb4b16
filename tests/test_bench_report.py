"""The benchmark report's verdicts: a target is met only when every timed run agrees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_report", ROOT / "experiments" / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)
SPEEDUP = dict(report.TARGETS["train_step"])[">= 1.5x the official recipe's samples/s"]


def timed(median: float, low: float, high: float, **more) -> dict:
    return {"median_s": median, "min_s": low, "max_s": high, **more}


def test_a_speedup_target_reads_the_faster_variant_as_ours():
    fast, slow = timed(7.9, 7.8, 8.2), timed(17.6, 17.3, 18.8)
    assert SPEEDUP({"ours": fast, "official": slow}) == report.MET  # 2.2x
    assert SPEEDUP({"ours": slow, "official": fast}) == report.NOT_MET
    assert (
        SPEEDUP({"ours": timed(12.0, 11.0, 12.5), "official": slow}) == report.NOISE
    )  # spreads straddle 1.5x


def test_a_missing_figure_is_not_measured_and_memory_compares_single_figures():
    assert report.at_most({"median_s": 1.0}, {}) == report.MISSING
    ours, official = {"peak_memory_bytes": 1.0e9}, {"peak_memory_bytes": 1.1e9}
    assert report.at_most(ours, official, key="peak_memory_bytes") == report.MET
    assert report.at_most(official, ours, key="peak_memory_bytes") == report.NOT_MET


def test_every_record_layout_gets_a_section():
    """Records that keep the device at the top level and group their variants, or lack a figure, are
    reported row by row instead of stopping the report."""
    device = {"cpu": "x86_64", "cpu_threads": 2, "torch": "2.14.1"}
    grouped = {
        "benchmark": "shapes_unet_sizes-cpu",
        "command": "python experiments/bench/shapes_unet_sizes.py",
        "setting": {"steps": 3},
        "device": "cpu",
        **device,
        "results": {"train": {"preset": timed(2.0, 1.9, 2.1, ratio=1.0)}, "sample": {"preset": {"runs": 1}}},
    }
    lines = report.section(grouped)
    assert "Device: x86_64 CPU, 2 threads (torch 2.14.1)." in lines[4]
    assert "| train: preset | 2.000 s | 1.000 |" in lines
    assert f"| sample: preset | {report.MISSING} | {report.MISSING} |" in lines
    nested = {
        **grouped,
        "benchmark": "unet_flops-cpu",
        "device": device,
        "results": {"nchw": timed(0.3, 0.3, 0.3, ratio=1.0)},
    }
    assert f"| nchw | 0.300 s | 1.000 | {report.MISSING} |" in report.section(nested)  # no GFLOP/s figure
