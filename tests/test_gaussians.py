"""The 3D Gaussians representation: initialization, rendering, export fields, splat PLY, CLI."""

import math

import numpy as np
import pytest
import torch
import trimesh

from threedistill.cameras import CameraSampler
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.representations import build_representation
from threedistill.representations.gaussians import SH_C0, SPLAT_PLY_PROPERTIES, Gaussians, read_splat_ply

N = 200


def _rep(*overrides, prompt="a red cube", n=N, seed=0) -> Gaussians:
    cfg = load_config(None, ["representation.name=gaussians", f"representation.gaussians.num_points={n}",
                             f"run.prompt={prompt}", *overrides])
    torch.manual_seed(seed)
    return build_representation(cfg, torch.device("cpu"))


def _cams(res=16, batch=2):
    cfg = load_config(None, [f"camera.batch_size={batch}"])
    return CameraSampler(cfg.camera, res).sample(torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# Initialization
# ----------------------------------------------------------------------------------------------
def test_sphere_init_within_radius_and_defaults():
    rep = _rep("representation.gaussians.init=sphere", "representation.gaussians.init_radius=0.3")
    assert rep.means.shape == (N, 3) and rep.quats.shape == (N, 4) and rep.log_scales.shape == (N, 3)
    assert rep.means.norm(dim=-1).max() <= 0.3 + 1e-6
    assert torch.allclose(rep.opacities, torch.full((N,), 0.1), atol=1e-6)
    assert torch.equal(rep.quats, torch.tensor([1.0, 0, 0, 0]).repeat(N, 1))
    assert ((rep.colors - 0.5).abs() <= 0.05 + 1e-6).all()
    # scales: mean distance to the 3 nearest neighbours (independent brute force)
    d = torch.cdist(rep.means, rep.means) + torch.eye(N) * 1e9
    expected = d.topk(3, largest=False).values.mean(-1)
    assert torch.allclose(rep.scales[:, 0], expected, rtol=1e-4)
    # seeded by torch's global RNG
    assert torch.equal(_rep("representation.gaussians.init_radius=0.3").means, rep.means)


def test_shape_init_on_cube_surface():
    rep = _rep("representation.gaussians.init=shape", prompt="a red cube")
    m = rep.means.detach().abs()
    assert (m.amax(-1) - 0.28).abs().max() < 1e-4  # every point on a face of the 0.56 cube


def test_shape_init_falls_back_to_sphere(caplog):
    with caplog.at_level("WARNING"):
        rep = _rep("representation.gaussians.init=shape", prompt="a hamburger")
    assert rep.means.norm(dim=-1).max() <= 0.5 + 1e-6
    assert any("sphere" in r.message for r in caplog.records)


def test_file_init_reads_points_and_colours(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.2, 0.2, (50, 3))
    cols = np.tile(np.array([[255, 0, 0, 255]], np.uint8), (50, 1))
    path = tmp_path / "cloud.ply"
    trimesh.PointCloud(pts, colors=cols).export(path)
    rep = _rep(f"representation.gaussians.init=file:{path}", n=30)
    assert rep.num_gaussians == 30
    got = rep.means.detach().double().numpy()
    assert np.abs(got[:, None, :] - pts[None]).sum(-1).min(1).max() < 1e-6  # a subset of the file's points
    assert torch.allclose(rep.colors, torch.tensor([1.0, 0.0, 0.0]).expand(30, 3), atol=1e-5)


def test_missing_init_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        _rep(f"representation.gaussians.init=file:{tmp_path / 'nope.ply'}")
    bad = tmp_path / "bad.ply"
    bad.write_text("not a ply")
    with pytest.raises(UserError, match="cannot read|no points"):
        _rep(f"representation.gaussians.init=file:{bad}")


def test_bad_init_value_is_a_config_error():
    with pytest.raises(UserError, match="representation.gaussians.init"):
        _rep("representation.gaussians.init=cube")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def test_render_shapes_and_ranges():
    rep = _rep("representation.gaussians.init=shape")
    cams = _cams()
    out = rep.render(cams, generator=torch.Generator().manual_seed(0))
    for name, c in (("rgb", 3), ("alpha", 1), ("depth", 1), ("normal", 3)):
        v = getattr(out, name)
        assert v.shape == (2, c, 16, 16), name
        assert float(v.detach().min()) >= 0.0 and float(v.detach().max()) <= 1.0, name
    assert out.alpha.max() > 0.5 and out.alpha.min() < 0.01
    assert out.extras["means2d"].shape == (2, N, 2) and out.extras["radii"].shape == (2, N)
    # empty pixels: depth 1 (the NeRF contract), object pixels nearer
    empty = out.alpha < 1e-4
    assert torch.allclose(out.depth[empty], torch.ones(()), atol=1e-4)
    assert out.depth[out.alpha > 0.9].max() < 1.0


def test_transparent_model_renders_the_background():
    rep = _rep("representation.gaussians.background=black")
    with torch.no_grad():
        rep.opacity_logits.fill_(-30.0)
    out = rep.render(_cams(), training=False)
    assert torch.allclose(out.rgb, torch.zeros_like(out.rgb)) and out.alpha.max() < 1e-6
    rep = _rep("representation.gaussians.background=random")
    with torch.no_grad():
        rep.opacity_logits.fill_(-30.0)
    out = rep.render(_cams(), generator=torch.Generator().manual_seed(3), training=True)
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.rgb, bg[:, :, None, None].expand_as(out.rgb), atol=1e-6)
    assert torch.allclose(rep.render(_cams(), training=False).rgb, torch.ones(2, 3, 16, 16))


def test_gradients_reach_every_parameter_group():
    rep = _rep("representation.gaussians.init=shape")
    with torch.no_grad():  # anisotropic, rotated: the rotation matters
        rep.log_scales.add_(torch.randn(N, 3) * 0.3)
        rep.quats.add_(torch.randn(N, 4) * 0.3)
    out = rep.render(_cams(), generator=torch.Generator().manual_seed(0))
    (out.rgb * torch.rand_like(out.rgb)).sum().backward()
    groups = rep.param_groups(load_config().optim)
    assert [g["name"] for g in groups] == ["means", "scales", "quats", "opacities", "colors"]
    assert [g["lr_fixed"] for g in groups] == [1e-3, 5e-3, 1e-3, 5e-2, 1e-2]
    for g in groups:
        (p,) = g["params"]
        assert p.grad is not None and p.grad.abs().sum() > 0, g["name"]
    assert rep.regularizers(out, 0) == {}
    rep2 = _rep("representation.gaussians.lambda_opacity=0.5")
    assert set(rep2.regularizers(out, 0)) == {"opacity"}


def test_state_dict_round_trip():
    a, b = _rep(seed=0), _rep(seed=1)
    b.load_state_dict(a.state_dict())
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


# ----------------------------------------------------------------------------------------------
# Splat PLY
# ----------------------------------------------------------------------------------------------
def test_splat_ply_round_trip(tmp_path):
    rep = _rep()
    with torch.no_grad():
        rep.log_scales.add_(torch.randn(N, 3))
        rep.quats.copy_(torch.randn(N, 4))
        rep.opacity_logits.copy_(torch.randn(N))
        rep.color_logits.copy_(torch.randn(N, 3))
    path = rep.save_splat_ply(tmp_path / "g.ply")
    data = path.read_bytes()
    header = data[:data.index(b"end_header\n")].decode().splitlines()
    assert header[:3] == ["ply", "format binary_little_endian 1.0", f"element vertex {N}"]
    assert [l.split()[2] for l in header if l.startswith("property")] == list(SPLAT_PLY_PROPERTIES)
    assert all(l.split()[1] == "float" for l in header if l.startswith("property"))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temp file left

    a = read_splat_ply(path)
    assert np.array_equal(a["f_dc_0"], ((rep.colors[:, 0] - 0.5) / SH_C0).detach().numpy())
    other = _rep(n=7)
    other.load_splat_ply(path)
    assert other.num_gaussians == N
    for name in ("means", "log_scales", "quats", "opacity_logits"):
        assert torch.equal(getattr(other, name), getattr(rep, name)), name
    assert torch.allclose(other.colors, rep.colors, atol=1e-6)
    # a second save writes the same geometry bytes
    other.save_splat_ply(tmp_path / "h.ply")
    b = read_splat_ply(tmp_path / "h.ply")
    for k in SPLAT_PLY_PROPERTIES:
        if not k.startswith("f_dc"):
            assert np.array_equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Export fields
# ----------------------------------------------------------------------------------------------
def test_density_at_isolated_centre_equals_opacity():
    rep = _rep(n=3)
    with torch.no_grad():
        rep.means.copy_(torch.tensor([[0.0, 0.0, 0.0], [5.0, 0, 0], [0, 5.0, 0]]))
        rep.log_scales.copy_(torch.log(torch.tensor([[0.1, 0.2, 0.05]] * 3)))
        rep.quats.copy_(torch.tensor([[0.9, 0.1, -0.3, 0.2]] * 3))
        rep.opacity_logits.copy_(torch.logit(torch.tensor([0.7, 0.3, 0.3])))
    assert float(rep.density(torch.zeros(1, 3))) == pytest.approx(0.7, abs=1e-6)
    # closed form off-centre, in the Gaussian's own frame: offset 1 sigma along its first axis
    w, x, y, z = (torch.tensor([0.9, 0.1, -0.3, 0.2]) / torch.tensor([0.9, 0.1, -0.3, 0.2]).norm()).tolist()
    axis0 = torch.tensor([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)])
    got = float(rep.density((0.1 * axis0)[None]))
    assert got == pytest.approx(0.7 * math.exp(-0.5), rel=1e-5)


def test_export_mesh_of_a_blob(tmp_path):
    from threedistill.export import export_run_meshes, extract_mesh

    rep = _rep("representation.gaussians.init_radius=0.3", n=150)
    with torch.no_grad():
        rep.opacity_logits.fill_(3.0)
        rep.color_logits.copy_(torch.logit(torch.tensor([0.8, 0.2, 0.1])).expand(150, 3))
    mesh = extract_mesh(rep, resolution=24)
    assert len(mesh.faces) > 0
    assert np.abs(mesh.vertices).max() <= rep.bounds + 1e-6
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].mean(0)
    assert np.allclose(rgb, [204, 51, 25], atol=3)

    class Cfg:
        mesh_resolution = 20
        min_component_ratio = 0.05

    (path,) = export_run_meshes(rep, tmp_path, ["glb"], Cfg)
    assert path.stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def test_generate_through_the_cli(tmp_path, tiny_sd_path):
    from threedistill.cli import main

    code = main(["generate", "a red cube", "--out", str(tmp_path), f"prior.name={tiny_sd_path}", "run.name=g",
                 "representation.name=gaussians", "representation.gaussians.num_points=300",
                 "representation.gaussians.init=shape", "representation.gaussians.init_opacity=0.6",
                 "run.steps=3", "run.resolution=16", "run.progress=false", "run.preview_every=3",
                 "run.checkpoint_every=3", "export.mesh_resolution=24", "export.turntable_frames=2",
                 "export.turntable_resolution=16", "guidance.guidance_scale=7.5"])
    assert code == 0
    run = tmp_path / "g"
    assert (run / "model.glb").stat().st_size > 0
    scene = trimesh.load(run / "model.glb")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 0
    assert (run / "turntable.mp4").is_file()
