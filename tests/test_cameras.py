import math

import torch

from threedistill.cameras import (CameraSampler, look_at_c2w, make_cameras, orbit_cameras, preview_cameras,
                                  step_generator, view_labels)
from threedistill.config import load_config


def test_sampler_ranges_match_config():
    cfg = load_config(overrides=["camera.batch_size=4"]).camera
    sampler = CameraSampler(cfg, 32)
    el, az, di, fo = [], [], [], []
    for step in range(300):
        c = sampler.sample(step_generator(0, step))
        assert len(c) == 4 and c.height == 32 and c.width == 32
        el.append(c.elevation); az.append(c.azimuth); di.append(c.distance); fo.append(torch.rad2deg(c.fovy))
    el, az, di, fo = map(torch.cat, (el, az, di, fo))
    for vals, (lo, hi) in ((el, (-10, 45)), (az, (-180, 180)), (di, (1.5, 2.0)), (fo, (40, 70))):
        assert vals.min() >= lo - 1e-4 and vals.max() <= hi + 1e-4
        span = hi - lo
        # The draws fill the range (uniform): both ends are reached within 5 %.
        assert vals.min() < lo + 0.05 * span and vals.max() > hi - 0.05 * span
    # Camera positions are consistent with the spherical coordinates and distance.
    c = sampler.sample(step_generator(1, 0))
    assert torch.allclose(c.positions.norm(dim=-1), c.distance, atol=1e-5)
    z = c.distance * torch.sin(torch.deg2rad(c.elevation))
    assert torch.allclose(c.positions[:, 2], z, atol=1e-5)


def test_sampler_is_reproducible_per_step():
    cfg = load_config().camera
    s = CameraSampler(cfg, 16)
    a = s.sample(step_generator(3, 17))
    b = s.sample(step_generator(3, 17))
    c = s.sample(step_generator(3, 18))
    assert torch.equal(a.c2w, b.c2w) and torch.equal(a.light_positions, b.light_positions)
    assert not torch.equal(a.c2w, c.c2w)


def test_view_labels():
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 70.0, 59.0, 10.0])
    az = torch.tensor([0.0, 44.0, 90.0, -90.0, 180.0, 180.0, -170.0, 330.0])
    assert view_labels(el, az) == ["front", "front", "side", "side", "back", "overhead", "back", "front"]
    assert view_labels(torch.tensor([0.0]), torch.tensor([40.0]), front_threshold=30) == ["side"]


def test_convention_camera_looks_at_origin_opengl():
    cams = make_cameras(torch.tensor([0.0, 30.0, 89.999]), torch.tensor([0.0, 90.0, 0.0]), torch.tensor([2.0, 2.0, 2.0]),
                        torch.tensor([60.0, 60.0, 60.0]), 9)
    # azimuth 0, elevation 0 -> camera on +X looking towards -X, +Z up in the image.
    c2w = cams.c2w[0]
    assert torch.allclose(c2w[:3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(-c2w[:3, 2], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)  # viewing direction
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # image up = world up
    # Rotation part is orthonormal with det +1 for every camera (including near-overhead).
    R = cams.c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3), atol=1e-5)
    # The centre ray of an odd-sized image points exactly at the origin.
    o, d = cams.rays()
    centre = d[:, 4, 4]
    expected = -cams.positions / cams.positions.norm(dim=-1, keepdim=True)
    assert torch.allclose(centre, expected, atol=1e-5)
    # Top row of pixels looks upward (+Z); standing on +X looking at -X with +Z up, image right is
    # world +Y (the object's left side, which azimuth 90 sees).
    assert d[0, 0, 4, 2] > 0 and d[0, 4, 8, 1] > 0
    # The corner ray makes half the vertical fov with the axis along the image's vertical edge centre.
    top = d[0, 0, 4]
    half = math.degrees(math.acos(float((top * centre[0]).sum())))
    assert abs(half - (30.0 - 30.0 / 9)) < 1.0  # pixel centre is half a pixel in from the edge


def test_w2c_opencv_projects_points_with_intrinsics():
    cams = make_cameras(torch.tensor([20.0]), torch.tensor([35.0]), torch.tensor([1.8]), torch.tensor([50.0]), 64)
    o, d = cams.rays()
    p_world = o[0, 10, 50] + 1.3 * d[0, 10, 50]  # a point seen by pixel (row 10, col 50)
    w2c = cams.w2c_opencv()[0]
    p_cam = w2c[:3, :3] @ p_world + w2c[:3, 3]
    assert p_cam[2] > 0  # in front of an OpenCV camera
    uv = cams.intrinsics()[0] @ (p_cam / p_cam[2])
    assert torch.allclose(uv[:2], torch.tensor([50.5, 10.5]), atol=1e-3)


def test_orbit_and_preview_cameras():
    orb = orbit_cameras(8, 16, elevation=15, distance=2.0)
    assert len(orb) == 8
    assert torch.allclose(orb.distance, torch.full((8,), 2.0))
    assert torch.allclose(orb.elevation, torch.full((8,), 15.0))
    steps = torch.diff(orb.azimuth) % 360
    assert torch.allclose(steps, torch.full((7,), 45.0))
    prev = preview_cameras(16)
    assert prev.view_labels() == ["front", "side", "back", "overhead"]
    # look_at handles an exactly overhead camera.
    c2w = look_at_c2w(torch.tensor([[0.0, 0.0, 2.0]]))
    assert torch.isfinite(c2w).all()
