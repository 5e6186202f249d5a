"""Forward and backward time of the pure-torch Gaussian rasterizer
(:func:`threedistill.representations.gaussian_raster.rasterize`, the CPU back end), per resolution
and Gaussian count, with gsplat's CUDA rasterizer alongside on a GPU machine.

    OMP_NUM_THREADS=1 python benchmarks/gaussian_raster.py
        [--resolutions 64 128 256] [--counts 5000 20000 50000] [--repeats 5]
        [--scene initial|trained] [--device cpu|cuda] [--out FILE.md]

One camera (elevation 15, azimuth 30, distance 1.75, fovy 55, square images) looks at a synthetic
cloud (:func:`benchmark_scene`); the loss is ``(rgb * w).sum() + depth.mean() + alpha.sum()`` with
fixed random weights ``w``. Times are wall-clock medians over ``--repeats`` runs after one warm-up;
"pixel pairs" counts the (pixel, Gaussian) pairs inside the footprints, "strip pairs" the
(row strip, Gaussian) pairs the rasterizer actually evaluates.

With ``--device cuda`` (and a GPU), ``gsplat.rasterization`` is timed too on the same inputs
(``render_mode="RGB+ED"``, ``packed=False``, ``torch.cuda.synchronize()`` around each timing), and the
largest absolute difference between its rgb / alpha images and the CPU rasterizer's is reported,
over all pixels and over the pixels with alpha < 0.99 only: gsplat stops a pixel before the
Gaussian that would take its transmittance T to <= 1e-4 and the CPU rasterizer does not, which
changes nearly saturated pixels by up to T ~ 1e-4 / (1 - alpha) (0.1 at alpha 0.999).

The table (markdown) is printed and, with ``--out``, written to that file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from threedistill.cameras import make_cameras
from threedistill.representations.gaussian_raster import (
    STRIP_WIDTH,
    _footprint_spans,
    _sorted_strip_pairs,
    footprint_radii,
    project_gaussians,
    rasterize,
)

CAMERA = dict(elevation=15.0, azimuth=30.0, distance=1.75, fovy=55.0)


def benchmark_scene(n: int, trained: bool, seed: int = 0):
    """A DreamGaussian-style initial cloud (``trained=False``): n points in a ball of radius 0.5,
    isotropic scales sqrt(mean squared distance to the 3 nearest neighbours), opacity 0.1; or a
    mid-training-like one (``trained=True``): the same cloud with anisotropic scales (x e^{N(0, 0.5)})
    and opacities uniform in (0.05, 1). Returns ``means, quats, scales, opacities, colors`` (CPU)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    means = 0.5 * d / d.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g) ** (1 / 3)
    knn = torch.empty(n, 3)
    for i in range(0, n, 1024):  # nearest neighbours in row blocks: no [n, n] distance matrix
        dist = torch.cdist(means[i:i + 1024], means)
        dist[torch.arange(dist.shape[0]), torch.arange(i, i + dist.shape[0])] = float("inf")
        knn[i:i + 1024] = dist.topk(3, dim=1, largest=False).values
    scales = (knn * knn).mean(dim=1, keepdim=True).sqrt().expand(n, 3).clone()
    quats = torch.randn(n, 4, generator=g)
    opacities = torch.full((n,), 0.1)
    if trained:
        scales = scales * torch.exp(0.5 * torch.randn(n, 3, generator=g))
        opacities = 0.05 + 0.95 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def loss_of(rgb: torch.Tensor, alpha: torch.Tensor, depth: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (rgb * weights).sum() + depth.mean() + alpha.sum()


def time_cpu(params, cams, bg, weights, repeats: int):
    """Median forward / backward ms of :func:`rasterize` (one warm-up run first) and the last images."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = rasterize(*params, cams, bg)
        t1 = time.perf_counter()
        loss = loss_of(out.rgb, out.alpha, out.depth, weights)
        t2 = time.perf_counter()
        torch.autograd.grad(loss, params)
        t3 = time.perf_counter()
        if i:
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t3 - t2))
    return statistics.median(fwd), statistics.median(bwd), out.rgb.detach(), out.alpha.detach()


def time_gsplat(params, cams, bg, weights, repeats: int, device: torch.device):
    """The same for ``gsplat.rasterization`` on ``device`` (CUDA); images returned on the CPU."""
    import gsplat  # CUDA only

    params = [p.detach().to(device).requires_grad_() for p in params]
    cams, bg, weights = cams.to(device), bg.to(device), weights.to(device)
    viewmats, Ks = cams.w2c_opencv().float(), cams.intrinsics().float()
    bgs = bg.expand(len(cams), 3).contiguous()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fwd, bwd = [], []
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        colors, alphas, _ = gsplat.rasterization(
            *params, viewmats=viewmats, Ks=Ks, width=cams.width, height=cams.height, backgrounds=bgs,
            render_mode="RGB+ED", packed=False)
        sync()
        t1 = time.perf_counter()
        colors, alpha = colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)
        rgb, depth = colors[:, :3], colors[:, 3:4] * alpha  # expected depth -> z-sum, as ours
        loss = loss_of(rgb, alpha, depth, weights)
        sync()
        t2 = time.perf_counter()
        torch.autograd.grad(loss, params)
        sync()
        t3 = time.perf_counter()
        if i:
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t3 - t2))
    return statistics.median(fwd), statistics.median(bwd), rgb.detach().cpu(), alpha.detach().cpu()


def pair_counts(params, cams) -> tuple[int, int]:
    """(pixel, Gaussian) pairs inside the footprints and (strip, Gaussian) pairs evaluated."""
    res_h, res_w = cams.height, cams.width
    with torch.no_grad():
        proj = project_gaussians(*params[:3], cams)
        radii = footprint_radii(proj, params[3], res_h, res_w)
        spans = _footprint_spans(proj, params[3], radii, res_h, res_w)
        n_pix = int((spans.x_hi - spans.x_lo + 1).sum())
        n_strip = _sorted_strip_pairs(spans, len(cams), res_h, res_w, STRIP_WIDTH).key.numel()
    return n_pix, n_strip


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> str:
    d = (a - b).abs()
    part = d.masked_select(mask.expand_as(d))
    return f"{float(d.max()):.1e} / {float(part.max()) if part.numel() else 0.0:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for what is measured.")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256], help="square image sizes")
    ap.add_argument("--counts", type=int, nargs="+", default=[5000, 20000, 50000], help="Gaussian counts")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (after one warm-up)")
    ap.add_argument("--scene", choices=["initial", "trained"], default="trained",
                    help="initial: isotropic, opacity 0.1; trained: anisotropic, opacities in (0.05, 1)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: also time gsplat.rasterization on the GPU and compare its images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    use_gsplat = args.device == "cuda"
    if use_gsplat and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}"
              + (f" ({torch.cuda.get_device_name(device)})" if use_gsplat else "")
              + f"; {args.scene} scene; times in ms, median of {args.repeats} after one warm-up; "
              "the CPU rasterizer always runs on the CPU")
    cols = ["resolution", "Gaussians", "pixel pairs", "strip pairs", "forward (ms)", "backward (ms)"]
    if use_gsplat:
        cols += ["gsplat forward (ms)", "gsplat backward (ms)", "max |Δrgb| all / alpha<0.99",
                 "max |Δalpha| all / alpha<0.99"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)

    for res in args.resolutions:
        cams = make_cameras([CAMERA["elevation"]], [CAMERA["azimuth"]], [CAMERA["distance"]], [CAMERA["fovy"]], res)
        bg = torch.ones(3)
        weights = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(args.seed + 1))
        for n in args.counts:
            params = [t.requires_grad_() for t in benchmark_scene(n, args.scene == "trained", args.seed)]
            n_pix, n_strip = pair_counts(params, cams)
            fwd, bwd, rgb, alpha = time_cpu(params, cams, bg, weights, args.repeats)
            row = [f"{res}x{res}", f"{n:,}", f"{n_pix:,}", f"{n_strip:,}", f"{fwd:.1f}", f"{bwd:.1f}"]
            if use_gsplat:
                g_fwd, g_bwd, g_rgb, g_alpha = time_gsplat(params, cams, bg, weights, args.repeats, device)
                unsaturated = alpha < 0.99
                row += [f"{g_fwd:.2f}", f"{g_bwd:.2f}", max_diff(rgb, g_rgb, unsaturated),
                        max_diff(alpha, g_alpha, unsaturated)]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
