"""Reading mesh and point-cloud files: the one reader every module uses.

Two kinds of file:

* **Exchange files** (``.glb``/``.gltf``/``.obj``/``.ply`` and anything else trimesh reads), Y-up
  as :func:`threedistill.export.save_mesh` writes them (:data:`Z_UP_TO_Y_UP`). A scene is
  flattened with its node transforms. Vertex colors are sRGB in [0,1]: PLY/OBJ colors as
  stored (/255), glTF ``COLOR_0`` (linear by the spec) converted back with
  :func:`linear_to_srgb`. A file may also be a point cloud (no faces).
* **Mesh arrays** (``.npz``, :func:`write_mesh_arrays`): ``vertices [V,3]`` float64 in the world
  frame (+Z up), ``faces [F,3]`` int64 and optionally ``colors [V,3]`` (sRGB in [0,1]), stored
  losslessly. The pipeline resolves inputs that come from elsewhere (another run's surface, a
  shapes-world object) into such files (:mod:`threedistill.inputs`), so that a representation
  built from the file starts from exactly the in-memory data.

:func:`read_mesh` returns a :class:`MeshData`; :func:`read_mesh_parts` gives the per-geometry
trimesh objects for a caller that also needs their materials (the export fidelity check samples
textures).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from threedistill.atomic import atomic_write_bytes
from threedistill.errors import UserError

# World (Z-up, front +X) -> file (Y-up, front +Z): (x, y, z) -> (y, z, x). A proper rotation
# (a cyclic permutation of the axes, det = +1): world +X (front) -> +Z, world +Y (the
# object's left) -> +X, world +Z (up) -> +Y.
Z_UP_TO_Y_UP = np.array(
    [[0.0, 1.0, 0.0, 0.0],
     [0.0, 0.0, 1.0, 0.0],
     [1.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, 0.0, 1.0]]
)

#: The suffix of lossless mesh-array files (:func:`write_mesh_arrays`).
MESH_ARRAYS_SUFFIX = ".npz"


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function's inverse: sRGB in [0,1] -> linear."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Inverse of the sRGB transfer function (for reading COLOR_0 of our GLB files back)."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


@dataclass
class MeshData:
    """What :func:`read_mesh` read: ``vertices [V,3]`` float64, ``faces [F,3]`` int64 (``F = 0``
    for a point cloud), ``colors [V,3]`` float32 sRGB in [0,1] or None. ``y_up``: the coordinates
    are the file's own, Y-up for an exchange file; False for mesh arrays, which are in the world
    frame and exact (no seams to weld)."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray]
    y_up: bool


def vertex_colors(geom, linear: bool) -> Optional[np.ndarray]:
    """Vertex colors ``[V,3]`` float32 sRGB in [0,1] of a trimesh mesh or point cloud, or None.
    ``linear``: the stored colors are linear (glTF ``COLOR_0``) and are converted to sRGB."""
    raw = None
    visual = getattr(geom, "visual", None)  # a trimesh object, not a representation
    if visual is not None and visual.kind == "vertex":
        raw = np.asarray(visual.vertex_colors)
    elif visual is not None:  # our GLBs: COLOR_0 read into the (UV-less texture) visual's vertex attributes
        for attrs in (getattr(visual, "vertex_attributes", None) or {}, getattr(geom, "vertex_attributes", {})):
            if "color" in attrs:
                raw = np.asarray(attrs["color"])
                break
    if raw is None or len(raw) != len(geom.vertices):
        return None
    rgb = raw[:, :3].astype(np.float32)
    rgb = rgb / 255.0 if raw.dtype == np.uint8 or rgb.max() > 1.0 else rgb
    if linear:
        rgb = np.asarray(linear_to_srgb(rgb), dtype=np.float32)
    return np.clip(rgb, 0.0, 1.0)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_file(path: Union[str, Path], key: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: file '{path}' not found (give an existing .glb, .obj, .ply or .npz)")
    return path


def read_mesh_parts(path: Union[str, Path], key: str) -> List[Tuple[object, np.ndarray]]:
    """The geometries of an exchange file as ``(trimesh object, vertices [V,3] float64)`` pairs,
    the vertices with the scene's node transform applied (file frame, Y-up); a point cloud is one
    part. Read with ``process=False`` (vertices and faces exactly as stored). ``key`` starts the
    one-line :class:`UserError` on a missing or unreadable file."""
    import trimesh

    path = _check_file(path, key)
    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as e:  # trimesh raises many kinds of errors on bad files
        raise UserError(f"{key}: cannot read '{path}' as a mesh or point cloud ({_first_line(e)})") from None
    parts: List[Tuple[object, np.ndarray]] = []
    if isinstance(loaded, trimesh.Scene):
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            g = loaded.geometry[name]
            if isinstance(g, (trimesh.Trimesh, trimesh.PointCloud)) and len(g.vertices):
                v = trimesh.transform_points(np.asarray(g.vertices, dtype=np.float64), np.asarray(transform))
                parts.append((g, np.asarray(v, dtype=np.float64)))
    elif isinstance(loaded, (trimesh.Trimesh, trimesh.PointCloud)) and len(loaded.vertices):
        parts.append((loaded, np.asarray(loaded.vertices, dtype=np.float64)))
    if not parts:
        raise UserError(f"{key}: '{path}' holds no triangles or points")
    return parts


def read_mesh(path: Union[str, Path], key: str) -> MeshData:
    """Read an exchange file or mesh arrays (module docstring). Several geometries are merged
    (colors kept when every part has them); a file whose parts mix triangles and points keeps
    its triangles."""
    path = _check_file(path, key)
    if path.suffix.lower() == MESH_ARRAYS_SUFFIX:
        return _read_arrays(path, key)
    linear = path.suffix.lower() in (".glb", ".gltf")
    parts = read_mesh_parts(path, key)
    meshes = [(g, v) for g, v in parts if len(getattr(g, "faces", ())) > 0]
    if meshes:
        parts = meshes
    verts, faces, colors, offset = [], [], [], 0
    for g, v in parts:
        verts.append(v)
        f = np.asarray(getattr(g, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
        faces.append(f + offset)
        colors.append(vertex_colors(g, linear))
        offset += len(v)
    cols = np.concatenate(colors) if all(c is not None for c in colors) else None
    data = MeshData(np.concatenate(verts), np.concatenate(faces), cols, y_up=True)
    if not np.isfinite(data.vertices).all():
        raise UserError(f"{key}: '{path}' has non-finite coordinates")
    return data


def _read_arrays(path: Path, key: str) -> MeshData:
    try:
        with np.load(str(path), allow_pickle=False) as z:
            verts = np.asarray(z["vertices"], dtype=np.float64)
            faces = np.asarray(z["faces"], dtype=np.int64) if "faces" in z else np.zeros((0, 3), np.int64)
            cols = np.asarray(z["colors"]) if "colors" in z else None
    except Exception as e:
        raise UserError(f"{key}: cannot read '{path}' as mesh arrays ({_first_line(e)})") from None
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0 or faces.reshape(-1, 3).shape[1] != 3:
        raise UserError(f"{key}: '{path}' holds no triangles or points")
    if not np.isfinite(verts).all():
        raise UserError(f"{key}: '{path}' has non-finite coordinates")
    return MeshData(verts, faces.reshape(-1, 3), cols, y_up=False)


def write_mesh_arrays(path: Union[str, Path], vertices: np.ndarray, faces: np.ndarray,
                      colors: Optional[np.ndarray] = None) -> Path:
    """Write mesh arrays (module docstring) atomically, exactly as given (no dtype change)."""
    arrays = {"vertices": np.asarray(vertices), "faces": np.asarray(faces)}
    if colors is not None:
        arrays["colors"] = np.asarray(colors)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


__all__ = ["MeshData", "read_mesh", "read_mesh_parts", "vertex_colors", "write_mesh_arrays", "linear_to_srgb",
           "srgb_to_linear", "Z_UP_TO_Y_UP", "MESH_ARRAYS_SUFFIX"]
