"""Fidelity check (``export --check``): an exported mesh file read back and rendered against the
representation it came from; small errors for faithful files, clearly larger ones for corrupted
colors or a flipped texture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from threedistill.cameras import CameraBatch
from threedistill.export import bake_texture, extract_mesh, save_mesh
from threedistill.export.check import check_cameras, fidelity_check, load_exported_mesh
from threedistill.representations.base import RenderOutput
from threedistill.representations.common import shade
from test_export import CENTRE, RADIUS, Spheres  # tests/ is on sys.path (rootdir conftest)

RES = 64
CAMS = check_cameras(resolution=96)


@pytest.fixture(scope="module")
def meshes():
    rep = Spheres()
    mesh = extract_mesh(rep, resolution=RES)
    return rep, mesh, bake_texture(rep, mesh, texture_size=256)


def _with_texture(textured, image: Image.Image):
    out = textured.copy()
    out.visual.material.baseColorTexture = image
    return out


def test_textured_glb_is_faithful_and_corruption_shows(meshes, tmp_path):
    rep, _, textured = meshes
    path = save_mesh(textured, tmp_path / "model.glb")
    loaded = load_exported_mesh(path)
    assert loaded.kind == "texture"
    np.testing.assert_allclose((loaded.vertices.min(0) + loaded.vertices.max(0)) / 2, CENTRE, atol=0.01)  # Z-up world
    good = fidelity_check(rep, path, CAMS)
    assert good["color"] == "texture" and good["views"] == 8 and len(good["per_view"]) == 8
    assert good["silhouette_iou"] > 0.95
    assert good["rgb_mae"] < 0.02 and good["rgb_mae_both"] < 0.02 and good["psnr"] > 22
    assert min(v["silhouette_iou"] for v in good["per_view"]) > 0.95
    json.dumps(good)  # JSON-ready

    tex = textured.visual.material.baseColorTexture
    # A V-flipped texture (the classic UV-convention bug) and a constant grey one.
    for image in (tex.transpose(Image.FLIP_TOP_BOTTOM), Image.new("RGB", tex.size, (128, 128, 128))):
        bad_path = save_mesh(_with_texture(textured, image), tmp_path / "bad.glb")
        bad = fidelity_check(rep, bad_path, CAMS)
        assert bad["silhouette_iou"] > 0.95  # same geometry
        assert bad["rgb_mae_both"] > 5 * good["rgb_mae_both"] and bad["rgb_mae"] > 0.1
        assert bad["psnr"] < good["psnr"] - 6


def test_ply_vertex_colors_are_faithful_and_shuffling_shows(meshes, tmp_path):
    rep, mesh, _ = meshes
    path = save_mesh(mesh, tmp_path / "model.ply")
    good = fidelity_check(rep, path, CAMS)
    assert good["color"] == "vertex"
    assert good["silhouette_iou"] > 0.95 and good["rgb_mae"] < 0.025

    shuffled = mesh.copy()
    colors = np.asarray(mesh.visual.vertex_colors).copy()
    shuffled.visual.vertex_colors = colors[np.random.default_rng(0).permutation(len(colors))]
    bad = fidelity_check(rep, save_mesh(shuffled, tmp_path / "bad.ply"), CAMS)
    assert bad["silhouette_iou"] > 0.95
    assert bad["rgb_mae"] > 5 * good["rgb_mae"] and bad["rgb_mae"] > 0.1


def test_geometry_errors_lower_the_iou(meshes, tmp_path):
    rep, mesh, _ = meshes
    moved = mesh.copy()
    moved.apply_translation([0.0, 0.0, 0.15])  # the mesh 0.15 higher than the representation
    bad = fidelity_check(rep, save_mesh(moved, tmp_path / "moved.ply"), CAMS)
    assert bad["silhouette_iou"] < 0.8


class ShadedSpheres(Spheres):
    """The analytic sphere rendered diffuse with a headlight, as NeRF/mesh evaluation renders are."""

    ambient_light = 0.1

    def evaluation_ambient(self):
        return self.ambient_light

    def render(self, cameras: CameraBatch, step: int = 0, generator=None, training: bool = True) -> RenderOutput:
        out = super().render(cameras, step, generator, training)
        o, d = cameras.rays()
        oc = o - self.centres[0]
        b = (oc * d).sum(-1)
        t = -b - (b * b - ((oc * oc).sum(-1) - self.radii[0] ** 2)).clamp_min(0).sqrt()
        p = (o + t[..., None] * d).reshape(-1, 3)
        n = (p - self.centres[0]) / RADIUS
        light = cameras.positions[:, None, None, :].expand_as(o).reshape(-1, 3)
        col = shade(self.albedo(p), n, p, light, "diffuse", self.ambient_light).reshape(o.shape).permute(0, 3, 1, 2)
        out.rgb = out.alpha * col + (1 - out.alpha)
        return out


def test_shading_matches_a_lit_representation(meshes, tmp_path, monkeypatch):
    _, _, textured = meshes
    rep = ShadedSpheres()
    path = save_mesh(textured, tmp_path / "model.glb")
    lit = fidelity_check(rep, path, CAMS)
    assert lit["shading"].startswith("diffuse")
    assert lit["silhouette_iou"] > 0.95 and lit["rgb_mae"] < 0.02
    # Without shading the mesh the headlight's falloff would count as an error.
    monkeypatch.setattr("threedistill.export.check.eval_shading", lambda rep: None)
    unlit = fidelity_check(rep, path, CAMS)
    assert unlit["rgb_mae"] > 2 * lit["rgb_mae"]


def test_export_check_cli(tmp_path, tiny_sd_path, capsys):
    from threedistill.cli import main

    code = main(["generate", "a red cube", "--out", str(tmp_path), f"prior.name={tiny_sd_path}", "run.name=g",
                 "representation.name=gaussians", "representation.gaussians.num_points=300",
                 "representation.gaussians.init=shape", "representation.gaussians.init_opacity=0.6",
                 "run.steps=2", "run.resolution=16", "run.progress=false", "run.preview_every=100",
                 "run.checkpoint_every=2", "export.formats=[]", "export.turntable=false"])
    assert code == 0
    run = tmp_path / "g"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "glb", "--format", "ply", "--resolution", "48",
                 "--texture-size", "128", "--check-images"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("check:")]
    assert len(line) == 1 and "model.glb" in line[0] and "IoU" in line[0]
    result = json.loads((run / "export_check.json").read_text())
    assert result["mesh"].endswith("model.glb") and result["color"] == "texture" and result["views"] == 8
    assert result["resolution"] == [128, 128] and result["shading"] == "albedo" and result["step"] == 2
    assert 0.0 <= result["silhouette_iou"] <= 1.0 and 0.0 <= result["rgb_mae"] <= 1.0
    assert Image.open(run / "export_check.png").size == (8 * 128, 3 * 128)
    # --check without a mesh format is a one-line user error, before anything is written.
    assert main(["export", str(run), "--format", "splat", "--check", "--output", str(tmp_path / "s.ply")]) == 2
    assert "--check" in capsys.readouterr().err and not (tmp_path / "s.ply").exists()
