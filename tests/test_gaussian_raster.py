"""Pure-torch Gaussian splatting rasterizer: the fast path against the dense reference, the
projection against the pinhole model of cameras.py (and gsplat's torch reference when installed),
analytic images, depth order, finite differences. CPU, small scenes; one CUDA test against
gsplat's rasterizer."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from threedistill.cameras import make_cameras
from threedistill.representations.gaussian_raster import (
    ALPHA_MAX,
    ALPHA_MIN,
    EPS2D,
    project_gaussians,
    quat_to_rotmat,
    rasterize,
    rasterize_dense,
)

H, W = 20, 24  # non-square on purpose


def two_cameras():
    return make_cameras([10.0, 35.0], [20.0, -110.0], [1.6, 2.1], [50.0, 62.0], H, W)


def float64(cams):
    return replace(cams, c2w=cams.c2w.double(), fovy=cams.fovy.double())


def random_scene(cams, n: int = 40, seed: int = 0):
    """Random Gaussians with the awkward cases planted: behind camera 0, at camera 1's centre,
    a tiny one, a huge one, a needle, an invisible one (opacity < 1/255), an overlapping cluster."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(-4.5, -1.5, generator=g))
    opacities = 0.05 + 0.94 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g) * 1.2 - 0.1  # any real values are composited as given
    pos = cams.positions
    means[0] = pos[0] * 1.3  # behind camera 0 (in front of camera 1)
    means[1] = pos[1] + 0.005 * torch.randn(3, generator=g)  # at camera 1's centre: z < near plane
    scales[2] = 1e-4  # tiny: only the 0.3 px^2 low-pass filter is left
    scales[3] = torch.tensor([0.9, 0.7, 0.8])  # covers the whole image
    scales[4] = torch.tensor([0.6, 0.004, 0.004])  # needle
    opacities[5] = 0.003  # below 1/255: never drawn
    means[6:12] = means[6] + 0.05 * torch.randn(6, 3, generator=g)  # overlapping cluster
    opacities[6:12] = 0.9
    return [means, quats, scales, opacities, colors]


def grads(out, params, upstream):
    return torch.autograd.grad([out.rgb, out.alpha, out.depth], params, upstream)


@pytest.mark.parametrize("strip_width", [1, 4, 5])
def test_rasterize_matches_dense_reference_with_gradients(strip_width):
    cams = two_cameras()
    params = [t.requires_grad_() for t in random_scene(cams)]
    background = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]], requires_grad=True)  # [B,3]
    fast = rasterize(*params, cams, background, strip_width=strip_width)
    ref = rasterize_dense(*params, cams, background)

    assert fast.rgb.shape == (2, 3, H, W) and fast.alpha.shape == (2, 1, H, W) and fast.depth.shape == (2, 1, H, W)
    for name in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.radii, ref.radii)
    assert fast.radii.dtype == torch.int32 and fast.radii.shape == (2, 40)
    # The scene is not trivial: partly covered, with both tiny and large footprints.
    assert 0.2 < fast.alpha.mean() < 0.98 and ref.alpha.min() < 0.5
    assert fast.radii[0, 0] == 0 and fast.radii[1, 1] == 0  # behind camera 0 / inside camera 1
    assert fast.radii[1, 0] > 0 and fast.radii[:, 5].eq(0).all()  # visible to camera 1 / too faint

    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(fast.rgb.shape, generator=g), torch.randn(fast.alpha.shape, generator=g),
                torch.randn(fast.depth.shape, generator=g)]
    inputs = params + [background]
    g_fast, g_ref = grads(fast, inputs, upstream), grads(ref, inputs, upstream)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors", "background"), g_fast, g_ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=name)
    assert g_fast[4][5].abs().max() == 0  # the invisible Gaussian's color gets no gradient


def test_batch_equals_cameras_one_at_a_time_and_background_shapes():
    cams = two_cameras()
    params = random_scene(cams, seed=3)
    both = rasterize(*params, cams, torch.tensor([0.1, 0.2, 0.3]))
    for b in range(2):
        one = rasterize(*params, cams[b], torch.tensor([[0.1, 0.2, 0.3]]))
        for name in ("rgb", "alpha", "depth", "radii", "means2d"):
            torch.testing.assert_close(getattr(one, name)[0], getattr(both, name)[b], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="background"):
        rasterize(*params, cams, torch.zeros(3, 3))


def test_projection_follows_the_camera_convention():
    """means2d / depth from the OpenGL c2w of cameras.py, and cov2d = J Sigma J^T + 0.3 I with J the
    autograd Jacobian of that pinhole map (Gaussians well inside the view, so no clamping)."""
    cams = float64(two_cameras())
    g = torch.Generator().manual_seed(5)
    means = (torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5) * 0.6
    quats = torch.randn(6, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(6, 3, generator=g, dtype=torch.float64) * 0.1 + 0.01
    proj = project_gaussians(means, quats, scales, cams)
    R = quat_to_rotmat(quats)
    sigma = R @ torch.diag_embed(scales**2) @ R.transpose(-1, -2)
    for b in range(2):
        w2c_gl = torch.linalg.inv(cams.c2w[b])
        f = float(cams.focal[b])

        def pinhole(p):  # world point -> pixel (x right, y down), as in the cameras.py docstring
            q = w2c_gl[:3, :3] @ p + w2c_gl[:3, 3]
            return torch.stack([W / 2 + f * q[0] / -q[2], H / 2 - f * q[1] / -q[2]])

        for n in range(6):
            torch.testing.assert_close(proj.means2d[b, n], pinhole(means[n]))
            q = w2c_gl[:3, :3] @ means[n] + w2c_gl[:3, 3]
            torch.testing.assert_close(proj.depth[b, n], -q[2])
            J = torch.autograd.functional.jacobian(pinhole, means[n])
            expected = J @ sigma[n] @ J.T + EPS2D * torch.eye(2, dtype=torch.float64)
            torch.testing.assert_close(proj.cov2d[b, n], expected)
            torch.testing.assert_close(proj.conic[b, n], torch.linalg.inv(expected))
    assert proj.valid.all()


def test_projection_matches_gsplat_torch_reference():
    # private helpers: the [test] extra pins gsplat==1.5.3, so their absence is a failure, not a skip
    from gsplat.cuda import _torch_impl as torch_impl

    cams = two_cameras()
    means, quats, scales, _, _ = random_scene(cams, seed=7)
    means[7] = 0.5 * cams.positions[0] + 3.0 * cams.c2w[0, :3, 0]  # far right of camera 0's view: J is clamped
    proj = project_gaussians(means, quats, scales, cams)
    covars, _ = torch_impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, means2d, depths, conics, _ = torch_impl._fully_fused_projection(
        means, covars, cams.w2c_opencv(), cams.intrinsics(), W, H)
    v = proj.valid
    torch.testing.assert_close(proj.means2d[v], means2d[v], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj.depth, depths)
    ours = torch.stack([proj.conic[..., 0, 0], proj.conic[..., 0, 1], proj.conic[..., 1, 1]], dim=-1)
    torch.testing.assert_close(ours[v], conics[v], rtol=1e-4, atol=1e-6)
    assert not v[0, 0] and not v[1, 1] and v.sum() == 2 * 40 - 2
    assert proj.means2d[0, 7, 0] > 3 * W  # far outside the image, yet projected as gsplat does


@pytest.mark.parametrize("rasterizer", [rasterize, rasterize_dense])
def test_single_isotropic_gaussian_matches_analytic_image(rasterizer):
    distance, fovy, scale, opacity = 2.0, 50.0, 0.12, 0.8
    height, width = 21, 24  # principal point (12, 10.5): the mean sits between pixel rows
    cams = make_cameras([20.0], [30.0], [distance], [fovy], height, width)
    focal = (height / 2) / math.tan(math.radians(fovy) / 2)
    var_px = (focal * scale / distance) ** 2 + 0.3  # pinhole at the optical axis, plus the low-pass filter
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    expected = opacity * torch.exp(-0.5 * ((xs - width / 2) ** 2 + (ys - height / 2) ** 2) / var_px)
    expected = torch.where(expected >= 1 / 255, expected.clamp(max=0.999), torch.zeros_like(expected))

    color, bg = torch.tensor([0.9, 0.3, -0.2]), torch.tensor([0.1, 0.2, 1.0])
    out = rasterizer(torch.zeros(1, 3), torch.randn(1, 4), torch.full((1, 3), scale), torch.tensor([opacity]),
                     color[None], cams, bg)
    torch.testing.assert_close(out.alpha[0, 0], expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.rgb[0], color[:, None, None] * expected + bg[:, None, None] * (1 - expected),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(out.depth[0, 0], distance * expected, atol=5e-6, rtol=0)
    assert (expected == 0).sum() > 100 and expected.max() > 0.7  # the 1/255 cut and the peak are both in view
    k2 = 2 * math.log(255 * opacity)
    assert out.radii.item() == math.ceil(math.sqrt(k2 * var_px))


@pytest.mark.parametrize("flip", [False, True])
def test_nearer_gaussian_wins_whatever_the_input_order(flip):
    cams = make_cameras([15.0], [40.0], [2.0], [50.0], 17, 17)  # both means project onto pixel (8, 8)'s centre
    direction = cams.positions[0] / cams.positions[0].norm()
    means = torch.stack([torch.zeros(3), 0.4 * direction])  # the second is nearer the camera
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    args = [means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.25), torch.tensor([0.9995, 0.9995]), colors]
    if flip:
        args = [a.flip(0) for a in args]
    out = rasterize(*args, cams, torch.zeros(3))
    centre = out.rgb[0, :, 8, 8]
    torch.testing.assert_close(centre, torch.tensor([0.999 * 0.001, 0.999, 0.0]))  # green (near) hides red (far)
    torch.testing.assert_close(out.depth[0, 0, 8, 8], torch.tensor(1.6 * 0.999 + 2.0 * 0.999 * 0.001))
    torch.testing.assert_close(out.rgb, rasterize_dense(*args, cams, torch.zeros(3)).rgb, atol=1e-5, rtol=0)


def test_gradcheck_float64_tiny_scene():
    """Finite differences against autograd for every input, in float64 (3 Gaussians, 9x8 pixels)."""
    cams = float64(make_cameras([25.0], [-30.0], [1.8], [55.0], 9, 8))
    g = torch.Generator().manual_seed(11)
    means = (torch.rand(3, 3, generator=g, dtype=torch.float64) - 0.5) * 0.4
    quats = torch.randn(3, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor([[0.12, 0.05, 0.08], [0.06, 0.15, 0.05], [0.1, 0.1, 0.2]], dtype=torch.float64)
    opacities = torch.tensor([0.6, 0.45, 0.7], dtype=torch.float64)
    colors = torch.rand(3, 3, generator=g, dtype=torch.float64)
    bg = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)
    weights = [torch.randn(1, c, 9, 8, generator=g, dtype=torch.float64) for c in (3, 1, 1)]

    def loss(*params):
        out = rasterize(*params, cams, bg)
        return (out.rgb * weights[0]).sum() + (out.alpha * weights[1]).sum() + (out.depth * weights[2]).sum()

    inputs = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_view_space_gradient_and_culling():
    cams = two_cameras()
    params = [t.requires_grad_() for t in random_scene(cams, seed=2)]
    out = rasterize(*params, cams, torch.ones(3))
    out.means2d.retain_grad()
    (out.rgb.square().sum() + out.depth.sum()).backward()
    grad2d = out.means2d.grad
    assert grad2d.shape == (2, 40, 2)
    assert grad2d[0, 0].abs().sum() == 0 and grad2d[1, 1].abs().sum() == 0  # culled: no gradient
    assert (grad2d.abs().sum(-1) > 0)[out.radii > 0].float().mean() > 0.5
    assert torch.isfinite(params[0].grad).all() and torch.isfinite(params[1].grad).all()

    # Every pixel a Gaussian can reach with alpha >= 1/255 lies within its radius.
    proj = project_gaussians(*[p.detach() for p in params[:3]], cams)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    d = torch.stack([xs, ys], -1)[None, None] - proj.means2d[:, :, None, None, :]  # [B,N,H,W,2]
    power = -0.5 * torch.einsum("bnhwi,bnij,bnhwj->bnhw", d, proj.conic, d)
    reached = (params[3].detach()[None, :, None, None] * power.exp() >= ALPHA_MIN) & proj.valid[..., None, None]
    far = d.norm(dim=-1) > out.radii[..., None, None]
    assert reached.any() and not (reached & far).any()


def test_nothing_in_view_gives_the_background_and_zero_gradients():
    cams = two_cameras()
    means = (cams.positions[0] * 1.5).expand(5, 3).clone().requires_grad_()  # behind camera 0
    params = [means, torch.randn(5, 4), torch.full((5, 3), 0.05), torch.full((5,), 0.5), torch.rand(5, 3)]
    out = rasterize(*params, cams[0], torch.tensor([0.2, 0.4, 0.6]))
    torch.testing.assert_close(out.rgb, torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, H, W))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0 and out.radii.abs().max() == 0
    out.rgb.sum().backward()
    assert means.grad.abs().max() == 0


def test_alpha_is_clamped_below_one():
    cams = make_cameras([0.0], [0.0], [2.0], [50.0], 9, 9)  # the mean is on the centre pixel's centre
    out = rasterize(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.5),
                    torch.tensor([1.0]), torch.ones(1, 3), cams, torch.zeros(3))
    assert out.alpha.max() == pytest.approx(ALPHA_MAX)


# ----------------------------------------------------------------------------------------------
# CUDA: against gsplat's rasterizer
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rasterize_matches_gsplat_on_cuda():
    """The pure-torch rasterizer (on the CPU) against ``gsplat.rasterization`` (CUDA, the back end
    gaussians.py uses there): images, z-sum depth, radii and the gradients of a random-weighted loss.

    Opacities <= 0.6 and few layers keep every pixel's final T above 1e-3, so gsplat's early stop
    (before T would reach 1e-4) never triggers and the two agree up to float rounding, except
    where a pair sits at the 1/255 alpha cut-off and float differences flip it (at most 1/255)."""
    gsplat = pytest.importorskip("gsplat")
    height, width = 40, 48
    cams = make_cameras([10.0, 35.0], [20.0, -110.0], [2.0, 2.4], [50.0, 62.0], height, width)
    g = torch.Generator().manual_seed(0)
    n = 300
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(-3.6, -2.0, generator=g))
    opacities = 0.05 + 0.55 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    means[0] = cams.positions[0] * 1.3  # behind camera 0 (in front of camera 1)
    opacities[1] = 0.003  # below 1/255: never drawn
    params = [means, quats, scales, opacities, colors]
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])
    weights = [torch.randn(2, c, height, width, generator=g) for c in (3, 1, 1)]

    def loss_of(rgb, alpha, depth, ws):
        return (rgb * ws[0]).sum() + (alpha * ws[1]).sum() + (depth * ws[2]).sum()

    ours_in = [p.clone().requires_grad_() for p in params]
    ours = rasterize(*ours_in, cams, bg)
    g_ours = torch.autograd.grad(loss_of(ours.rgb, ours.alpha, ours.depth, weights), ours_in)

    dev = torch.device("cuda")
    gs_in = [p.to(dev).requires_grad_() for p in params]
    cams_d = cams.to(dev)
    colors_gs, alphas_gs, meta = gsplat.rasterization(
        *gs_in, viewmats=cams_d.w2c_opencv().float(), Ks=cams_d.intrinsics().float(), width=width,
        height=height, backgrounds=bg.to(dev), render_mode="RGB+ED", packed=False)
    colors_gs, alpha_gs = colors_gs.permute(0, 3, 1, 2), alphas_gs.permute(0, 3, 1, 2)
    rgb_gs, depth_gs = colors_gs[:, :3], colors_gs[:, 3:4] * alpha_gs  # expected depth -> z-sum
    g_gs = torch.autograd.grad(loss_of(rgb_gs, alpha_gs, depth_gs, [w.to(dev) for w in weights]), gs_in)

    # A scene with empty, partly and densely covered pixels, none near saturation.
    assert ours.alpha.max() < 0.999 and (ours.alpha > 0.9).any() and (ours.alpha == 0).any()
    with torch.no_grad():
        proj = project_gaussians(*params[:3], cams)
    z_max = float(proj.depth[ours.radii > 0].max())  # depth = sum z alpha T <= z_max
    for name, a, b, scale in (("rgb", ours.rgb, rgb_gs, 1.0), ("alpha", ours.alpha, alpha_gs, 1.0),
                              ("depth", ours.depth, depth_gs, z_max)):
        diff = (a - b.detach().cpu()).abs() / scale
        assert diff.max() < 1.0 / 255 + 1e-3, name  # at most a flipped pair at the cut-off
        assert (diff > 2e-3).float().mean() < 2e-3, name  # and only in a few pixels

    # Radii: gsplat 1.5 gives the per-axis half sizes ceil(k sqrt(cov2d_xx)), ceil(k sqrt(cov2d_yy))
    # of the alpha >= 1/255 ellipse (k = sqrt(2 ln(255 o))), ours is the enclosing circle's
    # ceil(k sqrt(lambda_max(cov2d))) >= both.
    radii_gs = meta["radii"].cpu().long()
    if radii_gs.dim() == 2:  # gsplat < 1.5: one radius per Gaussian
        radii_gs = radii_gs[..., None].expand(-1, -1, 2)
    assert radii_gs.shape == (2, n, 2)
    radii = ours.radii.long()
    with torch.no_grad():
        k = torch.sqrt(2 * torch.log(255 * opacities.double()).clamp_min(0))  # [N]
        axis = torch.ceil(k[:, None] * torch.diagonal(proj.cov2d.double(), dim1=-2, dim2=-1).sqrt()).long()
    shown = radii_gs.amax(-1) > 0
    assert shown.sum() > 0.9 * 2 * n and not shown[0, 0] and not shown[:, 1].any()
    assert (radii[shown] > 0).all()  # gsplat keeps a subset of ours
    assert ((radii_gs - axis).abs()[shown] <= 1).all()
    assert (radii >= radii_gs.amax(-1) - 1).all()
    # Ours keeps some that gsplat culls only where the tighter per-axis box misses the image.
    culled = (radii > 0) & ~shown
    mx, my = proj.means2d.unbind(-1)
    rx, ry = (axis - 1).unbind(-1)
    assert not ((mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height))[culled].any()

    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors"), g_ours, g_gs):
        b = b.cpu()
        assert b.norm() > 0, name
        assert (a - b).norm() <= 1e-2 * b.norm(), (name, float((a - b).norm() / b.norm()))
