"""Surface extraction (marching cubes on a density field), UV unwrapping and texture baking,
and mesh files (GLB, OBJ, PLY).

Meshes are kept in the project's world frame (+Z up, front facing +X; see
:mod:`threedistill.cameras`) in memory and converted to the Y-up frame of mesh files only when
they are written (:func:`save_mesh`, :func:`to_y_up`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import io

import numpy as np
import torch
import trimesh
from PIL import Image

from threedistill.atomic import atomic_write_bytes, atomic_write_text
from threedistill.errors import UserError
from threedistill.meshio import PLACEMENT_TAG, Z_UP_TO_Y_UP, linear_to_srgb, placement_comment
from threedistill.meshio import srgb_to_linear as _srgb_to_linear
from threedistill.cameras import CameraBatch, make_cameras
from threedistill.representations.base import Representation
from threedistill.representations.mesh_raster import render_mesh

MESH_FORMATS = ("glb", "obj", "ply")

# World (Z-up, front +X) -> file (Y-up, front +Z): Z_UP_TO_Y_UP, defined beside the one mesh reader.


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def _module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _density_grid(rep: Representation, resolution: int, bound: float, chunk: int,
                  device: torch.device) -> np.ndarray:
    """``rep.density`` at the ``resolution^3`` cell corners spanning ``[-bound, bound]^3``;
    ``grid[i, j, k]`` is the density at ``(xs[i], xs[j], xs[k])`` (array axes = x, y, z)."""
    R = resolution
    xs = torch.linspace(-bound, bound, R, device=device)
    grid = np.empty((R, R, R), dtype=np.float32)
    slabs = max(1, chunk // (R * R))  # whole x-slabs per chunk
    for i0 in range(0, R, slabs):
        i1 = min(R, i0 + slabs)
        pts = torch.stack(torch.meshgrid(xs[i0:i1], xs, xs, indexing="ij"), dim=-1).reshape(-1, 3)
        sigma = rep.density(pts).reshape(i1 - i0, R, R)
        grid[i0:i1] = sigma.float().cpu().numpy()
    return grid


#: Block size (in grid cells) of :func:`_sparse_density_grid`'s coarse pass: 2 finds every blob
#: holding a ball more than 2 * sqrt(3) = 3.5 cells across and every slab more than 2 cells thick
#: (4 missed the 4-cell floater of tests/test_export.py); its coarse pass costs 1/8 of the grid.
COARSE_BLOCK = 2


@torch.no_grad()
def _density_at(rep: Representation, xs: torch.Tensor, idx: np.ndarray, chunk: int) -> np.ndarray:
    """``rep.density`` at the grid points ``(xs[i], xs[j], xs[k])`` of the rows of ``idx`` [N,3]."""
    out = np.empty(len(idx), dtype=np.float32)
    for s in range(0, len(idx), chunk):
        ii = torch.as_tensor(idx[s:s + chunk], device=xs.device)
        out[s:s + chunk] = rep.density(xs[ii]).reshape(-1).float().cpu().numpy()
    return out


def _sparse_density_grid(rep: Representation, resolution: int, bound: float, chunk: int, device: torch.device,
                         iso: float, block: int = COARSE_BLOCK) -> np.ndarray:
    """:func:`_density_grid` evaluated only where the ``iso`` surface can be (coarse to fine).

    A coarse pass samples every ``block``-th grid point per axis (and the last one); a block of
    ``block^3`` cells whose 8 coarse corners, and those of its 26 neighbour blocks, all lie below
    ``iso`` is left unevaluated (NaN, which :func:`extract_mesh` reads as outside), one whose
    corners and its neighbours' all lie above ``iso`` gets the float32 maximum; every grid point
    of the other blocks is evaluated as in the dense grid. Marching cubes only makes triangles in
    cells whose corners straddle ``iso``, so the mesh is exactly the dense grid's unless the
    field crosses ``iso`` only where no coarse sample within a block sees it: a structure that
    holds no coarse sample, i.e. a blob no more than ``block * sqrt(3)`` cells across or a
    sheet or strand no more than ``block`` cells thick lying between the coarse samples, and
    farther than a block from any coarse sample above ``iso``."""
    R, B = int(resolution), int(block)
    xs = torch.linspace(-bound, bound, R, device=device)
    coarse = np.arange(0, R, B)
    if coarse[-1] != R - 1:
        coarse = np.append(coarse, R - 1)
    C = len(coarse)
    cidx = np.stack(np.meshgrid(coarse, coarse, coarse, indexing="ij"), -1).reshape(-1, 3)
    cval = _density_at(rep, xs, cidx, chunk).reshape(C, C, C)
    above = cval > iso  # NaN: not above (outside), as extract_mesh reads it
    below = cval < iso  # exactly iso is neither: such blocks are evaluated

    def blocks_all(corner: np.ndarray) -> np.ndarray:
        """Per block [C-1]^3: all 8 coarse corners of the block and of its neighbours ``corner``."""
        cells = np.ones((C - 1,) * 3, bool)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    cells &= corner[dx:dx + C - 1, dy:dy + C - 1, dz:dz + C - 1]
        padded = np.pad(cells, 1, constant_values=True)
        out = np.ones_like(cells)
        for dx in (0, 1, 2):
            for dy in (0, 1, 2):
                for dz in (0, 1, 2):
                    out &= padded[dx:dx + C - 1, dy:dy + C - 1, dz:dz + C - 1]
        return out

    skip_below, skip_above = blocks_all(below), blocks_all(above)
    active = ~(skip_below | skip_above)
    cell_block = np.arange(R - 1) // B  # grid cell -> block, per axis
    cell_active = active[np.ix_(cell_block, cell_block, cell_block)]
    cell_above = skip_above[np.ix_(cell_block, cell_block, cell_block)]
    # A grid point is evaluated when any of its (up to 8) cells is active.
    point_active = np.zeros((R, R, R), bool)
    point_above = np.zeros((R, R, R), bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                point_active[dx:dx + R - 1, dy:dy + R - 1, dz:dz + R - 1] |= cell_active
                point_above[dx:dx + R - 1, dy:dy + R - 1, dz:dz + R - 1] |= cell_above
    grid = np.full((R, R, R), np.nan, dtype=np.float32)
    grid[point_above & ~point_active] = np.finfo(np.float32).max
    slabs = max(1, chunk // (R * R))  # whole x-slabs at a time: the index list stays small at 1024^3
    for i0 in range(0, R, slabs):
        sub = point_active[i0:i0 + slabs]
        idx = np.argwhere(sub)
        idx[:, 0] += i0
        grid[i0:i0 + slabs][sub] = _density_at(rep, xs, idx, chunk)
    return grid


def _outward_sign(vertices: np.ndarray, faces: np.ndarray, volume: np.ndarray) -> float:
    """Majority vote over faces of sign(normal . grad density): < 0 means the winding gives
    normals pointing from high to low density (outward). ``vertices`` are in index space."""
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    shape = np.array(volume.shape)
    idx = np.clip(np.rint(tri.mean(axis=1)).astype(np.int64), 1, shape - 2)
    i, j, k = idx[:, 0], idx[:, 1], idx[:, 2]
    grad = np.stack([
        volume[i + 1, j, k] - volume[i - 1, j, k],
        volume[i, j + 1, k] - volume[i, j - 1, k],
        volume[i, j, k + 1] - volume[i, j, k - 1],
    ], axis=-1)
    return float(np.sign(np.einsum("ij,ij->i", normals, grad)).sum())


def _keep_components(mesh: trimesh.Trimesh, min_component_ratio: float) -> trimesh.Trimesh:
    """``mesh`` (closed components, wound outward: normals from high to low density) without
    * the walls of empty pockets inside the solid: components of negative signed volume, wound
      towards the pocket. Nothing outside sees them, yet a hollow density (a shell of Gaussians
      started on a surface) exports one as large as the outer surface. All are kept when no
      component has a positive volume;
    * floaters: of the components left, those with fewer than ``min_component_ratio`` times the
      largest one's faces (0: none dropped).
    One pass of connected-component labels serves both (this runs in every step of the
    silhouette-level search)."""
    if len(mesh.faces) == 0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    tri = mesh.vertices[mesh.faces]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0  # per face, about the origin
    keep = np.bincount(labels, weights=signed) > 0
    if not keep.any():
        keep[:] = True
    if min_component_ratio > 0:
        counts = np.bincount(labels)
        keep &= counts >= min_component_ratio * counts[keep].max()
    if keep.all():
        return mesh
    mesh.update_faces(keep[labels])
    mesh.remove_unreferenced_vertices()
    return mesh


@torch.no_grad()
def _albedo_rgba(rep: Representation, vertices: np.ndarray, chunk: int, device: torch.device) -> np.ndarray:
    cols = []
    pts = torch.as_tensor(vertices, dtype=torch.float32)
    for s in range(0, len(pts), chunk):
        cols.append(rep.albedo(pts[s:s + chunk].to(device)).float().clamp(0, 1).cpu())
    rgb = torch.cat(cols).numpy() if cols else np.zeros((0, 3), np.float32)
    rgba = np.full((len(rgb), 4), 255, dtype=np.uint8)
    rgba[:, :3] = np.rint(np.nan_to_num(rgb, nan=0.0) * 255.0).astype(np.uint8)
    return rgba


def _surface_at(volume: np.ndarray, iso: float, bound: float, min_component_ratio: float) -> trimesh.Trimesh:
    """The ``iso`` level set of the (padded, NaN-free) density grid ``volume`` (the corners of a
    ``(R+2)^3`` grid whose inner ``R^3`` span ``[-bound, bound]^3``) as a world-frame mesh without
    colors, wound outward, floaters dropped (:func:`extract_mesh`). Empty when nothing exceeds ``iso``."""
    import mcubes

    resolution = volume.shape[0] - 2
    verts, faces = mcubes.marching_cubes(volume, iso)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), np.int64), process=False)
    if _outward_sign(verts, faces, volume) > 0:
        faces = faces[:, ::-1].copy()
    # index space of the padded grid -> world: index 1 is -bound, index R is +bound.
    step = 2.0 * bound / (resolution - 1)
    verts = np.clip((verts - 1.0) * step - bound, -bound, bound)
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)  # merges clamped duplicates
    f = mesh.faces
    distinct = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    if not distinct.all():
        mesh.update_faces(distinct)
        mesh.remove_unreferenced_vertices()
    return _keep_components(mesh, float(min_component_ratio))


@torch.no_grad()
def mesh_silhouette(mesh: trimesh.Trimesh, cameras: CameraBatch) -> torch.Tensor:
    """``[B,1,H,W]`` bool: where ``mesh``'s antialiased coverage from ``cameras`` exceeds 0.5 (the
    evaluation's silhouette rule)."""
    B = len(cameras)
    if len(mesh.faces) == 0:
        return torch.zeros(B, 1, cameras.height, cameras.width, dtype=torch.bool)
    v = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64)
    r = render_mesh(v, f, cameras, torch.ones_like(v), torch.zeros(3), antialiased=True)
    return r["alpha"] > 0.5


#: Views and resolution of :func:`matching_cameras`: rings of azimuths at two elevations.
MATCH_ELEVATIONS, MATCH_AZIMUTHS, MATCH_RESOLUTION = (0.0, 45.0), 8, 64


def matching_cameras(camera_cfg) -> CameraBatch:
    """The views a ``silhouette`` surface (the exported mesh's, ``export.surface``, and the refine
    stage's start, ``init_surface``) is matched from: :data:`MATCH_AZIMUTHS` evenly spaced azimuths
    at each of :data:`MATCH_ELEVATIONS`, at the run's evaluation distance and field of view,
    :data:`MATCH_RESOLUTION` pixels a side (fixed, so the same run always gives the same surface)."""
    n = MATCH_AZIMUTHS
    elev = torch.tensor([e for e in MATCH_ELEVATIONS for _ in range(n)])
    azim = torch.tensor([-180.0 + (a + 0.5) * 360.0 / n for _ in MATCH_ELEVATIONS for a in range(n)])
    k = len(elev)
    return make_cameras(elev, azim, torch.full((k,), float(camera_cfg.eval_distance)),
                        torch.full((k,), float(camera_cfg.eval_fovy)), MATCH_RESOLUTION)


#: Grid size (at most) and bisection steps of :func:`silhouette_threshold`'s search: the level, not
#: the mesh, is what it finds, and on a 64^3 grid 12 halvings of a log-density range leave it well
#: inside a pixel of the silhouette.
MATCH_GRID, MATCH_ITERATIONS = 64, 12


def silhouette_threshold(rep: Representation, volume: np.ndarray, bound: float, cameras: CameraBatch,
                         min_component_ratio: float = 0.05, iterations: int = MATCH_ITERATIONS) -> Optional[float]:
    """The density level whose isosurface shows the silhouette ``rep`` renders.

    A density threshold and what volume rendering shows are different things: a pixel's opacity is
    ``1 - exp(-integral of sigma)`` along its ray, so a thin shell of high density and a thick halo
    of low density both look solid, and a fixed iso level can extract a surface much smaller (or
    larger) than the rendered object. Here the level is chosen so that the isosurface's silhouette
    (coverage > 0.5) from ``cameras`` covers as many pixels as the representation's own rendered
    silhouette (``alpha > 0.5``, ``training=False``): the superlevel sets ``{sigma > tau}`` are nested,
    so the covered area falls as ``tau`` rises, and a bisection on ``log tau`` (``iterations``
    steps, between the grid's smallest positive and its largest density) finds it.

    ``volume``: the density at the ``R^3`` grid corners spanning ``[-bound, bound]^3``
    (:func:`_density_grid`; :func:`extract_mesh` passes one of at most :data:`MATCH_GRID` a side).
    Returns None when the render shows nothing (no level to match)."""
    cameras = cameras.to(_module_device(rep))
    was_training = rep.training
    rep.eval()
    try:
        with torch.no_grad():
            target = int((rep.render(cameras, training=False).alpha > 0.5).sum())
    finally:
        rep.train(was_training)
    finite = volume[np.isfinite(volume)]
    positive = finite[finite > 0]
    if target == 0 or positive.size == 0:
        return None
    cameras = cameras.to("cpu")
    lo, hi = float(np.log(positive.min())), float(np.log(positive.max()))
    outside = float(min(finite.min(), 0.0)) - 1.0
    padded = np.pad(np.nan_to_num(volume, nan=outside, posinf=np.finfo(np.float32).max, neginf=outside), 1,
                    mode="constant", constant_values=outside)

    def area(log_tau: float) -> int:
        return int(mesh_silhouette(_surface_at(padded, float(np.exp(log_tau)), bound, min_component_ratio), cameras).sum())

    if area(lo) <= target:  # even the lowest level shows no more than the render: take it
        return float(np.exp(lo))
    for _ in range(int(iterations)):  # invariant: area(lo) > target >= area(hi) (hi: the maximum, ~empty)
        mid = 0.5 * (lo + hi)
        if area(mid) > target:
            lo = mid
        else:
            hi = mid
    # the end of the bracket whose area is closer to the target
    return float(np.exp(lo if abs(area(lo) - target) < abs(area(hi) - target) else hi))


def extract_mesh(
    rep: Representation,
    resolution: int = 128,
    threshold: Optional[float] = None,
    min_component_ratio: float = 0.05,
    chunk: int = 2**18,
    coarse_block: int = COARSE_BLOCK,
    match_cameras: Optional[CameraBatch] = None,
) -> trimesh.Trimesh:
    """Extract the ``threshold`` isosurface of ``rep.density`` as a vertex-colored mesh.

    * The density is sampled at the ``resolution^3`` corners of a regular grid spanning exactly
      ``[-rep.bounds, rep.bounds]^3`` (no grad, ``chunk`` points at a time, on the
      representation's device); marching cubes (PyMCubes) runs on it. With ``coarse_block``
      (default 2; 0: the dense grid) only blocks near the surface are evaluated
      (:func:`_sparse_density_grid`: the same mesh, at a fraction of the density evaluations).
    * The grid is padded by one sub-threshold layer so the surface is closed where the object
      touches the bounds; those caps are clamped onto the bounding cube.
    * Faces are wound so normals point from high to low density (outward).
    * Inner walls of empty pockets (closed components of negative signed volume, invisible from
      outside: a hollow density's inside) are dropped (:func:`_keep_components`), then connected
      components with fewer than ``min_component_ratio`` times the largest component's faces
      (floaters).
    * Vertex colors are ``rep.albedo(vertices)`` as uint8 RGBA (sRGB, alpha 255).

    ``threshold`` defaults to ``rep.isosurface_threshold``; with ``match_cameras`` (and no
    ``threshold``) it is the level whose silhouette from those cameras matches the rendered one
    (:func:`silhouette_threshold`; ``rep.isosurface_threshold`` when the render shows nothing).
    The mesh is in world coordinates (+Z up, front +X). Raises :class:`UserError` if the density
    never exceeds the threshold.
    """
    resolution = int(resolution)
    if resolution < 2:
        raise ValueError(f"extract_mesh: resolution must be >= 2, got {resolution}")
    name = type(rep).__name__
    threshold_key = f"{rep.config_key}.isosurface_threshold"
    try:
        iso = float(rep.isosurface_threshold if threshold is None else threshold)
    except NotImplementedError:
        raise UserError(f"mesh export: representation {name} has no isosurface threshold; "
                        f"set export.formats=[] to skip mesh export") from None
    bound = float(rep.bounds)
    device = _module_device(rep)
    was_training = rep.training
    rep.eval()
    try:
        try:
            if threshold is None and match_cameras is not None:  # the level first: the sparse grid depends on it
                search = _density_grid(rep, min(MATCH_GRID, resolution), bound, int(chunk), device)
                matched = silhouette_threshold(rep, search, bound, match_cameras, min_component_ratio)
                iso = iso if matched is None else matched
            if coarse_block and resolution > 4 * int(coarse_block):
                volume = _sparse_density_grid(rep, resolution, bound, int(chunk), device, iso, int(coarse_block))
                if not np.any(volume > iso):  # nothing seen: the dense grid decides (and gives the max density)
                    volume = _density_grid(rep, resolution, bound, int(chunk), device)
            else:
                volume = _density_grid(rep, resolution, bound, int(chunk), device)
        except NotImplementedError:
            raise UserError(f"mesh export: representation {name} has no density field to extract a "
                            f"surface from; set export.formats=[] to skip mesh export") from None
        finite = volume[np.isfinite(volume)]
        if not np.any(volume > iso):  # NaN compares False: a diverged field has no surface either
            max_density = float(finite.max()) if finite.size else float("nan")
            raise UserError(
                f"no surface found: density never exceeds isosurface threshold {iso:g} "
                f"(max density {max_density:.4g}); train longer or lower {threshold_key}"
            )
        outside = min(float(finite.min()) if finite.size else iso, iso) - 1.0
        volume = np.nan_to_num(volume, nan=outside, posinf=np.finfo(np.float32).max, neginf=outside)
        padded = np.pad(volume, 1, mode="constant", constant_values=outside)
        mesh = _surface_at(padded, iso, bound, float(min_component_ratio))
        if len(mesh.faces) == 0:  # pragma: no cover - cannot happen once a voxel exceeds iso
            raise UserError(f"no surface found at isosurface threshold {iso:g}; train longer or lower "
                            f"{threshold_key}")
        colors = _albedo_rgba(rep, np.asarray(mesh.vertices), int(chunk), device)
    finally:
        rep.train(was_training)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors)
    return mesh


# ----------------------------------------------------------------------------------------------
# UV unwrapping and texture baking
# ----------------------------------------------------------------------------------------------
def _unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int):
    """xatlas charts packed into one atlas of about ``texture_size`` texels a side.

    Returns ``vmapping`` (new vertex -> input vertex), ``faces`` (over the new vertices), ``uv``
    in [0, 1] (trimesh/OBJ convention: v up, origin bottom left) and a per-face mask of the
    faces xatlas put in a chart (the others are near-zero-area slivers)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32),
                   np.ascontiguousarray(faces, dtype=np.uint32))
    chart_options = xatlas.ChartOptions()
    chart_options.max_iterations = 1  # the default (1) spelled out: more only slows marching-cubes meshes
    # No straightness term in chart growing (xatlas default 6): charting is most of xatlas's time
    # and this halves it on the quick start's 20k-face marching-cubes mesh (CPU 5.9 -> 2.3 s;
    # 663 -> 425 charts, atlas utilization 0.85 -> 0.76, texels on the surface -15%), with the
    # same export check. Chart borders are less straight, which only the dilation sees.
    chart_options.straightness_weight = 0.0
    pack_options = xatlas.PackOptions()
    pack_options.resolution = int(texture_size)
    pack_options.padding = int(padding)
    pack_options.bilinear = True
    atlas.generate(chart_options, pack_options)
    vmapping, new_faces, uv = atlas[0]
    vmapping = np.asarray(vmapping, dtype=np.int64)
    new_faces = np.asarray(new_faces, dtype=np.int64)
    uv = np.clip(np.asarray(uv, dtype=np.float64), 0.0, 1.0)
    # xatlas leaves (near-)zero-area slivers out of every chart, at UV (0, 0). Give their
    # vertices the UV of a charted copy of the same input vertex, so they sample the surface
    # color of where they are rather than whatever lies at the atlas corner.
    t = uv[new_faces]
    charted = np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                     - (t[:, 1, 1] - t[:, 0, 1]) * (t[:, 2, 0] - t[:, 0, 0])) > 0
    ok = np.zeros(len(vmapping), bool)
    ok[new_faces[charted].reshape(-1)] = True
    if not ok.all():
        representative = np.full(len(vertices), -1, dtype=np.int64)
        good = np.nonzero(ok)[0]
        representative[vmapping[good]] = good
        bad = np.nonzero(~ok)[0]
        src = representative[vmapping[bad]]
        uv[bad[src >= 0]] = uv[src[src >= 0]]
    return vmapping, new_faces, uv, charted


def _rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, max_candidates: int = 2**22):
    """Texels whose centres lie in (or within half a texel diagonal of) a UV triangle.

    Texel ``(row, col)`` has its centre at ``u = (col + 0.5) / size``, ``v = 1 - (row + 0.5) /
    size`` (PNG rows run top to bottom, v runs bottom to top). Returns flat texel indices
    ``row * size + col``, their face and barycentric coordinates ``[N, 3]`` (clamped onto the
    triangle for border texels); a texel near several triangles keeps the nearest one."""
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=-1)
    tri = px[faces]  # [F,3,2]
    # Conservative: texels whose centre is within half a texel diagonal of the triangle too
    # (the border texels bilinear filtering reads), at the nearest point of the triangle.
    reach = 0.71
    lo = np.ceil(tri.min(axis=1) - reach).astype(np.int64).clip(0, size - 1)
    hi = np.floor(tri.max(axis=1) + reach).astype(np.int64).clip(0, size - 1)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    extent = np.maximum(hi - lo + 1, 0).max(axis=1)
    ok = (np.abs(area) > 1e-12) & (hi >= lo).all(axis=1)
    texels, face_ids, barys, dists = [], [], [], []
    # Group faces by bounding-box size (powers of two) so each group tests a small dense grid.
    bucket = np.ceil(np.log2(np.maximum(extent, 1))).astype(np.int64)
    for k in np.unique(bucket[ok]):
        side = 1 << int(k)
        ids_all = np.nonzero(ok & (bucket == k))[0]
        step = max(1, max_candidates // (side * side))
        offs = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2)
        for s in range(0, len(ids_all), step):
            ids = ids_all[s:s + step]
            pts = lo[ids][:, None, :] + offs[None]  # [n,S,2] integer (x, y) texel centres
            inside_box = (pts <= hi[ids][:, None, :]).all(-1)
            p = pts.astype(np.float64)
            ta, tb, tc, ar = a[ids][:, None], b[ids][:, None], c[ids][:, None], area[ids][:, None]

            def edge(p0, p1):
                return ((p1[..., 0] - p0[..., 0]) * (p[..., 1] - p0[..., 1])
                        - (p1[..., 1] - p0[..., 1]) * (p[..., 0] - p0[..., 0]))

            w0 = edge(tb, tc) / ar
            w1 = edge(tc, ta) / ar
            w2 = 1.0 - w0 - w1
            inside = (w0 >= -1e-7) & (w1 >= -1e-7) & (w2 >= -1e-7)
            # w_k |area| / |opposite edge| is the signed distance to that edge's line (> 0 on the
            # triangle's side): a texel farther than ``reach`` outside any edge line is out of
            # reach, so exact distances are only taken in the thin band around the triangle.
            aa = np.abs(ar)
            band = inside_box & ~inside
            for w, p0, p1 in ((w0, tb, tc), (w1, tc, ta), (w2, ta, tb)):
                band &= w * aa >= -reach * (1.0 + 1e-9) * np.sqrt(((p1 - p0) ** 2).sum(-1))
            dist2 = np.where(inside, 0.0, np.inf)
            bi, bs = np.nonzero(band)
            if len(bi):
                q = p[bi, bs]
                d2 = np.full(len(bi), np.inf)
                for p0, p1 in ((a, b), (b, c), (c, a)):
                    s0, d = p0[ids][bi], (p1 - p0)[ids][bi]
                    t = (((q - s0) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12)).clip(0.0, 1.0)
                    e = q - (s0 + t[:, None] * d)
                    d2 = np.minimum(d2, (e * e).sum(-1))
                dist2[bi, bs] = d2
            dist = dist2  # squared distances: the same nearest-first order
            fi, si = np.nonzero(inside_box & (dist <= reach * reach))
            if len(fi) == 0:
                continue
            q = pts[fi, si]
            texels.append(q[:, 1] * size + q[:, 0])
            face_ids.append(ids[fi])
            dists.append(dist[fi, si])
            barys.append(np.clip(np.stack([w0[fi, si], w1[fi, si], w2[fi, si]], -1), 0.0, 1.0))
    if not texels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    texels, face_ids, barys = np.concatenate(texels), np.concatenate(face_ids), np.concatenate(barys)
    order = np.lexsort((np.concatenate(dists), texels))  # per texel, the nearest triangle first
    texels, face_ids, barys = texels[order], face_ids[order], barys[order]
    texels, first = np.unique(texels, return_index=True)
    barys = barys[first]
    return texels, face_ids[first], barys / np.maximum(barys.sum(-1, keepdims=True), 1e-12)


def _dilate(image: np.ndarray, filled: np.ndarray, passes: int) -> np.ndarray:
    """Grow the filled texels ``passes`` texels outwards (each new texel: the mean of its filled
    8-neighbours), then fill what is still empty with the mean color, so bilinear filtering
    and mip-mapping at chart borders never pick up a background color."""
    image = image.copy()
    filled = filled.copy()
    H, W = filled.shape
    for _ in range(int(passes)):
        if filled.all():
            break
        pad_img = np.pad(image * filled[..., None], ((1, 1), (1, 1), (0, 0)))
        pad_w = np.pad(filled.astype(image.dtype), 1)
        acc = np.zeros_like(image)
        cnt = np.zeros((H, W), image.dtype)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                acc += pad_img[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
                cnt += pad_w[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
        grow = ~filled & (cnt > 0)
        if not grow.any():
            break
        image[grow] = acc[grow] / cnt[grow][:, None]
        filled = filled | grow
    if filled.any() and not filled.all():
        image[~filled] = image[filled].mean(axis=0)
    return image


def bake_texture(
    rep: Optional[Representation],
    mesh: trimesh.Trimesh,
    texture_size: int = 1024,
    padding: Optional[int] = None,
    dilation: int = 8,
    chunk: int = 2**18,
) -> trimesh.Trimesh:
    """UV-unwrap a world-frame mesh (xatlas) and bake ``rep.albedo`` into a base-color texture
    (``rep=None``: the mesh's own vertex colors, interpolated with the same barycentrics).

    Every texel whose centre lies in a UV triangle (or within half a texel diagonal of one: the
    border texels bilinear filtering reads) gets ``rep.albedo`` at the world position with the
    same (clamped) barycentric coordinates (no grad, ``chunk`` points at a time); charts are then
    dilated ``dilation`` texels and the rest of the texture is filled with the mean color.
    ``padding`` (texels between charts) defaults to ``max(2, texture_size // 256)``.

    Returns a new mesh, split along the UV seams, whose visual is a
    :class:`trimesh.visual.TextureVisuals` with ``uv`` and a non-metallic, rough
    :class:`~trimesh.visual.material.PBRMaterial` whose ``baseColorTexture`` is the
    ``texture_size``-square RGB (sRGB 8-bit) image, and ``vertex_attributes["color"]`` holds
    the input's vertex colors (sRGB RGBA uint8) for formats without textures (PLY).
    """
    texture_size = int(texture_size)
    if texture_size < 16:
        raise ValueError(f"bake_texture: texture_size must be >= 16, got {texture_size}")
    if padding is None:
        padding = max(2, texture_size // 256)
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    vmapping, faces, uv, charted = _unwrap(verts, np.asarray(mesh.faces), texture_size, padding)
    new_verts = verts[vmapping]
    # Only charted faces are baked: a sliver's UVs may now span charts (its area is ~0 anyway).
    texels, face_ids, barys = _rasterize_uv(uv, faces[charted], texture_size)
    face_ids = np.nonzero(charted)[0][face_ids]
    points = np.einsum("nk,nkd->nd", barys, new_verts[faces[face_ids]])

    if rep is None:
        if mesh.visual.kind != "vertex":
            raise ValueError("bake_texture: without a representation the mesh needs vertex colors")
        vc = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3][vmapping]
        colors = np.einsum("nk,nkd->nd", barys, vc[faces[face_ids]])
    else:
        device = _module_device(rep)
        was_training = rep.training
        rep.eval()
        try:
            colors = _albedo_rgba(rep, points, int(chunk), device)[:, :3]
        finally:
            rep.train(was_training)
    image = np.zeros((texture_size * texture_size, 3), np.float32)
    image[texels] = colors.astype(np.float32)
    filled = np.zeros(texture_size * texture_size, bool)
    filled[texels] = True
    image = _dilate(image.reshape(texture_size, texture_size, 3), filled.reshape(texture_size, texture_size),
                    dilation)
    texture = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")

    out = trimesh.Trimesh(vertices=new_verts, faces=faces, process=False)
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=texture, baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0, roughnessFactor=1.0,
    )
    out.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    if mesh.visual.kind == "vertex":
        out.vertex_attributes["color"] = np.asarray(mesh.visual.vertex_colors, dtype=np.uint8)[vmapping]
    return out


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
#: World (Z-up, front +X) -> a Z-up file whose front faces -Y (Blender's front view looks at it):
#: ``(x, y, z) -> (y, -x, z)``, a rotation about Z (det = +1).
Z_UP_FRONT_MINUS_Y = np.array(
    [[0.0, 1.0, 0.0, 0.0],
     [-1.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, 1.0, 0.0],
     [0.0, 0.0, 0.0, 1.0]]
)

#: ``export.up_axis`` values, ``export.origin`` values.
UP_AXES = ("auto", "y", "z")
ORIGINS = ("base", "center", "world")


def file_up_axis(fmt: str, up_axis: str = "auto") -> str:
    """The up axis a ``fmt`` file is written with: GLB is always Y-up (the glTF spec; every
    importer converts it); ``auto`` is Y-up for OBJ (Blender's OBJ importer converts Y-up,
    forward -Z, by default) and Z-up for PLY (Blender's PLY importer keeps the file's axes, so a
    Y-up PLY would lie on its side)."""
    fmt, up_axis = str(fmt).lower(), str(up_axis).lower()
    if up_axis not in UP_AXES:
        raise UserError(f"config key 'export.up_axis' must be auto, y or z, got '{up_axis}'")
    if fmt == "glb":
        return "y"
    if up_axis == "auto":
        return "z" if fmt == "ply" else "y"
    return up_axis


def placement(vertices: np.ndarray, fmt: str, up_axis: str = "auto", origin: str = "world",
              size: Optional[float] = None) -> np.ndarray:
    """The 4x4 world -> file transform of a ``fmt`` file of a mesh with world ``vertices`` [V,3].

    Applied in this order: the pivot moves to the origin (``origin``: ``world`` keeps the world
    frame's origin, ``center`` takes the bounding box's centre, ``base`` the centre of its
    bottom face, so the object stands on the ground plane); a uniform scale makes the object
    ``size`` units (metres) tall (None: the world scale); then the rotation to the file's axes
    (:func:`file_up_axis`: Y-up is :data:`Z_UP_TO_Y_UP`, front +Z; Z-up is
    :data:`Z_UP_FRONT_MINUS_Y`, front -Y). Either way the object's front faces Blender's front
    view after import."""
    origin = str(origin).lower()
    if origin not in ORIGINS:
        raise UserError(f"config key 'export.origin' must be base, center or world, got '{origin}'")
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    lo, hi = (v.min(0), v.max(0)) if len(v) else (np.zeros(3), np.zeros(3))
    if origin == "world":
        pivot = np.zeros(3)
    else:
        pivot = (lo + hi) / 2.0
        if origin == "base":
            pivot[2] = lo[2]
    scale = 1.0
    if size is not None:
        height = float(hi[2] - lo[2])
        if not float(size) > 0:
            raise UserError(f"config key 'export.size' must be > 0 (metres) or null, got {size}")
        if height <= 0:
            raise UserError("export.size: the mesh has no height to scale")
        scale = float(size) / height
    move = np.eye(4)
    move[:3, 3] = -pivot
    rotation = Z_UP_TO_Y_UP if file_up_axis(fmt, up_axis) == "y" else Z_UP_FRONT_MINUS_Y
    return rotation @ np.diag([scale, scale, scale, 1.0]) @ move


def export_placement(mesh: trimesh.Trimesh, fmt: str, export_cfg) -> np.ndarray:
    """:func:`placement` of ``mesh`` (world frame) with the ``export`` group's ``up_axis``,
    ``origin`` and ``size``."""
    return placement(np.asarray(mesh.vertices), fmt, str(getattr(export_cfg, "up_axis", "auto")),
                     str(getattr(export_cfg, "origin", "world")), getattr(export_cfg, "size", None))


def to_y_up(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of a world-frame mesh (+Z up, front +X) in the Y-up frame of mesh files.

    The rotation is ``(x, y, z) -> (y, z, x)``: up (+Z) becomes +Y and the front (+X) becomes
    +Z, which is glTF's convention (+Y up, the asset's front faces +Z) and what Blender's OBJ
    importer expects by default (forward -Z, up Y), so in Blender the object stands on the
    ground with its front towards the front view (-Y). The object's left (+Y) becomes +X.
    """
    out = mesh.copy()
    out.apply_transform(Z_UP_TO_Y_UP)
    return out




def _frame_name(matrix: np.ndarray) -> str:
    """``"Y-up, front +Z"``: where a world -> file transform sends the world's up (+Z) and front (+X)."""
    def axis(v) -> str:
        i = int(np.argmax(np.abs(v)))
        return ("+" if v[i] > 0 else "-") + "XYZ"[i]
    r = np.asarray(matrix, dtype=np.float64)[:3, :3]
    return f"{axis(r[:, 2])[1]}-up, front {axis(r[:, 0])}"


def _ply_with_comments(data: bytes, comments: List[str]) -> bytes:
    """A PLY file's bytes with ``comment`` lines added after its ``format`` line."""
    end = data.index(b"end_header")
    lines = data[:end].split(b"\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(b"format")) + 1
    lines[at:at] = [f"comment {c}".encode("ascii") for c in comments]
    return b"\n".join(lines) + data[end:]


def _record_placement(matrix: np.ndarray):
    """A glTF tree post-processor that records the placement in ``asset.extras``."""
    def record(tree: dict) -> None:
        extras = tree.setdefault("asset", {}).setdefault("extras", {})
        extras[PLACEMENT_TAG] = [float(x) for x in np.asarray(matrix, dtype=np.float64).ravel()]
    return record


def _glb_bytes(mesh: trimesh.Trimesh, rgba: Optional[np.ndarray], matrix: np.ndarray = Z_UP_TO_Y_UP) -> bytes:
    """GLB with COLOR_0 (linear, as glTF requires) and a non-metallic material.

    Without a material glTF viewers use the spec default (metallic = 1), which renders vertex
    colors dark; trimesh only writes a material for texture visuals, so the colors go in as
    a vertex attribute of a UV-less texture visual."""
    out = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=1.0,
    )
    visual = trimesh.visual.TextureVisuals(material=material)
    if rgba is not None:
        lin = rgba.astype(np.float64) / 255.0
        lin[:, :3] = _srgb_to_linear(lin[:, :3])
        visual.vertex_attributes["color"] = np.rint(lin * 255.0).astype(np.uint8)
    out.visual = visual
    return trimesh.exchange.gltf.export_glb(out, include_normals=True, tree_postprocessor=_record_placement(matrix))


def _welded_normals(mesh: trimesh.Trimesh) -> np.ndarray:
    """Smooth vertex normals across UV seams: the normals of the mesh with coincident vertices
    merged (seam copies are exact copies), so shading shows no seams."""
    uniq, inverse = np.unique(np.asarray(mesh.vertices), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    welded = trimesh.Trimesh(vertices=uniq, faces=inverse[np.asarray(mesh.faces)], process=False)
    return np.asarray(welded.vertex_normals)[inverse]


def _textured_glb_bytes(mesh: trimesh.Trimesh, matrix: np.ndarray = Z_UP_TO_Y_UP) -> bytes:
    """GLB with TEXCOORD_0, NORMAL and a metallicRoughness material: the baked sRGB PNG as
    ``baseColorTexture``, metallic 0, roughness 1 (no COLOR_0: it would multiply the texture)."""
    out = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_normals=_welded_normals(mesh),
                          process=False)
    src = mesh.visual.material
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=_texture_image(mesh), baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0, roughnessFactor=1.0, doubleSided=bool(getattr(src, "doubleSided", False)),
    )
    out.visual = trimesh.visual.TextureVisuals(uv=np.asarray(mesh.visual.uv), material=material)
    return trimesh.exchange.gltf.export_glb(out, include_normals=True, tree_postprocessor=_record_placement(matrix))


def _texture_image(mesh: trimesh.Trimesh) -> Image.Image:
    mat = mesh.visual.material
    img = getattr(mat, "baseColorTexture", None)
    if img is None:
        img = getattr(mat, "image", None)
    if img is None:
        raise ValueError("textured mesh has no base-color image")
    return img.convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _is_textured(mesh: trimesh.Trimesh) -> bool:
    return (mesh.visual.kind == "texture" and getattr(mesh.visual, "uv", None) is not None
            and len(mesh.visual.uv) == len(mesh.vertices))


def _welded_vertex_colored(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A textured (seam-split) mesh as a welded vertex-colored one: the colors of
    ``vertex_attributes["color"]`` (from :func:`bake_texture`), else the texture at each UV."""
    colors = mesh.vertex_attributes.get("color")
    if colors is None or len(colors) != len(mesh.vertices):
        colors = np.asarray(mesh.visual.to_color().vertex_colors, dtype=np.uint8)
    out = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=colors, process=False)
    out.merge_vertices(merge_tex=True, merge_norm=True)
    return out


def texture_paths(path: Union[str, Path]) -> tuple[Path, Path]:
    """The material file and texture written next to a textured OBJ: ``<stem>.mtl``, ``<stem>.png``."""
    path = Path(path)
    return path.with_suffix(".mtl"), path.with_suffix(".png")


def save_mesh(mesh: trimesh.Trimesh, path: Union[str, Path], fmt: Optional[str] = None,
              world_to_file: Optional[np.ndarray] = None) -> Path:
    """Write a world-frame mesh (as returned by :func:`extract_mesh` or :func:`bake_texture`)
    to ``path`` atomically.

    ``fmt`` (glb, obj, ply) defaults to the file suffix. The mesh is moved into the file's frame
    first by ``world_to_file`` (4x4; :func:`placement` / :func:`export_placement`), default
    :data:`Z_UP_TO_Y_UP` (Y-up: ``(x, y, z) -> (y, z, x)``, :func:`to_y_up`). The transform is
    recorded in the file (:func:`threedistill.meshio.world_to_file` reads it: a GLB's
    ``asset.extras``, an OBJ comment, a PLY header comment), so the mesh readers bring any
    placement back to the world frame.

    A textured mesh (:func:`bake_texture`) is written as:

    * GLB: ``POSITION``, ``NORMAL`` (smooth across UV seams), ``TEXCOORD_0`` and a metallicRoughness material with the
      texture (an embedded PNG) as ``baseColorTexture``, metallic 0, roughness 1.
    * OBJ: ``v``/``vt``/``vn`` lines with ``mtllib <stem>.mtl``; ``<stem>.mtl`` (``Kd 1 1 1``,
      ``map_Kd <stem>.png``) and ``<stem>.png`` are written next to it, referenced by bare
      file name so the three files can be moved or zipped together.
    * PLY: welded again, with vertex colors (PLY has no standard texture reference).

    A vertex-colored mesh (:func:`extract_mesh`, ``export.texture=false``) keeps its colors:

    * GLB: ``COLOR_0`` (RGBA8, normalized) converted from sRGB to linear as glTF specifies, with
      a white, non-metallic, rough material and smooth vertex normals. (trimesh reads the
      colors back into ``visual.vertex_attributes["color"]`` of the scene's geometry;
      ``trimesh.load(..., force="mesh")`` drops them.)
    * OBJ: ``v x y z r g b`` lines (sRGB floats in [0, 1]) and smooth ``vn`` normals; no
      material file.
    * PLY: binary little-endian with uchar ``red green blue alpha`` vertex properties (sRGB).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in MESH_FORMATS:
        raise UserError(f"unknown mesh format '{fmt}' for {path} (use glb, obj or ply)")
    matrix = Z_UP_TO_Y_UP if world_to_file is None else np.asarray(world_to_file, dtype=np.float64)
    y_up = mesh.copy()
    y_up.apply_transform(matrix)
    tag = placement_comment(matrix)
    frame = _frame_name(matrix)
    textured = _is_textured(y_up)
    if textured and fmt == "ply":
        y_up, textured = _welded_vertex_colored(y_up), False
    rgba = None
    if y_up.visual.kind == "vertex":
        rgba = np.asarray(y_up.visual.vertex_colors, dtype=np.uint8)
    if fmt == "glb":
        atomic_write_bytes(path, _textured_glb_bytes(y_up, matrix) if textured else _glb_bytes(y_up, rgba, matrix))
    elif fmt == "obj" and textured:
        mtl_path, png_path = texture_paths(path)
        out = trimesh.Trimesh(vertices=y_up.vertices, faces=y_up.faces, vertex_normals=_welded_normals(y_up),
                              process=False)
        out.visual = trimesh.visual.TextureVisuals(
            uv=np.asarray(y_up.visual.uv), material=trimesh.visual.material.SimpleMaterial(name="albedo"))
        text = trimesh.exchange.obj.export_obj(
            out, include_normals=True, include_color=False, include_texture=True, write_texture=False,
            mtl_name=mtl_path.name, header=f"threedistill ({frame})\n# {tag}",
        )
        if f"mtllib {mtl_path.name}" not in text:  # pragma: no cover - a trimesh behaviour change
            raise RuntimeError("trimesh wrote no mtllib line for a textured OBJ")
        mtl = (f"# threedistill\nnewmtl albedo\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nNs 0\nd 1\nillum 1\n"
               f"map_Kd {png_path.name}\n")
        # The texture and material first: the OBJ, written last, is what references them.
        atomic_write_bytes(png_path, _png_bytes(_texture_image(y_up)))
        atomic_write_text(mtl_path, mtl)
        atomic_write_text(path, text)
    elif fmt == "obj":
        text = trimesh.exchange.obj.export_obj(
            y_up, include_normals=True, include_color=rgba is not None, include_texture=False,
            write_texture=False, header=f"threedistill ({frame})\n# {tag}",
        )
        atomic_write_text(path, text)
    else:
        data = trimesh.exchange.ply.export_ply(y_up, encoding="binary", vertex_normal=False,
                                                include_attributes=False)
        atomic_write_bytes(path, _ply_with_comments(data, [f"threedistill ({frame})", tag]))
    return path


__all__ = ["placement", "export_placement", "file_up_axis", "UP_AXES", "ORIGINS", "Z_UP_FRONT_MINUS_Y",
           "extract_mesh", "matching_cameras", "silhouette_threshold", "bake_texture", "save_mesh", "texture_paths",
           "to_y_up", "linear_to_srgb", "MESH_FORMATS",
           "Z_UP_TO_Y_UP"]
