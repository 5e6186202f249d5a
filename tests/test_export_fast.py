"""The cheaper export paths against independent references: the coarse-to-fine density grid
against the dense grid (same mesh), the vectorized UV rasterizer against a per-texel loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threedistill.export import mesh as M
from tests.test_export import Spheres


def _dense_and_sparse(rep, resolution, block=M.COARSE_BLOCK):
    dense = M.extract_mesh(rep, resolution=resolution, coarse_block=0, min_component_ratio=0.0)
    sparse = M.extract_mesh(rep, resolution=resolution, coarse_block=block, min_component_ratio=0.0)
    return dense, sparse


def _assert_same_mesh(a, b):
    assert a.faces.shape == b.faces.shape
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-6)
    np.testing.assert_array_equal(a.visual.vertex_colors, b.visual.vertex_colors)


def test_sparse_grid_gives_the_dense_mesh_on_analytic_spheres():
    # Two spheres, one touching the bounds (capped faces), one small (about 3 blocks across).
    rep = Spheres(spheres=(((0.2, -0.1, 0.15), 0.4), ((-0.7, 0.6, -0.75), 0.3), ((0.6, 0.6, 0.6), 0.12)))
    dense, sparse = _dense_and_sparse(rep, 48)
    _assert_same_mesh(dense, sparse)


def test_sparse_grid_evaluates_only_near_the_surface():
    rep = Spheres()
    calls = []
    density = rep.density
    rep.density = lambda p: (calls.append(len(p)), density(p))[1]
    R = 64
    grid = M._sparse_density_grid(rep, R, 1.0, 2**16, torch.device("cpu"), 25.0)
    assert sum(calls) < 0.5 * R ** 3
    # Every evaluated point is the dense grid's value; skipped ones are on the right side of iso.
    xs = torch.linspace(-1, 1, R)
    dense = density(torch.stack(torch.meshgrid(xs, xs, xs, indexing="ij"), -1).reshape(-1, 3)).reshape(R, R, R).numpy()
    done = np.isfinite(grid) & (grid < np.finfo(np.float32).max)
    np.testing.assert_allclose(grid[done], dense[done], rtol=1e-5, atol=1e-4)  # batch-size rounding
    assert (dense[np.isnan(grid)] < 25.0).all()
    assert (dense[grid == np.finfo(np.float32).max] > 25.0).all()


def test_sparse_grid_gives_the_dense_mesh_on_a_lumpy_nerf():
    from threedistill.config import load_config
    from threedistill.representations import RepresentationContext, build_representation

    cfg = load_config(overrides=["representation.nerf.n_levels=6", "representation.nerf.log2_hashmap_size=12",
                                 "representation.nerf.hidden_dim=16"])
    torch.manual_seed(0)
    rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    with torch.no_grad():  # a lumpy field, as after training, rather than the initial blob
        rep.encoding.embeddings.normal_(0, 0.5)
    dense, sparse = _dense_and_sparse(rep, 40)
    assert len(dense.faces) > 100
    _assert_same_mesh(dense, sparse)


def test_no_surface_falls_back_to_the_dense_grid_and_its_maximum():
    from threedistill.errors import UserError

    with pytest.raises(UserError, match=r"max density 50\)"):
        M.extract_mesh(Spheres(), resolution=48, threshold=60.0, min_component_ratio=0.0)


def _point_triangle_distance(p, a, b, c):
    """0 inside the triangle, else the distance to its nearest edge segment (None: degenerate)."""
    area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    if abs(area) <= 1e-12:
        return None
    w0 = ((c[0] - b[0]) * (p[1] - b[1]) - (c[1] - b[1]) * (p[0] - b[0])) / area
    w1 = ((a[0] - c[0]) * (p[1] - c[1]) - (a[1] - c[1]) * (p[0] - c[0])) / area
    if min(w0, w1, 1 - w0 - w1) >= -1e-7:
        return 0.0
    d = np.inf
    for s, e in ((a, b), (b, c), (c, a)):
        t = np.clip(np.dot(p - s, e - s) / max(np.dot(e - s, e - s), 1e-12), 0, 1)
        d = min(d, float(np.hypot(*(p - s - t * (e - s)))))
    return d


def _brute_force_raster(px_tri, size, reach=0.71):
    """Per texel centre: the distance to the nearest UV triangle, for texels within ``reach``."""
    out = {}
    for row in range(size):
        for col in range(size):
            p = np.array([col, row], float)
            ds = [d for d in (_point_triangle_distance(p, *t) for t in px_tri) if d is not None]
            if ds and min(ds) <= reach:
                out[row * size + col] = min(ds)
    return out


def test_rasterize_uv_matches_a_per_texel_loop():
    rng = np.random.default_rng(3)
    size = 24
    # Random triangles of mixed sizes (some thinner than a texel, some overlapping, one degenerate).
    centres = rng.uniform(0.1, 0.9, (14, 2))
    uv = (centres[:, None, :] + rng.normal(0, 0.12, (14, 3, 2)) * rng.uniform(0.05, 1.0, (14, 1, 1))).reshape(-1, 2)
    uv = uv.clip(0, 1)
    faces = np.arange(len(uv)).reshape(-1, 3)
    uv[faces[5, 2]] = uv[faces[5, 0]]  # degenerate: never rasterized
    texels, face_ids, barys = M._rasterize_uv(uv, faces, size)
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], -1)
    ref = _brute_force_raster(px[faces], size)
    assert len(ref) > 100
    assert sorted(texels.tolist()) == sorted(ref)
    assert 5 not in set(face_ids.tolist())
    for t, f, w in zip(texels, face_ids, barys):
        a, b, c = px[faces[f]]
        p = np.array([t % size, t // size], float)
        # The chosen face is a nearest one, and its barycentrics are the clamped, normalized ones.
        assert _point_triangle_distance(p, a, b, c) == pytest.approx(ref[int(t)], abs=1e-9)
        m = np.array([[a[0] - c[0], b[0] - c[0]], [a[1] - c[1], b[1] - c[1]]])
        l0, l1 = np.linalg.solve(m, p - c)
        expect = np.clip([l0, l1, 1 - l0 - l1], 0, 1)
        np.testing.assert_allclose(w, expect / expect.sum(), atol=1e-9)
        assert w.sum() == pytest.approx(1.0)


def test_sparse_grid_finds_a_floater_and_a_thin_sheet():
    # A floater 4.4 cells across (block 4 missed it) and a slab 2.5 cells thick off the grid planes.
    class Sheet(Spheres):
        def density(self, points):
            slab = 50.0 * torch.sigmoid((0.04 - (points[:, 2] - 0.013).abs()) * 200.0)
            inside = (points[:, :2].abs() < 0.5).all(-1).float()
            return torch.maximum(super().density(points), slab * inside)

    rep = Sheet(spheres=(((0.2, -0.1, 0.15), 0.2), ((-0.7, 0.7, -0.7), 0.07)))
    dense, sparse = _dense_and_sparse(rep, 64)
    assert len(dense.split(only_watertight=False)) >= 2
    _assert_same_mesh(dense, sparse)


def test_turntable_renderer_reuses_the_mesh_tensors_without_going_stale(tmp_path):
    from threedistill.cameras import orbit_cameras
    from threedistill.export.check import load_exported_mesh, mesh_frame_renderer, render_exported_mesh

    textured = M.bake_texture(Spheres(), M.extract_mesh(Spheres(), resolution=24), texture_size=64)
    path = M.save_mesh(textured, tmp_path / "m.glb")
    cams = orbit_cameras(3, 20, elevation=15.0)
    render = mesh_frame_renderer(path, 0.1)
    frames = [render(cams[i]) for i in range(3)]
    for i in (2, 0):  # each frame as a freshly read mesh renders it, whatever was rendered before
        white = torch.ones(1, 3, 20, 20)
        fresh = render_exported_mesh(load_exported_mesh(path), cams[i], white, 0.1)["rgb"]
        torch.testing.assert_close(frames[i], fresh, rtol=0, atol=0)
    assert not torch.equal(frames[0], frames[2])


class Shell(Spheres):
    """A hollow ball: density ``50 * sigmoid(40 * min(R_OUT - r, r - R_IN))``, so the level 25 is
    the sphere of radius R_OUT outside and the wall of an empty pocket of radius R_IN inside."""

    R_IN, R_OUT = 0.2, 0.45

    def density(self, points):
        r = points.norm(dim=-1)
        return 50.0 * torch.sigmoid(40.0 * torch.minimum(self.R_OUT - r, r - self.R_IN))


def test_the_inner_wall_of_a_hollow_density_is_not_exported():
    mesh = M.extract_mesh(Shell(), resolution=48, min_component_ratio=0.0)
    # one closed surface, the outer sphere: every vertex at R_OUT, enclosing the full ball's volume
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), Shell.R_OUT, atol=0.02)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4.0 / 3.0 * np.pi * Shell.R_OUT ** 3, rel=0.03)
    # two separate solid balls both stay (positive volumes are never dropped)
    two = M.extract_mesh(Spheres(spheres=(((0.4, 0.0, 0.0), 0.3), ((-0.5, 0.0, 0.0), 0.2))), resolution=48,
                         min_component_ratio=0.0)
    assert two.volume == pytest.approx(4.0 / 3.0 * np.pi * (0.3 ** 3 + 0.2 ** 3), rel=0.03)
