"""The ``threedistill`` command.

    threedistill [-v] COMMAND ...
    threedistill generate "PROMPT" [-c PRESET|FILE ...] [--out DIR] [--plan] [key=value ...]
    threedistill generate --resume RUN_DIR [key=value ...]
    threedistill refine RUN_DIR [-c PRESET|FILE] [key=value ...]
    threedistill export RUN_DIR [-f glb|obj|ply|splat ...] [--resolution N] [--threshold X] [--surface S]
                            [--texture-size N] [--no-texture] [--output FILE] [--check] [--check-images]
    threedistill render RUN_DIR [--frames N] [--resolution N] [--fps N] [--output FILE]
    threedistill batch INPUT.txt|.jsonl|.csv [-c PRESET|FILE ...] [--out DIR] [--seeds N]
                            [--executor local|ray] [--workers N] [--threads N] [--ray-address ADDR]
                            [--retries R] [--no-progress] [key=value ...]
    threedistill eval RUN_DIR [RUN_DIR ...] [--json]
    threedistill list [OUT_DIR]
    threedistill preview "PROMPT" [-c PRESET|FILE ...] [--out FILE] [--samples N] [--steps N] [key=value ...]
    threedistill plot RUN_DIR [--out FILE]
    threedistill app [--host 127.0.0.1] [--port 7860] [--out DIR] [--auth USER:PASSWORD] [--insecure]
    threedistill presets
    threedistill prior train OUT_DIR [--steps N] [--batch-size N] [--lr X] [--images-per-prompt N]
                            [--checkpoint-every N] [--seed N] [--init-from PIPELINE] [--device auto|cpu|cuda[:N]]
    threedistill prior eval [--prior NAME] [--samples N] [--steps N] [--guidance-scale X] [--seed N]
                            [--grid PNG] [--json FILE]
    threedistill prior train-classifier OUT.safetensors [--steps N] [--seed N]

Errors a user can cause print one line (``error: ...``) and exit with status 2; an interrupted
run exits 130 after writing a checkpoint it can be resumed from.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from threedistill.atomic import atomic_write_text
from threedistill.batch import check_batch_flags, run_batch
from threedistill.config import EXPORT_BOUNDS, EXPORT_SURFACES, PriorConfig, is_override, list_presets, load_config
from threedistill.devices import OOM_HINT, out_of_memory
from threedistill.errors import UserError
from threedistill.export import (build_export_mesh, export_placement, render_turntable, save_image, save_mesh,
                                 texture_paths)
from threedistill.export.check import check_cameras, comparison_grid, fidelity_check, format_check
from threedistill.pipeline import RunRequest, plan_run, prepare_config, prepare_run, run_prepared
from threedistill.plots import write_curves
from threedistill.preview import DEFAULT_SAMPLES, DEFAULT_STEPS, image_format, sample_preview, write_preview
from threedistill.priors import load_prior
from threedistill.runs import RunFolder
from threedistill.shapes.classifier import load_classifier, train_classifier
from threedistill.shapes.evaluate import evaluate_prior_samples
from threedistill.shapes.prior import PriorTrainConfig, PriorTrainer
from threedistill.shapes.world import all_prompts

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. run.steps=500 guidance.guidance_scale=50 "
                        "guidance.t_max=[0.98,0.5,0,5000]")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="threedistill",
        description="Text-to-3D by score distillation from a frozen 2D diffusion prior.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="distill one prompt into a 3D asset (a run folder)")
    g.add_argument("prompt", nargs="?", default=None, help='the text prompt, e.g. "a red cube"')
    g.add_argument("--config", "-c", action="append",
                   help="YAML config file or preset name (`threedistill presets` lists them; repeatable, merged in order: "
                        "e.g. -c vsd-nerf -c sd)")
    g.add_argument("--out", "-o", help="output root folder (default: run.out_dir = outputs)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g.add_argument("--plan", action="store_true",
                   help="run two steps at the largest resolution and camera batch the run reaches, print the "
                        "expected peak memory, time per step and total time, and exit (no run folder is made)")
    _add_overrides(g)

    rf = sub.add_parser("refine", help="continue a finished run as a mesh (or Gaussians) started on its surface "
                        "(a run in RUN_DIR/refine)")
    rf.add_argument("run_dir", help="a finished run folder (NeRF, Gaussians or mesh)")
    rf.add_argument("--config", "-c", help="the refine stage's preset or YAML file "
                    "(a mesh or Gaussians run; default: the run's refine.config, sds-mesh)")
    _add_overrides(rf)

    e = sub.add_parser("export", help="extract and write the mesh of a run")
    e.add_argument("run_dir")
    e.add_argument("--format", "-f", choices=["glb", "obj", "ply", "splat"], action="append",
                   help="mesh format, or splat for a Gaussians run's 3DGS splat.ply (repeatable; default glb)")
    e.add_argument("--resolution", type=int, help="marching-cubes grid size (default export.mesh_resolution)")
    e.add_argument("--threshold", type=float, help="density iso level (default from the representation config)")
    e.add_argument("--surface", choices=list(EXPORT_SURFACES),
                   help="which level set without --threshold: silhouette (the level whose silhouette matches the "
                        "render) or isosurface (the representation's isosurface_threshold); default export.surface")
    e.add_argument("--texture-size", type=int, metavar="N",
                   help="baked base-color texture size for glb/obj (default export.texture_size)")
    e.add_argument("--no-texture", action="store_true",
                   help="vertex colors instead of a baked texture (as export.texture=false)")
    e.add_argument("--output", help="output file (default RUN_DIR/model.<format>)")
    e.add_argument("--check", action="store_true",
                   help="render the written mesh file (the first format) and the run's representation from 8 "
                        "views and write the differences to RUN_DIR/export_check.json")
    e.add_argument("--check-images", action="store_true",
                   help="with --check (implied): also write RUN_DIR/export_check.png (renders, mesh, difference)")

    r = sub.add_parser("render", help="render a run's turntable video")
    r.add_argument("run_dir")
    r.add_argument("--frames", type=int)
    r.add_argument("--resolution", type=int)
    r.add_argument("--fps", type=int)
    r.add_argument("--output", help="output file (default RUN_DIR/turntable.mp4)")

    b = sub.add_parser("batch", help="run many prompts resumably: a text file (one per line), JSONL or CSV rows; "
                                      "local worker processes or Ray; a manifest, summary.md and an HTML gallery")
    b.add_argument("input", metavar="INPUT", help="prompts .txt (one per line), or .jsonl / .csv rows with prompt, "
                                                "seed, preset, overrides, id")
    b.add_argument("--config", "-c", action="append",
                   help="YAML config file or preset name (`threedistill presets`) for every row (repeatable, merged in order)")
    b.add_argument("--out", "-o", help="batch folder: runs, batch.jsonl, summary.md, index.html (default: run.out_dir = outputs)")
    b.add_argument("--seeds", type=int, default=1, help="seeds per input row (seed, seed+1, ...; default 1)")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine (default); ray: one Ray task per row")
    b.add_argument("--workers", type=int, help="rows at once (default: one per visible GPU, else 1)")
    b.add_argument("--threads", type=int, help="torch threads per CPU worker (default: cores / workers)")
    b.add_argument("--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray")
    b.add_argument("--retries", type=int, default=1, help="retries of a row whose attempt crashed (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    _add_overrides(b)

    ls = sub.add_parser("list", help="the runs in an outputs folder: status (a run whose process died is "
                                     "interrupted), step, prompt")
    ls.add_argument("out_dir", nargs="?", default=None, metavar="OUT_DIR",
                    help="outputs folder (default: run.out_dir = outputs)")

    ev = sub.add_parser("eval", help="score runs of shapes-world prompts against the ground truth")
    ev.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    pv = sub.add_parser("preview", help="check a prompt in 2D first: the prior's samples for the prompt under each "
                                         "view suffix (front/side/back), at the run's CFG, as one image grid")
    pv.add_argument("prompt", nargs="?", default=None, help='the text prompt, e.g. "a red cube"')
    pv.add_argument("--config", "-c", action="append",
                    help="YAML config file or preset name from configs/ (repeatable, as for generate): its prior, "
                         "negative prompt and guidance.guidance_scale are used")
    pv.add_argument("--out", "-o", default="preview.png", help="the grid image to write (default preview.png)")
    pv.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                    help=f"samples per view, the grid's columns (default {DEFAULT_SAMPLES})")
    pv.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    _add_overrides(pv)

    pl = sub.add_parser("plot", help="draw a run's curves (loss, grad norm, t, lr, Gaussians, time per step, "
                                     "evaluation) into RUN_DIR/curves.png")
    pl.add_argument("run_dir")
    pl.add_argument("--out", "-o", help="the PNG to write (default RUN_DIR/curves.png)")

    pr = sub.add_parser("prior", help="train or check the built-in shapes prior")
    prs = pr.add_subparsers(dest="prior_command", metavar="PRIOR_COMMAND")
    pt = prs.add_parser("train", help="train the shapes-world prior (resumable: run again to continue)")
    pt.add_argument("out_dir", help="training folder (dataset, checkpoints, pipeline/)")
    pt.add_argument("--steps", type=int, help="total steps (default 6000; may be raised on resume)")
    pt.add_argument("--batch-size", type=int)
    pt.add_argument("--lr", type=float)
    pt.add_argument("--images-per-prompt", type=int)
    pt.add_argument("--checkpoint-every", type=int)
    pt.add_argument("--seed", type=int)
    pt.add_argument("--init-from", metavar="PIPELINE", help="start a new training folder from these weights "
                    "(e.g. shapes: the shipped prior, to train the shipped prior further)")
    pt.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    pe = prs.add_parser("eval", help="classify the prior's own samples for every shapes-world prompt")
    pe.add_argument("--prior", default="shapes", help="prior name or pipeline folder (default: shapes)")
    pe.add_argument("--samples", type=int, default=8, help="samples per prompt (default 8)")
    pe.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    pe.add_argument("--guidance-scale", type=float, default=7.5)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--grid", help="write a PNG grid of the samples (one row per prompt) here")
    pe.add_argument("--json", help="write the per-prompt table as JSON here")
    pc = prs.add_parser("train-classifier", help="train the shapes-world shape/color classifier used by eval")
    pc.add_argument("out_file", help="output .safetensors file (metadata goes next to it as .json)")
    pc.add_argument("--steps", type=int, default=1500)
    pc.add_argument("--seed", type=int, default=0)
    ap = sub.add_parser("app", help="serve the web app (Gradio) on this machine")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--out", "-o", "--outputs", dest="out", default="outputs",
                    help="outputs folder: runs are written and read here only (default outputs)")
    ap.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                    help="require this login (default: $THREEDISTILL_AUTH when set); needed to bind a non-loopback "
                         "address")
    ap.add_argument("--insecure", action="store_true",
                    help="serve a non-loopback address without a login (anyone who reaches it can use it)")
    sub.add_parser("presets", help="list the shipped presets (for -c NAME) with what each one is")
    return parser


# ----------------------------------------------------------------------------------------------
def cmd_app(args) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from threedistill.app.ui import launch, resolve_auth
    except ImportError as e:
        raise UserError(f"the web app needs gradio ({e}); install it with `pip install gradio`") from None
    launch(args.host, args.port, args.out, auth=resolve_auth(args.auth), insecure=args.insecure)
    return 0


def cmd_presets(args) -> int:
    presets = list_presets()
    width = max(len(name) for name, _ in presets)
    for name, description in presets:
        print(f"{name:<{width}}  {description}")
    return 0


def _print_results(results) -> None:
    """Each stage's status, folder and outputs; for a chained run, the final asset last."""
    for r in results:
        label = "refine " if RunFolder(r.run_dir).is_refine_stage() else ""
        print(f"{label}{r.status}: {r.run_dir}")
        for kind, path in r.outputs.items():
            print(f"  {kind}: {path}")
    last = results[-1]
    if RunFolder(last.run_dir).is_refine_stage() and last.status == "finished" and last.outputs:
        kind = next((k for k in ("glb", "obj", "ply") if k in last.outputs), next(iter(last.outputs)))
        print(f"final: {last.outputs[kind]}")


def cmd_generate(args) -> int:
    looks_like_override = args.prompt is not None and is_override(args.prompt)
    if args.resume and looks_like_override:  # `generate --resume DIR run.steps=N`
        args.overrides = [args.prompt, *args.overrides]
        args.prompt = None
    if args.resume:
        if args.prompt:
            raise UserError("give either a prompt or --resume RUN_DIR, not both")
        if args.plan:
            raise UserError("--plan plans a new run: give a prompt (and its settings) instead of --resume")
        request = RunRequest(resume=Path(args.resume), overrides=args.overrides)
        cfg, folder = prepare_run(request)
        info = folder.read_status()
        if info:
            print(f"resuming {folder.path}: {info.get('status', 'unknown')} at step {info.get('step', '?')} of "
                  f"{info.get('steps', '?')}", file=sys.stderr)
        _print_results(run_prepared(cfg, folder))
        return 0
    else:
        if looks_like_override:
            raise UserError(f"the prompt is missing: '{args.prompt}' is a key=value override; "
                            "put the prompt first, e.g. threedistill generate \"a red cube\" run.steps=500")
        request = RunRequest(prompt=args.prompt or "", configs=args.config or [], overrides=args.overrides,
                             out_dir=args.out or None)
    request.on_warning = _warn
    if args.plan:
        for line in plan_run(prepare_config(request)).lines():
            print(line)
        return 0
    _print_results(_run_with_folder_first(*prepare_run(request)))
    return 0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _run_with_folder_first(cfg, folder: RunFolder):
    """Say where the run goes before the (slow) build, then run it."""
    print(f"run folder: {folder.path}", flush=True)
    return run_prepared(cfg, folder)


def cmd_refine(args) -> int:
    looks_like_override = args.run_dir is not None and is_override(args.run_dir)
    if looks_like_override:
        raise UserError(f"the run folder is missing: '{args.run_dir}' is a key=value override; "
                        "put the run folder first, e.g. threedistill refine outputs/my-run run.steps=400")
    request = RunRequest(refine_of=Path(args.run_dir), configs=[args.config] if args.config else [],
                         overrides=args.overrides, on_warning=_warn)
    _print_results(_run_with_folder_first(*prepare_run(request)))
    return 0


def _check_flag(name: str, value, bounds) -> None:
    """``--name`` (None: its default) lies within the config key's ``bounds`` (the schema's own, so
    a flag and its config key accept the same values); a finite number."""
    if value is None:
        return
    lo, hi = bounds
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UserError(f"--{name} must be between {lo:g} and {hi:g}, got {value}")


def cmd_export(args) -> int:
    _check_flag("resolution", args.resolution, EXPORT_BOUNDS["mesh_resolution"])
    _check_flag("texture-size", args.texture_size, EXPORT_BOUNDS["texture_size"])
    _check_flag("threshold", args.threshold, (-1e6, 1e6))  # the representations' isosurface_threshold bounds
    run_dir = Path(args.run_dir)
    folder = RunFolder(run_dir)
    cfg, rep, step = folder.load_representation()
    if args.surface:
        cfg.export.surface = args.surface
    formats = args.format or ["glb"]
    if args.output and len(formats) > 1:
        raise UserError("--output takes one --format")
    check = bool(args.check or args.check_images)
    if check and not any(f != "splat" for f in formats):
        raise UserError("--check compares a mesh file with the run: add --format glb, obj or ply")
    if "splat" in formats:
        if "splat" not in rep.extra_outputs():
            raise UserError(f"--format splat needs a Gaussians run; '{run_dir}' is a {cfg.representation.name} run")
        out = Path(args.output) if args.output else folder.splat_path
        rep.write_extra_output("splat", out)
        counts = "".join(f"{n} {k.capitalize()}, " for k, n in rep.progress_stats().items())
        print(f"splat: {out} ({counts}step {step})")
        formats = [f for f in formats if f != "splat"]
        if not formats:
            return 0
    texture = bool(cfg.export.texture) and not args.no_texture
    texture_size = args.texture_size if args.texture_size is not None else int(cfg.export.texture_size)
    if not 16 <= texture_size <= 8192:
        raise UserError(f"--texture-size must be between 16 and 8192, got {texture_size}")
    outs = []
    for fmt in formats:
        out = Path(args.output) if args.output else folder.mesh_path(fmt)
        if args.output and out.suffix.lstrip(".").lower() != fmt and args.format:
            raise UserError(f"--output '{out}' does not end in .{fmt}")
        outs.append(out)
    mesh, textured = build_export_mesh(rep, cfg.export, formats, resolution=args.resolution, threshold=args.threshold,
                                       texture=texture, texture_size=texture_size, camera_cfg=cfg.camera)
    for fmt, out in zip(formats, outs):
        written = textured if textured is not None and fmt != "ply" else mesh
        save_mesh(written, out, fmt, export_placement(mesh, fmt, cfg.export))
        extra = ""
        if written is textured:
            extra = f", {texture_size}px texture"
            if fmt == "obj":
                extra += " in " + ", ".join(str(p) for p in texture_paths(out))
        print(f"{fmt}: {out} ({len(written.vertices)} vertices, {len(written.faces)} faces{extra}, step {step})")
    if check:
        _export_check(rep, outs[0], folder, cfg, step, images=bool(args.check_images))
    return 0


def _export_check(rep, mesh_path: Path, folder: RunFolder, cfg, step: int, images: bool) -> None:
    """``export --check``: :func:`~threedistill.export.check.fidelity_check` of the written file
    from 8 views at the run's evaluation distance and field of view, 128 px."""
    import json

    cams = check_cameras(distance=cfg.camera.eval_distance, fovy=cfg.camera.eval_fovy, resolution=128)
    result = fidelity_check(rep, mesh_path, cams, return_images=images)
    pictures = result.pop("images", None)
    result["step"] = step
    json_path = folder.export_check_path
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    print(f"{format_check(result)} -> {json_path}")
    if pictures is not None:
        png = save_image(comparison_grid(pictures["rep_rgb"], pictures["mesh_rgb"]), folder.export_check_images_path)
        print(f"check images: {png} (top: renders, middle: mesh file, bottom: 4 x |difference|)")


def cmd_render(args) -> int:
    for name in ("frames", "resolution", "fps"):
        _check_flag(name, getattr(args, name), EXPORT_BOUNDS[f"turntable_{name}"])
    folder = RunFolder(args.run_dir)
    cfg, rep, _ = folder.load_representation()
    e, c = cfg.export, cfg.camera
    out = Path(args.output) if args.output else folder.turntable_path
    render_turntable(rep, out, frames=args.frames or e.turntable_frames, fps=args.fps or e.turntable_fps,
                     resolution=args.resolution or e.turntable_resolution, elevation=e.turntable_elevation,
                     distance=c.eval_distance, fovy=c.eval_fovy, progress=cfg.run.progress)
    print(f"turntable: {out}")
    return 0


def cmd_batch(args) -> int:
    check_batch_flags(workers=args.workers, threads=args.threads, retries=args.retries, seeds=args.seeds)
    totals = run_batch(args.input, args.out, configs=args.config or [], overrides=args.overrides, seeds=args.seeds,
                       executor=args.executor, workers=args.workers, ray_address=args.ray_address,
                       retries=args.retries, threads=args.threads, progress=not args.no_progress)
    print(f"batch: {totals['done']} of {totals['rows']} rows done, {totals['failed']} failed; "
          f"summary: {totals['summary']}; gallery: {totals['gallery']}")
    return 0 if totals["done"] == totals["rows"] else 1


def cmd_prior(args) -> int:
    if args.prior_command == "train":
        from dataclasses import replace

        cfg = PriorTrainConfig()
        for name in ("steps", "batch_size", "lr", "images_per_prompt", "checkpoint_every", "seed"):
            v = getattr(args, name)
            if v is not None:
                if v <= 0 and name != "seed":
                    raise UserError(f"--{name.replace('_', '-')} must be > 0, got {v}")
                cfg = replace(cfg, **{name: v})
        out = PriorTrainer(args.out_dir, cfg, init_from=args.init_from, device=args.device).train()
        print(f"pipeline: {out}")
        return 0
    if args.prior_command == "eval":
        return _prior_eval(args)
    if args.prior_command == "train-classifier":
        if args.steps <= 0:
            raise UserError(f"--steps must be > 0, got {args.steps}")
        acc = train_classifier(args.out_file, steps=args.steps, seed=args.seed)
        print(f"classifier: {args.out_file} (fresh ground truth: shape {acc['shape']:.3f}, color {acc['color']:.3f}, "
              f"both {acc['both']:.3f} of {acc['images']} images)")
        return 0
    raise UserError("give a prior command: train, eval or train-classifier (see `threedistill prior --help`)")


def _prior_eval(args) -> int:
    import json

    import torch
    from tqdm import tqdm

    for name in ("samples", "steps"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")
    prior = load_prior(PriorConfig(name=args.prior), "auto")
    prompts = all_prompts()
    with tqdm(total=len(prompts), desc="sampling the prior", unit="prompt") as bar:
        rows = evaluate_prior_samples(prior, prompts, n_per_prompt=args.samples, steps=args.steps,
                                      guidance_scale=args.guidance_scale, seed=args.seed, progress=bar.update)
    print(f"{'prompt':<24} {'held out':<9} {'shape':>6} {'color':>7} {'both':>6}")
    for r in rows:
        print(f"{r['prompt']:<24} {'yes' if r['held_out'] else '':<9} {r['shape_acc']:>6.2f} {r['color_acc']:>7.2f} {r['acc']:>6.2f}")
    summary = {}
    for split, held in (("held_in", False), ("held_out", True)):
        part = [r for r in rows if r["held_out"] == held]
        summary[split] = {k: sum(r[k] for r in part) / len(part) for k in ("shape_acc", "color_acc", "acc")}
        summary[split]["prompts"] = len(part)
        s = summary[split]
        print(f"{split}: {s['prompts']} prompts x {args.samples} samples: shape {s['shape_acc']:.3f}, "
              f"color {s['color_acc']:.3f}, both {s['acc']:.3f}")
    if args.grid:
        save_image(torch.cat([r["images"] for r in rows]), args.grid, nrow=args.samples)
        print(f"grid: {args.grid}")
    if args.json:
        table = [{k: v for k, v in r.items() if k != "images"} for r in rows]
        settings = {k: getattr(args, k) for k in ("prior", "samples", "steps", "guidance_scale", "seed")}
        atomic_write_text(args.json, json.dumps({"settings": settings, "summary": summary, "prompts": table}, indent=2) + "\n")
    return 0


def cmd_list(args) -> int:
    """One line per run (and refine stage): name, status as it stands now, step, prompt."""
    out = Path(args.out_dir) if args.out_dir else Path(load_config(None).run.out_dir)
    if not out.is_dir():
        raise UserError(f"outputs folder '{out}' does not exist")
    rows = []
    for folder in RunFolder.find(out):
        for stage, name in ((folder, folder.name), (folder.refine, f"{folder.name}/{RunFolder.REFINE}")):
            info = stage.read_status()
            if info:
                rows.append((name, str(info.get("status", "unknown")), f"{info.get('step', 0)}/{info.get('steps', 0)}",
                             str(info.get("prompt", ""))))
    if not rows:
        print(f"no runs in '{out}'")
        return 0
    width = max(len(r[0]) for r in rows)
    for name, status, step, prompt in rows:
        print(f"{name:<{width}}  {status:<11}  {step:>11}  {prompt}")
    return 0


def cmd_preview(args) -> int:
    import time

    t0 = time.perf_counter()
    if args.prompt is not None and is_override(args.prompt):
        raise UserError(f"the prompt is missing: '{args.prompt}' is a key=value override; "
                        "put the prompt first, e.g. threedistill preview \"a red cube\" guidance.guidance_scale=20")
    for name in ("samples", "steps"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")
    out = Path(args.out)
    image_format(out)  # a bad --out fails before the prior is loaded
    cfg = prepare_config(RunRequest(prompt=args.prompt or "", configs=args.config or [], overrides=args.overrides))
    preview = sample_preview(cfg, samples=args.samples, steps=args.steps)
    write_preview(preview, out)
    rows = ", ".join(f"'{p}'" for p in preview.prompts)
    print(f"preview: {out} ({len(preview.prompts)} rows: {rows}; {args.samples} samples each; prior {preview.prior}, "
          f"CFG {preview.guidance_scale:g}, {preview.steps} DDIM steps; {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_plot(args) -> int:
    print(f"curves: {write_curves(args.run_dir, args.out)}")
    return 0


def cmd_eval(args) -> int:
    import json

    for d in args.run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"run folder '{d}' does not exist")
    classifier = load_classifier()
    results = [RunFolder(d).evaluate(classifier=classifier) for d in args.run_dirs]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for d, r in zip(args.run_dirs, results):
        line = (f"{d}: '{r['prompt']}' step {r['step']}: IoU {r['iou']:.3f} (shape IoU {r['shape_iou']:.3f}, "
                f"size {r['size']:.2f}), haze {r['haze']:.3f}, color error {r['color_error']:.3f}, "
                f"color noise {r['color_noise']:+.3f}, "
                f"classified as '{r['predicted']}' ({'correct' if r['prompt_correct'] else 'wrong'})")
        if "floaters" in r:
            line += f", floaters {r['floaters']:.3f}"
        if "mesh_iou" in r:
            line += f", exported mesh IoU {r['mesh_iou']:.3f} color error {r['mesh_color_error']:.3f}"
        if "view_consistency" in r:
            line += f", view consistency {r['view_consistency']:.2f}"
        print(line)
    return 0


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`generate "p" --out d run.steps=5`): argparse
    # binds the positional list at its first chunk, so later key=value words arrive as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all(is_override(w) for w in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Library chatter (diffusers/transformers) is noise on a CLI.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    handlers = {"generate": cmd_generate, "refine": cmd_refine, "export": cmd_export, "render": cmd_render, "batch": cmd_batch, "prior": cmd_prior,
                "eval": cmd_eval, "app": cmd_app, "presets": cmd_presets, "preview": cmd_preview, "plot": cmd_plot,
                "list": cmd_list}
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.command == "prior":
            again = "run the same `threedistill prior train OUT_DIR` again"
        elif args.command == "batch":
            again = "run the same `threedistill batch` command again"
        else:
            again = "continue with `threedistill generate --resume RUN_DIR`"
        print(f"interrupted: the last checkpoint is kept; {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # MemoryError included
        memory = out_of_memory(e)
        if memory is None:
            raise
        if memory == "gpu":
            print(f"error: GPU out of memory; {OOM_HINT}, or use run.device=cpu", file=sys.stderr)
        else:
            print(f"error: out of memory; {OOM_HINT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
