"""Which way a guidance loss pushes an object's size, measured on ground-truth renders.

For each preset (its loss, prior and camera settings), the loss scores ground-truth renders of the
shapes-world object of ``--prompt`` from the preset's training cameras, at step ``--step`` (so the
timestep range and schedules are the preset's at that step), and the gradient the loss sends to the
image (``-dL/dimage``, the direction a step would move the render) is read two ways:

* **growth force** at scale ``k`` (the object scaled by ``k`` about its centre):
  ``F(k) = -<dL/dimage, (render(1.1 k) - render(k)) * grown>`` per image, ``grown`` the pixels the
  larger object's silhouette adds (the shading of the pixels both cover is left out). Positive:
  the loss would paint the object into the background next to it (it prefers the larger object);
  negative: it keeps that background clean. A loss that keeps the true size has ``F > 0`` below
  ``k = 1`` and ``F < 0`` above.
* **push towards the object's colour** per region of the true-size render (``k = 1``): the
  update's component along (object albedo - background), per pixel, averaged over the pixels of
  each region: the far background, a 2-pixel ring outside the silhouette, a 2-pixel ring inside
  it, and the interior (x 1000). A positive outer ring means the loss darkens the background next
  to the object: it grows it.

    OMP_NUM_THREADS=1 python benchmarks/growth_force.py --presets sds-nerf ism-nerf csd-nerf \\
        --prompt "a red cube" --step 400 [-- key=value ...]

A preset may carry its own overrides after ``+``: ``ism-nerf+guidance.xs_inv_steps=1``.
Averages over ``--batches`` x 16 random cameras, timesteps and noises (the same draws for every
preset); F is printed with its standard error over the batches. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch

from threedistill.cameras import CameraSampler, step_generator
from threedistill.config import load_config
from threedistill.guidance.base import build_guidance
from threedistill.priors import load_prior
from threedistill.shapes.evaluate import _dilate, _erode
from threedistill.shapes.render import render_mesh
from threedistill.shapes.world import COLORS, parse_prompt, shape_mesh

REGIONS = ("far background", "outer ring", "inner ring", "interior")


def measure(preset: str, prompt: str, step: int, scales: List[float], resolution: int, batches: int,
            overrides: List[str], batch_size: int = 16, guidance=None) -> Dict[str, object]:
    """``{"force": {k: F(k)}, "push": {region: push x 1000}}`` (module docstring). ``guidance``:
    a callable ``(images, cameras, step, generator=) -> output with .loss`` to use instead of the
    preset's loss (tests)."""
    cfg = load_config(preset, overrides=overrides)
    shape_prompt = parse_prompt(prompt)
    if shape_prompt is None:
        raise SystemExit(f"'{prompt}' is not a shapes-world prompt")
    if guidance is None:
        guidance = build_guidance(cfg.guidance, load_prior(cfg.prior), steps=int(cfg.run.steps))
        guidance.set_prompt(prompt)
    sampler = CameraSampler(cfg.camera, resolution)
    base = shape_mesh(shape_prompt.shape)
    albedo = COLORS[shape_prompt.color]
    obj = torch.tensor(albedo)[None, :, None, None]

    def render(k: float, cams):
        m = base.copy()
        m.apply_scale(k)
        return render_mesh(m, albedo, cams, shading="diffuse", ambient=float(cfg.representation.nerf.ambient_light))

    def update(images, cams, gen):
        images = images.clone().requires_grad_(True)
        guidance(images, cams, step, generator=gen).loss.backward()
        return -images.grad

    force: Dict[float, List[float]] = {k: [] for k in scales}  # per batch, per image
    push = {r: [0.0, 0.0] for r in REGIONS}
    for b in range(batches):
        for k in scales:
            gen = step_generator(0, b)  # the same cameras, timesteps and noise at every scale and preset
            cams = sampler.sample(gen, batch_size=batch_size, step=step)
            gt = render(k, cams)
            upd = update(gt.rgb, cams, gen)
            bigger = render(1.1 * k, cams)
            grown = (bigger.mask - gt.mask).clamp_min(0.0)  # the pixels the larger object adds
            force[k].append(float((upd * (bigger.rgb - gt.rgb) * grown).sum()) / batch_size)
            if k == 1.0:
                toward = (upd * (obj - 1.0)).sum(1, keepdim=True) / float((obj - 1.0).square().sum())
                m, hit = gt.mask, gt.mask > 0.5
                inner, near = _erode(hit, 2).float(), _dilate(hit, 2).float()
                regions = {"far background": 1.0 - near, "outer ring": near - m,
                           "inner ring": m - inner, "interior": inner}
                for name, region in regions.items():
                    push[name][0] += float((toward * region).sum())
                    push[name][1] += float(region.sum())
    t = torch.tensor
    return {"force": {k: float(t(v).mean()) for k, v in force.items()},
            # standard error of the mean over the batches (0 with one batch)
            "force_se": {k: float(t(v).std() / len(v) ** 0.5) if len(v) > 1 else 0.0 for k, v in force.items()},
            "push": {r: 1e3 * s / max(c, 1.0) for r, (s, c) in push.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["sds-nerf", "ism-nerf", "csd-nerf"])
    ap.add_argument("--prompt", default="a red cube")
    ap.add_argument("--step", type=int, default=400)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.25, 1.6])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="for every preset (after --)")
    args = ap.parse_args(argv)
    scales = sorted(set(args.scales) | {1.0})
    print(f"Growth force F(k) and push towards the object's colour (x1000) on ground-truth renders of "
          f"'{args.prompt}', step {args.step}, {args.resolution} px, {args.batches} x 16 draws"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + "\n")
    print("| preset | " + " | ".join(f"F({k:g})" for k in scales) + " | " + " | ".join(REGIONS) + " |")
    print("|---|" + "---|" * (len(scales) + len(REGIONS)))
    for entry in args.presets:
        preset, *own = entry.split("+")
        r = measure(preset, args.prompt, args.step, scales, args.resolution, args.batches, [*args.overrides, *own])
        print(f"| {entry} | " + " | ".join(f"{r['force'][k]:+.2f} ± {r['force_se'][k]:.2f}" for k in scales) + " | "
              + " | ".join(f"{r['push'][name]:+.2f}" for name in REGIONS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
