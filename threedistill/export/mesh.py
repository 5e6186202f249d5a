"""Surface extraction (marching cubes on a density field) and mesh files (GLB, OBJ, PLY).

Meshes are kept in the project's world frame (+Z up, front facing +X; see
:mod:`threedistill.cameras`) in memory and converted to the Y-up frame of mesh files only when
they are written (:func:`save_mesh`, :func:`to_y_up`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import trimesh

from threedistill.atomic import atomic_write_bytes, atomic_write_text
from threedistill.errors import UserError
from threedistill.representations.base import Representation

MESH_FORMATS = ("glb", "obj", "ply")

# World (Z-up, front +X) -> file (Y-up, front +Z): (x, y, z) -> (y, z, x). A proper rotation
# (a cyclic permutation of the axes, det = +1): world +X (front) -> +Z, world +Y (the
# object's left) -> +X, world +Z (up) -> +Y.
Z_UP_TO_Y_UP = np.array(
    [[0.0, 1.0, 0.0, 0.0],
     [0.0, 0.0, 1.0, 0.0],
     [1.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, 0.0, 1.0]]
)


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


def _keep_large_components(mesh: trimesh.Trimesh, min_component_ratio: float) -> trimesh.Trimesh:
    if min_component_ratio <= 0 or len(mesh.faces) == 0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    keep = counts >= min_component_ratio * counts.max()
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


def extract_mesh(
    rep: Representation,
    resolution: int = 128,
    threshold: Optional[float] = None,
    min_component_ratio: float = 0.05,
    chunk: int = 2**18,
) -> trimesh.Trimesh:
    """Extract the ``threshold`` isosurface of ``rep.density`` as a vertex-coloured mesh.

    * The density is sampled at the ``resolution^3`` corners of a regular grid spanning exactly
      ``[-rep.bounds, rep.bounds]^3`` (no grad, ``chunk`` points at a time, on the
      representation's device); marching cubes (PyMCubes) runs on it.
    * The grid is padded by one sub-threshold layer so the surface is closed where the object
      touches the bounds; those caps are clamped onto the bounding cube.
    * Faces are wound so normals point from high to low density (outward).
    * Connected components with fewer than ``min_component_ratio`` times the largest
      component's faces (floaters) are dropped.
    * Vertex colours are ``rep.albedo(vertices)`` as uint8 RGBA (sRGB, alpha 255).

    ``threshold`` defaults to ``rep.isosurface_threshold``. The mesh is in world coordinates
    (+Z up, front +X). Raises :class:`UserError` if the density never exceeds ``threshold``.
    """
    import mcubes

    resolution = int(resolution)
    if resolution < 2:
        raise ValueError(f"extract_mesh: resolution must be >= 2, got {resolution}")
    name = type(rep).__name__
    threshold_key = f"{getattr(rep, 'config_key', 'representation.<name>')}.isosurface_threshold"
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
        verts, faces = mcubes.marching_cubes(padded, iso)
        faces = np.asarray(faces, dtype=np.int64)
        if len(faces) == 0:  # pragma: no cover - cannot happen once a voxel exceeds iso
            raise UserError(f"no surface found at isosurface threshold {iso:g}; train longer or lower "
                            f"{threshold_key}")
        if _outward_sign(verts, faces, padded) > 0:
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
        mesh = _keep_large_components(mesh, float(min_component_ratio))
        colors = _albedo_rgba(rep, np.asarray(mesh.vertices), int(chunk), device)
    finally:
        rep.train(was_training)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors)
    return mesh


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
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


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Inverse of the sRGB transfer function (for reading COLOR_0 of our GLB files back)."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


def _glb_bytes(mesh: trimesh.Trimesh, rgba: Optional[np.ndarray]) -> bytes:
    """GLB with COLOR_0 (linear, as glTF requires) and a non-metallic material.

    Without a material glTF viewers use the spec default (metallic = 1), which renders vertex
    colours dark; trimesh only writes a material for texture visuals, so the colours go in as
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
    return trimesh.exchange.gltf.export_glb(out, include_normals=True)


def save_mesh(mesh: trimesh.Trimesh, path: Union[str, Path], fmt: Optional[str] = None) -> Path:
    """Write a world-frame mesh (as returned by :func:`extract_mesh`) to ``path`` atomically.

    ``fmt`` (glb, obj, ply) defaults to the file suffix. The mesh is rotated to Y-up first
    (:func:`to_y_up`: ``(x, y, z) -> (y, z, x)``). Vertex colours are kept:

    * GLB: ``COLOR_0`` (RGBA8, normalized) converted from sRGB to linear as glTF specifies, with
      a white, non-metallic, rough material and smooth vertex normals. (trimesh reads the
      colours back into ``visual.vertex_attributes["color"]`` of the scene's geometry;
      ``trimesh.load(..., force="mesh")`` drops them.)
    * OBJ: ``v x y z r g b`` lines (sRGB floats in [0, 1]) and smooth ``vn`` normals; no
      material file.
    * PLY: binary little-endian with uchar ``red green blue alpha`` vertex properties (sRGB).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in MESH_FORMATS:
        raise UserError(f"unknown mesh format '{fmt}' for {path} (use glb, obj or ply)")
    y_up = to_y_up(mesh)
    rgba = None
    if y_up.visual.kind == "vertex":
        rgba = np.asarray(y_up.visual.vertex_colors, dtype=np.uint8)
    if fmt == "glb":
        atomic_write_bytes(path, _glb_bytes(y_up, rgba))
    elif fmt == "obj":
        text = trimesh.exchange.obj.export_obj(
            y_up, include_normals=True, include_color=rgba is not None, include_texture=False,
            write_texture=False, header="threedistill (Y-up, front +Z)",
        )
        atomic_write_text(path, text)
    else:
        data = trimesh.exchange.ply.export_ply(y_up, encoding="binary", vertex_normal=False,
                                                include_attributes=False)
        atomic_write_bytes(path, data)
    return path


__all__ = ["extract_mesh", "save_mesh", "to_y_up", "linear_to_srgb", "MESH_FORMATS", "Z_UP_TO_Y_UP"]
