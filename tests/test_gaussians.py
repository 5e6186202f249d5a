"""The 3D Gaussians representation: initialization, rendering, export fields, splat PLY, CLI."""

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threedistill.cameras import CameraSampler
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.runs import RunFolder
from threedistill.inputs import resolve_inputs
from threedistill.representations import RepresentationContext, build_representation
from threedistill.representations.gaussians import SH_C0, SPLAT_PLY_PROPERTIES, Gaussians, read_splat_ply

N = 200


def _rep(*overrides, prompt="a red cube", n=N, seed=0) -> Gaussians:
    cfg = load_config(None, ["representation.name=gaussians", f"representation.gaussians.num_points={n}",
                             f"run.prompt={prompt}", *overrides])
    cfg = resolve_inputs(cfg, RunFolder(tempfile.mkdtemp()))  # init=shape -> a file, as the pipeline does
    torch.manual_seed(seed)
    return build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))


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


def test_file_init_reads_points_and_colors(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.2, 0.2, (50, 3))
    cols = np.tile(np.array([[255, 0, 0, 255]], np.uint8), (50, 1))
    path = tmp_path / "cloud.ply"
    trimesh.PointCloud(pts, colors=cols).export(path)
    rep = _rep(f"representation.gaussians.init=file:{path}", n=30)
    assert rep.num_gaussians == 30
    got = rep.means.detach().double().numpy()
    # A file without a recorded placement is glTF's Y-up: file (x, y, z) is world (z, x, y)
    world = pts[:, [2, 0, 1]]
    assert np.abs(got[:, None, :] - world[None]).sum(-1).min(1).max() < 1e-6  # a subset of the file's points
    assert torch.allclose(rep.colors, torch.tensor([1.0, 0.0, 0.0]).expand(30, 3), atol=1e-5)


def test_file_init_from_an_export_comes_back_in_place(tmp_path):
    """A mesh written as `threedistill export` writes it (placed: base pivot, a size in metres, Y-up
    or Z-up) gives Gaussians on the world-frame surface it was exported from: every mean on the
    faces of the off-centre world box, spread over its whole extent."""
    from threedistill.export.mesh import placement, save_mesh

    lo, hi = np.array([-0.05, -0.2, -0.25]), np.array([0.15, 0.2, 0.35])
    box = trimesh.creation.box(bounds=np.stack([lo, hi]))
    box.visual.vertex_colors = np.tile(np.array([[0, 0, 255, 255]], np.uint8), (len(box.vertices), 1))
    for fmt, origin, size in (("glb", "base", 1.7), ("ply", "center", None), ("obj", "world", None)):
        path = save_mesh(box, tmp_path / f"box.{fmt}", world_to_file=placement(np.asarray(box.vertices), fmt, "auto", origin, size))
        rep = _rep(f"representation.gaussians.init=file:{path}", n=400)
        m = rep.means.detach().double().numpy()
        assert np.all(m > lo - 1e-5) and np.all(m < hi + 1e-5), fmt
        on_face = np.minimum(np.abs(m - lo), np.abs(m - hi)).min(axis=1)
        assert on_face.max() < 1e-5, fmt  # on the surface, not merely inside the box
        assert np.allclose(m.min(0), lo, atol=0.03) and np.allclose(m.max(0), hi, atol=0.03), fmt
        if fmt != "obj":  # OBJ colors need the .mtl texture path, not tested here
            assert rep.colors[:, 2].min() > 0.9 and rep.colors[:, :2].max() < 0.1, fmt


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
# Densification and pruning
# ----------------------------------------------------------------------------------------------
def _six_gaussians(*overrides):
    """0: small, high gradient (clone); 1: large, high gradient (split); 2: transparent (prune);
    3: huge (prune, even with a high gradient); 4: small, low gradient (kept); 5: large, never
    visible (kept)."""
    rep = _rep("representation.gaussians.densify_grad_threshold=0.01",
               "representation.gaussians.densify_scale_threshold=0.05",  # x radius 1
               "representation.gaussians.prune_opacity=0.01", "representation.gaussians.prune_scale=0.5",
               *overrides, n=6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        rep.means.copy_(torch.randn(6, 3, generator=g) * 0.2)
        rep.log_scales.copy_(torch.log(torch.tensor([0.02, 0.2, 0.02, 0.8, 0.02, 0.2]))[:, None]
                             + torch.tensor([0.0, 0.3, -0.2]))
        rep.quats.copy_(torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1))
        rep.opacity_logits.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.005, 0.5, 0.5, 0.5])))
        rep.color_logits.copy_(torch.randn(6, 3, generator=g))
        rep.grad2d_sum.copy_(torch.tensor([0.05, 0.09, 0.5, 0.5, 0.001, 0.0]))
        rep.grad2d_count.copy_(torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0, 0.0]))
    return rep


def _adam_with_state(rep):
    opt = torch.optim.Adam(rep.param_groups(load_config().optim), lr=1e-3)
    for g in opt.param_groups:
        g["lr"] = g["lr_fixed"]
    out = rep.render(_cams(res=16, batch=1), generator=torch.Generator().manual_seed(0))
    (out.rgb * torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    for p in rep.parameters():  # every Gaussian gets a distinct, nonzero gradient
        p.grad = p.grad + torch.arange(1, p.numel() + 1, dtype=p.dtype).reshape(p.shape) * 1e-3
    opt.step()
    return opt


def test_densify_clones_splits_and_prunes_as_specified():
    rep = _six_gaussians()
    opt = _adam_with_state(rep)
    old = {k: p.detach().clone() for k, p in rep._parameters_by_name().items()}
    old_state = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in rep._parameters_by_name().items()}
    ids = [id(p) for p in rep.parameters()]
    stats = rep.strategy.densify_and_prune(rep._parameters_by_name(), opt, rep.densify_state,
                                           torch.Generator().manual_seed(7))
    assert stats == {"cloned": 1, "split": 1, "pruned": 2, "total": 6 - 2 - 1 + 1 + 2}
    assert [id(p) for p in rep.parameters()] == ids  # the optimizer's groups still hold them
    # order: kept (0, 4, 5), then the clone of 0, then the two children of 1
    new = rep._parameters_by_name()
    for k, p in new.items():
        assert p.shape[0] == 6
        assert torch.equal(p[:3], old[k][[0, 4, 5]]), k
        assert torch.equal(p[3], old[k][0]), k
        if k not in ("means", "scales"):
            assert torch.equal(p[4], old[k][1]) and torch.equal(p[5], old[k][1]), k
    assert torch.allclose(new["scales"][4:], (old["scales"][1] - math.log(1.6)).expand(2, 3))
    # children drawn from the parent's Gaussian: mu + R diag(s) z, z from the generator
    z = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(7))[:, 0]
    w, x, y, zq = torch.nn.functional.normalize(old["quats"][1], dim=0)
    R = torch.tensor([[1 - 2 * (y * y + zq * zq), 2 * (x * y - w * zq), 2 * (x * zq + w * y)],
                      [2 * (x * y + w * zq), 1 - 2 * (x * x + zq * zq), 2 * (y * zq - w * x)],
                      [2 * (x * zq - w * y), 2 * (y * zq + w * x), 1 - 2 * (x * x + y * y)]])
    expected = old["means"][1] + (z * old["scales"][1].exp()) @ R.T
    assert torch.allclose(new["means"][4:], expected, atol=1e-6)
    # Adam moments follow their Gaussians; new ones start at zero; the step count is kept
    for k, p in new.items():
        st = opt.state[p]
        for s in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[s][:3], old_state[k][s][[0, 4, 5]]), (k, s)
            assert not st[s][3:].any(), (k, s)
        assert torch.equal(st["step"], old_state[k]["step"])
    assert rep.grad2d_sum.shape == (6,) and not rep.grad2d_sum.any() and not rep.grad2d_count.any()
    # the optimizer and the renderer work on the new count
    out = rep.render(_cams(res=16, batch=1), generator=torch.Generator().manual_seed(0))
    out.rgb.sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in rep.parameters())


def test_densify_respects_max_gaussians_highest_gradient_first():
    rep = _six_gaussians("representation.gaussians.max_gaussians=5")
    opt = _adam_with_state(rep)
    stats = rep.strategy.densify_and_prune(rep._parameters_by_name(), opt, rep.densify_state,
                                           torch.Generator().manual_seed(7))
    # 4 survive pruning: budget 1, given to the split candidate (gradient 0.03 > 0.025)
    assert stats == {"cloned": 0, "split": 1, "pruned": 2, "total": 5}
    rep = _six_gaussians("representation.gaussians.max_gaussians=3")
    stats = rep.strategy.densify_and_prune(rep._parameters_by_name(), _adam_with_state(rep), rep.densify_state,
                                         torch.Generator().manual_seed(7))
    assert stats == {"cloned": 0, "split": 0, "pruned": 2, "total": 4}  # never prunes to fit


def test_opacity_reset_clamps_and_zeroes_moments():
    rep = _six_gaussians()
    opt = _adam_with_state(rep)
    before = rep.opacities.detach().clone()
    rep.strategy.reset_opacity(rep._parameters_by_name(), opt)
    assert torch.allclose(rep.opacities, before.clamp(max=0.02), atol=1e-7)
    assert not opt.state[rep.opacity_logits]["exp_avg"].any()
    assert opt.state[rep.means]["exp_avg"].any()


def test_after_backward_accumulates_ndc_gradient_of_visible_gaussians():
    rep = _rep("representation.gaussians.init=shape", n=50)
    with torch.no_grad():  # some invisible: off to the side, or too transparent to draw
        rep.means[:4] += 50.0
        rep.opacity_logits[4:6] = -8.0
    cams = _cams(res=16, batch=2)
    weights = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # the reference gradient from a separate render of a copy (autograd.grad would also fire retain_grad)
    ref = copy.deepcopy(rep).render(cams, generator=torch.Generator().manual_seed(0))
    (g2d,) = torch.autograd.grad((ref.rgb * weights).sum(), ref.extras["means2d"])
    out = rep.render(cams, generator=torch.Generator().manual_seed(0))
    (out.rgb * weights).sum().backward()
    rep.after_backward(out, 0)
    visible = out.extras["radii"] > 0
    assert visible.any() and not visible.all()
    # independent: per camera, |(gx W/2 B, gy H/2 B)| summed over the cameras that see it
    expected = torch.zeros(50)
    count = torch.zeros(50)
    for b in range(2):
        for i in range(50):
            if visible[b, i]:
                expected[i] += math.hypot(float(g2d[b, i, 0]) * 8 * 2, float(g2d[b, i, 1]) * 8 * 2)
                count[i] += 1
    assert torch.allclose(rep.grad2d_sum, expected, rtol=1e-5, atol=1e-9)
    assert torch.equal(rep.grad2d_count, count)


def test_update_follows_the_schedule():
    rep = _rep("representation.gaussians.densify_from=2", "representation.gaussians.densify_every=2",
               "representation.gaussians.densify_until=6", "representation.gaussians.opacity_reset_every=4",
               "representation.gaussians.densify_grad_threshold=0", "representation.gaussians.max_gaussians=10000",
               "representation.gaussians.prune_opacity=1e-4", "representation.gaussians.prune_scale=10", n=20)
    opt = _adam_with_state(rep)
    counts = []
    for step in range(10):  # update(step) runs after step+1 steps are done
        rep.grad2d_sum.fill_(1.0)
        rep.grad2d_count.fill_(1.0)
        rep.update(step, opt)
        counts.append(rep.num_gaussians)
    # densify after steps 4 and 6 (from=2 is exclusive), each doubling; none after until=6
    assert counts == [20, 20, 20, 40, 40, 80, 80, 80, 80, 80]
    assert float(rep.opacities.detach().max()) <= 2e-4 * (1 + 1e-4)  # reset after step 4 (not after 8: past until)
    off = _rep("representation.gaussians.densify_every=0", n=20)
    off.grad2d_sum.fill_(1.0)
    off.grad2d_count.fill_(1.0)
    off.update(199, _adam_with_state(off))
    assert off.num_gaussians == 20


def test_densify_strategy_is_built_from_the_group_and_its_state_is_checkpointed():
    from threedistill.representations.densify import DensifyStrategy

    rep = _rep("run.steps=300", "run.seed=5", "representation.gaussians.radius=2",
               "representation.gaussians.densify_scale_threshold=0.02", "representation.gaussians.prune_scale=0.3", n=20)
    assert isinstance(rep.strategy, DensifyStrategy)
    s = rep.strategy
    assert (s.stop, s.seed, s.clone_scale, s.prune_scale) == (150, 5, 0.04, 0.6)  # until null: half the steps
    # the state is the module's buffers, under the checkpoint names older runs used
    assert {"grad2d_sum", "grad2d_count"} <= set(rep.state_dict())
    state = rep.densify_state
    state.grad2d_sum += 1.0
    state.reset(7, "cpu")
    assert rep.grad2d_sum.shape == (7,) and rep.state_dict()["grad2d_count"].shape == (7,)


def test_densified_run_resumes_exactly_through_the_cli(tmp_path, tiny_sd_path):
    from safetensors.torch import load_file

    from threedistill.cli import main

    def gen(name, steps):
        return main(["generate", "a red cube", "--out", str(tmp_path), f"prior.name={tiny_sd_path}", f"run.name={name}",
                     "representation.name=gaussians", "representation.gaussians.num_points=200",
                     "representation.gaussians.init=shape", "representation.gaussians.densify_from=0",
                     "representation.gaussians.densify_every=2", "representation.gaussians.densify_until=6",
                     "representation.gaussians.densify_grad_threshold=1e-9",
                     "representation.gaussians.max_gaussians=260", "representation.gaussians.opacity_reset_every=4",
                     f"run.steps={steps}", "run.resolution=16", "run.progress=false", "run.preview_every=100",
                     "run.checkpoint_every=3", "export.formats=[]", "export.turntable=false"])

    assert gen("full", 6) == 0
    assert gen("part", 3) == 0
    assert main(["generate", "--resume", str(tmp_path / "part"), "run.steps=6"]) == 0
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000006.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step_000006.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    counts = [json.loads(l)["num_gaussians"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert counts[0] == 200 and counts[1] > 200 and counts[-1] <= 260  # grew at step 2, capped
    assert (tmp_path / "full" / "splat.ply").is_file()
    assert len(read_splat_ply(tmp_path / "full" / "splat.ply")["x"]) == counts[-1]


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


# ----------------------------------------------------------------------------------------------
# Position learning-rate decay (3DGS's exponential decay)
# ----------------------------------------------------------------------------------------------
def test_exponential_decay_matches_its_closed_form():
    from threedistill.groups import exponential_decay

    # 1e-2 -> 1e-4 over 100 steps: one decade per 50 steps, constant after the end
    for step, expected in ((0, 1e-2), (25, 10 ** -2.5), (50, 1e-3), (100, 1e-4), (150, 1e-4)):
        assert math.isclose(exponential_decay(1e-2, 1e-4, step, 100), expected, rel_tol=1e-12)
    assert exponential_decay(1e-2, 1e-4, 5, 0) == pytest.approx(1e-4)


def test_position_lr_decays_in_the_loop_and_only_the_means(tmp_path):
    from threedistill.distill import Distiller

    cfg = load_config(None, ["prior.name=shapes", "representation.name=gaussians", "run.prompt=a red cube",
                             f"run.out_dir={tmp_path}", "run.name=r", "representation.gaussians.num_points=50",
                             "representation.gaussians.lr_means=1e-3", "representation.gaussians.lr_means_final=1e-5",
                             "representation.gaussians.lr_means_decay_steps=40", "run.steps=10"])
    d = Distiller(cfg)
    d.build()
    lrs = {}
    for step in (0, 10, 20, 40, 60):
        d.set_learning_rates(step)
        lrs[step] = {g["name"]: g["lr"] for g in d.optimizer.param_groups}
    # 1e-3 * (1e-2)^(step/40), independent of run.steps (10), held after step 40
    for step, expected in ((0, 1e-3), (10, 1e-3 * 10 ** -0.5), (20, 1e-4), (40, 1e-5), (60, 1e-5)):
        assert lrs[step]["means"] == pytest.approx(expected, rel=1e-9)
        assert lrs[step]["scales"] == 5e-3 and lrs[step]["colors"] == 1e-2  # the others keep their fixed rates
    # off by default: constant
    d2 = Distiller(load_config(None, ["prior.name=shapes", "representation.name=gaussians", "run.prompt=a red cube",
                                      f"run.out_dir={tmp_path}", "run.name=r2", "representation.gaussians.num_points=50"]))
    d2.build()
    d2.set_learning_rates(700)
    assert {g["name"]: g["lr"] for g in d2.optimizer.param_groups}["means"] == 1e-3


@pytest.mark.parametrize("bad", ["representation.gaussians.lr_means_final=0",
                                 "representation.gaussians.lr_means_final=-1",
                                 "representation.gaussians.lr_means_decay_steps=-5"])
def test_bad_position_lr_decay_is_a_config_error(bad):
    with pytest.raises(UserError, match=bad.split("=")[0].split(".")[-1]):
        load_config(None, ["representation.name=gaussians", bad])
