"""Differentiable triangle-mesh rasterization in pure torch (the CPU back end; nvdiffrast's API shape).

Four functions, used in this order by :func:`render_mesh`:

* :func:`rasterize_triangles` -- per pixel the nearest triangle, its perspective-correct
  barycentrics and camera-space depth (:class:`Fragments`). Visibility is not differentiable; the
  barycentrics and depth are (w.r.t. the vertex positions), as in nvdiffrast's ``rasterize``.
* :func:`interpolate` -- vertex attributes at the pixels (differentiable w.r.t. the attributes and,
  through the barycentrics, the vertices).
* :func:`antialias` -- silhouette-edge antialiasing, which is what gives the vertices gradients
  from coverage (alpha) and from color jumps at the object's outline.
* :func:`render_mesh` -- rgb, alpha, depth, normal and triangle ids of a vertex-colored mesh.

Projection
----------
Cameras follow :mod:`threedistill.cameras`; the world-to-camera view is
:meth:`CameraBatch.w2c_opencv` (+x right, +y down, looking along +z) and ``K`` is
:meth:`CameraBatch.intrinsics`. A vertex ``v`` maps to ``(x, y, z) = R v + t`` and the screen point
``s = (fx x / z + cx, fy y / z + cy)`` in pixels; pixel (i, j) has its centre at ``(j + .5, i + .5)``.
**Near plane**: a triangle with any vertex at ``z <= near`` (default 0.01) is culled for that camera
(no clipping); triangles are drawn from both sides (no back-face culling).

Coverage and barycentrics (:func:`rasterize_triangles`)
-------------------------------------------------------
For a triangle with screen vertices ``s0, s1, s2`` and a pixel centre ``p``, the 2D barycentrics are
``l_k = e_k(p) / (e_0 + e_1 + e_2)`` with the edge functions ``e_k(p) = cross(s_{k+2} - s_{k+1}, p - s_{k+1})``
(``e_k`` is the edge opposite vertex ``k``; indices mod 3). ``p`` is covered iff all ``l_k >= 0``
(either winding; degenerate triangles with zero screen area cover nothing; a pixel centre exactly
on a shared edge is covered by both, and the tie below decides). The perspective-correct
barycentrics and the camera-space depth are::

    b_k = (l_k / z_k) / sum_m (l_m / z_m),     depth = 1 / sum_m (l_m / z_m)

(``b`` are the 3D barycentrics of the point where the pixel's ray meets the triangle's plane).
The nearest covering triangle wins; equal depths go to the lower triangle index.

How the pairs are found: each (camera, triangle) is paired only with the pixel centres of its
screen bounding box (like the Gaussian rasterizer's footprint pairs), the affine functions
``l_k(p)`` and ``1/depth(p)`` are evaluated for those pairs only (geometry in float64, no
gradients), and the winner per pixel is a ``scatter_reduce`` min over depth, then over the index.
Work and memory are O(sum of bounding-box areas), not O(pixels x triangles).
The barycentrics and depth of the winners are then recomputed with autograd in the vertices'
dtype from the winning triangle's vertices (nvdiffrast does the same in its backward pass).

Antialiasing (:func:`antialias`)
--------------------------------
nvdiffrast's edge-based approximation, in one dimension per neighbour pair. For every pair of
horizontally or vertically adjacent pixels ``p, q`` with different triangle ids, and each of the
two as the *owner* ``p`` (covered by triangle T): take the edge of T through which the segment from
``p``'s centre to ``q``'s centre leaves T (the crossed edge nearest to ``p``). The pair is blended
if that edge is a **silhouette edge** in this camera (a mesh boundary edge, or one whose two faces
have opposite screen winding) and T **occludes** ``q`` (``q`` is empty, or T's plane at ``q`` is
nearer than ``q``'s depth), and the pair runs across the edge's major direction: horizontal pairs
for edges steeper than 45 degrees, vertical pairs for the others (as nvdiffrast; each of the two
families alone already approximates the coverage along its lines, so using both for one edge would
double its gradient). With ``t`` in [0, 1] the crossing point along the segment (``p`` at 0,
``q`` at 1), a differentiable function of the edge's screen vertices,
``t = e(p) / (e(p) - e(q))`` for that edge's edge function ``e``::

    t > 1/2:  q <- q + (t - 1/2) (I_p - I_q)     (T covers the part [1/2, t] of q's cell)
    t < 1/2:  p <- p + (1/2 - t) (I_q - I_p)     (the part [t, 1/2] of p's cell lies outside T)

All increments are computed from the input image ``I`` and summed (a pixel with several silhouette
neighbours gets several). The image is unchanged in value away from silhouettes; at silhouettes
``d out / d t = +-(I_p - I_q)`` carries the color/coverage jump to the edge's vertices, which a
plain rasterized image (piecewise constant coverage) cannot. Interior edges between visible
triangles are not blended (their colors are continuous for vertex attributes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from threedistill.cameras import CameraBatch

NEAR_PLANE = 0.01  # triangles with a vertex at camera-space z <= this are culled


@dataclass
class Fragments:
    """What :func:`rasterize_triangles` returns for B cameras of H x W pixels and F faces.

    ``tri_id [B,H,W]`` (int64, -1 where no triangle), ``bary [B,H,W,3]`` perspective-correct
    barycentrics (0 where empty), ``depth [B,H,W]`` camera-space z (0 where empty); ``bary`` and
    ``depth`` are differentiable w.r.t. the vertex positions. ``pix [P]`` are the flat indices
    ``(b H + i) W + j`` of the covered pixels, ``pix_bary [P,3]`` their barycentrics (the graph the
    image tensors are scattered from) and ``faces [F,3]`` the faces rasterized.
    """

    tri_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    pix: torch.Tensor
    pix_bary: torch.Tensor
    faces: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``[B,1,H,W]`` float coverage (1 where a triangle was drawn)."""
        return (self.tri_id >= 0).unsqueeze(1).to(self.bary.dtype)


def project_vertices(verts: torch.Tensor, cameras: CameraBatch):
    """Screen positions ``[B,V,2]`` (pixels, +x right, +y down) and camera-space z ``[B,V]`` of
    ``verts [V,3]`` (world); differentiable. z <= 0 gives meaningless (but finite where z != 0) xy."""
    w2c = cameras.w2c_opencv().to(device=verts.device, dtype=verts.dtype)
    K = cameras.intrinsics().to(device=verts.device, dtype=verts.dtype)
    p = torch.einsum("bij,vj->bvi", w2c[:, :3, :3], verts) + w2c[:, None, :3, 3]
    z = p[..., 2]
    zs = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    sx = K[:, 0, 0, None] * p[..., 0] / zs + K[:, 0, 2, None]
    sy = K[:, 1, 1, None] * p[..., 1] / zs + K[:, 1, 2, None]
    return torch.stack([sx, sy], dim=-1), z


def _cross2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _edge_functions(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``e_k(p) = cross(s_{k+2} - s_{k+1}, p - s_{k+1})`` for screen triangles ``s [...,3,2]`` and
    points ``p [...,2]``; ``[...,3]`` (edge k is opposite vertex k)."""
    a = s.roll(-1, dims=-2)  # s_{k+1}
    b = s.roll(-2, dims=-2)  # s_{k+2}
    return _cross2(b - a, p.unsqueeze(-2) - a)


def _affine_coefficients(s: torch.Tensor, z: torch.Tensor):
    """For screen triangles ``s [N,3,2]`` with vertex depths ``z [N,3]``: ``L [N,3,3]`` with
    ``l_k(p) = L[k,0] px + L[k,1] py + L[k,2]`` (2D barycentrics) and ``Q [N,3]`` with
    ``1 / depth(p) = Q . (px, py, 1)``; and the signed doubled screen area ``[N]``."""
    a = s.roll(-1, dims=-2)
    b = s.roll(-2, dims=-2)
    d = b - a  # e_k(p) = d_x (py - a_y) - d_y (px - a_x)
    coef = torch.stack([-d[..., 1], d[..., 0], d[..., 1] * a[..., 0] - d[..., 0] * a[..., 1]], dim=-1)
    area = _cross2(s[:, 1] - s[:, 0], s[:, 2] - s[:, 0])
    safe = torch.where(area != 0, area, torch.ones_like(area))
    L = coef / safe[:, None, None]
    Q = (L / z[..., None]).sum(dim=1)
    return L, Q, area


def _resolve_nearest(key_pix: torch.Tensor, depth: torch.Tensor, tri: torch.Tensor, n_pix: int) -> torch.Tensor:
    """Per pixel the triangle of the smallest depth among the candidate (pixel, triangle, depth)
    triples (ties: lowest triangle index); ``[n_pix]`` int64, -1 for pixels without candidates."""
    dev = depth.device
    zmin = torch.full((n_pix,), float("inf"), dtype=depth.dtype, device=dev)
    zmin = zmin.scatter_reduce(0, key_pix, depth, "amin")
    win = depth == zmin.index_select(0, key_pix)
    big = torch.iinfo(torch.int64).max
    best = torch.full((n_pix,), big, dtype=torch.int64, device=dev)
    best = best.scatter_reduce(0, key_pix[win], tri[win], "amin")
    return torch.where(best == big, torch.full_like(best, -1), best)


def rasterize_triangles(
    verts: torch.Tensor, faces: torch.Tensor, cameras: CameraBatch, near: float = NEAR_PLANE
) -> Fragments:
    """Rasterize the mesh ``verts [V,3]`` (world), ``faces [F,3]`` (int64) into each of the B
    ``cameras`` (module docstring: coverage rule, near-plane culling, bounding-box pairs)."""
    B, H, W = len(cameras), cameras.height, cameras.width
    F = faces.shape[0]
    dev = verts.device
    faces = faces.to(device=dev, dtype=torch.int64)
    with torch.no_grad():
        xy, z = project_vertices(verts.detach().double(), cameras)
        s = xy[:, faces]  # [B,F,3,2]
        zt = z[:, faces]  # [B,F,3]
        L, Q, area = _affine_coefficients(s.reshape(B * F, 3, 2), zt.reshape(B * F, 3))
        valid = ((zt > near).all(-1).reshape(-1)) & (area != 0) & torch.isfinite(area)
        lo = s.reshape(B * F, 3, 2).amin(1)
        hi = s.reshape(B * F, 3, 2).amax(1)
        # Pixel centres c + .5 inside [lo, hi]: c in [ceil(lo - .5), floor(hi - .5)], clamped to the image.
        x_lo = torch.ceil(lo[:, 0] - 0.5).clamp(0, W).long()
        x_hi = torch.floor(hi[:, 0] - 0.5).clamp(-1, W - 1).long()
        y_lo = torch.ceil(lo[:, 1] - 0.5).clamp(0, H).long()
        y_hi = torch.floor(hi[:, 1] - 0.5).clamp(-1, H - 1).long()
        nx = (x_hi - x_lo + 1).clamp_min(0)
        n = nx * (y_hi - y_lo + 1).clamp_min(0) * valid
        gid = n.nonzero().squeeze(1)  # (camera, triangle) flat ids with a non-empty box
        counts = n.index_select(0, gid)
        total = int(counts.sum())
        pair = torch.repeat_interleave(gid, counts, output_size=total)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
        local = torch.arange(total, device=dev) - first
        nxp = nx.index_select(0, pair)
        col = x_lo.index_select(0, pair) + local % nxp
        row = y_lo.index_select(0, pair) + torch.div(local, nxp, rounding_mode="floor")
        p = torch.stack([col.double() + 0.5, row.double() + 0.5, torch.ones_like(col, dtype=torch.float64)], -1)
        lam = torch.einsum("pkc,pc->pk", L.index_select(0, pair), p)
        inside = (lam >= 0).all(-1)
        pair, row, col, p = pair[inside], row[inside], col[inside], p[inside]
        depth = 1.0 / (Q.index_select(0, pair) * p).sum(-1)
        cam = torch.div(pair, F, rounding_mode="floor")
        key_pix = (cam * H + row) * W + col
        tri_flat = _resolve_nearest(key_pix, depth, pair - cam * F, B * H * W)
        pix = (tri_flat >= 0).nonzero().squeeze(1)
        pix_tri = tri_flat.index_select(0, pix)

    pix_bary, pix_depth = _barycentrics_at(verts, faces, cameras, pix, pix_tri)
    n_pix = B * H * W
    bary = torch.zeros(n_pix, 3, dtype=verts.dtype, device=dev).index_put((pix,), pix_bary)
    depth_img = torch.zeros(n_pix, dtype=verts.dtype, device=dev).index_put((pix,), pix_depth)
    return Fragments(tri_id=tri_flat.reshape(B, H, W), bary=bary.reshape(B, H, W, 3),
                     depth=depth_img.reshape(B, H, W), pix=pix, pix_bary=pix_bary, faces=faces)


def _barycentrics_at(verts, faces, cameras: CameraBatch, pix: torch.Tensor, tri: torch.Tensor):
    """Differentiable perspective-correct barycentrics ``[P,3]`` and depth ``[P]`` of triangles ``tri``
    at the centres of the flat pixels ``pix`` (only the P selected triangles are projected)."""
    H, W = cameras.height, cameras.width
    w2c = cameras.w2c_opencv().to(device=verts.device, dtype=verts.dtype)
    K = cameras.intrinsics().to(device=verts.device, dtype=verts.dtype)
    cam = torch.div(pix, H * W, rounding_mode="floor")
    rem = pix - cam * H * W
    row = torch.div(rem, W, rounding_mode="floor")
    col = rem - row * W
    v = verts[faces.index_select(0, tri)]  # [P,3,3]
    R, t = w2c[cam, :3, :3], w2c[cam, :3, 3]
    pc = torch.einsum("pij,pkj->pki", R, v) + t[:, None]  # camera space
    z = pc[..., 2]
    k = K[cam]
    s = torch.stack([k[:, 0, 0, None] * pc[..., 0] / z + k[:, 0, 2, None],
                     k[:, 1, 1, None] * pc[..., 1] / z + k[:, 1, 2, None]], dim=-1)  # [P,3,2]
    p = torch.stack([col, row], -1).to(verts.dtype) + 0.5
    e = _edge_functions(s, p)
    lam = e / e.sum(-1, keepdim=True)
    w = lam / z
    inv_depth = w.sum(-1)
    return w / inv_depth[:, None], 1.0 / inv_depth


def interpolate(attrs: torch.Tensor, fragments: Fragments) -> torch.Tensor:
    """Vertex attributes ``attrs [V,C]`` (shared) or ``[B,V,C]`` (per camera) interpolated with the
    perspective-correct barycentrics: ``[B,C,H,W]``, zero where no triangle is drawn."""
    B, H, W = fragments.tri_id.shape
    C = attrs.shape[-1]
    pix = fragments.pix
    tri = fragments.tri_id.reshape(-1).index_select(0, pix)
    vid = fragments.faces.index_select(0, tri)  # [P,3]
    if attrs.dim() == 2:
        a = attrs[vid]  # [P,3,C]
    else:
        cam = torch.div(pix, H * W, rounding_mode="floor")
        a = attrs[cam[:, None], vid]
    vals = (fragments.pix_bary.to(a.dtype)[..., None] * a).sum(1)  # [P,C]
    out = torch.zeros(B * H * W, C, dtype=vals.dtype, device=vals.device).index_put((pix,), vals)
    return out.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _silhouette_edges(faces: torch.Tensor, n_verts: int, area_sign: torch.Tensor):
    """Edge ids ``[F,3]`` (edge k opposite vertex k) and ``[B,E]`` bool: boundary edges, and edges
    whose faces do not all have the same screen winding ``area_sign [B,F]`` (silhouettes)."""
    a = faces.roll(-1, dims=1)
    b = faces.roll(-2, dims=1)
    key = torch.minimum(a, b) * n_verts + torch.maximum(a, b)
    uniq, edge_id = torch.unique(key.reshape(-1), return_inverse=True)
    E = uniq.numel()
    eid = edge_id.reshape(-1)
    count = torch.zeros(E, device=faces.device).index_add_(0, eid, torch.ones(eid.numel(), device=faces.device))
    sign_per = area_sign.float().repeat_interleave(3, dim=1)  # [B,3F] matching key.reshape(-1)
    ssum = torch.zeros(area_sign.shape[0], E, device=faces.device).index_add_(1, eid, sign_per)
    sil = (count == 1)[None] | (ssum.abs() < count[None])
    return edge_id.reshape(faces.shape), sil


def antialias(
    image: torch.Tensor,
    fragments: Fragments,
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras: CameraBatch,
    background: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Silhouette antialiasing of ``image [B,C,H,W]`` rendered with ``fragments`` (module docstring).

    ``background`` (``[C]`` or ``[B,C]``), if given, replaces ``image`` at the empty pixels first;
    otherwise ``image`` is used as it is there. Differentiable w.r.t. ``image``, ``background`` and
    ``verts`` (through the silhouette crossing points).
    """
    B, C, H, W = image.shape
    dev = image.device
    faces = faces.to(device=dev, dtype=torch.int64)
    tri = fragments.tri_id
    if background is not None:
        bg = torch.as_tensor(background, device=dev).to(image.dtype)
        bg = bg.expand(B, C) if bg.dim() == 1 else bg
        image = torch.where(tri[:, None] >= 0, image, bg[:, :, None, None])
    flat_img = image.permute(0, 2, 3, 1).reshape(B * H * W, C)
    xy, z = project_vertices(verts, cameras)  # differentiable screen positions [B,V,2]

    with torch.no_grad():
        xy_d, z_d = project_vertices(verts.detach().double(), cameras)
        s_all = xy_d[:, faces]  # [B,F,3,2]
        area = _cross2(s_all[:, :, 1] - s_all[:, :, 0], s_all[:, :, 2] - s_all[:, :, 0])
        culled = (z_d[:, faces] <= NEAR_PLANE).any(-1)
        edge_id, sil = _silhouette_edges(faces, verts.shape[0], torch.where(culled, 0.0, torch.sign(area)))
        t_flat = tri.reshape(-1)
        d_flat = fragments.depth.detach().reshape(-1).double()
        idx = torch.arange(B * H * W, device=dev).reshape(B, H, W)
        ps, qs, vert = [], [], []
        for vertical, (a, b) in enumerate(((idx[:, :, :-1], idx[:, :, 1:]), (idx[:, :-1, :], idx[:, 1:, :]))):
            a, b = a.reshape(-1), b.reshape(-1)
            differ = t_flat[a] != t_flat[b]
            a, b = a[differ], b[differ]
            ps += [a, b]
            qs += [b, a]
            vert += [torch.full((2 * a.numel(),), bool(vertical), device=dev)]
        p, q, vert = torch.cat(ps), torch.cat(qs), torch.cat(vert)
        owner = t_flat[p] >= 0
        p, q, vert = p[owner], q[owner], vert[owner]
        T = t_flat[p]
        cam = torch.div(p, H * W, rounding_mode="floor")

        def centre(pix):
            rem = pix - cam * H * W
            r = torch.div(rem, W, rounding_mode="floor")
            return torch.stack([rem - r * W, r], -1).double() + 0.5

        pc, qc = centre(p), centre(q)
        s = s_all[cam, T]  # [K,3,2]
        L, Q, _ = _affine_coefficients(s, z_d[:, faces][cam, T])
        lp = torch.einsum("kmc,kc->km", L, torch.cat([pc, torch.ones_like(pc[:, :1])], -1))
        q1 = torch.cat([qc, torch.ones_like(qc[:, :1])], -1)
        lq = torch.einsum("kmc,kc->km", L, q1)
        crossing = lq < 0
        t_k = torch.where(crossing, lp.clamp_min(0) / (lp.clamp_min(0) - lq).clamp_min(1e-300),
                          torch.full_like(lq, float("inf")))
        k = t_k.argmin(-1)
        ok = crossing.any(-1)
        ok &= sil[cam, edge_id[T, k]]
        inv_dq = (Q * q1).sum(-1)
        occludes = (t_flat[q] < 0) | ((inv_dq > 0) & (1.0 / inv_dq.clamp_min(1e-300) < d_flat[q]))
        ok &= occludes
        # Each edge is handled by the pairs across it: horizontal pairs for steep edges, vertical
        # pairs for flat ones (counting both would double its gradient).
        rows = torch.arange(T.numel(), device=dev)
        ev = s[rows, (k + 2) % 3] - s[rows, (k + 1) % 3]
        ok &= torch.where(vert, ev[:, 0].abs() > ev[:, 1].abs(), ev[:, 1].abs() >= ev[:, 0].abs())
        p, q, T, k, cam, pc, qc = p[ok], q[ok], T[ok], k[ok], cam[ok], pc[ok], qc[ok]
        va = faces[T, (k + 1) % 3]
        vb = faces[T, (k + 2) % 3]

    # Differentiable crossing point t along p -> q of the edge (va, vb).
    sa, sb = xy[cam, va], xy[cam, vb]
    dt = image.dtype
    ep = _cross2(sb - sa, pc.to(dt) - sa)
    eq = _cross2(sb - sa, qc.to(dt) - sa)
    t = (ep / (ep - eq)).clamp(0.0, 1.0)
    Ip, Iq = flat_img.index_select(0, p), flat_img.index_select(0, q)
    into_q = (t > 0.5).detach()
    w = torch.where(into_q, t - 0.5, 0.5 - t)[:, None]
    target = torch.where(into_q, q, p)
    delta = torch.where(into_q[:, None], Ip - Iq, Iq - Ip) * w
    out = flat_img.index_add(0, target, delta)
    return out.reshape(B, H, W, C).permute(0, 3, 1, 2)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit world-space face normals ``[F,3]`` (right-handed winding: ``(v1 - v0) x (v2 - v0)``)."""
    v = verts[faces]
    n = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def render_mesh(
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras: CameraBatch,
    colors: torch.Tensor,
    background: torch.Tensor,
    antialiased: bool = True,
    near: float = NEAR_PLANE,
) -> dict:
    """Render a vertex-colored mesh: ``verts [V,3]``, ``faces [F,3]``, ``colors [V,3]`` or ``[B,V,3]``,
    ``background [3]`` or ``[B,3]``. Returns a dict of ``rgb [B,3,H,W]`` (composited over the
    background), ``alpha [B,1,H,W]`` (coverage; both antialiased unless ``antialiased=False``),
    ``depth [B,1,H,W]`` (camera-space z, 0 where empty), ``normal [B,3,H,W]`` (unit world face normal
    in [-1, 1], 0 where empty) and ``tri_id [B,H,W]`` (-1 where empty)."""
    B = len(cameras)
    frags = rasterize_triangles(verts, faces, cameras, near)
    mask = frags.mask
    bg = torch.as_tensor(background, device=verts.device).to(verts.dtype)
    bg = bg.expand(B, 3) if bg.dim() == 1 else bg
    rgb = interpolate(colors, frags) + (1.0 - mask) * bg[:, :, None, None]
    alpha = mask
    if antialiased:
        both = antialias(torch.cat([rgb, mask], 1), frags, verts, faces, cameras)
        rgb, alpha = both[:, :3], both[:, 3:]
    fn = face_normals(verts, frags.faces)
    tri = frags.tri_id.reshape(-1)
    normal = fn.index_select(0, tri.clamp_min(0)) * (tri >= 0)[:, None].to(fn.dtype)
    H, W = cameras.height, cameras.width
    normal = normal.reshape(B, H, W, 3).permute(0, 3, 1, 2)
    return dict(rgb=rgb, alpha=alpha, depth=frags.depth[:, None], normal=normal, tri_id=frags.tri_id)
