"""Exact 3D Gaussian Splatting rasterization in pure torch (the CPU back end), same math as gsplat.

Two functions share one projection and one compositing rule and differ only in which
(pixel, Gaussian) pairs they evaluate:

* :func:`rasterize` pairs each Gaussian only with the pixels of its footprint, sorts the pairs by
  (camera, pixel, depth) and composites them with a segmented exclusive cumulative product in log
  space. Fast enough to train a few thousand Gaussians on CPU (timings: ``benchmarks/gaussian_raster.py``).
* :func:`rasterize_dense` pairs every Gaussian with every pixel (the reference; slow).

Both are torch autograd graphs: gradients reach ``means, quats, scales, opacities, colors`` and
``background``, and ``RasterOutput.means2d`` is the projected-means tensor of that graph, so a
caller can ``retain_grad()`` it for the view-space gradient used by densification.

Projection (gsplat ``fully_fused_projection``, pinhole, no antialiasing compensation)
-------------------------------------------------------------------------------------
Cameras follow :mod:`threedistill.cameras`; the world-to-camera view is
:meth:`CameraBatch.w2c_opencv` (+x right, +y down, looking along +z) and ``K`` is
:meth:`CameraBatch.intrinsics` (``cx = W/2``, ``cy = H/2``)::

    t = R_w2c mu + t_w2c = (x, y, z)               camera-space mean, depth z
    mean2d = (fx x/z + cx, fy y/z + cy)             pixels; pixel (i, j) has its centre at (j+.5, i+.5)
    Sigma  = R diag(s^2) R^T                        R from the normalized quaternion (w, x, y, z)
    J      = [[fx/z, 0, -fx u/z], [0, fy/z, -fy v/z]],  u = clamp(x/z, +-1.3 tan(fovx/2)), v likewise
    cov2d  = J R_w2c Sigma R_w2c^T J^T + 0.3 I      (0.3: gsplat's eps2d low-pass filter)
    conic  = cov2d^-1;  valid = (z > 0.01) & (det cov2d > 0)

Compositing (gsplat ``rasterize_to_pixels``)
--------------------------------------------
For a pixel centre p and Gaussian i, with d = p - mean2d_i::

    sigma_i = 0.5 (a dx^2 + c dy^2) + b dx dy       conic = [[a, b], [b, c]]
    alpha_i = min(0.999, opacity_i exp(-sigma_i)),  skipped (alpha_i = 0) if sigma_i < 0 or alpha_i < 1/255
    Gaussians in front-to-back order of z (ties: lower index first), T_0 = 1, T_{i+1} = T_i (1 - alpha_i)
    rgb   = sum_i c_i alpha_i T_i + T_final background
    alpha = 1 - T_final;   depth = sum_i z_i alpha_i T_i  (expected camera-space z, not normalized)

Invalid Gaussians (behind the near plane, degenerate covariance) contribute nothing.
**No early termination**: gsplat drops the Gaussian that would take a pixel's T below 1e-4, and
everything behind it; neither function here does. In such (near-opaque) pixels the results differ
from gsplat by up to the dropped remainder of T, about 1e-4 / (1 - alpha_i) times a color; our
gradients stay smooth there. Colors are composited as given (any real values).

Footprint and radii
-------------------
``alpha_i >= 1/255`` exactly where ``d^T conic d <= k_i^2 = 2 ln(255 opacity_i)``: an ellipse inside
the circle of radius ``k_i sqrt(lambda_max(cov2d))``. ``RasterOutput.radii`` is that radius rounded
up (integer pixels; gsplat 1.5 reports per-axis radii from the diagonal of cov2d instead, which
are never larger: both only serve as visibility tests here); it is 0 for invalid Gaussians, for opacity <= 1/255 and
for Gaussians whose square of that radius misses the image (gsplat's ``inside`` test).

How :func:`rasterize` finds and composites the pairs
----------------------------------------------------
1. For every visible Gaussian and image row, the exact x-interval of its ellipse (with a thin
   margin for float32 rounding) -- a "span"; geometry in float64, no gradients.
2. Spans are cut into strips of ``STRIP_WIDTH`` consecutive pixels of a row; a pair is
   (strip, Gaussian), generated in (camera, depth) order, then stably sorted by strip, which gives
   (camera, pixel, depth) order for every pixel (lane) of the strip. With ``strip_width=1`` this is
   literally one pair per (pixel, Gaussian); wider strips evaluate a few pixels outside the ellipse
   (dropped by the exact alpha test) in exchange for ~4x fewer pairs to sort and gather, and
   tensors laid out ``[lanes, pairs]`` so that every elementwise op runs on long contiguous rows.
3. ``log T`` is a segmented exclusive cumulative sum of ``log1p(-alpha)`` along each strip's
   pairs (one global cumulative sum in float64 minus the running sum at the segment start; a custom
   autograd function whose backward is the reversed scan), ``T = exp(log T)``, and the per-pixel
   sums of ``alpha T (color, z)`` are segment reductions.

The pairs the exact rule keeps are the same as in :func:`rasterize_dense` (same float operations in
the shared alpha function), so the two agree to float rounding (~1e-7). Two invisible numerical
guards: the exponent of the Gaussian is floored at -20 before ``exp`` (such pairs are skipped
anyway), and ``T`` below ``e^-60`` is set to exactly 0 in :func:`rasterize` (a change < 1e-26 per
pixel); both keep subnormal floats, which are ~100x slower on x86 CPUs, out of the hot loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from threedistill.cameras import CameraBatch

NEAR_PLANE = 0.01  # gsplat's default near plane (camera-space z)
EPS2D = 0.3  # gsplat's low-pass dilation added to the 2D covariance (pixels^2)
ALPHA_MIN = 1.0 / 255.0  # contributions below this alpha are skipped
ALPHA_MAX = 0.999  # alpha is clamped to this
STRIP_WIDTH = 4  # rasterize pairs Gaussians with runs of this many pixels of a row (speed only)
FOV_CLAMP = 0.3  # the Jacobian is taken at x/z clamped to (1 + FOV_CLAMP) * tan(half fov)


@dataclass
class Projection:
    """Per camera and Gaussian screen-space quantities (B cameras, N Gaussians)."""

    means2d: torch.Tensor  # [B,N,2] pixels (x right, y down; pixel centres at +0.5)
    cov2d: torch.Tensor  # [B,N,2,2] J W Sigma W^T J^T + eps2d I
    conic: torch.Tensor  # [B,N,2,2] inverse of cov2d (finite garbage where not valid)
    depth: torch.Tensor  # [B,N] camera-space z
    valid: torch.Tensor  # [B,N] bool: z > near_plane and det(cov2d) > 0


@dataclass
class RasterOutput:
    rgb: torch.Tensor  # [B,3,H,W] sum_i c_i a_i T_i + T_final * background
    alpha: torch.Tensor  # [B,1,H,W] 1 - T_final
    depth: torch.Tensor  # [B,1,H,W] sum_i z_i a_i T_i (expected camera-space depth, unnormalized)
    radii: torch.Tensor  # [B,N] int32 footprint radius in pixels, 0 where culled
    means2d: torch.Tensor  # [B,N,2] the projected means used by the graph (retain_grad() it)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[...,3,3]`` from quaternions ``[...,4]`` (w, x, y, z; normalized here)."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1)
    return R.reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    cameras: CameraBatch,
    near_plane: float = NEAR_PLANE,
    eps2d: float = EPS2D,
) -> Projection:
    """Project 3D Gaussians ``means [N,3]``, ``quats [N,4]`` (w,x,y,z), ``scales [N,3]`` (linear)
    into each of the B ``cameras`` (see the module docstring for the math)."""
    dtype, device = means.dtype, means.device
    H, W = cameras.height, cameras.width
    w2c = cameras.w2c_opencv().to(device=device, dtype=dtype)  # [B,4,4]
    K = cameras.intrinsics().to(device=device, dtype=dtype)  # [B,3,3]
    Rw, tw = w2c[:, :3, :3], w2c[:, :3, 3]

    p = torch.einsum("bij,nj->bni", Rw, means) + tw[:, None, :]  # [B,N,3]
    x, y, z = p.unbind(-1)
    in_front = z > near_plane
    zs = torch.where(in_front, z, torch.ones_like(z))  # keeps culled entries finite (and their grads)

    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]  # [B,1]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * W / fx, 0.5 * H / fy
    u, v = x / zs, y / zs
    uc = torch.clamp(u, min=-(cx / fx + FOV_CLAMP * tan_fovx), max=(W - cx) / fx + FOV_CLAMP * tan_fovx)
    vc = torch.clamp(v, min=-(cy / fy + FOV_CLAMP * tan_fovy), max=(H - cy) / fy + FOV_CLAMP * tan_fovy)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / zs, zero, -fx * uc / zs, zero, fy / zs, -fy * vc / zs], dim=-1)
    J = J.reshape(z.shape + (2, 3))  # [B,N,2,3]

    M = quat_to_rotmat(quats) * scales[:, None, :]  # [N,3,3] = R diag(s), Sigma = M M^T
    JWM = torch.einsum("bnij,bjk,nkl->bnil", J, Rw, M)  # [B,N,2,3]
    cov2d = JWM @ JWM.transpose(-1, -2) + eps2d * torch.eye(2, device=device, dtype=dtype)

    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det = a * c - b * b
    valid = in_front & (det > 0)
    inv_det = 1.0 / torch.where(valid, det, torch.ones_like(det))
    conic = torch.stack([c * inv_det, -b * inv_det, -b * inv_det, a * inv_det], dim=-1).reshape(cov2d.shape)
    means2d = torch.stack([fx * u + cx, fy * v + cy], dim=-1)
    return Projection(means2d=means2d, cov2d=cov2d, conic=conic, depth=z, valid=valid)


def footprint_radii(proj: Projection, opacities: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer footprint radii ``[B,N]`` (int32): ``ceil(sqrt(2 ln(255 o)) sqrt(lambda_max(cov2d)))``,
    0 for invalid Gaussians, opacity <= 1/255, or a footprint square that misses the image."""
    with torch.no_grad():
        cov = proj.cov2d.detach().double()
        a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
        half_trace = 0.5 * (a + c)
        lam_max = half_trace + torch.sqrt(torch.clamp(half_trace * half_trace - (a * c - b * b), min=0.0))
        k2 = 2.0 * torch.log(255.0 * opacities.detach().double().clamp_min(1e-30))  # [N]
        r = torch.ceil(torch.sqrt(k2.clamp_min(0.0)) * torch.sqrt(lam_max.clamp_min(0.0)))
        mx, my = proj.means2d.detach().double().unbind(-1)
        inside = (mx + r > 0) & (mx - r < width) & (my + r > 0) & (my - r < height)
        keep = proj.valid & (k2 > 0) & inside & torch.isfinite(r)
        return torch.where(keep, r, torch.zeros_like(r)).to(torch.int32)


def _alpha(dx, dy, na, nb, nc, opacity):
    """gsplat's alpha, 0 where skipped (power > 0 or alpha < 1/255), for broadcastable ``dx``, ``dy``.

    The conic comes pre-scaled as ``na = -a/2, nb = -b, nc = -c/2`` so that
    ``power = -sigma = (na dx + nb dy) dx + nc dy^2`` costs few operations on the widest tensor.
    Both rasterizers call this with the same operand values, so the same float operations decide
    which pairs count.
    """
    power = (na * dx + nb * dy) * dx + nc * (dy * dy)
    # exp(-20) * opacity < 1/255 is skipped anyway; the floor keeps exp out of subnormal floats,
    # which are ~100x slower on x86 (strip lanes far outside a footprint would hit them).
    alpha = torch.clamp(opacity * torch.exp(torch.clamp(power, min=-20.0)), max=ALPHA_MAX)
    return alpha * ((power <= 0) & (alpha >= ALPHA_MIN))


def _neg_half_conic(conic: torch.Tensor):
    """``(-a/2, -b, -c/2)`` from conics ``[...,2,2]``, each ``[...]``."""
    return -0.5 * conic[..., 0, 0], -conic[..., 0, 1], -0.5 * conic[..., 1, 1]


def _background(background: torch.Tensor, B: int, like: torch.Tensor) -> torch.Tensor:
    bg = torch.as_tensor(background, device=like.device).to(like.dtype)
    if bg.dim() == 1:
        bg = bg[None].expand(B, 3)
    if bg.shape != (B, 3):
        raise ValueError(f"background must be [3] or [B,3] with B={B}, got {tuple(bg.shape)}")
    return bg


def _runs(first: torch.Tensor, run_start: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """Concatenated int64 runs ``run_start[r] + step * (0, 1, ..., len_r - 1)``, the r-th beginning at
    ``first[r]`` (runs back to back, non-empty, ``total`` elements in all), via one cumulative sum."""
    delta = torch.full((total,), step, dtype=torch.int64, device=first.device)
    if first.numel():
        prev_end = torch.cat([run_start.new_zeros(1), run_start[:-1] + step * (first[1:] - first[:-1] - 1)])
        delta[first] = run_start - prev_end
    return torch.cumsum(delta, 0)


@dataclass
class _Spans:
    """Per (camera, Gaussian, image row): the pixel columns ``x_lo..x_hi`` whose centres lie inside
    the Gaussian's alpha >= 1/255 ellipse (plus a thin margin), in (camera, depth) order."""

    gid: torch.Tensor  # [R] flat b*N + n
    cam: torch.Tensor  # [R]
    y: torch.Tensor  # [R]
    x_lo: torch.Tensor  # [R]
    x_hi: torch.Tensor  # [R]


def _footprint_spans(proj: Projection, opacities: torch.Tensor, radii: torch.Tensor, H: int, W: int) -> _Spans:
    """Row spans of every footprint; non-differentiable bookkeeping, geometry in float64."""
    B, N = proj.depth.shape
    dev = proj.depth.device
    order = torch.sort(proj.depth.detach(), dim=1, stable=True).indices  # [B,N] front to back, ties by index
    flat = (order + torch.arange(B, device=dev)[:, None] * N).reshape(-1)
    g = flat[(radii.reshape(-1) > 0)[flat]]  # [G] culled Gaussians dropped
    mx, my = proj.means2d.detach().reshape(-1, 2)[g].double().unbind(-1)
    con = proj.conic.detach().reshape(-1, 4)[g].double()
    ca, cb, cc = con[:, 0], con[:, 1], con[:, 3]
    cov = proj.cov2d.detach().reshape(-1, 4)[g].double()
    sxx, sxy, syy = cov[:, 0], cov[:, 1], cov[:, 3]
    k2 = 2.0 * torch.log(255.0 * opacities.detach().double()[g % N])  # alpha >= 1/255 <=> d^T conic d <= k2
    # Margin: float32 evaluation of the quadratic form errs by ~1e-7 * k2 * cond(cov2d) (+ rounding of d).
    half_trace = 0.5 * (sxx + syy)
    disc = torch.sqrt(torch.clamp(half_trace * half_trace - (sxx * syy - sxy * sxy), min=0.0))
    cond = (half_trace + disc) / (half_trace - disc).clamp_min(1e-12)
    k2 = k2 * (1.0 + 1e-5 * cond) + 1e-3

    # Rows whose centre lies within the ellipse's vertical extent sqrt(k2 * cov_yy) ...
    ey = torch.sqrt(k2 * syy)
    y_lo = torch.ceil(my - ey - 0.5).clamp(0, H).long()
    y_hi = torch.floor(my + ey - 0.5).clamp(-1, H - 1).long()
    ny = (y_hi - y_lo + 1).clamp_min(0)
    row_g = torch.repeat_interleave(torch.arange(g.numel(), device=dev), ny)  # [R] index into g
    row_first = torch.cumsum(ny, 0) - ny
    row_y = y_lo[row_g] + torch.arange(row_g.numel(), device=dev) - row_first[row_g]
    # ... and per row the x-interval where a dx^2 + 2 b dx dy + c dy^2 <= k2.
    dy = row_y.double() + 0.5 - my[row_g]
    a_r = ca[row_g]
    disc_x = (a_r * k2[row_g] - (ca * cc - cb * cb)[row_g] * dy * dy).clamp_min(0.0)
    centre = mx[row_g] - cb[row_g] * dy / a_r
    half = torch.sqrt(disc_x) / a_r
    x_lo = torch.ceil(centre - half - 0.5).clamp(0, W).long()
    x_hi = torch.floor(centre + half - 0.5).clamp(-1, W - 1).long()
    keep = x_hi >= x_lo
    gid = g[row_g[keep]]
    return _Spans(gid=gid, cam=torch.div(gid, N, rounding_mode="floor"), y=row_y[keep],
                  x_lo=x_lo[keep], x_hi=x_hi[keep])


@dataclass
class _StripPairs:
    """(strip, Gaussian) pairs sorted by (strip, depth), in segments of equal strip. A strip is
    ``width`` consecutive pixels of one image row, numbered ``(b*H + y) * ceil(W / width) + s``;
    its pixel columns are ``s*width + lane`` (lanes past the image's right edge are cropped)."""

    key: torch.Tensor  # [I] strip number, non-decreasing
    gid: torch.Tensor  # [I] flat b*N + n
    y: torch.Tensor  # [I] image row
    x0: torch.Tensor  # [I] first pixel column of the strip
    starts: torch.Tensor  # [S] first pair of each strip's segment
    ends: torch.Tensor  # [S] last pair of each segment
    seg: torch.Tensor  # [I] segment of each pair


def _sorted_strip_pairs(spans: _Spans, B: int, H: int, W: int, width: int) -> _StripPairs:
    dev = spans.gid.device
    per_row = -(-W // width)
    s_lo = torch.div(spans.x_lo, width, rounding_mode="floor")
    n = torch.div(spans.x_hi, width, rounding_mode="floor") - s_lo + 1
    total = int(n.sum())
    first = torch.cumsum(n, 0) - n
    # Generated in (camera, depth) order; a stable sort by strip gives (strip, depth) order.
    key = _runs(first, (spans.cam * H + spans.y) * per_row + s_lo, 1, total)
    span = torch.repeat_interleave(torch.arange(n.numel(), device=dev), n)
    # (a stable sort of int32 keys is ~2x faster than of int64 ones)
    key, perm = torch.sort(key.to(torch.int32) if B * H * per_row < 2**31 else key, stable=True)
    key = key.long()
    span = span.index_select(0, perm)
    new_seg = torch.ones(total, dtype=torch.bool, device=dev)
    new_seg[1:] = key[1:] != key[:-1]
    starts = new_seg.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_full((1,), total)])[: starts.numel()] - 1
    return _StripPairs(key=key, gid=spans.gid.index_select(0, span), y=spans.y.index_select(0, span),
                  x0=torch.remainder(key, per_row) * width, starts=starts, ends=ends,
                  seg=torch.cumsum(new_seg, 0) - 1)


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]`` (2-D gathers along the last dim are fast; 3-D ones are not)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).index_select(1, index).reshape(x.shape[:-1] + index.shape)


class _SegmentedExclusiveCumsum(torch.autograd.Function):
    """Along the last dim, per segment: ``out_j = sum_{i in seg(j), i < j} x_i`` and
    ``total_s = sum_{i in s} x_i`` (segments are runs given by ``starts``/``ends``/``seg``).

    One global cumulative sum in float64 (so that subtracting the running sum at each segment start
    loses nothing); the backward pass is the matching reversed scan, written without a flip.
    """

    @staticmethod
    def forward(ctx, x, starts, ends, seg):
        xd = x.double()
        csum = torch.cumsum(xd, -1)
        offset = _gather_last(csum, starts) - _gather_last(xd, starts)
        excl = csum.sub_(xd).sub_(_gather_last(offset, seg))  # in place: exclusive, per segment
        total = _gather_last(excl, ends).add_(_gather_last(xd, ends))
        ctx.save_for_backward(ends, seg)
        return excl.to(x.dtype), total.to(x.dtype)

    @staticmethod
    def backward(ctx, g_out, g_total):
        ends, seg = ctx.saved_tensors
        csum = torch.cumsum(g_out.double(), -1)  # grad_x_j = sum_{i in seg(j), i > j} g_out_i + g_total[seg(j)]
        seg_sum = _gather_last(csum, ends).add_(g_total.double())
        return _gather_last(seg_sum, seg).sub_(csum).to(g_out.dtype), None, None, None


class _SegmentOuterSum(torch.autograd.Function):
    """``out[c, l, s] = sum_{i in segment s} feats[c, i] * weight[l, i]`` for ``weight [L,I]``,
    ``feats [C,I]`` and segments given as ``lengths [S]`` plus each element's segment ``seg [I]``.
    (One channel at a time, so that no ``[C,L,I]`` temporary is ever allocated.)"""

    @staticmethod
    def forward(ctx, weight, feats, lengths, seg):
        L = weight.shape[0]
        lengths_l = lengths.expand(L, -1)
        out = torch.stack([torch.segment_reduce(weight * f, "sum", lengths=lengths_l, axis=1, unsafe=True)
                           for f in feats])
        ctx.save_for_backward(weight, feats, seg)
        return out

    @staticmethod
    def backward(ctx, g_out):
        weight, feats, seg = ctx.saved_tensors
        g_weight = torch.zeros_like(weight) if ctx.needs_input_grad[0] else None
        g_feats = torch.empty_like(feats) if ctx.needs_input_grad[1] else None
        for c in range(feats.shape[0]):
            g = g_out[c].index_select(1, seg)  # [L,I]
            if g_weight is not None:
                g_weight.addcmul_(g, feats[c])
            if g_feats is not None:
                g_feats[c] = (g * weight).sum(0)
        return g_weight, g_feats, None, None


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    cameras: CameraBatch,
    background: torch.Tensor,
    strip_width: int = STRIP_WIDTH,
) -> RasterOutput:
    """Render N Gaussians into B cameras, pairing each Gaussian only with the pixels of its footprint.

    ``means [N,3]`` world, ``quats [N,4]`` (w,x,y,z, any norm), ``scales [N,3]`` (linear, > 0),
    ``opacities [N]`` in (0,1), ``colors [N,3]``, ``background [3]`` or ``[B,3]``. Returns images at
    ``cameras.height x cameras.width`` (module docstring). ``strip_width`` only trades speed: pairs
    are formed per run of that many pixels of a row (1: one pair per pixel); the result is the same.
    """
    B, H, W = len(cameras), cameras.height, cameras.width
    N = means.shape[0]
    dt, dev = means.dtype, means.device
    proj = project_gaussians(means, quats, scales, cameras)
    radii = footprint_radii(proj, opacities, H, W)
    bg = _background(background, B, means)
    with torch.no_grad():
        pairs = _sorted_strip_pairs(_footprint_spans(proj, opacities, radii, H, W), B, H, W, strip_width)
    per_row = -(-W // strip_width)
    n_strips = B * H * per_row

    def take(t: torch.Tensor) -> torch.Tensor:  # [B,N] per (camera, Gaussian) -> [I] per pair
        return t.reshape(B * N).index_select(0, pairs.gid)

    # Lane-major layout [strip_width, I]: the pair dimension is the contiguous one.
    na, nb, nc = (take(t) for t in _neg_half_conic(proj.conic))
    lanes = torch.arange(strip_width, device=dev, dtype=dt)[:, None] + 0.5
    dx = (pairs.x0.to(dt) + lanes) - take(proj.means2d[..., 0])  # [L, I]
    dy = (pairs.y.to(dt) + 0.5) - take(proj.means2d[..., 1])  # [I]
    alpha = _alpha(dx, dy, na, nb, nc, take(opacities.expand(B, N)))  # [L, I]

    # T = prod over the earlier pairs of the same pixel of (1 - alpha): a segmented exclusive
    # cumulative sum of log(1 - alpha) along each strip's segment, one lane per pixel.
    log_trans, log_t_seg = _SegmentedExclusiveCumsum.apply(torch.log1p(-alpha), pairs.starts, pairs.ends, pairs.seg)
    # T below e^-60 is set to exactly 0 (a change < 1e-26 per pixel) so that nothing downstream,
    # the backward pass included, computes with subnormal floats.
    log_trans = torch.where(log_trans > -60.0, log_trans, torch.full_like(log_trans, -math.inf))
    weight = alpha * torch.exp(log_trans)  # [L, I]
    feats = torch.stack([take(colors[:, k].expand(B, N)) for k in range(3)] + [take(proj.depth)])  # [4, I]
    lengths = pairs.ends - pairs.starts + 1
    seg_sums = _SegmentOuterSum.apply(weight, feats, lengths, pairs.seg)  # [4, L, S]
    seg_key = pairs.key.index_select(0, pairs.starts)  # strip of each segment
    sums = torch.zeros(4, strip_width, n_strips, dtype=dt, device=dev).index_add(2, seg_key, seg_sums)
    log_t = torch.zeros(strip_width, n_strips, dtype=dt, device=dev).index_add(1, seg_key, log_t_seg)

    def to_image(x: torch.Tensor) -> torch.Tensor:  # [C, L, B*H*per_row] -> [B, C, H, W]
        C = x.shape[0]
        x = x.reshape(C, strip_width, B, H, per_row).permute(2, 0, 3, 4, 1)
        return x.reshape(B, C, H, per_row * strip_width)[..., :W]

    sums = to_image(sums)
    t_final = to_image(torch.exp(log_t)[None])
    rgb = sums[:, :3] + t_final * bg[:, :, None, None]
    return RasterOutput(rgb=rgb, alpha=1.0 - t_final, depth=sums[:, 3:], radii=radii, means2d=proj.means2d)


def rasterize_dense(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    cameras: CameraBatch,
    background: torch.Tensor,
) -> RasterOutput:
    """Reference rasterizer: every valid Gaussian against every pixel (memory and time O(N H W) per
    camera). Same arguments, rule and outputs as :func:`rasterize`."""
    B, H, W = len(cameras), cameras.height, cameras.width
    proj = project_gaussians(means, quats, scales, cameras)
    radii = footprint_radii(proj, opacities, H, W)
    bg = _background(background, B, means)
    dt, dev = means.dtype, means.device
    xs = torch.arange(W, device=dev, dtype=dt) + 0.5  # pixel centres
    ys = torch.arange(H, device=dev, dtype=dt) + 0.5
    rgbs, alphas, depths = [], [], []
    for b in range(B):
        order = torch.sort(proj.depth[b].detach(), stable=True).indices  # front to back, ties by index
        m = proj.means2d[b][order]
        na, nb, nc = (t[:, None, None] for t in _neg_half_conic(proj.conic[b][order]))
        alpha = _alpha(xs[None, None, :] - m[:, 0, None, None], ys[None, :, None] - m[:, 1, None, None],
                       na, nb, nc, opacities[order][:, None, None])  # [N,H,W]
        alpha = torch.where(proj.valid[b][order][:, None, None], alpha, torch.zeros_like(alpha)).reshape(-1, H * W)
        one_minus = torch.cat([torch.ones_like(alpha[:1]), 1.0 - alpha], dim=0)
        trans = torch.cumprod(one_minus, dim=0)  # [N+1,HW]: trans[i] = T before Gaussian i
        weight = alpha * trans[:-1]
        t_final = trans[-1]
        rgbs.append(colors[order].t() @ weight + t_final[None] * bg[b][:, None])
        depths.append(proj.depth[b][order][None] @ weight)
        alphas.append((1.0 - t_final)[None])
    return RasterOutput(
        rgb=torch.stack(rgbs).reshape(B, 3, H, W),
        alpha=torch.stack(alphas).reshape(B, 1, H, W),
        depth=torch.stack(depths).reshape(B, 1, H, W),
        radii=radii,
        means2d=proj.means2d,
    )
