"""Shared by the benchmarks: alternating timed runs, medians, ratios against a baseline of the same run,
the device record, and the table / JSON output (``experiments/results/bench/<name>.json``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results" / "bench"


def device_record(device: torch.device) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    else:
        rec.update(cpu_features())
    return rec


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")  # CPU instructions that compute in bfloat16


def cpu_features() -> dict[str, Any]:
    """The CPU's model name, torch's kernel level and its bfloat16 instructions (Linux ``/proc/cpuinfo``):
    a bfloat16 figure depends on them, since without them oneDNN converts to float32 and back."""
    out: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
        flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
        out.update(cpu_model=model, cpu_bf16_instructions=sorted(f for f in BF16_FLAGS if f in flags))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    variants: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    setup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed calls each, then ``repeats`` rounds in which
    every variant runs once, the order rotating by one each round (so drift and caches hit all alike).
    ``setup[name]`` (untimed) runs before each of that variant's calls (e.g. swapping processors)."""
    names = list(variants)
    setup = setup or {}
    for name in names:
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in setup:
                setup[name]()
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    base = statistics.median(times[baseline])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "runs": len(ts),
            "ratio": med / base,
            "overhead_pct": 100.0 * (med / base - 1.0),
        }
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write(name: str, record: dict[str, Any], out: Path | None = None) -> Path:
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": " ".join(["python", *[os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]]),
        **record,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
