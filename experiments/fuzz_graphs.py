"""Fuzz the scene-graph reader: every input either parses or raises SceneGraphError, none hangs, and the
memory each takes stays within what the configured limits allow.

    python experiments/fuzz_graphs.py                  # 20,000 inputs, seed 0
    python experiments/fuzz_graphs.py --n 100000 --seed 3

Inputs are drawn from seeded generators: random JSON values (any code point, huge and tiny numbers,
NaN/Infinity), valid graphs mutated (a field's type swapped, an index made a boolean / float / string /
out of range, a label emptied or made huge), truncated and byte-flipped texts, deep nesting, and lists at
and beyond the limits. Each is parsed with ``parse_scene_graphs`` under ``Limits``; the time and the peak
Python memory (tracemalloc) of each parse are recorded. Prints a summary and writes it (with the worst
inputs, shortened) to experiments/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg2img.graph import Limits, SceneGraphError, parse_scene_graphs  # noqa: E402

ODD = ["\u0000", "\u202e", "\ufeff", "\U0001f600", "e\u0301", "\ud800", " ", "\t\n", "ß", "İ", "\u2028"]


class Hang(Exception):
    pass


def rand_text(r: random.Random, n: int = 12) -> str:
    out = []
    for _ in range(r.randint(0, n)):
        k = r.random()
        if k < 0.5:
            out.append(chr(r.randint(32, 126)))
        elif k < 0.8:
            out.append(chr(r.randint(0, 0x10FFFF)))
        else:
            out.append(r.choice(ODD))
    return "".join(out)


def rand_value(r: random.Random, depth: int = 0):
    k = r.random()
    if depth > 4 or k < 0.35:
        return r.choice(
            [
                None,
                True,
                False,
                r.randint(-5, 10),
                r.randint(-(2**80), 2**80),
                r.uniform(-2, 2),
                float("nan"),
                float("inf"),
                rand_text(r),
            ]
        )
    if k < 0.65:
        return [rand_value(r, depth + 1) for _ in range(r.randint(0, 6))]
    keys = ["objects", "relationships", "name", "attributes", "box", "subject", "predicate", "object"]
    return {
        (r.choice(keys) if r.random() < 0.6 else rand_text(r, 6)): rand_value(r, depth + 1)
        for _ in range(r.randint(0, 5))
    }


def valid_graph(r: random.Random) -> dict:
    n = r.randint(0, 8)
    objects = [
        {"name": rand_text(r, 8) or "x", "attributes": [rand_text(r, 5) or "a"], "box": sorted([r.random(), r.random()]) * 2}
        if r.random() < 0.5 else (rand_text(r, 8) or "y")
        for _ in range(n)
    ]  # fmt: skip
    rels = (
        [[r.randrange(n), rand_text(r, 8) or "near", r.randrange(n)] for _ in range(r.randint(0, 10))]
        if n
        else []
    )
    return {"objects": objects, "relationships": rels}


def mutate(r: random.Random, g: dict):
    bad = [True, False, 1.0, 2.5, "0", None, [], {}, -1, 10**30, float("nan"), rand_text(r)]
    k = r.randrange(8)
    if k == 0 and g["relationships"]:
        rel = r.choice(g["relationships"])
        rel[r.choice([0, 2])] = r.choice(bad)
    elif k == 1 and g["objects"]:
        i = r.randrange(len(g["objects"]))
        g["objects"][i] = r.choice([*bad, "", " " * 5, "x" * 5000])
    elif k == 2:
        g[r.choice(["objects", "relationships"])] = r.choice(bad)
    elif k == 3 and g["objects"] and isinstance(g["objects"][0], dict):
        g["objects"][0]["box"] = r.choice(
            [[0, 0, 2, 1], [0.5, 0.5, 0.1, 0.9], [0, 0, 1], "box", [True, 0, 1, 1]]
        )
    elif k == 4:
        g[rand_text(r, 5) or "extra"] = rand_value(r)
    elif k == 5 and g["relationships"]:
        g["relationships"][0] = r.choice([[0, "x"], [0, "x", 0, 0], {"subject": 0}, "0 near 1", 7])
    elif k == 6:
        g["objects"] = ["o"] * r.choice([0, 256, 257, 5000])
    else:
        g["relationships"] = [[0, "p", 0]] * r.choice([2048, 2049, 20000]) if g["objects"] else []
    return g


def make_input(r: random.Random) -> str:
    kind = r.randrange(7)
    if kind == 0:
        return json.dumps(rand_value(r))
    if kind == 1:
        return json.dumps(mutate(r, valid_graph(r)))
    if kind == 2:
        text = json.dumps([valid_graph(r) for _ in range(r.randint(1, 4))])
        return text[: r.randint(0, len(text))]
    if kind == 3:
        text = bytearray(json.dumps(valid_graph(r)).encode())
        for _ in range(r.randint(1, 4)):
            if text:
                text[r.randrange(len(text))] = r.randrange(256)
        return text.decode("utf-8", errors="surrogateescape")
    if kind == 4:
        depth = r.choice([10, 100, 1000, 10_000, 100_000])
        opener = r.choice(["[", '{"objects": [', '{"a": '])
        return opener * depth + "1" + ("]" if opener == "[" else "}") * depth
    if kind == 5:
        count = r.choices([0, 1, 10, 10_001], weights=[30, 30, 39, 1])[0]  # the limit: 10,000 graphs
        return json.dumps([valid_graph(r) for _ in range(count)])
    return json.dumps(valid_graph(r))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="CPU seconds one parse may take (CPU time: a loaded machine does not make a parse a hang)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "fuzz.json")
    args = ap.parse_args(argv)
    limits = Limits()
    r = random.Random(args.seed)
    counts = {"parsed": 0, "SceneGraphError": 0, "other exception": 0, "hang": 0}
    failures, slowest, biggest = [], (0.0, "", 0.0), (0, "")
    max_input = 0

    def alarm(signum, frame):
        raise Hang

    signal.signal(signal.SIGPROF, alarm)  # ITIMER_PROF counts this process's CPU time, not the wall clock
    tracemalloc.start()
    start = time.perf_counter()
    for _ in range(args.n):
        text = make_input(r)
        max_input = max(max_input, len(text))
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        signal.setitimer(signal.ITIMER_PROF, args.timeout)
        try:
            parse_scene_graphs(text, "fuzz.json", limits)
            counts["parsed"] += 1
        except SceneGraphError:
            counts["SceneGraphError"] += 1
        except Hang:
            counts["hang"] += 1
            failures.append({"kind": "hang", "input": text[:200]})
        except Exception as e:  # what must never happen
            counts["other exception"] += 1
            failures.append({"kind": f"{type(e).__name__}: {e}"[:300], "input": text[:200]})
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1] - base
        if cpu > slowest[0]:
            slowest = (cpu, text[:120], dt)
        if peak > biggest[0]:
            biggest = (peak, text[:120])
    total = time.perf_counter() - start
    tracemalloc.stop()
    record = {
        "command": " ".join(
            ["python", "experiments/fuzz_graphs.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "inputs": args.n,
        "seed": args.seed,
        "counts": counts,
        "seconds": round(total, 1),
        "slowest_parse_cpu_s": round(slowest[0], 4),
        "slowest_parse_wall_s": round(slowest[2], 4),  # a figure only: the wall clock depends on the load
        "slowest_input": slowest[1],
        "peak_parse_memory_bytes": biggest[0],
        "peak_memory_input": biggest[1],
        "largest_input_chars": max_input,
        "limits": vars(limits) if hasattr(limits, "__dict__") else str(limits),
        "failures": failures[:20],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, ensure_ascii=True) + "\n")
    print(
        json.dumps({k: v for k, v in record.items() if k not in ("failures",)}, indent=2, ensure_ascii=True)
    )
    ok = counts["other exception"] == 0 and counts["hang"] == 0
    print("every input parsed or raised SceneGraphError" if ok else f"FAILURES: {failures[:3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
