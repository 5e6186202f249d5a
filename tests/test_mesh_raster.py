"""Pure-torch mesh rasterizer: hand-computed coverage and barycentrics, depth order, near-plane
culling, the binned rasterizer against a dense every-triangle-x-every-pixel reference, finite
differences of interpolated attributes and depth, silhouette antialiasing gradients, and a small
mesh fit. CPU, small meshes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from threedistill.cameras import make_cameras
from threedistill.representations.mesh_raster import (
    NEAR_PLANE,
    antialias,
    interpolate,
    rasterize_triangles,
    render_mesh,
)

H, W = 20, 24  # non-square on purpose


def float64(cams):
    return replace(cams, c2w=cams.c2w.double(), fovy=cams.fovy.double())


def front_camera(res: int = 8):
    """Camera on +X at distance 2 looking at the origin with focal length exactly res pixels:
    world (0, y, z) lands on pixel (u, v) = (res/2 + res y / 2, res/2 - res z / 2)."""
    cams = float64(make_cameras([0.0], [0.0], [2.0], [53.0], res))
    return replace(cams, fovy=torch.tensor([2 * math.atan(0.5)], dtype=torch.float64))


def pixel_to_world(u: float, v: float, res: int = 8):
    return [0.0, (u - res / 2) * 2 / res, (res / 2 - v) * 2 / res]


def icosphere(subdivisions: int, dtype=torch.float32):
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(m.vertices, dtype=dtype), torch.tensor(m.faces, dtype=torch.int64)


def test_coverage_and_barycentrics_of_a_triangle_facing_the_camera():
    # Screen vertices (1, 1), (7.2, 1), (1, 7.2) at depth 2: pixel centre (j + .5, i + .5) is inside
    # iff j >= 1, i >= 1 and i + j <= 7 (no centre lies on an edge).
    verts = torch.tensor([pixel_to_world(1, 1), pixel_to_world(7.2, 1), pixel_to_world(1, 7.2)], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize_triangles(verts, faces, front_camera())
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = (i >= 1) & (j >= 1) & (i + j <= 7)
    assert torch.equal(frags.tri_id[0] >= 0, expected) and int(expected.sum()) == 21
    assert torch.equal(frags.tri_id[0][expected], torch.zeros(21, dtype=torch.int64))
    # Constant depth: perspective-correct = screen barycentrics, l1 = (x - 1)/6.2, l2 = (y - 1)/6.2.
    x, y = j.double() + 0.5, i.double() + 0.5
    l1, l2 = (x - 1) / 6.2, (y - 1) / 6.2
    bary = torch.stack([1 - l1 - l2, l1, l2], -1)
    torch.testing.assert_close(frags.bary[0][expected], bary[expected], atol=1e-9, rtol=0)
    torch.testing.assert_close(frags.depth[0][expected], torch.full((21,), 2.0, dtype=torch.float64))
    assert frags.bary[0][~expected].eq(0).all() and frags.depth[0][~expected].eq(0).all()
    # Winding does not matter (no back-face culling).
    flipped = rasterize_triangles(verts, torch.tensor([[0, 2, 1]]), front_camera())
    assert torch.equal(flipped.tri_id, frags.tri_id)
    torch.testing.assert_close(flipped.bary[..., [0, 2, 1]], frags.bary)


def test_perspective_correct_barycentrics_of_a_tilted_triangle():
    cams = float64(make_cameras([20.0], [30.0], [1.8], [55.0], 16, 18))
    verts = torch.tensor([[0.5, -0.4, -0.3], [-0.6, 0.5, -0.2], [0.1, 0.0, 0.5]], dtype=torch.float64)
    frags = rasterize_triangles(verts, torch.tensor([[0, 1, 2]]), cams)

    # Independently: the OpenGL pinhole of cameras.py, screen barycentrics from a 2x2 solve,
    # then the 1/z perspective correction.
    w2c = torch.linalg.inv(cams.c2w[0])
    q = verts @ w2c[:3, :3].T + w2c[:3, 3]
    zc = -q[:, 2]
    f = float(cams.focal[0])
    s = torch.stack([18 / 2 + f * q[:, 0] / zc, 16 / 2 - f * q[:, 1] / zc], -1)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(18), indexing="ij")
    p = torch.stack([j.double() + 0.5, i.double() + 0.5], -1).reshape(-1, 2)
    A = torch.stack([s[1] - s[0], s[2] - s[0]], -1)
    l12 = torch.linalg.solve(A, (p - s[0]).T).T
    lam = torch.cat([1 - l12.sum(-1, keepdim=True), l12], -1)
    inside = (lam >= 0).all(-1).reshape(16, 18)
    assert 20 < int(inside.sum()) < 16 * 18 - 20
    assert torch.equal(frags.tri_id[0] >= 0, inside)
    w = lam / zc
    bary = (w / w.sum(-1, keepdim=True)).reshape(16, 18, 3)
    depth = (1 / w.sum(-1)).reshape(16, 18)
    torch.testing.assert_close(frags.bary[0][inside], bary[inside], atol=1e-10, rtol=0)
    torch.testing.assert_close(frags.depth[0][inside], depth[inside], atol=1e-10, rtol=0)
    # The barycentric point lies on the pixel's ray, at camera-space depth `depth`.
    point = frags.bary[0][inside] @ verts
    o, d = (t[0][inside] for t in cams.rays())
    torch.testing.assert_close(torch.cross(point - o, d, dim=-1), torch.zeros_like(point), atol=1e-10, rtol=0)
    forward = -cams.c2w[0, :3, 2]
    # (1e-6: make_cameras builds c2w in float32, so its rotation is orthonormal to ~1e-7 only)
    torch.testing.assert_close((point - o) @ forward, frags.depth[0][inside], atol=1e-6, rtol=0)


def test_nearest_triangle_wins_and_near_plane_culls():
    near = [pixel_to_world(0, 0), pixel_to_world(6.4, 0), pixel_to_world(0, 6.4)]
    far = [pixel_to_world(2, 2), pixel_to_world(8, 2), pixel_to_world(2, 8)]
    near = [[0.5, 1.5 / 2 * y, 1.5 / 2 * z] for _, y, z in near]  # depth 1.5, same screen positions
    far = [[-0.5, 2.5 / 2 * y, 2.5 / 2 * z] for _, y, z in far]  # depth 2.5, same screen positions
    cam = front_camera()
    for order in ([0, 1], [1, 0]):
        verts = torch.tensor([near, far], dtype=torch.float64)[order].reshape(6, 3)
        frags = rasterize_triangles(verts, torch.tensor([[0, 1, 2], [3, 4, 5]]), cam)
        ids = frags.tri_id[0]
        near_id, far_id = order.index(0), order.index(1)
        assert ids[2, 2] == near_id and ids[3, 2] == near_id  # both cover it; the nearer wins
        assert ids[6, 6] == -1 and ids[0, 0] == near_id and ids[7, 2] == far_id  # only one covers these
        assert frags.depth[0, 2, 2] == pytest.approx(1.5) and frags.depth[0, 7, 2] == pytest.approx(2.5)
    # A triangle with one vertex behind the near plane is culled (no clipping).
    behind = torch.tensor([near[0], near[1], [2.0 - NEAR_PLANE / 2, 0.0, 0.0]], dtype=torch.float64)
    assert rasterize_triangles(behind, torch.tensor([[0, 1, 2]]), cam).tri_id.eq(-1).all()


def dense_reference(verts, faces, cams, near=NEAR_PLANE):
    """Every triangle against every pixel centre: ids, perspective-correct barycentrics, depth."""
    B, Hc, Wc = len(cams), cams.height, cams.width
    i, j = torch.meshgrid(torch.arange(Hc), torch.arange(Wc), indexing="ij")
    p = torch.stack([j.double() + 0.5, i.double() + 0.5], -1).reshape(-1, 2)  # [P,2]
    ids, barys, depths = [], [], []
    for b in range(B):
        w2c, K = cams.w2c_opencv()[b].double(), cams.intrinsics()[b].double()
        c = verts.double() @ w2c[:3, :3].T + w2c[:3, 3]
        s = (c @ K.T)[:, :2] / c[:, 2:]
        z_best = torch.full((p.shape[0],), math.inf, dtype=torch.float64)
        id_best = torch.full((p.shape[0],), -1)
        bary_best = torch.zeros(p.shape[0], 3, dtype=torch.float64)
        for f, (a, b1, c1) in enumerate(faces.tolist()):
            zt = c[[a, b1, c1], 2]
            st = s[[a, b1, c1]]
            A = torch.stack([st[1] - st[0], st[2] - st[0]], -1)
            if (zt <= near).any() or torch.det(A) == 0:
                continue
            l12 = torch.linalg.solve(A, (p - st[0]).T).T
            lam = torch.cat([1 - l12.sum(-1, keepdim=True), l12], -1)
            w = lam / zt
            z = 1 / w.sum(-1)
            better = (lam >= 0).all(-1) & (z < z_best)  # strict: ties keep the lower index
            z_best = torch.where(better, z, z_best)
            id_best = torch.where(better, torch.full_like(id_best, f), id_best)
            bary_best = torch.where(better[:, None], w * z[:, None], bary_best)
        ids.append(id_best.reshape(Hc, Wc))
        barys.append(bary_best.reshape(Hc, Wc, 3))
        depths.append(torch.where(id_best >= 0, z_best, torch.zeros_like(z_best)).reshape(Hc, Wc))
    return torch.stack(ids), torch.stack(barys), torch.stack(depths)


def test_binned_rasterizer_matches_dense_reference():
    cams = make_cameras([10.0, 35.0], [20.0, -110.0], [1.6, 2.1], [50.0, 62.0], H, W)
    g = torch.Generator().manual_seed(0)
    n = 40
    centres = (torch.rand(n, 1, 3, generator=g) - 0.5) * 1.2
    verts = (centres + 0.35 * torch.randn(n, 3, 3, generator=g)).reshape(-1, 3)  # interpenetrating soup
    verts[0:3] = cams.positions[0] * 1.2 + torch.randn(3, 3, generator=g) * 0.3  # behind camera 0
    verts[3:5] = cams.positions[1] * 0.9 + torch.randn(2, 3, generator=g) * 0.1  # through camera 1's near plane
    verts[5] = cams.positions[1] * 1.1
    verts[8] = 0.5 * (verts[6] + verts[7])  # degenerate (zero area)
    faces = torch.arange(3 * n).reshape(n, 3)
    faces[10] = faces[10].flip(0)  # both windings
    frags = rasterize_triangles(verts, faces, cams)
    ids, bary, depth = dense_reference(verts, faces, cams)
    assert torch.equal(frags.tri_id, ids)
    assert 0.3 < (ids >= 0).float().mean() < 0.95 and len(ids.unique()) > 20
    assert not (ids[0] == 0).any() and not (ids[1] == 1).any() and not (ids == 2).any()
    torch.testing.assert_close(frags.bary.double(), bary, atol=2e-5, rtol=0)
    torch.testing.assert_close(frags.depth.double(), depth, atol=2e-5, rtol=0)
    # Per-camera attributes and shared ones agree.
    attrs = torch.randn(3 * n, 4, generator=g)
    torch.testing.assert_close(interpolate(attrs, frags), interpolate(attrs.expand(2, -1, -1), frags))


def test_interpolated_attributes_and_depth_match_finite_differences():
    verts, faces = icosphere(1, torch.float64)
    verts = verts * torch.tensor([0.6, 0.5, 0.45], dtype=torch.float64)
    cams = float64(make_cameras([15.0, -30.0], [10.0, 140.0], [1.7, 2.0], [50.0, 45.0], 12, 14))
    attrs = torch.rand(verts.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = rasterize_triangles(verts, faces, cams)

    def f(v, a):
        frags = rasterize_triangles(v, faces, cams)
        assert torch.equal(frags.tri_id, base.tri_id)  # the step never changes visibility here
        return interpolate(a, frags), frags.depth

    assert torch.autograd.gradcheck(f, (verts.clone().requires_grad_(), attrs.clone().requires_grad_()),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


def test_antialias_gives_boundary_vertices_gradients():
    cam = front_camera(32)  # 32 px, focal 32: world (0, y, z) -> (16 + 16 y, 16 - 16 z)
    verts = torch.tensor([pixel_to_world(5.3, 6.1, 32), pixel_to_world(27.6, 9.4, 32), pixel_to_world(12.2, 26.7, 32)],
                         dtype=torch.float64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    colors = torch.tensor([[0.9, 0.3, 0.1]], dtype=torch.float64).expand(3, 3)
    bg = torch.tensor([0.1, 0.2, 0.8], dtype=torch.float64)
    weights = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def losses(out):
        return [out["alpha"].sum(), (out["rgb"] * weights).sum()]

    plain = render_mesh(verts, faces, cam, colors, bg, antialiased=False)
    assert plain["alpha"].grad_fn is None  # coverage alone carries no gradient
    (g_plain,) = torch.autograd.grad(losses(plain)[1], verts)
    assert g_plain.abs().max() < 1e-9  # constant color: the barycentric gradients cancel

    smooth = render_mesh(verts, faces, cam, colors, bg)
    # Away from the outline the image is unchanged; along it, values lie between fg and bg.
    torch.testing.assert_close(smooth["rgb"][:, :, 15:17, 12:14], plain["rgb"][:, :, 15:17, 12:14])
    assert ((smooth["alpha"] > 0) & (smooth["alpha"] < 1)).sum() > 20
    # Total coverage ~ the triangle's screen area (the hard mask counts pixel centres only).
    s = torch.tensor([[5.3, 6.1], [27.6, 9.4], [12.2, 26.7]])
    area = 0.5 * abs(float((s[1, 0] - s[0, 0]) * (s[2, 1] - s[0, 1]) - (s[1, 1] - s[0, 1]) * (s[2, 0] - s[0, 0])))
    assert float(smooth["alpha"].detach().sum()) == pytest.approx(area, rel=0.03)
    g_alpha, g_rgb = (torch.autograd.grad(l, verts, retain_graph=True)[0] for l in losses(smooth))
    assert (g_alpha.norm(dim=-1) > 0).all() and (g_rgb.norm(dim=-1) > 0).all()
    # Growing the triangle about its centroid by (1 + e) grows the area by (1 + e)^2:
    # d alpha.sum / d e = sum_v grad_v . (v - centroid) ~ 2 area.
    radial = verts.detach() - verts.detach().mean(0)
    assert float((g_alpha * radial).sum()) == pytest.approx(2 * area, rel=0.1)
    # Moving it towards +y (image right) moves its coverage: sum alpha x ~ area * centroid_x, so
    # d/du (sum alpha x) = area for a shift of u pixels (world y = u / 16).
    ramp = torch.arange(32, dtype=torch.float64) + 0.5
    (g_ramp,) = torch.autograd.grad((smooth["alpha"] * ramp).sum(), verts)
    assert float(g_ramp[:, 1].sum() / 16) == pytest.approx(area, rel=0.1)
    assert float(g_ramp[:, 2].sum() / 16) == pytest.approx(0.0, abs=0.1 * area)


def test_antialias_leaves_interior_edges_of_a_closed_mesh_alone():
    verts, faces = icosphere(2)
    verts = verts * 0.5
    cams = make_cameras([10.0, 60.0], [20.0, -100.0], [2.0, 2.2], [50.0, 50.0], H, W)
    colors = (verts + 1) / 2
    frags = rasterize_triangles(verts, faces, cams)
    img = interpolate(colors, frags)
    out = antialias(img, frags, verts, faces, cams, background=torch.ones(3))
    tri = torch.nn.functional.pad(frags.tri_id, (1, 1, 1, 1), value=-1)
    interior = (tri[:, 1:-1, 1:-1] >= 0) & (tri[:, :-2, 1:-1] >= 0) & (tri[:, 2:, 1:-1] >= 0) \
        & (tri[:, 1:-1, :-2] >= 0) & (tri[:, 1:-1, 2:] >= 0)
    assert interior.sum() > 100
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[interior], img.permute(0, 2, 3, 1)[interior])
    assert not torch.equal(out, torch.where(frags.tri_id[:, None] >= 0, img, torch.ones(1, 3, 1, 1)))


def test_render_mesh_outputs():
    verts, faces = icosphere(2)
    verts = verts * 0.5
    cams = make_cameras([10.0, 60.0], [20.0, -100.0], [2.0, 2.2], [50.0, 50.0], H, W)
    out = render_mesh(verts, faces, cams, (verts + 1) / 2, torch.tensor([1.0, 1.0, 1.0]))
    assert out["rgb"].shape == (2, 3, H, W) and out["alpha"].shape == (2, 1, H, W)
    assert out["depth"].shape == (2, 1, H, W) and out["normal"].shape == (2, 3, H, W)
    assert out["tri_id"].shape == (2, H, W)
    covered = out["tri_id"] >= 0
    # Sphere of radius ~0.5: depths between distance - 0.5 and distance; normals unit, facing the camera.
    d = out["depth"][:, 0]
    assert (d[covered] > 1.45).all() and (d[covered] < 2.2).all() and d[~covered].eq(0).all()
    n = out["normal"].permute(0, 2, 3, 1)
    torch.testing.assert_close(n[covered].norm(dim=-1), torch.ones(int(covered.sum())))
    o, ray = cams.rays()
    assert ((n * ray).sum(-1)[covered] < 0.1).all()  # facing the camera (faces, not exact sphere normals)
    assert out["alpha"].min() >= 0 and out["alpha"].max() <= 1 + 1e-6


def test_fitting_a_sphere_to_a_target_render_converges():
    verts0, faces = icosphere(2)
    cams = make_cameras([15.0, 10.0, 50.0], [0.0, 120.0, -120.0], [2.0, 2.0, 2.0], [45.0, 45.0, 45.0], 32)
    bg = torch.tensor([1.0, 1.0, 1.0])
    target_colors = 0.5 + 0.4 * verts0
    with torch.no_grad():
        target = render_mesh(verts0 * 0.45 + torch.tensor([0.12, -0.1, 0.06]), faces, cams, target_colors, bg)
    shift = torch.zeros(3, requires_grad=True)
    log_scale = torch.tensor(math.log(0.3), requires_grad=True)
    colors = torch.full_like(verts0, 0.5).requires_grad_()
    opt = torch.optim.Adam([shift, log_scale, colors], lr=0.02)
    history = []
    for _ in range(50):
        out = render_mesh(verts0 * log_scale.exp() + shift, faces, cams, colors, bg)
        loss = ((out["rgb"] - target["rgb"]) ** 2).mean() + ((out["alpha"] - target["alpha"]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 5
    assert float(log_scale.detach().exp()) == pytest.approx(0.45, abs=0.04)
    torch.testing.assert_close(shift.detach(), torch.tensor([0.12, -0.1, 0.06]), atol=0.04, rtol=0)
