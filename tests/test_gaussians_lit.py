"""Lit 3D Gaussians (``representation.gaussians.lit``): normals from the depth image and deferred
diffuse shading, checked against planes whose normals and Lambert terms are known in closed form."""

import math
import tempfile

import pytest
import torch

from threedistill.cameras import make_cameras
from threedistill.config import load_config, load_run_config_file, to_yaml
from threedistill.errors import UserError
from threedistill.inputs import resolve_inputs
from threedistill.representations import RepresentationContext, build_representation
from threedistill.representations.gaussian_raster import rasterize
from threedistill.representations.gaussians import depth_normals
from threedistill.runs import RunFolder


def _camera(res=32, elevation=20.0, azimuth=30.0):
    return make_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([1.5]), torch.tensor([40.0]), res)


def _frame(normal: torch.Tensor):
    """Two unit vectors spanning the plane orthogonal to ``normal``."""
    helper = torch.tensor([0.0, 0.0, 1.0]) if abs(float(normal[2])) < 0.9 else torch.tensor([1.0, 0.0, 0.0])
    e1 = torch.nn.functional.normalize(torch.cross(normal, helper, dim=0), dim=0)
    return e1, torch.cross(normal, e1, dim=0)


def _tilted_normal(cam, theta_deg: float) -> torch.Tensor:
    """The unit vector towards the camera turned by ``theta`` about an axis across the view."""
    d = torch.nn.functional.normalize(cam.positions[0], dim=0)
    u, _ = _frame(d)
    t = math.radians(theta_deg)
    return math.cos(t) * d + math.sin(t) * u


@pytest.mark.parametrize("theta", [0.0, 35.0, 70.0])
def test_depth_normals_of_a_plane_are_its_normal_up_to_the_silhouette(theta):
    cam = _camera()
    n_true = _tilted_normal(cam, theta)
    o, d = cam.rays()  # [1,H,W,3]
    c = 0.05  # the plane n . x = c
    t = (c - (o * n_true).sum(-1, keepdim=True)) / (d * n_true).sum(-1, keepdim=True)
    points = o + d * t
    # half of the image is background: its "points" sit at the camera (t = 0), as a pixel with no
    # alpha does in the lit render
    background = torch.zeros_like(t, dtype=torch.bool)
    background[:, :, : cam.width // 2] = True
    points = torch.where(background, o, points)
    n = depth_normals(points.permute(0, 3, 1, 2), d.permute(0, 3, 1, 2))  # [1,3,H,W]
    on_plane = ~background[..., 0]
    cos = (n.permute(0, 2, 3, 1)[on_plane] * n_true).sum(-1)
    # every plane pixel, the silhouette column included, has the plane's normal (facing the camera)
    assert cos.min() > 1 - 1e-4
    assert on_plane[0, :, cam.width // 2].all()  # the column next to the background was checked


def _plate(cam, theta_deg: float, *overrides, color=(0.9, 0.6, 0.2)):
    """A dense square plate of small opaque Gaussians through the origin, its normal turned by
    ``theta`` from the camera direction."""
    n = _tilted_normal(cam, theta_deg)
    e1, e2 = _frame(n)
    s = torch.arange(-0.3, 0.3001, 0.006)
    g1, g2 = torch.meshgrid(s, s, indexing="ij")
    means = g1.reshape(-1, 1) * e1 + g2.reshape(-1, 1) * e2
    N = means.shape[0]
    cfg = load_config(None, ["representation.name=gaussians", f"representation.gaussians.num_points={N}",
                             "representation.gaussians.init=sphere", "run.prompt=a red cube",
                             "representation.gaussians.random_background_prob=0", *overrides])
    cfg = resolve_inputs(cfg, RunFolder(tempfile.mkdtemp()))
    rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    with torch.no_grad():
        rep.means.copy_(means)
        rep.log_scales.fill_(math.log(0.005))
        rep.opacity_logits.fill_(6.0)
        rep.color_logits.copy_(torch.logit(torch.tensor(color)).expand(N, 3))
    return rep, n


@pytest.mark.parametrize("theta", [0.0, 40.0, 65.0])
def test_lit_plate_shows_the_lambert_term_of_its_tilt(theta):
    # 64 px: 3DGS's depth is the weighted depth of the Gaussians' means, which flattens a steep
    # plate's depth normals by about 1 degree at 64 px (2 at 32)
    cam = _camera(res=64, elevation=0.0, azimuth=0.0)
    ambient = 0.2
    rep, n = _plate(cam, theta, "representation.gaussians.lit=true", f"representation.gaussians.ambient_light={ambient}")
    with torch.no_grad():
        out = rep.render(cam, training=False)  # evaluation: diffuse, the light at the camera
    H = cam.height
    win = (slice(H // 2 - 2, H // 2 + 2),) * 2
    assert out.alpha[0, 0][win].min() > 0.99
    # independent: albedo x (ambient + (1 - ambient) cos) per pixel, cos between the plate's normal
    # and the direction from where the pixel's ray meets the plane through the origin to the camera
    o, d = cam.rays()
    p = o - d * (o * n).sum(-1, keepdim=True) / (d * n).sum(-1, keepdim=True)
    cos = (torch.nn.functional.normalize(cam.positions[0] - p, dim=-1) * n).sum(-1)[0]  # [H,W]
    expected = torch.tensor([0.9, 0.6, 0.2])[:, None, None] * (ambient + (1 - ambient) * cos[win])
    assert (out.rgb[0][(slice(None), *win)] - expected).abs().max() < 0.02
    assert rep.evaluation_ambient() == ambient


def test_textureless_and_albedo_modes_and_the_unlit_default():
    cam = _camera(res=64, elevation=0.0, azimuth=0.0)
    theta = 50.0
    rep, n = _plate(cam, theta, "representation.gaussians.lit=true", "representation.gaussians.ambient_only_steps=0",
                    "representation.gaussians.albedo_prob=0", "representation.gaussians.textureless_prob=1",
                    "representation.gaussians.ambient_light=0.1")
    with torch.no_grad():
        out = rep.render(cam, step=5, generator=torch.Generator().manual_seed(0), training=True)
    H = cam.height
    c = out.rgb[0, :, H // 2, H // 2]
    lambert = 0.1 + 0.9 * math.cos(math.radians(theta))
    assert torch.allclose(c, torch.full((3,), lambert), atol=0.02)  # white albedo, lit
    # before ambient_only_steps, or unlit: the colors as the rasterizer composites them
    for overrides, step in ((("representation.gaussians.lit=true", "representation.gaussians.ambient_only_steps=100"), 5),
                            ((), 500)):
        rep, _ = _plate(cam, theta, "representation.gaussians.background=black", *overrides)
        with torch.no_grad():
            out = rep.render(cam, step=step, generator=torch.Generator().manual_seed(0), training=True)
            ref = rasterize(rep.means, rep.quats, rep.scales, rep.opacities, rep.colors, cam, torch.zeros(1, 3))
        assert torch.allclose(out.rgb, ref.rgb.clamp(0, 1), atol=1e-6)
    assert rep.evaluation_ambient() is None


def test_lit_shading_moves_the_geometry():
    """Under the light, the gradient of brightness reaches the positions: making the plate
    brighter turns it towards the light (the Lambert term grows as the tilt shrinks)."""
    cam = _camera(elevation=0.0, azimuth=0.0)
    rep, n = _plate(cam, 40.0, "representation.gaussians.lit=true", "representation.gaussians.ambient_light=0.0")
    out = rep.render(cam, training=False)
    H = cam.height
    out.rgb[0, :, H // 2 - 4: H // 2 + 4, H // 2 - 4: H // 2 + 4].sum().backward()
    g = rep.means.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # the ascent direction, projected on the plate's normal, tilts the plate towards the camera:
    # points on the far side of the tilt axis move towards the camera, those on the near side away
    d = torch.nn.functional.normalize(cam.positions[0], dim=0)
    step = 1e-3 * g / g.abs().max()
    with torch.no_grad():
        before = out.rgb[0, :, H // 2 - 4: H // 2 + 4, H // 2 - 4: H // 2 + 4].mean()
        rep.means.add_(step)
        after = rep.render(cam, training=False).rgb[0, :, H // 2 - 4: H // 2 + 4, H // 2 - 4: H // 2 + 4].mean()
    assert after > before
    assert float((n * d).sum()) < 1.0  # tilted to start with


def test_shading_probabilities_must_leave_room_and_old_runs_stay_unlit(tmp_path):
    with pytest.raises(UserError, match="albedo_prob.*textureless_prob"):
        load_config(None, ["representation.name=gaussians", "representation.gaussians.albedo_prob=0.8",
                           "representation.gaussians.textureless_prob=0.5"])
    text = to_yaml(load_config(None, ["run.prompt=a red cube", "representation.name=gaussians",
                                      "representation.gaussians.lit=true"]))
    old = tmp_path / "config.yaml"
    old.write_text("\n".join(line for line in text.splitlines() if line.strip() != "lit: true") + "\n")
    assert load_run_config_file(old).representation.gaussians.lit is False
