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

import torch

from threedistill.cameras import CameraBatch, make_cameras
from threedistill.export.mesh import _module_device
from threedistill.representations.base import Representation
# Reading a written file back and rendering it (shared with the shapes world's evaluation).
from threedistill.representations.mesh_file import ExportedMesh, load_exported_mesh, render_exported_mesh

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
