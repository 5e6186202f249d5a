"""Quality of text-to-3D on the shapes world, measured against the ground truth.

Runs one guidance loss with one representation over a fixed prompt set (held-in and held-out
(shape, color) pairs of the built-in prior) and several seeds, evaluates each run with
:mod:`threedistill.shapes.evaluate`, and writes a markdown table and a JSON file of silhouette IoU,
color error, prompt accuracy (the shipped classifier), view consistency (mug), diversity across
seeds (1 - pairwise silhouette IoU; pairwise RGB difference), steps and wall time.

    python benchmarks/shapes_quality.py --out bench-out/vsd-nerf --config vsd-nerf
        [--guidance NAME] [--representation nerf] [--seeds 0 1] [--prompts "a red cube" ...] [key=value ...]

Runs already finished in ``--out`` are evaluated again but not re-run, so an interrupted benchmark
continues where it stopped. ``--runs-only`` trains (or resumes) the runs and stops there: no
evaluation and no ``results.*`` files, so that several processes can fill one ``--out`` side by
side (``quality_matrix.py`` does this, then scores the folder with one plain call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: One held-in prompt per shape, then two held-out pairs (never in the prior's training data).
DEFAULT_PROMPTS = [
    "a red cube", "a blue sphere", "a green cylinder", "a yellow cone", "a purple torus", "a red mug",
    "a purple sphere", "a yellow cube",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/shapes-quality", help="folder for the runs, table and JSON")
    ap.add_argument("--guidance", help="guidance.name (default: the config's)")
    ap.add_argument("--representation", help="representation.name (default: the config's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    ap.add_argument("--config", action="append", help="YAML config or preset, repeatable (default: the built-in defaults)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs-only", action="store_true",
                    help="train or resume the runs only: no evaluation, no results.md / results.json")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    import torch

    from threedistill.config import load_config
    from threedistill.devices import resolve_device
    from threedistill.pipeline import RunRequest, prepare_run, run_prepared
    from threedistill.priors import PriorCache
    from threedistill.runs import RunFolder, slugify
    from threedistill.shapes.classifier import load_classifier
    from threedistill.shapes.evaluate import eval_renders, seed_diversity
    from threedistill.shapes.world import parse_prompt

    for p in args.prompts:
        if parse_prompt(p) is None:
            ap.error(f"'{p}' is not a shapes-world prompt")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*([f"guidance.name={args.guidance}"] if args.guidance else []),
                 *([f"representation.name={args.representation}"] if args.representation else []),
                 f"run.device={args.device}", "export.turntable=false", "run.progress=false", *args.overrides]
    cfg0 = load_config(args.config, overrides, base={"run": {"prompt": args.prompts[0]}})
    guidance_name, rep_name = cfg0.guidance.name, cfg0.representation.name
    priors = PriorCache()
    classifier = None if args.runs_only else load_classifier()  # only the scoring reads it
    rows = []
    diversity = {}
    for prompt in args.prompts:
        renders = []
        for seed in args.seeds:
            folder = RunFolder(out / f"{slugify(prompt)}-seed{seed}")
            wall_file = folder.path / "bench_wall.json"  # this benchmark's own file, beside the run's
            final = folder.refine if cfg0.refine.enabled else folder
            if not final.is_finished():
                if folder.is_run():
                    cfg, prepared = prepare_run(RunRequest(resume=folder.path))
                else:
                    cfg, prepared = prepare_run(RunRequest(prompt=prompt, configs=list(args.config or []),
                                                           overrides=overrides + [f"run.seed={seed}"],
                                                           run_dir=folder.path))
                t0 = time.time()
                results = run_prepared(cfg, prepared, priors=priors)
                wall = time.time() - t0
                wall_file.write_text(json.dumps({"wall_s": wall, "steps": results[-1].step}))
                print(f"{prompt} seed {seed}: {results[-1].status} in {wall:.0f} s", file=sys.stderr)
            if args.runs_only:
                continue
            timing = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
            m = final.evaluate(classifier=classifier)
            if final is not folder:  # a chain: the coarse stage's numbers beside the refined ones
                coarse = folder.evaluate(classifier=classifier)
                m.update({f"coarse_{k}": coarse[k] for k in ("iou", "color_error", "shape_iou")})
            held_out = parse_prompt(prompt).held_out
            rows.append({"prompt": prompt, "seed": seed, "held_out": held_out, **{k: v for k, v in m.items() if k != "prompt"},
                         "wall_s": timing.get("wall_s"), "steps": m["step"]})
            print(f"  IoU {m['iou']:.3f} color err {m['color_error']:.3f} -> '{m['predicted']}'", file=sys.stderr)
            run_cfg, rep, _ = final.load_representation()
            renders.append(eval_renders(rep, run_cfg.camera)[:2])
        if args.runs_only:
            continue
        diversity[prompt] = seed_diversity(renders)
        for r in rows:
            if r["prompt"] == prompt:
                r.update(diversity[prompt])

    if args.runs_only:
        return 0

    def mean(key, part):
        vals = [r[key] for r in part if r.get(key) is not None and r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {}
    for split, sel in (("held_in", [r for r in rows if not r["held_out"]]), ("held_out", [r for r in rows if r["held_out"]]),
                       ("all", rows)):
        if sel:
            summary[split] = {k: mean(k, sel) for k in ("iou", "shape_iou", "size", "color_error", "prompt_correct",
                                                         "shape_correct", "color_correct", "view_consistency", "haze",
                                                         "color_noise", "floaters", "mesh_iou", "mesh_color_error", "coarse_iou", "coarse_color_error",
                                                         "silhouette_diversity", "appearance_diversity", "wall_s",
                                                         "steps")}
            summary[split]["runs"] = len(sel)
    device = str(resolve_device(cfg0.run.device))
    lines = [f"# Shapes-world quality: {guidance_name} + {rep_name}", "",
             f"prior `{cfg0.prior.name}`, config `{' + '.join(args.config or ['defaults'])}`, {len(args.prompts)} prompts "
             f"x seeds {args.seeds}, device {device}, torch threads {torch.get_num_threads()}, "
             f"overrides: `{' '.join(args.overrides) or 'none'}`", "",
             "| prompt | seed | held out | IoU | shape IoU | size | color err | classified as | correct | view cons. | "
             "haze | color noise | floaters | GLB IoU | GLB color err | steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vc = f"{r['view_consistency']:.2f}" if "view_consistency" in r else ""
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "?"
        fl = f"{r['floaters']:.3f}" if "floaters" in r else ""
        glb = f"{r['mesh_iou']:.3f} | {r['mesh_color_error']:.3f}" if "mesh_iou" in r else " | "
        lines.append(f"| {r['prompt']} | {r['seed']} | {'yes' if r['held_out'] else ''} | {r['iou']:.3f} | "
                     f"{r['shape_iou']:.3f} | {r['size']:.2f} | "
                     f"{r['color_error']:.3f} | {r['predicted']} | {'yes' if r['prompt_correct'] else 'no'} | {vc} | "
                     f"{r['haze']:.3f} | {r['color_noise']:+.3f} | {fl} | {glb} | {r['steps']} | {wall} |")
    lines += ["", "| split | runs | mean IoU | shape IoU | size | mean color err | prompt acc | shape acc | color acc | "
                  "view cons. | haze | color noise | floaters | GLB IoU | GLB color err | seed div. (silhouette) | seed div. (RGB) | mean wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for split, s in summary.items():
        lines.append(f"| {split} | {s['runs']} | {s['iou']:.3f} | {s['shape_iou']:.3f} | {s['size']:.2f} | "
                     f"{s['color_error']:.3f} | {s['prompt_correct']:.2f} | "
                     f"{s['shape_correct']:.2f} | {s['color_correct']:.2f} | {s['view_consistency']:.2f} | "
                     f"{s['haze']:.3f} | {s['color_noise']:+.3f} | {s['floaters']:.3f} | {s['mesh_iou']:.3f} | {s['mesh_color_error']:.3f} | "
                     f"{s['silhouette_diversity']:.3f} | {s['appearance_diversity']:.3f} | {s['wall_s']:.0f} |")
    if any("coarse_iou" in r for r in rows):
        lines += ["", "Refine stage against its coarse run (per prompt): IoU coarse -> refined, color error coarse -> refined", ""]
        lines += [f"- {r['prompt']} seed {r['seed']}: IoU {r['coarse_iou']:.3f} -> {r['iou']:.3f}, "
                  f"color error {r['coarse_color_error']:.3f} -> {r['color_error']:.3f}" for r in rows if "coarse_iou" in r]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "summary": summary, "runs": rows}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
