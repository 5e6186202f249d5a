"""Export: marching-cubes meshes (GLB / OBJ / PLY, baked textures), turntable videos and preview images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

from threedistill.errors import UserError
from threedistill.export.mesh import (MESH_FORMATS, bake_texture, export_placement, extract_mesh, matching_cameras,
                                     placement, save_mesh, texture_paths, to_y_up)
from threedistill.export.video import image_grid, render_turntable, save_image
from threedistill.representations.base import Representation
from threedistill.runs import RunFolder


#: Told the name of each export stage as it starts (a progress bar, log lines).
Stage = Callable[[str], None]


def _no_stage(name: str) -> None:
    return None


def export_run_meshes(rep: Representation, out_dir: Union[str, Path], formats: Iterable[str],
                      export_cfg, threshold: Optional[float] = None, stage: Stage = _no_stage,
                      camera_cfg=None) -> List[Path]:
    """Extract the surface once (``export_cfg.mesh_resolution``, ``min_component_ratio``,
    ``surface`` with the views of ``camera_cfg``: :func:`build_export_mesh`) and write
    ``out_dir/model.<fmt>`` for each of ``formats`` (glb, obj, ply; duplicates ignored).

    With ``export_cfg.texture`` (default true) the surface is UV-unwrapped once and ``rep.albedo``
    is baked into a ``export_cfg.texture_size`` texture (:func:`bake_texture`) for GLB and OBJ
    (OBJ also writes ``model.mtl`` and ``model.png``); PLY always has vertex colors. Each file
    is placed by ``export_cfg``'s ``up_axis``, ``origin`` and ``size``
    (:func:`~threedistill.export.mesh.export_placement`). ``stage`` is told each stage's name as
    it starts (surface, UV unwrap and texture bake, write <fmt>). Returns the written mesh
    paths; nothing is extracted when ``formats`` is empty."""
    fmts: List[str] = []
    for fmt in formats:
        fmt = str(fmt).lower().lstrip(".")
        if fmt not in MESH_FORMATS:
            raise UserError(f"config key 'export.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")
        if fmt not in fmts:
            fmts.append(fmt)
    if not fmts:
        return []
    mesh, textured = build_export_mesh(rep, export_cfg, fmts, threshold=threshold, stage=stage, camera_cfg=camera_cfg)
    folder = RunFolder(out_dir)
    written = []
    for fmt in fmts:
        stage(f"write {fmt}")
        written.append(save_mesh(mesh if fmt == "ply" or textured is None else textured, folder.mesh_path(fmt), fmt,
                                 export_placement(mesh, fmt, export_cfg)))
    return written


def build_export_mesh(rep: Representation, export_cfg, formats: Iterable[str], resolution: Optional[int] = None,
                      threshold: Optional[float] = None, texture: Optional[bool] = None,
                      texture_size: Optional[int] = None, stage: Stage = _no_stage, camera_cfg=None):
    """The meshes the ``formats`` are written from: ``(mesh, textured)``.

    ``mesh`` (world frame, vertex colors) is the representation's own triangles when it has
    an :meth:`~threedistill.representations.Representation.explicit_surface` (the mesh
    representation), else its density's isosurface
    (:func:`extract_mesh` at ``resolution``, defaults from ``export_cfg``; at ``threshold`` when one
    is given, else, with ``export_cfg.surface`` "silhouette" and a ``camera_cfg``, the level whose
    silhouette from :func:`matching_cameras` (at ``camera_cfg``'s evaluation distance and field of
    view) matches the render, else the representation's ``isosurface_threshold``). ``textured`` is
    that mesh UV-unwrapped with a baked base-color texture
    (:func:`bake_texture`: from ``rep.albedo``, or from the mesh's own vertex colors for an
    explicit mesh) when ``texture`` (default ``export_cfg.texture``) and a format other than PLY is
    asked for; else None. PLY is always written from ``mesh``."""
    mesh = rep.explicit_surface()
    explicit = mesh is not None
    if not explicit:
        stage("marching cubes")
    match = None
    if not explicit and threshold is None and camera_cfg is not None \
            and str(getattr(export_cfg, "surface", "isosurface")) == "silhouette":
        match = matching_cameras(camera_cfg)
    mesh = mesh if explicit else extract_mesh(
        rep, resolution=int(resolution or export_cfg.mesh_resolution), threshold=threshold,
        min_component_ratio=float(export_cfg.min_component_ratio), match_cameras=match)
    texture = bool(getattr(export_cfg, "texture", True)) if texture is None else bool(texture)
    size = int(texture_size or getattr(export_cfg, "texture_size", 1024))
    textured = None
    if texture and any(str(f).lower() != "ply" for f in formats):
        stage(f"UV unwrap and {size}px texture bake")
        textured = bake_texture(None if explicit else rep, mesh, texture_size=size)
    return mesh, textured


__all__ = [
    "Stage",
    "placement",
    "export_placement",
    "build_export_mesh",
    "extract_mesh",
    "bake_texture",
    "save_mesh",
    "texture_paths",
    "to_y_up",
    "render_turntable",
    "save_image",
    "image_grid",
    "export_run_meshes",
    "MESH_FORMATS",
]
