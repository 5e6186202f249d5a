"""Forward and backward time of the pure-torch mesh renderer
(:func:`threedistill.representations.mesh_raster.render_mesh`: rasterize, interpolate, antialias),
per resolution and mesh size.

    OMP_NUM_THREADS=1 python benchmarks/mesh_raster.py
        [--resolutions 128 256 512] [--subdivisions 5 6] [--repeats 3] [--no-antialias] [--out FILE.md]

The meshes are ``trimesh.creation.icosphere(subdivisions=s)`` (20 * 4^s faces: 5 -> 20,480,
6 -> 81,920; icospheres come in no size between, so these bracket 10k-50k) of radius 0.5 with
per-vertex colors (x + 1) / 2, seen by one camera (elevation 15, azimuth 30, distance 1.75,
fovy 55, square images; the sphere fills ~30% of the image). The loss is
``(rgb * w).sum() + alpha.sum() + depth.mean()`` with fixed random weights ``w``; the backward pass
goes to the vertex positions and colors. Times are wall-clock medians over ``--repeats`` runs
after one warm-up. "bbox pairs" counts the (pixel, triangle) pairs the rasterizer evaluates (pixel
centres inside the triangles' screen bounding boxes), "covered" the pixels with a triangle.

The table (markdown) is printed and, with ``--out``, written to that file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from threedistill.cameras import make_cameras
from threedistill.representations.mesh_raster import project_vertices, render_mesh

CAMERA = dict(elevation=15.0, azimuth=30.0, distance=1.75, fovy=55.0)


def benchmark_mesh(subdivisions: int):
    """``verts [V,3]`` (radius 0.5), ``faces [F,3]`` and colors ``[V,3]`` of an icosphere."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    verts = torch.tensor(m.vertices, dtype=torch.float32) * 0.5
    return verts, torch.tensor(m.faces, dtype=torch.int64), (verts + 0.5).clamp(0, 1)


def bbox_pairs(verts, faces, cams) -> int:
    """(pixel, triangle) pairs inside the screen bounding boxes (what the rasterizer evaluates)."""
    with torch.no_grad():
        s = project_vertices(verts.double(), cams)[0][:, faces]
        lo, hi = s.amin(2), s.amax(2)
        x = (torch.floor(hi[..., 0] - 0.5).clamp(-1, cams.width - 1)
             - torch.ceil(lo[..., 0] - 0.5).clamp(0, cams.width) + 1).clamp_min(0)
        y = (torch.floor(hi[..., 1] - 0.5).clamp(-1, cams.height - 1)
             - torch.ceil(lo[..., 1] - 0.5).clamp(0, cams.height) + 1).clamp_min(0)
        return int((x * y).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_render(verts, faces, colors, cams, weights, repeats: int, antialiased: bool):
    """Median forward / backward ms (one warm-up first) and the covered-pixel count."""
    verts, colors = verts.clone().requires_grad_(), colors.clone().requires_grad_()
    device = verts.device
    bg = torch.ones(3, device=device)
    fwd, bwd = [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = render_mesh(verts, faces, cams, colors, bg, antialiased=antialiased)
        _sync(device)
        t1 = time.perf_counter()
        loss = (out["rgb"] * weights).sum() + out["alpha"].sum() + out["depth"].mean()
        _sync(device)
        t2 = time.perf_counter()
        torch.autograd.grad(loss, [verts, colors])
        _sync(device)
        t3 = time.perf_counter()
        if i:
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t3 - t2))
    return statistics.median(fwd), statistics.median(bwd), int((out["tri_id"] >= 0).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for what is measured.")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512], help="square image sizes")
    ap.add_argument("--subdivisions", type=int, nargs="+", default=[5, 6],
                    help="icosphere subdivisions (20 * 4^s faces)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (after one warm-up)")
    ap.add_argument("--no-antialias", action="store_true", help="time without the antialiasing pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    header = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {where}; "
              f"antialias {'off' if args.no_antialias else 'on'}; times in ms, median of {args.repeats} "
              "after one warm-up")
    cols = ["resolution", "faces", "bbox pairs", "covered pixels", "forward (ms)", "backward (ms)"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    for res in args.resolutions:
        cams = make_cameras([CAMERA["elevation"]], [CAMERA["azimuth"]], [CAMERA["distance"]], [CAMERA["fovy"]], res).to(device)
        weights = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
        for s in args.subdivisions:
            verts, faces, colors = (t.to(device) for t in benchmark_mesh(s))
            fwd, bwd, covered = time_render(verts, faces, colors, cams, weights, args.repeats, not args.no_antialias)
            row = [f"{res}x{res}", f"{faces.shape[0]:,}", f"{bbox_pairs(verts, faces, cams):,}", f"{covered:,}",
                   f"{fwd:.1f}", f"{bwd:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
