"""Export: marching cubes, mesh files (GLB/OBJ/PLY, Y-up), turntable video, images, atomic writes.

An analytic sphere stands in for a trained representation: its surface, volume, centre and
colors are known exactly, and its centre has distinct x, y, z so an axis mix-up shows.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

from threedistill.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text
from threedistill.cameras import CameraBatch
from threedistill.errors import UserError
from threedistill.export import (bake_texture, export_run_meshes, extract_mesh, image_grid, render_turntable, save_image,
                                 save_mesh, to_y_up)
from threedistill.export.mesh import linear_to_srgb
from threedistill.representations.base import Representation, RenderOutput

CENTRE = (0.2, -0.1, 0.15)
RADIUS = 0.4
RES = 64


class Spheres(Representation):
    """Density ``50 * sigmoid((r - |p - c|) * 40)`` (max over spheres): the surface at density
    25 is exactly the sphere. Albedo: reddish where x > cx, bluish elsewhere, green = (z+1)/2."""

    def __init__(self, spheres=((CENTRE, RADIUS),), threshold: float = 25.0, bounds: float = 1.0):
        super().__init__()
        self.centres = torch.tensor([c for c, _ in spheres], dtype=torch.float32)
        self.radii = torch.tensor([r for _, r in spheres], dtype=torch.float32)
        self._threshold = threshold
        self._bounds = bounds

    @property
    def isosurface_threshold(self) -> float:
        return self._threshold

    @property
    def bounds(self) -> float:
        return self._bounds

    def density(self, points: torch.Tensor) -> torch.Tensor:
        dist = (points[:, None, :] - self.centres[None]).norm(dim=-1)  # [N,S]
        return (50.0 * torch.sigmoid((self.radii[None] - dist) * 40.0)).amax(dim=1)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        right = (points[:, 0] > CENTRE[0]).float()
        green = ((points[:, 2] + 1.0) / 2.0).clamp(0, 1)
        return torch.stack([0.1 + 0.8 * right, green, 0.9 - 0.8 * right], dim=-1)

    def render(self, cameras: CameraBatch, step: int = 0, generator=None, training: bool = True) -> RenderOutput:
        """Ray / first-sphere intersection: albedo where hit, white elsewhere (no volume rendering)."""
        o, d = cameras.rays()  # [B,H,W,3]
        oc = o - self.centres[0]
        b = (oc * d).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - self.radii[0] ** 2)
        t = -b - disc.clamp_min(0).sqrt()
        hit = (disc > 0) & (t > 0)
        p = o + t[..., None] * d
        col = self.albedo(p.reshape(-1, 3)).reshape(p.shape)
        alpha = hit.float()[..., None]
        rgb = alpha * col + (1 - alpha)
        depth = torch.where(hit, t / 4.0, torch.ones_like(t)).clamp(0, 1)
        return RenderOutput(rgb=rgb.permute(0, 3, 1, 2), alpha=alpha.permute(0, 3, 1, 2), depth=depth[:, None])

    def regularizers(self, out, step):
        return {}

    def param_groups(self, optim_cfg):
        return []


def world_from_y_up(v: np.ndarray) -> np.ndarray:
    """Inverse of the documented file rotation (x, y, z) -> (y, z, x)."""
    return np.stack([v[:, 2], v[:, 0], v[:, 1]], axis=-1)


def expected_rgb_uint8(world_points: np.ndarray) -> np.ndarray:
    alb = Spheres().albedo(torch.as_tensor(world_points, dtype=torch.float32)).numpy()
    return np.rint(alb * 255).astype(int)


@pytest.fixture(scope="module")
def sphere_mesh() -> trimesh.Trimesh:
    return extract_mesh(Spheres(), resolution=RES)


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def test_extracted_sphere_geometry(sphere_mesh):
    m = sphere_mesh
    assert m.is_watertight and m.is_winding_consistent
    exact = 4.0 / 3.0 * math.pi * RADIUS**3
    assert m.volume == pytest.approx(exact, rel=0.03)  # positive volume: outward winding
    np.testing.assert_allclose(m.center_mass, CENTRE, atol=5e-3)  # catches axis permutations
    np.testing.assert_allclose(m.bounds[0], np.array(CENTRE) - RADIUS, atol=0.02)  # catches scaling
    np.testing.assert_allclose(m.bounds[1], np.array(CENTRE) + RADIUS, atol=0.02)
    radial = np.linalg.norm(m.vertices - np.array(CENTRE), axis=1)
    assert np.abs(radial - RADIUS).max() < 0.01
    outward = np.einsum("ij,ij->i", m.face_normals, m.triangles_center - np.array(CENTRE))
    assert (outward > 0).mean() > 0.99


def test_extracted_vertex_colors_follow_albedo(sphere_mesh):
    colors = np.asarray(sphere_mesh.visual.vertex_colors)
    assert colors.dtype == np.uint8 and colors.shape == (len(sphere_mesh.vertices), 4)
    assert (colors[:, 3] == 255).all()
    np.testing.assert_allclose(colors[:, :3].astype(int), expected_rgb_uint8(sphere_mesh.vertices), atol=1)
    right = sphere_mesh.vertices[:, 0] > CENTRE[0]
    assert right.any() and (~right).any()
    assert (colors[right, 0] > colors[right, 2]).all() and (colors[~right, 2] > colors[~right, 0]).all()


def test_small_floaters_are_removed():
    floater = ((-0.7, 0.7, -0.7), 0.07)
    rep = Spheres(spheres=((CENTRE, RADIUS), floater))
    everything = extract_mesh(rep, resolution=RES, min_component_ratio=0.0)
    assert len(everything.split(only_watertight=False)) == 2
    cleaned = extract_mesh(rep, resolution=RES, min_component_ratio=0.05)
    assert len(cleaned.split(only_watertight=False)) == 1
    assert cleaned.is_watertight
    np.testing.assert_allclose(cleaned.center_mass, CENTRE, atol=5e-3)
    assert len(cleaned.visual.vertex_colors) == len(cleaned.vertices)


def test_surface_touching_the_bounds_is_closed():
    # A sphere poking out of the [-0.5, 0.5]^3 bounds: capped on the cube, still watertight.
    rep = Spheres(spheres=(((0.3, 0.0, 0.0), 0.4),), bounds=0.5)
    m = extract_mesh(rep, resolution=32)
    assert m.is_watertight and m.volume > 0
    assert m.vertices.max() <= 0.5 + 1e-9 and m.vertices[:, 0].max() == pytest.approx(0.5)


def test_no_surface_is_a_one_line_user_error():
    rep = Spheres(threshold=100.0)
    rep.config_key = "representation.spheres"  # the error names the representation's own key
    with pytest.raises(UserError) as err:
        extract_mesh(rep, resolution=16)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("no surface found: density never exceeds isosurface threshold 100")
    assert "max density 50" in msg and "representation.spheres.isosurface_threshold" in msg


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def test_y_up_rotation_puts_front_at_plus_z_and_up_at_plus_y():
    m = trimesh.Trimesh(vertices=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], faces=[[0, 1, 2]], process=False)
    y = to_y_up(m)
    np.testing.assert_allclose(y.vertices, [[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]], atol=1e-12)
    np.testing.assert_allclose(m.vertices[0], [1, 0, 0])  # the input is not modified


def _reload_colors(path: Path, fmt: str, loaded: trimesh.Trimesh) -> np.ndarray:
    """sRGB uint8 vertex colors as written (GLB stores them linear, in the geometry's
    ``vertex_attributes`` because of its material; ``force="mesh"`` drops them)."""
    if fmt != "glb":
        return np.asarray(loaded.visual.vertex_colors)[:, :3].astype(int)
    scene = trimesh.load(path)
    (geom,) = scene.geometry.values()
    lin = np.asarray(geom.visual.vertex_attributes["color"])[:, :3] / 255.0
    assert len(lin) == len(loaded.vertices)
    return np.rint(linear_to_srgb(lin) * 255).astype(int)


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_save_and_reload(tmp_path, sphere_mesh, fmt):
    path = save_mesh(sphere_mesh, tmp_path / f"model.{fmt}")
    assert path == tmp_path / f"model.{fmt}" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model.{fmt}"]  # no temp files left
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.vertices) == len(sphere_mesh.vertices)
    assert len(loaded.faces) == len(sphere_mesh.faces)
    assert loaded.is_watertight and loaded.volume > 0  # a proper rotation keeps the winding
    cx, cy, cz = CENTRE
    np.testing.assert_allclose(loaded.center_mass, (cy, cz, cx), atol=5e-3)  # documented Y-up position
    colors = _reload_colors(path, fmt, loaded)
    expected = expected_rgb_uint8(world_from_y_up(np.asarray(loaded.vertices)))
    # GLB: 8-bit linear storage loses a little precision in the darks.
    np.testing.assert_allclose(colors, expected, atol=6 if fmt == "glb" else 1)


def test_glb_has_colors_and_a_non_metallic_material(tmp_path, sphere_mesh):
    data = save_mesh(sphere_mesh, tmp_path / "m.glb").read_bytes()
    assert data[:4] == b"glTF" and struct.unpack("<I", data[8:12])[0] == len(data)
    tree = json.loads(data[20:20 + struct.unpack("<I", data[12:16])[0]])
    prim = tree["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "COLOR_0"} <= set(prim["attributes"])
    acc = tree["accessors"][prim["attributes"]["COLOR_0"]]
    assert acc["componentType"] == 5121 and acc["normalized"] is True and acc["type"] in ("VEC3", "VEC4")
    pbr = tree["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0


def test_obj_has_vertex_color_lines(tmp_path, sphere_mesh):
    text = save_mesh(sphere_mesh, tmp_path / "m.obj").read_text()
    v_line = next(line for line in text.splitlines() if line.startswith("v "))
    assert len(v_line.split()) == 7  # v x y z r g b


def test_ply_is_binary_with_colors(tmp_path, sphere_mesh):
    head = save_mesh(sphere_mesh, tmp_path / "m.ply").read_bytes()[:400]
    assert b"format binary_little_endian" in head and b"property uchar red" in head


def test_save_mesh_rejects_unknown_format(tmp_path, sphere_mesh):
    with pytest.raises(UserError, match="unknown mesh format 'stl'"):
        save_mesh(sphere_mesh, tmp_path / "m.stl")
    assert not list(tmp_path.iterdir())


def test_export_run_meshes_writes_each_format(tmp_path):
    cfg = SimpleNamespace(mesh_resolution=32, min_component_ratio=0.05, texture=True, texture_size=64)
    paths = export_run_meshes(Spheres(), tmp_path / "run", ["glb", "ply", "glb"], cfg)
    assert [p.name for p in paths] == ["model.glb", "model.ply"]
    assert all(p.is_file() for p in paths)
    assert export_run_meshes(Spheres(threshold=1e9), tmp_path / "none", [], cfg) == []
    with pytest.raises(UserError):
        export_run_meshes(Spheres(), tmp_path / "run", ["fbx"], cfg)


# ----------------------------------------------------------------------------------------------
# Video and images
# ----------------------------------------------------------------------------------------------
def test_turntable_mp4(tmp_path):
    import imageio.v2 as iio

    path = render_turntable(Spheres(), tmp_path / "turntable.mp4", frames=8, fps=12, resolution=48, progress=False)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["turntable.mp4"]
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert len(frames) == 8
    assert all(f.shape == (48, 48, 3) for f in frames)
    # Frame 0 looks at the front (camera on +X): the reddish x > cx half faces it.
    centre = frames[0][20:28, 20:28].reshape(-1, 3).mean(0)
    assert centre[0] > centre[2] + 60
    # Frame 4 (azimuth 180) sees the back: bluish.
    centre = frames[4][20:28, 20:28].reshape(-1, 3).mean(0)
    assert centre[2] > centre[0] + 60


def test_turntable_odd_resolution_is_padded_to_even(tmp_path):
    import imageio.v2 as iio

    path = render_turntable(Spheres(), tmp_path / "odd.mp4", frames=2, resolution=33, progress=False)
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        frames = [np.asarray(f) for f in reader]  # list(reader) trips over its len() of inf
    finally:
        reader.close()
    assert len(frames) == 2 and frames[0].shape == (34, 34, 3)


def test_image_grid_and_save_image(tmp_path):
    from PIL import Image

    imgs = torch.zeros(4, 3, 8, 6)
    for b in range(4):
        imgs[b, b % 3] = 1.0
    grid = image_grid(imgs, nrow=2)
    assert grid.shape == (3, 16, 12)
    torch.testing.assert_close(grid[:, 8:, 6:], imgs[3])  # row-major tiling
    assert image_grid(imgs, nrow=2, padding=1).shape == (3, 17, 13)

    p = save_image(imgs, tmp_path / "row.png")
    assert np.asarray(Image.open(p)).shape == (8, 24, 3)  # a batch defaults to one row
    p = save_image(imgs[1], tmp_path / "one.png")
    arr = np.asarray(Image.open(p))
    assert arr.shape == (8, 6, 3) and (arr[..., 1] == 255).all() and (arr[..., 0] == 0).all()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["one.png", "row.png"]


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(Boom):
        with atomic_write(target) as f:
            f.write(b"half")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_existing_file(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: 1\n")
    with pytest.raises(Boom):
        with atomic_write(target, "w") as f:
            f.write("new: 2\n")
            raise Boom()
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_atomic_write_success_and_permissions(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    atomic_write_bytes(target, b"abc")
    atomic_write_bytes(target, b"xyz")
    assert target.read_bytes() == b"xyz"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)  # not mkstemp's 0600


def test_atomic_path(tmp_path):
    target = tmp_path / "video.mp4"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and not tmp.exists()
        tmp.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise Boom()
    assert target.read_bytes() == b"v1"
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass  # the library wrote nothing
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


# ----------------------------------------------------------------------------------------------
# Baked textures (xatlas UVs, albedo texture, GLB PBR material, OBJ + MTL + PNG)
# ----------------------------------------------------------------------------------------------
TEX = 256
REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO / "tools" / "gltf-validator"


@pytest.fixture(scope="module")
def textured_mesh() -> trimesh.Trimesh:
    from threedistill.export import bake_texture

    rep = Spheres()
    return bake_texture(rep, extract_mesh(rep, resolution=40), texture_size=TEX)


def _sample_texture(image, uv: np.ndarray) -> np.ndarray:
    """Nearest texel at trimesh/OBJ UVs (v up; PNG row 0 is the top)."""
    img = np.asarray(image.convert("RGB")).astype(int)
    h, w = img.shape[:2]
    col = np.clip(np.floor(uv[:, 0] * w), 0, w - 1).astype(int)
    row = np.clip(np.floor((1.0 - uv[:, 1]) * h), 0, h - 1).astype(int)
    return img[row, col]


def _assert_texture_matches_albedo(image, uv: np.ndarray, y_up_vertices: np.ndarray) -> None:
    assert image.size == (TEX, TEX)
    assert uv.shape == (len(y_up_vertices), 2) and uv.min() >= 0.0 and uv.max() <= 1.0
    world = world_from_y_up(y_up_vertices)
    away = np.abs(world[:, 0] - CENTRE[0]) > 0.03  # the albedo jumps from blue to red at x = cx
    got = _sample_texture(image, uv)[away]
    expected = expected_rgb_uint8(world[away])
    assert np.abs(got - expected).max() <= 4
    assert got[:, 0].max() > 200 and got[:, 2].max() > 200  # both halves are there


def _glb_json(data: bytes) -> dict:
    return json.loads(data[20:20 + struct.unpack("<I", data[12:16])[0]])


def test_bake_texture_covers_charts_and_dilates(textured_mesh):
    from threedistill.export.mesh import _dilate

    tex = np.asarray(textured_mesh.visual.material.baseColorTexture)
    assert tex.shape == (TEX, TEX, 3) and tex.dtype == np.uint8
    # Every texel is a surface color (dilated, then the mean color): no black background.
    assert tex.sum(-1).min() > 0
    # Seam copies share positions; colors for PLY come along.
    assert len(textured_mesh.vertex_attributes["color"]) == len(textured_mesh.vertices)
    # _dilate grows a filled texel by one ring per pass, then fills the rest with the mean.
    img = np.zeros((7, 7, 3), np.float32)
    filled = np.zeros((7, 7), bool)
    img[3, 3], filled[3, 3] = 100.0, True
    img[0, 0], filled[0, 0] = 40.0, True
    out = _dilate(img, filled, passes=1)
    assert (out[2:5, 2:5] == 100.0).all() and out[0, 1, 0] == 40.0
    assert out[6, 6, 0] == pytest.approx((9 * 100.0 + 4 * 40.0) / 13)  # unreached: the mean filled color


def test_textured_glb_reloads_with_texture_uvs_and_material(tmp_path, textured_mesh):
    path = save_mesh(textured_mesh, tmp_path / "model.glb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.glb"]  # the PNG is embedded
    tree = _glb_json(path.read_bytes())
    prim = tree["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(prim["attributes"]) and "COLOR_0" not in prim["attributes"]
    pbr = tree["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr.get("roughnessFactor", 1.0) == pytest.approx(1.0)
    image = tree["images"][tree["textures"][pbr["baseColorTexture"]["index"]]["source"]]
    assert image["mimeType"] == "image/png"

    scene = trimesh.load(path)
    (geom,) = scene.geometry.values()
    assert geom.visual.kind == "texture" and len(geom.faces) == len(textured_mesh.faces)
    _assert_texture_matches_albedo(geom.visual.material.baseColorTexture, np.asarray(geom.visual.uv),
                                   np.asarray(geom.vertices))
    # Y-up, and closed once the seam copies are welded again.
    cx, cy, cz = CENTRE
    welded = trimesh.Trimesh(vertices=geom.vertices, faces=geom.faces, process=False)
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    assert welded.is_watertight and welded.volume > 0
    np.testing.assert_allclose(welded.center_mass, (cy, cz, cx), atol=5e-3)
    # Normals are smooth across seams: they point away from the centre.
    radial = np.asarray(geom.vertices) - np.array([cy, cz, cx])
    cos = np.einsum("ij,ij->i", np.asarray(geom.vertex_normals), radial / np.linalg.norm(radial, axis=1)[:, None])
    assert cos.min() > 0.9


def test_textured_obj_writes_mtl_and_png_with_relative_references(tmp_path, textured_mesh):
    import shutil

    from threedistill.export import texture_paths

    path = save_mesh(textured_mesh, tmp_path / "a" / "chair.obj")
    assert texture_paths(path) == (tmp_path / "a" / "chair.mtl", tmp_path / "a" / "chair.png")
    assert sorted(p.name for p in path.parent.iterdir()) == ["chair.mtl", "chair.obj", "chair.png"]
    text = path.read_text()
    assert "mtllib chair.mtl" in text.splitlines() and any(l.startswith("vt ") for l in text.splitlines())
    mtl = (tmp_path / "a" / "chair.mtl").read_text()
    assert "map_Kd chair.png" in mtl.splitlines() and "Kd 1 1 1" in mtl.splitlines()
    assert str(tmp_path) not in text + mtl
    # The trio still loads, texture included, once moved elsewhere.
    moved = tmp_path / "b"
    shutil.copytree(path.parent, moved)
    shutil.rmtree(path.parent)
    loaded = trimesh.load(moved / "chair.obj", force="mesh")
    assert loaded.visual.kind == "texture" and len(loaded.faces) == len(textured_mesh.faces)
    _assert_texture_matches_albedo(loaded.visual.material.image, np.asarray(loaded.visual.uv),
                                   np.asarray(loaded.vertices))


def test_textured_mesh_ply_has_welded_vertex_colors(tmp_path, textured_mesh):
    path = save_mesh(textured_mesh, tmp_path / "model.ply")
    loaded = trimesh.load(path, force="mesh")
    assert loaded.visual.kind == "vertex" and loaded.is_watertight and loaded.volume > 0
    assert len(loaded.vertices) < len(textured_mesh.vertices)  # seam copies merged
    colors = np.asarray(loaded.visual.vertex_colors)[:, :3].astype(int)
    np.testing.assert_allclose(colors, expected_rgb_uint8(world_from_y_up(np.asarray(loaded.vertices))), atol=1)


def _validate_gltf(path: Path) -> dict:
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        msg = ("the Khronos glTF validator is not installed: "
               "npm ci --prefix tools/gltf-validator (needs node and npm)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    proc = subprocess.run([node, str(VALIDATOR / "validate.js"), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("textured", [True, False], ids=["texture", "vertex-colors"])
def test_glb_passes_the_khronos_validator(tmp_path, textured_mesh, sphere_mesh, textured):
    path = save_mesh(textured_mesh if textured else sphere_mesh, tmp_path / "model.glb")
    report = _validate_gltf(path)
    issues = report["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]
    assert report["info"]["hasTextures"] is textured
    if textured:
        (img,) = [r for r in report["info"]["resources"] if r["pointer"].startswith("/images/")]
        assert img["image"]["width"] == TEX and img["image"]["height"] == TEX
        assert img["image"]["transfer"] == "srgb" and img["image"]["bits"] == 8


def test_export_run_meshes_bakes_a_texture_unless_disabled(tmp_path):
    cfg = SimpleNamespace(mesh_resolution=24, min_component_ratio=0.05, texture=True, texture_size=64)
    paths = export_run_meshes(Spheres(), tmp_path / "tex", ["glb", "obj", "ply"], cfg)
    assert [p.name for p in paths] == ["model.glb", "model.obj", "model.ply"]
    assert sorted(p.name for p in (tmp_path / "tex").iterdir()) == [
        "model.glb", "model.mtl", "model.obj", "model.ply", "model.png"]
    (geom,) = trimesh.load(paths[0]).geometry.values()
    assert geom.visual.material.baseColorTexture.size == (64, 64)
    assert trimesh.load(paths[2], force="mesh").visual.kind == "vertex"

    cfg.texture = False
    paths = export_run_meshes(Spheres(), tmp_path / "vc", ["glb", "obj"], cfg)
    assert sorted(p.name for p in (tmp_path / "vc").iterdir()) == ["model.glb", "model.obj"]
    assert "COLOR_0" in _glb_json(paths[0].read_bytes())["meshes"][0]["primitives"][0]["attributes"]


@pytest.mark.parametrize("size", [0, 8, 10000])
def test_texture_size_is_validated(size):
    from threedistill.config import load_config

    with pytest.raises(UserError, match="export.texture_size"):
        load_config(overrides=[f"export.texture_size={size}"])
    assert load_config(overrides=["export.texture=false"]).export.texture is False


def test_cli_export_texture_size_and_no_texture(tmp_path, monkeypatch, capsys):
    from threedistill.cli import main
    from threedistill.config import load_config
    from threedistill.runs import RunFolder

    cfg = load_config(overrides=["export.mesh_resolution=24"])
    monkeypatch.setattr(RunFolder, "load_representation", lambda folder: (cfg, Spheres(), 7))
    run = tmp_path / "run"
    run.mkdir()
    assert main(["export", str(run), "-f", "obj", "-f", "glb", "-f", "ply", "--texture-size", "32"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["model.glb", "model.mtl", "model.obj", "model.ply", "model.png"]
    (geom,) = trimesh.load(run / "model.glb").geometry.values()
    assert geom.visual.material.baseColorTexture.size == (32, 32)
    assert "32px texture" in capsys.readouterr().out

    out = tmp_path / "plain.glb"
    assert main(["export", str(run), "--no-texture", "--output", str(out)]) == 0
    assert "COLOR_0" in _glb_json(out.read_bytes())["meshes"][0]["primitives"][0]["attributes"]
    assert main(["export", str(run), "--texture-size", "8"]) == 2
    assert "--texture-size must be between 16 and 8192" in capsys.readouterr().err


def test_bake_texture_from_vertex_colors_without_a_representation():
    """An explicit mesh (the mesh representation's export) bakes its own vertex colors."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    rgb = np.stack([np.rint((sphere.vertices[:, k] / 0.4 + 1.0) * 127.5) for k in range(3)], axis=1).astype(np.uint8)
    sphere.visual.vertex_colors = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    out = bake_texture(None, sphere, texture_size=128)
    uv = np.asarray(out.visual.uv)
    got = _sample_texture(out.visual.material.baseColorTexture, uv)
    # independent: the color the input mesh had at each (seam-split) vertex position
    idx = sphere.kdtree.query(out.vertices)[1]
    assert np.abs(got - rgb[idx].astype(int)).max() <= 12  # nearest texel of a linear ramp
    assert np.abs(got - rgb[idx].astype(int)).mean() <= 3
    with pytest.raises(ValueError, match="vertex colors"):
        bake_texture(None, trimesh.creation.icosphere(subdivisions=1), texture_size=64)


def test_export_surface_silhouette_matches_the_render_and_isosurface_keeps_the_level(tmp_path):
    """A fresh NeRF is its density blob: the fixed level 5 lies at radius ~0.2 (the blob's
    ``blob_density * (1 - r / blob_radius)`` = softplus^-1(5)), far inside what it renders. With
    ``export.surface=silhouette`` the written mesh's silhouette from the matching views covers the
    rendered one (within 5% of its pixels); with ``isosurface`` it is the small level-5 ball; a
    ``--threshold`` given by hand wins over both."""
    import math

    from threedistill.config import load_config
    from threedistill.export import export_run_meshes, matching_cameras
    from threedistill.export.check import load_exported_mesh, render_exported_mesh
    from threedistill.representations import build_representation
    from threedistill.representations.base import RepresentationContext

    cfg = load_config(None, ["representation.nerf.num_samples=64"])
    rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    rep.eval()
    cams = matching_cameras(cfg.camera)
    with torch.no_grad():
        rendered = int((rep.render(cams, training=False).alpha > 0.5).sum())

    def covered(folder, surface, threshold=None):
        cfg.export.surface = surface
        cfg.export.texture = False
        (path,) = export_run_meshes(rep, folder, ["glb"], cfg.export, threshold=threshold, camera_cfg=cfg.camera)
        mesh = load_exported_mesh(path)
        radius = float(np.linalg.norm(mesh.vertices - mesh.vertices.mean(0), axis=1).mean())
        alpha = render_exported_mesh(mesh, cams, torch.ones(len(cams), 3, cams.height, cams.width))["alpha"]
        return int((alpha > 0.5).sum()), radius

    matched, _ = covered(tmp_path / "m", "silhouette")
    assert abs(matched - rendered) <= 0.05 * rendered
    level5, r5 = covered(tmp_path / "i", "isosurface")
    expected_r = cfg.representation.nerf.blob_radius * (1 - math.log(math.expm1(5.0)) / cfg.representation.nerf.blob_density)
    assert r5 == pytest.approx(expected_r, abs=0.02) and level5 < 0.8 * rendered
    by_hand, r_hand = covered(tmp_path / "h", "silhouette", threshold=5.0)
    assert r_hand == pytest.approx(r5, abs=1e-6)


def test_export_surface_is_checked_and_old_runs_keep_the_isosurface(tmp_path):
    from threedistill.config import INTRODUCED_KEYS, load_config

    with pytest.raises(UserError, match="export.surface"):
        load_config(None, ["export.surface=smooth"])
    assert load_config(None).export.surface == "silhouette"
    assert INTRODUCED_KEYS["export.surface"] == "isosurface"  # how run folders written before it exported


def test_cli_export_surface_flag_reexports_an_old_run_at_the_matched_level(tmp_path, capsys):
    """A run folder written before export.surface existed exports the isosurface; ``--surface
    silhouette`` gives the matched level, a larger mesh for a fresh blob (level 5 sits at radius 0.2)."""
    import yaml

    from threedistill.cli import main
    from threedistill.export.check import load_exported_mesh

    assert main(["generate", "a red cube", "--out", str(tmp_path), "run.name=r", "run.steps=1", "run.resolution=16",
                 "run.progress=false", "run.device=cpu", "export.turntable=false", "export.formats=[]",
                 "representation.nerf.num_samples=16"]) == 0
    cfg_path = tmp_path / "r" / "config.yaml"
    saved = yaml.safe_load(cfg_path.read_text())
    del saved["export"]["surface"]  # as a run folder from before the key
    cfg_path.write_text(yaml.safe_dump(saved))

    def extent(*flags):
        out = tmp_path / f"m{len(flags)}.glb"
        assert main(["export", str(tmp_path / "r"), "--no-texture", "--resolution", "48", "--output", str(out), *flags]) == 0
        v = load_exported_mesh(out).vertices
        return float(v[:, 0].max() - v[:, 0].min())

    old, matched = extent(), extent("--surface", "silhouette")
    assert old < 0.5 and matched > 1.3 * old
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "r"), "--surface", "smooth"])
    capsys.readouterr()
