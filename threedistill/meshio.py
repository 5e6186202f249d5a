"""Reading mesh and point-cloud files: the one reader every module uses.

Two kinds of file:

* **Exchange files** (``.glb``/``.gltf``/``.obj``/``.ply`` and anything else trimesh reads), Y-up
  as :func:`threedistill.export.save_mesh` writes them by default (:data:`Z_UP_TO_Y_UP`); a file
  written with another placement (``export.up_axis``/``origin``/``size``) records it
  (:func:`world_to_file`), and :func:`file_to_world` brings it back. A scene is
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
from dataclasses import dataclass, replace
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

#: The name under which a written file records its placement (the 4x4 world -> file matrix,
#: row-major): a GLB's ``asset.extras``, a comment line of an OBJ or a PLY header.
PLACEMENT_TAG = "threedistill_world_to_file"


def placement_comment(world_to_file: np.ndarray) -> str:
    """The text after the comment marker (``#`` in OBJ, ``comment`` in PLY) that records a file's
    placement: :data:`PLACEMENT_TAG` and the 16 numbers."""
    return PLACEMENT_TAG + " " + " ".join(repr(float(x)) for x in np.asarray(world_to_file, dtype=np.float64).ravel())


def _parse_numbers(text: str) -> Optional[np.ndarray]:
    try:
        vals = [float(x) for x in text.split()[:16]]
    except ValueError:
        return None
    if len(vals) != 16 or not np.all(np.isfinite(vals)):
        return None
    m = np.array(vals).reshape(4, 4)
    return m if abs(np.linalg.det(m[:3, :3])) > 1e-12 else None


def world_to_file(path: Union[str, Path]) -> np.ndarray:
    """The placement a mesh file was written with (world -> file coordinates, 4x4): what the
    file records under :data:`PLACEMENT_TAG` (``export.up_axis``, ``origin``, ``size``), else
    :data:`Z_UP_TO_Y_UP` (any other Y-up file, and ours written before placements were recorded)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return Z_UP_TO_Y_UP.copy()
    found: Optional[np.ndarray] = None
    if suffix == ".glb" and head[:4] == b"glTF" and len(head) >= 20:
        import json
        import struct

        length, kind = struct.unpack("<II", head[12:20])
        if kind == 0x4E4F534A:  # "JSON"
            try:
                with open(path, "rb") as f:
                    f.seek(20)
                    tree = json.loads(f.read(length))
                values = tree.get("asset", {}).get("extras", {}).get(PLACEMENT_TAG)
                found = _parse_numbers(" ".join(str(v) for v in values)) if isinstance(values, list) else None
            except (ValueError, OSError, AttributeError):
                found = None
    elif suffix in (".obj", ".ply"):
        text = head.split(b"end_header")[0] if suffix == ".ply" else head
        for line in text.decode("latin-1").splitlines()[:64]:
            words = line.strip().lstrip("#").split(None, 1)
            if words and words[0] == "comment" and len(words) > 1:
                words = words[1].split(None, 1)
            if len(words) == 2 and words[0] == PLACEMENT_TAG:
                found = _parse_numbers(words[1])
                break
    return Z_UP_TO_Y_UP.copy() if found is None else found


def file_to_world(path: Union[str, Path]) -> np.ndarray:
    """The inverse of :func:`world_to_file`: file coordinates back to the world frame (4x4)."""
    return np.linalg.inv(world_to_file(path))


def apply_transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points [N,3]`` through the affine 4x4 ``matrix``."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]


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


def read_world_mesh(path: Union[str, Path], key: str) -> MeshData:
    """:func:`read_mesh`, an exchange file's coordinates brought into the world frame
    (:func:`file_to_world`: the placement our exports record, else glTF's Y-up); ``y_up`` False."""
    data = read_mesh(path, key)
    if data.y_up:
        data = replace(data, vertices=apply_transform(data.vertices, file_to_world(Path(path).expanduser())), y_up=False)
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


__all__ = ["PLACEMENT_TAG", "placement_comment", "world_to_file", "file_to_world", "apply_transform",
           "MeshData", "read_mesh", "read_world_mesh", "read_mesh_parts", "vertex_colors", "write_mesh_arrays", "linear_to_srgb",
           "srgb_to_linear", "Z_UP_TO_Y_UP", "MESH_ARRAYS_SUFFIX"]
