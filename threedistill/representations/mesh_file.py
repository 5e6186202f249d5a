"""Mesh files read back and rendered: a written GLB/OBJ/PLY (as :func:`threedistill.export.save_mesh`
writes them) in the world frame with its colors (:func:`load_exported_mesh`), and its render from
any cameras (:func:`render_exported_mesh`) with the pure-torch rasterizer.

The export's fidelity check (:mod:`threedistill.export.check`) and the shapes world's evaluation of
an exported file (:func:`threedistill.shapes.evaluate.evaluate_mesh_file`) both use them, which is
why they live here, below both. Color space, frame and shading: :mod:`threedistill.export.check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from threedistill.cameras import CameraBatch
from threedistill.errors import UserError
from threedistill.meshio import apply_transform, file_to_world, linear_to_srgb, read_mesh_parts, srgb_to_linear
from threedistill.representations.common import shade_image
from threedistill.representations.mesh_raster import antialias, interpolate, rasterize_triangles


# ----------------------------------------------------------------------------------------------
# Reading the file back
# ----------------------------------------------------------------------------------------------
class ExportedMesh:
    """A mesh file read back into the world frame: ``vertices [V,3]`` (float64, +Z up), ``faces
    [F,3]`` and either ``uv [V,2]`` with ``texture [H,W,3]`` (floats in [0,1], rows top to bottom)
    or ``colors [V,3]`` (in [0,1], the representation's color space), or neither."""

    def __init__(self, vertices, faces, uv=None, texture=None, colors=None, kind: str = "none"):
        self.vertices, self.faces, self.uv, self.texture, self.colors = vertices, faces, uv, texture, colors
        self.kind = kind  # "texture", "vertex" or "none"
        self._tensors: Optional[Dict[str, torch.Tensor]] = None

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The per-mesh inputs of :func:`render_exported_mesh` as CPU tensors, computed once and
        kept (a turntable renders the same mesh for every frame): ``verts``, ``faces``,
        ``normals`` (smooth across seams), and ``uv`` / ``texture [1,3,H,W]`` or ``colors``."""
        if self._tensors is None:
            verts = torch.as_tensor(self.vertices, dtype=torch.float32)
            faces = torch.as_tensor(self.faces, dtype=torch.int64)
            t = {"verts": verts, "faces": faces, "normals": _smooth_normals(verts, faces)}
            if self.kind == "texture":
                t["uv"] = torch.as_tensor(self.uv, dtype=torch.float32)
                t["texture"] = torch.as_tensor(self.texture, dtype=torch.float32).permute(2, 0, 1)[None]
            elif self.kind == "vertex":
                t["colors"] = torch.as_tensor(self.colors, dtype=torch.float32)
            self._tensors = t
        return self._tensors


def _factor_rgb(material) -> Optional[np.ndarray]:
    f = getattr(material, "baseColorFactor", None)
    if f is None:
        return None
    f = np.asarray(f, dtype=np.float64)[:3]
    f = f / 255.0 if f.max() > 1.0 else f
    return None if np.allclose(f, 1.0) else f


def _geometry_colors(g, from_gltf: bool):
    """(uv, texture, colors) of one trimesh geometry (see :class:`ExportedMesh`)."""
    visual = g.visual
    if visual.kind == "texture":
        mat = getattr(visual, "material", None)
        img = getattr(mat, "baseColorTexture", None)
        if img is None:
            img = getattr(mat, "image", None)
        uv = getattr(visual, "uv", None)
        if img is not None and uv is not None and len(uv) == len(g.vertices):
            tex = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            factor = _factor_rgb(mat)
            if factor is not None:
                tex = linear_to_srgb(srgb_to_linear(tex) * factor).astype(np.float32)
            return np.asarray(uv, dtype=np.float64), tex, None
        attrs = getattr(visual, "vertex_attributes", None) or {}
        raw = attrs.get("color", g.vertex_attributes.get("color"))
        if raw is not None and len(raw) == len(g.vertices):
            raw = np.asarray(raw)
            rgb = raw[:, :3].astype(np.float64)
            rgb = rgb / 255.0 if raw.dtype == np.uint8 or rgb.max() > 1.0 else rgb
            if from_gltf:  # COLOR_0 is linear
                lin = rgb
                factor = _factor_rgb(mat)
                if factor is not None:
                    lin = lin * factor
                rgb = linear_to_srgb(lin)
            return None, None, np.clip(rgb, 0.0, 1.0)
        return None, None, None
    if visual.kind == "vertex":
        raw = np.asarray(visual.vertex_colors)
        rgb = raw[:, :3].astype(np.float64) / 255.0
        return None, None, rgb
    return None, None, None


def load_exported_mesh(path: Union[str, Path]) -> ExportedMesh:
    """Read a GLB/OBJ/PLY mesh file (as :func:`~threedistill.export.save_mesh` writes them) back
    into the world frame with its colors (module docstring). Several geometries are merged; if
    they disagree on the kind of color, the colors are dropped."""
    path = Path(path)
    from_gltf = path.suffix.lower() in (".glb", ".gltf")
    parts = [(v, np.asarray(g.faces, dtype=np.int64), *_geometry_colors(g, from_gltf))
             for g, v in read_mesh_parts(path, "fidelity check") if len(getattr(g, "faces", ()))]
    if not parts:
        raise UserError(f"fidelity check: '{path}' holds no triangles")
    to_world = file_to_world(path)
    verts, faces, offset = [], [], 0
    for v, f, *_ in parts:
        verts.append(apply_transform(v, to_world))
        faces.append(f + offset)
        offset += len(v)
    out = ExportedMesh(np.concatenate(verts), np.concatenate(faces))
    if len(parts) == 1 and parts[0][3] is not None:
        out.uv, out.texture, out.kind = parts[0][2], parts[0][3], "texture"
    elif all(p[4] is not None for p in parts):
        out.colors, out.kind = np.concatenate([p[4] for p in parts]), "vertex"
    return out


def _smooth_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit area-weighted vertex normals, shared across coincident vertices (UV-seam copies)."""
    from threedistill.representations.mesh import vertex_normals

    uniq, inverse = torch.unique(verts, dim=0, return_inverse=True)
    return vertex_normals(uniq, inverse[faces])[inverse]


@torch.no_grad()
def render_exported_mesh(mesh: ExportedMesh, cameras: CameraBatch, background: torch.Tensor,
                         ambient: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """``rgb [B,3,H,W]`` (over ``background [B,3,H,W]``) and ``alpha [B,1,H,W]`` of a mesh read
    with :func:`load_exported_mesh`, shaded as the representation's evaluation render (``ambient``:
    diffuse with a headlight; None: unlit). Colorless meshes render white."""
    t = mesh.tensors()
    verts, faces = t["verts"], t["faces"]
    frags = rasterize_triangles(verts, faces, cameras)
    mask = frags.mask  # [B,1,H,W]
    B, H, W = len(cameras), cameras.height, cameras.width
    if mesh.kind == "texture":
        uv = interpolate(t["uv"], frags)  # [B,2,H,W]
        grid = torch.stack([uv[:, 0] * 2.0 - 1.0, 1.0 - uv[:, 1] * 2.0], dim=-1)  # x right, y down
        tex = t["texture"].expand(B, -1, -1, -1)
        albedo = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif mesh.kind == "vertex":
        albedo = interpolate(t["colors"], frags)
    else:
        albedo = torch.ones(B, 3, H, W)
    if ambient is not None:
        normal = F.normalize(interpolate(t["normals"], frags), dim=1, eps=1e-12)
        points = interpolate(verts, frags)
        albedo = shade_image(albedo, normal, points, cameras.positions, "diffuse", ambient)
    rgb = mask * albedo + (1.0 - mask) * background
    both = antialias(torch.cat([rgb, mask], 1), frags, verts, faces, cameras)
    return {"rgb": both[:, :3].clamp(0.0, 1.0), "alpha": both[:, 3:].clamp(0.0, 1.0)}


__all__ = ["ExportedMesh", "load_exported_mesh", "render_exported_mesh"]
