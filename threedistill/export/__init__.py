"""Export: marching-cubes meshes (GLB / OBJ / PLY), turntable videos and preview images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Union

from threedistill.errors import UserError
from threedistill.export.mesh import MESH_FORMATS, extract_mesh, save_mesh, to_y_up
from threedistill.export.video import image_grid, render_turntable, save_image
from threedistill.representations.base import Representation


def export_run_meshes(rep: Representation, out_dir: Union[str, Path], formats: Iterable[str],
                      export_cfg) -> List[Path]:
    """Extract the surface once (``export_cfg.mesh_resolution``, ``min_component_ratio``) and
    write ``out_dir/model.<fmt>`` for each of ``formats`` (glb, obj, ply; duplicates ignored).
    Returns the written paths; nothing is extracted when ``formats`` is empty."""
    fmts: List[str] = []
    for fmt in formats:
        fmt = str(fmt).lower().lstrip(".")
        if fmt not in MESH_FORMATS:
            raise UserError(f"config key 'export.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")
        if fmt not in fmts:
            fmts.append(fmt)
    if not fmts:
        return []
    mesh = extract_mesh(rep, resolution=int(export_cfg.mesh_resolution),
                        min_component_ratio=float(export_cfg.min_component_ratio))
    out_dir = Path(out_dir)
    return [save_mesh(mesh, out_dir / f"model.{fmt}", fmt) for fmt in fmts]


__all__ = [
    "extract_mesh",
    "save_mesh",
    "to_y_up",
    "render_turntable",
    "save_image",
    "image_grid",
    "export_run_meshes",
    "MESH_FORMATS",
]
