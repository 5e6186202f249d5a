"""NeRF representation: hash encoding, volume rendering, shading, regularizers (CPU, small configs).

The CUDA test at the end (occupancy-grid back end) is skipped without a CUDA device.
"""

from __future__ import annotations

import inspect
import math

import nerfacc
import pytest
import torch
import torch.nn.functional as F

from threedistill.cameras import make_cameras, step_generator
from threedistill.config import load_config
from threedistill.representations import RenderOutput, RepresentationContext, build_representation
from threedistill.representations.encodings import HASH_PRIMES, FrequencyEncoding, HashGridEncoding, level_resolutions
from threedistill.representations.nerf import NeRF, ray_box_intersect

SMALL = [
    "representation.nerf.n_levels=8",
    "representation.nerf.log2_hashmap_size=14",
    "representation.nerf.max_resolution=128",
    "representation.nerf.hidden_dim=32",
    "representation.nerf.num_samples=32",
]


# Tests that replace the field with a closed-form one (``model._field = ...``) take the normals
# from that field's autograd gradient; finite-difference normals read ``_raw_field`` instead.
ANALYTIC = "representation.nerf.normal_type=analytic"


def small_nerf(*overrides: str, device: str = "cpu", seed: int = 0) -> NeRF:
    cfg = load_config(overrides=[*SMALL, *overrides])
    torch.manual_seed(seed)
    model = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device(device))
    assert isinstance(model, NeRF)
    return model


def cameras(res: int = 16, elevation=(15.0,), azimuth=(30.0,), distance=1.75, fovy=55.0):
    n = len(elevation)
    return make_cameras(torch.tensor(elevation), torch.tensor(azimuth), torch.full((n,), distance),
                        torch.full((n,), fovy), res)


# ----------------------------------------------------------------------------------------------
# Rendering contract
# ----------------------------------------------------------------------------------------------
def test_render_shapes_ranges_and_gradients():
    model = small_nerf("representation.nerf.background=mlp", "representation.nerf.ambient_only_steps=0",
                       "representation.nerf.albedo_prob=0",
                       "representation.nerf.textureless_prob=0", "representation.nerf.random_background_prob=0",
                       "representation.nerf.lambda_opaque=1.0")
    cams = cameras(res=16, elevation=(10.0, 30.0), azimuth=(0.0, 120.0))
    out = model.render(cams, step=10, generator=step_generator(0, 10), training=True)
    assert isinstance(out, RenderOutput)
    assert out.rgb.shape == (2, 3, 16, 16)
    assert out.alpha.shape == (2, 1, 16, 16)
    assert out.depth.shape == (2, 1, 16, 16)
    assert out.normal is not None and out.normal.shape == (2, 3, 16, 16)
    for img in (out.rgb, out.alpha, out.depth, out.normal):
        assert torch.isfinite(img).all()
        assert img.min() >= 0.0 and img.max() <= 1.0

    regs = model.regularizers(out, step=10)
    assert set(regs) == {"orient", "sparsity", "opaque"}
    loss = out.rgb.mean() + sum(regs.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # Every part of the model is reached: the field, its MLP and the background.
    assert model.encoding.embeddings.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.mlp.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.background_mlp.parameters())


def test_eval_render_chunked_matches_single_pass():
    model = small_nerf()
    model.skip_grid_resolution = 0  # compare chunking alone (skipping is tested below)
    cams = cameras(res=12)
    ref = model.render(cams, training=False)  # autograd on: one pass
    model.chunk_points = 32 * 7  # 7 rays per chunk
    with torch.no_grad():
        chunked = model.render(cams, training=False)
    for a, b in ((ref.rgb, chunked.rgb), (ref.alpha, chunked.alpha), (ref.depth, chunked.depth),
                 (ref.normal, chunked.normal)):
        torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=0)


def test_determinism():
    model = small_nerf("representation.nerf.ambient_only_steps=0")
    cams = cameras(res=16)

    def render(seed):
        with torch.no_grad():
            return model.render(cams, step=5, generator=step_generator(seed, 5), training=True)

    a, b, c = render(0), render(0), render(1)
    for x, y in ((a.rgb, b.rgb), (a.alpha, b.alpha), (a.depth, b.depth)):
        assert torch.equal(x, y)
    assert (a.normal is None) == (b.normal is None)
    if a.normal is not None:
        assert torch.equal(a.normal, b.normal)
    assert not torch.equal(a.alpha, c.alpha)  # different jitter
    # Evaluation renders do not depend on the generator at all.
    e1 = model.render(cams, training=False, generator=step_generator(0, 0))
    e2 = model.render(cams, training=False, generator=step_generator(7, 3))
    assert torch.equal(e1.rgb, e2.rgb)


# ----------------------------------------------------------------------------------------------
# Hash encoding
# ----------------------------------------------------------------------------------------------
def test_level_resolutions_geometric():
    res = level_resolutions(5, 16, 256)
    assert res == [16, 32, 64, 128, 256]
    assert level_resolutions(1, 16, 512) == [16]


def test_hash_encoding_dense_levels_match_grid_sample():
    enc = HashGridEncoding(n_levels=3, n_features_per_level=2, log2_hashmap_size=15, base_resolution=4,
                           max_resolution=16)
    assert all(enc.level_is_dense)  # 5^3, 9^3, 17^3 <= 2^15
    with torch.no_grad():
        enc.embeddings.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 3, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    x[2] = torch.tensor([0.25, 0.5, 0.75])  # exactly on vertices of every level
    out = enc(x).view(-1, 3, 2)
    for level in range(3):
        grid = enc.dense_grid(level).permute(3, 0, 1, 2)[None]  # [1, F, z, y, x]
        ref = F.grid_sample(grid, (2 * x - 1).view(1, 1, 1, -1, 3), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[:, level], ref.view(2, -1).T, atol=1e-5, rtol=1e-5)


def test_hash_encoding_hashed_level_matches_reference():
    enc = HashGridEncoding(n_levels=2, n_features_per_level=2, log2_hashmap_size=10, base_resolution=8,
                           max_resolution=37)
    assert enc.level_is_dense == [True, False]  # 9^3 <= 1024 < 38^3
    with torch.no_grad():
        enc.embeddings.normal_()
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    out = enc(x).view(-1, 2, 2)[:, 1]

    # Independent per-point reference: loop over the 8 corners, explicit hash.
    res, T = enc.resolutions[1], 2 ** 10
    table = enc.embeddings[enc.level_offsets[1]:enc.level_offsets[1] + T]
    ref = torch.zeros(300, 2)
    for n in range(300):
        p = x[n] * res
        base = [min(int(math.floor(float(v))), res - 1) for v in p]
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    i, j, k = base[0] + dx, base[1] + dy, base[2] + dz
                    h = ((i * HASH_PRIMES[0]) ^ (j * HASH_PRIMES[1]) ^ (k * HASH_PRIMES[2])) % T
                    w = 1.0
                    for axis, bit in ((0, dx), (1, dy), (2, dz)):
                        f = float(p[axis]) - base[axis]
                        w *= f if bit else 1.0 - f
                    ref[n] += w * table[h].detach()
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-4)


def test_hash_encoding_init_and_input_gradient():
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                           max_resolution=32)
    assert enc.embeddings.abs().max() <= 1e-4
    assert len(list(enc.parameters())) == 1
    enc = enc.double()
    with torch.no_grad():
        enc.embeddings.normal_()
    # Away from cell faces the encoding is smooth in x: compare autograd with finite differences.
    x = (torch.rand(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.8 + 0.1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: enc(p), (x,), eps=1e-7, atol=1e-5)


def test_frequency_encoding_shape():
    enc = FrequencyEncoding(3, n_frequencies=4)
    assert enc(torch.zeros(5, 3)).shape == (5, enc.output_dim) == (5, 27)


# ----------------------------------------------------------------------------------------------
# Volume rendering against closed forms
# ----------------------------------------------------------------------------------------------
def chord_length(o: torch.Tensor, d: torch.Tensor, radius: float, n: int = 400_000) -> torch.Tensor:
    """Brute force: the fraction of a fine 1D grid along each ray that lies inside the cube."""
    t_max = 10.0
    t = (torch.arange(n, dtype=torch.float64) + 0.5) * (t_max / n)
    out = []
    for oi, di in zip(o.double(), d.double()):
        p = oi[None] + di[None] * t[:, None]
        inside = (p.abs() <= radius).all(dim=-1)
        out.append(inside.double().sum() * (t_max / n))
    return torch.stack(out)


def test_ray_box_intersect_hits_and_misses():
    o = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 2.0, 0.0]])
    d = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    near, far, hit = ray_box_intersect(o, d, 1.0)
    assert hit.tolist() == [True, False, True, False]
    torch.testing.assert_close(near[[0, 2]], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(far[[0, 2]], torch.tensor([4.0, 1.0]))


@pytest.mark.parametrize("training", [False, True])
def test_constant_density_box_matches_closed_form(monkeypatch, training):
    sigma0, color = 1.5, torch.tensor([0.2, 0.6, 0.9])
    model = small_nerf(ANALYTIC, "representation.nerf.background=black", "representation.nerf.lambda_orient=0",
                       "representation.nerf.num_samples=64")

    def constant_field(x):  # sigma0 everywhere (the renderer clips rays to the cube)
        sigma = torch.full_like(x[:, 0], sigma0) + 0.0 * x[:, 0]
        return sigma, color.expand(x.shape[0], 3)

    monkeypatch.setattr(model, "_field", constant_field)
    cams = cameras(res=8, elevation=(20.0,), azimuth=(40.0,), distance=2.2, fovy=60.0)
    # Training (step 0) shades with the albedo only; evaluation shading needs normals, which a
    # constant field does not have, so only alpha and depth are checked there.
    out = model.render(cams, step=0, generator=step_generator(0, 0), training=training)

    o, d = (v.reshape(-1, 3) for v in cams.rays())
    L = chord_length(o, d, 1.0).float()
    assert (L > 0).any()
    alpha_ref = 1.0 - torch.exp(-sigma0 * L)
    torch.testing.assert_close(out.alpha.reshape(-1), alpha_ref, atol=2e-4, rtol=0)
    if training:
        torch.testing.assert_close(out.rgb.permute(0, 2, 3, 1).reshape(-1, 3), color * alpha_ref[:, None],
                                   atol=2e-4, rtol=0)

    # Expected distance for a homogeneous segment [t0, t0 + L], background at `far`:
    # int t sigma e^{-sigma (t - t0)} dt = t0 (1 - e^{-sigma L}) + 1/sigma - e^{-sigma L} (L + 1/sigma).
    near, _, _ = ray_box_intersect(o, d, 1.0)
    e = torch.exp(-sigma0 * L)
    expected_t = near * (1 - e) + 1 / sigma0 - e * (L + 1 / sigma0)
    far = 2.2 + math.sqrt(3.0)
    depth_ref = (expected_t + e * far) / far
    # Midpoints: O(bin^2) quadrature error; jittered samples: below half a bin (<= 3.5 / 64) over `far`.
    tol = 5e-4 if not training else 0.5 * (2 * math.sqrt(3.0) / 64) / far
    torch.testing.assert_close(out.depth.reshape(-1), depth_ref, atol=tol, rtol=0)


def test_rays_missing_the_box_have_zero_alpha():
    model = small_nerf("representation.nerf.background=white")
    # Camera far away with a wide field of view: the image corners miss the cube.
    cams = cameras(res=16, elevation=(0.0,), azimuth=(0.0,), distance=4.0, fovy=90.0)
    out = model.render(cams, training=False)
    o, d = (v.reshape(-1, 3) for v in cams.rays())
    _, _, hit = ray_box_intersect(o, d, 1.0)
    assert (~hit).any()
    assert torch.all(out.alpha.reshape(-1)[~hit] == 0)
    assert torch.all(out.depth.reshape(-1)[~hit] == 1)
    assert torch.allclose(out.rgb.permute(0, 2, 3, 1).reshape(-1, 3)[~hit], torch.ones(3))


# ----------------------------------------------------------------------------------------------
# Initialization: the density blob and its normals
# ----------------------------------------------------------------------------------------------
def test_blob_gives_high_alpha_at_centre_and_none_at_corner():
    model = small_nerf()
    cams = cameras(res=16, elevation=(15.0,), azimuth=(0.0,), distance=1.75, fovy=55.0)
    with torch.no_grad():
        out = model.render(cams, training=False)
    alpha = out.alpha[0, 0]
    centre = alpha[7:9, 7:9]
    assert centre.min() > 0.95
    assert alpha[0, 0] < 0.01 and alpha[-1, -1] < 0.01


def test_blob_normals_point_outward():
    model = small_nerf()
    g = torch.Generator().manual_seed(3)
    dirs = F.normalize(torch.randn(200, 3, generator=g), dim=-1)
    x = dirs * 0.35  # inside the blob (radius 0.5), where its density gradient dominates
    _, _, n = model._field_and_normals(x, create_graph=False)
    cos = (n * dirs).sum(-1)
    assert cos.min() > 0.98

    # The rendered normal map at the centre pixel faces the camera.
    cams = cameras(res=16, elevation=(20.0,), azimuth=(70.0,))
    with torch.no_grad():
        out = model.render(cams, training=False)
    n_img = out.normal[0, :, 7:9, 7:9].mean(dim=(1, 2)) * 2 - 1
    to_cam = F.normalize(cams.positions[0], dim=0)
    assert F.cosine_similarity(n_img, to_cam, dim=0) > 0.95


def test_orientation_penalizes_normals_facing_away():
    """n = -grad sigma points outward: at the front of the blob n . d < 0 (no penalty); a field
    whose density grows outward (inverted normals) is penalized."""
    model = small_nerf(ANALYTIC, "representation.nerf.lambda_orient=1", "representation.nerf.lambda_sparsity=0")
    cams = cameras(res=8)
    out = model.render(cams, training=False)
    blob = model.regularizers(out, 0)["orient"]

    r0 = 0.6

    def shell_field(x):  # a hollow: density rises towards the outside (normals point inward)
        r = torch.sqrt((x * x).sum(-1) + 1e-12)
        return F.softplus(20.0 * (r - r0)), torch.full_like(x, 0.5)

    model._field = shell_field
    out_shell = model.render(cams, training=False)
    shell = model.regularizers(out_shell, 0)["orient"]
    assert blob < 0.05 * shell


# ----------------------------------------------------------------------------------------------
# Regularizers, parameter groups, export hooks, checkpoint state
# ----------------------------------------------------------------------------------------------
def test_regularizers_skip_zero_weights_and_use_schedules():
    model = small_nerf("representation.nerf.lambda_orient=[0.0,10.0,100,200]",
                       "representation.nerf.lambda_sparsity=0", "representation.nerf.lambda_opaque=0")
    cams = cameras(res=8)
    out = model.render(cams, step=0, generator=step_generator(0, 0), training=True)
    assert model.regularizers(out, 0) == {}
    out = model.render(cams, step=150, generator=step_generator(0, 150), training=True)
    regs = model.regularizers(out, 150)
    assert set(regs) == {"orient"}
    torch.testing.assert_close(regs["orient"], 5.0 * out.extras["orient"].mean())

    alpha = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    fake = RenderOutput(rgb=torch.zeros(1, 3, 1, 3), alpha=alpha, depth=torch.zeros(1, 1, 1, 3))
    m2 = small_nerf("representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=2",
                    "representation.nerf.lambda_opaque=3")
    regs = m2.regularizers(fake, 0)
    sparsity = 2 * torch.sqrt(alpha ** 2 + 0.01).mean()
    torch.testing.assert_close(regs["sparsity"], sparsity)
    assert regs["opaque"] > 0 and abs(float(regs["opaque"]) - 3 * math.log(2) / 3) < 1e-3


def test_no_normals_when_not_needed():
    model = small_nerf("representation.nerf.lambda_orient=0")
    out = model.render(cameras(res=8), step=0, generator=step_generator(0, 0), training=True)  # albedo only
    assert out.normal is None and "orient" not in out.extras
    model.render_normals = True
    out = model.render(cameras(res=8), step=0, generator=step_generator(0, 0), training=True)
    assert out.normal is not None


@pytest.mark.parametrize("background", ["white", "black", "random", "mlp"])
def test_backgrounds(background):
    model = small_nerf(f"representation.nerf.background={background}", "representation.nerf.random_background_prob=1")
    # Far camera, wide field of view: the corner pixels see only the background.
    cams = cameras(res=16, distance=4.0, fovy=90.0)
    with torch.no_grad():
        ev = model.render(cams, training=False)
        tr = model.render(cams, step=0, generator=step_generator(0, 0), training=True)
    corner_eval, corner_train = ev.rgb[0, :, 0, 0], tr.rgb[0, :, 0, 0]
    if background == "white":
        assert torch.allclose(corner_eval, torch.ones(3)) and torch.allclose(corner_train, torch.ones(3))
    elif background == "black":
        assert torch.allclose(corner_eval, torch.zeros(3)) and torch.allclose(corner_train, torch.zeros(3))
    elif background == "random":
        assert torch.allclose(corner_eval, torch.ones(3))
        # one solid color for the whole image
        assert torch.allclose(tr.rgb[0, :, 0, 0], tr.rgb[0, :, -1, -1])
        assert not torch.allclose(corner_train, torch.ones(3))
    else:
        # learned background varies with the direction; training replaced it by a solid color (p=1)
        assert not torch.allclose(ev.rgb[0, :, 0, 0], ev.rgb[0, :, -1, 0], atol=1e-4)
        assert torch.allclose(tr.rgb[0, :, 0, 0], tr.rgb[0, :, -1, -1])


def test_param_groups():
    cfg = load_config(overrides=SMALL + ["representation.nerf.background=mlp"])
    model = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    groups = model.param_groups(cfg.optim)
    assert [g["name"] for g in groups] == ["encoding", "mlp", "background"]
    assert [g["lr_scale"] for g in groups] == [1.0, cfg.optim.lr_scale_mlp, cfg.optim.lr_scale_background]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.Adam([{"params": g["params"], "lr": 0.01 * g["lr_scale"]} for g in groups])

    white = small_nerf("representation.nerf.background=white")
    assert [g["name"] for g in white.param_groups(cfg.optim)] == ["encoding", "mlp"]


def test_density_albedo_bounds_for_export():
    model = small_nerf("representation.nerf.isosurface_threshold=7.5", "representation.nerf.radius=1.5")
    model.chunk_points = 100
    pts = torch.rand(1000, 3) * 3 - 1.5
    with torch.no_grad():
        sigma, albedo = model.density(pts), model.albedo(pts)
    assert sigma.shape == (1000,) and albedo.shape == (1000, 3)
    assert (sigma >= 0).all() and (albedo >= 0).all() and (albedo <= 1).all()
    ref_sigma, ref_albedo = model._field(pts)
    torch.testing.assert_close(sigma, ref_sigma.detach(), atol=1e-5, rtol=1e-5)
    assert model.isosurface_threshold == 7.5
    assert model.bounds == 1.5
    # the blob: dense at the centre, empty at the corners
    with torch.no_grad():
        d = model.density(torch.tensor([[0.0, 0.0, 0.0], [1.4, 1.4, 1.4]]))
    assert d[0] > 5 and d[1] < 1e-3


def test_state_dict_has_estimator_buffers_and_round_trips():
    a = small_nerf(seed=0)
    b = small_nerf(seed=1)
    sd = a.state_dict()
    assert {"estimator.occs", "estimator.binaries"} <= set(sd)
    b.load_state_dict(sd)
    cams = cameras(res=8)
    with torch.no_grad():
        assert torch.equal(a.render(cams, training=False).rgb, b.render(cams, training=False).rgb)


# ----------------------------------------------------------------------------------------------
# Occupancy-grid back end: its glue checked on CPU with nerfacc's CUDA-only pieces replaced
# ----------------------------------------------------------------------------------------------
def test_occupancy_grid_glue_matches_fixed_path_on_cpu(monkeypatch):
    """``_render_occupancy_grid`` with ``estimator.sampling`` replaced by midpoint samples on the
    same bins as the fixed path and nerfacc's packed scan done per ray on CPU: same images."""
    model = small_nerf("representation.nerf.lambda_orient=1")
    S = model.num_samples
    real_sampling_signature = inspect.signature(nerfacc.OccGridEstimator.sampling)

    def fake_sampling(*args, **kwargs):
        real_sampling_signature.bind(model.estimator, *args, **kwargs)  # our call fits the real API
        rays_o, rays_d = args[:2] if len(args) >= 2 else (kwargs["rays_o"], kwargs["rays_d"])
        near, far, _ = ray_box_intersect(rays_o, rays_d, model.radius)
        edges = near[:, None] + (far - near)[:, None] * torch.linspace(0, 1, S + 1)
        n = rays_o.shape[0]
        ray_indices = torch.arange(n).repeat_interleave(S)
        return ray_indices, edges[:, :-1].reshape(-1), edges[:, 1:].reshape(-1)

    def packed_weights(t_starts, t_ends, sigmas, packed_info=None, ray_indices=None, n_rays=None,
                       prefix_trans=None):
        # every ray has exactly S consecutive samples in fake_sampling
        w, tr, a = nerfacc.render_weight_from_density(t_starts.view(-1, S), t_ends.view(-1, S), sigmas.view(-1, S))
        return w.reshape(-1), tr.reshape(-1), a.reshape(-1)

    monkeypatch.setattr(model.estimator, "sampling", fake_sampling)
    monkeypatch.setattr(nerfacc.volrend, "render_weight_from_density", packed_weights)
    cams = cameras(res=8)
    ref = model.render(cams, training=False)
    model.use_occupancy_grid = True
    out = model.render(cams, training=False)
    for a, b in ((ref.rgb, out.rgb), (ref.alpha, out.alpha), (ref.depth, out.depth), (ref.normal, out.normal)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fixed path skips normals with w < 1e-4
    torch.testing.assert_close(ref.extras["orient"], out.extras["orient"], atol=1e-3, rtol=0)


def test_occupancy_grid_update_runs_on_cpu():
    model = small_nerf()
    model.use_occupancy_grid = True
    model.update(0)  # warm-up refresh evaluates every cell (pure torch in nerfacc)
    binaries = model.estimator.binaries
    assert binaries.dtype == torch.bool and binaries.any() and not binaries.all()
    res = model.estimator.binaries.shape[-1]
    assert binaries[0, res // 2, res // 2, res // 2]  # the blob centre is occupied
    assert not binaries[0, 0, 0, 0]  # a corner is not
    model.use_occupancy_grid = False
    before = model.estimator.occs.clone()
    model.update(16)
    assert torch.equal(before, model.estimator.occs)


# ----------------------------------------------------------------------------------------------
# CUDA: the real occupancy-grid back end against the fixed-sample path
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_occupancy_grid_matches_fixed_samples():
    # A low occupancy threshold keeps the blob's faint tails in the grid, so the two back ends
    # integrate the same density (the default threshold skips them on purpose).
    model = small_nerf("representation.nerf.num_samples=512", "representation.nerf.render_step_size=0.005",
                       "representation.nerf.occupancy_threshold=1e-5", device="cuda")
    assert model.use_occupancy_grid
    cams = cameras(res=16, elevation=(10.0, 40.0), azimuth=(0.0, 150.0)).to("cuda")
    with torch.no_grad():
        grid_all = model.render(cams, training=False)  # every cell occupied before the first refresh
    model.update(0)
    with torch.no_grad():
        grid = model.render(cams, training=False)
        model.use_occupancy_grid = False
        fixed = model.render(cams, training=False)
        model.use_occupancy_grid = True
    for out in (grid_all, grid):
        assert out.rgb.shape == (2, 3, 16, 16) and out.rgb.is_cuda
        torch.testing.assert_close(out.alpha, fixed.alpha, atol=0.03, rtol=0)
        torch.testing.assert_close(out.rgb, fixed.rgb, atol=0.03, rtol=0)
        torch.testing.assert_close(out.depth, fixed.depth, atol=0.02, rtol=0)

    # Training render + backward through nerfacc.rendering, normals and the orientation loss.
    model.update(1)
    out = model.render(cams, step=2000, generator=step_generator(0, 2000), training=True)
    loss = out.rgb.mean() + sum(model.regularizers(out, 2000).values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_empty_space_skipping_matches_full_evaluation():
    """No-grad renders skip empty cells; the image must match evaluating every sample."""
    import torch
    from threedistill.cameras import orbit_cameras
    from threedistill.config import load_config
    from threedistill.representations import RepresentationContext, build_representation

    cfg = load_config(overrides=["representation.nerf.n_levels=6", "representation.nerf.log2_hashmap_size=12",
                                 "representation.nerf.num_samples=48"])
    torch.manual_seed(0)
    rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    with torch.no_grad():  # a lumpier field than the bare blob: perturb the hash table
        rep.encoding.embeddings.normal_(0, 0.5)
    cams = orbit_cameras(2, 24, elevation=20)
    with torch.no_grad():
        fast = rep.render(cams, training=False)
        grid = rep.skip_grid()
        assert 0 < grid.float().mean() < 0.5  # it does skip something, and keeps the object
        rep.skip_grid_resolution = 0
        full = rep.render(cams, training=False)
    for a, b in ((fast.rgb, full.rgb), (fast.alpha, full.alpha), (fast.depth, full.depth)):
        assert (a - b).abs().max() < 1e-3
    # The cache follows parameter updates.
    rep.skip_grid_resolution = 64
    g1 = rep.skip_grid()
    with torch.no_grad():
        rep.mlp[-1].bias[0] += 5.0  # denser everywhere
    assert rep.skip_grid().sum() > g1.sum()


# ----------------------------------------------------------------------------------------------
# Clean geometry and colour: opacity targets, the blob taper, orientation, albedo smoothness
# ----------------------------------------------------------------------------------------------
def _alpha_images(*means_per_image):
    """``[B,1,2,2]`` alpha images: each image's four pixels given."""
    return torch.tensor(means_per_image, dtype=torch.float32).view(len(means_per_image), 1, 2, 2)


def test_transmittance_loss_is_dream_fields_closed_form_with_schedules():
    # Image 0: mean alpha 0.5 (transmittance 0.5, below the target: pushed); image 1: mean alpha
    # 0.05 (transmittance 0.95, above: clipped at the target, no gradient).
    alpha = _alpha_images([0.2, 0.8, 0.5, 0.5], [0.0, 0.1, 0.1, 0.0]).requires_grad_(True)
    fake = RenderOutput(rgb=torch.zeros(2, 3, 2, 2), alpha=alpha, depth=torch.zeros(2, 1, 2, 2))
    m = small_nerf("representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=0",
                   "representation.nerf.lambda_transmittance=[0.0,4.0,0,100]",
                   "representation.nerf.transmittance_target=[0.5,0.9,0,100]")
    assert m.regularizers(fake, 0) == {}  # weight 0 at step 0
    regs = m.regularizers(fake, 50)  # weight 2, target 0.7
    assert set(regs) == {"transmittance"}
    expected = 2.0 * -(min(0.7, 0.5) + min(0.7, 0.95)) / 2
    assert abs(float(regs["transmittance"].detach()) - expected) < 1e-6
    regs["transmittance"].backward()
    # d/d alpha of 2 * -(mean(1 - alpha_0)) / 2 = +1/4 per pixel of image 0 (4 pixels); image 1: 0.
    torch.testing.assert_close(alpha.grad[0], torch.full((1, 2, 2), 0.25))
    torch.testing.assert_close(alpha.grad[1], torch.zeros(1, 2, 2))


def test_gaussians_transmittance_loss_matches_nerf_closed_form():
    cfg = load_config(overrides=["representation.name=gaussians", "representation.gaussians.num_points=16",
                                 "representation.gaussians.lambda_transmittance=3",
                                 "representation.gaussians.transmittance_target=0.6"])
    g = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    alpha = _alpha_images([0.2, 0.8, 0.5, 0.5], [0.0, 0.1, 0.1, 0.0])
    fake = RenderOutput(rgb=torch.zeros(2, 3, 2, 2), alpha=alpha, depth=torch.zeros(2, 1, 2, 2))
    regs = g.regularizers(fake, 0)
    assert abs(float(regs["transmittance"]) - 3.0 * -(0.5 + 0.6) / 2) < 1e-6


def test_opaque_loss_is_binary_entropy_and_scheduled():
    alpha = torch.tensor([0.1, 0.5, 0.9, 0.25]).view(1, 1, 2, 2)
    fake = RenderOutput(rgb=torch.zeros(1, 3, 2, 2), alpha=alpha, depth=torch.zeros(1, 1, 2, 2))
    m = small_nerf("representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=0",
                   "representation.nerf.lambda_opaque=[0.0,2.0,100,300]")
    assert m.regularizers(fake, 100) == {}
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.1, 0.5, 0.9, 0.25)]
    assert abs(float(m.regularizers(fake, 200)["opaque"]) - 1.0 * sum(h) / 4) < 1e-6
    assert abs(float(m.regularizers(fake, 900)["opaque"]) - 2.0 * sum(h) / 4) < 1e-6


def _zero_field_mlp(model: NeRF) -> None:
    """Raw density 0 and albedo logits 0 everywhere: the density is the blob's alone."""
    with torch.no_grad():
        last = model.mlp[-1]
        last.weight.zero_()
        last.bias.zero_()


def test_blob_density_tapers_on_its_schedule():
    model = small_nerf("representation.nerf.blob_density=[10.0,0.0,0,400]", "representation.nerf.blob_radius=0.35")
    _zero_field_mlp(model)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.1], [0.3, 0.3, 0.3]])
    r = pts.norm(dim=-1)

    def expected(step):
        peak = 10.0 * (1 - min(step, 400) / 400)
        return F.softplus(peak * (1 - r / 0.35))

    cams = cameras(res=4)
    for step in (0, 100, 250, 400, 600):
        model.render(cams, step=step, generator=step_generator(0, step), training=True)  # training sets the step
        with torch.no_grad():
            torch.testing.assert_close(model.density(pts), expected(step), atol=1e-5, rtol=1e-5)
    model.update(99)  # after the optimizer step of step 99 the field is that of step 100
    torch.testing.assert_close(model.density(pts), expected(100), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation renders keep the step; they never reset the blob
        model.render(cams, step=0, training=False)
    torch.testing.assert_close(model.density(pts), expected(100), atol=1e-5, rtol=1e-5)
    model.set_step(300)  # what loading a checkpoint does
    torch.testing.assert_close(model.density(pts), expected(300), atol=1e-5, rtol=1e-5)
    # A plain number: the blob of old, at every step.
    fixed = small_nerf()
    _zero_field_mlp(fixed)
    fixed.set_step(10_000)
    torch.testing.assert_close(fixed.density(pts), F.softplus(10.0 * (1 - r / 0.4)), atol=1e-5, rtol=1e-5)


def _hand_weights(model: NeRF, cams, sigma_fn):
    """Independent volume rendering at bin midpoints (evaluation renders): points ``[R,S,3]``,
    weights ``[R,S]`` with w_i = T_i (1 - exp(-sigma_i delta)), ray directions ``[R,3]``."""
    o, d = cams.rays()
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, _ = ray_box_intersect(o, d, model.radius)
    S = model.num_samples
    delta = (far - near) / S
    t = near[:, None] + delta[:, None] * (torch.arange(S) + 0.5)
    x = o[:, None] + d[:, None] * t[..., None]
    a = 1 - torch.exp(-sigma_fn(x) * delta[:, None])
    trans = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], dim=1), dim=1)
    return x, trans * a, d


def test_orientation_loss_matches_independent_computation():
    """Ref-NeRF / DreamFusion: sum_i w_i max(0, n_i . d)^2 per ray, averaged over rays, with
    n = -grad sigma / |grad sigma|. A shell field sigma = softplus(k (|x| - r0)) has n = -x/|x|
    everywhere (pointing inward), so the front of the shell faces away from the camera."""
    k, r0 = 12.0, 0.5
    model = small_nerf(ANALYTIC, "representation.nerf.lambda_orient=3", "representation.nerf.lambda_sparsity=0")
    model.skip_grid_resolution = 0

    def sigma_fn(x):
        return F.softplus(k * (x.norm(dim=-1) - r0))

    model._field = lambda x: (sigma_fn(x), torch.full_like(x, 0.5))
    cams = cameras(res=6)
    out = model.render(cams, training=False)
    x, w, d = _hand_weights(model, cams, sigma_fn)
    n = -x / x.norm(dim=-1, keepdim=True)
    cos = (n * d[:, None]).sum(-1).clamp_min(0)
    w_kept = torch.where(w > model.normal_weight_threshold, w, torch.zeros_like(w))  # normals only where w matters
    per_ray = (w_kept * cos.square()).sum(-1)
    torch.testing.assert_close(out.extras["orient"], per_ray, atol=2e-4, rtol=1e-3)
    assert float(per_ray.mean()) > 0.05  # the test measures something
    torch.testing.assert_close(model.regularizers(out, 0)["orient"], 3.0 * per_ray.mean(), atol=1e-3, rtol=1e-3)


def _fixed_path_inputs(model: NeRF, res: int = 6):
    """Cameras, flat rays ``o, d [R,3]``, headlights ``[R,3]`` and unit normal draws ``z [R,S,3]``
    (seeded) for calling ``_render_fixed`` directly."""
    cams = cameras(res=res)
    o, d = cams.rays()
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    z = torch.randn(o.shape[0], model.num_samples, 3, generator=torch.Generator().manual_seed(3))
    return cams, o, d, cams.positions.expand(o.shape[0], 3), z


def test_albedo_smoothness_matches_closed_form_for_a_linear_albedo():
    """albedo(x) = 0.5 + g . x in every channel: albedo(x) - albedo(x + eps z) = -eps g . z, so the
    per-ray term is sum_i w_i * 3 eps^2 (g . z_i)^2 with the noise z the render was given."""
    eps, g = 0.05, torch.tensor([0.3, -0.2, 0.4])
    model = small_nerf(ANALYTIC, "representation.nerf.lambda_albedo_smooth=2", "representation.nerf.albedo_smooth_eps=0.05",
                       "representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=0")
    model.skip_grid_resolution = 0

    def sigma_fn(x):
        return F.softplus(15.0 * (0.4 - x.norm(dim=-1)))

    model._field = lambda x: (sigma_fn(x), (0.5 + x @ g)[:, None].expand(-1, 3))
    cams, o, d, lights, z = _fixed_path_inputs(model)
    R, S = z.shape[:2]
    res = model._render_fixed(o, d, lights, torch.ones(R, 3), torch.full((R, S), 0.5), "albedo", False, True, z)
    _, w, _ = _hand_weights(model, cams, sigma_fn)
    w_kept = torch.where(w > model.normal_weight_threshold, w, torch.zeros_like(w))
    per_ray = (w_kept * 3 * eps ** 2 * (z @ g).square()).sum(-1)
    torch.testing.assert_close(res["albedo_smooth"], per_ray, atol=1e-6, rtol=1e-4)
    assert float(per_ray.mean()) > 1e-4
    # Through render() and regularizers(): on in training (drawn from the generator), weighted.
    out = model.render(cams, step=200, generator=step_generator(0, 200), training=True)
    regs = model.regularizers(out, 200)
    torch.testing.assert_close(regs["albedo_smooth"], 2.0 * out.extras["albedo_smooth"].mean())
    # A constant albedo is perfectly smooth.
    model._field = lambda x: (sigma_fn(x), torch.full_like(x, 0.3))
    res = model._render_fixed(o, d, lights, torch.ones(R, 3), torch.full((R, S), 0.5), "albedo", False, True, z)
    assert float(res["albedo_smooth"].abs().max()) == 0.0


def test_3d_normal_smoothness_matches_closed_form_for_a_sphere():
    """A density falling off with |x|: the outward normal at x is x / |x|, so the per-ray term is
    sum_i w_i |x_i / |x_i| - y_i / |y_i||^2 with y_i = x_i + eps z_i and z the render's draws."""
    eps = 0.05
    model = small_nerf(ANALYTIC, "representation.nerf.lambda_normal_smooth_3d=[0.0,4.0,0,10]",
                       "representation.nerf.normal_smooth_eps=0.05", "representation.nerf.lambda_orient=0",
                       "representation.nerf.lambda_sparsity=0", "representation.nerf.ambient_only_steps=0")
    model.skip_grid_resolution = 0

    def sigma_fn(x):
        return F.softplus(15.0 * (0.4 - x.norm(dim=-1)))

    model._field = lambda x: (sigma_fn(x), torch.full_like(x, 0.5))
    cams, o, d, lights, z = _fixed_path_inputs(model)
    R, S = z.shape[:2]
    res = model._render_fixed(o, d, lights, torch.ones(R, 3), torch.full((R, S), 0.5), "diffuse", True, True,
                              None, z)
    x, w, _ = _hand_weights(model, cams, sigma_fn)
    y = x + eps * z
    w_kept = torch.where(w > model.normal_weight_threshold, w, torch.zeros_like(w))
    per_ray = (w_kept * (x / x.norm(dim=-1, keepdim=True) - y / y.norm(dim=-1, keepdim=True)).square().sum(-1)).sum(-1)
    torch.testing.assert_close(res["normal_smooth_3d"], per_ray, atol=1e-5, rtol=1e-4)
    assert float(per_ray.mean()) > 1e-3  # the test measures something
    # Through render() and regularizers(): on in albedo-shaded training renders too, scheduled.
    model._draw_shading = lambda *a, **k: "albedo"
    out = model.render(cams, step=5, generator=step_generator(0, 5), training=True)
    regs = model.regularizers(out, 5)
    torch.testing.assert_close(regs["normal_smooth_3d"], 2.0 * out.extras["normal_smooth_3d"].mean())
    assert "normal_smooth_3d" not in model.regularizers(out, 0)  # weight 0 at step 0
    # Off: no draw, no term (the default config's renders are unchanged).
    plain = small_nerf(ANALYTIC, "representation.nerf.ambient_only_steps=0")
    assert "normal_smooth_3d" not in plain.render(cams, step=5, generator=step_generator(0, 5), training=True).extras
    # A plane's normals are all the same: the term is 0 there.
    model._field = lambda x: (F.softplus(15.0 * (0.1 - x[:, 0])), torch.full_like(x, 0.5))
    res = model._render_fixed(o, d, lights, torch.ones(R, 3), torch.full((R, S), 0.5), "diffuse", True, True,
                              None, z)
    assert float(res["normal_smooth_3d"].abs().max()) < 1e-10


def test_median_depth_matches_a_per_ray_search_on_packed_samples():
    """Packed samples (nerfacc's layout: rays of different sample counts, one with none, one with
    no weight): the depth where the cumulative weight reaches half the ray's total, interpolated
    in its interval, against a plain loop over each ray."""
    from threedistill.representations.nerf import median_depth

    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 3, 8, 1, 4]
    rays, starts, ends, ws = [], [], [], []
    for r, n in enumerate(counts):
        edges = torch.sort(torch.rand(n + 1, generator=g) * 3.0).values
        w = torch.rand(n, generator=g) * 0.3
        if r == 5:
            w = torch.zeros(n)  # an empty ray
        rays += [r] * n; starts.append(edges[:-1]); ends.append(edges[1:]); ws.append(w)
    ray_indices = torch.tensor(rays)
    t_starts, t_ends, weights = torch.cat(starts), torch.cat(ends), torch.cat(ws)
    t, hit = median_depth(weights, t_starts, t_ends, ray_indices, len(counts))
    for r in range(len(counts)):
        m = ray_indices == r
        w, a, b = weights[m].double(), t_starts[m].double(), t_ends[m].double()
        if m.sum() == 0 or float(w.sum()) <= 1e-4:
            assert not hit[r] and float(t[r]) == 0.0
            continue
        half, acc = 0.5 * float(w.sum()), 0.0
        for k in range(len(w)):
            if acc + float(w[k]) >= half and float(w[k]) > 0:
                want = float(a[k] + (b[k] - a[k]) * (half - acc) / float(w[k]))
                break
            acc += float(w[k])
        assert hit[r] and abs(float(t[r]) - want) < 1e-5, (r, float(t[r]), want)


def test_surface_shading_is_the_composited_albedo_lit_at_the_median_depth():
    """shading_point=surface on an analytic sphere: rgb = sum_i w_i a_i * (ambient + (1 - ambient)
    max(0, n(x_s) . l)) + (1 - alpha) bg, with x_s at the weights' median depth and n = x_s / |x_s|;
    samples shading differs (it shades each sample with its own normal)."""
    model = small_nerf(ANALYTIC, "representation.nerf.shading_point=surface", "representation.nerf.lambda_orient=0",
                       "representation.nerf.lambda_sparsity=0")
    model.skip_grid_resolution = 0

    def sigma_fn(x):
        return F.softplus(40.0 * (0.4 - x.norm(dim=-1)))

    albedo_of = lambda x: torch.sigmoid(torch.stack([x[:, 0] * 3, x[:, 1] * 2, 1 - x[:, 2]], dim=-1))
    model._field = lambda x: (sigma_fn(x), albedo_of(x))
    cams = cameras(res=6)
    o, d = cams.rays()
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    R, S = o.shape[0], model.num_samples
    lights = (cams.positions + torch.tensor([[0.3, -0.5, 0.8]])).expand(R, 3)
    bg = torch.full((R, 3), 0.25)
    res = model._render_fixed(o, d, lights, bg, torch.full((R, S), 0.5), "diffuse", False, False)
    x, w, _ = _hand_weights(model, cams, sigma_fn)
    alpha = w.sum(-1, keepdim=True)
    a_sum = (w[..., None] * albedo_of(x.reshape(-1, 3)).view(R, S, 3)).sum(1)
    # median depth by hand: bins of equal length between the box entry and exit
    near, far, _ = ray_box_intersect(o, d, model.radius)
    want = torch.empty(R, 3)
    for r in range(R):
        cw = torch.cumsum(w[r], 0)
        k = int((cw >= 0.5 * cw[-1]).nonzero()[0])
        dt = (far[r] - near[r]) / S
        t_s = near[r] + dt * (k + (0.5 * cw[-1] - (cw[k] - w[r, k])) / w[r, k])
        xs = o[r] + d[r] * t_s
        lam = max(0.0, float((xs / xs.norm()) @ F.normalize(lights[r] - xs, dim=0)))
        shade = model.ambient_light + (1 - model.ambient_light) * lam if float(alpha[r]) > 1e-4 else model.ambient_light
        want[r] = a_sum[r] * shade + (1 - alpha[r]) * bg[r]
    assert float(alpha.max()) > 0.9 and float(alpha.min()) < 0.1  # the object and the background
    torch.testing.assert_close(res["rgb"], want, atol=1e-4, rtol=1e-4)
    per_sample = small_nerf(ANALYTIC, "representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=0")
    per_sample.skip_grid_resolution, per_sample._field = 0, model._field
    other = per_sample._render_fixed(o, d, lights, bg, torch.full((R, S), 0.5), "diffuse", True, False)
    assert float((other["rgb"] - res["rgb"]).abs().max()) > 1e-3
    # textureless: white albedo, i.e. alpha times the shading factor; albedo mode is unchanged.
    tl = model._render_fixed(o, d, lights, bg, torch.full((R, S), 0.5), "textureless", False, False)
    factor = (res["rgb"] - (1 - alpha) * bg) / a_sum.clamp_min(1e-8)
    keep = alpha[:, 0] > 0.05
    torch.testing.assert_close((tl["rgb"] - (1 - alpha) * bg)[keep], (alpha * factor)[keep], atol=1e-4, rtol=1e-3)
    alb = model._render_fixed(o, d, lights, bg, torch.full((R, S), 0.5), "albedo", False, False)
    torch.testing.assert_close(alb["rgb"], a_sum + (1 - alpha) * bg, atol=1e-5, rtol=1e-4)
    # Training through render(): the lit render's gradient reaches the field's parameters.
    m2 = small_nerf("representation.nerf.shading_point=surface", "representation.nerf.ambient_only_steps=0",
                    "representation.nerf.albedo_prob=0")
    out = m2.render(cameras(res=8), step=5, generator=step_generator(0, 5), training=True)
    out.rgb.sum().backward()
    assert all(p.grad is not None for p in m2.encoding.parameters())


def test_normal_smoothness_is_the_closed_form_difference_of_neighbours():
    normal = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, 0.0]]).view(1, 1, 2, 3).expand(1, 3, 2, 3).clone()
    fake = RenderOutput(rgb=torch.zeros(1, 3, 2, 3), alpha=torch.ones(1, 1, 2, 3), depth=torch.zeros(1, 1, 2, 3),
                        normal=normal)
    m = small_nerf("representation.nerf.lambda_orient=0", "representation.nerf.lambda_sparsity=0",
                   "representation.nerf.lambda_normal_smooth=[0.0,2.0,0,10]")
    assert m.regularizers(fake, 0) == {}
    # Rows: (0.5-0)^2, (0.5-1)^2, (0-1)^2 -> mean 0.5; columns: 1, 0, 0, 0.25 -> mean 0.3125.
    assert abs(float(m.regularizers(fake, 5)["normal_smooth"]) - 1.0 * (0.5 + 0.3125)) < 1e-6
    # The term turns normals on in albedo-shaded training renders.
    m2 = small_nerf("representation.nerf.lambda_orient=0", "representation.nerf.lambda_normal_smooth=1")
    out = m2.render(cameras(res=8), step=0, generator=step_generator(0, 0), training=True)
    assert out.normal is not None and "normal_smooth" in m2.regularizers(out, 0)


# ----------------------------------------------------------------------------------------------
# Finite-difference normals
# ----------------------------------------------------------------------------------------------
def test_finite_difference_normals_are_exact_on_a_spherical_field(monkeypatch):
    """A raw density 1 - |x - c|^2 / r^2 has the outward normal (x - c) / |x - c| everywhere;
    tetrahedral differences are exact for it at any eps (the field is quadratic with no cross terms)."""
    model = small_nerf("representation.nerf.normal_type=finite_difference", "representation.nerf.normal_eps=0.05")
    c = torch.tensor([0.1, -0.2, 0.05])

    def raw_field(x):
        return 1.0 - (x - c).square().sum(-1) / 0.3 ** 2, torch.zeros(x.shape[0], 3)

    monkeypatch.setattr(model, "_raw_field", raw_field)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 0.4
    sigma, albedo, n = model._field_and_normals(x, create_graph=False)
    torch.testing.assert_close(n, F.normalize(x - c, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(sigma, F.softplus(raw_field(x)[0]))


def test_finite_difference_normals_approach_the_analytic_ones_and_carry_gradients():
    """On the real (random) hash field, in double precision: with a tiny eps the finite-difference
    normals equal the autograd ones; a training render's normals are differentiable w.r.t. the
    grid and the MLP (the orientation loss reaches them)."""
    torch.manual_seed(0)
    fd = small_nerf("representation.nerf.normal_type=finite_difference", "representation.nerf.normal_eps=1e-6").double()
    exact = small_nerf(ANALYTIC).double()
    exact.load_state_dict(fd.state_dict())
    with torch.no_grad():
        for m in (fd, exact):
            m.encoding.embeddings.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    x = (torch.rand(200, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5) * 0.8
    _, _, n_fd = fd._field_and_normals(x, create_graph=False)
    _, _, n_ex = exact._field_and_normals(x, create_graph=False)
    cos = (n_fd * n_ex).sum(-1)
    assert cos.min() > 1 - 1e-6

    model = small_nerf("representation.nerf.normal_type=finite_difference", "representation.nerf.ambient_only_steps=0",
                       "representation.nerf.albedo_prob=0")
    out = model.render(cameras(res=12), step=5, generator=step_generator(0, 5), training=True)
    assert out.normal is not None
    loss = model.regularizers(out, 5)["orient"] + out.rgb.mean()
    loss.backward()
    assert model.encoding.embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.mlp.parameters())


def test_finite_difference_normals_are_smoother_on_a_hash_grid():
    """The point of the option: along a line across the random field, the finite-difference
    normal turns less from sample to sample than the exact gradient of the piecewise-trilinear grid."""
    fd = small_nerf("representation.nerf.normal_type=finite_difference", "representation.nerf.normal_eps=0.03")
    exact = small_nerf(ANALYTIC)
    exact.load_state_dict(fd.state_dict())
    with torch.no_grad():
        for m in (fd, exact):
            m.encoding.embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    s = torch.linspace(-0.3, 0.3, 400)
    x = torch.stack([s, 0.1 * torch.ones_like(s), 0.37 * torch.ones_like(s)], dim=-1)

    def turning(model):
        _, _, n = model._field_and_normals(x, create_graph=False)
        return (1 - (n[1:] * n[:-1]).sum(-1)).sum().item()

    assert turning(fd) < 0.5 * turning(exact)


def test_normal_type_is_checked():
    from threedistill.errors import UserError

    with pytest.raises(UserError, match="normal_type"):
        small_nerf("representation.nerf.normal_type=sobel")


def test_exp_density_activation_and_its_clamped_gradient():
    """density_activation=exp: sigma = exp(raw + blob); the backward uses exp(min(raw, 15))."""
    from threedistill.representations.nerf import trunc_exp

    x = torch.tensor([-3.0, 0.0, 2.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([-3.0, 0.0, 2.0, 15.0])))

    model = small_nerf("representation.nerf.density_activation=exp")
    soft = small_nerf()
    soft.load_state_dict(model.state_dict())
    p = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 0.4
    raw, _ = model._raw_field(p)
    torch.testing.assert_close(model._field(p)[0], torch.exp(raw))
    torch.testing.assert_close(soft._field(p)[0], F.softplus(raw))
    # Analytic normals (double backward through the activation) still point out of the blob.
    dirs = F.normalize(p, dim=-1)
    _, _, n = model._field_and_normals(dirs * 0.3, create_graph=True)
    assert (n * dirs).sum(-1).min() > 0.98
    with pytest.raises(Exception, match="density_activation"):
        small_nerf("representation.nerf.density_activation=relu")
