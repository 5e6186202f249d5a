"""The quality matrix: every ``<loss>-nerf`` / ``<loss>-gaussians`` preset and the ``-then-mesh``
chains over the shapes-world benchmark prompts, scored against the ground truth.

Each cell is one ``benchmarks/shapes_quality.py`` folder under ``--out`` (resumable: finished runs
are scored again, not re-run). Its runs (prompt x seed) are the units of work: they train side by
side in ``--lanes`` processes at one torch thread each (on a 2-core CPU: 2 lanes; on a GPU: as many
as fit), every run of every cell in one queue, so 2 lanes finish one cell in half the time and a
GPU with many lanes is never idle while one cell's runs remain. Once a cell's runs are trained, one
plain ``shapes_quality.py`` call in the same queue scores the folder (``results.json``). At the end
the cells' ``results.json`` are gathered into ``quality-matrix.md`` (per cell: IoU, shape IoU, size, color
error, prompt accuracy, mug view consistency, haze, floaters, color noise, wall time) and
``quality-matrix.png`` (an 8-view strip per cell for ``--strip-prompt``, so a reader can look).

    python benchmarks/quality_matrix.py --out bench-out/matrix [--lanes 2] [--presets sds-nerf ...]
        [--prompts ...] [--sds-seeds 0 1] [-- key=value ...]

``--variant NAME="key=value ..."`` (repeatable) adds an ablation: for every preset, one more cell
``<preset>+NAME`` run with those overrides, and an ablation table of each variant's change against
its preset (``ablation.md``):

    python benchmarks/quality_matrix.py --out bench-out/ablation --presets sds-nerf sds-gaussians \
        --variant perp-neg="guidance.perp_neg=true" --variant no-taper="representation.nerf.blob_density=10"

``--report-only`` rebuilds the table and the image from what is on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes_quality import DEFAULT_PROMPTS  # noqa: E402

LOSSES = ("sds", "vsd", "esd", "ism", "csd", "nfsd")
CHAINS = ("sds-nerf-then-mesh", "sds-gaussians-then-mesh", "sds-nerf-then-gaussians")
DEFAULT_PRESETS = [f"{loss}-{rep}" for rep in ("nerf", "gaussians") for loss in LOSSES] + list(CHAINS)

COLUMNS = [("iou", "IoU", ".3f"), ("shape_iou", "shape IoU", ".3f"), ("size", "size", ".2f"),
           ("color_error", "color err", ".3f"), ("prompt_correct", "prompt acc", ".2f"),
           ("view_consistency", "mug view cons.", ".2f"), ("haze", "haze", ".3f"), ("floaters", "floaters", ".3f"),
           ("mesh_iou", "GLB IoU", ".3f"), ("mesh_color_error", "GLB color err", ".3f"),
           ("color_noise", "color noise", "+.3f"), ("wall_s", "wall s/run", ".0f")]


def cell_command(preset: str, out: Path, prompts: List[str], seeds: List[int], extra: List[str],
                 folder: str = "", runs_only: bool = False) -> List[str]:
    return [sys.executable, str(HERE / "shapes_quality.py"), "--out", str(out / (folder or preset)), "--config", preset,
            *(["--runs-only"] if runs_only else []), "--seeds", *map(str, seeds), "--prompts", *prompts, "--", *extra]


@dataclass
class Job:
    """One process of the queue: a run to train (``cell`` names the cell it belongs to) or a
    cell's scoring, which waits until every run job of its cell has ended."""
    name: str
    cmd: List[str]
    cell: str
    scores_cell: bool = False


def plan_jobs(cells: Dict[str, tuple], prompts: List[str], out: Path) -> List[Job]:
    """``cells``: name -> (preset, seeds, overrides). One training job per prompt x seed of every
    cell, cell after cell, then one scoring job per cell (queued behind its cell's runs)."""
    from threedistill.runs import slugify

    jobs: List[Job] = []
    for name, (preset, seeds, extra) in cells.items():
        for prompt in prompts:
            for seed in seeds:
                jobs.append(Job(f"{name}/{slugify(prompt)}-seed{seed}",
                                cell_command(preset, out, [prompt], [seed], extra, folder=name, runs_only=True),
                                name))
        jobs.append(Job(f"{name}/score", cell_command(preset, out, prompts, seeds, extra, folder=name),
                        name, scores_cell=True))
    return jobs


def run_jobs(jobs: List[Job], lanes: int, log_dir: Path, popen=subprocess.Popen, poll_s: float = 1.0) -> Dict[str, int]:
    """Run the jobs ``lanes`` at a time at one torch thread each, in order, except that a cell's
    scoring job starts only once all its run jobs have ended (and is skipped, exit code -1, when
    one of them failed: scoring would train that run again in a single lane); the exit codes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = list(jobs)
    running: Dict[str, tuple] = {}
    codes: Dict[str, int] = {}
    log_dir.mkdir(parents=True, exist_ok=True)

    def runs_left(cell: str) -> bool:
        return any(j.cell == cell and not j.scores_cell for j in pending) or \
            any(j.cell == cell and not j.scores_cell for j, _ in running.values())

    while pending or running:
        for job in list(pending):
            if len(running) >= lanes:
                break
            if job.scores_cell:
                if runs_left(job.cell):
                    continue
                failed = [n for n, c in codes.items() if c and n.startswith(job.cell + "/")]
                if failed:
                    pending.remove(job)
                    codes[job.name] = -1
                    print(f"{job.name}: skipped, failed runs {failed}", file=sys.stderr)
                    continue
            pending.remove(job)
            log_path = log_dir / (job.name.replace("/", "__") + ".log")
            with open(log_path, "w") as log:
                running[job.name] = (job, popen(job.cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"started {job.name}", file=sys.stderr)
        for name, (job, proc) in list(running.items()):
            code = proc.poll()
            if code is not None:
                codes[name] = code
                del running[name]
                print(f"{name}: exit {code}", file=sys.stderr)
        if pending or running:
            time.sleep(poll_s)
    return codes


def _fmt(v, spec: str) -> str:
    if v is None or v != v:
        return "–"
    return format(v, spec)


def parse_variants(values: List[str]) -> Dict[str, List[str]]:
    """``NAME=key=value key=value`` -> {NAME: [overrides]} (the first ``=`` ends the name)."""
    variants: Dict[str, List[str]] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name.strip() or not rest.strip() or "/" in name or "+" in name:
            raise SystemExit(f"--variant must be NAME=\"key=value ...\" (a name without / or +), got '{v}'")
        variants[name.strip()] = rest.split()
    return variants


def ablation(out: Path, presets: List[str], variants: Dict[str, List[str]]) -> str:
    """Each variant's summary minus its preset's, per metric (``ablation.md``)."""
    def summary(cell: str):
        res = out / cell / "results.json"
        return json.loads(res.read_text())["summary"]["all"] if res.is_file() else None

    lines = ["# Ablation (shapes world): each variant against its preset", "",
             "Values are the variant's mean, with the change against the preset in brackets.", "",
             "| preset | variant | overrides | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for preset in presets:
        base = summary(preset)
        lines.append(f"| {preset} | (preset) | | " + " | ".join(
            _fmt(base.get(k) if base else None, f) for k, _, f in COLUMNS) + " |")
        for name, overrides in variants.items():
            s = summary(f"{preset}+{name}")
            cells = []
            for k, _, f in COLUMNS:
                v = s.get(k) if s else None
                b = base.get(k) if base else None
                d = f" ({v - b:+{f.lstrip('+')}})" if v is not None and b is not None and v == v and b == b else ""
                cells.append(_fmt(v, f) + d)
            lines.append(f"| {preset} | {name} | `{' '.join(overrides)}` | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(table)
    return table


def report(out: Path, presets: List[str], strip_prompt: str) -> str:
    lines = ["# Quality matrix (shapes world, ground truth)", "",
             "Per cell: the mean over its prompts x seeds (`results.json` of each cell folder has every run). "
             "Bar (issue 18): IoU >= 0.85, size 0.8-1.25, prompt acc >= 0.95, color err <= 0.12, mug view "
             "consistency >= 0.75, haze and floaters near 0.", "",
             "| cell | runs | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    found = []
    for preset in presets:
        res = out / preset / "results.json"
        if not res.is_file():
            lines.append(f"| {preset} | 0 | " + " | ".join("–" for _ in COLUMNS) + " |")
            continue
        data = json.loads(res.read_text())
        s = data["summary"]["all"]
        found.append((preset, data))
        lines.append(f"| {preset} | {s['runs']} | " + " | ".join(_fmt(s.get(k), f) for k, _, f in COLUMNS) + " |")
    chains = [(p, d) for p, d in found if any("coarse_iou" in r for r in d["runs"])]
    if chains:
        lines += ["", "Refine stage against its coarse run (per prompt and seed):", "",
                  "| chain | prompt | seed | IoU coarse -> refined | color err coarse -> refined |", "|---|---|---|---|---|"]
        for p, d in chains:
            for r in d["runs"]:
                lines.append(f"| {p} | {r['prompt']} | {r['seed']} | {r['coarse_iou']:.3f} -> {r['iou']:.3f} | "
                             f"{r['coarse_color_error']:.3f} -> {r['color_error']:.3f} |")
    table = "\n".join(lines) + "\n"
    (out / "quality-matrix.md").write_text(table)
    strip(out, [p for p, _ in found], strip_prompt)
    return table


def strip(out: Path, presets: List[str], prompt: str) -> None:
    """``quality-matrix.png``: one row per cell, the 8 evaluation azimuths (30 degrees up) of the
    cell's seed-0 run of ``prompt``, labelled."""
    import torch
    from PIL import Image, ImageDraw

    from threedistill.runs import RunFolder, slugify
    from threedistill.shapes.evaluate import EVAL_AZIMUTHS, eval_renders

    rows = []
    for preset in presets:
        folder = RunFolder(out / preset / f"{slugify(prompt)}-seed0")
        final = folder.refine if folder.refine.is_run() else folder
        if final.latest_checkpoint() is None:
            continue
        cfg, rep, _ = final.load_representation(device="cpu")
        rgb, _, _ = eval_renders(rep, cfg.camera, resolution=96)
        views = rgb[len(EVAL_AZIMUTHS):]  # the 30-degree ring
        row = (torch.cat(list(views.clamp(0, 1)), dim=2).permute(1, 2, 0).numpy() * 255).astype("uint8")
        rows.append((preset, row))
    if not rows:
        return
    label_w, h, w = 190, rows[0][1].shape[0], rows[0][1].shape[1]
    img = Image.new("RGB", (label_w + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for i, (preset, row) in enumerate(rows):
        img.paste(Image.fromarray(row), (label_w, i * h))
        draw.text((6, i * h + h // 2 - 6), preset, fill="black")
    draw.text((6, 2), prompt, fill="gray")
    img.save(out / "quality-matrix.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/quality-matrix")
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every cell")
    ap.add_argument("--sds-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the SDS cells")
    ap.add_argument("--lanes", type=int, default=2, help="runs trained side by side, one torch thread each")
    ap.add_argument("--strip-prompt", default="a red mug")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="key=value ..."',
                    help="an ablation: every preset again with these overrides, cell <preset>+NAME")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="for every cell (after --)")
    args = ap.parse_args(argv)
    if args.lanes < 1:
        ap.error("--lanes must be >= 1")
    variants = parse_variants(args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        cells = {}
        for p in args.presets:
            seeds = args.sds_seeds if p.startswith("sds-") else args.seeds
            cells[p] = (p, seeds, list(args.overrides))
            for name, extra in variants.items():
                cells[f"{p}+{name}"] = (p, seeds, [*args.overrides, *extra])
        t0 = time.time()
        jobs = plan_jobs(cells, args.prompts, out)
        codes = run_jobs(jobs, args.lanes, out / "logs")
        print(f"matrix: {len(cells)} cells, {sum(not j.scores_cell for j in jobs)} runs in {time.time() - t0:.0f} s; "
              f"failed: {[n for n, c in codes.items() if c] or 'none'}", file=sys.stderr)
    cells = [c for p in args.presets for c in (p, *(f"{p}+{n}" for n in variants))]
    print(report(out, cells, args.strip_prompt))
    if variants:
        print(ablation(out, list(args.presets), variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
