"""The shapes world and its exact ray-casting renderer, checked against independent computations.

Every reference here is computed in the test itself (analytic ray/sphere and ray/box intersections,
Lambert shading from the analytic normal, prompt strings), in float64, never from the renderer's own
output. Rays come from :meth:`CameraBatch.rays`, the pixel model the renderer is specified to use.
"""

import math

import numpy as np
import pytest
import torch
import trimesh

from threedistill.cameras import make_cameras, orbit_cameras
from threedistill.shapes.render import ray_mesh_hits, render_mesh, render_shape
from threedistill.shapes.world import (BACKGROUND, COLOR_NAMES, COLORS, HELD_OUT, SHAPES, all_prompts,
                                       held_out_prompts, mirrored_mug, parse_prompt, prompt_for, shape_mesh,
                                       training_prompts)

SPHERE_R = 0.4
BG = torch.tensor(BACKGROUND)


def _cams(elevations, azimuths, res, distance=1.75, fovy=40.0, light_positions=None):
    n = len(elevations)
    return make_cameras(torch.tensor(elevations, dtype=torch.float32), torch.tensor(azimuths, dtype=torch.float32),
                        torch.full((n,), distance), torch.full((n,), fovy), res, light_positions=light_positions)


def _rays64(cams):
    o, d = cams.rays()
    return o.double(), d.double()  # [B,H,W,3]


def _analytic_sphere(o, d, r=SPHERE_R):
    """Ray/sphere (centre 0) by the quadratic formula: (hit [B,H,W], t, closest-approach distance)."""
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - r * r
    disc = b * b - c
    hit = disc >= 0
    t = -b - torch.sqrt(disc.clamp_min(0))
    closest = (o - b[..., None] * d).norm(dim=-1)
    return hit & (t > 0), t, closest


def _analytic_box(o, d, lo, hi):
    """Slab method for the axis-aligned box [lo, hi]: (hit, t_near, index of the entry axis)."""
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    inv = 1.0 / d  # +-inf where a direction component is 0
    t1 = (lo - o) * inv
    t2 = (hi - o) * inv
    tmin = torch.minimum(t1, t2)
    tmax = torch.maximum(t1, t2)
    t_near, axis = tmin.max(-1)
    t_far = tmax.min(-1).values
    return (t_near <= t_far) & (t_far > 0), t_near, axis


def _interior(mask):
    """Pixels whose 4-neighbours are all inside ``mask`` [..., H, W] (bool)."""
    m = mask.clone()
    m[..., 1:, :] &= mask[..., :-1, :]
    m[..., :-1, :] &= mask[..., 1:, :]
    m[..., :, 1:] &= mask[..., :, :-1]
    m[..., :, :-1] &= mask[..., :, 1:]
    m[..., 0, :] = m[..., -1, :] = False
    m[..., :, 0] = m[..., :, -1] = False
    return m


@pytest.fixture(scope="module")
def fine_sphere():
    return trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_R)


# ----------------------------------------------------------------------------------------------
# ray_mesh_hits on a single triangle
# ----------------------------------------------------------------------------------------------
def test_ray_mesh_hits_single_triangle_barycentrics():
    verts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    faces = torch.tensor([[0, 1, 2]])
    # Rays straight down from z=2 at known barycentric points, one miss, one pointing away.
    o = torch.tensor([[0.2, 0.3, 2.0], [0.5, 0.1, 2.0], [0.8, 0.8, 2.0], [0.2, 0.2, 2.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    t, face, u, v = ray_mesh_hits(o, d, verts, faces)
    assert face.tolist() == [0, 0, -1, -1]
    assert torch.allclose(t[:2], torch.tensor([2.0, 2.0]), atol=1e-6)
    assert torch.isinf(t[2:]).all()
    # p = (1-u-v) v0 + u v1 + v v2 with v0 at the origin: (u, v) = (x, y).
    assert torch.allclose(u[:2], torch.tensor([0.2, 0.5]), atol=1e-6)
    assert torch.allclose(v[:2], torch.tensor([0.3, 0.1]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 1. Sphere mask and depth vs. the analytic ray/sphere intersection
# ----------------------------------------------------------------------------------------------
def test_sphere_mask_and_depth_match_analytic(fine_sphere):
    cams = _cams([0.0, 30.0, -20.0], [0.0, 100.0, -135.0], 48)
    gt = render_mesh(fine_sphere, (0.5, 0.5, 0.5), cams, shading="albedo")
    o, d = _rays64(cams)
    hit, t, closest = _analytic_sphere(o, d)
    mask = gt.mask[:, 0] > 0.5
    assert set(gt.mask.unique().tolist()) <= {0.0, 1.0}
    assert hit.sum() > 0.2 * hit.numel() / len(cams)  # the sphere fills a good part of each view
    disagree = mask != hit
    assert disagree.float().mean() < 0.01
    # Disagreements only on the silhouette: rays that pass within 1% of the radius of the surface.
    assert ((closest[disagree] - SPHERE_R).abs() < 0.01 * SPHERE_R).all()
    # The inscribed mesh never covers a pixel the true sphere misses by more than its chord error.
    both = mask & hit
    depth = gt.depth[:, 0].double()
    assert (depth[~mask] == 0).all()
    err = (depth[both] - t[both]).abs()
    assert err.max() < 3e-2  # grazing rays near the silhouette
    inner = both & (closest < 0.95 * SPHERE_R)
    assert (depth[inner] - t[inner]).abs().max() < 1e-2
    assert (depth[inner] - t[inner]).abs().mean() < 2e-3


# ----------------------------------------------------------------------------------------------
# 2. Box mask (and depth) vs. the slab method, including an overhead camera
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extents,offset", [((0.56, 0.56, 0.56), (0.0, 0.0, 0.0)),
                                            ((0.6, 0.3, 0.45), (0.05, -0.1, 0.08))])
def test_box_mask_matches_slab_method(extents, offset):
    box = trimesh.creation.box(extents=extents)
    box.apply_translation(offset)
    lo = np.asarray(offset) - np.asarray(extents) / 2
    hi = np.asarray(offset) + np.asarray(extents) / 2
    # Front, oblique, straight overhead, from below-behind, and the left side.
    cams = _cams([0.0, 25.0, 90.0, -30.0, 10.0], [0.0, 35.0, 0.0, 150.0, 90.0], 40)
    gt = render_mesh(box, (0.2, 0.4, 0.6), cams, shading="albedo")
    o, d = _rays64(cams)
    hit, t_near, _ = _analytic_box(o, d, lo, hi)
    mask = gt.mask[:, 0] > 0.5
    for b in range(len(cams)):
        assert hit[b].sum() > 50, f"camera {b} barely sees the box"
        n_bad = int((mask[b] != hit[b]).sum())
        assert n_bad <= 2, f"camera {b}: {n_bad} pixels differ from the slab test"
    both = mask & hit
    assert (gt.depth[:, 0].double()[both] - t_near[both]).abs().max() < 1e-4


def test_world_cube_normals_are_exact_face_normals():
    """The world cube is split along sharp edges, so interpolated normals equal the face normal."""
    h = 0.28
    cams = _cams([20.0, 90.0, -35.0], [30.0, 0.0, -120.0], 32)
    gt = render_shape("cube", "red", cams, shading="albedo")
    o, d = _rays64(cams)
    hit, _, axis = _analytic_box(o, d, (-h, -h, -h), (h, h, h))
    mask = gt.mask[:, 0] > 0.5
    assert (mask == hit).float().mean() > 0.995
    both = mask & hit
    # Entry face normal: -sign(d) along the entry axis.
    expected = torch.zeros_like(d)
    expected.scatter_(-1, axis[..., None], -torch.sign(d.gather(-1, axis[..., None])))
    decoded = 2.0 * gt.normal.permute(0, 2, 3, 1).double() - 1.0
    assert (decoded[both] - expected[both]).abs().max() < 1e-4
    # Background pixels encode the zero normal as 0.5.
    assert (gt.normal.permute(0, 2, 3, 1)[~mask] == 0.5).all()


# ----------------------------------------------------------------------------------------------
# 3. Colors
# ----------------------------------------------------------------------------------------------
def test_albedo_shading_is_flat_color_over_background():
    albedo = COLORS["green"]
    cams = orbit_cameras(3, 32, elevation=20.0)
    for shape in ("torus", "cone"):
        gt = render_shape(shape, "green", cams, shading="albedo")
        rgb = gt.rgb.permute(0, 2, 3, 1)
        mask = gt.mask[:, 0] > 0.5
        assert mask.any() and (~mask).any()
        assert (rgb[mask] == torch.tensor(albedo, dtype=torch.float32)).all()
        assert (rgb[~mask] == BG).all()


def test_diffuse_head_on_matches_analytic_lambert(fine_sphere):
    albedo = torch.tensor((0.86, 0.12, 0.10), dtype=torch.float64)
    ambient = 0.1
    res = 33  # odd: the centre pixel's ray goes exactly through the sphere's centre
    cams = _cams([0.0, 40.0], [0.0, -70.0], res)  # light defaults to the camera position
    gt = render_mesh(fine_sphere, albedo.tolist(), cams, shading="diffuse", ambient=ambient)
    rgb = gt.rgb.permute(0, 2, 3, 1).double()
    c = res // 2
    # Centre pixel: the normal points at the camera and the light, cos = 1 -> the albedo itself.
    assert torch.allclose(rgb[:, c, c], albedo.expand(2, 3), atol=1e-4)
    # Everywhere inside the silhouette: albedo * (ambient + (1 - ambient) * cos), analytic normal.
    o, d = _rays64(cams)
    hit, t, closest = _analytic_sphere(o, d)
    x = o + d * t[..., None]
    n = x / SPHERE_R
    light = cams.light_positions.double()[:, None, None, :]
    l_dir = (light - x) / (light - x).norm(dim=-1, keepdim=True)
    cos = (n * l_dir).sum(-1).clamp_min(0)
    expected = albedo * (ambient + (1 - ambient) * cos[..., None])
    inner = hit & (gt.mask[:, 0] > 0.5) & (closest < 0.9 * SPHERE_R)
    assert inner.sum() > 200
    assert (rgb[inner] - expected[inner]).abs().max() < 1e-2
    # Brightest at the centre, darker towards the rim.
    assert rgb[0, c, c, 0] > rgb[0, c, c + 4, 0] > rgb[0, c, c + 8, 0] > 0.1 * albedo[0]


def test_light_behind_or_to_the_side_gives_ambient_on_faces_turned_away(fine_sphere):
    albedo = torch.tensor((0.14, 0.32, 0.90), dtype=torch.float64)
    ambient = 0.1
    # Camera on +X; light 1: straight behind the sphere (-X); light 2: on the +Y side.
    lights = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    cams = _cams([0.0, 0.0], [0.0, 0.0], 32, light_positions=lights)
    gt = render_mesh(fine_sphere, albedo.tolist(), cams, shading="diffuse", ambient=ambient)
    rgb = gt.rgb.permute(0, 2, 3, 1).double()
    mask = gt.mask[:, 0] > 0.5
    # Light behind: every visible point faces away from it.
    assert mask[0].sum() > 100
    assert (rgb[0][mask[0]] - ambient * albedo).abs().max() < 1e-6
    # Light on +Y (the image's right in this front view): analytic cos decides which pixels are ambient.
    o, d = _rays64(cams[1])
    hit, t, closest = _analytic_sphere(o, d)
    x = (o + d * t[..., None])[0]
    n = x / SPHERE_R
    l_dir = (lights[1].double() - x)
    l_dir = l_dir / l_dir.norm(dim=-1, keepdim=True)
    cos = (n * l_dir).sum(-1)
    sure = hit[0] & mask[1] & (closest[0] < 0.9 * SPHERE_R)
    away = sure & (cos < -0.05)
    toward = sure & (cos > 0.05)
    assert away.sum() > 50 and toward.sum() > 50
    assert (rgb[1][away] - ambient * albedo).abs().max() < 1e-6
    expected = albedo * (ambient + (1 - ambient) * cos[..., None])
    assert (rgb[1][toward] - expected[toward]).abs().max() < 1e-2
    W = 32
    assert toward[:, W // 2:].sum() > toward[:, : W // 2].sum()  # lit side is on the right (+Y)
    # Misses are the background whatever the light.
    assert (rgb[~mask] == BG.double()).all()


# ----------------------------------------------------------------------------------------------
# 4. Normals image vs. the analytic sphere normal
# ----------------------------------------------------------------------------------------------
def test_sphere_normals_match_hit_position(fine_sphere):
    cams = _cams([10.0, 60.0, -45.0], [0.0, 120.0, -60.0], 32)
    gt = render_mesh(fine_sphere, (1.0, 1.0, 1.0), cams, shading="albedo")
    mask = gt.mask[:, 0] > 0.5
    decoded = 2.0 * gt.normal.permute(0, 2, 3, 1).double() - 1.0
    o, d = _rays64(cams)
    # Normal of the mesh's own hit point (rendered depth), as a sphere normal: p / |p|.
    p = o + d * gt.depth[:, 0, ..., None].double()
    radial = p / p.norm(dim=-1, keepdim=True)
    assert (decoded[mask] - radial[mask]).abs().max() < 1.5e-2
    # And the analytic hit of the true sphere, away from the silhouette.
    hit, t, closest = _analytic_sphere(o, d)
    n = (o + d * t[..., None]) / SPHERE_R
    inner = mask & hit & (closest < 0.9 * SPHERE_R)
    assert (decoded[inner] - n[inner]).abs().max() < 1.5e-2
    # Visible normals face the camera.
    assert ((decoded * d).sum(-1)[mask] < 0).all()
    assert (gt.normal.permute(0, 2, 3, 1)[~mask] == 0.5).all()


# ----------------------------------------------------------------------------------------------
# 5. The world: prompts, held-out pairs, sizes, the mug's handle
# ----------------------------------------------------------------------------------------------
def test_prompt_sets():
    assert len(SHAPES) == 6 and len(COLOR_NAMES) == 6 and set(COLORS) == set(COLOR_NAMES)
    prompts = all_prompts()
    texts = [p.text for p in prompts]
    assert len(prompts) == 36 and len(set(texts)) == 36
    assert {(p.shape, p.color) for p in prompts} == {(s, c) for s in SHAPES for c in COLOR_NAMES}
    train = training_prompts()
    held = held_out_prompts()
    assert len(held) == len(HELD_OUT) and len(train) == 36 - len(HELD_OUT)
    assert {(p.shape, p.color) for p in held} == set(HELD_OUT)
    train_pairs = {(p.shape, p.color) for p in train}
    assert not (train_pairs & set(HELD_OUT))
    assert all(not p.held_out for p in train) and all(p.held_out for p in held)
    for s, c in HELD_OUT:
        assert prompt_for(s, c) not in {p.text for p in train}
    for p in prompts:
        assert all(0.0 <= x <= 1.0 for x in p.albedo) and p.albedo == COLORS[p.color]
    assert BACKGROUND == (1.0, 1.0, 1.0)


def test_parse_prompt_round_trip_and_rejects():
    for shape in SHAPES:
        for color in COLOR_NAMES:
            text = prompt_for(shape, color)
            assert text == f"a {color} {shape}"
            for variant in (text, text + ", front view", text + ", overhead view", text.upper(), "  " + text + "  "):
                p = parse_prompt(variant)
                assert p is not None, variant
                assert (p.shape, p.color) == (shape, color), variant
                assert p.text == text
    assert parse_prompt("an orange torus").color == "orange"
    for bad in ("a dog", "a red dog", "a dog, front view", "a cube", "red", "", "a pink cube", "a red cube dog"):
        assert parse_prompt(bad) is None, bad


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_mesh_fits_and_is_closed(shape):
    mesh = shape_mesh(shape)
    assert np.linalg.norm(mesh.vertices, axis=1).max() <= 0.5
    # Centred: the bounding box straddles the origin on every axis.
    assert (mesh.bounds[0] < 0).all() and (mesh.bounds[1] > 0).all()
    # Vertices are split along sharp edges for shading; merged back, the surface is closed and outward.
    merged = mesh.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    assert merged.is_watertight and merged.is_winding_consistent
    assert merged.volume > 0
    if shape == "cube":
        assert merged.volume == pytest.approx(0.56 ** 3, rel=1e-9)


def test_unknown_shape_raises():
    with pytest.raises(ValueError):
        shape_mesh("dog")


def _extent_right_left(mask, W):
    """(pixels from the centre line to the rightmost / leftmost hit column) per view."""
    cols = torch.arange(W, dtype=torch.float64) + 0.5 - W / 2
    out = []
    for m in mask:
        used = cols[m.any(0)]
        out.append((used.max().item(), -used.min().item()))
    return out


def test_mug_handle_points_to_plus_y():
    # Mesh: the geometry reaches further out on +Y (the handle) than on -Y (the body wall).
    v = shape_mesh("mug").vertices
    assert v[:, 1].max() > -v[:, 1].min() + 0.03
    W = 48
    cams = _cams([0.0, 0.0, 15.0, 15.0], [0.0, 180.0, 0.0, 180.0], W)
    mug = render_shape("mug", "red", cams, shading="albedo").mask[:, 0] > 0.5
    mir = render_mesh(mirrored_mug(), COLORS["red"], cams, shading="albedo").mask[:, 0] > 0.5
    # Front views (0, 2): +Y is the image's right, so the handle sticks out further on the right;
    # back views (1, 3): on the left. The mirrored mug is the other way round.
    for b, (right, left) in enumerate(_extent_right_left(mug, W)):
        if b % 2 == 0:
            assert right > left + 1.5, (b, right, left)
        else:
            assert left > right + 1.5, (b, right, left)
    for b, (right, left) in enumerate(_extent_right_left(mir, W)):
        if b % 2 == 0:
            assert left > right + 1.5, (b, right, left)
        else:
            assert right > left + 1.5, (b, right, left)
    # The mug is symmetric front-to-back (x -> -x), so its back view is its front view flipped
    # left-right, and the mirrored mug's front view is the mug's front view flipped.
    for f, bk in ((0, 1), (2, 3)):
        assert (mug[bk] != mug[f].flip(-1)).sum() <= 2
        assert (mir[f] != mug[f].flip(-1)).sum() <= 2
    assert (mug[0] != mug[0].flip(-1)).sum() > 20  # and it is not left-right symmetric


# ----------------------------------------------------------------------------------------------
# 6. Every shape renders from a turntable
# ----------------------------------------------------------------------------------------------
def test_every_shape_renders_from_orbit_views():
    cams = orbit_cameras(4, 24)
    for shape in SHAPES:
        gt = render_shape(shape, COLOR_NAMES[0], cams)
        assert gt.rgb.shape == (4, 3, 24, 24) and gt.mask.shape == (4, 1, 24, 24)
        assert gt.depth.shape == (4, 1, 24, 24) and gt.normal.shape == (4, 3, 24, 24)
        area = gt.mask.sum((1, 2, 3))
        assert (area > 0).all(), shape
        assert (area < 24 * 24).all(), shape  # the object fits in the frame with background around it
        assert torch.isfinite(gt.rgb).all() and (gt.rgb >= 0).all() and (gt.rgb <= 1).all()
        hit = gt.mask > 0.5
        # Depths of hits lie within the bounding sphere seen from distance 1.75.
        assert (gt.depth[hit] > 1.75 - 0.5 - 1e-4).all() and (gt.depth[hit] < 1.75 + 0.5).all()
