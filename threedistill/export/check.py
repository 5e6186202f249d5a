"""Fidelity check: how closely an exported mesh file reproduces the representation it came from.

:func:`fidelity_check` reads a written mesh file back from disk (GLB with its baked texture or
``COLOR_0``, OBJ with its MTL/PNG or ``v x y z r g b`` colors, PLY vertex colors), renders it
with the pure-torch rasterizer (:mod:`threedistill.representations.mesh_raster`) from the same
cameras as the representation's evaluation render (``training=False``) and measures the
difference, so "the mesh looks worse than the renders" becomes a number.

What is compared
----------------
* **Frame.** Files are brought back to the world frame (+Z up) with the inverse of the placement
  they record (``export.up_axis``/``origin``/``size``: :func:`~threedistill.meshio.file_to_world`;
  else of :data:`~threedistill.export.mesh.Z_UP_TO_Y_UP`).
* **Color space.** Both images are in the space the representation renders and bakes in: its
  albedo values, written unchanged as 8-bit "sRGB" texture and vertex colors. Texture texels and
  PLY/OBJ colors are used as stored (/255); GLB ``COLOR_0`` is linear by the glTF spec and is
  converted back (:func:`~threedistill.export.mesh.linear_to_srgb`); a ``baseColorFactor`` other
  than white multiplies in linear space, as glTF viewers do.
* **Texture lookup.** UVs are interpolated per pixel (perspective-correct) and the texture is read
  with bilinear ``grid_sample`` (texel centres at ``(i + .5) / size``, v up as trimesh loads it).
* **Shading.** The mesh is shaded the way the representation's evaluation render is, so lighting
  does not count as an error: representations whose ``evaluation_ambient()`` is a number (NeRF, mesh)
  render ``diffuse`` with a headlight at evaluation, so the mesh gets
  ``albedo * (ambient + (1 - ambient) max(0, n . l))`` with ``l`` towards the camera and ``n``
  the interpolated smooth vertex normal (the same :func:`~threedistill.representations.nerf.shade`);
  the others (Gaussians unless `lit`: colors only) are compared unlit (albedo). The NeRF's normals come from
  its density gradient and the mesh's from its triangles, so some shading difference remains.
* **Background.** The representation's evaluation background: white (``white``, ``random``),
  black (``black``), or the NeRF's learned ``mlp`` background along each pixel's ray.
* **Antialiasing.** The mesh render is antialiased at its silhouette (``mesh_raster.antialias``).

Metrics (over all views together; per view in ``per_view``)
-------------------------------------------------------------
``silhouette_iou``: intersection over union of the two masks ``alpha > 0.5``; ``rgb_mae``: mean
absolute RGB difference (channels in [0, 1]) over the pixels of the union of the two silhouettes;
``rgb_mae_both``: the same over the intersection (color/texture error without the silhouette
mismatch); ``psnr``: ``-10 log10(MSE)`` over the union (dB).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from threedistill.cameras import CameraBatch, make_cameras
from threedistill.errors import UserError
from threedistill.export.mesh import _module_device
from threedistill.meshio import apply_transform, file_to_world, linear_to_srgb, read_mesh_parts, srgb_to_linear
from threedistill.representations.base import Representation
from threedistill.representations.common import shade
from threedistill.representations.mesh_raster import antialias, interpolate, rasterize_triangles

# 4 azimuths at a low elevation, 4 more between them from above.
CHECK_ELEVATIONS = (15.0,) * 4 + (50.0,) * 4
CHECK_AZIMUTHS = (0.0, 90.0, 180.0, -90.0, 45.0, 135.0, -135.0, -45.0)


def check_cameras(distance: float = 1.75, fovy: float = 55.0, resolution: int = 128) -> CameraBatch:
    """The 8 fidelity-check views: azimuths 0/90/180/-90 deg at elevation 15 deg and 45/135/-135/-45
    deg at elevation 50 deg, at ``distance`` and ``fovy`` (degrees), light at the camera."""
    n = len(CHECK_AZIMUTHS)
    return make_cameras(torch.tensor(CHECK_ELEVATIONS), torch.tensor(CHECK_AZIMUTHS),
                        torch.full((n,), float(distance)), torch.full((n,), float(fovy)), int(resolution))


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


# ----------------------------------------------------------------------------------------------
# Rendering and comparing
# ----------------------------------------------------------------------------------------------
def eval_shading(rep: Representation) -> Optional[float]:
    """The ambient term of the representation's evaluation shading (diffuse with a headlight), or
    None when it renders unlit colors (:meth:`Representation.evaluation_ambient`)."""
    ambient = rep.evaluation_ambient()
    return None if ambient is None else float(ambient)


@torch.no_grad()
def eval_background(rep: Representation, cameras: CameraBatch) -> torch.Tensor:
    """``[B,3,H,W]`` background of the representation's evaluation render
    (:meth:`Representation.evaluation_background`)."""
    return rep.evaluation_background(cameras)


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
        light = cameras.positions.to(points.dtype)[:, :, None, None].expand_as(points)
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
        albedo = shade(flat(albedo), flat(normal), flat(points), flat(light), "diffuse", ambient)
        albedo = albedo.reshape(B, H, W, 3).permute(0, 3, 1, 2)
    rgb = mask * albedo + (1.0 - mask) * background
    both = antialias(torch.cat([rgb, mask], 1), frags, verts, faces, cameras)
    return {"rgb": both[:, :3].clamp(0.0, 1.0), "alpha": both[:, 3:].clamp(0.0, 1.0)}


def mesh_frame_renderer(mesh_path: Union[str, Path], ambient: Optional[float]):
    """A turntable frame renderer (:func:`threedistill.export.render_turntable`'s ``render``) of
    the mesh file ``mesh_path`` as it was written (texture or vertex colors, its recorded
    placement undone), over white, shaded like the export check (``ambient``: diffuse with a
    headlight, :meth:`Representation.evaluation_ambient`; None: its colors unlit)."""
    mesh = load_exported_mesh(mesh_path)

    def render(camera: CameraBatch) -> torch.Tensor:
        white = torch.ones(len(camera), 3, camera.height, camera.width)
        return render_exported_mesh(mesh, camera, white, ambient)["rgb"]

    return render


def _metrics(a_rgb, a_alpha, b_rgb, b_alpha) -> Dict[str, float]:
    sa, sb = a_alpha[:, 0] > 0.5, b_alpha[:, 0] > 0.5  # [N,H,W]
    union, inter = sa | sb, sa & sb
    diff = (a_rgb - b_rgb).abs().mean(1)  # [N,H,W]
    sq = (a_rgb - b_rgb).square().mean(1)
    n_union, n_inter = int(union.sum()), int(inter.sum())
    mse = float(sq[union].mean()) if n_union else 0.0
    return {
        "silhouette_iou": n_inter / n_union if n_union else 1.0,
        "rgb_mae": float(diff[union].mean()) if n_union else 0.0,
        "rgb_mae_both": float(diff[inter].mean()) if n_inter else 0.0,
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
    }


@torch.no_grad()
def fidelity_check(rep: Representation, mesh_path: Union[str, Path], cameras: Optional[CameraBatch] = None,
                   return_images: bool = False) -> dict:
    """Render the mesh file ``mesh_path`` and ``rep`` (``training=False``) from ``cameras``
    (default :func:`check_cameras`) and compare them (module docstring). Returns a JSON-ready dict:
    ``silhouette_iou``, ``rgb_mae``, ``rgb_mae_both``, ``psnr``, ``views``, ``resolution``,
    ``color`` (texture / vertex / none), ``shading`` and ``per_view`` (elevation, azimuth and the
    four metrics per view). With ``return_images`` it also holds ``images``: ``rep_rgb``,
    ``mesh_rgb`` ``[B,3,H,W]`` tensors (not JSON)."""
    cameras = check_cameras() if cameras is None else cameras
    mesh = load_exported_mesh(mesh_path)
    dev = _module_device(rep)
    was_training = rep.training
    rep.eval()
    try:
        out = rep.render(cameras.to(dev), training=False)
        rep_rgb, rep_alpha = out.rgb.float().cpu(), out.alpha.float().cpu()
        background = eval_background(rep, cameras.to("cpu")).to(rep_rgb.dtype)
    finally:
        rep.train(was_training)
    ambient = eval_shading(rep)
    cams = cameras.to("cpu")
    m = render_exported_mesh(mesh, cams, background, ambient)
    result = _metrics(rep_rgb, rep_alpha, m["rgb"], m["alpha"])
    per_view: List[dict] = []
    for b in range(len(cams)):
        s = slice(b, b + 1)
        per_view.append({"elevation": round(float(cams.elevation[b]), 3), "azimuth": round(float(cams.azimuth[b]), 3),
                         **_metrics(rep_rgb[s], rep_alpha[s], m["rgb"][s], m["alpha"][s])})
    result.update({
        "mesh": str(mesh_path), "views": len(cams), "resolution": [cams.height, cams.width],
        "color": mesh.kind, "shading": "albedo" if ambient is None else f"diffuse headlight (ambient {ambient:g})",
        "per_view": per_view,
    })
    if return_images:
        result["images"] = {"rep_rgb": rep_rgb, "mesh_rgb": m["rgb"]}
    return result


def comparison_grid(rep_rgb: torch.Tensor, mesh_rgb: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``[3, 3H, B W]`` image: the representation's renders on top, the mesh's in the middle and
    ``gain`` times their absolute difference (black = equal) at the bottom."""
    from threedistill.export.video import image_grid

    diff = ((rep_rgb - mesh_rgb).abs() * float(gain)).clamp(0.0, 1.0)
    B = rep_rgb.shape[0]
    return image_grid(torch.cat([rep_rgb, mesh_rgb, diff]), nrow=B)


def format_check(result: dict) -> str:
    """One line summing up a :func:`fidelity_check` result."""
    return (f"check: {Path(result['mesh']).name} vs the representation ({result['views']} views, "
            f"{result['resolution'][0]} px, {result['shading']}): silhouette IoU {result['silhouette_iou']:.3f}, "
            f"RGB error {result['rgb_mae']:.4f} ({result['rgb_mae_both']:.4f} where both cover), "
            f"PSNR {result['psnr']:.1f} dB")


__all__ = ["fidelity_check", "mesh_frame_renderer", "check_cameras", "load_exported_mesh", "render_exported_mesh", "comparison_grid",
           "format_check", "eval_background", "eval_shading", "ExportedMesh"]
