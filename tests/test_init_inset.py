"""``representation.gaussians.init_inset`` (threedistill/inputs.py ``inset_surface`` /
``matched_inset``): a mesh start moved inwards along its vertex normals, by a distance or by the
amount at which the Gaussians' start covers the mesh's silhouette, checked against a sphere whose
silhouette is known in closed form."""

import logging
import math
import tempfile

import numpy as np
import pytest
import torch
import trimesh

from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.inputs import inset_surface, matched_inset, matching_cameras, needs_resolving, resolve_inputs
from threedistill.meshio import read_mesh, write_mesh_arrays
from threedistill.representations import RepresentationContext, build_representation
from threedistill.runs import RunFolder

R = 0.35  # the test sphere's radius (about a shapes-world object's size)


def _sphere(radius=R, inside_out=False):
    m = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    faces = np.asarray(m.faces)[:, ::-1] if inside_out else np.asarray(m.faces)
    return np.asarray(m.vertices, dtype=np.float64), np.ascontiguousarray(faces, dtype=np.int64)


@pytest.mark.parametrize("inside_out", [False, True])
def test_inset_moves_a_sphere_inwards_whichever_way_it_is_wound(inside_out):
    verts, faces = _sphere(inside_out=inside_out)
    moved = inset_surface(verts, faces, 0.05)
    # an icosphere's vertex normals are radial: every vertex ends at radius R - 0.05
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), R - 0.05, atol=1e-3)
    np.testing.assert_array_equal(verts, _sphere(inside_out=inside_out)[0])  # the input is not changed


def _disc_pixels(cfg, radius):
    """The sphere's silhouette area in pixels, summed over the matching views, in closed form: a
    sphere of radius r seen from distance D is a disc of angular radius asin(r / D), of image radius
    f tan(asin(r / D)) (f: focal length in pixels)."""
    cams = matching_cameras(cfg.camera)
    f = float(cams.focal[0]) if torch.is_tensor(cams.focal) else float(cams.focal)
    rad = f * math.tan(math.asin(radius / float(cfg.camera.eval_distance)))
    return len(cams) * math.pi * rad * rad


def _start_pixels(cfg, verts, faces, inset):
    path = write_mesh_arrays(tempfile.mkdtemp() + "/m.npz", inset_surface(verts, faces, inset), faces)
    rep_cfg = cfg.representation.copy()
    rep_cfg.gaussians.init = f"file:{path}"
    torch.manual_seed(1)  # another draw of points than the calibration's
    rep = build_representation(rep_cfg, RepresentationContext.of_run(cfg.run), torch.device("cpu")).eval()
    with torch.no_grad():
        return int((rep.render(matching_cameras(cfg.camera), training=False).alpha > 0.5).sum())


def test_matched_inset_makes_the_start_cover_the_mesh_silhouette():
    cfg = load_config("sds-gaussians", ["run.prompt=a ball", "representation.gaussians.num_points=2048"])
    verts, faces = _sphere()
    target = _disc_pixels(cfg, R)
    # Gaussians centred on the surface reach past it: the start at inset 0 is visibly too large.
    assert _start_pixels(cfg, verts, faces, 0.0) > 1.08 * target
    state = torch.random.get_rng_state()
    inset = matched_inset(cfg, verts, faces)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert 0.005 < inset < 0.25 * 2 * R
    # a fresh start (other random points) from the matched inset covers the closed-form disc
    assert _start_pixels(cfg, verts, faces, inset) == pytest.approx(target, rel=0.03)


def test_resolve_moves_a_mesh_file_and_leaves_point_clouds_as_they_are(tmp_path, caplog):
    verts, faces = _sphere()
    mesh_file = write_mesh_arrays(tmp_path / "ball.npz", verts, faces)
    base = ["representation.name=gaussians", "run.prompt=a ball"]
    plain = load_config(None, [*base, f"representation.gaussians.init=file:{mesh_file}"])
    assert not needs_resolving(plain)  # no inset: the file is read by the Gaussians as it is
    cfg = load_config(None, [*base, f"representation.gaussians.init=file:{mesh_file}",
                             "representation.gaussians.init_inset=0.04"])
    assert needs_resolving(cfg)
    out = resolve_inputs(cfg, RunFolder(tmp_path / "run"))
    resolved = str(out.representation.gaussians.init)
    assert resolved.startswith("file:") and str(tmp_path / "run" / "inputs") in resolved
    moved = read_mesh(resolved[len("file:"):], "t")
    np.testing.assert_allclose(np.linalg.norm(moved.vertices, axis=1), R - 0.04, atol=1e-3)
    np.testing.assert_array_equal(moved.faces, faces)
    assert cfg.representation.gaussians.init == f"file:{mesh_file}"  # the asked config is unchanged

    cloud = write_mesh_arrays(tmp_path / "cloud.npz", verts, np.zeros((0, 3), np.int64))
    cfg = load_config(None, [*base, f"representation.gaussians.init=file:{cloud}",
                             "representation.gaussians.init_inset=match"])
    with caplog.at_level(logging.WARNING):
        out = resolve_inputs(cfg, RunFolder(tmp_path / "run2"))
    assert out.representation.gaussians.init == f"file:{cloud}"
    assert "point cloud" in caplog.text


@pytest.mark.parametrize("bad", ["-0.1", "1e9", "matched", "true", "[0.1]"])
def test_bad_inset_is_a_config_error(bad):
    with pytest.raises(UserError, match="init_inset"):
        load_config(None, ["representation.name=gaussians", f"representation.gaussians.init_inset={bad}"])
