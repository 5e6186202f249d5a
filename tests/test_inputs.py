"""The one mesh reader (threedistill.meshio), inputs resolved into files before a representation is
built (threedistill.inputs), and the Representation interface that generic code asks."""

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threedistill.cameras import preview_cameras
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.inputs import needs_resolving, resolve_inputs
from threedistill.runs import RunFolder
from threedistill.meshio import read_mesh, write_mesh_arrays
from threedistill.representations import RepresentationContext, build_representation
from threedistill.shapes.world import shape_mesh


def _build(cfg, from_checkpoint=False):
    return build_representation(cfg.representation, RepresentationContext.of_run(cfg.run, from_checkpoint),
                                torch.device("cpu"))


def test_mesh_arrays_round_trip_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(40, 3))  # float64, digits a PLY/GLB would round
    f = rng.integers(0, 40, size=(30, 3)).astype(np.int64)
    c = rng.uniform(size=(40, 3)).astype(np.float32)
    data = read_mesh(write_mesh_arrays(tmp_path / "m.npz", v, f, c), "key")
    assert not data.y_up
    for got, want in ((data.vertices, v), (data.faces, f), (data.colors, c)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_read_mesh_reads_exchange_files_and_point_clouds(tmp_path):
    box = trimesh.creation.box(extents=(1, 2, 3))
    box.visual.vertex_colors = np.tile(np.array([[255, 0, 0, 255]], np.uint8), (len(box.vertices), 1))
    box.export(tmp_path / "b.ply")
    data = read_mesh(tmp_path / "b.ply", "key")
    assert data.y_up and data.faces.shape == (12, 3) and np.allclose(data.colors, [1, 0, 0])
    trimesh.PointCloud(np.zeros((5, 3)) + 0.1).export(tmp_path / "p.ply")
    cloud = read_mesh(tmp_path / "p.ply", "key")
    assert cloud.faces.shape == (0, 3) and cloud.vertices.shape == (5, 3)
    with pytest.raises(UserError, match="^key: file .* not found"):
        read_mesh(tmp_path / "missing.glb", "key")


def test_shape_init_is_resolved_into_the_exact_shapes_world_mesh(tmp_path):
    cfg = load_config(None, ["representation.name=gaussians", "representation.gaussians.init=shape",
                             "run.prompt=a green torus"])
    assert needs_resolving(cfg)
    resolved = resolve_inputs(cfg, RunFolder(tmp_path))
    assert cfg.representation.gaussians.init == "shape"  # the user's config is untouched
    init = resolved.representation.gaussians.init
    assert init.startswith("file:") and Path(init[5:]).parent == RunFolder(tmp_path).inputs_dir
    data = read_mesh(init[5:], "key")
    ref = shape_mesh("torus")
    assert np.array_equal(data.vertices, ref.vertices) and np.array_equal(data.faces, ref.faces)
    assert data.colors is None
    # Built from the file, the Gaussians equal those sampled on the in-memory mesh with the same draws.
    torch.manual_seed(3)
    rep = _build(resolved)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    pts, _ = trimesh.sample.sample_surface(ref, int(cfg.representation.gaussians.num_points), seed=seed)
    assert torch.equal(rep.means.detach(), torch.as_tensor(np.asarray(pts, dtype=np.float32)))
    # A file already there is reused (a resumed run keeps its input).
    assert resolve_inputs(cfg, RunFolder(tmp_path)).representation.gaussians.init == init


def test_nothing_to_resolve_returns_the_config_itself(tmp_path):
    cfg = load_config(None, ["representation.name=mesh"])
    assert not needs_resolving(cfg) and resolve_inputs(cfg, RunFolder(tmp_path)) is cfg
    assert not (tmp_path / "representation.mesh.init.npz").exists()


def test_unresolved_inputs_are_refused_but_ignored_when_restoring_a_checkpoint(tmp_path):
    cfg = load_config(None, ["representation.name=mesh", f"representation.mesh.init=run:{tmp_path / 'gone'}",
                             "representation.mesh.init_subdivisions=1"])
    with pytest.raises(UserError, match="resolved"):
        _build(cfg)
    rep = _build(cfg, from_checkpoint=True)  # the checkpoint replaces the whole mesh
    assert rep.faces.shape == (80, 3)


def test_the_interface_answers_generic_questions():
    cams = preview_cameras(8)
    mesh = _build(load_config(None, ["representation.name=mesh", "representation.mesh.init_subdivisions=1",
                                     "representation.mesh.background=black"]))
    gauss = _build(load_config(None, ["representation.name=gaussians", "representation.gaussians.num_points=20"]))
    nerf = _build(load_config(None, ["representation.nerf.n_levels=2", "representation.nerf.background=mlp"]))
    assert mesh.explicit_surface() is not None and gauss.explicit_surface() is None and nerf.explicit_surface() is None
    assert gauss.extra_outputs() == ("splat",) and mesh.extra_outputs() == () and nerf.extra_outputs() == ()
    assert gauss.progress_stats() == {"gaussians": 20} and mesh.progress_stats() == {}
    assert gauss.evaluation_ambient() is None  # unlit colors
    assert mesh.evaluation_ambient() == pytest.approx(0.1) and nerf.evaluation_ambient() == pytest.approx(0.1)
    assert torch.equal(mesh.evaluation_background(cams), torch.zeros(4, 3, 8, 8))
    assert torch.equal(gauss.evaluation_background(cams), torch.ones(4, 3, 8, 8))
    bg = nerf.evaluation_background(cams)  # the background MLP along each pixel's ray
    assert bg.shape == (4, 3, 8, 8) and 0 < float(bg.min()) and float(bg.max()) < 1 and float(bg.std()) > 0
    assert mesh.config_key == "representation.mesh" and gauss.config_key == "representation.gaussians"
    with pytest.raises(UserError, match="splat"):
        mesh.write_extra_output("splat", Path("x.ply"))
