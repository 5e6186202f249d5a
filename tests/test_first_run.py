"""A first run that tells the truth: torch threads on a busy machine, the warning for prompts the
built-in prior cannot follow, the console (run folder first, smoothed loss, export stages),
previews and turntables large enough to judge, and exports placed for downstream tools."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

from threedistill.config import load_config
from threedistill.devices import ThreadGovernor, choose_threads
from threedistill.distill import LOSS_EMA_WEIGHT, smoothed
from threedistill.errors import UserError
from threedistill.export import export_run_meshes, render_turntable
from threedistill.export.check import load_exported_mesh, mesh_frame_renderer
from threedistill.export.mesh import Z_UP_FRONT_MINUS_Y, placement, save_mesh
from threedistill.meshio import Z_UP_TO_Y_UP, file_to_world, read_mesh, world_to_file
from threedistill.pipeline import RunRequest, prepare_run, prompt_warnings
from threedistill.shapes.world import COLOR_NAMES, SHAPES


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.2, 1), (2, 7.5, 1), (16, 0.0, 16),
                                                 (16, 3.4, 13), (16, 9.6, 6), (16, 30.0, 1), (1, 0.0, 1), (3, 0.0, 3),
                                                 (4, 2.6, 1)])
def test_auto_threads_take_the_cores_the_load_leaves(cores, load, expected):
    n, why = choose_threads("auto", environ={}, cores=lambda: cores, load=lambda: load)
    assert n == expected  # round(cores - load), at least 1, at most the cores
    assert f"{cores} core" in why and f"{load:.2f}" in why


def test_threads_setting_and_omp_num_threads_win():
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "1"}, cores=lambda: 2, load=lambda: 0.0)[0] == 3
    assert choose_threads("auto", environ={"OMP_NUM_THREADS": "5"}, cores=lambda: 2, load=lambda: 9.0) == (5, "OMP_NUM_THREADS")
    # An unusable OMP_NUM_THREADS is ignored (torch ignores it too).
    assert choose_threads("auto", environ={"OMP_NUM_THREADS": "x"}, cores=lambda: 4, load=lambda: 0.0)[0] == 4


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_thread_governor_gives_cores_back_when_others_get_busy_and_takes_them_again():
    clock, load, calls = _Clock(), [0.3], []
    gov = ThreadGovernor("auto", 2, every_s=10, environ={}, cores=lambda: 2, load=lambda: load[0], clock=clock,
                         set_threads=calls.append)
    assert gov.tick() is None  # not yet 10 s
    clock.t = 10
    load[0] = 2.0  # only this run's two threads
    assert gov.tick() is None and calls == []
    clock.t = 20
    load[0] = 3.1  # another busy process: 2 cores, 1.1 of them used by others -> 1 thread
    assert gov.tick() == 1 and calls == [1]
    clock.t = 25
    load[0] = 0.0
    assert gov.tick() is None  # looks only every 10 s
    clock.t = 30
    load[0] = 2.0  # this run's one thread plus one other: no whole core free
    assert gov.tick() is None and gov.threads == 1
    clock.t = 40
    load[0] = 1.0  # the other process ended: a whole core free again
    assert gov.tick() == 2 and calls == [1, 2]


def test_thread_governor_leaves_a_fixed_setting_alone():
    for setting, environ in [(3, {}), ("auto", {"OMP_NUM_THREADS": "1"})]:
        calls = []
        gov = ThreadGovernor(setting, 1, every_s=0, environ=environ, cores=lambda: 8, load=lambda: 0.0,
                             set_threads=calls.append)
        assert gov.tick() is None and calls == [] and not gov.active


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5"])
def test_run_threads_is_validated(bad):
    with pytest.raises(UserError, match="run.threads"):
        load_config(overrides=[f"run.threads={bad}"])
    assert load_config(overrides=["run.threads=2"]).run.threads == 2
    assert load_config().run.threads == "auto"


def test_the_run_sets_torch_threads(tmp_path, monkeypatch):
    from threedistill.distill import Distiller

    before = torch.get_num_threads()
    try:
        cfg = load_config(overrides=["run.prompt=a red cube", f"run.out_dir={tmp_path}", "run.threads=1"])
        cfg.run.preview_resolution = 48
        d = Distiller(cfg, run_dir=tmp_path / "r")
        d.build()
        assert d.threads == 1 and torch.get_num_threads() == 1
        # Previews: each view at max(run.resolution, run.preview_resolution) px (here 48 > 32).
        d.folder.previews_dir.mkdir(parents=True)
        from PIL import Image

        with Image.open(d.save_preview(0)) as im:
            assert im.size == (4 * 48, 48)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Prompts outside the shapes world
# ----------------------------------------------------------------------------------------------
def test_a_prompt_outside_the_shapes_world_is_warned_about_before_the_run(tmp_path):
    said = []
    cfg, folder = prepare_run(RunRequest(prompt="a hamburger", out_dir=tmp_path, on_warning=said.append))
    assert len(said) == 1 and not folder.path.exists()  # a warning, not an error; nothing created
    text = said[0]
    assert "a <color> <shape>" in text and "36" in text and "a hamburger" in text
    assert all(c in text for c in COLOR_NAMES) and all(s in text for s in SHAPES)
    assert "-c sd" in text and "prior.name=" in text
    said.clear()
    prepare_run(RunRequest(prompt="a red cube", out_dir=tmp_path, on_warning=said.append))
    prepare_run(RunRequest(prompt="A green torus, side view", out_dir=tmp_path, on_warning=said.append))
    assert said == []


def test_only_the_shapes_prior_warns():
    cfg = load_config(overrides=["run.prompt=a hamburger", "prior.name=stabilityai/stable-diffusion-2-1-base"])
    assert prompt_warnings(cfg) == []
    cfg.prior.name = "shapes"
    assert len(prompt_warnings(cfg)) == 1


def test_cli_prints_the_warning_and_the_run_folder_before_the_build(tmp_path, monkeypatch, capsys):
    from threedistill import cli

    seen = {}

    def fake_run(cfg, folder, *a, **k):  # what the console showed when the run (the build) starts
        out, err = capsys.readouterr()
        seen.update(out=out, err=err, folder=folder.path)
        raise UserError("stopped by the test")

    monkeypatch.setattr(cli, "run_prepared", fake_run)
    assert cli.main(["generate", "a hamburger", "--out", str(tmp_path)]) == cli.EXIT_USER_ERROR
    assert seen["out"].startswith(f"run folder: {seen['folder']}")
    assert seen["err"].startswith("warning: the built-in prior 'shapes' knows only")


def test_app_job_carries_the_warning(tmp_path):
    from threedistill.app.jobs import build_config, JobSettings
    from threedistill.app.ui import _progress_html

    warnings = []
    build_config(JobSettings.from_dict({"prompt": "a hamburger", "preset": "sds-nerf"}), tmp_path, warnings=warnings)
    assert len(warnings) == 1
    job = {"status": "queued", "position": 1, "settings": {"prompt": "a hamburger"}, "warnings": warnings}
    html = _progress_html(job)
    assert "knows only the 36 prompts" in html and "-c sd" in html


def test_history_thumbnail_is_the_front_view(tmp_path):
    from PIL import Image

    from threedistill.app.ui import front_view

    strip = np.zeros((64, 256, 3), np.uint8)
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        strip[:, 64 * i:64 * (i + 1)] = c
    Image.fromarray(strip).save(tmp_path / "p.png")
    thumb = np.asarray(front_view(str(tmp_path / "p.png")))
    assert thumb.shape == (64, 64, 3) and (thumb == (255, 0, 0)).all()


# ----------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------
def test_smoothed_loss_is_an_exponential_moving_average():
    values = [20.0, 15000.0, 30.0, 25.0]
    ema = None
    for v in values:
        ema = smoothed(ema, v)
    w = LOSS_EMA_WEIGHT
    expected = ((20.0 * (1 - w) + w * 15000.0) * (1 - w) + w * 30.0) * (1 - w) + w * 25.0
    assert ema == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Export placement
# ----------------------------------------------------------------------------------------------
def _box() -> trimesh.Trimesh:
    """An off-centre box of distinct extents (x 0.2, y 0.4, z 0.6) with vertex colors, so the
    file's bounds tell every axis, sign, origin and scale apart."""
    m = trimesh.creation.box(extents=[0.2, 0.4, 0.6])
    m.apply_translation([0.3, -0.1, 0.05])
    m.visual = trimesh.visual.ColorVisuals(m, vertex_colors=np.tile([200, 30, 20, 255], (len(m.vertices), 1)))
    return m


def _file_vertices(path: Path) -> np.ndarray:
    """The file's own coordinates (no placement undone)."""
    loaded = trimesh.load(str(path), process=False)
    if isinstance(loaded, trimesh.Scene):
        return np.concatenate([trimesh.transform_points(loaded.geometry[name].vertices, t)
                               for node in loaded.graph.nodes_geometry
                               for t, name in [loaded.graph[node]]])
    return np.asarray(loaded.vertices)


@pytest.mark.parametrize("fmt,up_axis,origin,size",
                         list(itertools.product(["glb", "obj", "ply"], ["auto", "y", "z"], ["base", "center", "world"],
                                                [None, 2.0])))
def test_placement_in_each_format(tmp_path, fmt, up_axis, origin, size):
    m = _box()
    world = np.asarray(m.vertices)
    matrix = placement(world, fmt, up_axis, origin, size)
    path = save_mesh(m, tmp_path / f"model.{fmt}", fmt, matrix)
    v = _file_vertices(path)
    lo, hi = v.min(0), v.max(0)
    # Independent expectation: the up axis, the front direction, scale and pivot.
    up = "y" if fmt == "glb" or (up_axis == "auto" and fmt == "obj") or up_axis == "y" else "z"
    scale = 1.0 if size is None else size / 0.6
    w_lo, w_hi = world.min(0), world.max(0)
    pivot = {"world": np.zeros(3), "center": (w_lo + w_hi) / 2,
             "base": np.array([(w_lo[0] + w_hi[0]) / 2, (w_lo[1] + w_hi[1]) / 2, w_lo[2]])}[origin]
    a_lo, a_hi = (w_lo - pivot) * scale, (w_hi - pivot) * scale
    if up == "y":  # file x = world y (left), y = world z (up), z = world x (front)
        exp_lo, exp_hi = [a_lo[1], a_lo[2], a_lo[0]], [a_hi[1], a_hi[2], a_hi[0]]
    else:  # file x = world y, y = -world x (front towards -Y), z = world z
        exp_lo, exp_hi = [a_lo[1], -a_hi[0], a_lo[2]], [a_hi[1], -a_lo[0], a_hi[2]]
    np.testing.assert_allclose(lo, exp_lo, atol=1e-6)
    np.testing.assert_allclose(hi, exp_hi, atol=1e-6)
    up_index = 1 if up == "y" else 2
    assert hi[up_index] - lo[up_index] == pytest.approx(0.6 * scale)  # the height is along the up axis
    if origin == "base":
        assert lo[up_index] == pytest.approx(0.0, abs=1e-9)
    # The file records its placement, and the readers bring it back to the world frame.
    np.testing.assert_allclose(world_to_file(path), matrix, atol=1e-12)
    back = read_mesh(path, "test")
    np.testing.assert_allclose(np.sort(back.vertices @ file_to_world(path)[:3, :3].T + file_to_world(path)[:3, 3], 0)
                               .min(0), w_lo, atol=1e-6)
    np.testing.assert_allclose(load_exported_mesh(path).vertices.min(0), w_lo, atol=1e-6)
    np.testing.assert_allclose(load_exported_mesh(path).vertices.max(0), w_hi, atol=1e-6)


def test_default_export_is_all_formats_upright_in_blender_on_the_ground(tmp_path):
    cfg = load_config()
    assert list(cfg.export.formats) == ["glb", "obj", "ply"]
    assert (cfg.export.up_axis, cfg.export.origin, cfg.export.size) == ("auto", "base", None)
    m = _box()
    for fmt, rotation, up in (("glb", Z_UP_TO_Y_UP, 1), ("obj", Z_UP_TO_Y_UP, 1), ("ply", Z_UP_FRONT_MINUS_Y, 2)):
        matrix = placement(m.vertices, fmt, cfg.export.up_axis, cfg.export.origin, cfg.export.size)
        np.testing.assert_allclose(matrix[:3, :3], rotation[:3, :3])
        v = _file_vertices(save_mesh(m, tmp_path / f"m.{fmt}", fmt, matrix))
        assert v.min(0)[up] == pytest.approx(0.0, abs=1e-9)


def test_a_file_without_a_recorded_placement_is_read_as_y_up(tmp_path):
    m = _box()
    m.apply_transform(Z_UP_TO_Y_UP)
    m.export(tmp_path / "other.ply")
    np.testing.assert_allclose(world_to_file(tmp_path / "other.ply"), Z_UP_TO_Y_UP)
    np.testing.assert_allclose(load_exported_mesh(tmp_path / "other.ply").vertices.min(0), _box().vertices.min(0),
                               atol=1e-6)


@pytest.mark.parametrize("key,value", [("export.up_axis", "x"), ("export.origin", "top"), ("export.size", "0"),
                                       ("export.turntable_of", "video"), ("run.preview_resolution", "0")])
def test_export_keys_are_validated(key, value):
    with pytest.raises(UserError, match=key):
        load_config(overrides=[f"{key}={value}"])


class _Ball(torch.nn.Module):
    """A red ball of radius 0.4 as a density field (for export stages)."""
    bounds = 1.0
    isosurface_threshold = 0.5
    config_key = "representation.test"

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def density(self, x):
        return (0.4 - x.norm(dim=-1)) * 10.0 + 0.5

    def albedo(self, x):
        return torch.tensor([0.9, 0.1, 0.1]).expand(len(x), 3)

    def explicit_surface(self):
        return None


def test_export_stages_are_told_in_order(tmp_path):
    seen = []
    cfg = SimpleNamespace(mesh_resolution=24, min_component_ratio=0.05, texture=True, texture_size=64,
                          up_axis="auto", origin="base", size=None)
    paths = export_run_meshes(_Ball(), tmp_path, ["glb", "obj", "ply"], cfg, stage=seen.append)
    assert seen == ["marching cubes", "UV unwrap and 64px texture bake", "write glb", "write obj", "write ply"]
    assert [p.name for p in paths] == ["model.glb", "model.obj", "model.ply"]


def test_turntable_of_the_exported_mesh_shows_its_colors(tmp_path):
    import imageio.v2 as iio

    m = _box()
    path = save_mesh(m, tmp_path / "m.glb", "glb", placement(m.vertices, "glb", origin="base", size=1.0))
    out = render_turntable(None, tmp_path / "t.mp4", frames=4, resolution=64, distance=2.0, progress=False,
                           render=mesh_frame_renderer(path, 0.1))
    reader = iio.get_reader(out, format="FFMPEG")
    try:
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    # The box (world frame again: centred near (0.3, -0.1, 0.05)) is seen head-on in frame 0,
    # in its own color (200, 30, 20), lit by the headlight; the corners are the white background.
    hit = frames[0][24:40, 24:40].reshape(-1, 3).astype(float)
    red = hit[(hit[:, 0] > 150) & (hit[:, 1] < 100)]
    assert len(red) > 100 and np.abs(red.mean(0) - [200, 30, 20]).max() < 25
    assert (frames[0][:3, :3] > 245).all()
