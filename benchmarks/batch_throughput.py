"""Batch throughput: the same rows through different executors and worker counts.

    python benchmarks/batch_throughput.py [--rows 8] [--steps 100] [--setups local:1x2 local:2x1 ray:2x1]
        [--out FILE.md] [key=value ...]

A setup is ``EXECUTOR:WORKERSxTHREADS`` (torch threads per worker). Every setup runs the same rows
(shapes-world prompts on the built-in prior, ``--steps`` steps each, the default preset plus the
given overrides) into its own fresh folder, and the table gives the batch's wall time (executor
start-up included), rows per minute, and the mean time of one row inside its worker. Short rows
(``--steps 5 export.formats=[] export.turntable=false``) show the per-row overhead of an executor.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red cube", "a blue sphere", "a green cylinder", "a yellow cone", "a purple torus", "a red mug",
           "a orange cube", "a green sphere", "a blue cone", "a yellow torus", "a purple mug", "a red cylinder"]


def run_setup(setup: str, rows: int, steps: int, overrides, root: Path) -> dict:
    from threedistill.batch import run_batch

    executor, _, shape = setup.partition(":")
    workers, _, threads = shape.partition("x")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((PROMPTS * (rows // len(PROMPTS) + 1))[:rows]) + "\n")
    out = root / setup.replace(":", "-")
    t0 = time.perf_counter()
    totals = run_batch(prompts, out, overrides=[f"run.steps={steps}", *overrides], executor=executor,
                       workers=int(workers), threads=int(threads), progress=False, log=lambda *_: None)
    wall = time.perf_counter() - t0
    entries = [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]
    per_row = sum(e["wall_s"] for e in entries) / max(1, len(entries))
    return {"setup": setup, "rows": rows, "done": totals["done"], "wall_s": wall,
            "rows_per_min": 60.0 * totals["done"] / wall, "row_s": per_row}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--setups", nargs="+", default=["local:1x2", "local:2x1", "ray:2x1"])
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--keep", type=Path, help="run in this folder (kept) instead of a temporary one")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    header = (f"{args.rows} rows x {args.steps} steps (shapes prior, default preset"
              + (f", {' '.join(args.overrides)}" if args.overrides else "") + f"), {os.cpu_count()} CPU cores")
    lines = [header, "", "| setup (executor:workers x threads) | rows done | batch wall (s) | rows / min | mean row time in worker (s) |",
             "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for setup in args.setups:
            r = run_setup(setup, args.rows, args.steps, args.overrides, root)
            lines.append(f"| {r['setup']} | {r['done']}/{r['rows']} | {r['wall_s']:.1f} | {r['rows_per_min']:.2f} | {r['row_s']:.1f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
