"""Export: marching-cubes meshes (GLB / OBJ / PLY, baked textures), turntable videos and preview images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Union

from threedistill.errors import UserError
from threedistill.export.mesh import MESH_FORMATS, bake_texture, extract_mesh, save_mesh, texture_paths, to_y_up
from threedistill.export.video import image_grid, render_turntable, save_image
from threedistill.representations.base import Representation


def export_run_meshes(rep: Representation, out_dir: Union[str, Path], formats: Iterable[str],
                      export_cfg, threshold: Optional[float] = None) -> List[Path]:
    """Extract the surface once (``export_cfg.mesh_resolution``, ``min_component_ratio``) and
    write ``out_dir/model.<fmt>`` for each of ``formats`` (glb, obj, ply; duplicates ignored).

    With ``export_cfg.texture`` (default true) the surface is UV-unwrapped once and ``rep.albedo``
    is baked into a ``export_cfg.texture_size`` texture (:func:`bake_texture`) for GLB and OBJ
    (OBJ also writes ``model.mtl`` and ``model.png``); PLY always has vertex colours. Returns the
    written mesh paths; nothing is extracted when ``formats`` is empty."""
    fmts: List[str] = []
    for fmt in formats:
        fmt = str(fmt).lower().lstrip(".")
        if fmt not in MESH_FORMATS:
            raise UserError(f"config key 'export.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")
        if fmt not in fmts:
            fmts.append(fmt)
    if not fmts:
        return []
    explicit = hasattr(rep, "export_mesh")  # the mesh representation: its own triangles, vertex colours
    mesh = rep.export_mesh() if explicit else extract_mesh(
        rep, resolution=int(export_cfg.mesh_resolution), threshold=threshold,
        min_component_ratio=float(export_cfg.min_component_ratio))
    textured = None
    if bool(getattr(export_cfg, "texture", True)) and any(f != "ply" for f in fmts) and not explicit:
        textured = bake_texture(rep, mesh, texture_size=int(getattr(export_cfg, "texture_size", 1024)))
    out_dir = Path(out_dir)
    return [save_mesh(mesh if fmt == "ply" or textured is None else textured, out_dir / f"model.{fmt}", fmt)
            for fmt in fmts]


__all__ = [
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
